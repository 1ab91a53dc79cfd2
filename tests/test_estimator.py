"""HalfVAEICA: scikit-learn conventions, separation quality, reproducibility, checkpoint/resume."""
import os

import numpy as np
import pytest
import torch
from conftest import assert_same_fit
from sklearn.base import clone

from halfvae_ext.atomic_io import atomic_torch_save
from halfvae_ext.ica.estimator import HalfVAEICA
from halfvae_ext.ica import make_linear, make_paper_linear, mean_corr_coef, per_component_rmse
from halfvae_ext.ica.recipe import Recipe, noise_schedule_std

pytestmark = pytest.mark.usefixtures("one_thread")


# The gradient solver (solver="em" has its own tests in test_em_solver.py): these tests are of
# its epochs, schedules and optimizer states.
FAST = dict(max_iter=400, n_restarts=2, random_state=0, solver="adam")


@pytest.fixture(scope="module")
def laplace():
    return make_linear(600, 3, "laplace", random_state=1)


@pytest.fixture(scope="module")
def fitted(laplace):
    est = HalfVAEICA(3, **FAST)
    S = est.fit_transform(laplace.X)
    return est, S


_state_equal = assert_same_fit


# ----------------------------------------------------------------------------- basics
def test_fitted_attributes_and_shapes(fitted, laplace):
    est, S = fitted
    n, d = laplace.X.shape
    assert S.shape == (n, 3) and S.dtype == np.float64
    assert est.n_components_ == 3 and est.n_features_in_ == d
    assert est.mixing_.shape == (d, 3) and est.components_.shape == (3, d)
    np.testing.assert_allclose(est.components_ @ est.mixing_, np.eye(3), atol=1e-8)
    assert est.mean_.shape == (d,)
    assert est.elbo_history_.shape == (FAST["max_iter"],) == (est.n_iter_,)
    assert est.restart_elbos_.shape == (2,)
    assert est.best_restart_ == int(np.argmax(est.restart_elbos_))
    assert est.elbo_ == est.restart_elbos_[est.best_restart_]
    assert np.all(np.isfinite(est.elbo_history_))
    assert est.elbo_history_[-1] > est.elbo_history_[0]
    assert list(est.get_feature_names_out()) == ["halfvaeica0", "halfvaeica1", "halfvaeica2"]


def test_params_are_stored_unchanged_and_clonable():
    est = HalfVAEICA(2, hidden=[8], noise=0.3, random_state=4)
    assert est.hidden == [8] and est.noise == 0.3 and est.n_components == 2
    c = clone(est)
    assert c.get_params() == est.get_params()


def test_reproducible_under_random_state(laplace, fitted):
    est, S = fitted
    S2 = HalfVAEICA(3, **FAST).fit_transform(laplace.X)
    np.testing.assert_array_equal(S, S2)
    S3 = HalfVAEICA(3, **{**FAST, "random_state": 1}).fit_transform(laplace.X)
    assert not np.array_equal(S, S3)


def test_transform_new_rows(laplace):
    est = HalfVAEICA(3, **{**FAST, "max_iter": 800}).fit(laplace.X[:450])
    St = est.transform(laplace.X[450:])
    assert St.shape == (150, 3)
    assert mean_corr_coef(laplace.S[450:], St) > 0.97
    np.testing.assert_array_equal(St, est.transform(laplace.X[450:]))  # deterministic
    assert est.transform(laplace.X[450:451]).shape == (1, 3)  # a single row works
    # On the training rows the projection agrees with the fitted table (posterior means).
    S_fit = est.model_.latents.mu.detach().double().numpy()
    St_train = est.transform(laplace.X[:450])
    assert np.corrcoef(S_fit[:, 0], St_train[:, 0])[0, 1] > 0.99


def test_inverse_transform_round_trip(fitted, laplace):
    est, S = fitted
    X_rec = est.inverse_transform(S)
    assert X_rec.shape == laplace.X.shape
    rel = np.linalg.norm(X_rec - laplace.X) / np.linalg.norm(laplace.X - laplace.X.mean(0))
    assert rel < 0.1
    np.testing.assert_allclose(X_rec, S @ est.mixing_.T + est.mean_, rtol=1e-5, atol=1e-5)
    S2 = est.transform(X_rec)
    np.testing.assert_allclose(est.inverse_transform(S2), X_rec, atol=0.05 * np.abs(X_rec).max())


# ----------------------------------------------------------------------------- quality
def test_end_to_end_paper_sources_default_recipe():
    """The paper's sine/square/sawtooth problem, the default recipe with fewer epochs/samples."""
    P = make_paper_linear(2000, random_state=11)
    est = HalfVAEICA(3, max_iter=800, n_restarts=2, random_state=0)
    S = est.fit_transform(P.X)
    rmse = per_component_rmse(P.S, S)
    assert rmse.max() < 0.1, rmse


