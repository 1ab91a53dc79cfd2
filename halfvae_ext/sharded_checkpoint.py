"""Checkpoints of models with a ShardedLatentTable: torch.distributed.checkpoint (DCP) directories
saved on N ranks and loaded on M, each with a manifest of its files' sizes and sha256 (written
atomically once the DCP save has completed, checked before any load) and the caller's metadata
(e.g. what the run was trained on)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .atomic_io import write_json_atomic
from .collectives import CollectiveError

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "verify_checkpoint",
           "is_checkpoint", "refuse_fresh_start", "CheckpointError",
           "UnverifiedCheckpointWarning", "MANIFEST"]

MANIFEST = "halfvae_manifest.json"
_FORMAT = "halfvae_ext.sharded_checkpoint/1"
_DCP_METADATA = ".metadata"  # the file every DCP checkpoint directory has


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, damaged or of another format; the
    message names the directory. no_manifest: the directory has no manifest at all (a
    checkpoint of a version before manifests, or damaged), which ``trust_unverified`` loads."""

    def __init__(self, message: str, *, no_manifest: bool = False):
        super().__init__(message)
        self.no_manifest = no_manifest


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint without a manifest is being loaded unchecked (``trust_unverified=True``)."""


def is_checkpoint(path) -> bool:
    """Whether directory `path` holds a checkpoint: a manifest, or the DCP metadata of one saved
    before manifests existed."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n))
                                       for n in (MANIFEST, _DCP_METADATA))


def refuse_fresh_start(path, remedy: str) -> None:
    """FileExistsError naming `path` if a run starting afresh there would replace (delete) a
    checkpoint or other files: a file, a directory that is not empty, or the previous checkpoint
    that an interrupted save left at PATH.old. An empty directory, or nothing, is fine. remedy:
    the message's advice (how to resume instead)."""
    path = os.fspath(path)
    old = path + ".old"
    if os.path.lexists(path) and not os.path.isdir(path):
        what = "is a file, not a checkpoint directory"
    elif os.path.isdir(path) and os.listdir(path):
        what = ("holds a checkpoint" if is_checkpoint(path) else
                "is a directory that holds files (not a checkpoint)")
    elif is_checkpoint(old):
        what, path = (f"is missing, and {old!r} holds the checkpoint an interrupted save left "
                      f"there"), old
    else:
        return
    raise FileExistsError(errno.EEXIST, f"the checkpoint path {what}, which a new run would "
                          f"replace; {remedy}", path)


def _refusal_to_replace(path: str) -> str | None:
    """Why save_checkpoint must not replace `path` (it deletes what was there), or None: nothing
    there, an empty directory or a checkpoint."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return "it is a file, not a checkpoint directory"
    try:
        empty = not os.listdir(path)
    except OSError as e:
        return f"cannot list it: {e}"
    if empty or is_checkpoint(path):
        return None
    return (f"the directory holds files but no checkpoint (no {MANIFEST} or DCP "
            f"{_DCP_METADATA}), and a save replaces the whole directory")


def _optimizer_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer)


def _file_digest(path: str) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def _files(directory: str) -> list[str]:
    """Every file of a DCP directory (relative names, sorted), the manifest left out."""
    out = []
    for root, _, names in os.walk(directory):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _cause(e: BaseException) -> str:
    """One line for an error of DCP: a CheckpointException's text is each rank's traceback, whose
    last line is the error itself."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]


