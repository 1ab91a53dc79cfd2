"""The schedules of a training run: restart seeds, the learning-rate tail, the noise schedule,
the prior warm-up, and the convergence measure of an ELBO history."""
from __future__ import annotations

import math

import numpy as np

from ..models import GMMPrior

__all__ = ["restart_seeds", "lr_factor", "noise_schedule_std", "prior_warmup_epochs",
           "set_prior_trainable", "elbo_change"]


def restart_seeds(random_state, n_restarts: int) -> list:
    """One 63-bit seed per restart. random_state: an int (reproducible), None (fresh entropy) or
    a numpy RandomState (one draw from it gives the entropy, so a RandomState seeded alike gives
    the same seeds, and each call advances it, as in scikit-learn)."""
    if isinstance(random_state, np.random.RandomState):
        entropy = int(random_state.randint(np.iinfo(np.int32).max))
    else:
        entropy = None if random_state is None else int(random_state)
    ss = np.random.SeedSequence(entropy)
    return [int(c.generate_state(1, np.uint64)[0] >> np.uint64(1)) for c in ss.spawn(n_restarts)]


def lr_factor(epoch: int, max_iter: int, lr_decay: float) -> float:
    """Learning-rate multiplier: 1, then a half cosine down to 0.01 over the last ``lr_decay``
    fraction of the ``max_iter`` epochs."""
    start = (1.0 - lr_decay) * max_iter
    if lr_decay == 0 or epoch < start:
        return 1.0
    frac = (epoch - start) / (max_iter - start)
    return max(0.5 * (1.0 + math.cos(math.pi * frac)), 0.01)


def noise_schedule_std(epoch: int, max_iter: int, start: float, end: float) -> float:
    """Observation noise std of an epoch under the schedule (start, end): ``start`` for the first
    half of the ``max_iter`` epochs, then geometric from ``start`` to ``end``, reached at the
    last epoch."""
    first, last = max_iter // 2, max_iter - 1
    if epoch >= last:
        return end
    if epoch <= first:
        return start
    frac = (epoch - first) / (last - first)
    return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))


def prior_warmup_epochs(prior_warmup: float, max_iter: int) -> int:
    return int(prior_warmup * max_iter)


def set_prior_trainable(prior: GMMPrior, frozen: bool) -> None:
    """Warm-up (frozen): component positions and weights fixed, variances free. The variances
    alone can turn the flat-topped start super-Gaussian (narrow center, wide sides) or
    multimodal, but cannot fit the marginal of two mixed sub-Gaussian sources."""
    prior.means.requires_grad_(not frozen)
    prior.logits.requires_grad_(not frozen)
    prior.logvars.requires_grad_(True)


def elbo_change(history, fraction: float = 0.1) -> float:
    """How fast a per-epoch ELBO history still moved at its end, per epoch: |mean of the last
    window - mean of the window before| / window length, each window ``fraction`` of the epochs
    (at least one; averaging over a window removes most of the Monte-Carlo noise of single
    epochs). NaN with fewer than two epochs."""
    h = np.asarray(history, dtype=np.float64)
    if h.size < 2:
        return math.nan
    w = max(1, int(h.size * fraction))
    return float(abs(h[-w:].mean() - h[-2 * w:-w].mean()) / w)
