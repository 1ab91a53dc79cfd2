"""The invertible decoder's recipes: :class:`FlowRecipe` (decoder="flow") and
:class:`FlowOrLinearRecipe` (decoder="auto" with segments u): the flow against the linear flow,
kept by the log-likelihood of rows that neither trained on."""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..models import FlowDecoder, HalfVAE, random_orthogonal
from .param_validation import InvalidParameterError
from .recipe import Recipe
from .schedule import lr_factor, set_prior_trainable

__all__ = ["FLOW_BATCH_SIZE", "FlowRecipe", "FlowOrLinearRecipe", "held_out_split", "HELD_OUT_FRACTION",
           "MIN_HELD_OUT"]


# Rows per step of a flow decoder's fit when batch_size is None: a full-batch step per epoch is
# too few steps for the couplings (40,000 rows: 40 steps an epoch).
FLOW_BATCH_SIZE = 1000


@dataclass(frozen=True)
class FlowRecipe(Recipe):
    """The invertible decoder (:class:`~halfvae_ext.models.FlowDecoder`): each row's optimal
    posterior at zero noise is the point h(x_n) (h the decoder's inverse), so the table is not
    trained by gradient: it is held at h(x), and the decoder and prior are trained on the ELBO's
    zero-noise limit, the exact log-likelihood (``HalfVAE.flow_log_likelihood``), in mini-batches
    of ``FLOW_BATCH_SIZE`` rows (unless ``batch_size``); no prior warm-up, no noise, no
    realignment (the couplings can write any change of coordinates). The decoder starts as the
    linear start's inverse; the restart's score is the final log-likelihood."""
    decoder: str = "flow"
    whitens_all_dimensions: ClassVar[bool] = False
    transform_kind: ClassVar[str] = "inverse"
    auto_max_iter: ClassVar[int] = 200  # an epoch is n / FLOW_BATCH_SIZE steps
    auto_restarts: ClassVar[int] = 1

    @classmethod
    def check_parameters(cls, table_optimizer: str, posterior_covariance: str) -> None:
        for name, value, plain in (("table_optimizer", table_optimizer, "torch"),
                                   ("posterior_covariance", posterior_covariance, "diagonal")):
            if value != plain:
                raise InvalidParameterError(
                    f"decoder='flow' holds each row's latents at the decoder's inverse (its "
                    f"posterior at zero noise) and trains no table: {name} must be "
                    f"{plain!r}, got {value!r}")

    def start_at(self, model: HalfVAE, Xw: torch.Tensor, mu: torch.Tensor, W, generator) -> None:
        K = self.n_components
        unmixing = random_orthogonal(K, generator) if W is None else torch.linalg.inv(W)
        model.decoder.start_(unmixing.to(model.latents.mu), generator)
        self.hold_table_at_inverse(model, Xw)

    @staticmethod
    @torch.no_grad()
    def hold_table_at_inverse(model: HalfVAE, Xw: torch.Tensor) -> None:
        """Every row's latent mean at h(x_n), its optimum at zero noise."""
        model.latents.mu.copy_(model.decoder.inverse(Xw)[0])

    def epoch(self, model: HalfVAE, optimizers: list, Xw: torch.Tensor,
              generator: torch.Generator, epoch: int, u=None) -> float:
        """Adam steps on the mean log-likelihood of mini-batches (after the last epoch, the table
        at the decoder's inverse); returns the epoch's mean log-likelihood per sample."""
        set_prior_trainable(model.prior, False)
        self.set_learning_rates(model, optimizers, lr_factor(epoch, self.max_iter, self.lr_decay))
        rows = self.training_rows(Xw.shape[0], Xw.device)
        n = Xw.shape[0] if rows is None else rows.numel()
        perm = torch.randperm(n, generator=generator, device=generator.device).to(Xw.device)
        if rows is not None:
            perm = rows[perm]
        total = 0.0
        for idx in torch.split(perm, self.batch_size or FLOW_BATCH_SIZE):
            ub = None if u is None else u.index_select(0, idx)
            ll, _ = model.flow_log_likelihood(Xw.index_select(0, idx), ub)
            loss = -ll.mean()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            optimizers[-1].step()
            total += float(ll.detach().sum())
        if epoch + 1 == self.max_iter:  # nothing reads the table before (a pass costs 1/4 epoch)
            self.hold_table_at_inverse(model, Xw)
        return total / n

    def training_rows(self, n_rows: int, device):
        """The rows an epoch trains on (int64 indices), or None: all of them."""
        return None

    def realign_epochs(self) -> set:
        return set()

    def sources(self, model: HalfVAE, Xw: torch.Tensor, train, n_steps: int, u=None) -> np.ndarray:
        """h(Xw), the decoder's exact inverse (a row's posterior at zero noise), in float64."""
        with torch.no_grad():
            return copy.deepcopy(model.decoder).double().inverse(Xw)[0].cpu().numpy()

    def final_elbo(self, model: HalfVAE, Xw: torch.Tensor, seed: int, u=None) -> float:
        """The exact log-likelihood per sample (deterministic); -inf if not finite."""
        with torch.no_grad():
            value = float(model.flow_log_likelihood(Xw, u)[0].mean())
        return value if math.isfinite(value) else -math.inf


