"""halfvae_ext.ica: synthetic ICA problems and the metrics that score recovered sources."""
import numpy as np
import pytest
import torch

from halfvae_ext import ica
from halfvae_ext.ica import (
    align_sources,
    amari_distance,
    match_components,
    mean_corr_coef,
    per_component_rmse,
)


def orthonormal_columns(n, k, seed=0):
    """[n, k] columns with zero mean, unit variance, exactly uncorrelated (to rounding)."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, k))
    M -= M.mean(axis=0)
    q, _ = np.linalg.qr(M)  # centred input: the orthonormal columns stay centred
    return q * np.sqrt(n)


# ----------------------------------------------------------------------------- metrics


def test_permuted_sign_flipped_rescaled_copy_is_perfect():
    S = np.random.default_rng(1).laplace(size=(500, 4))
    perm = [2, 0, 3, 1]
    signs = np.array([-1.0, 1.0, -1.0, 1.0])
    # Powers of two and sign flips are exact in floating point, so the metrics are exact too.
    est = S[:, perm] * signs * np.array([4.0, 0.5, 2.0, 8.0])
    inv = np.argsort(perm)  # true source i sits in estimated column inv[i]
    p, s, c = match_components(S, est)
    np.testing.assert_array_equal(p, inv)
    np.testing.assert_array_equal(s, signs[inv])
    np.testing.assert_allclose(c, 1.0, rtol=0, atol=1e-14)
    assert np.all(per_component_rmse(S, est) == 0.0)
    assert mean_corr_coef(S, est) == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_array_equal(align_sources(S, est), S * np.array([4.0, 0.5, 2.0, 8.0])[inv])


def test_arbitrary_scales_and_offsets_are_ignored():
    S = np.random.default_rng(2).uniform(size=(300, 3))
    est = -3.7 * S[:, [1, 2, 0]] + np.array([5.0, -1.0, 0.3])
    np.testing.assert_allclose(per_component_rmse(S, est), 0.0, atol=1e-12)
    assert mean_corr_coef(S, est) == pytest.approx(1.0, abs=1e-12)


def test_rmse_hand_computed_value():
    # True [1, 2, 3, 4] vs estimate [1, 2, 4, 3]: both standardize with std sqrt(1.25); the
    # difference is [0, 0, -1, 1] / sqrt(1.25), so MSE = 2 / (4 * 1.25) = 0.4.
    rmse = per_component_rmse([1, 2, 3, 4], [1, 2, 4, 3])
    np.testing.assert_allclose(rmse, [np.sqrt(0.4)], rtol=1e-12)
    # Correlation of the pair: 1 - 0.4 / 2 = 0.8 (rmse^2 = 2 - 2 |corr| for standardized columns).
    assert mean_corr_coef([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8, rel=1e-12)


def test_rmse_of_a_rotated_source_is_known():
    # est_0 = cos(t) s_0 + sin(t) e with e standardized and uncorrelated with s_0: still
    # standardized, corr = cos(t), RMSE = sqrt(2 - 2 cos t) = 2 sin(t / 2).
    B = orthonormal_columns(1000, 3)
    S = B[:, :2]
    theta = 0.3
    est = np.column_stack([B[:, 1], -(np.cos(theta) * B[:, 0] + np.sin(theta) * B[:, 2])])
    np.testing.assert_allclose(per_component_rmse(S, est), [2 * np.sin(theta / 2), 0.0], atol=1e-12)
    p, s, c = match_components(S, est)
    np.testing.assert_array_equal(p, [1, 0])
    np.testing.assert_array_equal(s, [-1.0, 1.0])
    np.testing.assert_allclose(c, [np.cos(theta), 1.0], atol=1e-12)


def test_hungarian_beats_greedy():
    # |corr| table (true rows, estimated columns):   est_0  est_1
    #                                        true_0   0.70   0.65
    #                                        true_1   0.60   0.05
    # Greedy (largest entry first, or row by row) takes true_0 -> est_0 and is left with 0.05:
    # total 0.75. The optimum crosses over: 0.65 + 0.60 = 1.25.
    B = orthonormal_columns(2000, 4, seed=3)
    S = B[:, :2]

    def col(a, b, rest):  # unit variance, corr a to true_0 and b to true_1; B[:, rest] fills up
        return a * B[:, 0] + b * B[:, 1] + np.sqrt(1 - a * a - b * b) * B[:, rest]

    est = np.column_stack([col(0.70, 0.60, 2), col(0.65, 0.05, 3)])
    corr = np.abs(S.T @ est / len(S))
    np.testing.assert_allclose(corr, [[0.70, 0.65], [0.60, 0.05]], atol=1e-12)
    greedy_first = int(np.argmax(corr[0]))
    assert greedy_first == 0  # the case really traps a greedy matcher

    perm, signs, abs_corr = match_components(S, est)
    np.testing.assert_array_equal(perm, [1, 0])
    np.testing.assert_allclose(abs_corr, [0.65, 0.60], atol=1e-12)
    np.testing.assert_array_equal(signs, [1.0, 1.0])
    assert mean_corr_coef(S, est) == pytest.approx(0.625, abs=1e-12)


def test_extra_estimated_columns_are_left_unmatched():
    rng = np.random.default_rng(4)
    S = rng.laplace(size=(800, 2))
    noise = rng.standard_normal((800, 3))
    est = np.column_stack([noise[:, 0], S[:, 1], noise[:, 1], -S[:, 0], noise[:, 2]])
    perm, signs, _ = match_components(S, est)
    np.testing.assert_array_equal(perm, [3, 1])
    np.testing.assert_array_equal(signs, [-1.0, 1.0])
    np.testing.assert_allclose(align_sources(S, est), S, atol=0)
    assert per_component_rmse(S, est).shape == (2,)


def test_metrics_accept_torch_tensors():
    S = np.random.default_rng(5).laplace(size=(200, 3))
    est = torch.tensor(S[:, [2, 1, 0]] * [-1, 2, 3], dtype=torch.float32, requires_grad=True)
    np.testing.assert_allclose(per_component_rmse(torch.from_numpy(S), est), 0.0, atol=1e-6)
    assert mean_corr_coef(S, est.to(torch.bfloat16)) > 0.99
    W = torch.eye(3, dtype=torch.float64)
    assert amari_distance(W, torch.eye(3)) == 0.0


def test_collapsed_estimate_column_counts_as_uncorrelated():
    S = orthonormal_columns(100, 2, seed=6)
    est = np.column_stack([S[:, 0], np.full(100, 3.0)])
    np.testing.assert_allclose(per_component_rmse(S, est), [0.0, 1.0], atol=1e-12)
    assert mean_corr_coef(S, est) == pytest.approx(0.5, abs=1e-12)


_r = np.random.default_rng(0).random


@pytest.mark.parametrize(
    "S_true, S_est, match",
    [
        (np.zeros((10, 3)) + np.arange(10)[:, None] ** [1, 2, 3], np.ones((10, 2)), "fewer columns"),
        (_r((10, 2)), _r((11, 2)), "same number of samples"),
        (_r((1, 2)), _r((1, 2)), "at least 2 samples"),
        (np.array([[1.0, np.nan], [2.0, 3.0], [0.0, 1.0]]), _r((3, 2)), "S_true contains NaN"),
        (_r((3, 2)), np.array([[1.0, np.inf], [2.0, 3.0], [0.0, 1.0]]), "S_est contains NaN"),
        (_r((4, 2, 2)), _r((4, 2)), "S_true must be 1-D or 2-D"),
        (np.column_stack([np.ones(5), np.arange(5.0)]), _r((5, 2)), "S_true has constant"),
    ],
)
def test_metric_input_errors(S_true, S_est, match):
    for f in (match_components, align_sources, per_component_rmse, mean_corr_coef):
        with pytest.raises(ValueError, match=match):
            f(S_true, S_est)


def test_amari_zero_for_permuted_scaled_inverse():
    rng = np.random.default_rng(7)
    k = 4
    A = rng.standard_normal((k, k))
    P = np.eye(k)[[2, 0, 3, 1]]
    D = np.diag([0.5, -3.0, 2.0, 7.0])
    assert amari_distance(P @ D @ np.linalg.inv(A), A) == pytest.approx(0.0, abs=1e-12)
    # Non-square: a 5-channel mixing of 3 sources unmixed by a (scaled, permuted) pseudo-inverse.
    A2 = rng.standard_normal((5, 3))
    W2 = np.eye(3)[[1, 2, 0]] @ np.diag([2.0, -1.0, 0.1]) @ np.linalg.pinv(A2)
    assert amari_distance(W2, A2) == pytest.approx(0.0, abs=1e-12)


def test_amari_known_value_and_random_unmixing():
    # P = [[1, 1], [0, 1]]: rows give (2 - 1) + 0, columns 0 + (2 - 1); 2 / (2 * 2 * 1) = 0.5.
    assert amari_distance([[1.0, 1.0], [0.0, 1.0]], np.eye(2)) == pytest.approx(0.5)
    rng = np.random.default_rng(8)
    A = rng.standard_normal((5, 5))
    for _ in range(5):
        d = amari_distance(rng.standard_normal((5, 5)), A)
        assert 0.1 < d <= 1.0


@pytest.mark.parametrize(
    "W, A, match",
    [
        (np.eye(3), np.eye(2), "A must have shape"),
        (np.ones(3), np.eye(3), "must be 2-D"),
        (np.eye(1), np.eye(1), "at least 2 components"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), np.eye(2), "NaN"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), np.eye(2), "all-zero"),
    ],
)
def test_amari_input_errors(W, A, match):
    with pytest.raises(ValueError, match=match):
        amari_distance(W, A)


# ----------------------------------------------------------------------------- generators

N = 2000
GENERATORS = {
    "paper_linear": (ica.make_paper_linear, {}, 3, 3),
    "paper_linear_noisy": (ica.make_paper_linear, {"noise": 0.1}, 3, 3),
    "linear_laplace": (ica.make_linear, {"n_sources": 4}, 4, 4),
    "linear_uniform": (ica.make_linear, {"n_sources": 2, "source": "uniform"}, 2, 2),
    "linear_mixed": (ica.make_linear, {"n_sources": 5, "source": "mixed"}, 5, 5),
    "nonlinear": (ica.make_nonlinear, {"n_sources": 4, "n_layers": 3}, 4, 4),
    "piecewise": (ica.make_piecewise_stationary, {"n_sources": 3, "n_segments": 7}, 3, 3),
    "piecewise_gauss": (
        ica.make_piecewise_stationary,
        {"n_sources": 2, "n_segments": 4, "distribution": "gaussian", "means": True}, 2, 2),
    "underdetermined": (ica.make_underdetermined, {"n_sources": 4, "n_observed": 2}, 4, 2),
}


@pytest.mark.parametrize("key", GENERATORS)
def test_generator_shapes_standardized_and_reproducible(key):
    make, kw, n_sources, n_observed = GENERATORS[key]
    p = make(n_samples=N, random_state=11, **kw)
    assert isinstance(p, ica.ICAProblem)
    assert p.X.shape == (N, n_observed) and p.S.shape == (N, n_sources)
    assert (p.n_samples, p.n_sources, p.n_observed) == (N, n_sources, n_observed)
    assert np.all(np.isfinite(p.X))
    np.testing.assert_allclose(p.S.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(p.S.std(axis=0), 1.0, rtol=1e-12)
    linear = p.A is not None
    if linear:
        assert p.A.shape == (n_observed, n_sources) and p.mixer is None
    else:
        assert callable(p.mixer)

    same = make(n_samples=N, random_state=11, **kw)
    for name in ("X", "S", "A", "u"):
        a, b = getattr(p, name), getattr(same, name)
        assert (a is None and b is None) or np.array_equal(a, b), name
    # A Generator is accepted and gives the same problem as its seed.
    gen = make(n_samples=N, random_state=np.random.default_rng(11), **kw)
    np.testing.assert_array_equal(gen.X, p.X)
    other = make(n_samples=N, random_state=12, **kw)
    assert not np.allclose(other.X, p.X)


@pytest.mark.parametrize("n_sources", [2, 3, 6])
def test_linear_problems_mix_exactly(n_sources):
    for p in (ica.make_linear(N, n_sources, "mixed", random_state=0),
              ica.make_underdetermined(N, n_sources, 1, random_state=0),
              ica.make_paper_linear(N, random_state=n_sources)):
        np.testing.assert_allclose(p.X, p.S @ p.A.T, rtol=0, atol=1e-12)
        if p.A.shape[0] == p.A.shape[1]:
            assert np.linalg.cond(p.A) <= 10.0 + 1e-9


def test_paper_linear_sources_and_noise():
    p = ica.make_paper_linear(N, random_state=3)
    t = np.linspace(0, 8, N)
    # Column 0 is the standardized sine, column 1 the square wave (two levels plus the 0 at t=0).
    np.testing.assert_allclose(p.S[:, 0], (np.sin(2 * t) - np.sin(2 * t).mean()) / np.sin(2 * t).std())
    assert len(np.unique(np.round(p.S[1:, 1], 12))) == 2
    assert np.all((p.A >= 0.5) & (p.A <= 2.0))
    noisy = ica.make_paper_linear(N, noise=0.2, random_state=3)
    np.testing.assert_array_equal(noisy.A, p.A)  # noise is drawn after A
    clean = noisy.S @ noisy.A.T
    ratio = (noisy.X - clean).std(axis=0) / clean.std(axis=0)
    np.testing.assert_allclose(ratio, 0.2, rtol=0.1)


def test_linear_source_kinds_are_non_gaussian():
    from scipy import stats
    lap = ica.make_linear(N, 3, "laplace", random_state=1).S
    uni = ica.make_linear(N, 3, "uniform", random_state=1).S
    assert np.all(stats.kurtosis(lap) > 1.5)  # Laplace: 3
    assert np.all(stats.kurtosis(uni) < -1.0)  # uniform: -1.2
    mixed = ica.make_linear(N, 3, "mixed", random_state=1).S
    assert stats.kurtosis(mixed[:, 0]) > 1.5 and stats.kurtosis(mixed[:, 1]) < -1.0
    assert stats.skew(mixed[:, 2]) > 1.0  # exponential: 2


def test_assorted_sources_and_noise():
    from scipy import stats
    p = ica.make_linear(N, 6, "assorted", random_state=2)
    assert p.name == "linear_assorted"
    S = p.S
    assert stats.kurtosis(S[:, 0]) > 1.5 and stats.kurtosis(S[:, 4]) > 1.5  # Laplace
    assert -1.3 < stats.kurtosis(S[:, 1]) < -1.0 and stats.kurtosis(S[:, 5]) < -1.0  # uniform
    # bimodal: almost no mass near 0, two modes of equal weight
    assert np.mean(np.abs(S[:, 2]) < 0.3) < 0.02
    assert abs(np.mean(S[:, 2] > 0) - 0.5) < 0.05
    # periodic: a pure sine (arcsine distribution, kurtosis -1.5) that repeats
    assert stats.kurtosis(S[:, 3]) == pytest.approx(-1.5, abs=0.05)
    spectrum = np.abs(np.fft.rfft(S[:, 3]))
    assert 3 <= np.argmax(spectrum) <= 15 and spectrum.max() > 0.9 * np.sqrt(np.sum(spectrum ** 2))
    np.testing.assert_allclose(p.X, S @ p.A.T, rtol=0, atol=1e-12)
    noisy = ica.make_linear(N, 6, "assorted", noise=0.01, random_state=2)
    np.testing.assert_array_equal(noisy.S, p.S)
    np.testing.assert_array_equal(noisy.A, p.A)
    ratio = (noisy.X - p.X).std(axis=0) / p.X.std(axis=0)
    np.testing.assert_allclose(ratio, 0.01, rtol=0.1)
    assert noisy.name == "linear_assorted_noise0.01"
    with pytest.raises(ValueError, match="noise"):
        ica.make_linear(N, 3, "assorted", noise=-0.1)


def test_nonlinear_mixer_is_invertible_and_nonlinear():
    p = ica.make_nonlinear(N, n_sources=5, random_state=4)
    np.testing.assert_array_equal(p.mixer(p.S), p.X)
    np.testing.assert_allclose(p.mixer.inverse(p.X), p.S, atol=1e-9)
    # Beyond three the extra sources are Laplace (heavy-tailed), the first three periodic.
    assert np.abs(p.S[:, 3:]).max() > 3.0 and np.abs(p.S[:, :3]).max() < 2.0
    # A linear fit of X on S leaves a clear residual: the mix really is nonlinear.
    S1 = np.column_stack([p.S, np.ones(N)])
    coef, *_ = np.linalg.lstsq(S1, p.X, rcond=None)
    assert np.all((p.X - S1 @ coef).std(axis=0) > 0.01 * p.X.std(axis=0))


def test_piecewise_stationary_segments():
    n_seg = 8
    p = ica.make_piecewise_stationary(N, n_sources=3, n_segments=n_seg, random_state=5)
    assert p.u.shape == (N,) and p.u.dtype == np.int64
    assert np.all(np.diff(p.u) >= 0) and set(np.unique(p.u)) == set(range(n_seg))
    assert np.ptp(np.bincount(p.u)) <= 1  # near-equal segments
    np.testing.assert_allclose(p.mixer.inverse(p.X), p.S, atol=1e-9)
    seg_std = np.array([p.S[p.u == j].std(axis=0) for j in range(n_seg)])  # [n_seg, n_sources]
    assert np.all(seg_std.max(axis=0) / seg_std.min(axis=0) > 2.0)  # the scales really change
    lin = ica.make_piecewise_stationary(N, 3, 4, n_layers=1, random_state=5)
    coef, *_ = np.linalg.lstsq(lin.S, lin.X, rcond=None)
    np.testing.assert_allclose(lin.S @ coef, lin.X, atol=1e-9)  # one layer: a linear mix


def test_underdetermined_is_sparse_and_has_unit_columns():
    p = ica.make_underdetermined(5000, n_sources=3, n_observed=2, sparsity=0.8, random_state=6)
    assert p.n_observed < p.n_sources
    np.testing.assert_allclose(np.linalg.norm(p.A, axis=0), 1.0, rtol=1e-12)
    zero_frac = (p.S == 0).mean(axis=0)
    np.testing.assert_allclose(zero_frac, 0.8, atol=0.03)
    dense = ica.make_underdetermined(500, sparsity=0.0, random_state=6)
    assert np.all(dense.S != 0)
    # Even a tiny, very sparse problem keeps every source non-constant.
    tiny = ica.make_underdetermined(3, n_sources=4, n_observed=3, sparsity=0.99, random_state=0)
    np.testing.assert_allclose(tiny.S.std(axis=0), 1.0)


@pytest.mark.parametrize(
    "make, kw, name",
    [
        (ica.make_paper_linear, {"n_samples": 0}, "n_samples"),
        (ica.make_paper_linear, {"n_samples": 1}, "n_samples"),
        (ica.make_paper_linear, {"n_samples": 10.0}, "n_samples"),
        (ica.make_paper_linear, {"noise": -0.1}, "noise"),
        (ica.make_paper_linear, {"noise": float("nan")}, "noise"),
        (ica.make_paper_linear, {"random_state": "seed"}, "random_state"),
        (ica.make_paper_linear, {"random_state": -1}, "random_state"),
        (ica.make_linear, {"n_sources": 0}, "n_sources"),
        (ica.make_linear, {"source": "gaussian"}, "source"),
        (ica.make_nonlinear, {"n_samples": -5}, "n_samples"),
        (ica.make_nonlinear, {"n_layers": 1}, "n_layers"),
        (ica.make_nonlinear, {"n_sources": 0}, "n_sources"),
        (ica.make_piecewise_stationary, {"n_segments": 0}, "n_segments"),
        (ica.make_piecewise_stationary, {"n_samples": 5, "n_segments": 6}, "n_segments"),
        (ica.make_piecewise_stationary, {"n_layers": 0}, "n_layers"),
        (ica.make_piecewise_stationary, {"distribution": "cauchy"}, "distribution"),
        (ica.make_piecewise_stationary, {"means": "yes"}, "means"),
        (ica.make_underdetermined, {"n_observed": 3, "n_sources": 3}, "n_observed"),
        (ica.make_underdetermined, {"n_observed": 0}, "n_observed"),
        (ica.make_underdetermined, {"n_sources": 1, "n_observed": 1}, "n_sources"),
        (ica.make_underdetermined, {"sparsity": 1.0}, "sparsity"),
        (ica.make_underdetermined, {"sparsity": -0.2}, "sparsity"),
    ],
)
def test_generator_argument_errors(make, kw, name):
    with pytest.raises(ValueError, match=name):
        make(**kw)


# ----------------------------------------------------------------------------- iVAE benchmark


def test_nonstationary_shapes_labels_and_reproducible():
    p = ica.make_nonstationary(n_per_segment=300, n_segments=6, n_sources=4, random_state=3)
    assert p.X.shape == (1800, 4) and p.S.shape == (1800, 4) and p.A is None
    assert p.u.shape == (1800,) and p.u.dtype == np.int64
    np.testing.assert_array_equal(p.u, np.repeat(np.arange(6), 300))  # contiguous segments
    assert p.name == "nonstationary_lrelu2"
    np.testing.assert_allclose(p.mixer(p.S), p.X, rtol=0, atol=0)  # noise-free by default
    again = ica.make_nonstationary(n_per_segment=300, n_segments=6, n_sources=4, random_state=3)
    np.testing.assert_array_equal(again.X, p.X)
    gen = ica.make_nonstationary(n_per_segment=300, n_segments=6, n_sources=4,
                                 random_state=np.random.default_rng(3))
    np.testing.assert_array_equal(gen.X, p.X)
    assert not np.allclose(ica.make_nonstationary(300, 6, 4, random_state=4).X, p.X)


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
def test_nonstationary_segment_statistics(distribution):
    # Many rows per segment so that the per-segment std estimates are within a few percent.
    n_per, n_seg = 20000, 10
    p = ica.make_nonstationary(n_per, n_seg, 3, distribution=distribution, random_state=1)
    seg = p.S.reshape(n_seg, n_per, 3)
    std, mean = seg.std(axis=1), seg.mean(axis=1)
    # Scales U(0.5, 3), one per (segment, source), and centered sources.
    assert std.min() > 0.5 * 0.97 and std.max() < 3.0 * 1.03
    assert np.ptp(std) > 1.0  # the scales really differ across segments
    assert np.all(np.abs(mean) < 0.1 * std)
    # Kurtosis tells the two families apart: 0 for Gaussian, 3 for Laplace.
    z = (seg - mean[:, None]) / std[:, None]
    kurt = (z ** 4).mean() - 3.0
    assert abs(kurt - (0.0 if distribution == "gaussian" else 3.0)) < 0.3
    unc = ica.make_nonstationary(n_per, n_seg, 3, distribution=distribution, uncentered=True,
                                 random_state=1)
    means = unc.S.reshape(n_seg, n_per, 3).mean(axis=1)
    assert np.abs(means).max() < 5.0 + 0.1 and np.abs(means).max() > 2.0  # means U(-5, 5)
    assert np.ptp(means) > 4.0


def test_nonstationary_mixing_matrices_are_well_conditioned():
    p = ica.make_nonstationary(50, 4, 5, n_layers=4, random_state=7)
    threshold = ica.nonstationary_data.nonstationary_cond_threshold(5, np.random.default_rng(0))
    # The 25th percentile of random 5 x 5 unit-column matrices is an order of magnitude below
    # their median; every layer must come from the best-conditioned quarter.
    conds = [np.linalg.cond(A) for A in p.mixer.matrices]
    assert len(conds) == 4
    assert max(conds) <= 1.05 * threshold  # the threshold re-estimated from another stream
    for A in p.mixer.matrices:
        np.testing.assert_allclose(np.linalg.norm(A, axis=0), 1.0, rtol=1e-12)
    rand = ica.nonstationary_data._unit_column_matrices(np.random.default_rng(1), 5, 4000)
    assert np.mean(np.linalg.cond(rand) <= threshold) == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("activation, slope", [("lrelu", 0.2), ("xtanh", 0.1)])
def test_nonstationary_mixer_activation_and_inverse(activation, slope):
    p = ica.make_nonstationary(200, 5, 3, n_layers=3, activation=activation, uncentered=True,
                               random_state=2)
    m = p.mixer
    assert m.activation == activation and m.slope == slope
    np.testing.assert_allclose(m.inverse(p.X), p.S, atol=1e-9)
    # Recompute by hand: activation between layers, none after the last.
    f = (lambda h: np.where(h >= 0, h, 0.2 * h)) if activation == "lrelu" else \
        (lambda h: np.tanh(h) + 0.1 * h)
    A1, A2, A3 = m.matrices
    np.testing.assert_allclose(f(f(p.S @ A1) @ A2) @ A3, p.X, rtol=1e-12, atol=1e-12)
    # The mix is nonlinear: a linear fit of X on S leaves a clear residual.
    S1 = np.column_stack([p.S, np.ones(len(p.S))])
    coef, *_ = np.linalg.lstsq(S1, p.X, rcond=None)
    assert np.all((p.X - S1 @ coef).std(axis=0) > 0.01 * p.X.std(axis=0))
    lin = ica.make_nonstationary(200, 5, 3, n_layers=1, random_state=2)
    np.testing.assert_allclose(lin.S @ lin.mixer.matrices[0], lin.X, rtol=1e-12)


def test_nonstationary_icebeem_simulation():
    # ICE-BeeM's gen_TCL_data_ortho: standardized e, scales U(0.01, 3), n_layers - 1 layers of
    # (activation, then an orthogonal matrix).
    n_per, n_seg = 20000, 8
    p = ica.make_nonstationary(n_per, n_seg, 3, n_layers=3, benchmark="icebeem", random_state=5)
    assert p.name == "nonstationary_lrelu3_icebeem" and p.mixer.activation_first
    assert len(p.mixer.matrices) == 2
    for A in p.mixer.matrices:
        np.testing.assert_allclose(A @ A.T, np.eye(3), atol=1e-12)
    f = lambda h: np.where(h >= 0, h, 0.2 * h)
    A1, A2 = p.mixer.matrices
    np.testing.assert_allclose(f(f(p.S) @ A1) @ A2, p.X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p.mixer.inverse(p.X), p.S, atol=1e-9)
    std = p.S.reshape(n_seg, n_per, 3).std(axis=1)
    assert std.min() > 0.0 and std.max() < 3.0 * 1.03 and std.min() < 0.5  # scales U(0.01, 3)
    assert np.abs(p.S.reshape(n_seg, n_per, 3).mean(axis=1)).max() < 0.05 * 3.0
    one = ica.make_nonstationary(100, 2, 3, n_layers=1, benchmark="icebeem", random_state=5)
    np.testing.assert_array_equal(one.X, one.S)  # no layer: the sources themselves
    unc = ica.make_nonstationary(n_per, n_seg, 3, benchmark="icebeem", uncentered=True,
                                 activation="xtanh", random_state=5)
    means = unc.S.reshape(n_seg, n_per, 3).mean(axis=1)
    assert np.abs(means).max() < 3.0 + 0.1 and np.ptp(means) > 2.0  # means U(-3, 3)
    np.testing.assert_allclose(unc.mixer.inverse(unc.X), unc.S, atol=1e-9)
    # The iVAE simulation is unchanged by the option (same draws for the same seed).
    np.testing.assert_array_equal(
        ica.make_nonstationary(50, 3, 3, benchmark="ivae", random_state=1).X,
        ica.make_nonstationary(50, 3, 3, random_state=1).X)


def test_nonstationary_noise():
    clean = ica.make_nonstationary(500, 4, 3, random_state=9)
    noisy = ica.make_nonstationary(500, 4, 3, noise=0.1, random_state=9)
    np.testing.assert_array_equal(noisy.S, clean.S)
    assert (noisy.X - clean.X).std() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize(
    "kw, name",
    [({"n_per_segment": 0}, "n_per_segment"), ({"n_segments": 0}, "n_segments"),
     ({"n_sources": 0}, "n_sources"), ({"n_layers": 0}, "n_layers"),
     ({"activation": "relu"}, "activation"), ({"distribution": "cauchy"}, "distribution"),
     ({"uncentered": 1}, "uncentered"), ({"slope": 0.0}, "slope"), ({"slope": -0.1}, "slope"),
     ({"noise": -1.0}, "noise"), ({"n_cond_draws": 0}, "n_cond_draws"),
     ({"benchmark": "tcl"}, "benchmark"),
     ({"random_state": "x"}, "random_state")],
)
def test_nonstationary_argument_errors(kw, name):
    with pytest.raises(ValueError, match=name):
        ica.make_nonstationary(**{"n_per_segment": 10, "n_segments": 2, **kw})


def test_sample_images_problem():
    p = ica.make_sample_images(stride=8, random_state=0)
    assert p.image_shape == (54, 80) and p.X.shape == (54 * 80, 2) == p.S.shape
    np.testing.assert_allclose(p.X, p.S @ p.A.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p.S.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(p.S.std(0), 1, atol=1e-12)
    assert np.linalg.cond(p.A) <= 10.0 + 1e-9
    # column 0 is china.jpg: its top rows are sky, brighter than the image's mean
    top = p.S[:, 0].reshape(p.image_shape)[:5]
    assert top.mean() > 0.5
    np.testing.assert_array_equal(ica.make_sample_images(8, random_state=0).X, p.X)
    with pytest.raises(ValueError, match="stride"):
        ica.make_sample_images(stride=0)


def test_make_eeg_like_is_a_reproducible_mixture_of_its_sources():
    from halfvae_ext.ica import make_eeg_like
    P = make_eeg_like(3000, 16, noise=0.0, random_state=4)
    assert P.X.shape == (3000, 16) and P.S.shape == (3000, 16) and P.A.shape == (16, 16)
    np.testing.assert_allclose(P.S.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(P.S.std(0), 1, rtol=1e-10)
    np.testing.assert_allclose(P.X, P.S @ P.A.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(P.A, axis=0), 1, rtol=1e-12)
    assert np.linalg.cond(P.A) < 1e5
    again = make_eeg_like(3000, 16, noise=0.0, random_state=4)
    np.testing.assert_array_equal(P.X, again.X)
    noisy = make_eeg_like(3000, 16, noise=0.01, random_state=4)
    np.testing.assert_array_equal(noisy.S, P.S)
    assert 0 < np.abs(noisy.X - P.X).max() < 0.2
