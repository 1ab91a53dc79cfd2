"""Memory for large latent tables and their optimizer state.

A table of 10^8 rows is gigabytes read at random rows. With the default 4 KiB pages, nearly every
touched row is a TLB miss whose page walk itself misses the cache; with 2 MiB transparent huge
pages the page tables of the whole table fit in cache. `empty_table` asks the kernel for huge pages
(madvise) before the memory is first touched. Where the kernel does not allow it (THP "never"),
or off Linux, it is an ordinary torch.empty. HALFVAE_HUGE_PAGES=0 turns it off (for comparisons).
"""
from __future__ import annotations

import os

import torch

from . import _C

# Below this size a table fits in the TLB's reach anyway and advice would only cost a system call.
HUGE_PAGE_MIN_BYTES = 8 << 20


def huge_pages_enabled() -> bool:
    return os.environ.get("HALFVAE_HUGE_PAGES", "1") != "0"


def empty_table(shape, dtype=None, device=None) -> torch.Tensor:
    """torch.empty(shape), with transparent huge pages asked for when it is a big CPU tensor.
    Fill it afterwards (the advice applies to pages not yet touched)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu" and nbytes >= HUGE_PAGE_MIN_BYTES and huge_pages_enabled():
        _C.advise_huge_pages(t.data_ptr(), nbytes)
    return t


def huge_page_bytes() -> int | None:
    """Bytes of this process's memory on transparent huge pages (Linux), else None: tells whether
    the advice was granted (memory fragmentation can make the kernel fall back to 4 KiB pages)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Per-element moments and per-row values of each fused optimizer (see table_optim).
MOMENTS_PER_ELEMENT = {"adam": 4, "rowwise_adam": 2, "rowwise_adagrad": 0, "sgd": 0}
ROW_STATE_SIZE = {"rowwise_adam": 3, "rowwise_adagrad": 2}
RECORD_ALIGN_BYTES = 64  # a cache line


def record_layout(num_latents: int, dtype: torch.dtype, kind: str, state_dtype: torch.dtype):
    """(record length, moments offset, moments length) in elements of `dtype` for one row stored
    as [mu (K) | logvar (K) | per-row state (R) | per-element moments (M*K of state_dtype)], padded
    to whole cache lines. K = 8 float32 with rowwise_adam and bfloat16 moments: 64 + 12 + 32 = 108
    bytes -> 128, two cache lines (exact Adam's table and moments: 192)."""
    K, size = num_latents, torch.empty((), dtype=dtype).element_size()
    state_size = torch.empty((), dtype=state_dtype).element_size()
    moments_at = 2 * K + ROW_STATE_SIZE.get(kind, 0)
    moments_len = -(-MOMENTS_PER_ELEMENT[kind] * K * state_size // size)
    per_line = RECORD_ALIGN_BYTES // size
    length = -(-(moments_at + moments_len) // per_line) * per_line
    return length, moments_at, moments_len


def record_views(record: torch.Tensor, num_latents: int, kind: str, state_dtype: torch.dtype):
    """The tensors a [rows, length] record holds (views, see record_layout): mu [rows, K], logvar
    [rows, K], moments [rows, M, K] (state_dtype) and per-row state [rows, R] (None when R = 0)."""
    K, rows = num_latents, record.shape[0]
    _, at, n = record_layout(K, record.dtype, kind, state_dtype)
    R, M = ROW_STATE_SIZE.get(kind, 0), MOMENTS_PER_ELEMENT[kind]
    moments = record[:, at:at + n]
    if state_dtype != record.dtype:
        moments = moments.view(state_dtype)
    moments = moments[:, :M * K].unflatten(1, (M, K))
    return record[:, :K], record[:, K:2 * K], moments, record[:, 2 * K:2 * K + R] if R else None


def empty_record_table(num_rows: int, num_latents: int, dtype: torch.dtype, kind: str,
                       state_dtype: torch.dtype, device=None) -> torch.Tensor:
    """An uninitialized [rows, length] record table (huge pages asked for, as empty_table)."""
    length, _, _ = record_layout(num_latents, dtype, kind, state_dtype)
    return empty_table((num_rows, length), dtype=dtype, device=device)
