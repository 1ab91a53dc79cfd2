"""The data side of a sharded fit: open a [rows, features] array or .npy (memory-mapped), one
pass over it split across the ranks (finite values, feature statistics, a fingerprint of the
bytes that does not depend on the number of ranks) and the transform the model sees
(standardized features or whitened principal components)."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .collectives import Comm

__all__ = ["open_data", "scan_data", "data_transform", "apply_transform", "BLOCK_ROWS"]

BLOCK_ROWS = 1 << 16  # rows per block of the data pass (block b is read by rank b % W)


def open_data(data):
    """(array [N, D] (a memory map for a path), the name errors use)."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"data: cannot read {path!r} as a .npy file: {e}") from None
        name = f"data {path!r}"
    else:
        arr, name = data, "data"
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            try:
                arr = np.asarray(arr)
            except (TypeError, ValueError) as e:
                raise ValueError(f"data must be a [rows, features] array or a .npy path: {e}") \
                    from None
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must hold a 2-D array [rows, features], got shape "
                         f"{tuple(arr.shape)}")
    return arr, name


# ----------------------------------------------------------------------------- the data pass
def scan_data(data, name, comm: Comm):
    """One pass over the rows, block b by rank b % W: every value finite and within float32
    (ValueError naming `name`, the first bad row and column, on every rank alike), the mean
    [D] and covariance [D, D] (float64) of the features and the sha256 of the bytes (dtype,
    shape and every block's digest: the same for any number of ranks)."""
    N, D = data.shape
    W, rank = comm.world, comm.rank
    n_blocks = -(-N // BLOCK_ROWS)
    sums = torch.zeros(D + D * D + 1, dtype=torch.float64)
    digests = torch.zeros(n_blocks, 32, dtype=torch.int64)
    bad = [N, 0]
    big = float(np.finfo(np.float32).max)
    for b in range(rank, n_blocks, W):
        r0 = b * BLOCK_ROWS
        raw = np.ascontiguousarray(data[r0:min(N, r0 + BLOCK_ROWS)])
        digests[b] = torch.from_numpy(np.frombuffer(hashlib.sha256(raw).digest(),
                                                    np.uint8).astype(np.int64))
        x = raw.astype(np.float64)
        wrong = ~(np.abs(x) <= big)  # NaN, inf and beyond float32
        if wrong.any() and bad[0] == N:
            r, c = np.argwhere(wrong)[0]
            bad = [r0 + int(r), int(c)]
        x = torch.from_numpy(np.where(wrong, 0.0, x))
        sums[:D] += x.sum(0)
        sums[D:D + D * D] += (x.T @ x).reshape(-1)
        sums[-1] += x.shape[0]
    found = comm.all_gather_ints(bad)
    first = int(found[:, 0].argmin())
    if int(found[first, 0]) < N:
        r, c = (int(v) for v in found[first])
        raise ValueError(f"{name}: row {r}, column {c} is NaN, infinite or beyond float32's "
                         f"range; remove or fill such values first (nothing was written)")
    sums = comm.all_reduce_sum(sums.to(comm.device), "all_reduce of the feature statistics").cpu()
    digests = comm.all_reduce_sum(digests.to(comm.device),
                                  "all_reduce of the data's checksums").cpu()
    mean = sums[:D] / N
    cov = sums[D:D + D * D].view(D, D) / N - torch.outer(mean, mean)
    h = hashlib.sha256(f"{data.dtype.str} {N} {D}".encode())
    h.update(digests.to(torch.uint8).numpy().tobytes())
    return mean, cov, h.hexdigest()


def data_transform(mean, cov, whiten, latent_dim, decoder, name):
    """(shift [D], proj [D, Dw]) float64: x -> (x - shift) @ proj. "standardize": each feature to
    zero mean and unit variance (Dw = D); "pca": whitened principal components, the first K for
    the linear decoder, every nondegenerate one for the others (the ICA recipe's)."""
    if whiten == "standardize":
        return mean, torch.diag(1.0 / cov.diagonal().clamp_min(1e-12).sqrt())
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    keep = int((evals > max(float(evals[0]), 1e-300) * 1e-12).sum())
    if latent_dim > keep:
        raise ValueError(f"latent_dim {latent_dim} exceeds the rank of the centered {name} "
                         f"({keep}): there are not that many independent directions")
    if decoder == "linear":
        keep = latent_dim
    # fixed signs (the largest entry of each vector positive): the same on every rank and run
    sign = torch.sign(evecs[evecs.abs().argmax(0), torch.arange(evecs.shape[1])])
    evecs = evecs * torch.where(sign == 0, 1.0, sign)
    return mean, evecs[:, :keep] / evals[:keep].sqrt()


def apply_transform(x: np.ndarray, shift, proj, dtype):
    t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    return ((t - shift) @ proj).to(dtype)
