"""The likelihood, the ELBO and the models: HalfVAE (a latent table, no encoder) and the VAE
baseline (an MLP encoder).

All the negative ELBOs are per sample ([B]) and include every constant, so ``-negative_elbo`` is a
genuine lower bound of log p(x) (in nats, for the Gaussian likelihood, a density); with
``kl="bound"`` too, since the bound is above the KL.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from ..ops import reparam_gmm_kl
from ._checks import LOG_2PI, _check_kl, _check_pos_int
from .decoders import FlowDecoder, build_decoder, make_mlp
from .latent_table import LatentTable, Latents
from .prior import GMMPrior

__all__ = ["HalfVAE", "VAE", "elbo_terms", "RECON_ESTIMATORS", "GaussianLikelihood"]


class GaussianLikelihood(nn.Module):
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
        elif not isinstance(latents, Latents):
            raise TypeError(f"latents must provide the Latents protocol (a LatentTable or a "
                            f"ShardedLatentTable), got {type(latents).__name__}")
        elif (latents.num_rows, latents.num_latents) != (num_samples, latent_dim):
            raise ValueError(f"latents has {latents.num_rows} rows of {latents.num_latents} "
                             f"latents, the model {num_samples} of {latent_dim} (num_samples, "
                             f"latent_dim)")
        self.latents = latents
        self.decoder = build_decoder(decoder, latent_dim, data_dim, hidden, activation)
        self.likelihood = GaussianLikelihood(data_dim, noise, init_noise_std)

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
        self.decoder = build_decoder(decoder, latent_dim, data_dim, hidden, activation)
        self.likelihood = GaussianLikelihood(data_dim, noise, init_noise_std)

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
