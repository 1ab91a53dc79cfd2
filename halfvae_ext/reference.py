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


# ----------------------------------------------------------------------------- table optimizers
# The rules of csrc/include/halfvae/row_optimizer.h (what latent_rows_update_ and the fused table
# step apply to the touched rows), written per row, in the same order of operations.

def _u32(x):
    return x & 0xFFFFFFFF


def rounding_bits(row, e, step):
    """The kernels' 32 random bits for moment e of `row` at table step `step` (int64 tensors or
    ints; murmur3's finalizer of a mix), as an int64 tensor of values in [0, 2^32)."""
    row = torch.as_tensor(row, dtype=torch.int64)
    lo, hi = _u32(row), (row >> 32) & 0xFFFFFFFF
    e = torch.as_tensor(e, dtype=torch.int64)
    h = _u32(_u32(lo * 0x9E3779B1) + _u32(hi * 0x85EBCA77) + _u32(e * 0xC2B2AE3D)
             + _u32(int(step) * 0x27D4EB2F))
    h = h ^ (h >> 16)
    h = _u32(h * 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _u32(h * 0xC2B2AE35)
    return h ^ (h >> 16)


def to_bfloat16_stochastic(x, bits):
    """x (float32) rounded to bfloat16 by adding the low 16 random bits below its 16 kept bits and
    truncating; Inf and NaN are truncated as they are."""
    u = x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    u = torch.where(finite, u + (bits & 0xFFFF), u) & 0xFFFF0000
    u = torch.where(u >= 2 ** 31, u - 2 ** 32, u).to(torch.int32)
    return u.view(torch.float32).to(torch.bfloat16)


def _store(target, value, row, e, step):
    """Write a row's moments `value` (T) into `target` (T or bfloat16, stochastic rounding)."""
    if target.dtype == torch.bfloat16 and value.dtype != torch.bfloat16:
        return to_bfloat16_stochastic(value.float(), rounding_bits(row, e, step))
    return value.to(target.dtype)


def latent_rows_update(mu, logvar, state, row_state, idx, grad_mu, grad_logvar, optimizer, lr,
                       beta1, beta2, eps, step, row_offset=0):
    """latent_rows_update_ in plain PyTorch, on clones: returns (mu, logvar, state, row_state).

    state: adam [rows, 4, K]; rowwise_adam [rows, 2, K] (dtype of mu or bfloat16); row_state:
    rowwise_adam [rows, 3] (v of mu, v of logvar, the row's step count), rowwise_adagrad [rows, 2]
    (sums). Duplicate indices are summed in batch order; each touched row is stepped once.
    row_offset: the global number of row 0 (a shard's bfloat16 rounding bits are the global
    row's)."""
    mu, logvar = mu.detach().clone(), logvar.detach().clone()
    state = None if state is None else state.detach().clone()
    row_state = None if row_state is None else row_state.detach().clone()
    T = mu.dtype
    K = mu.shape[1]
    idx = idx.long()
    one = torch.ones((), dtype=T)
    b1, b2 = torch.tensor(beta1, dtype=T), torch.tensor(beta2, dtype=T)
    for row in dict.fromkeys(idx.tolist()):  # rows in order of first occurrence
        where = (idx == row).nonzero().flatten()
        g = torch.zeros(2 * K, dtype=T)
        for j in where.tolist():  # batch order
            g = g + torch.cat([grad_mu[j], grad_logvar[j]]).to(T)
        w = torch.cat([mu[row], logvar[row]])
        if optimizer == "sgd":
            w = w - lr * g
        elif optimizer == "adam":
            step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
            m, v = state[row, :2].reshape(-1).to(T), state[row, 2:].reshape(-1).to(T)
            m = m + (one - b1) * (g - m)
            v = v + (one - b2) * (g * g - v)
            w = w - torch.tensor(step_size, dtype=T) * m / (v.sqrt() + eps)
            e = torch.arange(2 * K)
            state[row, :2] = _store(state, m, row + row_offset, e, step).view(2, K)
            state[row, 2:] = _store(state, v, row + row_offset, 2 * K + e, step).view(2, K)
        elif optimizer == "rowwise_adam":
            t = row_state[row, 2] + 1
            row_state[row, 2] = t
            # 1 - beta^t as the kernels compute it: 1 - exp(t log beta)
            bc1 = one - torch.exp(t * torch.tensor(math.log(beta1) if beta1 else -math.inf, dtype=T))
            bc2 = one - torch.exp(t * torch.tensor(math.log(beta2) if beta2 else -math.inf, dtype=T))
            for h in range(2):
                gh = g[h * K:(h + 1) * K]
                v = row_state[row, h] + (one - b2) * ((gh * gh).sum() / K - row_state[row, h])
                row_state[row, h] = v
                m = state[row, h].to(T)
                m = m + (one - b1) * (gh - m)
                state[row, h] = _store(state, m, row + row_offset, h * K + torch.arange(K), step)
                w[h * K:(h + 1) * K] -= lr / bc1 / ((v / bc2).sqrt() + eps) * m
        elif optimizer == "rowwise_adagrad":
            for h in range(2):
                gh = g[h * K:(h + 1) * K]
                row_state[row, h] = row_state[row, h] + (gh * gh).sum() / K
                w[h * K:(h + 1) * K] -= lr / (row_state[row, h].sqrt() + eps) * gh
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        mu[row], logvar[row] = w[:K], w[K:]
    return mu, logvar, state, row_state
