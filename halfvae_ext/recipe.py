"""The Half-VAE ICA training recipe, one restart at a time (benchmarks/ICA_EXPERIMENTS.md has the
experiments behind every choice).

- The model starts at the data: latent means at the whitened PCA scores (``init="pca"``; restarts
  >= 1 randomly rotated), the decoder set so that decode(mu) reproduces the data; observation
  noise and posterior std start at ``INIT_NOISE_STD`` (a noise std of 1 lets the noise explain
  everything: posterior collapse).
- Prior warm-up: for the first ``prior_warmup`` fraction of the epochs the GMM components keep
  their positions and weights and only their variances learn (a free 3-component mixture fits the
  marginal of two mixed sub-Gaussian sources well enough to keep them mixed). A conditional prior
  (segments u) first moves each segment's mixtures to the moments of that segment's starting
  latent means, so the positions it keeps are the data's.
- Adam, a larger rate for the latent table; both rates decay along a half cosine over the last
  ``lr_decay`` fraction of the epochs (``lr_factor``), which settles the table rows.
- A noise schedule ``noise=(start, end)``: the observation noise std is held at ``start`` for the
  first half of the epochs, then falls geometrically to ``end`` at the last epoch. A large noise
  lets the table rows and the decoder move together (a small one holds every row in place); the
  small end makes the fit, and so the posterior means, precise.
- With segments u, a full posterior (``posterior_covariance="full"``) and one Gaussian per segment,
  the latents are realigned (``realign_latents``) every twentieth of the epochs through the prior
  warm-up, half way and at the end: the linear change of latent coordinates that maximizes the conditional prior's
  likelihood, taken by table, decoder and prior together.
- The invertible decoder (``decoder="flow"``, :class:`~halfvae_ext.models.FlowDecoder`): each
  row's optimal posterior at zero noise is the point h(x_n) (h the decoder's inverse), so the
  table is not trained by gradient: it is held at h(x) and the decoder and prior are trained on
  the ELBO's zero-noise limit, the exact log-likelihood (``HalfVAE.flow_log_likelihood``), in
  mini-batches of ``FLOW_BATCH_SIZE`` rows; no warm-up (the prior learns from the start), no
  noise, no realignment (the couplings can write any change of coordinates).
- Restarts are compared by the final ELBO (``final_elbo``; the flow decoder: the final
  log-likelihood), never by ground truth.

:class:`Recipe` holds the settings and builds, initializes and trains a model; the VAE baseline
in :mod:`halfvae_ext.experiments` is a subclass (``VAERecipe``: its own model, initialization and
optimizer, through the methods of those names, ``set_learning_rates`` and ``batch_elbo_terms``)
and uses the helpers around it (seeds, initialization helpers, schedule, final ELBO).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .models import FlowDecoder, GMMPrior, HalfVAE, ResidualDecoder, random_orthogonal

__all__ = ["INIT_NOISE_STD", "Recipe", "LiveRestart", "restart_seeds", "random_orthogonal",
           "reset_parameters", "torch_threads", "lr_factor", "prior_warmup_epochs",
           "set_prior_trainable", "noise_schedule_std", "final_elbo", "elbo_change",
           "posterior_mode", "joint_diagonalizer", "realign_latents"]

# Noise std of the likelihood (and posterior std of the table) at the start, in whitened units.
INIT_NOISE_STD = 0.1


# ----------------------------------------------------------------------------- shared helpers
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
    last epoch. (Annealing over the last half or the last 30% did equally well on the
    nonstationary benchmark's dev seed, over the last 80% worse: ICA_EXPERIMENTS.md section 15.)"""
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


