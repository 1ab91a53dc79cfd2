"""Atomic file writes: a reader, or a crash, never sees a half-written file, and a file a user
already has is never lost to a failed write. Light on imports (the benchmarks use it too)."""
from __future__ import annotations

import json
import os
import tempfile


def _new_file_mode(path: str) -> int:
    """The mode the file would get from a plain open(): the existing file's, else 0o666 minus the
    umask (mkstemp itself creates 0o600 files)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path, write, mode="w") -> None:
    """write(f) into a temporary file in the target's directory, fsync, then os.replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_torch_save(obj, path) -> None:
    """torch.save with atomic_write."""
    import torch
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def write_json_atomic(path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def save_figure_atomic(fig, path, **savefig_kwargs) -> None:
    """matplotlib figure to PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", **savefig_kwargs), "wb")
