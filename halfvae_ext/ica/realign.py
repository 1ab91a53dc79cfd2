"""The latents' realignment for a conditional prior with a full posterior: the linear change of
latent coordinates that maximizes the conditional Gaussian prior's likelihood, taken by table,
decoder and prior together (:func:`realign_latents`), found by :func:`joint_diagonalizer`."""
from __future__ import annotations

import torch
from torch import nn

from ..models import HalfVAE, ResidualDecoder

__all__ = ["joint_diagonalizer", "realign_latents"]


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
    exactly these joint moves of table and decoder; this takes them in one step. Returns W."""
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

