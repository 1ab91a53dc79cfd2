"""The linear decoder fitted by variational EM (``solver="em"``): coordinate ascent on the Half-VAE
ELBO, block by block, plus a Newton step in the directions that EM alone climbs slowly.

The model is :class:`~halfvae_ext.ica.recipe.LinearRecipe`'s (x = W z + diagonal noise, a
per-dimension Gaussian-mixture prior, a diagonal Gaussian posterior per row). With
``kl="bound"`` the KL is KL(q || p_k) <= sum_c r_c [KL(q || N(m_c, v_c)) + log r_c - log pi_c],
tight at r_c proportional to pi_c exp(-KL(q || N(m_c, v_c))) (Hershey & Olsen 2007), and given r
every block has a closed form; with ``kl="mc"`` (the default) the KL itself, its expectations
under q by Gauss-Hermite quadrature (:class:`KLStatistics`), the same algebra with the
responsibilities taken at the quadrature nodes. One iteration (an "epoch"), in the spirit of
Attias' IFA:

1. rows: each row's posterior given W, the noise and the prior: its variances from the curvature
   P_n, its mean by two conjugate-gradient steps on (G + diag P_n) mu_n = c_n, G = W^T Psi^-1 W,
   warm-started at the previous mean (for the bound, exact block ascent; for the KL itself, a
   damped Newton step);
2. the prior: weights, means and variances from the rows' responsibilities (a GMM M step);
3. a Newton step in the group of transforms z -> T z, W -> W T^-1 that leaves the reconstruction
   unchanged (parameter expansion): plain EM moves W by O(noise variance) an iteration, so in a
   nearly noiseless mix it stalls; the ELBO along T is the ICA likelihood of the posteriors,
   log|det T| + E_q log p(T z), and Picard's Hessian approximation gives the step;
4. W and the noise variances: least squares given the posteriors (the M step).

The statistics come from the fused op's backward: its gradients are exactly what EM needs
(d KL / d mu = E_q psi(z), d KL / d logvar = (s^2 E_q psi'(z) - 1) / 2, the prior's gradients
the responsibility-weighted sums), one op call each. An iteration is deterministic, so a run
resumes exactly from the model's state; a restart stops when the ELBO per sample has risen by
less than ``CONVERGED`` per iteration over the last ``CONVERGED_WINDOW`` iterations, or after
``max_iter``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..models import HalfVAE
from .recipe import LinearRecipe

__all__ = ["LinearEMRecipe", "em_iteration", "row_statistics", "prior_update", "chunks",
           "CONVERGED", "CONVERGED_WINDOW", "EM_SETTINGS"]

# A restart has converged when its ELBO per sample rose by less than this many nats per
# iteration, on average over the last CONVERGED_WINDOW iterations.
CONVERGED = 5e-4
CONVERGED_WINDOW = 10
# Conjugate-gradient steps of a row update (warm-started: the rows move little per iteration).
CG_STEPS = 2
# The largest entry of a Newton step in the transform group; larger steps are scaled down.
MAX_STEP = 0.5
# Floors of the variances, as the gradient recipe's (GaussianLikelihood.min_logvar).
MIN_NOISE_LOGVAR = -12.0
MIN_PRIOR_VAR = 1e-6

# The values of the settings EM can honour (others need the gradient solver: see
# run_parameters.resolve_decoder, which refuses or falls back before a recipe is built).
EM_SETTINGS = {"batch_size": None, "table_optimizer": "torch",
               "posterior_covariance": "diagonal"}

# Gauss-Hermite nodes of the expectations under q for kl="mc" (the exact ELBO, of which the
# Monte-Carlo KL is an unbiased estimate): exact for polynomials of degree 2 * QUADRATURE - 1 in
# z, and the posteriors are far narrower than the prior's components (on the demo's problems 2,
# 3 and 5 nodes give the same sources to 4 digits).
QUADRATURE = 3
# Elements ([rows, K]) of a chunk of an iteration's passes over the rows (see ``chunks``).
CHUNK_ELEMENTS = 1 << 17


class KLStatistics:
    """The KL term's value and gradients for EM, from the fused op without autograd. kl="bound":
    the closed-form bound at each row's posterior. kl="mc": KL(q || p) itself, the expectation
    over q as a Gauss-Hermite sum of the op's Monte-Carlo KL at the nodes eps_j (the rows
    repeated once per node, one op call). The gradients have the bound's algebra either way:
    d KL / d mu = E_q psi(z) and d KL / d logvar = (s^2 E_q psi'(z) - 1) / 2 (psi = -d log p /
    dz; Stein's lemma), the prior's are sums of responsibility-weighted moments."""

    def __init__(self, kl: str, n: int, K: int, dtype, device):
        self.kl = kl
        self.nodes = nodes = 1 if kl == "bound" else QUADRATURE
        self.n = n
        t, w = (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)) \
            if nodes == 1 else _hermite_nodes(nodes)
        self.eps = (math.sqrt(2.0) * t).to(dtype).repeat_interleave(n)[:, None].expand(
            nodes * n, K).contiguous().to(device)
        self.weights = (w / w.sum()).to(dtype).repeat_interleave(n).to(device)
        # Every row once per node, gathered inside the kernel (no copies of the table).
        self.rows = torch.arange(n, device=device).repeat(nodes)
        self.zeros = torch.zeros_like(self.eps)
        self._code = 1 if kl == "bound" else 0

    def _index(self, prior_index):
        return None if prior_index is None else prior_index.repeat(self.nodes)

    def gradients(self, mu, logvar, logits, means, logvars, prior_index=None):
        """(d/d mu, d/d logvar [n, K], d/d logits, d/d means, d/d logvars) of sum_n KL(q_n || p);
        prior_index [n]: each row's group for a conditional prior."""
        from .. import ops  # noqa: F401  (loads the extension, which registers the op)
        g_mu, g_lv, g_logits, g_means, g_logvars = \
            torch.ops.halfvae_ext.reparam_gmm_kl_rows_backward(
                self.zeros, self.weights, mu, logvar, self.rows, logits, means, logvars,
                self.eps, None, 1, True, self._index(prior_index), self._code, True)
        K = mu.shape[1]
        return (g_mu.view(self.nodes, self.n, K).sum(0), g_lv.view(self.nodes, self.n, K).sum(0),
                g_logits, g_means, g_logvars)

    def kl_sum(self, mu, logvar, logits, means, logvars, prior_index=None) -> float:
        """sum_n KL(q_n || p) over the rows."""
        from ..ops import reparam_gmm_kl_rows
        _, kl = reparam_gmm_kl_rows(mu, logvar, self.rows, logits, means, logvars, eps=self.eps,
                                    prior_index=self._index(prior_index), kl=self.kl)
        return float((kl * self.weights).sum())

    def mean_kl(self, mu, logvar, logits, means, logvars, prior_index=None) -> float:
        """KL(q_n || p) averaged over the rows."""
        return self.kl_sum(mu, logvar, logits, means, logvars, prior_index) / self.n


@functools.lru_cache(maxsize=2)
def kl_statistics(kl: str, n: int, K: int, dtype, device) -> KLStatistics:
    """A KLStatistics, the same one given again when asked for the same arguments (its node
    tables are a few copies of a chunk's size, which an iteration should not allocate anew; two
    sizes: a full chunk and the last one; a restart's final_elbo releases them)."""
    return KLStatistics(kl, n, K, dtype, device)


def chunks(n: int, K: int, rows=None):
    """[(start, stop)] of the row chunks an iteration's passes take in turn: about
    CHUNK_ELEMENTS elements each, so that a chunk's temporaries stay in cache (a pass over the
    whole table per elementwise operation would be bound by memory bandwidth)."""
    rows = rows or max(1, CHUNK_ELEMENTS // K)
    return [(a, min(n, a + rows)) for a in range(0, n, rows)]


def _hermite_nodes(n: int):
    import numpy as np
    t, w = np.polynomial.hermite.hermgauss(n)
    return torch.from_numpy(t), torch.from_numpy(w)


def _conjugate_gradient(G, P, c, x, steps: int):
    """``steps`` Jacobi-preconditioned CG steps on (G + diag P_n) x_n = c_n for every row n
    (G [K, K] shared, P, c [n, K]) from x: the matrix products are one GEMM for all rows."""
    dinv = 1.0 / (torch.diagonal(G) + P)
    r = c - x @ G - P * x
    z = dinv * r
    p = z
    rz = (r * z).sum(1, keepdim=True)
    for step in range(steps):
        Ap = torch.addcmul(p @ G, P, p)
        pAp = (p * Ap).sum(1, keepdim=True)
        # A row already solved has p = 0: no step (not 0/0).
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(torch.finfo(pAp.dtype).tiny), 0.0)
        x = torch.addcmul(x, alpha, p)
        if step + 1 == steps:
            break
        r = torch.addcmul(r, alpha, Ap, value=-1.0)
        z = dinv * r
        rz_new = (r * z).sum(1, keepdim=True)
        p = torch.addcmul(z, torch.where(rz > 0, rz_new / rz.clamp_min(
            torch.finfo(rz.dtype).tiny), 0.0), p)
        rz = rz_new
    return x


def _transform_step(score, curvature, curvature_s2, second, n: int):
    """The Newton step T = I + E in the transform group (see the module docstring), or None
    when the approximate Hessian gives no usable step. From sums over the rows (float64):
    score = g_mu^T M [K, K], curvature = sum P, curvature_s2 = sum P S2, second = sum M^2 + S2
    [K], with M, S2 the rows' means and variances, g_mu, P their KL statistics."""
    K = score.shape[0]
    eye = torch.eye(K, dtype=torch.float64, device=score.device)
    # Relative gradient of log|det T| + E_q log p(T z) at T = I; the score of the mixture given
    # r is P z - h, whose moments under q are g_mu^T M / n plus the variance on the diagonal.
    grad = eye - score / n - torch.diag(curvature_s2 / n)
    h = (curvature / n)[:, None] * (second / n)[None, :]
    det = h * h.T - 1.0
    # Off the diagonal only: a rescaling of z_k with the prior rescaled along is an exact
    # symmetry of the model, which the prior's M step follows (a diagonal step fights it).
    E = ((h.T * grad - grad.T) / det.clamp_min(1e-2)).masked_fill(eye.bool(), 0.0)
    if not bool(torch.isfinite(E).all()):
        return None
    largest = float(E.abs().max())
    if largest > MAX_STEP:
        E = E * (MAX_STEP / largest)
    return eye + E


def row_statistics(g_mu, g_lv, mu, logvar):
    """(P, h) [n, K] of every row from the KL's gradients at (mu, logvar) (:class:`KLStatistics`):
    P = E_q psi'(z), the prior's curvature under q, and h = P mu - E_q psi(z), so that the
    prior's part of the ELBO is -P mu^2 / 2 + h mu + const to second order (exactly, given the
    responsibilities, for the bound: P = sum_c r_c / v_c, h = sum_c r_c m_c / v_c). Where the
    prior is not log-concave P can be negative; it is floored at 0, which makes the row update
    a damped Newton step (the likelihood's curvature G keeps it well posed)."""
    P = ((2.0 * g_lv + 1.0) / logvar.exp()).clamp_min(0.0)
    return P, P * mu - g_mu


def prior_update(g_logits, g_means, g_logvars, logits, means, logvars, rows):
    """The prior's M step: weights, means and log-variances that maximize the ELBO given the
    responsibilities r of the rows, from the KL bound's gradients with respect to the prior
    tables (sums over rows: g_logits = rows pi - sum r, g_means = -(sum r mu - m sum r) / v,
    g_logvars = (sum r - sum r (s^2 + (mu - m)^2) / v) / 2). rows: the row count, or [U, 1, 1]
    per group. Returns (logits, means, logvars)."""
    v = logvars.exp()
    w = rows * torch.softmax(logits, -1) - g_logits
    # A component that no row is responsible for keeps its place and width (0 / 0 otherwise).
    alive = w > 1e-6
    w = torch.where(alive, w, 1e-6)
    new_means = torch.where(alive, means - v * g_means / w, means)
    # sum r (s^2 + (mu - m_new)^2) = sum r (s^2 + (mu - m)^2) - w (m_new - m)^2
    spread = v * (w - 2.0 * g_logvars) / w - (new_means - means) ** 2
    new_logvars = torch.where(alive, spread.clamp_min(MIN_PRIOR_VAR).log(), logvars)
    return (w / w.sum(-1, keepdim=True)).log(), new_means, new_logvars


@torch.no_grad()
def em_iteration(X, mu, logvar, W, noise_logvar, logits, means, logvars, *, learn_noise: bool,
                 kl: str = "mc", prior_index=None, group_counts=None, chunk_rows=None):
    """One EM iteration from the state (mu, logvar [n, K], W [d, K], noise_logvar [d], prior
    tables [K, C] or [U, K, C]) on the whitened rows X [n, d]; returns the new state as a dict of
    tensors in the same dtypes, and ``elbo``, the ELBO per sample of the new state. prior_index
    [n]: each row's group for a conditional prior, with group_counts [U] its rows per group.
    kl: "mc" (the ELBO itself) or "bound" (with the closed-form KL bound): see KLStatistics.
    The rows are taken in chunks of ``chunk_rows`` (default: see ``chunks``) in three passes:
    rows and the sums of the prior's and the transform's steps; the transform and the sums of
    W's; the residuals."""
    n, K = mu.shape
    dtype = mu.dtype
    parts = chunks(n, K, chunk_rows)
    wide = dict(dtype=torch.float64, device=mu.device)
    psi = noise_logvar.clamp_min(MIN_NOISE_LOGVAR).exp()
    Wp = W / psi[:, None]
    G = W.T @ Wp
    diag_G = torch.diagonal(G)

    # 1. rows, given r at the current state; 2. sums for the prior's M step at the new rows,
    # and for 3. the transform step
    new_mu, S2 = torch.empty_like(mu), torch.empty_like(mu)
    prior_grads = None
    score = torch.zeros(K, K, **wide)
    curvature, curvature_s2, second = (torch.zeros(K, **wide) for _ in range(3))
    for a, b in parts:
        stats = kl_statistics(kl, b - a, K, dtype, mu.device)
        index = None if prior_index is None else prior_index[a:b]
        g_mu, g_lv, *_ = stats.gradients(mu[a:b], logvar[a:b], logits, means, logvars, index)
        P, h = row_statistics(g_mu, g_lv, mu[a:b], logvar[a:b])
        s2 = torch.reciprocal(diag_G + P, out=S2[a:b])
        m = _conjugate_gradient(G, P, torch.addmm(h, X[a:b], Wp), mu[a:b], CG_STEPS)
        new_mu[a:b] = m
        lv = s2.log()
        g_mu, g_lv, *grads = stats.gradients(m, lv, logits, means, logvars, index)
        prior_grads = grads if prior_grads is None else \
            [total + part for total, part in zip(prior_grads, grads)]
        P, _ = row_statistics(g_mu, g_lv, m, lv)
        score += (g_mu.T @ m).double()
        curvature += P.sum(0, dtype=torch.float64)
        curvature_s2 += (P * s2).sum(0, dtype=torch.float64)
        second += torch.addcmul(s2, m, m).sum(0, dtype=torch.float64)
    rows = float(n) if group_counts is None else group_counts.to(logits)[:, None, None]
    new_logits, new_means, new_logvars = prior_update(*prior_grads, logits, means, logvars, rows)
    T = _transform_step(score, curvature, curvature_s2, second, n)

    # 3. the transform, and the sums of W's least squares and of the KL at the new state
    MtM = torch.zeros(K, K, **wide)
    MtX = torch.zeros(K, X.shape[1], **wide)
    sum_s2 = torch.zeros(K, **wide)
    kl_total = 0.0
    if T is not None:
        T = T.to(dtype)
    for a, b in parts:
        m, s2 = new_mu[a:b], S2[a:b]
        if T is not None:
            m.copy_(m @ T.T)
            s2.copy_(s2 @ (T * T).T)
        MtM += (m.T @ m).double()
        MtX += (m.T @ X[a:b]).double()
        sum_s2 += s2.sum(0, dtype=torch.float64)
        lv = s2.log_()  # S2 becomes the new logvar
        index = None if prior_index is None else prior_index[a:b]
        kl_total += kl_statistics(kl, b - a, K, dtype, mu.device).kl_sum(
            m, lv, new_logits, new_means, new_logvars, index)

    # 4. W and the noise
    W = torch.linalg.solve(MtM + torch.diag(sum_s2), MtX).T.to(dtype)
    sq = (W * W).double() @ sum_s2  # sum_n E_q (x_n - W z_n)^2 per feature
    for a, b in parts:
        R = torch.addmm(X[a:b], new_mu[a:b], W.T, alpha=-1.0)
        sq += (R * R).sum(0, dtype=torch.float64)
    sq = (sq / n).to(dtype)
    if learn_noise:
        noise_logvar = sq.clamp_min(math.exp(MIN_NOISE_LOGVAR)).log()
    lv = noise_logvar.clamp_min(MIN_NOISE_LOGVAR)
    log_lik = -0.5 * (math.log(2 * math.pi) * X.shape[1] + lv.sum() + (sq / lv.exp()).sum())
    return dict(mu=new_mu, logvar=S2, W=W, noise_logvar=noise_logvar, logits=new_logits,
                means=new_means, logvars=new_logvars, elbo=float(log_lik) - kl_total / n)


@dataclass(frozen=True)
class LinearEMRecipe(LinearRecipe):
    """The linear decoder fitted by variational EM (see the module docstring): ``max_iter`` caps
    the iterations of a restart, which stops once converged; ``kl`` chooses the objective (the
    ELBO, its expectations by quadrature, or the ELBO with the KL bound); the learning rates,
    ``prior_warmup``, ``lr_decay`` and ``n_eval_samples`` do not apply."""
    decoder: str = "linear_em"
    solver: str = "em"
    auto_max_iter: ClassVar[int] = 1000
    auto_restarts: ClassVar[int] = 2

    @property
    def fitted_name(self) -> str:
        return "linear"

    def make_decoder(self):
        return "linear"

    def make_optimizers(self, model: HalfVAE) -> list:
        return []

    def set_learning_rates(self, model: HalfVAE, optimizers: list, factor: float) -> None:
        pass

    def epoch(self, model: HalfVAE, optimizers: list, Xw: torch.Tensor,
              generator: torch.Generator, epoch: int, u=None) -> float:
        """One EM iteration on every row (the state is the model's); returns the ELBO per sample
        after it."""
        lat, prior, lik = model.latents, model.prior, model.likelihood
        index = counts = None
        if u is not None and prior.conditional:
            index = u
            counts = torch.bincount(u, minlength=prior.num_groups)
        new = em_iteration(Xw, lat.mu.detach(), lat.logvar.detach(),
                           model.decoder.weight.detach(), lik.logvar.detach(),
                           prior.logits.detach(), prior.means.detach(), prior.logvars.detach(),
                           learn_noise=lik.learned, kl=self.kl, prior_index=index,
                           group_counts=counts)
        with torch.no_grad():
            for param, name in ((lat.mu, "mu"), (lat.logvar, "logvar"),
                                (model.decoder.weight, "W"), (prior.logits, "logits"),
                                (prior.means, "means"), (prior.logvars, "logvars")):
                param.copy_(new[name])
            if lik.learned:
                lik.logvar.copy_(new["noise_logvar"])
        return new["elbo"]

    def converged(self, history: list) -> bool:
        """True once the ELBO per sample rose by less than CONVERGED a step over the last
        CONVERGED_WINDOW iterations (a decrease counts as converged too: EM's blocks only rise,
        so a fall is rounding or the transform step overshooting at the optimum)."""
        if len(history) <= CONVERGED_WINDOW:
            return False
        return (history[-1] - history[-1 - CONVERGED_WINDOW]) / CONVERGED_WINDOW < CONVERGED

    @torch.no_grad()
    def final_elbo(self, model: HalfVAE, Xw: torch.Tensor, seed: int, u=None) -> float:
        """The ELBO per sample that the iterations climb (deterministic: kl="mc" by the same
        quadrature); -inf if not finite."""
        lat, prior = model.latents, model.prior
        index = u if u is not None and prior.conditional else None
        n, K = lat.mu.shape
        kl_total = 0.0
        for a, b in chunks(n, K):
            kl_total += kl_statistics(self.kl, b - a, K, lat.mu.dtype, lat.mu.device).kl_sum(
                lat.mu[a:b], lat.logvar[a:b], prior.logits, prior.means, prior.logvars,
                None if index is None else index[a:b])
        log_lik = model.likelihood.expected_log_prob_linear(Xw, model.decoder, lat.mu,
                                                            lat.logvar).mean()
        elbo = float(log_lik) - kl_total / n
        kl_statistics.cache_clear()  # the restart is over: free its node tables
        return elbo if math.isfinite(elbo) else -math.inf
