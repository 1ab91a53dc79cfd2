"""Fit a Half-VAE whose latent table is split across processes; data read through np.load(mmap).

    torchrun --nproc-per-node 2 -m halfvae_ext.fit_sharded DATA.npy --latent-dim 8 \\
        --batch-size 4096 --epochs 5 --out MEANS.npy [--checkpoint DIR [--resume]]

DATA.npy: [N, D] float rows. No rank loads it whole: each reads its share of every global batch
(fancy indexing of the memory map) and its own row block for the feature statistics. The global
batch of step s is a function of (seed, s) only (an affine permutation of the rows per epoch), and
each rank asks for a contiguous part of it, so 1, 2 or W processes fit the same model (to float
rounding). MEANS.npy: the posterior means [N, K] (float32), each rank writing its own rows into
one file, renamed into place when all have finished. Without torchrun it runs as one process.
With --checkpoint the state is saved every --checkpoint-every steps and at the end (DCP; any
number of ranks can resume it with --resume).
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from .distributed import (ShardedLatentTable, all_reduce_gradients, init_process_group,
                          load_checkpoint, save_checkpoint)
from .models import HalfVAE
from .table_optim import FUSED_OPTIMIZERS, check_fused_optimizer


def _ensure_env():
    """A single process without torchrun: a group of one on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


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


def _feature_stats(data, start, stop, device):
    """Mean and standard deviation of every feature over all rows: each rank sums its own block."""
    D = data.shape[1]
    sums = torch.zeros(2 * D + 1, dtype=torch.float64, device=device)
    for r0 in range(start, stop, 1 << 16):
        x = torch.from_numpy(np.asarray(data[r0:min(stop, r0 + (1 << 16))], dtype=np.float64))
        sums[:D] += x.sum(0).to(device)
        sums[D:2 * D] += (x * x).sum(0).to(device)
        sums[2 * D] += x.shape[0]
    dist.all_reduce(sums)
    n = sums[2 * D]
    mean = sums[:D] / n
    std = (sums[D:2 * D] / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


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


def fit(args) -> dict:
    _ensure_env()
    init_process_group("gloo" if args.device == "cpu" else "nccl", timeout_s=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.device == "cpu" else torch.device(
        "cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        data = np.load(args.data, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise SystemExit(f"data: cannot read {args.data!r} as a .npy file: {e}")
    if data.ndim != 2:
        raise SystemExit(f"data: {args.data!r} must hold a 2-D array [rows, features], got "
                         f"shape {data.shape}")
    N, D = data.shape
    K = args.latent_dim
    torch.manual_seed(args.seed)  # the decoder's start: the same on every rank
    table = ShardedLatentTable(N, K, fused_optimizer=args.table_optimizer, lr=args.table_lr,
                               state_dtype=getattr(torch, args.state_dtype), seed=args.seed,
                               init_std=args.init_std, device=device, timeout=args.timeout)
    model = HalfVAE(N, D, K, decoder=args.decoder, num_components=args.components,
                    latents=table).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    mean, std = _feature_stats(data, table.row_start, table.row_stop, device)
    steps_per_epoch = -(-N // args.batch_size)
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    step = 0
    if args.resume and args.checkpoint and os.path.isdir(args.checkpoint):
        extra = load_checkpoint(args.checkpoint, model, opt, extra={"step": torch.tensor(0)})
        step = int(extra["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {step}", flush=True)
    t0, losses = time.perf_counter(), []
    while step < total:
        rows = batch_rows(N, args.batch_size, args.seed, step, world, rank)
        global_b = min(N, (step % steps_per_epoch) * args.batch_size + args.batch_size) - \
            (step % steps_per_epoch) * args.batch_size
        x = torch.from_numpy(np.asarray(data[rows], dtype=np.float32)).to(device)
        x = (x - mean) / std
        idx = torch.from_numpy(rows).to(device)
        loss = model(x, idx).sum() / global_b
        opt.zero_grad(set_to_none=False)
        loss.backward()
        all_reduce_gradients(model, timeout=args.timeout)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if args.checkpoint and (step % args.checkpoint_every == 0 or step == total):
            save_checkpoint(args.checkpoint, model, opt, extra={"step": torch.tensor(step)})
        if step % steps_per_epoch == 0 or step == total:
            # each rank's loss is its share of the step's mean: the sum over ranks is the mean
            summed = torch.tensor([sum(losses)], dtype=torch.float64, device=device)
            dist.all_reduce(summed)
            if rank == 0:
                print(f"step {step}/{total}: mean -ELBO per row {float(summed[0]) / len(losses):.4f}"
                      f" ({time.perf_counter() - t0:.1f} s)", flush=True)
            losses = []
    if args.out:
        write_means(table, args.out, standardize=args.standardize_out)
    result = {"steps": step, "seconds": time.perf_counter() - t0, "world": world}
    table.comm.barrier()  # no rank tears down while a peer may still talk to it
    dist.destroy_process_group()
    return result


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
    p.add_argument("--decoder", default="linear", choices=["linear", "mlp", "residual"])
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
    p.add_argument("--resume", action="store_true", help="start from --checkpoint if it exists")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may take")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    for name in ("latent_dim", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:  # the table's own rule, before any process group starts
        check_fused_optimizer(args.table_optimizer, torch.float32,
                              getattr(torch, args.state_dtype))
    except ValueError as e:
        raise SystemExit(f"--state-dtype {args.state_dtype}: {e}")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise SystemExit(f"--out: no directory for {args.out!r}")
    fit(args)


if __name__ == "__main__":
    sys.exit(main())
