"""solver="em": the linear decoder fitted by variational EM (halfvae_ext.ica.em_recipe).

The EM statistics come from the fused op's gradients; they are checked here against the
responsibilities written out from the reference formulas, in float64."""
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_fit

from halfvae_ext import reference
from halfvae_ext.ica import HalfVAEICA, make_linear, make_paper_linear, mean_corr_coef
from halfvae_ext.ica import em_recipe
from halfvae_ext.ica.baselines import fit_linear_peer
from halfvae_ext.ica.em_recipe import (CONVERGED, CONVERGED_WINDOW, KLStatistics,
                                       _conjugate_gradient, em_iteration, prior_update,
                                       row_statistics)
from halfvae_ext.ica.param_validation import InvalidParameterError
from halfvae_ext.ica.preprocessing import fit_whitening

pytestmark = pytest.mark.usefixtures("one_thread")

EM = dict(solver="em", n_restarts=1, random_state=0)


@pytest.fixture(scope="module")
def laplace():
    return make_linear(600, 3, "laplace", random_state=1)


def _state(n=40, K=3, C=3, groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    shape = (K, C) if groups is None else (groups, K, C)
    mu = torch.randn(n, K, generator=g, dtype=d) * 1.5
    logvar = torch.randn(n, K, generator=g, dtype=d) * 0.5 - 2.0
    logits = torch.randn(shape, generator=g, dtype=d)
    means = torch.randn(shape, generator=g, dtype=d)
    logvars = torch.randn(shape, generator=g, dtype=d) * 0.3 - 0.5
    index = None if groups is None else torch.randint(0, groups, (n,), generator=g)
    return mu, logvar, logits, means, logvars, index


def _responsibilities(z, logvar, logits, means, logvars, index, bound: bool):
    """r [n, K, C]: at the posterior (the bound's r, from the KLs to the components) or at the
    points z (the mixture's posterior over components)."""
    if index is not None:
        logits, means, logvars = logits[index], means[index], logvars[index]
    log_pi = torch.log_softmax(logits, -1)
    v = logvars.exp()
    d = z.unsqueeze(-1) - means
    if bound:
        lv = logvar.unsqueeze(-1)
        kl_c = 0.5 * (logvars - lv + (lv.exp() + d * d) / v - 1.0)
        return torch.softmax(log_pi - kl_c, -1)
    return torch.softmax(log_pi - 0.5 * (logvars + d * d / v), -1)


def _weighted_moments(r, z, s2, index, groups):
    """sum over rows (per group) of r, r z and r (z^2 + s2)."""
    parts = (r, r * z.unsqueeze(-1), r * (z * z + s2).unsqueeze(-1))
    if index is None:
        return [p.sum(0) for p in parts]
    return [torch.zeros((groups,) + p.shape[1:], dtype=p.dtype).index_add_(0, index, p)
            for p in parts]


def _direct_prior_update(sums, rows):
    w, rz, rzz = sums
    m = rz / w
    v = rzz / w - m * m
    return torch.log(w / rows), m, torch.log(v)


@pytest.mark.parametrize("groups", [None, 4])
def test_bound_statistics_are_the_responsibilities(groups):
    mu, logvar, logits, means, logvars, index = _state(groups=groups)
    stats = KLStatistics("bound", *mu.shape, torch.float64, "cpu")
    g_mu, g_lv, g_logits, g_means, g_logvars = stats.gradients(mu, logvar, logits, means,
                                                               logvars, index)
    r = _responsibilities(mu, logvar, logits, means, logvars, index, bound=True)
    lv_rows = logvars if index is None else logvars[index]
    m_rows = means if index is None else means[index]
    P_direct = (r / lv_rows.exp()).sum(-1)
    h_direct = (r * m_rows / lv_rows.exp()).sum(-1)
    P, h = row_statistics(g_mu, g_lv, mu, logvar)
    torch.testing.assert_close(P, P_direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_direct, rtol=1e-10, atol=1e-10)
    rows = float(mu.shape[0]) if index is None else \
        torch.bincount(index, minlength=groups).double()[:, None, None]
    got = prior_update(g_logits, g_means, g_logvars, logits, means, logvars, rows)
    want = _direct_prior_update(_weighted_moments(r, mu, logvar.exp(), index, groups), rows)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_quadrature_statistics_are_expectations_under_q():
    # kl="mc": E_q over the Gauss-Hermite nodes of the mixture's responsibilities at z.
    mu, logvar, logits, means, logvars, _ = _state(n=25)
    stats = KLStatistics("mc", *mu.shape, torch.float64, "cpu")
    g_mu, g_lv, g_logits, g_means, g_logvars = stats.gradients(mu, logvar, logits, means,
                                                               logvars)
    t, w = np.polynomial.hermite.hermgauss(em_recipe.QUADRATURE)
    s = (0.5 * logvar).exp()
    w_sum = r_sum = rz_sum = rzz_sum = 0.0
    e_psi = torch.zeros_like(mu)
    for tj, wj in zip(t, w / math.sqrt(math.pi)):
        z = mu + s * math.sqrt(2.0) * tj
        r = _responsibilities(z, None, logits, means, logvars, None, bound=False)
        psi = (r * (z.unsqueeze(-1) - means) / logvars.exp()).sum(-1)  # -d log p / dz
        e_psi += wj * psi
        r_sum = r_sum + wj * r.sum(0)
        rz_sum = rz_sum + wj * (r * z.unsqueeze(-1)).sum(0)
        rzz_sum = rzz_sum + wj * (r * (z * z).unsqueeze(-1)).sum(0)
        w_sum += wj
    torch.testing.assert_close(g_mu, e_psi, rtol=1e-9, atol=1e-9)
    got = prior_update(g_logits, g_means, g_logvars, logits, means, logvars, float(mu.shape[0]))
    want = _direct_prior_update((r_sum, rz_sum, rzz_sum), float(mu.shape[0]))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # The KL: E_q log q - E_q log p, the expectation by the same nodes.
    ref = 0.0
    for tj, wj in zip(t, w / math.sqrt(math.pi)):
        eps = torch.full_like(mu, math.sqrt(2.0) * tj)
        _, kl = reference.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps)
        ref = ref + wj * kl
    assert stats.mean_kl(mu, logvar, logits, means, logvars) == pytest.approx(
        float(ref.mean()), rel=1e-12)


