"""fit_sharded.fit as a library call: keyword arguments, ValueError (never SystemExit), data with
NaN refused before any output, resume refused for other data/settings or a missing checkpoint,
damaged checkpoints refused, and a hung rank turned into an error that says what to do.

One-process fits run in this process (a gloo group of one, its environment set through
monkeypatch and undone after each test); the two-process ones run as child processes with a
hard timeout, killed and reaped whatever happens.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from halfvae_ext import fit_sharded
from halfvae_ext.fit_sharded import RankFailure, fit, main
from halfvae_ext.sharded_checkpoint import MANIFEST, CheckpointError


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process(monkeypatch):
    """A group of one in this process: the environment torchrun would set, undone afterwards."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)


def _mix(n=600, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.laplace(size=(n, 3)) @ rng.normal(size=(3, d))).astype(np.float32)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _mix())
    return path


# ----------------------------------------------------------------------------- the keyword API
@pytest.mark.parametrize("kwargs, name", [
    (dict(latent_dim=0), "latent_dim"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(steps=10, epochs=3), "epochs and steps"),
    (dict(lr=-1.0), "lr"),
    (dict(timeout=0), "timeout"),
    (dict(decoder="flow"), "decoder"),
    (dict(table_optimizer="sgd", state_dtype="bfloat16"), "state_dtype"),
    (dict(init="pca"), "init"),
    (dict(resume=True), "resume"),
    (dict(latent_dim=5), "latent_dim 5"),
])
def test_bad_arguments_raise_value_error_naming_them(data, tmp_path, kwargs, name):
    args = {"latent_dim": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        fit(data, args.pop("latent_dim"), **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_bad_data_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="data: cannot read .*nope.npy"):
        fit(tmp_path / "nope.npy", 2)
    with pytest.raises(ValueError, match="data must hold a 2-D array"):
        fit(np.zeros(5), 2)
    with pytest.raises(ValueError, match="out: no directory"):
        fit(_mix(), 2, out=str(tmp_path / "missing" / "m.npy"))


def test_main_turns_value_error_into_exit_status_2(data, capsys):
    assert main([str(data), "--latent-dim", "3", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fit_sharded: error: batch_size must be an integer >= 1")
    assert "Traceback" not in err


def test_fit_takes_an_array_and_a_path_alike(data, tmp_path, one_process):
    r = fit(np.load(data), 3, batch_size=128, steps=5, out=tmp_path / "a.npy")
    assert r["steps"] == 5 and r["world"] == 1
    fit(str(data), 3, batch_size=128, steps=5, out=str(tmp_path / "b.npy"))
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (600, 3)
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- NaN in the data
@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
def test_a_nan_or_inf_is_refused_before_any_output(tmp_path, one_process, value):
    x = _mix().astype(np.float64)
    x[417, 2] = value
    path = tmp_path / "bad.npy"
    np.save(path, x)
    out = tmp_path / "means.npy"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match=rf"data '{path}': row 417, column 2 is NaN, infinite"):
        fit(path, 3, batch_size=128, steps=5, out=out, checkpoint=tmp_path / "ck")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy", "means.npy"]


def test_sharded_separate_refuses_nan_and_keeps_the_output(tmp_path, monkeypatch, one_process):
    from halfvae_ext import cli
    x = _mix().astype(np.float64)
    x[3, 0] = np.nan
    path = tmp_path / "bad.npy"
    np.save(path, x)
    out = tmp_path / "s.npy"
    out.write_bytes(b"old")
    import io
    err = io.StringIO()
    rc = cli.main(["separate", str(path), "-k", "3", "-o", str(out), "--sharded",
                   "--batch-size", "64", "--max-iter", "5"], stdout=io.StringIO(), stderr=err)
    assert rc == 1
    assert f"{path}': row 3, column 0 is NaN" in err.getvalue()
    assert out.read_bytes() == b"old"


# ----------------------------------------------------------------------------- resume
def _train(data, ck, steps, **kw):
    return fit(data, 3, **{"batch_size": 128, "steps": steps, "checkpoint": ck, **kw})


def test_resume_continues_and_equals_the_uninterrupted_run(data, tmp_path, one_process, capsys):
    ck = tmp_path / "ck"
    fit(data, 3, batch_size=128, steps=10, out=tmp_path / "full.npy")
    _train(data, ck, 6)
    assert (ck / MANIFEST).is_file()
    r = _train(data, ck, 10, resume=True, out=tmp_path / "resumed.npy")
    assert r["steps"] == 10 and f"resumed from {ck} at step 6" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "resumed.npy"), np.load(tmp_path / "full.npy"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, name", [
    ("other_data", "data: checkpoint .* was trained on other data"),
    ("batch_size", "batch_size: checkpoint .* batch_size=128, this run has batch_size=64"),
    ("seed", "seed: checkpoint .* seed=0, this run has seed=1"),
    ("whiten", "whiten: checkpoint"),
])
def test_resume_refuses_other_data_or_settings(data, tmp_path, one_process, change, name):
    ck = tmp_path / "ck"
    _train(data, ck, 4)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    kw, src = {}, data
    if change == "other_data":  # same shape, other values
        src = tmp_path / "y.npy"
        np.save(src, _mix(seed=1))
    elif change == "batch_size":
        kw["batch_size"] = 64
    elif change == "seed":
        kw["seed"] = 1
    else:
        kw["whiten"] = "pca"
    out = tmp_path / "m.npy"
    with pytest.raises(ValueError, match=name):
        _train(src, ck, 8, resume=True, out=out, **kw)
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_resume_without_a_checkpoint_is_an_error_naming_the_directory(data, tmp_path,
                                                                      one_process):
    _train(data, tmp_path / "ck", 2)
    typo = tmp_path / "kc"
    with pytest.raises(CheckpointError, match=rf"checkpoint '{typo}': no such directory"):
        _train(data, typo, 4, resume=True, out=tmp_path / "m.npy")
    assert not typo.exists() and not (tmp_path / "m.npy").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "no_manifest", "extra"])
