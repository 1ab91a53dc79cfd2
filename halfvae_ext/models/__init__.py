"""Half-VAE modules (arXiv 2409.04140): a VAE with no encoder, and the VAE baseline with one.

- :mod:`.prior`: :class:`GMMPrior`, one trainable 1-D Gaussian mixture per latent dimension,
  p(z) = prod_k p_k(z_k); with ``num_groups`` U > 1 one mixture per group and dimension,
  p(z | u) = prod_k p_uk(z_k) (a conditional prior: the group u of a data point is a segment, a
  batch, a class).
- :mod:`.latent_table`: :class:`LatentTable`, the amortization-free posterior
  q(z_n) = N(mu[n], diag(exp(logvar[n]))), one trainable row per data point, and the
  :class:`Latents` protocol that any latents object of a HalfVAE satisfies.
- :mod:`.decoders`: linear, MLP, :class:`ResidualDecoder`, :class:`FlowDecoder`.
- :mod:`.vae`: the Gaussian likelihood, :func:`elbo_terms`, :class:`HalfVAE` (latent table +
  prior + decoder + likelihood; the fused op ``halfvae_ext.reparam_gmm_kl``) and :class:`VAE`
  (an MLP encoder x -> (mu, logvar)).

This package is the core: it never imports ``halfvae_ext.ica`` or ``halfvae_ext.distributed``.
"""
from ._checks import KL_ESTIMATORS
from .decoders import ACTIVATIONS, DECODERS, FlowDecoder, ResidualDecoder, make_mlp, random_orthogonal
from .latent_table import COVARIANCES, LatentTable, Latents
from .prior import GMMPrior
from .vae import RECON_ESTIMATORS, VAE, HalfVAE, elbo_terms

__all__ = ["GMMPrior", "LatentTable", "Latents", "HalfVAE", "VAE", "ResidualDecoder", "FlowDecoder",
           "make_mlp", "random_orthogonal", "elbo_terms", "ACTIVATIONS", "DECODERS",
           "RECON_ESTIMATORS", "KL_ESTIMATORS", "COVARIANCES"]
