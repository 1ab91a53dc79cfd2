"""ICA tooling for Half-VAE: synthetic problems with known sources (``data``) and metrics (``metrics``).

Pure numpy/scipy; importing it does not touch the compiled kernels beyond the parent package.
"""
from .data import (
    ICAProblem,
    LeakyReLUMLP,
    make_linear,
    make_nonlinear,
    make_paper_linear,
    make_piecewise_stationary,
    make_nonstationary,
    NonstationaryMixer,
    make_underdetermined,
    make_sample_images,
)
from .metrics import (
    align_sources,
    amari_distance,
    match_components,
    mean_corr_coef,
    per_component_rmse,
)

__all__ = [
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
