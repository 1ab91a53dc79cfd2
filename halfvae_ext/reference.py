"""Plain PyTorch implementations of the fused ops: the ground truth of the tests.

Same signatures as halfvae_ext.reparam_gmm_kl and halfvae_ext.gmm_log_prob, except that eps is
required (the reference has no in-kernel generator). They build [N, K, C] temporaries on purpose:
they are written for clarity, not speed.
"""
import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def gmm_log_prob(z, prior_logits, prior_means, prior_logvars):
    """log p_k(z[n, k]) for a per-dimension Gaussian mixture. z: [N, K]; prior tensors: [K, C]."""
    log_pi = torch.log_softmax(prior_logits, dim=-1)  # [K, C]
    d = z.unsqueeze(-1) - prior_means  # [N, K, C]
    comp = log_pi - 0.5 * (LOG_2PI + prior_logvars) - 0.5 * d * d * torch.exp(-prior_logvars)
    return torch.logsumexp(comp, dim=-1)


def reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, *, eps, reduction="row"):
    """z = mu + exp(logvar/2)*eps and the Monte-Carlo KL log N(z; mu, sigma^2) - log p_k(z).

    mu, logvar, eps: [N, K]; prior tensors: [K, C]. Returns z [N, K] and kl: [N] for "row",
    [N, K] for "none", a scalar for "sum".
    """
    if eps is None:
        raise ValueError("eps: the reference implementation needs eps (it has no generator)")
    z = mu + torch.exp(0.5 * logvar) * eps
    log_q = -0.5 * (LOG_2PI + logvar + eps * eps)
    kl = log_q - gmm_log_prob(z, prior_logits, prior_means, prior_logvars)
    if reduction == "row":
        kl = kl.sum(dim=1)
    elif reduction == "sum":
        kl = kl.sum()
    elif reduction != "none":
        raise ValueError(f"reduction must be 'row', 'none' or 'sum', got {reduction!r}")
    return z, kl
