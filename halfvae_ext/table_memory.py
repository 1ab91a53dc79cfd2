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
