"""Hyperparameters checked against a declared table of allowed values.

An estimator declares ``{name: [constraint, ...]}``; a value is valid if it satisfies any one of
its constraints. A constraint is ``None`` (the value None), a literal (``False``, ``"learned"``:
that exact value), or one of the classes below. The error names the parameter, lists every
allowed form and shows the value::

    n_components must be None or an integer >= 1, got 2.5
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real

import numpy as np

from ..models import ACTIVATIONS, COVARIANCES, DECODERS
from ..table_optim import FUSED_TABLE_OPTIMIZERS

__all__ = ["HALFVAEICA_PARAMETERS", "InvalidParameterError", "Interval", "Options", "Widths", "PathLike", "Device", "RandomState",
           "validate_parameters"]


class InvalidParameterError(ValueError, TypeError):
    """A hyperparameter outside its declared constraints (both a ValueError and a TypeError, as
    in scikit-learn: a wrong type and a wrong value are the same mistake for the caller)."""


class Interval:
    """A number (``kind`` int or float; bool is not a number here) in [left, right], each end
    closed or open as ``closed`` says ("both", "left", "right", "neither"); None: unbounded."""

    def __init__(self, kind, left=None, right=None, closed="both"):
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def __call__(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, Integral if self.kind is int else Real):
            return False
        if self.kind is not int and not math.isfinite(v):
            return False
        lo_closed = self.closed in ("both", "left")
        hi_closed = self.closed in ("both", "right")
        if self.left is not None and (v < self.left or (v == self.left and not lo_closed)):
            return False
        if self.right is not None and (v > self.right or (v == self.right and not hi_closed)):
            return False
        return True

    def __str__(self):
        what = "an integer" if self.kind is int else "a finite number"
        if self.left is not None and self.right is not None:
            lo = "[" if self.closed in ("both", "left") else "("
            hi = "]" if self.closed in ("both", "right") else ")"
            return f"{what} in {lo}{self.left}, {self.right}{hi}"
        if self.left is not None:
            return f"{what} {'>=' if self.closed in ('both', 'left') else '>'} {self.left}"
        if self.right is not None:
            return f"{what} {'<=' if self.closed in ('both', 'right') else '<'} {self.right}"
        return what


class Options:
    """One of the given strings."""

    def __init__(self, options):
        self.options = tuple(options)

    def __call__(self, v) -> bool:
        return isinstance(v, str) and v in self.options

    def __str__(self):
        return "one of " + ", ".join(map(repr, self.options))


class Widths:
    """Layer widths: a positive integer or a sequence of them (possibly empty)."""

    def __call__(self, v) -> bool:
        if Interval(int, 1)(v):
            return True
        if isinstance(v, (str, bytes)):
            return False
        try:
            return all(Interval(int, 1)(h) for h in v)
        except TypeError:
            return False

    def __str__(self):
        return "a sequence of positive layer widths"


class PositivePair:
    """A pair (a tuple or list of two) of positive finite numbers, e.g. a schedule (start, end)."""

    def __call__(self, v) -> bool:
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            return False
        return all(Interval(float, 0, None, closed="neither")(x) and math.isfinite(x) for x in v)

    def __str__(self):
        return "a pair (start, end) of positive floats"


class PathLike:
    def __call__(self, v) -> bool:
        return isinstance(v, (str, os.PathLike))

    def __str__(self):
        return "a path"


class Device:
    """Anything torch.device accepts (whether the device is usable here is checked at fit)."""

    def __call__(self, v) -> bool:
        import torch
        try:
            torch.device(v)
        except (RuntimeError, TypeError, ValueError):
            return False
        return True

    def __str__(self):
        return "a torch device"


class RandomState:
    """A non-negative integer seed or a numpy RandomState (None is declared separately). Seeds
    feed numpy's SeedSequence, so unlike check_random_state they are not limited to 32 bits."""

    def __call__(self, v) -> bool:
        return isinstance(v, np.random.RandomState) or Interval(int, 0)(v)

    def __str__(self):
        return "a non-negative integer or a numpy.random.RandomState"


def usable_device(device):
    """torch.device(device), checked to be usable here (ValueError naming device otherwise)."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no usable CUDA device here "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are only "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def _describe(c) -> str:
    return repr(c) if c is None or isinstance(c, (str, bool)) else str(c)


def _satisfies(c, v) -> bool:
    if c is None or isinstance(c, (str, bool)):
        return v is c or (type(v) is type(c) and v == c)
    return c(v)


def validate_parameters(constraints: dict, params: dict) -> None:
    """Raise InvalidParameterError for the first parameter whose value satisfies none of its
    constraints. Parameters without an entry are not checked."""
    for name, allowed in constraints.items():
        v = params[name]
        if not any(_satisfies(c, v) for c in allowed):
            forms = [_describe(c) for c in allowed]
            listed = forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + " or " + forms[-1]
            raise InvalidParameterError(f"{name} must be {listed}, got {v!r}")


_POSITIVE = Interval(float, 0, None, closed="neither")

# HalfVAEICA's table. Our own, not scikit-learn's: the estimator holds it under another name than
# scikit-learn's reserved _parameter_constraints, whose constraint language differs.
HALFVAEICA_PARAMETERS = {
    "n_components": [None, Interval(int, 1)],
    "n_mixture": [Interval(int, 1, 64)],
    "decoder": [Options(("auto", *DECODERS))],
    "hidden": [Widths()],
    "activation": [Options(sorted(ACTIVATIONS))],
    "noise": ["learned", _POSITIVE, PositivePair()],
    "whiten": [Options(("pca", "standardize")), False],
    "init": [Options(("pca", "random", "fastica"))],
    "max_iter": ["auto", Interval(int, 1)],
    "batch_size": [None, Interval(int, 1)],
    "table_optimizer": [Options(("torch", *FUSED_TABLE_OPTIMIZERS))],
    "learning_rate": [_POSITIVE],
    "table_learning_rate": [_POSITIVE],
    "prior_warmup": [Interval(float, 0, 1, closed="left")],
    "lr_decay": [Interval(float, 0, 1)],
    "n_restarts": ["auto", Interval(int, 1)],
    "n_eval_samples": [Interval(int, 1)],
    "kl": [Options(("mc", "bound"))],
    "posterior_covariance": [Options(COVARIANCES)],
    "solver": [Options(("auto", "em", "adam"))],
    "transform_max_iter": [Interval(int, 0)],
    "tol": [None, Interval(float, 0)],
    "checkpoint_path": [None, PathLike()],
    "checkpoint_every": [None, Interval(int, 1)],
    "random_state": [None, RandomState()],
    "device": [Device()],
    "n_threads": [None, Interval(int, 1)],
    "verbose": [True, False, Interval(int, 0)],
}
