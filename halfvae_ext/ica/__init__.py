"""The ICA application of Half-VAE.

- :class:`HalfVAEICA` (:mod:`.estimator`): the scikit-learn estimator, a thin layer over
  :mod:`.preprocessing` (input checks, whitening), :mod:`.recipe` (one training restart; a class
  per decoder family), :mod:`.realign` (the latents' realignment), :mod:`.restarts` (restarts
  chosen by ELBO as a resumable run), :mod:`.file_format` (the estimator's files) and
  :mod:`.param_validation` (the parameter table);
- :mod:`.data` (problems with known sources) and :mod:`.metrics` (matching, RMSE, MCC, Amari);
- :mod:`.baselines` (VAE, iVAE, TCL, FastICA/Picard/AMICA) and :mod:`.demo` (``halfvae demo``).

Importing this package loads data and metrics only (numpy/scipy); the estimator and the rest,
which need scikit-learn, load on first use. It never imports ``halfvae_ext.distributed``.
"""
from .data import (
    ICAProblem,
    LeakyReLUMLP,
    make_linear,
    make_nonlinear,
    make_paper_linear,
    make_piecewise_stationary,
    make_underdetermined,
    make_sample_images,
)
from .nonstationary_data import NonstationaryMixer, make_nonstationary
from .metrics import (
    align_sources,
    amari_distance,
    match_components,
    mean_corr_coef,
    per_component_rmse,
)

__all__ = [
    "HalfVAEICA",
    "ICAProblem",
    "LeakyReLUMLP",
    "make_paper_linear",
    "make_linear",
    "make_nonlinear",
    "make_piecewise_stationary",
    "make_nonstationary",
    "NonstationaryMixer",
    "make_underdetermined",
    "make_sample_images",
    "match_components",
    "align_sources",
    "per_component_rmse",
    "mean_corr_coef",
    "amari_distance",
]


def __getattr__(name):
    if name == "HalfVAEICA":  # scikit-learn loads with the estimator, not with the package
        from .estimator import HalfVAEICA
        return HalfVAEICA
    raise AttributeError(f"module 'halfvae_ext.ica' has no attribute {name!r}")