def test_conjugate_gradient_solves_each_row_in_K_steps():
    g = torch.Generator().manual_seed(0)
    K = 5
    A = torch.randn(K, K, generator=g, dtype=torch.float64)
    G = A @ A.T + torch.eye(K, dtype=torch.float64)
    P = torch.rand(30, K, generator=g, dtype=torch.float64) * 3
    c = torch.randn(30, K, generator=g, dtype=torch.float64)
    x = _conjugate_gradient(G, P, c, torch.zeros_like(c), K)
    exact = torch.linalg.solve(G + torch.diag_embed(P), c.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-8)
    # A row already at its solution stays there (no 0 / 0).
    again = _conjugate_gradient(G, P, c, exact, 2)
    assert torch.isfinite(again).all()
    torch.testing.assert_close(again, exact, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kl", ["mc", "bound"])
def test_elbo_rises_every_iteration_and_is_the_models(laplace, kl):
    _, Xw = fit_whitening(laplace.X, 3, "pca", keep_all_dims=False)
    X = torch.as_tensor(Xw, dtype=torch.float64)
    n, K = X.shape
    C = 3
    spread = math.sqrt(2.0 * (C - 1) / (C + 1))
    state = dict(mu=X.clone(), logvar=torch.full((n, K), math.log(0.01), dtype=torch.float64),
                 W=torch.eye(K, dtype=torch.float64),
                 noise_logvar=torch.full((K,), math.log(0.01), dtype=torch.float64),
                 logits=torch.zeros(K, C, dtype=torch.float64),
                 means=torch.linspace(-spread, spread, C, dtype=torch.float64).expand(K, C)
                 .contiguous(),
                 logvars=torch.full((K, C), math.log(1 - 2 * spread ** 2 / 3),
                                    dtype=torch.float64))
    history = []
    for _ in range(80):
        new = em_iteration(X, *state.values(), learn_noise=True, kl=kl)
        history.append(new.pop("elbo"))
        state = new
    steps = np.diff(history)
    assert steps.min() > -1e-9 * abs(history[-1]), steps.min()
    assert history[-1] > history[0] + 0.1
    # The ELBO it reports is the model's: the expected log-likelihood in closed form and the KL
    # of the op, written in the reference's terms.
    lv = state["noise_logvar"]
    R = X - state["mu"] @ state["W"].T
    sq = R * R + state["logvar"].exp() @ (state["W"] ** 2).T
    log_lik = -0.5 * (math.log(2 * math.pi) + lv + sq / lv.exp()).sum(1)
    if kl == "bound":
        kl_rows = reference.kl_bound(state["mu"], state["logvar"], state["logits"],
                                     state["means"], state["logvars"]).sum(1)
    else:
        stats = KLStatistics("mc", n, K, torch.float64, "cpu")
        kl_rows = torch.full((n,), stats.mean_kl(state["mu"], state["logvar"], state["logits"],
                                                 state["means"], state["logvars"]),
                             dtype=torch.float64)
    assert history[-1] == pytest.approx(float((log_lik - kl_rows).mean()), rel=1e-9)


@pytest.mark.parametrize("kl,groups", [("mc", None), ("bound", None), ("mc", 4)])
def test_an_iteration_in_chunks_is_the_iteration_on_all_rows(kl, groups):
    # Chunks change only the order of the sums (the last chunk shorter than the others).
    mu, logvar, logits, means, logvars, index = _state(n=103, K=3, groups=groups)
    g = torch.Generator().manual_seed(5)
    X = mu @ torch.randn(3, 3, generator=g, dtype=torch.float64).T \
        + 0.1 * torch.randn(103, 3, generator=g, dtype=torch.float64)
    counts = None if groups is None else torch.bincount(index, minlength=groups)
    state = dict(mu=mu, logvar=logvar, W=torch.eye(3, dtype=torch.float64),
                 noise_logvar=torch.full((3,), -3.0, dtype=torch.float64), logits=logits,
                 means=means, logvars=logvars)
    whole, parts = (em_iteration(X, **state, learn_noise=True, kl=kl, prior_index=index,
                                 group_counts=counts, chunk_rows=rows) for rows in (None, 10))
    assert em_recipe.chunks(103, 3, 10)[-1] == (100, 103)
    assert whole.pop("elbo") == pytest.approx(parts.pop("elbo"), rel=1e-12)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-12, atol=1e-12,
                                   msg=name)


