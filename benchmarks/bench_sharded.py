"""Step time of a Half-VAE on a row-sharded latent table, 1 and 2 ranks (gloo, CPU, one thread a
rank), at a fixed batch per rank; bytes sent per step against the formula; the split of a step
into kernel / exchange / Python.

    python benchmarks/bench_sharded.py [--worlds 1 2] [--batch 4096] [--rows-per-rank 262144]
                                       [--steps 60] [--warmup 10] [--json OUT.json]

Each rank asks for B uniformly random global rows a step (so a fraction (W - 1) / W of them lives
on other ranks), runs HalfVAE's ELBO (linear decoder, D = K, exact likelihood: it reads the rows)
and the backward (owners' fused Adam step), then all-reduces the replicated gradients and steps
Adam on them. Formula, per rank and step, for ids owned elsewhere (B (W - 1) / W of them):
8 bytes (id) out + (3K + 1) * 4 (z, kl, mu, logvar) back + (3K + 1) * 4 (their gradients) out
again; the sender counts what it sends: 8 + 2 (3K + 1) * 4 bytes per remote id, plus the
all_gather of (error flag, seed, offset, eps/u flags, kl, W counts) int64s to W - 1 peers, plus the
replicated gradients' all-reduce (counted as its payload, 4 bytes a parameter; a ring all-reduce
moves 2 (W - 1) / W of that per rank).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def worker(rank, world, port, args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from halfvae_ext import HalfVAE
    from halfvae_ext.distributed import (ShardedLatentTable, all_reduce_gradients,
                                         init_process_group)
    init_process_group("gloo", timeout_s=120, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                       world_size=world)
    K, B = args.k, args.batch
    N = args.rows_per_rank * world
    table = ShardedLatentTable(N, K, fused_optimizer="adam", lr=0.05, seed=1)
    model = HalfVAE(N, K, K, decoder="linear", latents=table)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, K, generator=g)
    comm = table.comm
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            comm.bytes_sent, comm.exchange_s, comm.kernel_s = 0, 0.0, 0.0
            dist.barrier()
        idx = torch.randint(0, N, (B,), generator=g)
        t0 = time.perf_counter()
        loss = model(x, idx).sum() / (B * world)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        all_reduce_gradients(model)
        opt.step()
        times.append(time.perf_counter() - t0)
    steps = args.steps
    t = sorted(times[args.warmup:])
    n_params = sum(p.numel() for p in model.parameters())
    remote = B * (world - 1) / world
    formula = remote * (8 + 2 * (3 * K + 1) * 4) + (8 * (6 + world) * (world - 1)
                                                    + (4 * n_params if world > 1 else 0))
    result = dict(world=world, rank=rank, batch_per_rank=B, K=K, rows=N,
                  step_ms_median=1e3 * t[len(t) // 2], step_ms_mean=1e3 * sum(t) / len(t),
                  bytes_sent_per_step=comm.bytes_sent / steps, bytes_formula=formula,
                  kernel_ms=1e3 * comm.kernel_s / steps, exchange_ms=1e3 * comm.exchange_s / steps)
    result["python_ms"] = result["step_ms_mean"] - result["kernel_ms"] - result["exchange_ms"]
    if world == 1:  # the same step on the single-process LatentTable (fused Adam), for scale
        plain = HalfVAE(N, K, K, decoder="linear", table_optimizer="adam", table_lr=0.05)
        popt = torch.optim.Adam([p for n, p in plain.named_parameters() if "latents" not in n],
                                lr=1e-3)
        pt = []
        for step in range(args.warmup + args.steps):
            idx = torch.randint(0, N, (B,), generator=g)
            t0 = time.perf_counter()
            loss = plain(x, idx).sum() / B
            popt.zero_grad(set_to_none=False)
            loss.backward()
            popt.step()
            pt.append(time.perf_counter() - t0)
        pt = sorted(pt[args.warmup:])
        result["unsharded_step_ms_median"] = 1e3 * pt[len(pt) // 2]
    out = [None] * world
    dist.all_gather_object(out, result)
    if rank == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


def run(world, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = ["--batch", str(args.batch), "--rows-per-rank", str(args.rows_per_rank), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--k", str(args.k)]
    procs = [subprocess.Popen([sys.executable, HERE, "--worker", str(r), str(world), str(port),
                               *argv], stdout=subprocess.PIPE, env=env, text=True)
             for r in range(world)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank of the {world}-rank run failed")
    return json.loads(outs[0].strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rows-per-rank", type=int, default=1 << 18)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("--worker", nargs=3, type=int, metavar=("RANK", "WORLD", "PORT"))
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, args)
        return
    rows = []
    for world in args.worlds:
        rows.extend(run(world, args))
    print(f"{'W':>2} {'rank':>4} {'step ms':>8} {'kernel':>7} {'exchange':>8} {'python':>7} "
          f"{'bytes/step':>11} {'formula':>9}")
    for r in rows:
        if "unsharded_step_ms_median" in r:
            print(f"(LatentTable, one process, same step: {r['unsharded_step_ms_median']:.2f} ms)")
        print(f"{r['world']:>2} {r['rank']:>4} {r['step_ms_median']:8.2f} {r['kernel_ms']:7.2f} "
              f"{r['exchange_ms']:8.2f} {r['python_ms']:7.2f} {r['bytes_sent_per_step']:11.0f} "
              f"{r['bytes_formula']:9.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
