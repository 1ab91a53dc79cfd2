"""The classical linear ICA peers of the demo (FastICA, Picard, AMICA) on problems they solve."""
import numpy as np
import pytest

from halfvae_ext.ica.baselines import fit_linear_peer
from halfvae_ext.ica import make_linear, mean_corr_coef


@pytest.mark.parametrize("method", ["fastica", "picard", "amica"])
def test_linear_peer_separates_assorted_sources(method):
    P = make_linear(2000, 4, "assorted", random_state=3)
    S = fit_linear_peer(method, P.X, 4, seed=0)
    assert S.shape == (2000, 4)
    assert mean_corr_coef(P.S, S) > 0.98


def test_linear_peer_is_seeded():
    P = make_linear(1000, 3, "laplace", random_state=1)
    for method in ("picard", "amica"):
        np.testing.assert_array_equal(fit_linear_peer(method, P.X, 3, seed=5),
                                      fit_linear_peer(method, P.X, 3, seed=5))


def test_unknown_peer_is_refused():
    with pytest.raises(ValueError, match="unknown linear ICA method 'jade'"):
        fit_linear_peer("jade", np.zeros((10, 2)), 2, seed=0)


def test_halfvae_sources_is_the_unmixing_for_the_linear_decoder_only():
    import warnings

    from halfvae_ext import HalfVAEICA
    from halfvae_ext.ica.demo import halfvae_sources
    P = make_linear(300, 2, "assorted", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short fit warns that it has not converged
        lin = HalfVAEICA(2, max_iter=40, n_restarts=1, random_state=0).fit(P.X)
        res = HalfVAEICA(2, decoder="residual", max_iter=40, n_restarts=1,
                         random_state=0).fit(P.X)
    np.testing.assert_array_equal(halfvae_sources(lin, P.X), lin.transform(P.X))
    assert not np.allclose(lin.transform(P.X), lin.posterior_means_)
    np.testing.assert_array_equal(halfvae_sources(res, P.X), res.posterior_means_)
