"""The baselines of underdetermined ICA (more sources than mixtures), written here: no
maintained package implements them.

- :func:`cluster_directions`: the blind estimate of the mixing columns of sparse sources. Where
  one source dominates a sample, x is close to a multiple of that source's column, so the
  directions of the high-energy samples gather along the K lines spanned by the columns
  (Bofill & Zibulevsky 2001 for two channels; here "k-lines" clustering, which works for any
  number of channels: each sample goes to the line it is closest to in angle, each line becomes
  the principal direction of its samples weighted by energy, best of several starts).
- :func:`l1_decode`: the sources given a mixing matrix by the lasso, row by row
  (scikit-learn's SparseCoder): the MAP estimate under a Laplace prior (Lewicki & Sejnowski
  2000), the decoder of the blind pipeline and, given the true A, an oracle no blind method has.
"""
from __future__ import annotations

import numpy as np

from .data import check_int, make_rng
from .preprocessing import check_data

__all__ = ["cluster_directions", "l1_decode"]


def _lines_objective(U, w, lines):
    return float((w * np.max((U @ lines) ** 2, axis=1)).sum())


def _k_lines(U, w, lines, max_iter):
    for _ in range(max_iter):
        label = np.argmax((U @ lines) ** 2, axis=1)
        new = lines.copy()
        for k in range(lines.shape[1]):
            mine = label == k
            if mine.sum() >= 2:
                Uk = U[mine] * np.sqrt(w[mine, None])
                new[:, k] = np.linalg.eigh(Uk.T @ Uk)[1][:, -1]
        if np.allclose(np.abs((new * lines).sum(0)), 1.0, atol=1e-12):
            return new
        lines = new
    return lines


def cluster_directions(X, n_components: int, *, energy_quantile: float = 0.5,
                       n_init: int = 10, max_iter: int = 100, random_state=None) -> np.ndarray:
    """Unit mixing columns [D, n_components] estimated from the directions of X's rows [n, D].

    Rows below the ``energy_quantile`` of the norms are left out (there the noise decides the
    direction); each kept row u = x / |x| weighs |x|^2. k-lines clustering from ``n_init``
    k-means++-style starts (each next line a kept row far in angle from the lines so far); the
    start with the largest sum of w cos^2 to the nearest line wins. Signs are normalized to a
    nonnegative largest entry."""
    X = check_data(X).astype(np.float64, copy=False)
    K = check_int("n_components", n_components, 1)
    if not 0.0 <= energy_quantile < 1.0:
        raise ValueError(f"energy_quantile must be in [0, 1), got {energy_quantile!r}")
    rng = make_rng(random_state)
    norms = np.linalg.norm(X, axis=1)
    keep = norms > np.quantile(norms, energy_quantile)
    if keep.sum() < K:
        raise ValueError(f"X has fewer than n_components={K} rows of nonzero energy above "
                         f"the {energy_quantile} quantile")
    U, w = X[keep] / norms[keep, None], norms[keep] ** 2
    best, best_score = None, -np.inf
    for _ in range(check_int("n_init", n_init, 1)):
        lines = np.empty((X.shape[1], K))
        lines[:, 0] = U[rng.choice(len(U), p=w / w.sum())]
        for k in range(1, K):
            far = w * np.clip(1.0 - np.max((U @ lines[:, :k]) ** 2, axis=1), 0.0, None)
            lines[:, k] = U[rng.choice(len(U), p=far / far.sum())] if far.sum() > 0 else \
                U[rng.integers(len(U))]
        lines = _k_lines(U, w, lines, max_iter)
        score = _lines_objective(U, w, lines)
        if score > best_score:
            best, best_score = lines, score
    flip = np.sign(best[np.argmax(np.abs(best), axis=0), np.arange(K)])
    return best * np.where(flip == 0, 1.0, flip)


def l1_decode(X, A, alpha: float) -> np.ndarray:
    """Sources [n, K] = argmin_s |x - A s|^2 / (2 D) + alpha |s|_1 for every row x of X [n, D]
    (scikit-learn's SparseCoder, LARS; A [D, K], its columns the atoms)."""
    from sklearn.decomposition import SparseCoder
    X, A = check_data(X, min_samples=1).astype(np.float64, copy=False), \
        np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != X.shape[1]:
        raise ValueError(f"X [n, D] and A [D, K] must share D; got {X.shape} and {A.shape}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    # LARS solves each row's lasso exactly (coordinate descent stops short at small alpha).
    coder = SparseCoder(dictionary=A.T, transform_algorithm="lasso_lars", transform_alpha=alpha)
    return coder.transform(X)
