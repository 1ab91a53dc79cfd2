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
from halfvae_ext.sharded_checkpoint import (MANIFEST, CheckpointError,
                                            UnverifiedCheckpointWarning)


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

_HANG_IN_SAVE_AT_STEP_4 = """
import sys, time
from halfvae_ext import fit_sharded
real = fit_sharded.save_checkpoint
def save_checkpoint(path, *a, meta, **k):
    if meta["step"] == 4:
        print("rank 1: hanging in the save of step 4", flush=True)
        time.sleep(3600)
    return real(path, *a, meta=meta, **k)
fit_sharded.save_checkpoint = save_checkpoint
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


@pytest.mark.parametrize("where", ["training", "start", "save"])
def test_a_hung_rank_is_an_error_saying_which_and_what_to_do(data, tmp_path, where):
    args = [str(data), "--latent-dim", "3", "--batch-size", "128", "--steps", "10",
            "--timeout", "5", "--checkpoint", "ck", "--checkpoint-every", "2", "--out", "m.npy"]
    rank0 = [sys.executable, "-m", "halfvae_ext.fit_sharded", *args]
    rank1 = {"training": [sys.executable, "-c", _HANG_AT_STEP_3, *args],
             "save": [sys.executable, "-c", _HANG_IN_SAVE_AT_STEP_4, *args],
             "start": [sys.executable, "-c", "import time; time.sleep(3600)"]}[where]
    rc, out, seconds = _run_two([rank0, rank1], tmp_path, timeout=90)
    assert rc == 1, out
    assert "Traceback" not in out, out
    assert "fit_sharded: error:" in out and "error: fit_sharded:" not in out, out
    if where == "training":
        assert "rank 0 of 2 gave up on a training step" in out and "(step 3)" in out, out
        assert "timeout=5 s" in out and "--resume" in out and "'ck' (step 2," in out, out
    elif where == "save":  # the last complete checkpoint is step 2's
        assert "rank 0 of 2 gave up on saving checkpoint 'ck' (step 4)" in out, out
        assert "--resume" in out and "'ck' (step 2," in out, out
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


# ------------------------------------------------------------------- a new run's checkpoint
def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_new_run_refuses_a_directory_holding_a_checkpoint(data, tmp_path, one_process, capsys):
    ck = tmp_path / "ck"
    _train(data, ck, 3)
    before = _snapshot(ck)
    out = tmp_path / "m.npy"
    with pytest.raises(FileExistsError, match=r"holds a checkpoint.*resume=True \(--resume\)"
                                              r".*another checkpoint directory or delete") as e:
        _train(data, ck, 6, out=out)
    assert e.value.filename == str(ck) and str(ck) in str(e.value)
    assert _snapshot(ck) == before and not out.exists()
    # the command line: one line, exit status 2, nothing trained
    assert main([str(data), "--latent-dim", "3", "--steps", "2", "--checkpoint", str(ck)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fit_sharded: error:") and str(ck) in err and "--resume" in err
    assert "Traceback" not in err and _snapshot(ck) == before
    # resume=True still continues it
    assert _train(data, ck, 6, resume=True)["steps"] == 6


@pytest.mark.parametrize("what", ["files", "file"])
def test_a_new_run_refuses_to_replace_files_that_are_not_a_checkpoint(data, tmp_path,
                                                                      one_process, what):
    ck = tmp_path / "ck"
    if what == "files":  # e.g. --checkpoint pointed at a project directory: a save deletes it
        ck.mkdir()
        (ck / "notes.txt").write_text("mine")
    else:
        ck.write_text("mine")
    with pytest.raises(FileExistsError, match="a new run would replace") as e:
        _train(data, ck, 2)
    assert e.value.filename == str(ck)
    assert (ck / "notes.txt" if what == "files" else ck).read_text() == "mine"


def test_a_new_run_into_an_empty_directory_is_fine(data, tmp_path, one_process):
    ck = tmp_path / "ck"
    ck.mkdir()
    assert _train(data, ck, 2)["steps"] == 2
    assert (ck / MANIFEST).is_file()


def test_an_interrupted_save_leaves_the_previous_checkpoint_named(data, tmp_path, one_process):
    """A save killed between its two renames leaves PATH.old and no PATH: a resume says where
    the checkpoint is, and a new run does not delete it."""
    ck = tmp_path / "ck"
    _train(data, ck, 2)
    old = tmp_path / "ck.old"
    ck.rename(old)
    with pytest.raises(CheckpointError, match=rf"'{ck}': no such directory, but '{old}' holds"
                                              rf" the checkpoint.*rename"):
        _train(data, ck, 4, resume=True)
    with pytest.raises(FileExistsError, match="interrupted save") as e:
        _train(data, ck, 4)
    assert e.value.filename == str(old) and (old / MANIFEST).is_file()


def test_save_checkpoint_refuses_to_delete_a_directory_that_is_not_one(tmp_path):
    import torch
    import torch.distributed as dist
    from halfvae_ext.sharded_checkpoint import save_checkpoint
    target = tmp_path / "project"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(FileExistsError, match="holds files but no checkpoint"):
            save_checkpoint(target, torch.nn.Linear(2, 2))
        save_checkpoint(tmp_path / "ck", torch.nn.Linear(2, 2))
    finally:
        dist.destroy_process_group()
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert (tmp_path / "ck" / MANIFEST).is_file()


# ----------------------------------------------------------------------------- no manifest
def _old_checkpoint(data, ck):
    """A checkpoint as a version before manifests wrote it: the DCP files only."""
    _train(data, ck, 6)
    (ck / MANIFEST).unlink()


def test_a_checkpoint_without_manifest_is_refused_saying_why_and_how(data, tmp_path,
                                                                    one_process, capsys):
    ck = tmp_path / "ck"
    _old_checkpoint(data, ck)
    with pytest.raises(CheckpointError, match=rf"checkpoint '{ck}' has no {MANIFEST}: it was "
                                              rf"written by an older version.*or it is damaged"
                                              rf".*trust_unverified_checkpoint=True "
                                              rf"\(--trust-unverified-checkpoint\)"):
        _train(data, ck, 10, resume=True)
    assert main([str(data), "--latent-dim", "3", "--batch-size", "128", "--steps", "10",
                 "--checkpoint", str(ck), "--resume"]) == 2
    assert "--trust-unverified-checkpoint" in capsys.readouterr().err


def test_trust_unverified_checkpoint_resumes_with_a_warning(data, tmp_path, one_process,
                                                            capsys):
    ck = tmp_path / "ck"
    fit(data, 3, batch_size=128, steps=10, out=tmp_path / "full.npy")
    _old_checkpoint(data, ck)
    with pytest.warns(UnverifiedCheckpointWarning, match=rf"'{ck}' has no {MANIFEST}"):
        r = _train(data, ck, 10, resume=True, trust_unverified_checkpoint=True,
                   out=tmp_path / "resumed.npy")
    assert r["steps"] == 10 and f"resumed from {ck} at step 6" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "resumed.npy"), np.load(tmp_path / "full.npy"),
                               rtol=1e-5, atol=1e-6)
    assert (ck / MANIFEST).is_file()  # saved again, with a manifest


def test_trust_unverified_checkpoint_on_the_command_line(data, tmp_path, one_process):
    ck = tmp_path / "ck"
    _old_checkpoint(data, ck)
    with pytest.warns(UnverifiedCheckpointWarning):
        assert main([str(data), "--latent-dim", "3", "--batch-size", "128", "--steps", "8",
                     "--checkpoint", str(ck), "--resume", "--trust-unverified-checkpoint"]) == 0


@pytest.mark.filterwarnings("ignore::halfvae_ext.sharded_checkpoint.UnverifiedCheckpointWarning")
@pytest.mark.parametrize("case", ["damaged", "not_dcp", "other_shape"])
def test_trust_unverified_checkpoint_still_refuses(data, tmp_path, one_process, case):
    """The opt-in covers a missing manifest only: a damaged one, a directory that is no DCP
    checkpoint or one that does not fit the model is still a CheckpointError naming it."""
    ck = tmp_path / "ck"
    _train(data, ck, 4)
    if case == "damaged":
        shard = sorted(ck.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:-3])
        expect, K = "bytes, .* were saved", 3
    elif case == "not_dcp":
        (ck / MANIFEST).unlink()
        (ck / ".metadata").unlink()
        expect, K = "not a checkpoint", 3
    else:
        (ck / MANIFEST).unlink()
        expect, K = "does not fit this model", 2
    with pytest.raises(CheckpointError, match=rf"checkpoint '{ck}'.*{expect}"):
        fit(data, K, batch_size=128, steps=8, checkpoint=ck, resume=True,
            trust_unverified_checkpoint=True, out=tmp_path / "m.npy")
    assert not (tmp_path / "m.npy").exists()


@pytest.mark.parametrize("manifest", ['{"format": "halfvae_ext.sharded_checkpoint/1", '
                                      '"files": {"a": "b"}}', '[1, 2]', '{"files": '])
def test_a_malformed_manifest_is_a_checkpoint_error(data, tmp_path, one_process, manifest):
    ck = tmp_path / "ck"
    _train(data, ck, 2)
    (ck / MANIFEST).write_text(manifest)
    with pytest.raises(CheckpointError, match=rf"checkpoint '{ck}'.*{MANIFEST}"):
        _train(data, ck, 4, resume=True, trust_unverified_checkpoint=True)


# ----------------------------------------------------------------------------- review fixes
def test_without_torchrun_the_environment_is_left_alone(data, tmp_path, monkeypatch):
    """A group of one needs no port: os.environ is not changed, and a second fit works."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    before = dict(os.environ)
    for name in ("a.npy", "b.npy"):
        assert fit(data, 3, batch_size=128, steps=2, out=tmp_path / name)["world"] == 1
    assert dict(os.environ) == before
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def _fail_step(monkeypatch, at):
    from halfvae_ext.collectives import CollectiveError
    real, calls = fit_sharded.all_reduce_gradients, []

    def all_reduce_gradients(model, timeout):
        calls.append(1)
        if len(calls) == at + 1:
            raise CollectiveError("all_reduce failed (a test)")
        return real(model, timeout=timeout)
    monkeypatch.setattr(fit_sharded, "all_reduce_gradients", all_reduce_gradients)


