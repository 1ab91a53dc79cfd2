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


def test_auto_defaults_without_u_are_the_old_ones(paper):
    est = _fit(HalfVAEICA(3, max_iter=20, random_state=0, tol=None), paper.X)
    assert est.decoder_ == "linear" and len(est.restart_elbos_) == 4


def test_auto_decoder_is_the_flow_with_u(tmp_path):
    P = make_nonstationary(60, 6, 3, n_layers=2, random_state=1)
    est = _fit(HalfVAEICA(3, max_iter=5, random_state=0, tol=None), P.X, u=P.u)
    flow = _fit(HalfVAEICA(3, decoder="flow", max_iter=5, n_restarts=1, random_state=0,
                           tol=None), P.X, u=P.u)
    assert est.decoder_ == "flow" and len(est.restart_elbos_) == 1  # n_restarts="auto"
    np.testing.assert_array_equal(est.transform(P.X), flow.transform(P.X))
    # The file keeps "auto"; loading and resuming resolve it the same way.
    est.save(tmp_path / "auto.pt")
    loaded = HalfVAEICA.load(tmp_path / "auto.pt")
    assert loaded.decoder == "auto" and loaded.decoder_ == "flow"
    np.testing.assert_array_equal(loaded.transform(P.X), est.transform(P.X))
    stopped = _fit(HalfVAEICA(3, max_iter=5, random_state=0, tol=None), P.X, u=P.u,
                   stop_after=2)
    stopped.save(tmp_path / "stopped.pt")
    resumed = _fit(HalfVAEICA.load(tmp_path / "stopped.pt"), P.X, u=P.u, resume=True)
    np.testing.assert_array_equal(resumed.transform(P.X), est.transform(P.X))
    # The same run without u is other data: refused, not silently retrained as linear.
    with pytest.raises(ValueError, match="cannot resume"):
        _fit(HalfVAEICA.load(tmp_path / "stopped.pt"), P.X, resume=True)
