"""Atomic file writes: a reader, or a crash, never sees a half-written file, and a file a user
already has is never lost to a failed write. Light on imports (the benchmarks use it too)."""
from __future__ import annotations

import errno
import json
import os
import stat
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


def _naming(e: OSError, path: str) -> OSError:
    """The same error, naming the user's path instead of the temporary file."""
    if e.errno is None:
        return e
    return type(e)(e.errno, e.strerror, path)


def _refuse_read_only(path: str) -> None:
    # os.replace needs write access to the directory only, so it would replace a read-only file
    # that a plain open() refuses. Mode bits, not os.access: for root os.access is always true.
    try:
        st = os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and (not st.st_mode & 0o222 or not os.access(path, os.W_OK)):
        raise PermissionError(errno.EACCES, "Permission denied (the file is read-only)", path)


def _prefix(path: str) -> str:
    return ".tmp-" + os.path.basename(path) + "-"


def _temporary(path: str, directory: str):
    """(fd, name) of a new temporary file beside ``path``, named after it and this process (so
    that a later write can tell an orphan of a killed writer from a live writer's file)."""
    try:
        return tempfile.mkstemp(prefix=f"{_prefix(path)}{os.getpid()}-", dir=directory)
    except OSError as e:
        raise _naming(e, path) from None


def _remove_orphans(path: str, directory: str) -> None:
    """Delete the temporary files of earlier writes of ``path`` whose process is gone (killed
    mid-write: SIGKILL leaves no chance to clean up)."""
    prefix = _prefix(path)
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours
        return True
    return True


def check_writable(path) -> None:
    """Raise the OSError (naming ``path``) that atomic_write(path, ...) would meet, without writing
    ``path``: a missing or unwritable directory, a directory at ``path``, a read-only file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"No such directory {directory!r}", path)
    _refuse_read_only(path)
    fd, tmp = _temporary(path, directory)
    os.close(fd)
    os.unlink(tmp)


def atomic_write(path, write, mode="w") -> None:
    """write(f) into a temporary file in the target's directory, fsync, then os.replace. An
    OSError names ``path``; a read-only file at ``path`` is refused (PermissionError). Temporary
    files that killed writers of ``path`` left behind are removed first."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    _refuse_read_only(path)
    _remove_orphans(path, directory)
    fd, tmp = _temporary(path, directory)
    try:
        os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and tmp in (e.filename, e.filename2):
            raise _naming(e, path) from None
        raise


def atomic_torch_save(obj, path) -> None:
    """torch.save with atomic_write."""
    import torch
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def write_json_atomic(path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def save_figure_atomic(fig, path, *, close: bool = True, **savefig_kwargs) -> None:
    """matplotlib figure to PNG, atomically; ``close``: close the figure afterwards, whether the
    write worked or not (pyplot keeps every open figure alive)."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", **savefig_kwargs), "wb")
    finally:
        if close:
            import matplotlib.pyplot as plt
            plt.close(fig)
