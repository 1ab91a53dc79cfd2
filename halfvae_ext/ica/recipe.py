"""The Half-VAE ICA training recipe, one restart at a time: a class per decoder family.

- The model starts at the data: latent means at the whitened PCA scores (``init="pca"``; restarts
  >= 1 randomly rotated), the decoder set so that decode(mu) reproduces the data; observation
  noise and posterior std start at ``INIT_NOISE_STD`` (a noise std of 1 lets the noise explain
  everything: posterior collapse).
- Prior warm-up: for the first ``prior_warmup`` fraction of the epochs the GMM components keep
  their positions and weights and only their variances learn. A conditional prior (segments u)
  first moves each segment's mixtures to the moments of that segment's starting latent means.
- Adam, a larger rate for the latent table; both rates decay along a half cosine over the last
  ``lr_decay`` fraction of the epochs (``lr_factor``).
- A noise schedule ``noise=(start, end)``: the observation noise std is held at ``start`` for the
  first half of the epochs, then falls geometrically to ``end`` at the last epoch.
- With segments u, a full posterior and one Gaussian per segment, the latents are realigned
  (:func:`~halfvae_ext.ica.realign.realign_latents`) at the epochs of ``realign_epochs``.
- Restarts are compared by the final ELBO (``final_elbo``), never by ground truth.

The classes (:func:`~halfvae_ext.ica.run_parameters.recipe_for` maps a decoder name to its
class):

- :class:`Recipe`: the MLP decoder, and what every decoder whose latent table is trained by
  gradient shares; :class:`LinearRecipe` and :class:`ResidualRecipe` differ in how the decoder
  starts and what it answers (a linear part, the unmixing transform);
- :class:`~halfvae_ext.ica.flow_recipe.FlowRecipe` (its own module): the invertible decoder,
  whose table is held at the decoder's inverse and whose fit is the exact log-likelihood in
  mini-batches; ``FlowOrLinearRecipe``: the flow against the linear flow, chosen on held-out rows.

Each answers the traits the estimator asks: ``whitens_all_dimensions`` (PCA to all
nondegenerate dimensions, or to K), ``transform_kind`` ("unmixing", "inverse" or
"posterior_mode"), :meth:`Recipe.linear_part` and :meth:`Recipe.check_parameters`. A new decoder
is one class in :mod:`halfvae_ext.models.decoders`, one recipe class, and its name in
``run_parameters.RECIPES``. The baselines' ``VAERecipe`` (:mod:`halfvae_ext.ica.baselines`) is a subclass too.
"""
from __future__ import annotations

import contextlib
import copy
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..models import GMMPrior, HalfVAE, random_orthogonal
from ..table_optim import FUSED_TABLE_OPTIMIZERS
from .param_validation import InvalidParameterError
from .realign import realign_latents
from .schedule import (elbo_change, lr_factor, noise_schedule_std, prior_warmup_epochs,
                       restart_seeds, set_prior_trainable)

__all__ = ["INIT_NOISE_STD", "Recipe", "LinearRecipe", "ResidualRecipe", "LiveRestart",
           "restart_seeds",
           "reset_parameters", "torch_threads", "lr_factor", "prior_warmup_epochs", "set_prior_trainable",
           "noise_schedule_std", "final_elbo", "elbo_change", "posterior_mode",
           "FUSED_TABLE_OPTIMIZERS"]

# Noise std of the likelihood (and posterior std of the table) at the start, in whitened units.
INIT_NOISE_STD = 0.1


def reset_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """nn.Linear's default initialization of every layer, drawn from ``generator`` (not the
    global RNG)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                bound = 1.0 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


@contextlib.contextmanager
def torch_threads(n):
    """Run the block with torch's intra-op thread count set to n (None: unchanged)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def final_elbo(model, Xw: torch.Tensor, seed: int, n_draws: int, u=None) -> float:
    """ELBO per sample of all rows, averaged over ``n_draws`` Monte-Carlo draws from a generator
    seeded with seed + 1 (a stream the training did not use); -inf if not finite. ``model`` is a
    HalfVAE or a VAE; u: the segment of every row, for a conditional prior (None: none)."""
    g = torch.Generator(device=Xw.device).manual_seed((seed + 1) % (2**63))
    vals = []
    extra = {} if u is None else {"u": u}  # models without groups need not take u
    for _ in range(n_draws):
        ll, kl = model.elbo_terms(Xw, generator=g, **extra)
        vals.append(float((ll - kl).mean()))
    elbo = float(np.mean(vals))
    return elbo if math.isfinite(elbo) else -math.inf


