"""Fit a Half-VAE whose latent table is split across processes; data read through np.load(mmap).

    torchrun --nproc-per-node 2 -m halfvae_ext.fit_sharded DATA.npy --latent-dim 8 \\
        --batch-size 4096 --epochs 5 --out MEANS.npy [--checkpoint DIR [--resume]]

or from Python, on every rank (or in one process without torchrun)::

    from halfvae_ext.fit_sharded import fit
    result = fit("DATA.npy", 8, batch_size=4096, epochs=5, out="MEANS.npy")

DATA.npy: [N, D] float rows. No rank loads it whole: each reads its share of every global batch
(fancy indexing of the memory map) and its share of fixed blocks of rows for one pass that checks
every value is finite, sums the feature statistics and hashes the bytes (the data's fingerprint,
kept with a checkpoint). The global batch of step s is a function of (seed, s) only (an affine
permutation of the rows per epoch), and each rank asks for a contiguous part of it, so 1, 2 or W
processes fit the same model (to float rounding). MEANS.npy: the posterior means [N, K]
(float32), each rank writing its own rows into one file, renamed into place when all have
finished. Without torchrun it runs as one process. With --checkpoint the state is saved every
--checkpoint-every steps and at the end (DCP with a manifest of checksums and of what the run
trained on; any number of ranks can resume it with --resume, the same data and settings only).
"""
from __future__ import annotations

import argparse
import math
import numbers
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from .collectives import CollectiveError, Comm, timedelta_of
from .distributed import (ShardedLatentTable, all_reduce_gradients, init_process_group,
                          load_checkpoint, save_checkpoint)
from .models import HalfVAE
from .sharded_data import apply_transform, data_transform, open_data, scan_data
from .sharded_checkpoint import (MANIFEST, CheckpointError, refuse_fresh_start,
                                 verify_checkpoint)
from .table_optim import FUSED_OPTIMIZERS, check_fused_optimizer

__all__ = ["fit", "main", "parser", "batch_rows", "write_means", "RankFailure"]

DECODERS = ("linear", "mlp", "residual")
# The settings a checkpoint's step counter and shapes mean something under: a resume must match.
_RUN_KEYS = ("data_sha256", "rows", "features", "batch_size", "seed", "latent_dim", "decoder",
             "components", "table_optimizer", "state_dtype", "whiten")


class RankFailure(RuntimeError):
    """A collective of the fit failed or timed out on this rank (a peer died, hung or is slower
    than ``timeout`` allows); the message says which rank, what and what to do."""


