"""GMMPrior: one trainable 1-D Gaussian mixture per latent dimension (and per group u for a
conditional prior)."""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from ..ops import gmm_log_prob
from ._checks import _check_pos_int

__all__ = ["GMMPrior"]


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
        every group (sources with per-segment means)."""
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