def test_damaged_checkpoint_is_refused_naming_the_directory(data, tmp_path, one_process, damage):
    ck = tmp_path / "ck"
    _train(data, ck, 4)
    shard = sorted(ck.glob("*.distcp"))[0]
    if damage == "flip":
        b = bytearray(shard.read_bytes())
        b[len(b) // 2] ^= 0x01
        shard.write_bytes(bytes(b))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif damage == "remove":
        shard.unlink()
    elif damage == "no_manifest":
        (ck / MANIFEST).unlink()
    else:
        (ck / "__9_0.distcp").write_bytes(b"stray")
    expect = {"flip": "does not match its saved sha256", "truncate": "bytes, .* were saved",
              "remove": "is missing", "no_manifest": f"no {MANIFEST}",
              "extra": "__9_0.distcp is not in the manifest"}[damage]
    out = tmp_path / "m.npy"
    with pytest.raises(CheckpointError, match=rf"checkpoint '{ck}'.*{expect}"):
        _train(data, ck, 8, resume=True, out=out)
    assert not out.exists()


# ----------------------------------------------------------------------------- a hung rank
_HANG_AT_STEP_3 = """
import sys, time
from halfvae_ext import fit_sharded
real = fit_sharded.batch_rows
def batch_rows(n, batch, seed, step, world, rank):
    if step == 3:
        print("rank 1: hanging at step 3", flush=True)
        time.sleep(3600)
    return real(n, batch, seed, step, world, rank)
fit_sharded.batch_rows = batch_rows
fit_sharded.exit_after(fit_sharded.main(sys.argv[1:]))
"""


def _run_two(cmds, cwd, timeout):
    """Start the ranks' commands (RANK 0, 1), wait for rank 0 at most `timeout` s, then kill
    and reap both whatever happens; returns (rank 0's return code, output, seconds)."""
    port = _free_port()
    procs = []
    t0 = time.monotonic()
    try:
        for rank, cmd in enumerate(cmds):
            env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2",
                       LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        try:
            out, _ = procs[0].communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 did not give up on its hung peer within {timeout} s")
        return procs[0].returncode, out, time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


@pytest.mark.parametrize("where", ["training", "start"])
def test_a_hung_rank_is_an_error_saying_which_and_what_to_do(data, tmp_path, where):
    args = [str(data), "--latent-dim", "3", "--batch-size", "128", "--steps", "10",
            "--timeout", "5", "--checkpoint", "ck", "--out", "m.npy"]
    rank0 = [sys.executable, "-m", "halfvae_ext.fit_sharded", *args]
    rank1 = ([sys.executable, "-c", _HANG_AT_STEP_3, *args] if where == "training" else
             [sys.executable, "-c", "import time; time.sleep(3600)"])  # never joins
    rc, out, seconds = _run_two([rank0, rank1], tmp_path, timeout=90)
    assert rc == 1, out
    assert "Traceback" not in out, out
    assert "fit_sharded: error:" in out
    if where == "training":
        assert "rank 0 of 2 gave up on a training step" in out and "(step 3)" in out, out
        assert "timeout=5 s" in out and "--resume" in out and "'ck'" in out, out
    else:
        assert "the process group did not start within timeout=5 s" in out, out
    assert seconds < 60
    assert not (tmp_path / "m.npy").exists()


def test_rank_failure_is_not_a_value_error():
    """main tells the two apart (exit 2 for the user's input, 1 for a failed rank)."""
    assert not issubclass(RankFailure, ValueError) and not issubclass(RankFailure, SystemExit)
    assert fit_sharded.__all__.count("fit") == 1


def test_nan_on_two_ranks_every_rank_refuses_and_nothing_is_written(tmp_path):
    """The NaN lies in the block rank 1 reads: both ranks raise the same error, exit 2, and
    neither the output nor the checkpoint appears."""
    from halfvae_ext.sharded_data import BLOCK_ROWS
    x = np.zeros((BLOCK_ROWS + 10, 2), np.float32)
    x[:, 0] = np.arange(x.shape[0]) % 7
    x[:, 1] = np.arange(x.shape[0]) % 5
    x[BLOCK_ROWS + 3, 1] = np.nan  # block 1: rank 1's
    np.save(tmp_path / "bad.npy", x)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "halfvae_ext.fit_sharded", "bad.npy",
           "--latent-dim", "2", "--steps", "2", "--timeout", "30", "--out", "m.npy",
           "--checkpoint", "ck"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"did not finish within 120 s:\n{out[-3000:]}")
    assert p.returncode != 0
    assert out.count(f"data 'bad.npy': row {BLOCK_ROWS + 3}, column 1 is NaN") == 2, out
    assert sorted(q.name for q in tmp_path.iterdir()) == ["bad.npy"]
