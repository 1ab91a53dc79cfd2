"""The estimator's files and defaults: checksums, checkpoints a fit would replace, orphaned
temporary files, and decoder="auto"."""
import multiprocessing
import os
import signal
import time
import warnings

import numpy as np
import pytest
import torch

from halfvae_ext.atomic_io import atomic_write
from halfvae_ext.ica import HalfVAEICA, make_nonstationary, make_paper_linear
from halfvae_ext.ica.flow_recipe import MIN_HELD_OUT, held_out_split

FAST = dict(max_iter=30, n_restarts=1, tol=None, random_state=0)


@pytest.fixture(scope="module")
def paper():
    return make_paper_linear(400, random_state=0)


def _fit(est, X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(X, **kw)


def test_damaged_tensor_bytes_are_refused(paper, tmp_path):
    """Bytes flipped inside a saved tensor (the latent table) must not load as a model."""
    est = _fit(HalfVAEICA(3, **FAST), paper.X)
    path = tmp_path / "model.pt"
    est.save(path)
    HalfVAEICA.load(path)  # the intact file loads
    data = bytearray(path.read_bytes())
    mu = est.model_.latents.mu.detach().contiguous().numpy().tobytes()
    at = bytes(data).find(mu)
    assert at > 0, "the table's bytes are stored as they are"
    data[at + len(mu) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}: the file is damaged"):
        HalfVAEICA.load(path)


def test_edited_payload_is_refused(paper, tmp_path):
    est = _fit(HalfVAEICA(3, **FAST), paper.X)
    path = tmp_path / "model.pt"
    est.save(path)
    payload = torch.load(path, weights_only=True)
    payload["run"]["best"]["elbo"] = 123.0  # a plausible but false score
    torch.save(payload, path)
    with pytest.raises(ValueError, match="damaged"):
        HalfVAEICA.load(path)


def test_fresh_fit_refuses_to_replace_a_checkpoint(paper, tmp_path):
    ckpt = tmp_path / "run.pt"
    _fit(HalfVAEICA(3, **FAST, checkpoint_path=ckpt), paper.X)
    before = ckpt.read_bytes()
    est = HalfVAEICA(3, **{**FAST, "random_state": 1}, checkpoint_path=ckpt)
    with pytest.raises(FileExistsError, match="resume=True") as e:
        _fit(est, paper.X)
    assert e.value.filename == os.fspath(ckpt)
    assert ckpt.read_bytes() == before and not hasattr(est, "model_")
    # A user's unrelated file there is not replaced either.
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    with pytest.raises(FileExistsError):
        _fit(HalfVAEICA(3, **FAST, checkpoint_path=other), paper.X)
    assert other.read_text() == "mine"
    # resume=True continues (here: the finished run) instead.
    resumed = _fit(HalfVAEICA(3, **FAST, checkpoint_path=ckpt), paper.X, resume=True)
    assert resumed.n_iter_ == FAST["max_iter"]


def _write_forever(path, started):
    def write(f):
        f.write("partial")
        f.flush()
        started.set()
        time.sleep(600)
    atomic_write(path, write)


def test_a_killed_writer_leaves_no_orphan_after_the_next_write(tmp_path):
    path = tmp_path / "out.json"
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    child = ctx.Process(target=_write_forever, args=(str(path), started))
    child.start()
    try:
        assert started.wait(60)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(60)
    orphans = [p.name for p in tmp_path.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".tmp-out.json-")
    atomic_write(path, lambda f: f.write("done"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert path.read_text() == "done"


def test_auto_decoder_is_linear_without_u(paper):
    auto = _fit(HalfVAEICA(3, **FAST), paper.X)
    linear = _fit(HalfVAEICA(3, decoder="linear", **FAST), paper.X)
    assert auto.decoder_ == "linear"
    np.testing.assert_array_equal(auto.transform(paper.X), linear.transform(paper.X))
    np.testing.assert_array_equal(auto.components_, linear.components_)


def test_held_out_split_is_fixed_disjoint_and_skipped_for_small_runs():
    train, held = held_out_split(1000)
    assert held.numel() == 100 and train.numel() == 900
    assert torch.equal(torch.cat([train, held]).sort().values, torch.arange(1000))
    again_train, again_held = held_out_split(1000)
    assert torch.equal(held, again_held) and torch.equal(train, again_train)
    assert held_out_split(500)[1].numel() == MIN_HELD_OUT  # at least MIN_HELD_OUT rows
    assert held_out_split(2 * MIN_HELD_OUT - 1) == (None, None)


def test_auto_defaults_without_u(paper):
    # solver="auto" without u: the linear decoder by EM, 2 restarts; the gradient solver keeps
    # its old defaults (4 restarts).
    est = _fit(HalfVAEICA(3, max_iter=20, random_state=0, tol=None), paper.X)
    assert est.decoder_ == "linear" and len(est.restart_elbos_) == 2
    assert est._run.params["solver"] == "em" and est._run.params["decoder"] == "linear_em"
    adam = _fit(HalfVAEICA(3, max_iter=20, random_state=0, tol=None, solver="adam"), paper.X)
    assert adam.decoder_ == "linear" and len(adam.restart_elbos_) == 4


def test_auto_decoder_with_u_is_the_flow_or_the_linear_flow(tmp_path):
    P = make_nonstationary(60, 6, 3, n_layers=2, random_state=1)
    est = _fit(HalfVAEICA(3, max_iter=5, random_state=0, tol=None), P.X, u=P.u)
    # n_restarts="auto": restart 0 the flow, restart 1 the linear flow, kept by held-out rows.
    assert len(est.restart_elbos_) == 2
    assert est.decoder_ == ("flow", "linear_flow")[est.best_restart_]
    assert est.elbo_ == est.restart_elbos_.max()
    n_steps = len(est.model_.decoder.steps)  # the first linear map, then [coupling, linear]s
    assert n_steps == (17 if est.decoder_ == "flow" else 1)
    # elbo_ is the mean exact log-likelihood of the held-out rows, not of all rows.
    _, held = held_out_split(len(P.X))
    Xw = torch.as_tensor((P.X - est.mean_) @ est.whitening_.T)
    codes = torch.as_tensor(np.searchsorted(est.segments_, P.u))
    with torch.no_grad():
        ll = est.model_.flow_log_likelihood(Xw.float(), codes)[0]
    assert float(ll[held].mean()) == pytest.approx(est.elbo_, rel=1e-6)
    assert float(ll.mean()) != pytest.approx(est.elbo_, rel=1e-3)
    # The file keeps "auto"; loading and resuming resolve it the same way, also when the run
    # stopped inside the linear flow's restart (another architecture).
    est.save(tmp_path / "auto.pt")
    loaded = HalfVAEICA.load(tmp_path / "auto.pt")
    assert loaded.decoder == "auto" and loaded.decoder_ == est.decoder_
    np.testing.assert_array_equal(loaded.transform(P.X), est.transform(P.X))
    for stop in (2, 7):
        stopped = _fit(HalfVAEICA(3, max_iter=5, random_state=0, tol=None), P.X, u=P.u,
                       stop_after=stop)
        stopped.save(tmp_path / "stopped.pt")
        resumed = _fit(HalfVAEICA.load(tmp_path / "stopped.pt"), P.X, u=P.u, resume=True)
        np.testing.assert_array_equal(resumed.restart_elbos_, est.restart_elbos_)
        np.testing.assert_array_equal(resumed.transform(P.X), est.transform(P.X))
        (tmp_path / "stopped.pt").unlink()
    stopped = _fit(HalfVAEICA(3, max_iter=5, random_state=0, tol=None), P.X, u=P.u,
                   stop_after=2)
    stopped.save(tmp_path / "stopped.pt")
    # The same run without u is other data: refused, not silently retrained as linear.
    with pytest.raises(ValueError, match="cannot resume"):
        _fit(HalfVAEICA.load(tmp_path / "stopped.pt"), P.X, resume=True)
