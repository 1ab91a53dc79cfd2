"""Underdetermined ICA (halfvae_ext.ica.underdetermined, .sparse_baselines): the exact posterior
against brute-force integration, the EM that uses it, the baselines and the metrics."""
import math

import numpy as np
import pytest
import torch

from halfvae_ext.ica.sparse_baselines import cluster_directions, l1_decode
from halfvae_ext.ica.underdetermined import (MAX_CONFIGURATIONS, bernoulli_gaussian_prior,
                                             column_angle_errors, exact_em_step,
                                             exact_posterior, fit_exact_em,
                                             make_sparse_mixture, matched_si_sdr,
                                             matched_snr)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(K=2, D=1, C=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    A = torch.randn(D, K, generator=g, dtype=d)
    noise = torch.rand(D, generator=g, dtype=d) * 0.3 + 0.1
    weights = torch.softmax(torch.randn(K, C, generator=g, dtype=d), 1)
    means = torch.randn(K, C, generator=g, dtype=d)
    variances = torch.rand(K, C, generator=g, dtype=d) * 0.8 + 0.2
    return A, noise, weights, means, variances


def test_exact_posterior_is_the_integral_over_the_sources():
    # Brute force: p(s) p(x | s) on a grid over both sources (K = 2, D = 1: a plane of
    # solutions for every x, the posterior bimodal along it).
    A, noise, weights, means, variances = _model()
    X = torch.tensor([[-2.0], [0.3], [1.7]], dtype=torch.float64)
    mean, log_p = exact_posterior(X, A, noise, weights, means, variances)
    t = torch.linspace(-9, 9, 1201, dtype=torch.float64)
    step = float(t[1] - t[0])
    s1, s2 = torch.meshgrid(t, t, indexing="ij")
    S = torch.stack([s1, s2], -1)  # [G, G, 2]
    comp = weights / torch.sqrt(2 * math.pi * variances) * torch.exp(
        -(S[..., None] - means) ** 2 / (2 * variances))  # [G, G, K, C]
    prior = comp.sum(-1).prod(-1)
    for i, x in enumerate(X):
        lik = torch.exp(-(x - S @ A.T)[..., 0] ** 2 / (2 * noise[0])) / \
            math.sqrt(2 * math.pi * noise[0])
        joint = prior * lik
        evidence = joint.sum() * step * step
        want = (joint[..., None] * S).sum((0, 1)) * step * step / evidence
        torch.testing.assert_close(mean[i], want, rtol=1e-6, atol=1e-6)
        assert float(log_p[i]) == pytest.approx(math.log(float(evidence)), abs=1e-6)


def test_exact_posterior_takes_point_masses_and_is_differentiable():
    A, noise, weights, means, variances = _model(K=3, D=2, C=2, seed=1)
    X = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # A point mass at zero (variance 0): a source in that component is exactly 0 given c.
    variances = variances.clone()
    variances[:, 0] = 0.0
    means = means.clone()
    means[:, 0] = 0.0
    mean, _ = exact_posterior(X, A, noise, weights, means, variances)
    assert torch.isfinite(mean).all()
    inputs = [t.clone().requires_grad_() for t in (X, A, noise, means)]
    torch.autograd.gradcheck(
        lambda x, a, e, m: exact_posterior(x, a, e, weights, m, _model(3, 2, 2, 1)[4]),
        inputs)


def test_exact_posterior_refuses_too_many_configurations_and_bad_shapes():
    K = int(math.log2(MAX_CONFIGURATIONS)) + 1
    A = torch.randn(2, K, dtype=torch.float64)
    w = torch.full((K, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_components"):
        exact_posterior(torch.zeros(3, 2), A, 1.0, w, torch.zeros_like(w), torch.ones_like(w))
    with pytest.raises(ValueError, match="same D"):
        exact_posterior(torch.zeros(3, 3), A, 1.0, w, torch.zeros_like(w), torch.ones_like(w))
    with pytest.raises(ValueError, match="noise_var must be positive"):
        exact_posterior(torch.zeros(3, 2), A[:, :3], 0.0, w[:3], torch.zeros_like(w[:3]),
                        torch.ones_like(w[:3]))


def test_sparse_mixture_has_its_activity_snr_and_layout():
    P = make_sparse_mixture(40000, 3, 2, activity=0.1, snr_db=40.0, random_state=0)
    assert P.X.shape == (40000, 2) and P.S.shape == (40000, 3) and P.A.shape == (2, 3)
    assert abs((P.S != 0).mean() - 0.1) < 0.01
    assert np.allclose(P.S.var(0), 1.0, atol=0.1)
    np.testing.assert_allclose(np.linalg.norm(P.A, axis=0), 1.0)
    angles = np.sort(np.degrees(np.arctan2(P.A[1], P.A[0])) % 180)
    np.testing.assert_allclose(np.diff(angles), 60.0)  # evenly over a half circle
    clean = P.S @ P.A.T
    snr = 10 * np.log10((clean ** 2).mean(0) / ((P.X - clean) ** 2).mean(0))
    np.testing.assert_allclose(snr, 40.0, atol=0.1)
    for bad, match in ((dict(n_observed=3), "smaller than n_sources"),
                       (dict(activity=0.0), "activity"),
                       (dict(layout="square"), "layout"),
                       (dict(n_observed=1, layout="half_circle"), "half_circle")):
        with pytest.raises(ValueError, match=match):
            make_sparse_mixture(100, 3, **{"n_observed": 2, **bad})


def test_metrics_match_permutation_sign_and_scale():
    g = np.random.default_rng(0)
    S = g.standard_normal((5000, 3))
    noise = 0.1 * g.standard_normal((5000, 3))
    est = -3.0 * (S + noise)[:, [2, 0, 1]]
    want = 10 * np.log10((S ** 2).sum(0) / (noise ** 2).sum(0))
    np.testing.assert_allclose(matched_snr(S, est), want, atol=0.05)
    np.testing.assert_allclose(matched_si_sdr(S, est), want, atol=0.05)
    A = np.eye(2)[:, [0, 1]]
    turn = math.radians(2.0)
    A_est = np.array([[0.0, math.cos(turn)], [-1.0, math.sin(turn)]])
    np.testing.assert_allclose(np.sort(column_angle_errors(A, A_est)), [0.0, 2.0], atol=1e-9)


@pytest.fixture(scope="module")
def three_in_two():
    return make_sparse_mixture(3000, 3, 2, activity=0.1, random_state=3)


def test_direction_clustering_and_the_l1_decoder(three_in_two):
    P = three_in_two
    # Samples with two active sources pull the lines (1.4 degrees here at 3000 rows, 0.3 at
    # 20,000); the exact EM started from them refines them (the next test: < 1 degree).
    A_est = cluster_directions(P.X, 3, random_state=0)
    assert column_angle_errors(P.A, A_est).max() < 2.0
    assert matched_snr(P.S, l1_decode(P.X, P.A, 1e-3)).mean() > 9.0  # 0-3 dB if broken
    with pytest.raises(ValueError, match="alpha"):
        l1_decode(P.X, P.A, 0.0)


def test_exact_em_recovers_three_sources_from_two_mixtures_near_the_ceiling(three_in_two):
    P = three_in_two
    fit = fit_exact_em(P.X, 3, n_mixture=2, n_init=1, random_state=0)
    assert np.all(np.diff(fit.history) > -1e-10)  # EM never lowers the likelihood
    assert column_angle_errors(P.A, fit.A.numpy()).max() < 1.0
    ceiling, _ = exact_posterior(P.X, P.A, P.noise_var, *bernoulli_gaussian_prior(3, 0.1))
    got, best = matched_snr(P.S, fit.sources), matched_snr(P.S, ceiling.numpy())
    assert got.min() > best.min() - 0.5, (got, best)
    # More sources than mixtures: no linear unmixing, yet the mean squared error is that of
    # an SNR above 10 dB on every source.
    assert got.min() > 10.0


def test_exact_em_step_keeps_unit_columns_and_the_likelihood(three_in_two):
    P = three_in_two
    w, m, v = bernoulli_gaussian_prior(3, 0.1)
    v = v.clamp_min(1e-4)
    state = (torch.from_numpy(P.A), torch.from_numpy(P.noise_var), w, m, v)
    new, before = exact_em_step(P.X, *state)
    _, after = exact_em_step(P.X, *new)
    assert after >= before - 1e-12
    np.testing.assert_allclose(new[0].norm(dim=0).numpy(), 1.0)