def _start_group(backend: str, timeout: float) -> None:
    """The job's group from torchrun's environment; without it (no RANK, no WORLD_SIZE) a group
    of one on an in-process store: no port, and os.environ is left as it was (a library caller
    may fit again, or start its own torchrun)."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        init_process_group(backend, timeout_s=timeout)
    else:
        init_process_group(backend, timeout_s=timeout, store=dist.HashStore(), rank=0,
                           world_size=1)


def _coprime_step(n: int, seed: int, epoch: int) -> tuple[int, int]:
    """(a, b) of the permutation i -> (a i + b) mod n of epoch `epoch`: a coprime to n."""
    g = np.random.default_rng([seed, epoch])
    if n == 1:
        return 1, 0
    while True:
        a = int(g.integers(1, n))
        if math.gcd(a, n) == 1:
            return a, int(g.integers(0, n))


def batch_rows(n: int, batch: int, seed: int, step: int, world: int, rank: int) -> np.ndarray:
    """The global row ids this rank asks for at `step`: its contiguous part of the step's global
    batch (positions [s B, s B + B) of the epoch's permutation; the last batch of an epoch may be
    shorter)."""
    steps_per_epoch = -(-n // batch)
    epoch, s = divmod(step, steps_per_epoch)
    a, b = _coprime_step(n, seed, epoch)
    lo, hi = s * batch, min(n, s * batch + batch)
    size = hi - lo
    r0, r1 = rank * size // world, (rank + 1) * size // world
    pos = np.arange(lo + r0, lo + r1, dtype=np.int64)
    return (a * pos + b) % n


# ----------------------------------------------------------------------------- checks
def _int(name, v, least):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
    return int(v)


def _real(name, v, low, high=math.inf, low_open=True, high_open=True):
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and \
        (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in {lo}{low:g}, {high:g}{hi}, got {v!r}")
    return float(v)


def _choice(name, v, choices):
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def write_means(table: ShardedLatentTable, path: str, standardize: bool = False) -> None:
    """Posterior means [N, K] float32 into one .npy: rank 0 creates PATH.partial.npy, every rank
    writes its rows through a memory map, rank 0 renames it to PATH once all have flushed.
    standardize: each column to zero mean and unit variance (statistics over all ranks' rows)."""
    partial = path + ".partial.npy"
    rank = table.rank
    mu = table.mu.detach().double()
    if standardize:
        sums = torch.cat([mu.sum(0), (mu * mu).sum(0), mu.new_tensor([mu.shape[0]])])
        table.comm.all_reduce_sum(sums)
        K = table.num_latents
        mean = sums[:K] / sums[2 * K]
        std = (sums[K:2 * K] / sums[2 * K] - mean * mean).clamp_min(1e-300).sqrt()
        mu = (mu - mean) / std
    if rank == 0:
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                  shape=(table.num_rows, table.num_latents)).flush()
    table.comm.barrier()
    if table.row_stop > table.row_start:
        m = np.load(partial, mmap_mode="r+")
        m[table.row_start:table.row_stop] = mu.float().cpu().numpy()
        m.flush()
        del m
    table.comm.barrier()
    if rank == 0:
        fd = os.open(partial, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(partial, path)
    table.comm.barrier()


def _check_resume(saved: dict, run: dict, checkpoint: str, steps_per_epoch: int):
    """ValueError naming the first setting of `run` the checkpoint was not trained under."""
    step = saved.get("step")
    for key in _RUN_KEYS:
        if saved.get(key) != run[key]:
            what = "other data (its bytes' sha256 differs)" if key == "data_sha256" else \
                f"{key}={saved.get(key)!r}, this run has {key}={run[key]!r}"
            arg = {"data_sha256": "data", "rows": "data", "features": "data"}.get(key, key)
            raise ValueError(
                f"{arg}: checkpoint {checkpoint!r} was trained on {what}; its step counter "
                f"({step}, epoch {step // steps_per_epoch if step is not None else '?'} at this "
                f"batch size) would not mean the same run. Resume with the settings it was "
                f"saved with, or give another checkpoint directory (without resume) to start "
                f"afresh")


def _lr_factor(step, total, lr_decay):
    """1, then a half cosine down to 0.01 over the last lr_decay fraction of the steps."""
    start = (1.0 - lr_decay) * total
    if lr_decay == 0 or step < start:
        return 1.0
    return max(0.5 * (1.0 + math.cos(math.pi * (step - start) / (total - start))), 0.01)


def fit(data, latent_dim, *, batch_size=4096, epochs=1, steps=None, out=None,
        standardize_out=False, decoder="linear", components=3, lr=1e-2, table_lr=5e-2,
        table_optimizer="adam", state_dtype="float32", init_std=1.0, seed=0, checkpoint=None,
        checkpoint_every=1000, resume=False, trust_unverified_checkpoint=False, timeout=300.0,
        device="cpu", whiten="standardize", init="random", init_logvar=-2.0,
        init_noise_std=1.0, lr_decay=0.0, prior_warmup=0.0) -> dict:
    """Fit a Half-VAE with its latent table split across the ranks of the torchrun job (or of a
    process group already initialized; else one process), collectively: every rank calls it
    with the same arguments.

    data: [N, D] real array, or the path of a .npy file (memory-mapped, never loaded whole).
    latent_dim: K >= 1. batch_size: global rows per step. epochs or steps: the length of the
    fit (steps, when given, replaces epochs; give one). out: path of the posterior means
    [N, K] float32 .npy (standardize_out: each column to zero mean and unit variance).
    decoder: "linear", "mlp" or "residual"; components: the prior's mixture components per
    latent. lr: Adam's rate for the prior and decoder; table_lr, table_optimizer ("adam",
    "rowwise_adam", "rowwise_adagrad", "sgd"), state_dtype ("float32" or "bfloat16"): the
    latent table's fused optimizer. init_std, init_logvar: the table's random start and its
    logvars; seed: the start, the draws and the batches. checkpoint: a DCP directory, saved
    every checkpoint_every steps and at the end; without resume it must not hold a checkpoint
    or other files yet (FileExistsError naming it; an empty directory is fine); resume: continue
    from it (it must exist, be undamaged and have been trained on the same data (sha256),
    batch_size, seed and shapes). trust_unverified_checkpoint: resume from a checkpoint without
    a manifest (saved by a version before manifests, or damaged), unchecked, with a warning.
    timeout: seconds a collective (and the start of the group) may wait for the other ranks (in
    a group the caller started, the checkpoints' collectives wait that group's own timeout).
    device: "cpu" (gloo) or "cuda" (NCCL). whiten: "standardize" (each feature) or "pca"
    (whitened principal components: K for the linear decoder, all for the others); init:
    "random" or "pca" (the table at the whitened scores, the decoder's linear part at the
    identity; needs whiten="pca"). init_noise_std: the observation noise's starting std;
    lr_decay: the last fraction of the steps over which both rates fall along a half cosine;
    prior_warmup: the first fraction of the steps during which the prior's means and weights
    are held (its variances learn).

    Returns {"steps": the step reached, "seconds": training time, "world": ranks}.

    Raises ValueError, naming the argument, for a bad argument, data that cannot be read, a NaN
    or infinite value in data (before any output or checkpoint is written), or a resume that
    does not match its checkpoint; sharded_checkpoint.CheckpointError (a ValueError, naming the
    directory) for a missing or damaged checkpoint; FileExistsError (naming it) for a new run
    into a checkpoint directory that holds one, before anything is trained or written;
    RankFailure when a collective fails or times out (a peer died or hung: which rank, what,
    and how to resume). Never SystemExit.

    Example (one process, 3 latents of a [600, 4] array, 10 steps)::

        fit(np.random.default_rng(0).laplace(size=(600, 4)), 3, batch_size=128, steps=10,
            out="means.npy")
    """
    K = _int("latent_dim", latent_dim, 1)
    B = _int("batch_size", batch_size, 1)
    if steps is not None:
        steps = _int("steps", steps, 1)
        if epochs != 1:
            raise ValueError(f"epochs and steps: give one of them, got epochs={epochs!r} and "
                             f"steps={steps!r}")
    epochs = _int("epochs", epochs, 1)
    _int("components", components, 1)
    _int("checkpoint_every", checkpoint_every, 1)
    seed = _int("seed", seed, 0)
    lr, table_lr = _real("lr", lr, 0), _real("table_lr", table_lr, 0)
    _real("init_std", init_std, 0, low_open=False)
    _real("init_logvar", init_logvar, -math.inf)
    _real("init_noise_std", init_noise_std, 0)
    _real("lr_decay", lr_decay, 0, 1, low_open=False)
    _real("prior_warmup", prior_warmup, 0, 1, low_open=False)
    timedelta_of(timeout)
    _choice("decoder", decoder, DECODERS)
    _choice("table_optimizer", table_optimizer, FUSED_OPTIMIZERS)
    _choice("state_dtype", state_dtype, ("float32", "bfloat16"))
    _choice("device", device, ("cpu", "cuda"))
    _choice("whiten", whiten, ("standardize", "pca"))
    _choice("init", init, ("random", "pca"))
    if init == "pca" and whiten != "pca":
        raise ValueError("init='pca' starts the table at the whitened scores: it needs "
                         f"whiten='pca', got whiten={whiten!r}")
    try:  # the table's own rule, before any process group starts
        check_fused_optimizer(table_optimizer, torch.float32, getattr(torch, state_dtype))
    except ValueError as e:
        raise ValueError(f"state_dtype {state_dtype}: {e}") from None
    if resume and not checkpoint:
        raise ValueError("resume: needs checkpoint, the directory to continue from")
    arr, name = open_data(data)
    N, D = arr.shape
    if K > D:
        raise ValueError(f"latent_dim {K}: {name} has {D} feature column(s); at most that many "
                         f"latents")
    if out is not None:
        out = os.fspath(out)
        out_dir = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(out_dir):
            raise ValueError(f"out: no directory for {out!r}")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise ValueError(f"out {out!r}: its directory is not writable (the means could not "
                             f"be written after the training)")
        if isinstance(data, (str, os.PathLike)) and \
                os.path.realpath(out) == os.path.realpath(os.fspath(data)):
            raise ValueError(f"out {out!r}: the same file as the data (it would be overwritten)")
    checkpoint = os.fspath(checkpoint) if checkpoint else None
    if checkpoint and not resume:  # every rank, before the group starts: none has written yet
        refuse_fresh_start(checkpoint, "pass resume=True (--resume) to continue its run, or "
                           "choose another checkpoint directory or delete this one")

    owns_group = not dist.is_initialized()
    if owns_group:
        try:
            _start_group("gloo" if device == "cpu" else "nccl", float(timeout))
        except dist.DistError as e:
            raise RankFailure(
                f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: "
                f"the process group did not start within timeout={timeout:g} s (a rank did not "
                f"start or cannot reach MASTER_ADDR {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')}): {e}") from e
    # saved: the step of the last complete checkpoint in `checkpoint` (None: none yet)
    where = {"stage": "the data pass", "step": 0, "saved": None}
    try:
        result = _fit(arr, name, K, B, epochs, steps, out, standardize_out, decoder, components,
                      lr, table_lr, table_optimizer, state_dtype, init_std, seed, checkpoint,
                      checkpoint_every, resume, trust_unverified_checkpoint, timeout, device,
                      whiten, init, init_logvar, init_noise_std, lr_decay, prior_warmup, where)
        return result
    except (CollectiveError, dist.DistError) as e:
        rank, world = dist.get_rank(), dist.get_world_size()
        raise RankFailure(
            f"rank {rank} of {world} gave up on {where['stage']} (step "
            f"{where['step']}): the other ranks did not take part within timeout={timeout:g} s "
            f"or a connection failed, so a rank died, hung or is slower than the timeout allows. "
            f"Look at the other ranks' output for their own error; then "
            f"{_again(checkpoint, where['saved'], checkpoint_every)}, or give a larger timeout "
            f"(--timeout) if a rank is merely slow. ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        if owns_group:
            dist.destroy_process_group()


def _again(checkpoint, saved, every):
    """How to rerun after a failed rank: resume only where a checkpoint was saved."""
    if not checkpoint:
        return "rerun (with a checkpoint, a later failure can resume from it)"
    if saved is None:
        return (f"rerun as before, without resume: no checkpoint had been saved to "
                f"{checkpoint!r} yet (every {every} steps)")
    return (f"rerun with resume=True (--resume) from checkpoint {checkpoint!r} (step {saved}, "
            f"saved every {every} steps)")


def _fit(arr, name, K, B, epochs, steps, out, standardize_out, decoder, components, lr,
         table_lr, table_optimizer, state_dtype, init_std, seed, checkpoint, checkpoint_every,
         resume, trust_unverified, timeout, device_name, whiten, init, init_logvar,
         init_noise_std, lr_decay, prior_warmup, where):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if device_name == "cpu" else torch.device(
        "cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = Comm(dist.group.WORLD, timedelta_of(timeout), device, owner="fit_sharded")
    N, D = arr.shape
    mean, cov, fingerprint = scan_data(arr, name, comm)
    shift, proj = data_transform(mean, cov, whiten, K, decoder, name)
    Dw = proj.shape[1]
    steps_per_epoch = -(-N // B)
    total = steps if steps is not None else epochs * steps_per_epoch
    run = {"data_sha256": fingerprint, "rows": N, "features": D, "batch_size": B, "seed": seed,
           "latent_dim": K, "decoder": decoder, "components": components,
           "table_optimizer": table_optimizer, "state_dtype": state_dtype, "whiten": whiten}
    if resume:
        where["stage"] = f"checking checkpoint {checkpoint!r}"
        try:
            saved = verify_checkpoint(checkpoint, trust_unverified=trust_unverified)
        except CheckpointError as e:
            if not e.no_manifest:
                raise
            raise CheckpointError(
                f"resume: checkpoint {checkpoint!r} has no {MANIFEST}: it was written by an "
                f"older version of halfvae_ext (before checkpoints had manifests) or it is "
                f"damaged, so neither its bytes nor the data and settings it was trained on "
                f"can be checked; nothing was loaded. If you trust it, pass "
                f"trust_unverified_checkpoint=True (--trust-unverified-checkpoint) to resume "
                f"from it unchecked", no_manifest=True) from None
        if saved is not None:  # None: trusted without a manifest, nothing to compare
            _check_resume(saved, run, checkpoint, steps_per_epoch)
    torch.manual_seed(seed)  # the decoder's start: the same on every rank
    def scores(rows):  # init="pca": each rank its own (contiguous) rows' whitened scores
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        return apply_transform(arr[r0:r1], shift, proj, torch.float64)[:, :K]
    table = ShardedLatentTable(N, K, fused_optimizer=table_optimizer, lr=table_lr,
                               state_dtype=getattr(torch, state_dtype), seed=seed,
                               init_std=init_std, init_mu=scores if init == "pca" else None,
                               init_logvar=init_logvar, device=device, timeout=timeout)
    model = HalfVAE(N, Dw, K, decoder=decoder, num_components=components, latents=table,
                    init_noise_std=init_noise_std).to(device)
    if init == "pca":
        with torch.no_grad():
            eye = torch.eye(Dw, K)
            if decoder == "linear":
                model.decoder.weight.copy_(eye)
            elif decoder == "residual":
                model.decoder.zero_correction_()
                model.decoder.linear.weight.copy_(eye)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    mean32 = mean.float().to(device)
    std32 = cov.diagonal().clamp_min(1e-12).sqrt().float().to(device)
    step = 0
    if resume:
        where["stage"] = f"loading checkpoint {checkpoint!r}"
        extra = load_checkpoint(checkpoint, model, opt, extra={"step": torch.tensor(0)},
                                verified=True)
        step = where["saved"] = int(extra["step"])
        if rank == 0:
            print(f"resumed from {checkpoint} at step {step}", flush=True)
    warmup = int(prior_warmup * total)
    t0, losses = time.perf_counter(), []
    while step < total:
        where["step"], where["stage"] = step, "a training step (the latent table's exchange " \
            "or the gradients' all_reduce)"
        held = step < warmup
        model.prior.means.requires_grad_(not held)
        model.prior.logits.requires_grad_(not held)
        f = _lr_factor(step, total, lr_decay)
        table.table_optimizer.lr = table_lr * f
        for group in opt.param_groups:
            group["lr"] = lr * f
        rows = batch_rows(N, B, seed, step, world, rank)
        lo = (step % steps_per_epoch) * B
        global_b = min(N, lo + B) - lo
        if whiten == "standardize":  # float32, as the step always was
            x = torch.from_numpy(np.asarray(arr[rows], dtype=np.float32)).to(device)
            x = (x - mean32) / std32
        else:
            x = apply_transform(arr[rows], shift, proj, torch.float32).to(device)
        idx = torch.from_numpy(rows).to(device)
        loss = model(x, idx).sum() / global_b
        opt.zero_grad(set_to_none=False)
        loss.backward()
        all_reduce_gradients(model, timeout=timeout)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if checkpoint and (step % checkpoint_every == 0 or step == total):
            where["stage"], where["step"] = f"saving checkpoint {checkpoint!r}", step
            save_checkpoint(checkpoint, model, opt, extra={"step": torch.tensor(step)},
                            meta={**run, "step": step})
            where["saved"] = step
        if step % steps_per_epoch == 0 or step == total:
            # each rank's loss is its share of the step's mean: the sum over ranks is the mean
            summed = torch.tensor([sum(losses)], dtype=torch.float64, device=device)
            comm.all_reduce_sum(summed, "all_reduce of the epoch's loss")
            if rank == 0:
                print(f"step {step}/{total}: mean -ELBO per row "
                      f"{float(summed[0]) / len(losses):.4f} ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
            losses = []
    if out:
        where["stage"] = f"writing {out!r}"
        write_means(table, out, standardize=standardize_out)
    where["stage"] = "the final barrier"  # no rank tears down while a peer may still talk to it
    comm.barrier("the final barrier (every rank finished)")
    return {"steps": step, "seconds": time.perf_counter() - t0, "world": world}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m halfvae_ext.fit_sharded",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="[N, D] .npy file (memory-mapped, never loaded whole)")
    p.add_argument("--latent-dim", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4096, help="global rows per step")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", help="posterior means [N, K] .npy (float32)")
    p.add_argument("--standardize-out", action="store_true",
                   help="write each column of the means standardized (zero mean, unit variance)")
    p.add_argument("--decoder", default="linear", choices=DECODERS)
    p.add_argument("--components", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-2, help="prior and decoder (Adam)")
    p.add_argument("--table-lr", type=float, default=5e-2, help="latent table (fused step)")
    p.add_argument("--table-optimizer", default="adam", choices=FUSED_OPTIMIZERS,
                   help="the latent table's fused optimizer (rowwise_*: one second moment per "
                        "row, 2 of 3 cache lines a row)")
    p.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the table optimizer's per-element moments (adam, rowwise_adam)")
    p.add_argument("--init-std", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="DCP checkpoint directory")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint (which must exist, same data and settings)")
    p.add_argument("--trust-unverified-checkpoint", action="store_true",
                   help="--resume from a checkpoint without a manifest (an older version's or "
                        "damaged), unchecked, with a warning")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective may wait for the other ranks")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--whiten", default="standardize", choices=["standardize", "pca"],
                   help="each feature standardized, or whitened principal components")
    p.add_argument("--init", default="random", choices=["random", "pca"],
                   help="the table's start: random, or the whitened scores (--whiten pca)")
    p.add_argument("--init-logvar", type=float, default=-2.0)
    p.add_argument("--init-noise-std", type=float, default=1.0)
    p.add_argument("--lr-decay", type=float, default=0.0,
                   help="last fraction of the steps with cosine-decaying rates")
    p.add_argument("--prior-warmup", type=float, default=0.0,
                   help="first fraction of the steps with the prior's means and weights held")
    return p


def main(argv=None) -> int:
    """The command line: parses argv, calls fit(); a bad argument or input (a checkpoint a new
    run would replace included) is one line on stderr and exit status 2, a failed rank or a
    file that cannot be written 1."""
    args = vars(parser().parse_args(argv))
    data, latent_dim = args.pop("data"), args.pop("latent_dim")
    try:
        fit(data, latent_dim, **args)
    except (ValueError, FileExistsError) as e:
        print(f"fit_sharded: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (RankFailure, OSError) as e:
        print(f"fit_sharded: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def exit_after(status: int):
    """Leave the process with `status`. After a failed rank (1) without the interpreter's
    finalization: gloo's threads of a timed-out collective abort it now and then
    (std::terminate, exit -6; pytorch/pytorch#179291), although the message is out."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status == 1:
        os._exit(1)
    sys.exit(status)


if __name__ == "__main__":
    exit_after(main())
