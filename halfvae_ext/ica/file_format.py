"""The estimator's files (``HalfVAEICA.save``, checkpoints): one ``torch.save`` dictionary read
back with ``torch.load(weights_only=True)``, tagged, versioned and checksummed here, and only
here.

    {"format": FORMAT, "version": VERSION, "params": {...}, "fitted": {...}, "run": {...},
     "sha256": hex digest of the rest}

``params``: the estimator's parameters as plain Python values; ``fitted``: the preprocessing
arrays (tensors); ``run``: ``RunState.to_dict()``. The checksum covers every value, tensors by
their bytes, so damaged bytes are an error on load, not a model of NaN. Files written before the
checksum existed (no "sha256") are read as they are.
"""
from __future__ import annotations

import errno
import hashlib
import os
from numbers import Integral

import numpy as np
import torch

from ..atomic_io import atomic_torch_save

__all__ = ["FORMAT", "VERSION", "write", "read", "checksum", "file_params", "estimator_params",
           "plain", "refuse_to_replace"]

FORMAT = "halfvae_ext.HalfVAEICA"
VERSION = 1
_SUM = "sha256"
# How a numpy RandomState given as random_state is written (the run keeps its seeds).
_RANDOM_STATE_OBJECT = "RandomState"


def plain(v):
    """v with numpy scalars (also inside lists and tuples) as the Python numbers they hold: the
    parameter table accepts np.int64(3) or np.float32(0.01), but files are read with
    torch.load(weights_only=True), which refuses numpy objects, and the recipe should compute
    with the same values whether they came from the user or from a file."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return type(v)(plain(x) for x in v)
    return v


def file_params(params: dict) -> dict:
    """An estimator's ``get_params()`` as files hold them: plain Python values (:func:`plain`),
    lists for hidden and a noise schedule, strings for paths and devices."""
    params = {k: plain(v) for k, v in params.items()}
    params["hidden"] = list(params["hidden"]) if not isinstance(params["hidden"], Integral) \
        else params["hidden"]
    if isinstance(params["noise"], (tuple, list)):
        params["noise"] = [float(x) for x in params["noise"]]
    if params["checkpoint_path"] is not None:
        params["checkpoint_path"] = os.fspath(params["checkpoint_path"])
    params["device"] = str(params["device"])
    if isinstance(params["random_state"], np.random.RandomState):
        params["random_state"] = _RANDOM_STATE_OBJECT
    return params


def estimator_params(params: dict) -> dict:
    """The inverse of :func:`file_params`: the keyword arguments of a HalfVAEICA."""
    params = dict(params)
    for name in ("hidden", "noise"):
        if isinstance(params.get(name), list):
            params[name] = tuple(params[name])
    if params.get("random_state") == _RANDOM_STATE_OBJECT:
        params["random_state"] = np.random.RandomState()
    return params


def _feed(h, obj) -> None:
    """Hash obj's type and value; dict keys in a fixed order (optimizer states have int keys)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checksum(payload: dict) -> str:
    """sha256 of the payload's values, its own checksum entry left out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != _SUM})
    return h.hexdigest()


def write(path, params: dict, fitted: dict, run: dict) -> None:
    """Write an estimator file at ``path`` atomically (a read-only file there is refused)."""
    payload = {"format": FORMAT, "version": VERSION, "params": params, "fitted": fitted,
               "run": run}
    payload[_SUM] = checksum(payload)
    atomic_torch_save(payload, path)


def read(path) -> dict:
    """The payload of the estimator file at ``path``, checked: FileNotFoundError if there is
    none, ValueError naming ``path`` if it is not such a file, another version, or damaged."""
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable HalfVAEICA file ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a HalfVAEICA file")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported HalfVAEICA file version "
                         f"{payload.get('version')!r}")
    if _SUM in payload and payload[_SUM] != checksum(payload):
        raise ValueError(f"{path}: the file is damaged (its checksum does not match its "
                         "contents); use another copy or fit again")
    missing = [k for k in ("params", "fitted", "run") if not isinstance(payload.get(k), dict)]
    if missing:
        raise ValueError(f"{path}: not a complete HalfVAEICA file (no {', '.join(missing)})")
    return payload


def refuse_to_replace(path, resume: bool) -> None:
    """FileExistsError naming ``path`` if a fresh fit would replace a file there. With
    ``resume`` a checkpoint of a run whose every restart diverged may be replaced: it holds no
    model, and resuming it starts afresh."""
    if not os.path.exists(path):
        return
    if resume:
        from .restarts import RunState  # restarts -> recipe -> this module
        try:
            if RunState.from_dict(read(path)["run"]).diverged:
                return
        except (ValueError, KeyError, TypeError):
            pass
    raise FileExistsError(errno.EEXIST, "checkpoint_path holds a file that a fresh fit would "
                          "replace; pass resume=True to continue its run, or remove it or choose "
                          "another path", os.fspath(path))