def posterior_mode(model, Xw: torch.Tensor, z0: torch.Tensor, n_steps: int,
                   lr: float = 0.02, u=None) -> torch.Tensor:
    """argmax_z log p(x | z) + log p(z | u) for every row of Xw [m, dw], from z0 [m, K]
    (u [m]: each row's segment for a conditional prior, else None): ``n_steps``
    Adam steps (rate ``lr``, cosine-decayed to 0) on the sum over rows of the negative log joint.
    Adam is elementwise and the sum separates, so each row follows its own trajectory: the result
    of a row depends on that row and its start only. Runs in the dtype of Xw; returns [m, K]."""
    z = z0.detach().clone().requires_grad_(True)
    if n_steps == 0 or z.shape[0] == 0:
        return z.detach()
    opt = torch.optim.Adam([z], lr=lr)
    for step in range(n_steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / n_steps))
        log_joint = model.likelihood.log_prob(Xw, model.decoder(z)) \
            + model.prior.log_prob(z, u).sum(1)
        opt.zero_grad(set_to_none=True)
        (-log_joint.sum()).backward()
        opt.step()
    return z.detach()


@dataclass
class LiveRestart:
    """A restart in progress: its model, optimizers, random stream and per-epoch ELBO."""
    model: HalfVAE
    optimizers: list
    generator: torch.Generator
    history: list = field(default_factory=list)


