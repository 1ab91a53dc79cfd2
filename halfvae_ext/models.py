"""Half-VAE modules (arXiv 2409.04140): a VAE with no encoder, and the VAE baseline with one.

- :class:`GMMPrior`: one trainable 1-D Gaussian mixture per latent dimension, p(z) = prod_k p_k(z_k);
  with ``num_groups`` U > 1 one mixture per group and dimension, p(z | u) = prod_k p_uk(z_k)
  (a conditional prior: the group u of a data point is a segment, a batch, a class).
- :class:`LatentTable`: the amortization-free posterior q(z_n) = N(mu[n], diag(exp(logvar[n]))),
  one trainable row per data point.
- :class:`HalfVAE`: latent table + prior + decoder + Gaussian likelihood; per-sample negative ELBO
  with the fused op ``halfvae_ext.reparam_gmm_kl`` (reparameterized z and the Monte-Carlo KL, or
  its closed-form upper bound with ``kl="bound"``).
- :class:`VAE`: the same prior, decoder and likelihood with an MLP encoder x -> (mu, logvar).

All the negative ELBOs are per sample ([B]) and include every constant, so ``-negative_elbo`` is a
genuine lower bound of log p(x) (in nats, for the Gaussian likelihood, a density); with
``kl="bound"`` too, since the bound is above the KL.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import gmm_log_prob, reparam_gmm_kl, reparam_gmm_kl_rows
from .table_memory import empty_record_table, empty_table, record_views
from .table_optim import ROWWISE, FusedRowOptimizer, check_fused_optimizer, fused_rows_kl

__all__ = ["GMMPrior", "LatentTable", "HalfVAE", "VAE", "ResidualDecoder", "FlowDecoder",
           "make_mlp", "random_orthogonal", "elbo_terms", "ACTIVATIONS", "DECODERS", "RECON_ESTIMATORS", "KL_ESTIMATORS"]

LOG_2PI = math.log(2.0 * math.pi)
KL_ESTIMATORS = ("mc", "bound")

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


# ----------------------------------------------------------------------------- helpers
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


def random_orthogonal(k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random k x k rotation (float64) drawn from ``generator``."""
    q, r = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def make_mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (64, 64),
             activation: str = "relu") -> nn.Sequential:
    """Linear -> activation -> ... -> Linear; ``hidden`` are the hidden widths (may be empty)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    widths = (_check_pos_int("in_dim", in_dim), *_check_hidden(hidden),
              _check_pos_int("out_dim", out_dim))
    layers = []
    for i in range(len(widths) - 1):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


class ResidualDecoder(nn.Module):
    """x = W z + mlp(z): a linear mixing (no bias) plus a nonlinear correction.

    The MLP's output layer starts at zero, so the decoder starts as exactly the linear model and
    can be initialized like it (``linear.weight``); training then learns the nonlinear part. For
    nonlinear ICA this starts from a linear solution instead of a random map.
    """

    def __init__(self, latent_dim: int, data_dim: int, hidden=(32,), activation="leaky_relu"):
        super().__init__()
        self.linear = nn.Linear(latent_dim, data_dim, bias=False)
        self.mlp = make_mlp(latent_dim, data_dim, hidden, activation)
        self.zero_correction_()

    @torch.no_grad()
    def zero_correction_(self):
        """Set the MLP's output layer to zero: the decoder becomes its linear part."""
        self.mlp[-1].weight.zero_()
        self.mlp[-1].bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z) + self.mlp(z)


