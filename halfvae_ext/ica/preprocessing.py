"""Input checks and the whitening that precedes Half-VAE training (and the VAE baseline's).

PCA whitening fixes the scale and correlation of the data; the rotation, which is what ICA is
about, is left to the model.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["check_data", "check_u", "centered_rank", "fingerprint", "run_fingerprint",
           "segment_codes", "Whitening", "fit_whitening"]

FLOAT_DTYPES = (np.float64, np.float32)


def check_data(X, *, min_samples: int = 2, name: str = "X") -> np.ndarray:
    """X as a finite 2-D float array [n_samples, n_features] (float32 stays float32, anything else
    becomes float64). Raises TypeError/ValueError whose message starts with ``name``."""
    from sklearn.utils import check_array
    if X is None or isinstance(X, (str, bytes)) or np.isscalar(X):
        raise TypeError(f"{name} must be a 2-D array-like of numbers, got {type(X).__name__}")
    try:
        import torch
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        return check_array(X, dtype=FLOAT_DTYPES, ensure_min_samples=min_samples,
                           ensure_all_finite=True, input_name=name)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


def _rank_from_singular_values(s: np.ndarray, n: int, d: int) -> int:
    tol = max(n, d) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
    return int((s > max(tol, 1e-10 * s[0] if s.size and s[0] > 0 else 1e-300)).sum())


def centered_rank(X: np.ndarray) -> int:
    """Numerical rank of X - mean(X) (how many sources can be separated from it at most)."""
    X = np.asarray(X, dtype=np.float64)
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    return _rank_from_singular_values(s, *X.shape)


def fingerprint(X: np.ndarray) -> str:
    """SHA-256 of X's shape and float64 values: identifies the data of a resumable run."""
    h = hashlib.sha256()
    h.update(str(X.shape).encode())
    h.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Whitening:
    """X_white = (X - mean) @ whitening.T and back, X ~= X_white @ dewhitening.T + mean.

    mean: [d]; whitening: [dw, d]; dewhitening: [d, dw] (float64); n_components: the number of
    sources K (at most the rank); rank: the numerical rank of the centered data.
    """
    mean: np.ndarray
    whitening: np.ndarray
    dewhitening: np.ndarray
    n_components: int
    rank: int

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) @ self.whitening.T


def fit_whitening(X: np.ndarray, n_components: int | None, whiten="pca",
                  keep_all_dims: bool = False) -> tuple[Whitening, np.ndarray]:
    """Center X [n, d] and whiten it: ``whiten="pca"`` (to K dimensions, or to every nondegenerate
    one with ``keep_all_dims``, which a nonlinear decoder needs), "standardize" (each feature), or
    False (center only). Returns the map and the whitened data [n, dw].

    n_components (None: d) larger than d is an error; larger than the rank of the centered data
    gives a UserWarning and K = rank (as scikit-learn's FastICA reduces it).
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    mean = X.mean(axis=0)
    Xc = X - mean
    K = int(n_components) if n_components is not None else d
    if K > d:
        raise ValueError(f"n_components={K} is larger than the number of features ({d}); "
                         "this estimator needs at least as many observed signals as sources")
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    rank = _rank_from_singular_values(s, n, d)
    if rank == 0:
        raise ValueError(f"X is constant ({n} equal rows after centering): there is nothing to "
                         "separate")
    if rank < K:
        warnings.warn(f"n_components={K} exceeds the rank of the centered X ({rank}): there are "
                      f"not that many independent directions in the data ({n} samples, {d} "
                      f"features); fitting {rank} components", UserWarning, stacklevel=3)
        K = rank
    if whiten == "pca":
        keep = rank if keep_all_dims else K
        whitening = vt[:keep] / s[:keep, None] * math.sqrt(n)
        dewhitening = vt[:keep].T * s[:keep] / math.sqrt(n)
    elif whiten == "standardize":
        std = Xc.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        whitening = np.diag(1.0 / std)
        dewhitening = np.diag(std)
    else:
        whitening = np.eye(d)
        dewhitening = np.eye(d)
    return Whitening(mean, whitening, dewhitening, K, rank), Xc @ whitening.T


def check_u(u, n_rows: int) -> np.ndarray:
    """u as a 1-D integer numpy array of n_rows segment labels; ValueError naming u otherwise."""
    if isinstance(u, torch.Tensor):
        u = u.detach().cpu().numpy()
    if isinstance(u, (str, bytes)):
        raise ValueError(f"u must be a 1-D array of integer segment labels, got a {type(u).__name__}")
    arr = np.asarray(u)
    if arr.ndim != 1:
        raise ValueError(f"u must be a 1-D array of integer segment labels (one per row of X), "
                         f"got shape {arr.shape}")
    # Floats are refused even when integral: a float u is most likely a column taken by mistake.
    if arr.dtype.kind not in "iu":
        raise ValueError(f"u must hold integer segment labels, got dtype {arr.dtype}")
    if arr.shape[0] != n_rows:
        raise ValueError(f"u must have one segment label per row of X ({n_rows}), got "
                         f"{arr.shape[0]}")
    return arr.astype(np.int64, copy=False)


def run_fingerprint(X: np.ndarray, segments, codes) -> str:
    """The run's data fingerprint: X's, and u's when given (the same X with other segments is
    other data). Without u it is fingerprint(X), as in files written before u existed."""
    fp = fingerprint(X)
    if segments is None:
        return fp
    h = hashlib.sha256(fp.encode())
    h.update(np.ascontiguousarray(segments, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    return h.hexdigest()


def segment_codes(u, n_rows: int, segments) -> np.ndarray | None:
    """u checked against X's rows and the segments seen in fit (``segments``; None: fitted
    without u), as indices into segments (None for u=None). ValueError naming u otherwise."""
    if u is None:
        return None
    u = check_u(u, n_rows)
    if segments is None:
        raise ValueError("u: this estimator was fitted without u (an unconditional prior); "
                         "fit it with u=... to use segments")
    seen = np.isin(u, segments)
    if not seen.all():
        unseen = np.unique(u[~seen])
        raise ValueError(f"u has segment label(s) not seen in fit: {unseen[:10].tolist()}"
                         f"{' ...' if unseen.size > 10 else ''} (the fitted segments are "
                         "segments_)")
    return np.searchsorted(segments, u)


def check_new_rows(estimator, X, name: str = "X") -> np.ndarray:
    """X [m, n_features] for a fitted estimator's transform, checked by scikit-learn's
    validate_data (features as in fit, finite), errors naming ``name``."""
    from sklearn.utils.validation import validate_data
    if X is None or isinstance(X, (str, bytes)) or np.isscalar(X):
        raise TypeError(f"{name} must be a 2-D array-like of numbers, got {type(X).__name__}")
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    try:
        return validate_data(estimator, X, reset=False, dtype=FLOAT_DTYPES,
                             ensure_all_finite=True)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