def test_end_to_end_laplace_mcc(laplace, fitted):
    _, S = fitted
    assert mean_corr_coef(laplace.S, S) > 0.97


@pytest.mark.parametrize("table_optimizer", ["torch", "fused"])
def test_minibatch_training(laplace, table_optimizer):
    est = HalfVAEICA(3, batch_size=200, table_optimizer=table_optimizer, max_iter=200,
                     n_restarts=1, random_state=0)
    S = est.fit_transform(laplace.X)
    assert S.shape == (600, 3)
    latents = est.model_.latents
    if table_optimizer == "fused":
        assert not latents.sparse and latents.table_optimizer is not None
        assert latents.mu.grad is None and latents.logvar.grad is None  # no table gradient
        assert int(latents.table_optimizer.step) == 200 * 3  # one step per mini-batch
    else:
        assert latents.sparse and latents.table_optimizer is None
    assert mean_corr_coef(laplace.S, S) > 0.97


def test_fused_table_follows_the_sparse_adam_path(laplace):
    """Same draws, same learning-rate schedule: with mini-batches the fused table takes
    SparseAdam's steps, so the two fits agree to rounding."""
    kw = dict(batch_size=200, max_iter=8, n_restarts=1, lr_decay=0.5, random_state=3)
    fused = HalfVAEICA(3, table_optimizer="fused", **kw).fit(laplace.X)
    ref = HalfVAEICA(3, **kw).fit(laplace.X)
    f, r = fused.model_.latents, ref.model_.latents
    start = HalfVAEICA(3, **{**kw, "max_iter": 1}).fit(laplace.X).model_.latents
    assert (f.mu - start.mu).abs().max() > 0.01  # the steps moved the table
    torch.testing.assert_close(f.mu, r.mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.logvar, r.logvar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.model_.decoder.weight, ref.model_.decoder.weight,
                               rtol=1e-5, atol=1e-5)


def test_fused_table_full_batch_separates(laplace):
    # Full batch: every row is stepped each epoch with SparseAdam's formula (torch's full-batch
    # path is dense Adam, whose eps sits inside the bias correction: not bitwise comparable).
    est = HalfVAEICA(3, table_optimizer="fused", max_iter=400, n_restarts=1, random_state=0)
    S = est.fit_transform(laplace.X)
    assert int(est.model_.latents.table_optimizer.step) == 400
    assert mean_corr_coef(laplace.S, S) > 0.97


def test_files_from_before_table_optimizer_still_resume(laplace, fitted, tmp_path):
    ref, _ = fitted
    est = HalfVAEICA(3, **FAST)
    est.fit(laplace.X, stop_after=77)
    path = tmp_path / "old.pt"
    est.save(path)
    payload = torch.load(path, weights_only=True)
    for params in (payload["params"], payload["run"]["params"]):
        del params["table_optimizer"]  # as written before the parameter existed
    del payload["sha256"]  # and before files had a checksum
    torch.save(payload, path)
    resumed = HalfVAEICA.load(path)
    assert resumed.table_optimizer == "torch"
    resumed.fit(laplace.X, resume=True)
    _state_equal(resumed, ref)


@pytest.mark.parametrize("table_optimizer", ["fused", "rowwise_adam_bf16"])
def test_fused_table_stop_and_resume_equals_uninterrupted(laplace, tmp_path, table_optimizer):
    params = dict(batch_size=150, table_optimizer=table_optimizer, max_iter=30, n_restarts=2,
                  random_state=5)
    ref = HalfVAEICA(3, **params).fit(laplace.X)
    est = HalfVAEICA(3, **params)
    est.fit(laplace.X, stop_after=41)  # restart 1, in the middle of an epoch sequence
    est.save(tmp_path / "run.pt")
    resumed = HalfVAEICA.load(tmp_path / "run.pt").fit(laplace.X, resume=True)
    _state_equal(resumed, ref)
    assert "latents.table_optimizer.state" in resumed.model_.state_dict()


@pytest.mark.parametrize("init", ["random", "fastica"])
def test_other_inits(laplace, init):
    est = HalfVAEICA(3, init=init, max_iter=200, n_restarts=1, random_state=0)
    S = est.fit_transform(laplace.X)
    assert S.shape == (600, 3) and np.all(np.isfinite(S))
    if init == "fastica":
        assert mean_corr_coef(laplace.S, S) > 0.97


