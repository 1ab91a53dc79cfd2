"""Moved: the demo's problems, runner and report are :mod:`halfvae_ext.ica.demo`, the baselines
(VAE, iVAE, TCL, linear ICA) :mod:`halfvae_ext.ica.baselines`. This module re-exports both so
that code written against it keeps working."""
from .ica.baselines import *  # noqa: F401,F403
from .ica.baselines import __all__ as _baselines
from .ica.demo import *  # noqa: F401,F403
from .ica.demo import __all__ as _demo

__all__ = [*_demo, *_baselines]
