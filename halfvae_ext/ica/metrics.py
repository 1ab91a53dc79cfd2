"""Metrics for ICA: compare estimated sources with true ones up to permutation, sign and scale.

Sources are columns: ``S_true`` [n_samples, k], ``S_est`` [n_samples, m] with m >= k (an estimate
may have extra, e.g. collapsed, latent dimensions; those are left unmatched). Inputs may be numpy
arrays, anything ``np.asarray`` accepts, or torch tensors (any device or float dtype); a 1-D input
is one source. Results are numpy float64.

ICA recovers sources only up to permutation, sign and scale, so every comparison first standardizes
the columns and matches true to estimated columns by the Hungarian algorithm on the absolute Pearson
correlation matrix (maximum total |corr|, not a greedy choice that can lock in a bad pair early).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "match_components",
    "align_sources",
    "per_component_rmse",
    "mean_corr_coef",
    "amari_distance",
]


def _to_numpy(name: str, x) -> np.ndarray:
    """numpy float64 copy-or-view of x; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_complex():
            raise ValueError(f"{name} must be real, got a complex tensor")
        x = x.double()  # float16/bfloat16 have no numpy equivalent; double also covers ints
    if np.iscomplexobj(x):
        raise ValueError(f"{name} must be real, got complex values")
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array: {e}") from None