# A FlowOrLinearRecipe run holds out HELD_OUT_FRACTION of its rows (at least MIN_HELD_OUT rows;
# runs with fewer than 2 * MIN_HELD_OUT rows hold none out and score on the training rows).
HELD_OUT_FRACTION = 0.1
MIN_HELD_OUT = 50
# The seed of the held-out rows' permutation: fixed, so that the rows depend on the row count
# only (a resumed run, and every restart, hold out the same rows) and not on random_state.
_HELD_OUT_SEED = 20240906


def held_out_split(n_rows: int, device=None):
    """(training rows, held-out rows) of a FlowOrLinearRecipe run of ``n_rows`` rows: sorted int64
    indices, a fixed pseudo-random HELD_OUT_FRACTION held out; (None, None) when n_rows is too
    small to hold out MIN_HELD_OUT rows and keep as many for training."""
    train, held = _held_out_split_cpu(int(n_rows))
    if train is None:
        return None, None
    return train.to(device), held.to(device)


@functools.lru_cache(maxsize=4)  # asked every epoch; the tensors are never written to
def _held_out_split_cpu(n_rows: int):
    n_held = max(MIN_HELD_OUT, int(n_rows * HELD_OUT_FRACTION))
    if n_rows < 2 * n_held:
        return None, None
    g = torch.Generator().manual_seed(_HELD_OUT_SEED)
    perm = torch.randperm(n_rows, generator=g)
    return perm[n_held:].sort().values, perm[:n_held].sort().values


@dataclass(frozen=True)
class FlowOrLinearRecipe(FlowRecipe):
    """decoder="auto" with segments u. A flow can only raise the training likelihood over the
    linear flow (its couplings at zero are the linear flow), so on a linear mix its couplings
    fit noise and cost accuracy; rows held out of training tell the two apart. Restart 1 is the
    linear flow (``FlowDecoder(n_blocks=0)``: h(x) = W x + b, linear ICA by exact likelihood
    under the conditional prior), every other restart the flow; each trains on the same
    (1 - HELD_OUT_FRACTION) of the rows (:func:`held_out_split`), and its score, by which the
    estimator keeps one, is the mean log-likelihood of the held-out rows. The starts (whitening,
    the linear start, the prior's moments) use all rows; the table is held at h(x) of all rows.
    The fitted decoder is named "flow" or "linear_flow" (``HalfVAEICA.decoder_``)."""
    decoder: str = "flow_or_linear"
    auto_restarts: ClassVar[int] = 2
    n_flow_blocks: ClassVar[int | None] = None  # the restarts' recipes set it (of_restart)
    fitted_name: ClassVar[str] = "flow_or_linear"

    def of_restart(self, restart: int) -> "FlowOrLinearRecipe":
        cls = _LinearFlowRestart if restart == 1 else _FlowRestart
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def make_decoder(self):
        if self.n_flow_blocks is None:
            raise TypeError("FlowOrLinearRecipe builds its restarts' models through of_restart()")
        return FlowDecoder(self.n_components, self.hidden, self.activation,
                           n_blocks=self.n_flow_blocks)

    def training_rows(self, n_rows: int, device):
        return held_out_split(n_rows, device)[0]

    def final_elbo(self, model: HalfVAE, Xw: torch.Tensor, seed: int, u=None) -> float:
        """The mean exact log-likelihood of the held-out rows (all rows when none are held
        out); -inf if not finite."""
        held = held_out_split(Xw.shape[0], Xw.device)[1]
        if held is not None:
            Xw = Xw.index_select(0, held)
            u = None if u is None else u.index_select(0, held)
        return super().final_elbo(model, Xw, seed, u)


@dataclass(frozen=True)
class _FlowRestart(FlowOrLinearRecipe):
    n_flow_blocks: ClassVar[int] = 8
    fitted_name: ClassVar[str] = "flow"


@dataclass(frozen=True)
class _LinearFlowRestart(FlowOrLinearRecipe):
    n_flow_blocks: ClassVar[int] = 0
    fitted_name: ClassVar[str] = "linear_flow"