class _InvertibleLinear(nn.Module):
    """y = x A^T + b with a square A, and log|det A| (one value for every row)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor):
        return x @ self.weight.T + self.bias, torch.linalg.slogdet(self.weight)[1]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.weight, (y - self.bias).T).T


class _AffineCoupling(nn.Module):
    """RealNVP's affine coupling: the coordinates where ``mask`` is 1 pass through and condition
    an MLP that scales and shifts the others, y_B = x_B * exp(s(x_A)) + t(x_A). The log-scale is
    bounded (tanh) so that no step can blow up; the MLP's output layer starts at zero (identity)."""

    def __init__(self, dim: int, mask: torch.Tensor, hidden, activation):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = make_mlp(dim, 2 * dim, hidden, activation)
        self.zero_()

    @torch.no_grad()
    def zero_(self):
        self.net[-1].weight.zero_()
        self.net[-1].bias.zero_()

    def _scale_shift(self, x_pass: torch.Tensor):
        s, t = self.net(x_pass).chunk(2, dim=-1)
        keep = 1.0 - self.mask
        return torch.tanh(s) * keep, t * keep

    def forward(self, x: torch.Tensor):
        s, t = self._scale_shift(x * self.mask)
        return x * torch.exp(s) + t, s.sum(dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._scale_shift(y * self.mask)  # the passed coordinates are unchanged
        return (y - t) * torch.exp(-s)


class FlowDecoder(nn.Module):
    """An invertible decoder x = g(z) of R^K (data_dim must equal latent_dim), written through its
    inverse h = g^-1: a linear map (the unmixing), then ``n_blocks`` of [affine coupling with an
    MLP of ``hidden`` widths, linear map]. Both directions are exact and h comes with
    log|det dh/dx|, so with a flow decoder a row's optimal posterior at zero noise is the point
    h(x_n) and the ELBO's zero-noise limit is the model's exact log-likelihood
    log p(h(x) | u) + log|det dh/dx| (:meth:`HalfVAE.flow_log_likelihood`): the recipe trains
    that, with the latent table at h(x). The couplings start at the identity, so the decoder
    starts as the linear map its first map's inverse.
    """

    def __init__(self, dim: int, hidden=(64, 64), activation="leaky_relu", n_blocks: int = 8):
        super().__init__()
        dim = _check_pos_int("dim", dim)
        n_blocks = _check_pos_int("n_blocks", n_blocks)
        steps = [_InvertibleLinear(dim)]
        for i in range(n_blocks):
            mask = (torch.arange(dim) % 2 == i % 2).float()
            steps += [_AffineCoupling(dim, mask, hidden, activation), _InvertibleLinear(dim)]
        self.steps = nn.ModuleList(steps)

    @property
    def unmixing(self) -> _InvertibleLinear:
        """The first map of h (x -> z): the decoder's linear start."""
        return self.steps[0]

    @torch.no_grad()
    def start_(self, unmixing: torch.Tensor, generator: torch.Generator | None = None):
        """Start as the linear decoder ``unmixing``^-1 (h(x) = unmixing @ x): the couplings at the
        identity, the maps after them Haar-random rotations (drawn from ``generator``) so that
        each coupling sees other coordinates, and the first map ``unmixing`` with those
        rotations undone."""
        rotations = torch.eye(unmixing.shape[0], dtype=torch.float64)
        for step in self.steps[1:]:
            if isinstance(step, _AffineCoupling):
                step.zero_()
                continue
            q = random_orthogonal(step.weight.shape[0], generator)
            step.weight.copy_(q)
            step.bias.zero_()
            rotations = q @ rotations
        self.unmixing.weight.copy_(rotations.T @ unmixing.double())
        self.unmixing.bias.zero_()

    def inverse(self, x: torch.Tensor):
        """(z = h(x) [B, K], log|det dh/dx| [B])."""
        logdet = x.new_zeros(x.shape[:-1])
        for step in self.steps:
            x, ld = step(x)
            logdet = logdet + ld
        return x, logdet

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z


DECODERS = ("linear", "mlp", "residual", "flow")


def _build_decoder(decoder, latent_dim, data_dim, hidden, activation) -> nn.Module:
    if isinstance(decoder, nn.Module):
        return decoder
    if decoder == "linear":
        # No bias: the ICA model x = A s on centered data; a GMM prior's means carry any offset.
        return nn.Linear(latent_dim, data_dim, bias=False)
    if decoder == "mlp":
        return make_mlp(latent_dim, data_dim, hidden, activation)
    if decoder == "residual":
        return ResidualDecoder(latent_dim, data_dim, hidden, activation)
    if decoder == "flow":
        if data_dim != latent_dim:
            raise ValueError(f"decoder='flow' is invertible, so it needs data_dim == latent_dim, "
                             f"got data_dim={data_dim} and latent_dim={latent_dim}")
        return FlowDecoder(latent_dim, hidden, activation)
    raise ValueError(f"decoder must be 'linear', 'mlp', 'residual', 'flow' or an nn.Module, "
                     f"got {decoder!r}")


class _GaussianLikelihood(nn.Module):
    """log N(x; x_mean, diag(exp(logvar))) summed over features, with a learned per-feature
    log-variance (``noise="learned"``) or a fixed noise standard deviation (``noise=float``)."""

    def __init__(self, data_dim: int, noise="learned", init_noise_std: float = 1.0,
                 min_logvar: float = -12.0):
        super().__init__()
        if isinstance(noise, str):
            if noise != "learned":
                raise ValueError(f"noise must be 'learned' or a positive float, got {noise!r}")
            self.logvar = nn.Parameter(torch.full((data_dim,), 2.0 * math.log(init_noise_std)))
            self.learned = True
        elif isinstance(noise, Real) and not isinstance(noise, bool) and math.isfinite(noise) \
                and noise > 0:
            self.register_buffer("logvar", torch.full((data_dim,), 2.0 * math.log(noise)))
            self.learned = False
        else:
            raise ValueError(f"noise must be 'learned' or a positive float (the noise standard "
                             f"deviation), got {noise!r}")
        self.min_logvar = float(min_logvar)

    def effective_logvar(self) -> torch.Tensor:
        # A noiseless square problem drives the learned variance towards 0; the floor keeps the
        # objective finite (the ELBO stays bounded: the posterior variance shrinks with it).
        return self.logvar.clamp(min=self.min_logvar)

    def log_prob(self, x: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
        lv = self.effective_logvar()
        d = x - x_mean
        return -0.5 * (LOG_2PI + lv + d * d * torch.exp(-lv)).sum(dim=-1)

    def expected_log_prob_linear(self, x: torch.Tensor, linear: nn.Linear, mu: torch.Tensor,
                                 logvar: torch.Tensor,
                                 scale_tril: torch.Tensor | None = None) -> torch.Tensor:
        """E_{z ~ N(mu, diag(exp(logvar)))} log N(x; linear(z), diag(exp(self.logvar))), exactly:
        E||x - W z - b||^2_D = ||x - W mu - b||^2_D + sum_k (W^2)_dk exp(logvar_k) per feature d.
        scale_tril [B, K, K]: z ~ N(mu, L L^T) instead, and the second term is sum_k (W L)_dk^2."""
        lv = self.effective_logvar()
        d = x - linear(mu)
        if scale_tril is None:
            tr = torch.exp(logvar) @ (linear.weight * linear.weight).T
        else:
            WL = torch.matmul(linear.weight, scale_tril)  # [B, D, K]
            tr = (WL * WL).sum(-1)
        return -0.5 * (LOG_2PI + lv + (d * d + tr) * torch.exp(-lv)).sum(dim=-1)


# ----------------------------------------------------------------------------- prior
class GMMPrior(nn.Module):
    """Factorized prior p(z) = prod_k sum_c pi_kc N(z_k; m_kc, exp(v_kc)).

    Parameters ``logits`` (pi = softmax over c), ``means`` and ``logvars``, each [K, C]; with
    ``num_groups`` U > 1, each [U, K, C]: a conditional prior p(z | u) with its own mixture per
    group u and dimension k, and every method that evaluates it takes ``u``, the group (int in
    [0, U)) of each row. All groups start from the same initialization (plus ``jitter``).

    Initialization: equal weights, means spread evenly over ``[-spread, spread]`` and a common
    component variance chosen so that each p_k has unit variance (for C >= 2 this needs
    ``spread < sqrt(3 (C-1) / (C+1))``). The default ``spread=None`` puts 2/3 of the variance in
    the means, ``spread = sqrt(2 (C-1) / (C+1))``. For C = 3
    this is means ``[-1, 0, 1]``, std 0.577: overlapping components that make a flat-topped,
    sub-Gaussian density, a good start for sub-Gaussian sources (sine, square, sawtooth) and one the
    mixture can still turn super-Gaussian (means together, variances apart). ``jitter`` > 0 adds
    small random offsets to the means (from ``generator``), so latent dimensions do not start
    identical.
    """

    def __init__(self, num_latents: int, num_components: int = 3, *, num_groups: int = 1,
                 spread: float | None = None, jitter: float = 0.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        K = _check_pos_int("num_latents", num_latents)
        C = _check_pos_int("num_components", num_components)
        U = _check_pos_int("num_groups", num_groups)
        shape = (K, C) if U == 1 else (U, K, C)
        if C > 64:
            raise ValueError(f"num_components must be at most 64, got {C}")
        dtype = dtype or torch.get_default_dtype()
        if C == 1:
            means = torch.zeros(K, 1, dtype=torch.float64)
            comp_var = 1.0
        else:
            if spread is None:
                spread = math.sqrt(2.0 * (C - 1) / (C + 1))
            if not (isinstance(spread, Real) and 0 < spread):
                raise ValueError(f"spread must be a positive number, got {spread!r}")
            m = torch.linspace(-float(spread), float(spread), C, dtype=torch.float64)
            comp_var = 1.0 - float((m * m).mean())  # total variance = var(means) + comp_var = 1
            if comp_var <= 1e-3:
                raise ValueError(f"spread={spread} is too large for {C} components: the means "
                                 "alone would exceed unit variance")
            means = m.expand(K, C).clone()
        means = means.expand(shape).clone()
        if jitter:
            means = means + float(jitter) * torch.randn(shape, generator=generator,
                                                        dtype=torch.float64)
        self.logits = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.means = nn.Parameter(means.to(dtype))
        self.logvars = nn.Parameter(torch.full(shape, math.log(comp_var), dtype=dtype))

    @property
    def num_latents(self) -> int:
        return self.logits.shape[-2]

    @property
    def num_components(self) -> int:
        return self.logits.shape[-1]

    @property
    def num_groups(self) -> int:
        """U: the number of groups of a conditional prior, 1 for an unconditional one."""
        return self.logits.shape[0] if self.logits.dim() == 3 else 1

    @property
    def conditional(self) -> bool:
        """True when the parameters are [U, K, C] and evaluating the prior needs u."""
        return self.logits.dim() == 3

    @torch.no_grad()
    def match_moments_(self, z: torch.Tensor, u: torch.Tensor) -> None:
        """Shift and scale each group's mixtures so that the prior of group g, dimension k, has
        the mean and variance of z[u == g, k] (z [n, K], u [n] groups in [0, U)). The components
        keep their relative positions, widths and weights; a group without rows keeps its
        mixture. A conditional prior then starts where the latents start, not at N(0, 1) for
        every group (sources with per-segment means: ICA_EXPERIMENTS.md section 16)."""
        if not self.conditional:
            raise ValueError("match_moments_ is for a conditional prior (num_groups > 1)")
        U, K = self.num_groups, self.num_latents
        z = z.detach().to(torch.float64, copy=False).cpu()
        u = torch.as_tensor(u).long().cpu()
        if z.dim() != 2 or z.shape[1] != K or u.shape != (z.shape[0],):
            raise ValueError(f"z must be [n, {K}] and u [n], got {tuple(z.shape)} and "
                             f"{tuple(u.shape)}")
        count = torch.bincount(u, minlength=U).to(torch.float64)[:, None]  # [U, 1]
        mean = torch.zeros(U, K, dtype=torch.float64).index_add_(0, u, z) / count.clamp_min(1)
        second = torch.zeros(U, K, dtype=torch.float64).index_add_(0, u, z * z)
        var = (second / count.clamp_min(1) - mean * mean).clamp_min(1e-4)
        pi = torch.softmax(self.logits.double(), -1).cpu()
        m, lv = self.means.double().cpu(), self.logvars.double().cpu()
        m0 = (pi * m).sum(-1)  # each mixture's mean and variance [U, K]
        v0 = (pi * (lv.exp() + m * m)).sum(-1) - m0 * m0
        scale = (var / v0).sqrt()
        has_rows = (count > 0).expand(U, K)[..., None]
        new_means = torch.where(has_rows, mean[..., None] + scale[..., None] * (m - m0[..., None]),
                                m)
        new_logvars = torch.where(has_rows, lv + 2 * scale.log()[..., None], lv)
        self.means.copy_(new_means.to(self.means))
        self.logvars.copy_(new_logvars.to(self.logvars))

    def group_index(self, u, num_rows: int) -> torch.Tensor | None:
        """The ops' prior_index for ``num_rows`` rows of groups ``u`` (None for an unconditional
        prior, which takes no u). Raises ValueError naming u when it does not fit."""
        if not self.conditional:
            if u is not None:
                raise ValueError("u: this prior has no groups (num_groups=1); build it with "
                                 "GMMPrior(..., num_groups=U) to condition on u")
            return None
        if u is None:
            raise ValueError(f"u is required: the prior is conditional (num_groups="
                             f"{self.num_groups}); pass the group of every row")
        u = torch.as_tensor(u, device=self.logits.device)
        if u.dtype not in (torch.int64, torch.int32) or u.dim() != 1 or u.shape[0] != num_rows:
            raise ValueError(f"u must be a 1-D integer tensor with one group per row "
                             f"({num_rows}), got dtype {u.dtype} and shape {tuple(u.shape)}")
        # On the CPU the range is checked here, to name u. On a GPU, int(u.min()) would be one
        # more host synchronization per step: the op checks prior_index there, together with
        # idx in one synchronization (IndexError naming prior_index).
        if u.numel() and u.device.type == "cpu" and not (
                0 <= int(u.min()) and int(u.max()) < self.num_groups):
            raise ValueError(f"u values must be in [0, {self.num_groups}) (num_groups), got "
                             f"min {int(u.min())} and max {int(u.max())}")
        return u

    def log_prob(self, z: torch.Tensor, u=None) -> torch.Tensor:
        """log p_k(z[n, k]) (log p_{u[n], k} for a conditional prior): [N, K] (the fused kernel
        ``halfvae_ext.gmm_log_prob``)."""
        return gmm_log_prob(z, self.logits, self.means, self.logvars,
                            prior_index=self.group_index(u, z.shape[0] if z.dim() else 0))

    def weights(self) -> torch.Tensor:
        """Mixture weights pi, [K, C] ([U, K, C] for a conditional prior)."""
        return torch.softmax(self.logits, dim=-1)

    def mean(self) -> torch.Tensor:
        """E[z_k], [K] ([U, K])."""
        return (self.weights() * self.means).sum(-1)

    def variance(self) -> torch.Tensor:
        """Var[z_k], [K] ([U, K])."""
        w = self.weights()
        m = (w * self.means).sum(-1, keepdim=True)
        return (w * (torch.exp(self.logvars) + (self.means - m) ** 2)).sum(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, u=None) -> torch.Tensor:
        """n draws from p (row i from p(. | u[i]) for a conditional prior): [n, K]."""
        n = _check_pos_int("n", n, minimum=0)
        index = self.group_index(u, n)
        K, C = self.num_latents, self.num_components
        if n == 0:
            return self.means.new_empty((0, K))
        w = self.weights().detach()
        m, lv = self.means.detach(), self.logvars.detach()
        if index is not None:  # each row's own [K, C] tables
            w, m, lv = w[index].reshape(n * K, C), m[index], lv[index]
            comp = torch.multinomial(w, 1, generator=generator).view(n, K)
            rows = torch.arange(n, device=w.device).unsqueeze(1).expand(n, K)
            k = torch.arange(K, device=w.device).expand(n, K)
            m, s = m[rows, k, comp], torch.exp(0.5 * lv[rows, k, comp])
        else:
            comp = torch.multinomial(w, n, replacement=True, generator=generator).T  # [n, K]
            k = torch.arange(K, device=w.device).expand(n, K)
            m, s = m[k, comp], torch.exp(0.5 * lv[k, comp])
        eps = torch.randn(n, K, generator=generator, dtype=m.dtype, device=m.device)
        return m + s * eps

    def extra_repr(self) -> str:
        groups = f", num_groups={self.num_groups}" if self.conditional else ""
        return f"num_latents={self.num_latents}, num_components={self.num_components}{groups}"


# ----------------------------------------------------------------------------- latent table
class LatentTable(nn.Module):
    """q(z_n) = N(mu[n], diag(exp(logvar[n]))) for every data point n: parameters [N, K].

    ``forward(idx, prior)`` returns the fused op's reparameterized sample z [B, K] and Monte-Carlo
    KL [B] (``reduction="row"``) for rows ``idx`` (all rows for None); the rows are gathered inside
    the kernel (``reparam_gmm_kl_rows``), no [B, K] copy is made first. ``sample(idx, prior)``
    also returns the rows (mu[idx], logvar[idx]) for a likelihood that reads them. Both take
    ``u`` (the group of each row in idx, for a conditional prior) and ``kl`` ("mc" or "bound").

    Table gradients: dense [N, K] by default; ``sparse=True`` gives coalesced sparse COO gradients
    (for ``torch.optim.SparseAdam``/``SGD``: mini-batches leave other rows' optimizer state alone);
    ``fused_optimizer="adam"|"rowwise_adam"|"rowwise_adagrad"|"sgd"`` (with ``lr``, ``betas``,
    ``eps``, ``state_dtype``; the rules: :class:`~halfvae_ext.table_optim.FusedRowOptimizer`) runs
    the optimizer step inside the backward on the touched rows only: no gradient of the table is
    ever created, a step costs O(batch), and the optimizer state (``table_optimizer``, buffers) is
    part of state_dict. Leave mu/logvar out of any other optimizer in that mode.

    Memory: with the row-wise optimizers or bfloat16 moments (``state_dtype=torch.bfloat16``), a
    row's mu, logvar and optimizer state are one record of whole cache lines (mu, logvar and the
    state are views of it): K = 8 float32 with rowwise_adam and bfloat16 moments is 128 bytes a row,
    2 cache lines, where exact Adam takes 192 (3). ``bytes_per_row`` tells.

    ``covariance="full"``: q(z_n) = N(mu[n], L_n L_n^T) with L_n lower triangular, its diagonal
    exp(logvar[n] / 2) and its K (K - 1) / 2 entries below the diagonal a third table,
    ``scale_tril_offdiag`` [N, K (K - 1) / 2] (starting at 0: the diagonal posterior). A mean-field
    posterior pays, in its entropy, for every latent basis in which the decoder's Jacobian columns
    are not orthogonal (Hadamard's inequality), so it pulls the latents toward such a basis; a full
    one does not (benchmarks/ICA_EXPERIMENTS.md section 19). Its KL and sample are computed in
    PyTorch around the fused prior kernel (``gmm_log_prob``); not with a fused optimizer.
    """

    _INIT_BLOCK_ROWS = 1 << 16

    def __init__(self, num_rows: int, num_latents: int, *, init_mu: torch.Tensor | None = None,
                 init_logvar: float = -2.0, init_std: float = 1.0,
                 generator: torch.Generator | None = None, sparse: bool = False,
                 dtype: torch.dtype | None = None, fused_optimizer: str | None = None,
                 lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8,
                 state_dtype: torch.dtype | None = None, covariance: str = "diagonal"):
        super().__init__()
        N = _check_pos_int("num_rows", num_rows)
        K = _check_pos_int("num_latents", num_latents)
        self.covariance = _check_covariance(covariance)
        if covariance == "full" and fused_optimizer is not None:
            raise ValueError("covariance='full' is not available with a fused_optimizer (the fused "
                             "kernels step diagonal posteriors): pass fused_optimizer=None")
        if fused_optimizer is not None and sparse:
            raise ValueError("sparse: a table with a fused optimizer has no gradient at all; "
                             "pass sparse=False with fused_optimizer")
        dtype = dtype or torch.get_default_dtype()
        if fused_optimizer is None and state_dtype is not None:
            raise ValueError("state_dtype is the dtype of a fused optimizer's moments: pass "
                             "fused_optimizer too")
        if fused_optimizer is not None:
            check_fused_optimizer(fused_optimizer, dtype, state_dtype)
            state_dtype = state_dtype or dtype
        # Tables are filled in place (huge pages asked for first, see table_memory) and the random
        # start is drawn in blocks of rows, so that a 10^8-row table needs no full-size temporary.
        self._record = None
        views = None
        if _uses_record(fused_optimizer, dtype, state_dtype):
            # A row's table values and optimizer state in one record of whole cache lines
            # (table_memory.record_layout): a touched row costs 2 lines with compact state.
            self._record = empty_record_table(N, K, dtype, fused_optimizer, state_dtype)
            mu, logvar, *views = record_views(self._record, K, fused_optimizer, state_dtype)
        elif fused_optimizer is not None:
            # mu and logvar are the halves of one [N, 2, K] table: a touched row's mu and logvar
            # share a cache line (K = 8 float32), one DRAM access where there would be two. The
            # kernels take such row-strided views as they are.
            both = empty_table((N, 2, K), dtype=dtype)
            mu, logvar = both[:, 0], both[:, 1]
        else:
            mu, logvar = empty_table((N, K), dtype=dtype), empty_table((N, K), dtype=dtype)
        if init_mu is None:
            for r in range(0, N, self._INIT_BLOCK_ROWS):
                n = min(self._INIT_BLOCK_ROWS, N - r)
                mu[r:r + n] = init_std * torch.randn(n, K, generator=generator,
                                                     dtype=torch.float64)
        else:
            init_mu = torch.as_tensor(init_mu)
            if init_mu.shape != (N, K):
                raise ValueError(f"init_mu must have shape {(N, K)}, got {tuple(init_mu.shape)}")
            mu.copy_(init_mu)
        self.mu = nn.Parameter(mu)
        self.logvar = nn.Parameter(logvar.fill_(float(init_logvar)))
        if self.covariance == "full":
            self.scale_tril_offdiag = nn.Parameter(torch.zeros(N, K * (K - 1) // 2, dtype=dtype))
        self.sparse = bool(sparse)
        self.table_optimizer = (None if fused_optimizer is None else
                                FusedRowOptimizer(N, K, fused_optimizer, lr=lr, betas=betas,
                                                  eps=eps, dtype=dtype, state_dtype=state_dtype,
                                                  views=views))

    def _joint_table(self):
        """The [N, 2, K] table whose halves mu and logvar are (fused optimizer), else None."""
        mu, logvar = self.mu.detach(), self.logvar.detach()
        N, K = mu.shape
        if (self.table_optimizer is None or self._record is not None
                or mu.dtype != logvar.dtype or mu.device != logvar.device
                or mu.untyped_storage().data_ptr() != logvar.untyped_storage().data_ptr()
                or mu.stride() != (2 * K, 1) or logvar.stride() != (2 * K, 1)
                or logvar.storage_offset() != mu.storage_offset() + K):
            return None
        return mu.as_strided((N, 2, K), (2 * K, K, 1), mu.storage_offset())

    def _apply(self, fn, recurse=True):
        # Module.to/cuda/double/... convert every parameter and buffer on its own, which would copy
        # the views of one table (the halves of [N, 2, K], or a record's table and state) into
        # separate tensors. Convert the joint table once, or build the record anew, and make the
        # parameters and the optimizer's buffers its views again.
        if self._record is not None:
            return self._apply_to_record(fn, recurse)
        joint = self._joint_table()
        if joint is None:
            return super()._apply(fn, recurse)
        new = fn(joint)
        if new.shape != joint.shape:
            return super()._apply(fn, recurse)
        halves = {id(self.mu): new[:, 0], id(self.logvar): new[:, 1]}
        return super()._apply(lambda t: halves.get(id(t)) if id(t) in halves else fn(t), recurse)

    def _apply_to_record(self, fn, recurse):
        opt = self.table_optimizer
        probe = fn(self.mu.detach()[:0])  # where, and as what dtype, the table goes
        dtype = probe.dtype
        own = {id(t) for t in (self.mu, self.logvar, opt.state, opt.row_state) if t is not None}
        if dtype == self.mu.dtype and probe.device == self.mu.device:  # the record stays as it is
            return super()._apply(lambda t: t if id(t) in own else fn(t), recurse)
        state_dtype = dtype if opt.state_dtype == opt.table_dtype else opt.state_dtype
        check_fused_optimizer(opt.kind, dtype, state_dtype)
        record = empty_record_table(self.num_rows, self.num_latents, dtype, opt.kind, state_dtype,
                                    device=probe.device)
        new = record_views(record, self.num_latents, opt.kind, state_dtype)
        old = (self.mu, self.logvar, opt.state, opt.row_state)
        with torch.no_grad():
            for target, source in zip(new, old):
                if source is not None:
                    target.copy_(source)
        views = {id(t): v for t, v in zip(old, new) if t is not None}
        result = super()._apply(lambda t: views[id(t)] if id(t) in views else fn(t), recurse)
        self._record = record
        opt.table_dtype, opt.state_dtype = dtype, state_dtype
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state saved by another optimizer or state dtype: load nothing (the optimizer reports
        # why), not the table alone.
        opt = self.table_optimizer
        if opt is not None and opt.load_problems(state_dict, prefix + "table_optimizer."):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def num_rows(self) -> int:
        return self.mu.shape[0]

    @property
    def bytes_per_row(self) -> int:
        """Bytes of memory a row takes: its mu and logvar, and its optimizer state if fused."""
        if self._record is not None:
            return self._record.shape[1] * self._record.element_size()
        size = 2 * self.num_latents * self.mu.element_size()
        if self.table_optimizer is not None:
            opt = self.table_optimizer
            size += opt.state[:1].numel() * opt.state.element_size()
            if opt.row_state is not None:
                size += opt.row_state[:1].numel() * opt.row_state.element_size()
        return size

    @property
    def num_latents(self) -> int:
        return self.mu.shape[1]

    def forward(self, idx: torch.Tensor | None, prior: GMMPrior,
                generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                u=None, kl: str = "mc"):
        """(z [B, K], KL [B]) for rows idx (all rows for None); u: the group of each of those rows
        (a conditional prior only); kl: "mc" or "bound"."""
        if self.covariance == "full":
            return self.sample_full(idx, prior, generator, eps, u, kl)[:2]
        prior_params = (prior.logits, prior.means, prior.logvars)
        idx = None if idx is None else self._check_idx(idx)
        options = dict(eps=eps, generator=generator, reduction="row", kl=_check_kl(kl),
                       prior_index=prior.group_index(u, self._batch_rows(idx)))
        if self.table_optimizer is not None:
            return fused_rows_kl(self.mu, self.logvar, self._rows_idx(idx), *prior_params,
                                 self.table_optimizer, **options)
        if idx is None:
            return reparam_gmm_kl(self.mu, self.logvar, *prior_params, **options)
        return reparam_gmm_kl_rows(self.mu, self.logvar, idx, *prior_params,
                                   table_grad="sparse" if self.sparse else "dense", **options)

    def sample(self, idx: torch.Tensor | None, prior: GMMPrior,
               generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
               u=None, kl: str = "mc"):
        """(z [B, K], KL [B], mu_rows [B, K], logvar_rows [B, K]) for rows idx (all rows for None):
        forward's sample and KL, and the rows themselves, for terms of the loss that read them (a
        likelihood). Gradients reach the table through all four, in every mode; with a fused
        optimizer the rows' gradients join the KL's in the one op that steps the table. u, kl: as
        in forward. With ``covariance="full"`` see :meth:`sample_full` (logvar is then the
        diagonal of the scale factor, not the variances)."""
        if self.covariance == "full":
            return self.sample_full(idx, prior, generator, eps, u, kl)[:4]
        prior_params = (prior.logits, prior.means, prior.logvars)
        idx = None if idx is None else self._check_idx(idx)
        options = dict(eps=eps, generator=generator, reduction="row", kl=_check_kl(kl),
                       prior_index=prior.group_index(u, self._batch_rows(idx)))
        if self.table_optimizer is not None:
            return fused_rows_kl(self.mu, self.logvar, self._rows_idx(idx), *prior_params,
                                 self.table_optimizer, return_rows=True, **options)
        mu, logvar = self._rows(self.mu, idx), self._rows(self.logvar, idx)
        z, kl_value = reparam_gmm_kl(mu, logvar, *prior_params, **options)
        return z, kl_value, mu, logvar

    def _rows(self, table: torch.Tensor, idx):
        """Rows idx of one of the table's parameters (all for None), sparse-gradient when the
        table is sparse."""
        if idx is None:
            return table
        if self.sparse:
            return F.embedding(idx, table, sparse=True)
        return table.index_select(0, idx)

    def scale_tril(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """L [B, K, K] of rows idx (all rows for None): the lower-triangular factor of each row's
        posterior covariance (diag(exp(logvar / 2)) for the diagonal posterior)."""
        idx = None if idx is None else self._check_idx(idx)
        return self._scale_tril_rows(self._rows(self.logvar, idx), idx)

    def _scale_tril_rows(self, logvar_rows: torch.Tensor, idx) -> torch.Tensor:
        """scale_tril of checked rows idx whose logvar rows are already gathered."""
        L = torch.diag_embed(torch.exp(0.5 * logvar_rows))
        if self.covariance == "full":
            L = L + _scatter_tril(self._rows(self.scale_tril_offdiag, idx), self.num_latents)
        return L

    def sample_full(self, idx, prior: GMMPrior, generator=None, eps=None, u=None,
                    kl: str = "mc"):
        """(z, KL, mu_rows, logvar_rows, L) for rows idx with the full posterior N(mu, L L^T):
        z = mu + L eps (eps [B, K] standard normal, drawn from ``generator`` unless given).
        kl="mc": log N(z; mu, L L^T) - log p(z | u) at that z. kl="bound": the fused kernel's
        closed-form bound for the marginals N(mu_k, (L L^T)_kk), plus the entropy the marginals
        overstate, sum_k log sqrt((L L^T)_kk) - log L_kk (the prior is a product over k, so its
        expectation needs only the marginals)."""
        kl = _check_kl(kl)
        idx = None if idx is None else self._check_idx(idx)
        mu, logvar = self._rows(self.mu, idx), self._rows(self.logvar, idx)
        L = self._scale_tril_rows(logvar, idx)
        B, K = mu.shape
        if eps is None:
            eps = torch.randn(B, K, generator=generator, dtype=mu.dtype, device=mu.device)
        elif eps.shape != (B, K):
            raise ValueError(f"eps must have shape {(B, K)}, got {tuple(eps.shape)}")
        z = mu + (L @ eps.unsqueeze(-1)).squeeze(-1)
        if kl == "mc":
            log_q = -0.5 * (eps * eps).sum(1) - 0.5 * logvar.sum(1) - 0.5 * K * LOG_2PI
            kl_value = log_q - prior.log_prob(z, u).sum(1)
        else:
            marginal_logvar = torch.log((L * L).sum(-1))
            _, kl_value = reparam_gmm_kl(mu, marginal_logvar, prior.logits, prior.means,
                                         prior.logvars, eps=eps, reduction="row", kl="bound",
                                         prior_index=prior.group_index(u, B))
            kl_value = kl_value + 0.5 * (marginal_logvar - logvar).sum(1)
        return z, kl_value, mu, logvar, L

    def _batch_rows(self, idx) -> int:
        return self.num_rows if idx is None else idx.shape[0]

    def _rows_idx(self, idx):
        if idx is None:
            return torch.arange(self.num_rows, device=self.mu.device)
        return self._check_idx(idx)

    def _check_idx(self, idx):
        idx = torch.as_tensor(idx, device=self.mu.device)
        if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
            raise ValueError(f"idx must be a 1-D integer tensor of row indices, got dtype "
                             f"{idx.dtype} and shape {tuple(idx.shape)}")
        return idx

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, num_latents={self.num_latents}, sparse={self.sparse}"
                + (", covariance='full'" if self.covariance == "full" else ""))


COVARIANCES = ("diagonal", "full")


def _check_covariance(covariance) -> str:
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    return covariance


def _scatter_tril(offdiag: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K (K - 1) / 2] entries -> [B, K, K], strictly below the diagonal (row by row)."""
    r, c = torch.tril_indices(K, K, -1, device=offdiag.device)
    out = offdiag.new_zeros(offdiag.shape[0], K * K)
    return out.index_copy(1, r * K + c, offdiag).view(-1, K, K)


def _uses_record(kind, dtype, state_dtype) -> bool:
    """One record per row for the compact optimizers and for bfloat16 moments; exact Adam and SGD
    with state of the table's dtype keep the [N, 2, K] table and a separate state (the layout
    ShardedLatentTable shares)."""
    if kind is None:
        return False
    return kind in ROWWISE or (state_dtype or dtype) != dtype


# ----------------------------------------------------------------------------- ELBO estimators
RECON_ESTIMATORS = ("auto", "exact", "antithetic", "sample")


def elbo_terms(model, x, mu, logvar, *, generator=None, eps=None, recon="auto", u=None,
               kl="mc"):
    """(E_q log p(x | z) estimate [B], KL [B]) for q = N(mu, diag(exp(logvar))).

    ``model`` has ``prior`` (a :class:`GMMPrior`), ``decoder`` and ``likelihood``. The KL term uses
    one reparameterized draw z = mu + sigma * eps from the fused kernel (eps drawn in-kernel from
    ``generator`` unless given): kl="mc" its Monte-Carlo estimate, kl="bound" the closed-form upper
    bound (no sampling noise). u: the group of each row for a conditional prior. The likelihood
    term, by ``recon``:

    - "sample": log p(x | z) at that z;
    - "antithetic": the mean over z and its mirror image 2 mu - z = mu - sigma * eps; the terms odd
      in eps cancel, which removes most of the gradient noise (with a small observation noise
      sigma_x the one-draw gradient with respect to mu is noise of order 1/sigma_x);
    - "exact": the closed form for a linear decoder (nn.Linear);
    - "auto": "exact" for an nn.Linear decoder, else "antithetic".

    All are unbiased for the ELBO's likelihood term.
    """
    recon = _resolve_recon(model, recon)
    p = model.prior
    z, kl_value = reparam_gmm_kl(mu, logvar, p.logits, p.means, p.logvars, eps=eps,
                                 generator=generator, reduction="row", kl=_check_kl(kl),
                                 prior_index=p.group_index(u, mu.shape[0]))
    return _log_likelihood(model, x, z, mu, logvar, recon), kl_value


def _resolve_recon(model, recon) -> str:
    """recon checked against the model's decoder, "auto" resolved."""
    if recon not in RECON_ESTIMATORS:
        raise ValueError(f"recon must be one of {RECON_ESTIMATORS}, got {recon!r}")
    linear = isinstance(model.decoder, nn.Linear)
    if recon == "auto":
        return "exact" if linear else "antithetic"
    if recon == "exact" and not linear:
        raise ValueError("recon='exact' needs a linear decoder (an nn.Linear)")
    return recon


def _log_likelihood(model, x, z, mu, logvar, recon: str, scale_tril=None) -> torch.Tensor:
    """The likelihood term of elbo_terms [B] for the draw z of N(mu, diag(exp(logvar))) (of
    N(mu, L L^T) with scale_tril L)."""
    if recon == "exact":
        return model.likelihood.expected_log_prob_linear(x, model.decoder, mu, logvar, scale_tril)
    if recon == "antithetic":
        B = z.shape[0]
        xm = model.decoder(torch.cat([z, 2.0 * mu - z]))
        return 0.5 * model.likelihood.log_prob(x.repeat(2, 1), xm).view(2, B).sum(0)
    return model.likelihood.log_prob(x, model.decoder(z))


def _resolve_prior(prior, latent_dim: int, num_components: int,
                   num_groups: int = 1) -> "GMMPrior":
    """The given GMMPrior (checked against latent_dim), or a new one."""
    if prior is None:
        return GMMPrior(latent_dim, num_components, num_groups=num_groups)
    if not isinstance(prior, GMMPrior):
        raise TypeError(f"prior must be a GMMPrior or None, got {type(prior).__name__}")
    if prior.num_latents != latent_dim:
        raise ValueError(f"the prior has {prior.num_latents} latent dimensions, "
                         f"latent_dim is {latent_dim}")
    return prior


# ----------------------------------------------------------------------------- models
class HalfVAE(nn.Module):
    """Encoder-free VAE: a latent table (one q(z_n) per data point), a GMM prior, a decoder and a
    Gaussian likelihood.

    decoder: "linear" (x = W z, no bias), "mlp" (``hidden`` widths, ``activation``), "residual"
    (x = W z + mlp(z), see :class:`ResidualDecoder`), "flow" (invertible, data_dim ==
    latent_dim, see :class:`FlowDecoder`) or any nn.Module mapping [B, latent_dim] to
    [B, data_dim]. prior: a :class:`GMMPrior` or None (a new
    one with ``num_components`` components and ``num_groups`` groups: > 1 makes it conditional,
    and the ELBO then takes u, the group of every row). kl: "mc" (the one-draw Monte-Carlo KL) or
    "bound" (its closed-form upper bound: no sampling noise in the KL, the ELBO stays a lower
    bound of log p(x)). noise: "learned" (a per-feature log-variance
    parameter ``likelihood.logvar``, initialized to ``init_noise_std``) or a float, the fixed noise
    standard deviation. sparse / table_optimizer ("adam" | "rowwise_adam" | "rowwise_adagrad" |
    "sgd", with table_lr and table_state_dtype): how the latent table is trained, see
    :class:`LatentTable` (fused_optimizer, state_dtype). latents: a table built by the
    caller instead, e.g. a ``halfvae_ext.distributed.ShardedLatentTable`` whose rows are split
    across processes (num_samples and latent_dim must match it; the table options above are then
    its own). posterior_covariance: "diagonal" (mean-field q(z_n)) or "full" (a Cholesky factor
    per row, see :class:`LatentTable`'s ``covariance``).
    """

    def __init__(self, num_samples: int, data_dim: int, latent_dim: int, decoder="linear",
                 prior: GMMPrior | None = None, hidden=(64, 64), activation: str = "relu",
                 noise="learned", *, num_components: int = 3, init_mu: torch.Tensor | None = None,
                 init_logvar: float = -2.0, init_noise_std: float = 1.0,
                 generator: torch.Generator | None = None, sparse: bool = False,
                 table_optimizer: str | None = None, table_lr: float = 1e-2,
                 table_state_dtype: torch.dtype | None = None,
                 num_groups: int = 1, kl: str = "mc", latents: nn.Module | None = None,
                 posterior_covariance: str = "diagonal"):
        super().__init__()
        self.num_samples = _check_pos_int("num_samples", num_samples)
        self.data_dim = _check_pos_int("data_dim", data_dim)
        self.latent_dim = _check_pos_int("latent_dim", latent_dim)
        self.kl = _check_kl(kl)
        self.prior = _resolve_prior(prior, latent_dim, num_components, num_groups)
        if latents is None:
            latents = LatentTable(num_samples, latent_dim, init_mu=init_mu,
                                  init_logvar=init_logvar, generator=generator, sparse=sparse,
                                  fused_optimizer=table_optimizer, lr=table_lr,
                                  state_dtype=table_state_dtype, covariance=posterior_covariance)
        elif not (hasattr(latents, "sample") and hasattr(latents, "num_rows")):
            raise TypeError(f"latents must be a LatentTable or a ShardedLatentTable, got "
                            f"{type(latents).__name__}")
        elif (latents.num_rows, latents.num_latents) != (num_samples, latent_dim):
            raise ValueError(f"latents has {latents.num_rows} rows of {latents.num_latents} "
                             f"latents, the model {num_samples} of {latent_dim} (num_samples, "
                             f"latent_dim)")
        self.latents = latents
        self.decoder = _build_decoder(decoder, latent_dim, data_dim, hidden, activation)
        self.likelihood = _GaussianLikelihood(data_dim, noise, init_noise_std)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood mean: [B, latent_dim] -> [B, data_dim]."""
        return self.decoder(z)

    def flow_log_likelihood(self, x: torch.Tensor, u=None):
        """(log p(x | u) [B], z = h(x) [B, K]) of the noise-free model x = g(z), z ~ p(z | u), for
        a :class:`FlowDecoder` g = h^-1: log p(h(x) | u) + log|det dh/dx|. It is the zero-noise
        limit of the ELBO with each row's posterior at its optimum (the point h(x_n)), less the
        terms in the noise alone."""
        if not isinstance(self.decoder, FlowDecoder):
            raise TypeError(f"flow_log_likelihood needs a FlowDecoder, the model has a "
                            f"{type(self.decoder).__name__}")
        z, logdet = self.decoder.inverse(x)
        return self.prior.log_prob(z, u).sum(dim=-1) + logdet, z

    def elbo_terms(self, x: torch.Tensor, idx: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                   recon: str = "auto", u=None):
        """(expected log-likelihood [B], KL [B]) for the data rows ``idx``.

        x: [B, data_dim], the data of the table rows ``idx`` ([B] row indices; None: all rows in
        order, B = num_samples); u: [B] the group of each row, for a conditional prior. See
        :func:`elbo_terms` for the estimators (``recon``; the KL is the model's ``kl``).
        """
        recon = _resolve_recon(self, recon)
        # One gather and one draw of the rows serve the KL and the likelihood; with a fused table
        # optimizer the rows' gradients from both step the table in one op.
        if x.dim() != 2 or x.shape[1:] != (self.data_dim,):
            raise ValueError(f"x must have shape [B, {self.data_dim}], got {tuple(x.shape)}")
        L = None
        if getattr(self.latents, "covariance", "diagonal") == "full":
            z, kl, mu, logvar, L = self.latents.sample_full(idx, self.prior, generator=generator,
                                                            eps=eps, u=u, kl=self.kl)
        else:
            z, kl, mu, logvar = self.latents.sample(idx, self.prior, generator=generator, eps=eps,
                                                    u=u, kl=self.kl)
        if x.shape[0] != mu.shape[0]:
            raise ValueError(f"x must have shape {(mu.shape[0], self.data_dim)} (one row per "
                             f"index), got {tuple(x.shape)}")
        return _log_likelihood(self, x, z, mu, logvar, recon, L), kl

    def negative_elbo(self, x: torch.Tensor, idx: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, kl_weight: float = 1.0,
                      eps: torch.Tensor | None = None, recon: str = "auto",
                      u=None) -> torch.Tensor:
        """-ELBO per sample, [B]: -E_q log p(x | z) + kl_weight * KL(q(z_n) || p(. | u_n)); see
        :func:`elbo_terms` for the arguments and the estimators."""
        ll, kl = self.elbo_terms(x, idx, generator=generator, eps=eps, recon=recon, u=u)
        return kl_weight * kl - ll

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None, u=None,
                **kwargs) -> torch.Tensor:
        """The per-sample negative ELBO [B] (:meth:`negative_elbo`)."""
        return self.negative_elbo(x, idx, u=u, **kwargs)

    @property
    def mu(self) -> torch.Tensor:
        return self.latents.mu


class VAE(nn.Module):
    """The baseline with an encoder: an MLP maps x to (mu, logvar) of q(z | x); the prior,
    decoder and likelihood options are those of :class:`HalfVAE`."""

    def __init__(self, data_dim: int, latent_dim: int, encoder_hidden=(64, 64), decoder="linear",
                 prior: GMMPrior | None = None, hidden=(64, 64), activation: str = "relu",
                 noise="learned", *, num_components: int = 3, init_logvar: float = -2.0,
                 init_noise_std: float = 1.0, num_groups: int = 1, kl: str = "mc"):
        super().__init__()
        self.data_dim = _check_pos_int("data_dim", data_dim)
        self.latent_dim = _check_pos_int("latent_dim", latent_dim)
        self.kl = _check_kl(kl)
        self.prior = _resolve_prior(prior, latent_dim, num_components, num_groups)
        self.encoder = make_mlp(data_dim, 2 * latent_dim, encoder_hidden, activation)
        with torch.no_grad():  # start with a small posterior variance, as the latent table does
            last = self.encoder[-1]
            last.bias[latent_dim:].fill_(float(init_logvar))
        self.decoder = _build_decoder(decoder, latent_dim, data_dim, hidden, activation)
        self.likelihood = _GaussianLikelihood(data_dim, noise, init_noise_std)

    def encode(self, x: torch.Tensor):
        """(mu, logvar) of q(z | x), each [B, latent_dim]."""
        h = self.encoder(x)
        return h[:, :self.latent_dim], h[:, self.latent_dim:]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def elbo_terms(self, x: torch.Tensor, generator: torch.Generator | None = None,
                   eps: torch.Tensor | None = None, recon: str = "auto", u=None):
        """(expected log-likelihood [B], KL [B]) with q(z | x) from the encoder; u: the group of
        each row for a conditional prior (the encoder does not see it); see :func:`elbo_terms`."""
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have shape [B, {self.data_dim}], got {tuple(x.shape)}")
        mu, logvar = self.encode(x)
        return elbo_terms(self, x, mu.contiguous(), logvar.contiguous(), generator=generator,
                          eps=eps, recon=recon, u=u, kl=self.kl)

    def negative_elbo(self, x: torch.Tensor, generator: torch.Generator | None = None,
                      kl_weight: float = 1.0, eps: torch.Tensor | None = None,
                      recon: str = "auto", u=None) -> torch.Tensor:
        """-ELBO per sample, [B]; see :func:`elbo_terms`."""
        ll, kl = self.elbo_terms(x, generator=generator, eps=eps, recon=recon, u=u)
        return kl_weight * kl - ll

    def forward(self, x: torch.Tensor, u=None, **kwargs) -> torch.Tensor:
        """The per-sample negative ELBO [B] (:meth:`negative_elbo`)."""
        return self.negative_elbo(x, u=u, **kwargs)
