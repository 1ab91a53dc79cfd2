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
from .data import *  # noqa: F401,F403  (the problems)
from .data import __all__ as _data
from .metrics import *  # noqa: F401,F403  (matching and scores)
from .metrics import __all__ as _metrics
from .nonstationary_data import NonstationaryMixer, make_nonstationary

__all__ = ["HalfVAEICA", *_data, "make_nonstationary", "NonstationaryMixer", *_metrics]


def __getattr__(name):
    if name == "HalfVAEICA":  # scikit-learn loads with the estimator, not with the package
        from .estimator import HalfVAEICA
        return HalfVAEICA
    raise AttributeError(f"module 'halfvae_ext.ica' has no attribute {name!r}")