def _check_sources(name: str, x) -> np.ndarray:
    """x as a finite [n_samples, n_columns] float64 array with n_samples >= 2."""
    a = _to_numpy(name, x)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D [n_samples, n_sources], got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples (rows), got {a.shape[0]}")
    if a.shape[1] < 1:
        raise ValueError(f"{name} needs at least 1 column, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _check_pair(S_true, S_est):
    t = _check_sources("S_true", S_true)
    e = _check_sources("S_est", S_est)
    if t.shape[0] != e.shape[0]:
        raise ValueError(
            "S_true and S_est must have the same number of samples (rows), "
            f"got {t.shape[0]} and {e.shape[0]}"
        )
    if e.shape[1] < t.shape[1]:
        raise ValueError(
            f"S_est has fewer columns ({e.shape[1]}) than S_true has sources ({t.shape[1]}); "
            "every true source needs an estimate"
        )
    return t, e


def _standardize_columns(a: np.ndarray, name: str, allow_constant: bool) -> np.ndarray:
    """Columns to zero mean, unit variance. A constant column becomes all zeros if allowed.

    Constant estimated columns are allowed (a collapsed latent dimension is a legitimate, bad,
    estimate: correlation 0 with everything); a constant true source is an input error.
    """
    # Reduce each column as its own contiguous row: numpy's column-wise (axis=0) sums depend on a
    # column's position, so a permuted copy would standardize differently in the last bits.
    at = np.ascontiguousarray(a.T)  # [k, n]
    at = at - at.mean(axis=1, keepdims=True)
    std = at.std(axis=1, keepdims=True)
    # Relative threshold: a column that is constant up to rounding must not be blown up into noise.
    scale = np.maximum(np.abs(at).max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    const = std <= 1e-12 * scale
    if np.any(const) and not allow_constant:
        raise ValueError(f"{name} has constant column(s) {np.flatnonzero(const).tolist()}")
    return np.where(const, 0.0, at / np.where(const, 1.0, std)).T


def _match_standardized(zt: np.ndarray, ze: np.ndarray):
    """Hungarian matching on |corr| of already standardized columns; see match_components."""
    corr = np.clip(zt.T @ ze / zt.shape[0], -1.0, 1.0)  # [k_true, k_est]
    rows, cols = linear_sum_assignment(np.abs(corr), maximize=True)
    # With k_true <= k_est every true source (row) is assigned, and rows come back sorted.
    perm = cols[np.argsort(rows)]
    c = corr[np.arange(zt.shape[1]), perm]
    signs = np.where(c < 0, -1.0, 1.0)  # zero correlation: keep the column as is
    return perm, signs, np.abs(c)


def match_components(S_true, S_est):
    """Match every true source to a distinct estimated column, maximizing the total |corr|.

    S_true: [n, k]; S_est: [n, m], m >= k. Returns ``(perm, signs, abs_corr)``, each [k]:
    true source i is matched to column ``perm[i]`` (int64) of S_est with correlation sign
    ``signs[i]`` (+1.0 or -1.0) and absolute Pearson correlation ``abs_corr[i]``.
    """
    t, e = _check_pair(S_true, S_est)
    zt = _standardize_columns(t, "S_true", allow_constant=False)
    ze = _standardize_columns(e, "S_est", allow_constant=True)
    perm, signs, abs_corr = _match_standardized(zt, ze)
    return perm.astype(np.int64), signs, abs_corr


def align_sources(S_true, S_est) -> np.ndarray:
    """S_est's matched columns, in true-source order and sign-corrected: [n, k].

    Only permutation and sign are undone; the estimate keeps its own scale and offset.
    """
    _, e = _check_pair(S_true, S_est)
    perm, signs, _ = match_components(S_true, S_est)
    return e[:, perm] * signs


def per_component_rmse(S_true, S_est) -> np.ndarray:
    """The Half-VAE paper's metric: RMSE per source after standardizing, matching, sign fixing.

    S_true: [n, k]; S_est: [n, m], m >= k. Returns [k]. For standardized columns
    ``rmse_i = sqrt(2 - 2 |corr_i|)``: 0 for a perfect recovery, sqrt(2) for an uncorrelated one.
    """
    t, e = _check_pair(S_true, S_est)
    zt = _standardize_columns(t, "S_true", allow_constant=False)
    ze = _standardize_columns(e, "S_est", allow_constant=True)
    perm, signs, _ = _match_standardized(zt, ze)
    diff = np.ascontiguousarray((zt - ze[:, perm] * signs).T)  # [k, n]: per-row sums, as above
    return np.sqrt(np.mean(diff * diff, axis=1))


def mean_corr_coef(S_true, S_est) -> float:
    """MCC: mean absolute Pearson correlation of the matched pairs, in [0, 1] (1 = perfect)."""
    _, _, abs_corr = match_components(S_true, S_est)
    return float(abs_corr.mean())


def amari_distance(W, A) -> float:
    """Normalized Amari index of P = W @ A (Amari, Cichocki & Yang 1996), in [0, 1].

    W: [k, d] unmixing, A: [d, k] mixing, k >= 2. With ``r = |P|``,
    ``(sum_i (sum_j r_ij / max_j r_ij - 1) + sum_j (sum_i r_ij / max_i r_ij - 1)) / (2 k (k - 1))``;
    0 exactly when P is a scaled permutation, i.e. W inverts A up to permutation and scale.
    """
    W = _to_numpy("W", W)
    A = _to_numpy("A", A)
    if W.ndim != 2 or A.ndim != 2:
        raise ValueError(f"W and A must be 2-D, got shapes {W.shape} and {A.shape}")
    k, d = W.shape
    if A.shape != (d, k):
        raise ValueError(f"A must have shape {(d, k)} to match W of shape {W.shape}, got {A.shape}")
    if k < 2:
        raise ValueError(f"the Amari distance needs at least 2 components, W has {k} row(s)")
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(A))):
        raise ValueError("W and A must not contain NaN or infinite values")
    r = np.abs(W @ A)
    row_max, col_max = r.max(axis=1), r.max(axis=0)
    if np.any(row_max == 0) or np.any(col_max == 0):
        raise ValueError("W @ A has an all-zero row or column: W does not unmix A at all (singular)")
    rows = (r.sum(axis=1) / row_max - 1.0).sum()
    cols = (r.sum(axis=0) / col_max - 1.0).sum()
    return float((rows + cols) / (2.0 * k * (k - 1)))