# ----------------------------------------------------------------------------- one restart
def joint_diagonalizer(mu: torch.Tensor, cov: torch.Tensor, u: torch.Tensor,
                       max_iter: int = 100) -> torch.Tensor:
    """W [K, K] maximizing the expected log-density of W z under independent Gaussians per
    segment, sum_n E_q log N(W z_n; m_u, diag(v_u)) + n log|det W| with m, v at their optimum:
    minimizes sum_g (n_g / n) sum_k log (W C_g W^T)_kk - 2 log|det W|, C_g the covariance of
    z in segment g (posterior means mu [n, K] plus posterior covariances cov [n, K, K]), by
    L-BFGS from the identity. This is the likelihood of Pham and Cardoso's nonstationary
    separation, here applied to Half-VAE's own latents, not to the data."""
    mu, cov, u = mu.double().cpu(), cov.double().cpu(), u.long().cpu()
    G, K = int(u.max()) + 1, mu.shape[1]
    count = torch.bincount(u, minlength=G).double()
    keep = count > 1
    mean = torch.zeros(G, K, dtype=torch.float64).index_add_(0, u, mu)
    second = torch.zeros(G, K * K, dtype=torch.float64).index_add_(
        0, u, (mu[:, :, None] * mu[:, None, :] + cov).reshape(-1, K * K)).view(G, K, K)
    mean, second, count = mean[keep], second[keep], count[keep]
    mean = mean / count[:, None]
    C = second / count[:, None, None] - mean[:, :, None] * mean[:, None, :]
    w = count / count.sum()
    W = torch.eye(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def objective():
        opt.zero_grad()
        D = torch.einsum("ij,gjk,lk->gil", W, C, W).diagonal(dim1=1, dim2=2)
        loss = (w[:, None] * D.log()).sum() - 2 * torch.linalg.slogdet(W)[1]
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    W = W.detach()
    return W if torch.isfinite(W).all() else torch.eye(K, dtype=torch.float64)


@torch.no_grad()
def realign_latents(model: HalfVAE, u: torch.Tensor) -> torch.Tensor:
    """Move the latents to z' = W z (W: :func:`joint_diagonalizer`) and the model with them, so
    that nothing but the prior term of the ELBO changes, and that one for the better: the table's
    means and full covariances transform exactly (L' = chol(W L L^T W^T)), the decoder's first
    linear maps take W^-1 (the decoded means are the same), the entropy gains log|det W|, and
    each segment's Gaussian prior is set to its maximum-likelihood mean and variance. Needs a
    full posterior (a diagonal one cannot carry W's rotation exactly: its entropy would pay for
    it) and one prior component (the criterion is Gaussian). Gradient steps are slowest along
    exactly these joint moves of table and decoder (ICA_EXPERIMENTS.md section 13); this takes
    them in one step. Returns W."""
    lat = model.latents
    if getattr(lat, "covariance", "diagonal") != "full":
        raise ValueError("realign_latents needs a full posterior (LatentTable(covariance='full'))")
    mu = lat.mu.detach()
    K = mu.shape[1]
    L = lat.scale_tril().detach()
    cov = L @ L.transpose(1, 2)
    W = joint_diagonalizer(mu, cov, u)  # float64, on the CPU
    Wt, W_inv = W.to(mu), torch.linalg.inv(W).to(mu)
    mu_new = mu @ Wt.T
    cov_new = (Wt @ cov @ Wt.T).double()
    L_new = torch.linalg.cholesky(
        cov_new + 1e-12 * torch.eye(K, dtype=torch.float64, device=mu.device))
    r, c = torch.tril_indices(K, K, -1, device=mu.device)
    lat.mu.copy_(mu_new)
    lat.logvar.copy_(2 * L_new.diagonal(dim1=1, dim2=2).log().to(mu))
    lat.scale_tril_offdiag.copy_(L_new[:, r, c].to(mu))
    for layer in _first_linear_maps(model.decoder):
        layer.weight.copy_(layer.weight @ W_inv)
    ul = u.long().cpu()
    G = model.prior.num_groups
    count = torch.bincount(ul, minlength=G).double()[:, None].clamp_min(1)
    m = torch.zeros(G, K, dtype=torch.float64).index_add_(0, ul, mu_new.double().cpu()) / count
    s2 = torch.zeros(G, K, dtype=torch.float64).index_add_(
        0, ul, (mu_new.double() ** 2 + cov_new.diagonal(dim1=1, dim2=2)).cpu()) / count
    has_rows = torch.bincount(ul, minlength=G)[:, None].expand(G, K) > 0
    prior = model.prior
    means = torch.where(has_rows, m, prior.means[..., 0].double().cpu())
    logvars = torch.where(has_rows, (s2 - m * m).clamp_min(1e-6).log(),
                          prior.logvars[..., 0].double().cpu())
    prior.means.copy_(means[..., None].to(prior.means))
    prior.logvars.copy_(logvars[..., None].to(prior.logvars))
    return W


def _first_linear_maps(decoder: nn.Module) -> list:
    """The linear maps that read z first in our decoders (nn.Linear; ResidualDecoder: its linear
    part and its MLP's first layer; an MLP: its first layer)."""
    if isinstance(decoder, nn.Linear):
        return [decoder]
    if isinstance(decoder, ResidualDecoder):
        return [decoder.linear, decoder.mlp[0]]
    if isinstance(decoder, nn.Sequential) and isinstance(decoder[0], nn.Linear):
        return [decoder[0]]
    raise ValueError(f"cannot realign the latents of a {type(decoder).__name__} decoder")


# Rows per step of a flow decoder's fit when batch_size is None: a full-batch step per epoch is
# too few steps for the couplings (the iVAE simulation's 40,000 rows: 40 steps an epoch).
FLOW_BATCH_SIZE = 1000


@dataclass
class LiveRestart:
    """A restart in progress: its model, optimizers, random stream and per-epoch ELBO."""
    model: HalfVAE
    optimizers: list
    generator: torch.Generator
    history: list = field(default_factory=list)


# HalfVAEICA's table_optimizer values that step the table inside the backward: (LatentTable's
# fused_optimizer, state_dtype).
FUSED_TABLE_OPTIMIZERS = {"fused": ("adam", None), "rowwise_adam": ("rowwise_adam", None),
                          "rowwise_adam_bf16": ("rowwise_adam", torch.bfloat16),
                          "rowwise_adagrad": ("rowwise_adagrad", None)}


@dataclass(frozen=True)
class Recipe:
    """Settings of one training restart (the HalfVAEICA parameters of the same names) and the
    steps that use them."""
    n_components: int
    n_mixture: int = 3
    decoder: str = "linear"
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

    @property
    def flow(self) -> bool:
        """True for the invertible decoder, whose table is held at the decoder's inverse."""
        return self.decoder == "flow"

    def mini_batches(self, n_rows: int) -> bool:
        """True if an epoch is several steps (a batch_size below n_rows)."""
        return self.batch_size is not None and self.batch_size < n_rows

    def build_model(self, n_rows: int, data_dim: int, device) -> HalfVAE:
        """A HalfVAE for n_rows rows of data_dim whitened features, not yet initialized."""
        prior = GMMPrior(self.n_components, self.n_mixture, num_groups=self.n_groups)
        noise = self.initial_noise
        init_lv = 2.0 * math.log(INIT_NOISE_STD if noise == "learned" else min(float(noise), 1.0))
        table_kind, state_dtype = FUSED_TABLE_OPTIMIZERS.get(self.table_optimizer, (None, None))
        model = HalfVAE(n_rows, data_dim, self.n_components, decoder=self.decoder, prior=prior,
                        hidden=self.hidden, activation=self.activation, noise=noise,
                        init_mu=torch.zeros(n_rows, self.n_components), init_logvar=init_lv,
                        init_noise_std=INIT_NOISE_STD,
                        sparse=self.mini_batches(n_rows) and not self.fused_table,
                        table_optimizer=table_kind, table_state_dtype=state_dtype,
                        table_lr=self.table_learning_rate, kl=self.kl,
                        posterior_covariance=self.posterior_covariance)
        return model.to(device)

    def initialize(self, model: HalfVAE, Xw: torch.Tensor, restart: int, seed: int,
                   generator: torch.Generator) -> None:
        """Set the latent means and decoder of a fresh restart (draws from ``generator``)."""
        n, dw = Xw.shape
        K = self.n_components
        Xd = Xw.detach().cpu().double()
        reset_parameters(model.decoder, generator)
        residual = isinstance(model.decoder, ResidualDecoder)
        if residual:
            model.decoder.zero_correction_()
        if self.init == "random":
            mu = torch.randn(n, K, generator=generator, dtype=torch.float64)
            W = None  # keep the random decoder
        elif self.init == "pca":
            u, s, vt = torch.linalg.svd(Xd, full_matrices=False)
            R = torch.eye(K, dtype=torch.float64) if restart == 0 else \
                random_orthogonal(K, generator)
            mu = u[:, :K] * math.sqrt(n) @ R
            W = (vt[:K].T * (s[:K] / math.sqrt(n))) @ R
        else:  # fastica (opt-in warm start)
            from sklearn.decomposition import FastICA
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ica = FastICA(K, whiten="unit-variance", random_state=seed % (2**32),
                              max_iter=1000)
                mu = torch.from_numpy(ica.fit_transform(Xd.numpy()))
            W = torch.linalg.lstsq(mu, Xd).solution.T
        if isinstance(model.decoder, FlowDecoder):
            unmixing = random_orthogonal(K, generator) if W is None else torch.linalg.inv(W)
            model.decoder.start_(unmixing.to(model.latents.mu), generator)
            self.hold_table_at_inverse(model, Xw)
            return
        with torch.no_grad():
            model.latents.mu.copy_(mu.to(model.latents.mu))
            if W is not None and isinstance(model.decoder, nn.Linear):
                model.decoder.weight.copy_(W.to(model.decoder.weight))
            elif W is not None and residual:
                model.decoder.linear.weight.copy_(W.to(model.decoder.linear.weight))

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
        (GMMPrior.match_moments_): with per-segment source means (iVAE's "uncentered" sources) a
        prior held at mean 0 through the warm-up pulls every segment's rows toward 0."""
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

    @staticmethod
    @torch.no_grad()
    def hold_table_at_inverse(model: HalfVAE, Xw: torch.Tensor) -> None:
        """A flow decoder's table: every row's latent mean at h(x_n), its optimum at zero noise."""
        model.latents.mu.copy_(model.decoder.inverse(Xw)[0])

    def flow_epoch(self, model: HalfVAE, optimizers: list, Xw: torch.Tensor,
                   generator: torch.Generator, epoch: int, u=None) -> float:
        """One pass of the flow decoder's fit: Adam steps on the mean log-likelihood of
        mini-batches (after the last epoch, the table at the decoder's inverse); returns the
        epoch's mean log-likelihood per sample."""
        set_prior_trainable(model.prior, False)
        self.set_learning_rates(model, optimizers, lr_factor(epoch, self.max_iter, self.lr_decay))
        n = Xw.shape[0]
        perm = torch.randperm(n, generator=generator, device=generator.device).to(Xw.device)
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

    def epoch(self, model: HalfVAE, optimizers: list, Xw: torch.Tensor,
              generator: torch.Generator, epoch: int, u=None) -> float:
        """One pass over the data (epoch ``epoch`` of the schedule); returns the epoch's mean
        one-draw ELBO per sample (the flow decoder: :meth:`flow_epoch`'s log-likelihood). u: the
        segment of every row of Xw (a conditional prior)."""
        if self.flow:
            return self.flow_epoch(model, optimizers, Xw, generator, epoch, u)
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
        table moves most), then half way (where the noise starts to fall) and after the last.
        Each is a step up the ELBO in the direction gradient steps are slowest in; realigning
        through the warm-up rather than once at its end did better in 19 of 22 comparisons
        (ICA_EXPERIMENTS.md section 19)."""
        if self.posterior_covariance != "full" or self.n_groups < 2 or self.n_mixture != 1 \
                or self.flow:
            return set()
        T = self.max_iter
        warmup, every = prior_warmup_epochs(self.prior_warmup, T), max(T // 20, 1)
        return (set(range(every, warmup + 1, every)) | {warmup, T // 2, T}) - {0}

    def final_elbo(self, model: HalfVAE, Xw: torch.Tensor, seed: int, u=None) -> float:
        """The restart's score: the ELBO per sample (the flow decoder: its exact
        log-likelihood per sample, deterministic); -inf if not finite."""
        if not self.flow:
            return final_elbo(model, Xw, seed, self.n_eval_samples, u)
        with torch.no_grad():
            value = float(model.flow_log_likelihood(Xw, u)[0].mean())
        return value if math.isfinite(value) else -math.inf