def _peer_failure(e: BaseException, what: str, group) -> CollectiveError:
    """A collective of the checkpoint that failed or timed out (gloo raises a plain
    RuntimeError): a CollectiveError, which the caller reports as a failed rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return CollectiveError(f"checkpoint: {what} failed on rank {rank} of {world} within the "
                           f"group's timeout (a rank died, hung or is slower): {_cause(e)}",
                           what, rank, world)


def _gather(obj, group, what="all_gather_object"):
    out = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(out, obj, group=group)
    except RuntimeError as e:
        raise _peer_failure(e, what, group) from e
    return out


def _barrier(group, what):
    try:
        dist.barrier(group=group)
    except RuntimeError as e:
        raise _peer_failure(e, what, group) from e


def _dcp_failed_on_a_peer(e) -> bool:
    """Whether a CheckpointException holds a rank's failed collective (not a bad file or
    shape)."""
    failures = getattr(e, "failures", None) or {}
    return any(isinstance(getattr(f, "exc", f), RuntimeError) for f in failures.values())


def save_checkpoint(path, model: nn.Module, optimizer=None, extra: dict | None = None,
                    process_group=None, meta: dict | None = None) -> None:
    """Save model (its ShardedLatentTable as row shards with their global offsets), optimizer
    and `extra` (ints/tensors, e.g. the step) with torch.distributed.checkpoint, collectively.
    Written to PATH.partial; once the DCP save has completed on every rank, the ranks hash its
    files (each a share) and rank 0 writes the manifest (sizes, sha256 and `meta`, a JSON-able
    dict) atomically, then renames PATH.partial to PATH: PATH is always a complete, checked
    checkpoint (the previous one until the rename). PATH must be on a file system every rank
    sees."""
    import torch.distributed.checkpoint as dcp
    path = os.fspath(path)
    group = process_group if process_group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    partial = path + ".partial"
    refusal = None
    if rank == 0:
        refusal = _refusal_to_replace(path)
        if refusal is None:
            shutil.rmtree(partial, ignore_errors=True)
    # every rank raises rank 0's refusal, nothing written
    refusal = _gather(refusal, group, "the check of the checkpoint path")[0]
    if refusal is not None:
        raise FileExistsError(errno.EEXIST, f"save_checkpoint will not replace it: {refusal}; "
                              f"choose another checkpoint path", path)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(model, optimizer)
    state["extra"] = {k: torch.as_tensor(v) for k, v in (extra or {}).items()}
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        dcp.save(state, checkpoint_id=partial, process_group=group)
    except CheckpointException as e:  # a BaseException: nothing above would catch it
        if _dcp_failed_on_a_peer(e):
            raise _peer_failure(e, "DCP's save", group) from e
        raise OSError(f"checkpoint {path!r}: the save into {partial!r} failed (PATH keeps the "
                      f"previous checkpoint, if any): {_cause(e)}") from e
    _barrier(group, "the barrier after DCP's save")
    names = _files(partial)
    mine = {n: _file_digest(os.path.join(partial, n)) for n in names[rank::world]}
    digests = {}
    for part in _gather(mine, group, "the gather of the checkpoint's checksums"):
        digests.update(part)
    if rank == 0:
        write_json_atomic(os.path.join(partial, MANIFEST),
                          {"format": _FORMAT, "files": digests, "meta": meta or {}})
        fd = os.open(partial, os.O_RDONLY)  # the manifest's directory entry on disk too
        os.fsync(fd)
        os.close(fd)
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(group, "the barrier after the checkpoint's rename")


def _manifest(path: str) -> dict:
    """The manifest of checkpoint directory `path` (CheckpointError naming it otherwise)."""
    if not os.path.isdir(path):
        old = path + ".old"
        if os.path.exists(path):
            what = "a file, not a directory (give the directory a run with a checkpoint wrote)"
        elif is_checkpoint(old):
            what = (f"no such directory, but {old!r} holds the checkpoint before it: a save was "
                    f"interrupted between replacing the two; rename {old!r} to {path!r} to "
                    f"resume from it")
        else:
            what = "no such directory (give the directory a run with a checkpoint wrote)"
        raise CheckpointError(f"checkpoint {path!r}: {what}")
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            m = json.load(f)
    except FileNotFoundError:
        if not os.path.exists(os.path.join(path, _DCP_METADATA)):
            raise CheckpointError(f"checkpoint {path!r}: no {MANIFEST} and no DCP "
                                  f"{_DCP_METADATA}: not a checkpoint (a save that did not "
                                  f"finish, or another kind of directory)") from None
        raise CheckpointError(
            f"checkpoint {path!r} has no {MANIFEST}: it was written by an older version of "
            f"halfvae_ext (before checkpoints had manifests) or it is damaged, so its files "
            f"cannot be verified and nothing was loaded. If you trust it, load it unchecked "
            f"with trust_unverified=True", no_manifest=True) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot read its {MANIFEST} (damaged): "
                              f"{e}") from None
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(m, dict) or m.get("format") != _FORMAT or not isinstance(files, dict) or \
            not all(isinstance(v, dict) and isinstance(v.get("size"), int) and
                    isinstance(v.get("sha256"), str) for v in files.values()) or \
            not isinstance(m.get("meta", {}), dict):
        raise CheckpointError(f"checkpoint {path!r}: {MANIFEST} is not a manifest of format "
                              f"{_FORMAT} (damaged, or of another program)")
    return m


def read_checkpoint_meta(path) -> dict:
    """The `meta` a checkpoint was saved with (no collective; CheckpointError naming the
    directory if it is missing or has no readable manifest)."""
    return _manifest(os.fspath(path)).get("meta", {})


def _damage(path: str, files: dict, names: list[str]) -> list[str]:
    problems = []
    for n in names:
        full = os.path.join(path, n)
        if not os.path.isfile(full):
            problems.append(f"{n} is missing")
            continue
        got = _file_digest(full)
        if got["size"] != files[n].get("size"):
            problems.append(f"{n} has {got['size']} bytes, {files[n].get('size')} were saved")
        elif got["sha256"] != files[n].get("sha256"):
            problems.append(f"{n} does not match its saved sha256 (damaged bytes)")
    return problems


def verify_checkpoint(path, process_group=None, *,
                      trust_unverified: bool = False) -> dict | None:
    """Check every file of checkpoint `path` against its manifest, collectively (each rank
    hashes a share); every rank raises the same CheckpointError, naming the directory and the
    files, if any is missing, damaged or unlisted. Returns the manifest's meta.

    A checkpoint without a manifest (saved by a version before manifests, or damaged) is a
    CheckpointError too (``no_manifest``), unless trust_unverified: then, if it is a DCP
    checkpoint at all, rank 0 warns (UnverifiedCheckpointWarning) and None is returned (no
    meta: what it was trained on is unknown)."""
    path = os.fspath(path)
    group = process_group if process_group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        m, error = _manifest(path), None
    except CheckpointError as e:
        m, error = None, (str(e), e.no_manifest)
    problems = []
    if m is not None:
        files = m["files"]
        listed = sorted(files)
        problems = _damage(path, files, listed[rank::world])
        if rank == 0:
            problems += [f"{n} is not in the manifest" for n in _files(path) if n not in files]
    gathered = _gather((error, problems), group, "the gather of the checkpoint's checks")
    errors = [e for e, _ in gathered if e is not None]
    if errors and trust_unverified and all(no_manifest for _, no_manifest in errors):
        if rank == 0:
            warnings.warn(f"checkpoint {path!r} has no {MANIFEST} (written by an older version "
                          f"or damaged): loading it unverified, as trust_unverified asks; its "
                          f"bytes and what it was trained on are not checked",
                          UnverifiedCheckpointWarning, stacklevel=2)
        return None
    if errors:
        raise CheckpointError(errors[0][0], no_manifest=errors[0][1])
    found = [p for _, ps in gathered for p in ps]
    if found:
        raise CheckpointError(f"checkpoint {path!r} is damaged, nothing was loaded: "
                              f"{'; '.join(found[:5])}" + (f" (and {len(found) - 5} more)"
                                                           if len(found) > 5 else ""))
    return m.get("meta", {})


def load_checkpoint(path, model: nn.Module, optimizer=None, extra: dict | None = None,
                    process_group=None, *, trust_unverified: bool = False,
                    verified: bool = False) -> dict:
    """Load a save_checkpoint directory into model (and optimizer), on any number of ranks: each
    rank reads the rows it owns now, whatever the layout they were saved in. The files are
    checked against the manifest first (verify_checkpoint: CheckpointError naming the directory,
    nothing loaded; trust_unverified: a checkpoint without a manifest is loaded with a warning).
    verified: the caller has just run verify_checkpoint (each file is not hashed twice). A
    checkpoint that does not fit the model (other shapes or keys) is a CheckpointError naming
    the directory. extra: the keys to read, with example values (their dtype and shape);
    returns them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    path = os.fspath(path)
    group = process_group if process_group is not None else dist.group.WORLD
    if not verified:
        verify_checkpoint(path, group, trust_unverified=trust_unverified)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(model, optimizer)
    state["extra"] = {k: torch.as_tensor(v).clone() for k, v in (extra or {}).items()}
    try:
        dcp.load(state, checkpoint_id=path, process_group=group)
        model.load_state_dict(state["model"])
        if optimizer is not None:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
    except dist.DistError:
        raise  # a peer failed: the caller's to report
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        if isinstance(e, CheckpointException) and _dcp_failed_on_a_peer(e):
            raise _peer_failure(e, "DCP's load", group) from e
        raise CheckpointError(f"checkpoint {path!r} does not fit this model and optimizer "
                              f"(other shapes, keys or dtypes; the model may be partly "
                              f"loaded): {_cause(e)}") from e
    return state["extra"]