def test_mlp_decoder_shapes(laplace):
    est = HalfVAEICA(3, decoder="mlp", hidden=(16,), max_iter=30, n_restarts=1, random_state=0)
    S = est.fit_transform(laplace.X)
    assert S.shape == (600, 3)
    assert not hasattr(est, "mixing_") and not hasattr(est, "components_")
    assert est.transform(laplace.X[:7]).shape == (7, 3)
    assert est.inverse_transform(S[:5]).shape == (5, 3)


def test_residual_decoder(laplace):
    est = HalfVAEICA(3, decoder="residual", max_iter=400, n_restarts=1, random_state=0)
    S = est.fit_transform(laplace.X)
    assert S.shape == (600, 3) and not hasattr(est, "mixing_")
    # A linear problem: the extra flexibility costs a little, one short restart still separates.
    assert mean_corr_coef(laplace.S, S) > 0.9
    assert est.transform(laplace.X[:4]).shape == (4, 3)
    rel = np.linalg.norm(est.inverse_transform(S) - laplace.X) / np.linalg.norm(laplace.X)
    assert rel < 0.1


@pytest.mark.parametrize("whiten", ["standardize", False])
def test_whiten_options(laplace, whiten):
    est = HalfVAEICA(2, whiten=whiten, max_iter=30, n_restarts=1, random_state=0)
    S = est.fit_transform(laplace.X)
    assert S.shape == (600, 2) and est.mixing_.shape == (3, 2)


def test_verbose_progress_bar(laplace, capsys):
    HalfVAEICA(3, max_iter=5, n_restarts=2, verbose=True, random_state=0).fit(laplace.X)
    err = capsys.readouterr().err
    assert "HalfVAEICA" in err and "10/10" in err


# ----------------------------------------------------------------------------- checkpointing
def test_stop_and_resume_in_memory_equals_uninterrupted(laplace, fitted):
    ref, _ = fitted
    est = HalfVAEICA(3, **FAST)
    est.fit(laplace.X, stop_after=77)  # in the middle of restart 0
    assert not hasattr(est, "model_")
    est.fit(laplace.X, resume=True, stop_after=400)  # across the restart boundary
    assert not hasattr(est, "model_")
    est.fit(laplace.X, resume=True)
    _state_equal(est, ref)


def test_stop_save_load_resume_equals_uninterrupted(laplace, fitted, tmp_path):
    ref, S_ref = fitted
    est = HalfVAEICA(3, **FAST)
    est.fit(laplace.X, stop_after=450)
    path = tmp_path / "run.pt"
    est.save(path)
    loaded = HalfVAEICA.load(path)
    assert not hasattr(loaded, "model_")
    S = loaded.fit_transform(laplace.X, resume=True)
    _state_equal(loaded, ref)
    np.testing.assert_array_equal(S, S_ref)


def test_checkpoint_every_survives_a_crash(laplace, fitted, tmp_path, monkeypatch):
    ref, _ = fitted
    path = tmp_path / "ckpt.pt"
    params = dict(FAST, checkpoint_path=str(path), checkpoint_every=25)
    calls = {"n": 0}
    real_epoch = Recipe.epoch

    def crashing_epoch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 471:  # restart 1, epoch 70: the last checkpoint is at its epoch 50
            raise KeyboardInterrupt
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(Recipe, "epoch", crashing_epoch)
    crashed = HalfVAEICA(3, **params)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(laplace.X)
    monkeypatch.setattr(Recipe, "epoch", real_epoch)
    assert path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary files left
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["run"]["restart"] == 1 and ckpt["run"]["epoch"] == 50
    resumed = HalfVAEICA(3, **params).fit(laplace.X, resume=True)
    _state_equal(resumed, ref)
    # The interrupted estimator itself resumes from the file, not from its lost live state.
    torch.save(ckpt, path)  # back to the crash-time checkpoint
    crashed.fit(laplace.X, resume=True)
    _state_equal(crashed, ref)
    # The finished checkpoint loads as a fitted estimator.
    done = HalfVAEICA.load(path)
    _state_equal(done, ref)


def test_resume_refuses_other_data_or_parameters(laplace, tmp_path):
    est = HalfVAEICA(3, **FAST)
    est.fit(laplace.X, stop_after=10)
    X2 = laplace.X.copy()
    X2[0, 0] += 1.0
    with pytest.raises(ValueError, match="not the data"):
        est.fit(X2, resume=True)
    est.set_params(max_iter=200)
    with pytest.raises(ValueError, match="max_iter"):
        est.fit(laplace.X, resume=True)
    # Without a run to resume, resume=True starts fresh.
    fresh = HalfVAEICA(3, max_iter=5, n_restarts=1, random_state=0)
    fresh.fit(laplace.X, resume=True)
    assert fresh.n_iter_ == 5