def test_em_separates_as_well_as_picard():
    P = make_linear(5000, 4, source="assorted", random_state=0)
    est = HalfVAEICA(4, random_state=0, tol=None)  # the defaults: solver="auto" -> EM
    S = est.fit_transform(P.X)
    assert est._run.params["solver"] == "em" and est.decoder_ == "linear"
    picard = mean_corr_coef(P.S, fit_linear_peer("picard", P.X, 4, 0))
    assert mean_corr_coef(P.S, S) >= picard - 0.002
    assert mean_corr_coef(P.S, S) > 0.999


def test_em_on_the_paper_problem_beats_the_papers_rmse():
    from halfvae_ext.ica import per_component_rmse
    P = make_paper_linear(5000, random_state=0)
    S = HalfVAEICA(3, random_state=0, tol=None).fit_transform(P.X)
    assert per_component_rmse(P.S, S).max() < 0.117  # the paper's best component


def test_a_restart_stops_once_converged_and_max_iter_caps_it(laplace):
    est = HalfVAEICA(3, max_iter=1000, **EM).fit(laplace.X)
    h = est.elbo_history_
    assert CONVERGED_WINDOW < est.n_iter_ < 1000 and h.shape == (est.n_iter_,)
    assert (h[-1] - h[-1 - CONVERGED_WINDOW]) / CONVERGED_WINDOW < CONVERGED
    before = h[:-1]
    rises = [(before[i] - before[i - CONVERGED_WINDOW]) / CONVERGED_WINDOW
             for i in range(CONVERGED_WINDOW, len(before))]
    assert min(rises) >= CONVERGED  # it did not stop at an earlier point that qualified
    capped = HalfVAEICA(3, max_iter=7, tol=None, **EM).fit(laplace.X)
    assert capped.n_iter_ == 7


_same_fit = assert_same_fit


