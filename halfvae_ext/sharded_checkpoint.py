"""Checkpoints of models with a ShardedLatentTable: torch.distributed.checkpoint (DCP) directories
saved on N ranks and loaded on M, each with a manifest of its files' sizes and sha256 (written
atomically once the DCP save has completed, checked before any load) and the caller's metadata
(e.g. what the run was trained on)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

from .atomic_io import write_json_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "verify_checkpoint",
           "CheckpointError", "MANIFEST"]

MANIFEST = "halfvae_manifest.json"
_FORMAT = "halfvae_ext.sharded_checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, damaged or of another format; the
    message names the directory."""


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


def _gather(obj, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


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
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier(group=group)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(model, optimizer)
    state["extra"] = {k: torch.as_tensor(v) for k, v in (extra or {}).items()}
    dcp.save(state, checkpoint_id=partial, process_group=group)
    dist.barrier(group=group)
    names = _files(partial)
    mine = {n: _file_digest(os.path.join(partial, n)) for n in names[rank::world]}
    digests = {}
    for part in _gather(mine, group):
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
    dist.barrier(group=group)


def _manifest(path: str) -> dict:
    """The manifest of checkpoint directory `path` (CheckpointError naming it otherwise)."""
    if not os.path.isdir(path):
        what = "a file, not a directory" if os.path.exists(path) else "no such directory"
        raise CheckpointError(f"checkpoint {path!r}: {what} (give the directory a run with a "
                              f"checkpoint wrote)")
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r}: no {MANIFEST} (not a complete checkpoint "
                              f"of save_checkpoint: a save that did not finish, or another "
                              f"kind of directory)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot read its {MANIFEST}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != _FORMAT or \
            not isinstance(m.get("files"), dict):
        raise CheckpointError(f"checkpoint {path!r}: {MANIFEST} is not a manifest of format "
                              f"{_FORMAT}")
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


def verify_checkpoint(path, process_group=None) -> dict:
    """Check every file of checkpoint `path` against its manifest, collectively (each rank
    hashes a share); every rank raises the same CheckpointError, naming the directory and the
    files, if any is missing, damaged or unlisted. Returns the manifest's meta."""
    path = os.fspath(path)
    group = process_group if process_group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        m, error = _manifest(path), None
    except CheckpointError as e:
        m, error = None, str(e)
    problems = []
    if m is not None:
        files = m["files"]
        listed = sorted(files)
        problems = _damage(path, files, listed[rank::world])
        if rank == 0:
            problems += [f"{n} is not in the manifest" for n in _files(path) if n not in files]
    gathered = _gather((error, problems), group)
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        raise CheckpointError(errors[0])
    found = [p for _, ps in gathered for p in ps]
    if found:
        raise CheckpointError(f"checkpoint {path!r} is damaged, nothing was loaded: "
                              f"{'; '.join(found[:5])}" + (f" (and {len(found) - 5} more)"
                                                           if len(found) > 5 else ""))
    return m.get("meta", {})


def load_checkpoint(path, model: nn.Module, optimizer=None, extra: dict | None = None,
                    process_group=None) -> dict:
    """Load a save_checkpoint directory into model (and optimizer), on any number of ranks: each
    rank reads the rows it owns now, whatever the layout they were saved in. The files are
    checked against the manifest first (verify_checkpoint: CheckpointError naming the directory,
    nothing loaded). extra: the keys to read, with example values (their dtype and shape);
    returns them."""
    import torch.distributed.checkpoint as dcp
    path = os.fspath(path)
    group = process_group if process_group is not None else dist.group.WORLD
    verify_checkpoint(path, group)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(model, optimizer)
    state["extra"] = {k: torch.as_tensor(v).clone() for k, v in (extra or {}).items()}
    dcp.load(state, checkpoint_id=path, process_group=group)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return state["extra"]
