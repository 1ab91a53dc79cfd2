"""Checkpoints of models with a ShardedLatentTable: torch.distributed.checkpoint (DCP) directories
saved on N ranks and loaded on M."""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint"]


def _optimizer_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer)


def save_checkpoint(path, model: nn.Module, optimizer=None, extra: dict | None = None,
                    process_group=None) -> None:
    """Save model (its ShardedLatentTable as row shards with their global offsets), optimizer
    and `extra` (ints/tensors, e.g. the step) with torch.distributed.checkpoint, collectively.
    Written to PATH.partial and renamed to PATH when every rank has finished, so PATH is always
    a complete checkpoint (the previous one until the rename). PATH must be on a file system
    every rank sees."""
    import torch.distributed.checkpoint as dcp
    path = os.fspath(path)
    group = process_group if process_group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
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
    if rank == 0:
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=group)


def load_checkpoint(path, model: nn.Module, optimizer=None, extra: dict | None = None,
                    process_group=None) -> dict:
    """Load a save_checkpoint directory into model (and optimizer), on any number of ranks: each
    rank reads the rows it owns now, whatever the layout they were saved in. extra: the keys to
    read, with example values (their dtype and shape); returns them."""
    import torch.distributed.checkpoint as dcp
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: no checkpoint directory at {path!r}")
    group = process_group if process_group is not None else dist.group.WORLD
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
