"""The iVAE and TCL baselines of the nonstationary experiment (halfvae_ext.ica.baselines)."""
import numpy as np
import pytest
import torch

from halfvae_ext.ica.baselines import IVAE, fit_ivae, fit_tcl
from halfvae_ext.ica.demo import run_nonstationary
from halfvae_ext.ica import make_nonstationary, mean_corr_coef

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ivae_model_conditions_encoder_and_prior_on_u():
    m = IVAE(4, 3, 5, encoder_hidden=(8,), decoder="mlp", hidden=(8,))
    assert m.prior.conditional and m.prior.num_groups == 5 and m.prior.num_components == 1
    x = torch.randn(6, 4)
    u = torch.tensor([0, 1, 2, 3, 4, 0])
    mu0, _ = m.encode(x, u)
    mu1, _ = m.encode(x, (u + 1) % 5)
    assert mu0.shape == (6, 3) and not torch.allclose(mu0, mu1)  # the encoder reads u
    ll, kl = m.elbo_terms(x, u=u)
    assert ll.shape == (6,) and kl.shape == (6,)
    with pytest.raises(ValueError, match="u is required"):
        m.elbo_terms(x)


@pytest.mark.parametrize("learn_means", [False, True])
def test_fit_ivae_centered_prior_keeps_zero_means(learn_means):
    p = make_nonstationary(60, 4, 2, uncentered=learn_means, random_state=0)
    S, info = fit_ivae(p.X, p.u, 2, hidden=(8,), encoder_hidden=(8,), max_iter=30,
                       n_restarts=2, learn_means=learn_means, random_state=0)
    assert S.shape == (240, 2) and np.all(np.isfinite(S))
    assert len(info["restart_elbos"]) == 2 and info["elbo"] == max(info["restart_elbos"])
    means = info["model"].prior.means.detach()
    if learn_means:  # uncentered sources: the per-segment means are learned
        assert means.abs().max() > 1e-3
    else:  # centered: iVAE's prior is N(0, lambda(u)), the means never leave 0
        assert torch.equal(means, torch.zeros_like(means))
    assert info["model"].prior.logvars.detach().std(0).max() > 1e-3  # per-segment variances


def test_run_nonstationary_reports_every_method():
    out = run_nonstationary([0], n_per_segment=40, n_segments=3, n_sources=2, max_iter=10,
                            n_restarts=1, hidden=(8,))
    for method in ("halfvae_u", "halfvae", "ivae", "tcl", "fastica"):
        for metric in ("mcc", "mcc_abs"):
            assert len(out[method][metric]) == 1 and 0.0 <= out[method][metric][0] <= 1.0
    assert out["tcl"]["mcc"] == out["tcl"]["mcc_abs"]  # TCL recovers |s| only
    assert out["config"]["n_segments"] == 3 and out["config"]["benchmark"] == "ivae"


def test_run_nonstationary_on_icebeems_simulation():
    out = run_nonstationary([0], ["fastica"], n_per_segment=40, n_segments=3, n_sources=2,
                            n_layers=1, benchmark="icebeem")
    assert out["config"]["benchmark"] == "icebeem"
    # ICE-BeeM's one layer is X = S: FastICA recovers the (non-Gaussian per segment) sources.
    assert out["fastica"]["mcc"][0] > 0.9


def test_tcl_recovers_the_sources_absolute_values_from_the_segments():
    """TCL on a small nonstationary problem (3 sources, 20 segments of 500, 2-layer mix):
    FastICA of |h(x)| against |S|. Measured on seeds 1, 2, 3: 0.877, 0.588, 0.934 with the true
    segments, 0.211, 0.331, 0.257 with the same labels shuffled (no information left), training
    accuracy 0.134 against 0.058 (chance 0.05). Seed 3 here; it fails if u were not used."""
    p = make_nonstationary(500, 20, 3, n_layers=2, random_state=3)
    S, info = fit_tcl(p.X, p.u, 3, random_state=0)
    assert S.shape == (10000, 3) and info["features"].shape == (10000, 3)
    shuffled = np.random.RandomState(0).permutation(p.u)
    S_shuffled, info_shuffled = fit_tcl(p.X, shuffled, 3, random_state=0)
    assert mean_corr_coef(np.abs(p.S), S) >= 0.88
    assert mean_corr_coef(np.abs(p.S), S_shuffled) <= 0.5
    assert info["accuracy"] > 2 * info_shuffled["accuracy"]
    np.testing.assert_array_equal(fit_tcl(p.X, p.u, 3, random_state=0)[0], S)  # seeded
