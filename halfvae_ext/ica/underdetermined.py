"""Underdetermined linear ICA (more sources K than mixtures D): problems, the exact posterior
under a mixture prior, and the metrics of the field.

- :func:`make_sparse_mixture`: Bernoulli-Gaussian sources (active with probability
  ``activity``) mixed into fewer channels at a given SNR; columns spread over a half circle for
  two channels (the layout of the direction-clustering literature), random unit columns else.
- :func:`exact_posterior`: the posterior mean of every row and its log evidence under x = A s +
  noise, a per-source Gaussian-mixture prior and diagonal Gaussian noise, as the finite sum over
  the C^K joint component configurations (each one a Gaussian model in closed form). This is the
  Bayes estimate a mean-field posterior approximates: with K > D the posterior of a row along the
  null space of A is multimodal, which a single Gaussian per row cannot represent.
- :func:`bernoulli_gaussian_prior`: the true prior of :func:`make_sparse_mixture`'s sources as
  such a mixture (a component of variance 0 at zero), for the oracle ceiling.
- :func:`matched_snr`, :func:`matched_si_sdr`, :func:`column_angle_errors`: scores after matching
  the permutation (and scale) to the true sources.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import ICAProblem, check_int, check_real, make_rng
from .metrics import _check_pair, align_sources
from .preprocessing import check_data

__all__ = ["make_sparse_mixture", "exact_posterior", "bernoulli_gaussian_prior",
           "exact_em_step", "fit_exact_em", "ExactEMFit", "check_configurations", "matched_snr", "matched_si_sdr", "column_angle_errors", "MAX_CONFIGURATIONS"]

# The largest C^K the exact posterior sums over (its cost is rows x C^K x D^2).
MAX_CONFIGURATIONS = 4096
# Elements ([rows, C^K, max(K, D)]) of a chunk of the exact posterior's rows.
_CHUNK_ELEMENTS = 1 << 21
LAYOUTS = ("auto", "half_circle", "random")


def make_sparse_mixture(n_samples: int = 20000, n_sources: int = 3, n_observed: int = 2,
                        activity: float = 0.1, snr_db: float = 40.0, layout: str = "auto",
                        random_state=None) -> ICAProblem:
    """Bernoulli-Gaussian sources mixed into fewer channels, with sensor noise.

    S [n, K]: each entry is active with probability ``activity`` (in (0, 1]) and then normal,
    scaled by the law's standard deviation (1 / sqrt(activity)), so every source has unit
    variance in law and exactly zero entries where inactive (the prior
    :func:`bernoulli_gaussian_prior` is the sources' true law). A [D, K]: unit columns at angles
    spread evenly over a half circle with a random offset ("half_circle", D = 2) or normal
    ("random"); "auto" picks the first for two channels. X = S A^T + noise, the noise white per
    channel with variance = the clean channel's mean power / 10^(snr_db / 10) (``noise_var``).
    """
    n_samples = check_int("n_samples", n_samples, 2)
    n_sources = check_int("n_sources", n_sources, 2)
    n_observed = check_int("n_observed", n_observed, 1)
    if n_observed >= n_sources:
        raise ValueError(f"n_observed ({n_observed}) must be smaller than n_sources "
                         f"({n_sources}) for an underdetermined problem")
    activity = check_real("activity", activity, 0.0, 1.0, high_open=False)
    if activity == 0.0:
        raise ValueError("activity must be in (0, 1], got 0.0")
    snr_db = check_real("snr_db", snr_db, -60.0, 200.0, high_open=False)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "auto":
        layout = "half_circle" if n_observed == 2 else "random"
    if layout == "half_circle" and n_observed != 2:
        raise ValueError(f"layout='half_circle' needs n_observed=2, got {n_observed}")
    rng = make_rng(random_state)
    active = rng.random((n_samples, n_sources)) < activity
    S = np.where(active, rng.standard_normal((n_samples, n_sources)), 0.0) / math.sqrt(activity)
    if layout == "half_circle":
        angles = np.pi * (np.arange(n_sources) + rng.random()) / n_sources
        A = np.stack([np.cos(angles), np.sin(angles)])
    else:
        A = rng.standard_normal((n_observed, n_sources))
        A /= np.linalg.norm(A, axis=0)
    clean = S @ A.T
    noise_var = (clean ** 2).mean(0) / 10.0 ** (snr_db / 10.0)
    X = clean + rng.standard_normal(clean.shape) * np.sqrt(noise_var)
    return ICAProblem(X=X, S=S, A=A, name=f"sparse_{n_sources}to{n_observed}",
                      noise_var=noise_var)


def bernoulli_gaussian_prior(n_sources: int, activity: float):
    """(weights, means, variances) [K, 2] of make_sparse_mixture's source law: a component of
    variance 0 at zero (weight 1 - activity) and N(0, 1 / activity)."""
    weights = torch.tensor([1.0 - activity, activity], dtype=torch.float64).expand(n_sources, 2)
    variances = torch.tensor([0.0, 1.0 / activity], dtype=torch.float64).expand(n_sources, 2)
    return weights.contiguous(), torch.zeros(n_sources, 2, dtype=torch.float64), \
        variances.contiguous()


def _configurations(K: int, C: int) -> torch.Tensor:
    """[C^K, K] every joint choice of one component per source."""
    grids = torch.meshgrid(*[torch.arange(C)] * K, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], 1)


def _as_inputs(X, A, noise_var, weights, means, variances):
    """The exact posterior's inputs as tensors in X's dtype (float64 for an array), checked."""
    X = torch.as_tensor(X)
    if not X.is_floating_point():
        X = X.double()
    as_t = lambda v: torch.as_tensor(v, dtype=X.dtype, device=X.device)  # noqa: E731
    A, noise_var, weights, means, variances = map(as_t, (A, noise_var, weights, means,
                                                         variances))
    if X.ndim != 2 or A.ndim != 2 or A.shape[0] != X.shape[1]:
        raise ValueError(f"X must be [n, D] and A [D, K] with the same D; got X "
                         f"{tuple(X.shape)}, A {tuple(A.shape)}")
    D, K = A.shape
    if weights.ndim != 2 or weights.shape[0] != K or means.shape != weights.shape or \
            variances.shape != weights.shape:
        raise ValueError(f"weights, means and variances must all be [K, C] with K = {K} "
                         f"(A's columns); got {tuple(weights.shape)}, {tuple(means.shape)}, "
                         f"{tuple(variances.shape)}")
    check_configurations(K, weights.shape[1])
    noise_var = noise_var.expand(D)
    if bool((noise_var <= 0).any()) or bool((variances < 0).any()) or \
            bool((weights < 0).any()):
        raise ValueError("noise_var must be positive, variances and weights non-negative")
    return X, A, noise_var, weights, means, variances


def check_configurations(K: int, C: int) -> None:
    """ValueError naming n_components when C^K is past MAX_CONFIGURATIONS."""
    if C ** K > MAX_CONFIGURATIONS:
        raise ValueError(f"the exact posterior sums over C^K = {C}^{K} = {C ** K} component "
                         f"configurations, more than MAX_CONFIGURATIONS = {MAX_CONFIGURATIONS}: "
                         "use fewer sources (n_components) or prior components (n_mixture)")


class _Configurations:
    """The per-configuration Gaussian models (shared by every row): prior means m and variances
    v [Q, K], log p(c) - log det(S_c) / 2 - D log(2 pi) / 2 [Q], S_c^-1 [Q, D, D], the gain
    V_c A^T S_c^-1 [Q, K, D] and the posterior covariance V_c - gain A V_c [Q, K, K]."""

    def __init__(self, A, noise_var, weights, means, variances):
        D, K = A.shape
        C = weights.shape[1]
        self.configs = configs = _configurations(K, C).to(A.device)  # [Q, K]
        pick = lambda t: t.gather(1, configs.T).T  # noqa: E731  ([K, C] -> [Q, K])
        self.m, self.v = m, v = pick(means), pick(variances)
        log_prior = pick(weights.log()).sum(1)  # -inf for a weight of 0
        L = torch.linalg.cholesky(torch.einsum("dk,qk,ek->qde", A, v, A) + torch.diag(noise_var))
        self.S_inv = torch.cholesky_inverse(L)
        self.log_norm = log_prior - torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1) \
            - 0.5 * D * math.log(2 * math.pi)
        self.gain = v[:, :, None] * torch.einsum("dk,qde->qke", A, self.S_inv)
        self.centre = m @ A.T  # [Q, D]
        self.A = A
        self.rows_per_chunk = max(1, _CHUNK_ELEMENTS // (configs.shape[0] * max(K, D)))

    def covariance(self):
        return torch.diag_embed(self.v) - self.gain @ (self.A[None] * self.v[:, None, :])

    def rows(self, X):
        """(p(c | x) [b, Q], E[s | x, c] [b, Q, K], log p(x) [b]) of rows X [b, D]."""
        r = X[:, None, :] - self.centre
        log_w = self.log_norm - 0.5 * torch.einsum("bqd,qde,bqe->bq", r, self.S_inv, r)
        return torch.softmax(log_w, 1), self.m + torch.einsum("qkd,bqd->bqk", self.gain, r), \
            torch.logsumexp(log_w, 1)


def exact_posterior(X, A, noise_var, weights, means, variances):
    """The posterior mean E[s | x] [n, K] and the log evidence log p(x) [n] of every row of X
    [n, D] under x = A s + e, e ~ N(0, diag(noise_var)), and independent sources s_k with the
    Gaussian-mixture prior sum_c weights[k, c] N(means[k, c], variances[k, c]) ([K, C];
    variances may be 0: a point mass).

    Given a configuration c (one component per source), s and x are jointly Gaussian:
    x | c ~ N(A m_c, S_c = A V_c A^T + Psi) and E[s | x, c] = m_c + V_c A^T S_c^-1 (x - A m_c);
    the posterior mean is their average weighted by p(c | x). The sum has C^K terms (at most
    MAX_CONFIGURATIONS); the cost is rows x C^K x D^2. Differentiable (autograd) in every input;
    computed in X's floating dtype (float64 for an array)."""
    X, *model = _as_inputs(X, A, noise_var, weights, means, variances)
    cfg = _Configurations(*model)
    means_out, evidence = [], []
    for chunk in torch.split(X, cfg.rows_per_chunk):
        post, mu, log_p = cfg.rows(chunk)
        means_out.append(torch.einsum("bq,bqk->bk", post, mu))
        evidence.append(log_p)
    return torch.cat(means_out), torch.cat(evidence)


@dataclass
class ExactEMFit:
    """A fit of x = A s + e (see :func:`fit_exact_em`): the model, the rows' posterior means,
    the log-likelihood per sample of the model (its history over the iterations of the kept
    start) and the data's mean, which the fit subtracted."""
    A: torch.Tensor
    noise_var: torch.Tensor
    weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor
    sources: np.ndarray
    log_likelihood: float
    history: list
    mean: np.ndarray
    n_iter: int


def exact_em_step(X, A, noise_var, weights, means, variances, min_variance: float = 1e-6):
    """One EM iteration of x = A s + e under the model of :func:`exact_posterior`, with the
    exact posterior (Attias' independent factor analysis, with the configuration sum): returns
    the new (A, noise_var, weights, means, variances) and the log-likelihood per sample of the
    parameters it was given (EM never lowers it). A's columns come back with unit norm and the
    prior rescaled to match (an exact symmetry of the model); a component variance is floored at
    ``min_variance`` times its source's variance, so that a narrow component at zero can form."""
    X, A, noise_var, weights, means, variances = _as_inputs(X, A, noise_var, weights, means,
                                                            variances)
    n, D = X.shape
    K, C = weights.shape
    cfg = _Configurations(A, noise_var, weights, means, variances)
    cov = cfg.covariance()
    H = torch.nn.functional.one_hot(cfg.configs, C).to(X.dtype)  # [Q, K, C]
    Sxs = X.new_zeros(D, K)
    Sss = X.new_zeros(K, K)
    N, M1, M2 = (X.new_zeros(K, C) for _ in range(3))
    total = 0.0
    for chunk in torch.split(X, cfg.rows_per_chunk):
        post, mu, log_p = cfg.rows(chunk)
        wq = post.sum(0)
        Sxs += chunk.T @ torch.einsum("bq,bqk->bk", post, mu)
        Sss += torch.einsum("q,qkl->kl", wq, cov) + torch.einsum("bq,bqk,bql->kl", post, mu, mu)
        N += torch.einsum("q,qkc->kc", wq, H)
        M1 += torch.einsum("bq,bqk,qkc->kc", post, mu, H)
        M2 += torch.einsum("bq,bqk,qkc->kc", post, mu * mu, H) + \
            torch.einsum("q,qk,qkc->kc", wq, torch.diagonal(cov, dim1=1, dim2=2), H)
        total += float(log_p.sum())
    A_new = torch.linalg.solve(Sss, Sxs.T).T
    # E(x - A s)^2 at the maximizing A: diag(Sxx - A Sxs^T) / n.
    noise_new = (((X * X).sum(0) - (A_new * Sxs).sum(1)) / n).clamp_min(
        1e-12 * float((X * X).mean()))
    alive = N > 1e-9 * n
    safe = torch.where(alive, N, 1.0)
    new_means = torch.where(alive, M1 / safe, means)
    source_var = (M2.sum(1) / n).clamp_min(torch.finfo(X.dtype).tiny)[:, None]
    new_vars = torch.where(alive, (M2 / safe - new_means ** 2).clamp_min(
        min_variance * source_var), variances)
    new_weights = torch.where(alive, N, 0.0) / n
    norms = A_new.norm(dim=0)
    return (A_new / norms, noise_new, new_weights / new_weights.sum(1, keepdim=True),
            new_means * norms[:, None], new_vars * norms[:, None] ** 2), total / n


def fit_exact_em(X, n_components: int, *, n_mixture: int = 3, max_iter: int = 300,
                 tol: float = 1e-7, n_init: int = 3, random_state=None) -> ExactEMFit:
    """Blind underdetermined ICA by maximum likelihood of Half-VAE's linear model (x = A s + e,
    a Gaussian-mixture prior per source, diagonal noise) with the exact posterior: EM
    (:func:`exact_em_step`) from ``n_init`` starts, each A from :func:`cluster_directions`
    (another seed each) and a prior of ``n_mixture`` zero-mean components of spread-out
    widths (the narrowest can become a point-like mass at zero); a start stops when its
    log-likelihood per sample rises by less than ``tol``. The start of the largest likelihood
    is kept; the sources are its posterior means. X [n, D], D < n_components allowed (the
    case this is for); C^K <= MAX_CONFIGURATIONS."""
    from .sparse_baselines import cluster_directions
    X = check_data(X).astype(np.float64, copy=False)
    K = check_int("n_components", n_components, 1)
    C = check_int("n_mixture", n_mixture, 1)
    check_configurations(K, C)
    rng = make_rng(random_state)
    mean = X.mean(0)
    Xt = torch.from_numpy(X - mean)
    scale = float((Xt * Xt).sum(1).mean()) / K  # a source's variance with unit columns
    best = None
    for _ in range(check_int("n_init", n_init, 1)):
        A = torch.from_numpy(cluster_directions(X - mean, K, random_state=rng))
        state = (A, 0.01 * (Xt * Xt).mean(0), torch.full((K, C), 1.0 / C, dtype=torch.float64),
                 torch.zeros(K, C, dtype=torch.float64),
                 scale * torch.logspace(-2, math.log10(3.0), C, dtype=torch.float64)
                 .expand(K, C).contiguous())
        history = []
        for _ in range(check_int("max_iter", max_iter, 1)):
            new, log_lik = exact_em_step(Xt, *state)
            history.append(log_lik)
            if len(history) > 1 and history[-1] - history[-2] < tol:
                break  # the likelihood is of `state`: keep it, not the step past it
            state = new
        if best is None or history[-1] > best[1][-1]:
            best = (state, history)
    (A, noise_var, weights, means, variances), history = best
    sources, evidence = exact_posterior(Xt, A, noise_var, weights, means, variances)
    return ExactEMFit(A, noise_var, weights, means, variances, sources.numpy(),
                      float(evidence.mean()), history, mean, len(history))


def _matched(S_true, S_est):
    """(S_true, S_est's columns matched to it in order and sign), both float64."""
    return _check_pair(S_true, S_est)[0], align_sources(S_true, S_est)


def matched_snr(S_true, S_est) -> np.ndarray:
    """[K] SNR in dB of each true source against its matched estimate (Hungarian on |corr|)
    rescaled by least squares: 10 log10(|s|^2 / |s - a s_hat|^2)."""
    t, e = _matched(S_true, S_est)
    scale = (t * e).sum(0) / np.maximum((e * e).sum(0), np.finfo(float).tiny)
    err = ((t - scale * e) ** 2).sum(0)
    return 10.0 * np.log10((t * t).sum(0) / np.maximum(err, np.finfo(float).tiny))


def matched_si_sdr(S_true, S_est) -> np.ndarray:
    """[K] scale-invariant SDR in dB (Le Roux et al. 2019) of each matched estimate: the target
    a s (a = <s_hat, s> / |s|^2) against the rest, 10 log10(|a s|^2 / |s_hat - a s|^2)."""
    t, e = _matched(S_true, S_est)
    target = t * ((t * e).sum(0) / (t * t).sum(0))
    err = ((e - target) ** 2).sum(0)
    return 10.0 * np.log10((target ** 2).sum(0) / np.maximum(err, np.finfo(float).tiny))


def column_angle_errors(A_true, A_est) -> np.ndarray:
    """[K] angle in degrees between each true mixing column and its matched estimated column
    (Hungarian on |cos|; a column's sign and scale are free)."""
    from scipy.optimize import linear_sum_assignment
    At, Ae = np.asarray(A_true, dtype=np.float64), np.asarray(A_est, dtype=np.float64)
    if At.ndim != 2 or Ae.ndim != 2 or At.shape[0] != Ae.shape[0] or \
            Ae.shape[1] < At.shape[1]:
        raise ValueError(f"A_true [D, K] and A_est [D, M >= K] must share D; got "
                         f"{At.shape} and {Ae.shape}")
    cos = np.abs((At / np.linalg.norm(At, axis=0)).T @ (Ae / np.linalg.norm(Ae, axis=0)))
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return np.degrees(np.arccos(np.clip(cos[rows, cols], 0.0, 1.0)))
