"""Plain PyTorch implementations of the fused ops: the ground truth of the tests.

Same signatures as halfvae_ext.reparam_gmm_kl and halfvae_ext.gmm_log_prob, except that eps is
required (the reference has no in-kernel generator). They build [N, K, C] temporaries on purpose:
they are written for clarity, not speed.

Prior tensors are [K, C] (one mixture per latent dimension) or [U, K, C] with prior_index [N]
choosing row n's group (a conditional prior p(z_k | u)).
"""
import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def _row_priors(prior_logits, prior_means, prior_logvars, prior_index):
    """The prior tensors each row sees: [K, C] (broadcast over rows) or [N, K, C]."""
    if prior_logits.dim() == 2:
        if prior_index is not None:
            raise ValueError("prior_index needs prior tensors of shape [U, K, C]")
        return prior_logits, prior_means, prior_logvars
    if prior_index is None:
        raise ValueError("prior tensors of shape [U, K, C] need prior_index")
    u = prior_index.long()
    return prior_logits[u], prior_means[u], prior_logvars[u]



def gmm_log_prob(z, prior_logits, prior_means, prior_logvars, *, prior_index=None):
    """log p_k(z[n, k]) for a per-dimension Gaussian mixture. z: [N, K]; prior tensors: [K, C] or
    [U, K, C] with prior_index [N]."""
    logits, means, logvars = _row_priors(prior_logits, prior_means, prior_logvars, prior_index)
    log_pi = torch.log_softmax(logits, dim=-1)
    d = z.unsqueeze(-1) - means  # [N, K, C]
    comp = log_pi - 0.5 * (LOG_2PI + logvars) - 0.5 * d * d * torch.exp(-logvars)
    return torch.logsumexp(comp, dim=-1)


def kl_bound(mu, logvar, prior_logits, prior_means, prior_logvars, *, prior_index=None):
    """The variational upper bound of KL(N(mu, s^2) || p_k) per (n, k) (Hershey & Olsen 2007):
    -log sum_c pi_c exp(-KL(N(mu, s^2) || N(m_c, v_c))), written out term by term."""
    logits, means, logvars = _row_priors(prior_logits, prior_means, prior_logvars, prior_index)
    log_pi = torch.log_softmax(logits, dim=-1)
    lv = logvar.unsqueeze(-1)
    d = mu.unsqueeze(-1) - means
    kl_c = 0.5 * (logvars - lv + (torch.exp(lv) + d * d) * torch.exp(-logvars) - 1.0)
    return -torch.logsumexp(log_pi - kl_c, dim=-1)


def kl_jensen_lower(mu, logvar, prior_logits, prior_means, prior_logvars, *, prior_index=None):
    """A lower bound of KL(N(mu, s^2) || p_k) per (n, k), from Jensen's inequality
    E_q log p(z) <= log E_q p(z): -H(q) - log sum_c pi_c N(mu; m_c, s^2 + v_c)."""
    logits, means, logvars = _row_priors(prior_logits, prior_means, prior_logvars, prior_index)
    log_pi = torch.log_softmax(logits, dim=-1)
    var = torch.exp(logvar).unsqueeze(-1) + torch.exp(logvars)
    d = mu.unsqueeze(-1) - means
    log_marginal = torch.logsumexp(log_pi - 0.5 * (LOG_2PI + torch.log(var)) - 0.5 * d * d / var,
                                   dim=-1)
    neg_entropy = -0.5 * (LOG_2PI + 1.0 + logvar)
    return neg_entropy - log_marginal


def _reduce(kl, reduction):
    if reduction == "row":
        return kl.sum(dim=1)
    if reduction == "sum":
        return kl.sum()
    if reduction != "none":
        raise ValueError(f"reduction must be 'row', 'none' or 'sum', got {reduction!r}")
    return kl


def reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, *, eps, reduction="row",
                   prior_index=None, kl="mc"):
    """z = mu + exp(logvar/2)*eps and the KL: kl="mc" the Monte-Carlo estimate
    log N(z; mu, sigma^2) - log p_k(z), kl="bound" kl_bound (independent of eps).

    mu, logvar, eps: [N, K]; prior tensors: [K, C], or [U, K, C] with prior_index [N]. Returns z
    [N, K] and kl: [N] for "row", [N, K] for "none", a scalar for "sum".
    """
    if eps is None:
        raise ValueError("eps: the reference implementation needs eps (it has no generator)")
    z = mu + torch.exp(0.5 * logvar) * eps
    if kl == "mc":
        log_q = -0.5 * (LOG_2PI + logvar + eps * eps)
        kl_value = log_q - gmm_log_prob(z, prior_logits, prior_means, prior_logvars,
                                        prior_index=prior_index)
    elif kl == "bound":
        kl_value = kl_bound(mu, logvar, prior_logits, prior_means, prior_logvars,
                            prior_index=prior_index)
    else:
        raise ValueError(f"kl must be 'mc' or 'bound', got {kl!r}")
    return z, _reduce(kl_value, reduction)