@dataclass(frozen=True)
class Recipe:
    """Settings of one training restart (the HalfVAEICA parameters of the same names) and the
    steps that use them; as it is, the recipe of the MLP decoder."""
    n_components: int
    n_mixture: int = 3
    decoder: str = "mlp"
    hidden: tuple = (32,)
    activation: str = "leaky_relu"
    noise: object = "learned"  # "learned", a fixed std, or a schedule (start, end)
    init: str = "pca"
    max_iter: int = 1500
    batch_size: int | None = None
    table_optimizer: str = "torch"
    learning_rate: float = 0.01
    table_learning_rate: float = 0.05
    prior_warmup: float = 0.3
    lr_decay: float = 0.3
    n_eval_samples: int = 8
    # Segments of a conditional prior (1: the unconditional prior) and the KL estimator.
    n_groups: int = 1
    kl: str = "mc"
    posterior_covariance: str = "diagonal"

    # Traits of the decoder family, read by the estimator.
    whitens_all_dimensions: ClassVar[bool] = True
    """PCA-whiten to every nondegenerate dimension (True) or to the K of the latents."""
    transform_kind: ClassVar[str] = "posterior_mode"
    """What ``transform`` computes: "unmixing" (a linear map, components_), "inverse" (the
    decoder's exact inverse) or "posterior_mode" (a per-row search, :meth:`sources`)."""
    auto_max_iter: ClassVar[int] = 1500
    auto_restarts: ClassVar[int] = 4
    """max_iter and n_restarts for the estimator's "auto"."""

    @classmethod
    def check_parameters(cls, table_optimizer: str, posterior_covariance: str) -> None:
        """Refuse (InvalidParameterError, naming them) settings this family cannot train."""
        if posterior_covariance == "full" and table_optimizer != "torch":
            raise InvalidParameterError(
                f"posterior_covariance='full' needs table_optimizer='torch' (the fused table "
                f"optimizers step diagonal posteriors), got {table_optimizer!r}")

    def linear_part(self, model: HalfVAE) -> torch.Tensor | None:
        """W [dw, K] of a decoder that is the linear map x = W z, else None."""
        return None

    @property
    def noise_schedule(self) -> tuple | None:
        """(start, end) when the noise follows a schedule, else None."""
        return tuple(map(float, self.noise)) if isinstance(self.noise, (tuple, list)) else None

    @property
    def initial_noise(self):
        """The noise the model is built with: "learned", the fixed std or the schedule's start."""
        return self.noise if self.noise_schedule is None else self.noise_schedule[0]

    @property
    def fused_table(self) -> bool:
        return self.table_optimizer != "torch"

    def mini_batches(self, n_rows: int) -> bool:
        """True if an epoch is several steps (a batch_size below n_rows)."""
        return self.batch_size is not None and self.batch_size < n_rows

    def build_model(self, n_rows: int, data_dim: int, device) -> HalfVAE:
        """A HalfVAE for n_rows rows of data_dim whitened features, not yet initialized."""
        prior = GMMPrior(self.n_components, self.n_mixture, num_groups=self.n_groups)
        noise = self.initial_noise
        init_lv = 2.0 * math.log(INIT_NOISE_STD if noise == "learned" else min(float(noise), 1.0))
        table_kind, state_dtype = FUSED_TABLE_OPTIMIZERS.get(self.table_optimizer, (None, None))
        model = HalfVAE(n_rows, data_dim, self.n_components, decoder=self.make_decoder(),
                        prior=prior,
                        hidden=self.hidden, activation=self.activation, noise=noise,
                        init_mu=torch.zeros(n_rows, self.n_components), init_logvar=init_lv,
                        init_noise_std=INIT_NOISE_STD,
                        sparse=self.mini_batches(n_rows) and not self.fused_table,
                        table_optimizer=table_kind, table_state_dtype=state_dtype,
                        table_lr=self.table_learning_rate, kl=self.kl,
                        posterior_covariance=self.posterior_covariance)
        return model.to(device)

    @property
    def fitted_name(self) -> str:
        """The decoder's name as the fitted estimator reports it (``decoder_``)."""
        return self.decoder

    def make_decoder(self):
        """What build_model hands HalfVAE as its decoder: a name of DECODERS or a module."""
        return self.decoder

    def of_restart(self, restart: int) -> "Recipe":
        """The recipe of restart ``restart`` (restarts of one recipe may differ in kind: see
        FlowOrLinearRecipe); here every restart's is this one."""
        return self

    def initialize(self, model: HalfVAE, Xw: torch.Tensor, restart: int, seed: int,
                   generator: torch.Generator) -> None:
        """Set the latent means and decoder of a fresh restart (draws from ``generator``)."""
        reset_parameters(model.decoder, generator)
        self.reset_decoder(model.decoder)
        mu, W = self.starting_point(Xw, restart, seed, generator)
        self.start_at(model, Xw, mu, W, generator)

    def reset_decoder(self, decoder: nn.Module) -> None:
        """After the layers' default initialization: the family's own start of the decoder."""

    def starting_point(self, Xw: torch.Tensor, restart: int, seed: int,
                       generator: torch.Generator):
        """(latent means [n, K] float64, W [dw, K] float64 or None): the start ``init`` asks for,
        with a linear decoder W that maps those means back to Xw (None: keep the random one)."""
        n, dw = Xw.shape
        K = self.n_components
        Xd = Xw.detach().cpu().double()
        if self.init == "random":
            return torch.randn(n, K, generator=generator, dtype=torch.float64), None
        if self.init == "pca":
            u, s, vt = torch.linalg.svd(Xd, full_matrices=False)
            R = torch.eye(K, dtype=torch.float64) if restart == 0 else \
                random_orthogonal(K, generator)
            return u[:, :K] * math.sqrt(n) @ R, (vt[:K].T * (s[:K] / math.sqrt(n))) @ R
        from sklearn.decomposition import FastICA  # fastica: an opt-in warm start
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ica = FastICA(K, whiten="unit-variance", random_state=seed % (2**32), max_iter=1000)
            mu = torch.from_numpy(ica.fit_transform(Xd.numpy()))
        return mu, torch.linalg.lstsq(mu, Xd).solution.T

    def start_at(self, model: HalfVAE, Xw: torch.Tensor, mu: torch.Tensor, W, generator) -> None:
        """Write the starting point into the table and, where the decoder has a linear part, W
        into it."""
        with torch.no_grad():
            model.latents.mu.copy_(mu.to(model.latents.mu))
            if W is not None:
                self.set_linear_start(model.decoder, W)

    def set_linear_start(self, decoder: nn.Module, W: torch.Tensor) -> None:
        """Start the decoder's linear part at W (the MLP decoder has none: it keeps its draw)."""

    def make_optimizers(self, model: HalfVAE) -> list:
        """[table optimizer, the rest's Adam]; with the fused table only [the rest's Adam] (the
        table's optimizer lives in the model, model.latents.table_optimizer)."""
        table = list(model.latents.parameters())
        rest = [dict(params=list(model.decoder.parameters())
                     + [p for p in model.likelihood.parameters()], lr=self.learning_rate),
                dict(params=list(model.prior.parameters()), lr=self.learning_rate)]
        if self.fused_table:
            return [torch.optim.Adam(rest)]
        if model.latents.sparse:
            opt_table = torch.optim.SparseAdam(table, lr=self.table_learning_rate)
        else:
            opt_table = torch.optim.Adam(table, lr=self.table_learning_rate)
        return [opt_table, torch.optim.Adam(rest)]

    def start(self, Xw: torch.Tensor, restart: int, seed: int, device, u=None) -> LiveRestart:
        """Build and initialize restart ``restart`` (its generator seeded with ``seed``); u: the
        segment of every row (a conditional prior), or None."""
        g = torch.Generator(device=device).manual_seed(seed)
        model = self.build_model(Xw.shape[0], Xw.shape[1], device)
        self.initialize(model, Xw, restart, seed, g)
        if u is not None:
            self.initialize_prior(model, u)
        return LiveRestart(model, self.make_optimizers(model), g, [])

    def initialize_prior(self, model: HalfVAE, u: torch.Tensor) -> None:
        """A conditional prior starts at the per-segment moments of the starting latent means
        (GMMPrior.match_moments_): with per-segment source means a prior held at mean 0 through
        the warm-up would pull every segment's rows toward 0."""
        model.prior.match_moments_(model.latents.mu, u)

    def restore(self, model_state: dict, optimizer_states: list, generator_state: torch.Tensor,
                history, Xw: torch.Tensor, device) -> LiveRestart:
        """A restart continued from saved states."""
        model = self.build_model(Xw.shape[0], Xw.shape[1], device)
        model.load_state_dict(model_state)
        opts = self.make_optimizers(model)
        for opt, sd in zip(opts, optimizer_states):
            opt.load_state_dict(sd)
        g = torch.Generator(device=device)
        g.set_state(generator_state.cpu())
        return LiveRestart(model, opts, g, list(history))

    def set_learning_rates(self, model: HalfVAE, optimizers: list, factor: float) -> None:
        """The rates of an epoch: each base rate times the schedule's ``factor``."""
        if self.fused_table:
            model.latents.table_optimizer.lr = self.table_learning_rate * factor
        else:
            optimizers[0].param_groups[0]["lr"] = self.table_learning_rate * factor
        for group in optimizers[-1].param_groups:
            group["lr"] = self.learning_rate * factor

    def batch_elbo_terms(self, model: HalfVAE, x: torch.Tensor, idx, generator, u=None):
        """(log-likelihood, KL) per row of the batch x (rows idx of the data; None: all); u: the
        segments of those rows (a conditional prior) or None."""
        return model.elbo_terms(x, idx, generator=generator, u=u)

    def epoch(self, model: HalfVAE, optimizers: list, Xw: torch.Tensor,
              generator: torch.Generator, epoch: int, u=None) -> float:
        """One pass over the data (epoch ``epoch`` of the schedule); returns the epoch's mean
        one-draw ELBO per sample. u: the segment of every row of Xw (a conditional prior)."""
        set_prior_trainable(model.prior,
                            epoch < prior_warmup_epochs(self.prior_warmup, self.max_iter))
        self.set_learning_rates(model, optimizers, lr_factor(epoch, self.max_iter, self.lr_decay))
        if self.noise_schedule is not None:
            std = noise_schedule_std(epoch, self.max_iter, *self.noise_schedule)
            model.likelihood.logvar.fill_(2.0 * math.log(std))
        n = Xw.shape[0]
        if not self.mini_batches(n):
            batches = [None]
        else:
            perm = torch.randperm(n, generator=generator, device=generator.device)
            batches = list(torch.split(perm.to(Xw.device), self.batch_size))
        total = 0.0
        for idx in batches:
            x = Xw if idx is None else Xw.index_select(0, idx)
            ub = u if u is None or idx is None else u.index_select(0, idx)
            ll, kl = self.batch_elbo_terms(model, x, idx, generator, ub)
            elbo = ll - kl
            loss = -elbo.mean()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            total += float(elbo.detach().sum())
        if u is not None and epoch + 1 in self.realign_epochs():
            realign_latents(model, u)
        return total / n

    def realign_epochs(self) -> set:
        """Epochs after which the latents are realigned (:func:`realign_latents`), when the
        posterior is full and the conditional prior one Gaussian per segment (else none): every
        twentieth of the epochs through the prior warm-up (while the noise is large and the
        table moves most), then half way (where the noise starts to fall) and after the last."""
        if self.posterior_covariance != "full" or self.n_groups < 2 or self.n_mixture != 1:
            return set()
        T = self.max_iter
        warmup, every = prior_warmup_epochs(self.prior_warmup, T), max(T // 20, 1)
        return (set(range(every, warmup + 1, every)) | {warmup, T // 2, T}) - {0}

    def converged(self, history: list) -> bool:
        """Whether a restart with this per-epoch ELBO history may stop before max_iter (the
        gradient recipes always run max_iter epochs: their schedules are laid out over it)."""
        return False

    def final_elbo(self, model: HalfVAE, Xw: torch.Tensor, seed: int, u=None) -> float:
        """The restart's score: the ELBO per sample; -inf if not finite."""
        return final_elbo(model, Xw, seed, self.n_eval_samples, u)

    def sources(self, model: HalfVAE, Xw: torch.Tensor, train: torch.Tensor | None,
                n_steps: int, u=None) -> np.ndarray:
        """The estimator's transform of whitened rows Xw [m, dw] (float64), each row's from that
        row alone: here the posterior mode (:func:`posterior_mode`, ``n_steps`` steps, in
        float64 with copies of the trained decoder, noise and prior) from the posterior mean of
        the nearest of the training rows ``train`` [n, dw]; u: the rows' segment codes or None."""
        train = train.double()
        # Pairwise distances computed per pair (no matrix product), so that a row's nearest
        # training row does not depend on the rows it is batched with.
        nearest = torch.cat([torch.cdist(chunk, train,
                                         compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
                             for chunk in torch.split(Xw, 256)]) if Xw.shape[0] else \
            torch.zeros(0, dtype=torch.int64, device=Xw.device)
        z0 = model.latents.mu.detach()[nearest].double()
        frozen = types.SimpleNamespace(decoder=copy.deepcopy(model.decoder).double(),
                                       prior=copy.deepcopy(model.prior).double(),
                                       likelihood=copy.deepcopy(model.likelihood).double())
        with torch.enable_grad():
            return posterior_mode(frozen, Xw, z0, n_steps, u=u).cpu().numpy()


@dataclass(frozen=True)
class LinearRecipe(Recipe):
    """The linear decoder x = W z (no bias): X whitened to K dimensions, W started at the PCA
    (or FastICA) map, ``transform`` the unmixing."""
    decoder: str = "linear"
    whitens_all_dimensions: ClassVar[bool] = False
    transform_kind: ClassVar[str] = "unmixing"

    def linear_part(self, model: HalfVAE) -> torch.Tensor:
        return model.decoder.weight

    def set_linear_start(self, decoder: nn.Module, W: torch.Tensor) -> None:
        decoder.weight.copy_(W.to(decoder.weight))


@dataclass(frozen=True)
class ResidualRecipe(Recipe):
    """The residual decoder x = W z + mlp(z): the correction starts at zero and W at the linear
    start, so training starts from the linear model."""
    decoder: str = "residual"

    def reset_decoder(self, decoder: nn.Module) -> None:
        decoder.zero_correction_()

    def set_linear_start(self, decoder: nn.Module, W: torch.Tensor) -> None:
        decoder.linear.weight.copy_(W.to(decoder.linear.weight))


# The flow's recipes and the registry of recipes by decoder name live in their own modules
# (they import this one); their old names here still work.
_MOVED = {"FlowRecipe": "flow_recipe", "FlowOrLinearRecipe": "flow_recipe",
          "FLOW_BATCH_SIZE": "flow_recipe", "RECIPES": "run_parameters",
          "recipe_for": "run_parameters", "resolve_decoder": "run_parameters",
          "training_parameters": "run_parameters", "recipe_from_parameters": "run_parameters",
          "ADDED_PARAMETER_DEFAULTS": "run_parameters", "NON_TRAINING_PARAMETERS": "run_parameters"}


def __getattr__(name):
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