def test_save_load_fitted_model(fitted, laplace, tmp_path):
    est, S = fitted
    path = tmp_path / "model.pt"
    est.save(path)
    loaded = HalfVAEICA.load(path)
    assert loaded.get_params() == est.get_params()
    _state_equal(loaded, est)
    np.testing.assert_array_equal(loaded.mixing_, est.mixing_)
    np.testing.assert_array_equal(loaded.transform(laplace.X[:50]), est.transform(laplace.X[:50]))
    np.testing.assert_array_equal(loaded.inverse_transform(S[:9]), est.inverse_transform(S[:9]))
    # The optimizer state of the kept restart is in the file.
    best = torch.load(path, weights_only=True)["run"]["best"]
    assert len(best["optimizers"]) == 2 and best["optimizers"][0]["state"]


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["f.pt"]


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    from halfvae_ext.atomic_io import write_json_atomic
    old = os.umask(0o027)
    try:
        path = tmp_path / "new.json"
        write_json_atomic(path, {"a": 1})
        assert os.stat(path).st_mode & 0o777 == 0o640  # 0o666 minus the umask, not mkstemp's 0o600
        os.chmod(path, 0o604)
        write_json_atomic(path, {"a": 2})  # replacing a file keeps its mode
        assert os.stat(path).st_mode & 0o777 == 0o604
    finally:
        os.umask(old)


def test_load_rejects_other_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"format": "other"}, p)
    with pytest.raises(ValueError, match="not a HalfVAEICA"):
        HalfVAEICA.load(p)
    p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        HalfVAEICA.load(p)
    with pytest.raises(ValueError, match="call fit first"):
        HalfVAEICA(2).save(tmp_path / "y.pt")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("X, exc, match", [
    (np.array([[1.0, np.nan], [2.0, 3.0], [0.0, 1.0]]), ValueError, "NaN"),
    (np.array([[1.0, np.inf], [2.0, 3.0], [0.0, 1.0]]), ValueError, "infinity"),
    (np.arange(5.0), ValueError, "2D array"),
    (np.zeros((4, 2, 2)), ValueError, "dim 3"),
    ([["a", "b"], ["c", "d"]], ValueError, "convert"),
    (np.zeros((1, 2)), ValueError, "minimum of 2"),
    (None, TypeError, "X must be"),
    ("data.csv", TypeError, "X must be"),
])
def test_bad_X(X, exc, match):
    with pytest.raises(exc, match=match):
        HalfVAEICA(1, max_iter=2).fit(X)


def test_n_components_too_large(laplace):
    with pytest.raises(ValueError, match="larger than the number of features"):
        HalfVAEICA(4, max_iter=2).fit(laplace.X)
    # Above the rank: a warning and n_components_ = rank (test_rank_deficient_data_...).
    with pytest.warns(UserWarning, match="exceeds the rank"):
        est = HalfVAEICA(3, max_iter=2, n_restarts=1).fit(laplace.X[:3])  # centered rank 2
    assert est.n_components_ == 2


@pytest.mark.parametrize("params, exc, match", [
    (dict(n_components=0), ValueError, "n_components"),
    (dict(n_components=2.5), TypeError, "n_components"),
    (dict(decoder="conv"), ValueError, "decoder"),
    (dict(whiten="zca"), ValueError, "whiten"),
    (dict(init="ica"), ValueError, "init"),
    (dict(noise="fixed"), ValueError, "noise"),
    (dict(noise=-1.0), ValueError, "noise"),
    (dict(noise=(0.5,)), ValueError, "noise"),
    (dict(noise=(0.5, 0.05, 0.01)), ValueError, "noise"),
    (dict(noise=(0.5, 0.0)), ValueError, "noise"),
    (dict(noise=(0.5, float("nan"))), ValueError, "noise"),
    (dict(noise=(0.5, float("inf"))), ValueError, "noise"),
    (dict(noise=("0.5", 0.05)), ValueError, "noise"),
    (dict(prior_warmup=1.0), ValueError, "prior_warmup"),
    (dict(lr_decay=-0.1), ValueError, "lr_decay"),
    (dict(max_iter=0), ValueError, "max_iter"),
    (dict(learning_rate=0.0), ValueError, "learning_rate"),
    (dict(random_state=-3), ValueError, "random_state"),
    (dict(table_optimizer="sgd"), ValueError, "table_optimizer"),
    (dict(checkpoint_every=5), ValueError, "checkpoint_path"),
    (dict(activation="swish"), ValueError, "activation"),
    (dict(device="tpu9"), ValueError, "device"),
])
def test_bad_hyperparameters(laplace, params, exc, match):
    with pytest.raises(exc, match=match):
        HalfVAEICA(**{"n_components": 2, "max_iter": 2, **params}).fit(laplace.X)