def test_stop_save_load_resume_equals_uninterrupted(laplace, tmp_path):
    params = dict(solver="em", n_restarts=2, random_state=3, tol=None)
    ref = HalfVAEICA(3, **params).fit(laplace.X)
    est = HalfVAEICA(3, **params)
    est.fit(laplace.X, stop_after=9)  # in the middle of restart 0
    assert not hasattr(est, "model_")
    est.save(tmp_path / "run.pt")
    loaded = HalfVAEICA.load(tmp_path / "run.pt")
    loaded.fit(laplace.X, resume=True, stop_after=40)  # across the restart boundary
    loaded.fit(laplace.X, resume=True)
    _same_fit(loaded, ref)
    np.testing.assert_array_equal(loaded.transform(laplace.X), ref.transform(laplace.X))


def test_checkpoint_every_resumes_after_a_crash(laplace, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    params = dict(solver="em", n_restarts=2, random_state=0, tol=None, checkpoint_path=path,
                  checkpoint_every=5)
    ref = HalfVAEICA(3, **{**params, "checkpoint_path": None, "checkpoint_every": None}
                     ).fit(laplace.X)
    calls = {"n": 0}
    real = em_recipe.LinearEMRecipe.epoch

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(em_recipe.LinearEMRecipe, "epoch", crashing)
    with pytest.raises(KeyboardInterrupt):
        HalfVAEICA(3, **params).fit(laplace.X)
    monkeypatch.setattr(em_recipe.LinearEMRecipe, "epoch", real)
    assert torch.load(path, weights_only=True)["run"]["epoch"] == 10
    _same_fit(HalfVAEICA(3, **params).fit(laplace.X, resume=True), ref)


def test_fixed_noise_stays_fixed(laplace):
    est = HalfVAEICA(3, noise=0.05, **EM).fit(laplace.X)
    torch.testing.assert_close(est.model_.likelihood.logvar,
                               torch.full((3,), 2 * math.log(0.05)))


def test_conditional_prior(laplace):
    u = np.repeat(np.arange(3), 200)
    est = HalfVAEICA(3, decoder="linear", **EM).fit(laplace.X, u=u)
    assert est._run.params["solver"] == "em"
    assert est.model_.prior.logits.shape == (3, 3, 3)
    assert mean_corr_coef(laplace.S, est.transform(laplace.X, u=u)) > 0.95


def test_auto_uses_the_gradient_solver_for_what_em_cannot_fit(laplace):
    X = laplace.X
    for kw in (dict(batch_size=100), dict(noise=(0.1, 0.01)), dict(table_optimizer="fused"),
               dict(posterior_covariance="full"), dict(decoder="mlp")):
        est = HalfVAEICA(3, max_iter=2, n_restarts=1, tol=None, random_state=0, **kw).fit(X)
        assert est._run.params["solver"] == "adam", kw
    # A batch of at least n_samples is the full batch: EM, the same fit as batch_size=None.
    full = HalfVAEICA(3, batch_size=600, **EM).fit(X)
    none = HalfVAEICA(3, **EM).fit(X)
    assert full._run.params["solver"] == "em"
    _same_fit(full, none)


@pytest.mark.parametrize("kw, name", [(dict(decoder="mlp"), "decoder"),
                                      (dict(decoder="flow"), "decoder"),
                                      (dict(batch_size=100), "batch_size"),
                                      (dict(noise=(0.1, 0.01)), "noise"),
                                      (dict(table_optimizer="fused"), "table_optimizer"),
                                      (dict(posterior_covariance="full"),
                                       "posterior_covariance"),
                                      (dict(solver="newton"), "solver")])
def test_em_refuses_what_it_cannot_fit(laplace, kw, name):
    with pytest.raises(InvalidParameterError, match=name):
        HalfVAEICA(3, **{"solver": "em", **kw}).fit(laplace.X)


def test_files_from_before_the_solver_resume_with_the_gradient_solver(laplace, tmp_path):
    params = dict(max_iter=30, n_restarts=1, random_state=0, tol=None)
    ref = HalfVAEICA(3, solver="adam", **params).fit(laplace.X)
    est = HalfVAEICA(3, solver="adam", **params)
    est.fit(laplace.X, stop_after=11)
    path = tmp_path / "old.pt"
    est.save(path)
    payload = torch.load(path, weights_only=True)
    for p in (payload["params"], payload["run"]["params"]):
        del p["solver"]  # as written before the parameter existed
    del payload["sha256"]
    torch.save(payload, path)
    old = HalfVAEICA.load(path)
    assert old.solver == "adam"
    old.fit(laplace.X, resume=True)
    _same_fit(old, ref)