@pytest.mark.parametrize("every, advice", [
    (2, r"resume=True \(--resume\) from checkpoint '.*ck' \(step 2, saved every 2 steps\)"),
    (1000, r"rerun as before, without resume: no checkpoint had been saved to '.*ck' yet"),
])
def test_rank_failure_advises_resume_only_from_a_saved_checkpoint(data, tmp_path, one_process,
                                                                  monkeypatch, every, advice):
    import torch.distributed as dist
    _fail_step(monkeypatch, at=3)
    with pytest.raises(RankFailure, match=rf"rank 0 of 1 gave up on a training step .*step 3"
                                          rf".*{advice}"):
        _train(data, tmp_path / "ck", 10, checkpoint_every=every)
    assert not dist.is_initialized()


def test_a_failed_final_barrier_is_a_rank_failure_and_the_group_is_destroyed(
        data, tmp_path, one_process, monkeypatch):
    import torch.distributed as dist
    from halfvae_ext.collectives import CollectiveError, Comm
    real = Comm.barrier

    def barrier(self, what="barrier"):
        if what.startswith("the final barrier"):
            raise CollectiveError("peer gone (a test)")
        return real(self, what)
    monkeypatch.setattr(Comm, "barrier", barrier)
    with pytest.raises(RankFailure, match="gave up on the final barrier"):
        fit(data, 3, batch_size=128, steps=2)
    assert not dist.is_initialized()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_output_directory_is_refused_before_training(data, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="its directory is not writable"):
            fit(data, 3, steps=2, out=d / "m.npy")
    finally:
        d.chmod(0o755)


def test_main_reports_an_os_error_in_one_line(data, tmp_path, one_process, monkeypatch, capsys):
    def write_means(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "m.npy"))
    monkeypatch.setattr(fit_sharded, "write_means", write_means)
    assert main([str(data), "--latent-dim", "3", "--steps", "2", "--out",
                 str(tmp_path / "m.npy")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fit_sharded: error:") and "m.npy" in err and "Traceback" not in err