def test_bad_transform_input(fitted):
    est, _ = fitted
    with pytest.raises(ValueError, match="features"):
        est.transform(np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        est.transform(np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="columns"):
        est.inverse_transform(np.zeros((5, 2)))
    with pytest.raises(TypeError):
        est.inverse_transform(None)
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        HalfVAEICA(2).transform(np.zeros((3, 3)))


# ----------------------------------------------------------------------------- transform per row
@pytest.fixture(scope="module")
def paper():
    return make_paper_linear(2000, random_state=0)


def test_transform_linear_is_the_fastica_projection(paper):
    est = HalfVAEICA(3, max_iter=300, n_restarts=1, random_state=0)
    S_fit = est.fit_transform(paper.X)
    St = est.transform(paper.X)
    np.testing.assert_array_equal(S_fit, St)
    np.testing.assert_allclose(St, (paper.X - est.mean_) @ est.components_.T, rtol=0, atol=1e-12)
    rev = est.transform(paper.X[::-1])[::-1]
    np.testing.assert_allclose(rev, St, rtol=0, atol=1e-12)
    np.testing.assert_allclose(est.transform(paper.X[5:6]), St[5:6], rtol=0, atol=1e-12)
    # The trained posterior means stay available. Both separate; the projection is at least as
    # good on every component (as the README reports for the full recipe; here RMSE 0.053,
    # 0.0002, 0.045 against the posterior means' 0.053, 0.0042, 0.045).
    assert est.posterior_means_.shape == (2000, 3)
    np.testing.assert_array_equal(est.posterior_means_,
                                  est.model_.latents.mu.detach().double().numpy())
    assert mean_corr_coef(paper.S, est.posterior_means_) > 0.99
    assert mean_corr_coef(paper.S, St) > 0.99
    rmse_means = per_component_rmse(paper.S, est.posterior_means_)
    rmse_projection = per_component_rmse(paper.S, St)
    assert np.all(rmse_projection <= rmse_means + 1e-3), (rmse_projection, rmse_means)


def test_transform_residual_is_a_per_row_posterior_mode(laplace):
    est = HalfVAEICA(3, decoder="residual", max_iter=60, n_restarts=1, random_state=0)
    est.fit(laplace.X)
    X = laplace.X[:200]
    St = est.transform(X)
    np.testing.assert_allclose(est.transform(X[::-1])[::-1], St, rtol=0, atol=1e-10)
    np.testing.assert_allclose(est.transform(X[7:8]), St[7:8], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(est.transform(X), St)
    np.testing.assert_array_equal(HalfVAEICA(3, decoder="residual", max_iter=60, n_restarts=1,
                                             random_state=0).fit_transform(laplace.X)[:200], St)
    # A mode: the log joint of each row is higher there than at its start, the posterior mean.
    import copy
    m = est.model_
    dec, prior, lik = (copy.deepcopy(x).double() for x in (m.decoder, m.prior, m.likelihood))
    Xw = torch.as_tensor((X - est.mean_) @ est.whitening_.T)

    def log_joint(z):
        z = torch.as_tensor(z, dtype=torch.float64)
        return lik.log_prob(Xw, dec(z)) + prior.log_prob(z).sum(1)

    with torch.no_grad():
        at_mode, at_mean = log_joint(St), log_joint(est.posterior_means_[:200])
    assert bool((at_mode >= at_mean - 1e-6).all())
    assert float((at_mode - at_mean).mean()) > 0


# ----------------------------------------------------------------------------- defects
def test_batch_size_at_least_n_samples_is_full_batch(laplace):
    X = laplace.X[:100]
    for opt in ("torch", "fused"):
        est = HalfVAEICA(2, batch_size=100, table_optimizer=opt, max_iter=5, n_restarts=1,
                         random_state=0).fit(X)
        assert est.n_iter_ == 5
    full = HalfVAEICA(2, max_iter=5, n_restarts=1, random_state=0).fit(X)
    big = HalfVAEICA(2, batch_size=1000, max_iter=5, n_restarts=1, random_state=0).fit(X)
    np.testing.assert_array_equal(full.posterior_means_, big.posterior_means_)


@pytest.mark.parametrize("stopped", [False, True])
def test_refused_resume_leaves_the_estimator_untouched(laplace, stopped):
    est = HalfVAEICA(3, max_iter=20, n_restarts=1, random_state=0)
    est.fit(laplace.X, stop_after=5 if stopped else None)
    before = {k: copy_of(v) for k, v in vars(est).items()}
    run = est._run
    run_before = (run.restart, run.epoch, run.done, len(run.finished), run.current is None)
    model_state = {k: v.clone() for k, v in est.model_.state_dict().items()} \
        if hasattr(est, "model_") else None
    X2 = laplace.X * 2.0 + 1.0
    with pytest.raises(ValueError, match="not the data"):
        est.fit(X2, resume=True)
    assert vars(est).keys() == before.keys()
    for k, v in vars(est).items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, before[k])
            assert v.dtype == before[k].dtype, k
        elif v is None or isinstance(v, (bool, int, float, str, tuple)):
            assert type(v) is type(before[k]) and v == before[k], k  # the parameters, elbo_, ...
        else:
            assert v is before[k], k  # the same objects: _run, model_, _Xw_train
    assert est._run is run
    assert (run.restart, run.epoch, run.done, len(run.finished),
            run.current is None) == run_before
    if model_state is not None:
        for k, v in est.model_.state_dict().items():
            assert torch.equal(v, model_state[k]), k
    if not stopped:
        assert isinstance(est.elbo_, float) and est.n_iter_ == 20 and est.n_components_ == 3
    if not stopped:
        np.testing.assert_array_equal(est.transform(laplace.X[:5]),
                                      (laplace.X[:5] - est.mean_) @ est.components_.T)
    est.fit(laplace.X, resume=True)  # the run is still resumable
    assert est.n_iter_ == 20


def copy_of(v):
    return v.copy() if isinstance(v, np.ndarray) else v


def test_save_errors_name_the_path_and_keep_read_only_files(fitted, tmp_path):
    est, _ = fitted
    missing = tmp_path / "nodir" / "m.pt"
    with pytest.raises(FileNotFoundError) as e:
        est.save(missing)
    assert str(missing) in str(e.value) and ".tmp-" not in str(e.value)
    ro = tmp_path / "ro.pt"
    ro.write_bytes(b"keep me")
    os.chmod(ro, 0o444)
    with pytest.raises(PermissionError) as e:
        est.save(ro)
    assert str(ro) in str(e.value)
    assert ro.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro.pt"]


@pytest.mark.parametrize("where", ["missing_dir", "directory", "read_only_file"])
def test_unwritable_checkpoint_path_refused_before_training(laplace, tmp_path, monkeypatch,
                                                           where):
    path = {"missing_dir": tmp_path / "nodir" / "c.pt", "directory": tmp_path,
            "read_only_file": tmp_path / "c.pt"}[where]
    if where == "read_only_file":
        path.write_bytes(b"x")
        os.chmod(path, 0o444)

    def no_epoch(*a, **k):
        raise AssertionError("trained before checking checkpoint_path")

    monkeypatch.setattr(Recipe, "epoch", no_epoch)
    est = HalfVAEICA(3, max_iter=5, n_restarts=1, checkpoint_path=path)
    with pytest.raises(OSError) as e:
        est.fit(laplace.X)
    # The user's path itself is named, not a temporary file beside or inside it.
    assert e.value.filename == str(path)
    assert ".tmp-" not in str(e.value)
    assert str(e.value).endswith(f": {str(path)!r}")
    assert not hasattr(est, "mean_")


def test_random_state_accepts_a_numpy_random_state(laplace):
    kw = dict(max_iter=10, n_restarts=2)
    a = HalfVAEICA(3, random_state=np.random.RandomState(0), **kw).fit(laplace.X)
    b = HalfVAEICA(3, random_state=np.random.RandomState(0), **kw).fit(laplace.X)
    np.testing.assert_array_equal(a.posterior_means_, b.posterior_means_)
    rs = np.random.RandomState(0)
    est = HalfVAEICA(3, random_state=rs, **kw)
    first = est.fit(laplace.X).posterior_means_
    assert not np.array_equal(first, est.fit(laplace.X).posterior_means_)  # rs advanced


def test_random_state_object_survives_save_and_resume(laplace, tmp_path):
    est = HalfVAEICA(3, max_iter=10, n_restarts=2, random_state=np.random.RandomState(3))
    est.fit(laplace.X, stop_after=13)
    est.save(tmp_path / "r.pt")
    ref = HalfVAEICA(3, max_iter=10, n_restarts=2,
                     random_state=np.random.RandomState(3)).fit(laplace.X)
    resumed = HalfVAEICA.load(tmp_path / "r.pt").fit(laplace.X, resume=True)
    _state_equal(resumed, ref)


def test_float32_input_keeps_float32(laplace):
    X32 = laplace.X.astype(np.float32)
    est = HalfVAEICA(3, max_iter=20, n_restarts=1, random_state=0).fit(X32)
    for name in ("mean_", "whitening_", "dewhitening_", "mixing_", "components_",
                 "posterior_means_"):
        assert getattr(est, name).dtype == np.float32, name
    assert est.transform(X32).dtype == np.float32
    assert est.fit_transform(X32).dtype == np.float32
    assert est.inverse_transform(est.transform(X32)).dtype == np.float32
    assert est.transform(laplace.X).dtype == np.float64


def test_rank_deficient_data_warns_and_fits_the_rank(laplace):
    X = np.column_stack([laplace.X, laplace.X[:, 0] + laplace.X[:, 1]])  # rank 3, 4 features
    with pytest.warns(UserWarning, match=r"rank of the centered X \(3\)"):
        est = HalfVAEICA(4, max_iter=20, n_restarts=1, random_state=0).fit(X)
    assert est.n_components_ == 3
    assert est.transform(X).shape == (600, 3) and est.components_.shape == (3, 4)
    assert list(est.get_feature_names_out()) == ["halfvaeica0", "halfvaeica1", "halfvaeica2"]


def test_convergence_warning(laplace):
    from sklearn.exceptions import ConvergenceWarning
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        HalfVAEICA(3, max_iter=10, n_restarts=1, random_state=0).fit(laplace.X)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        HalfVAEICA(3, max_iter=10, n_restarts=1, tol=None, random_state=0).fit(laplace.X)
        HalfVAEICA(3, **FAST).fit(laplace.X)


def test_cuda_device_refused_without_a_gpu(laplace, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda'"):
        HalfVAEICA(3, max_iter=2, device="cuda").fit(laplace.X)


# ----------------------------------------------------------------------------- review fixes
def test_numpy_scalar_parameters_save_load_and_resume(laplace, tmp_path):
    """The table accepts numpy scalars; files (read with weights_only=True) hold Python numbers,
    and a numpy-typed fit equals the same fit with Python numbers, so it resumes exactly."""
    X = laplace.X[:300]
    kw = dict(n_mixture=np.int64(3), hidden=(np.int64(8),), max_iter=np.int64(20),
              n_restarts=np.int32(2), learning_rate=np.float32(0.01),
              table_learning_rate=np.float64(0.05), prior_warmup=np.float32(0.25),
              n_eval_samples=np.int16(2), random_state=np.int64(5), tol=None)
    ref = HalfVAEICA(np.int64(3), **kw).fit(X)
    assert type(ref.n_components_) is int and ref.n_components_ == 3
    plain = HalfVAEICA(3, **{k: v.item() if isinstance(v, np.generic) else v
                             for k, v in kw.items()}).fit(X)
    _state_equal(plain, ref)
    path = tmp_path / "model.pt"
    ref.save(path)
    loaded = HalfVAEICA.load(path)
    assert loaded.get_params() == ref.get_params()
    _state_equal(loaded, ref)
    np.testing.assert_array_equal(loaded.transform(X[:20]), ref.transform(X[:20]))
    # A stopped numpy-typed fit: its checkpoint and saved file load and resume.
    ckpt = tmp_path / "ckpt.pt"
    stopped = HalfVAEICA(np.int64(3), **kw, checkpoint_path=ckpt, checkpoint_every=np.int64(7))
    stopped.fit(X, stop_after=np.int64(27))
    stopped.save(tmp_path / "stopped.pt")
    assert torch.load(ckpt, weights_only=True)["run"]["epoch"] == 7
    resumed = HalfVAEICA(np.int64(3), **kw, checkpoint_path=ckpt, checkpoint_every=7)
    resumed.fit(X, resume=True)  # from the checkpoint file
    _state_equal(resumed, ref)
    _state_equal(HalfVAEICA.load(ckpt), ref)
    _state_equal(HalfVAEICA.load(tmp_path / "stopped.pt").fit(X, resume=True), ref)


def test_every_restart_diverged_leaves_nothing_to_save_or_resume(laplace, tmp_path, monkeypatch):
    from halfvae_ext.ica.recipe import Recipe
    X = laplace.X[:200]
    ckpt = tmp_path / "ckpt.pt"
    kw = dict(max_iter=5, n_restarts=2, tol=None, random_state=0, checkpoint_path=ckpt,
              solver="adam")
    real_final_elbo = Recipe.final_elbo
    monkeypatch.setattr(Recipe, "final_elbo", lambda self, *a: float("nan"))
    est = HalfVAEICA(3, **kw)
    with pytest.raises(RuntimeError, match="diverged in every restart"):
        est.fit(X)
    assert not hasattr(est, "model_") and est._run is None
    with pytest.raises(ValueError, match="nothing to save"):
        est.save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    diverged_checkpoint = ckpt.read_bytes()  # the fit's last checkpoint: the diverged run
    with pytest.raises(ValueError, match="nothing to load.*diverged in every restart"):
        HalfVAEICA.load(ckpt)
    monkeypatch.setattr(Recipe, "final_elbo", real_final_elbo)
    ref = HalfVAEICA(3, **{**kw, "checkpoint_path": None}).fit(X)
    # Nothing to continue, in the estimator or in the checkpoint: resume starts afresh.
    est.fit(X, resume=True)
    _state_equal(est, ref)
    ckpt.write_bytes(diverged_checkpoint)
    _state_equal(HalfVAEICA(3, **kw).fit(X, resume=True), ref)


def test_sklearn_validate_params_checks_our_table():
    """scikit-learn's reserved _parameter_constraints is not ours: its inherited _validate_params
    (which its machinery may call) checks our table instead of crashing on it."""
    from halfvae_ext.ica.param_validation import InvalidParameterError
    assert "_parameter_constraints" not in vars(HalfVAEICA)
    HalfVAEICA()._validate_params()
    HalfVAEICA(3, random_state=np.random.RandomState(0), hidden=[4, 4])._validate_params()
    with pytest.raises(InvalidParameterError, match="n_components must be"):
        HalfVAEICA(n_components=0)._validate_params()


@pytest.mark.parametrize("decoder", ["linear", "mlp", "residual", "flow"])
def test_output_dtype_follows_fastica_for_every_decoder(laplace, decoder):
    import warnings
    from sklearn.decomposition import FastICA
    X = laplace.X[:100]
    for fit_dtype in (np.float64, np.float32):
        est = HalfVAEICA(3, decoder=decoder, hidden=(8,), max_iter=5, n_restarts=1, tol=None,
                         transform_max_iter=3, random_state=0).fit(X.astype(fit_dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ica = FastICA(3, whiten="unit-variance", max_iter=5,
                          random_state=0).fit(X.astype(fit_dtype))
        for in_dtype in (np.float64, np.float32):
            Xi = X[:10].astype(in_dtype)
            expected = ica.transform(Xi).dtype
            assert expected == np.result_type(in_dtype, fit_dtype)  # FastICA's rule
            S = est.transform(Xi)
            assert S.dtype == expected, (fit_dtype, in_dtype)
            assert est.inverse_transform(S).dtype == ica.inverse_transform(S).dtype


# ----------------------------------------------------------------------------- noise schedule
def test_noise_schedule_std_holds_then_falls_geometrically():
    stds = [noise_schedule_std(e, 11, 0.5, 0.05) for e in range(11)]
    assert stds[:6] == [0.5] * 6  # the first half, through epoch max_iter // 2
    assert stds[-1] == 0.05  # reached at the last epoch
    np.testing.assert_allclose(np.diff(np.log(stds[5:])), np.log(0.1) / 5, rtol=1e-12)
    assert noise_schedule_std(0, 1, 0.5, 0.05) == 0.05  # one epoch: the last one
    assert [noise_schedule_std(e, 2, 0.5, 0.05) for e in (0, 1)] == [0.5, 0.05]


def test_noise_schedule_fit_ends_at_the_end_noise_and_resumes_exactly(laplace, tmp_path):
    """The schedule depends on the epoch only: a fit stopped in the falling half, saved, loaded
    and resumed equals the uninterrupted fit, and the model keeps the end noise (the one
    transform uses)."""
    X = laplace.X[:300]
    kw = dict(noise=(0.5, 0.05), max_iter=40, n_restarts=2, random_state=3, tol=None)
    ref = HalfVAEICA(3, **kw).fit(X)
    np.testing.assert_allclose(ref.model_.likelihood.logvar.exp().sqrt().numpy(), 0.05,
                               rtol=1e-6)
    assert not ref.model_.likelihood.logvar.requires_grad
    fixed = HalfVAEICA(3, **{**kw, "noise": 0.5}).fit(X)
    assert not np.array_equal(fixed.posterior_means_, ref.posterior_means_)
    stopped = HalfVAEICA(3, **kw).fit(X, stop_after=30)
    stopped.save(tmp_path / "stopped.pt")
    loaded = HalfVAEICA.load(tmp_path / "stopped.pt")
    assert loaded.noise == (0.5, 0.05) and loaded.get_params() == stopped.get_params()
    _state_equal(loaded.fit(X, resume=True), ref)
    listed = HalfVAEICA(3, **{**kw, "noise": [0.5, 0.05]}).fit(X, stop_after=30)
    _state_equal(listed.fit(X, resume=True), ref)
    other = HalfVAEICA.load(tmp_path / "stopped.pt").set_params(noise=(0.5, 0.1))
    with pytest.raises(ValueError, match="differ from the run's: noise"):
        other.fit(X, resume=True)
