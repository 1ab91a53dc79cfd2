"""Argument checks shared by the model modules: each raises ValueError (TypeError for a wrong
kind of value) naming the argument."""
from __future__ import annotations

import math
from numbers import Integral

LOG_2PI = math.log(2.0 * math.pi)
KL_ESTIMATORS = ("mc", "bound")


def _check_pos_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_kl(kl) -> str:
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be 'mc' (one-draw Monte-Carlo estimate) or 'bound' (closed-form "
                         f"upper bound), got {kl!r}")
    return kl


def _check_hidden(hidden) -> tuple:
    if isinstance(hidden, Integral) and not isinstance(hidden, bool):
        hidden = (hidden,)
    try:
        hidden = tuple(hidden)
    except TypeError:
        raise TypeError(f"hidden must be a sequence of layer widths, got {hidden!r}") from None
    for h in hidden:
        _check_pos_int("every hidden layer width", h)
    return tuple(int(h) for h in hidden)
