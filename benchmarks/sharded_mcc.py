"""MCC of the sharded `halfvae separate` (torchrun, W processes) against the one-process
HalfVAEICA on a linear mix of sparse (Laplace) sources. A few minutes on 2 cores at the defaults:

    OMP_NUM_THREADS=1 python -m benchmarks.sharded_mcc --rows 20000 --sources 8 --world 2 \
        --batch-size 2048 --steps 1500 --epochs 150

Prints one line per method: MCC against the true sources and seconds.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--sources", type=int, default=8)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=1500, help="sharded: steps (--max-iter)")
    p.add_argument("--epochs", type=int, default=150, help="one process: epochs (max_iter)")
    p.add_argument("--restarts", type=int, default=1, help="one process: restarts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-one-process", action="store_true")
    a = p.parse_args(argv)
    from halfvae_ext.ica.data import make_linear
    from halfvae_ext.ica.metrics import mean_corr_coef
    prob = make_linear(a.rows, a.sources, "laplace", random_state=a.seed)
    with tempfile.TemporaryDirectory() as d:
        x = os.path.join(d, "x.npy")
        np.save(x, prob.X.astype(np.float32))
        out = os.path.join(d, "s.npy")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.world),
               "--master-port", str(_port()), "-m", "halfvae_ext.cli", "separate", x, "-k",
               str(a.sources), "-o", out, "--batch-size", str(a.batch_size), "--max-iter",
               str(a.steps), "--seed", str(a.seed)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode:
            sys.exit(f"sharded run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        print(f"sharded W={a.world} B={a.batch_size} steps={a.steps}: MCC "
              f"{mean_corr_coef(prob.S, np.load(out)):.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    if a.skip_one_process:
        return
    import torch
    torch.set_num_threads(1)
    from halfvae_ext.ica.estimator import HalfVAEICA
    from halfvae_ext.ica.demo import halfvae_sources
    t0 = time.perf_counter()
    est = HalfVAEICA(a.sources, decoder="linear", max_iter=a.epochs, n_restarts=a.restarts,
                     batch_size=a.batch_size, table_optimizer="fused", random_state=a.seed)
    est.fit(prob.X)
    S = halfvae_sources(est, prob.X)
    print(f"one process HalfVAEICA B={a.batch_size} epochs={a.epochs} restarts={a.restarts}: "
          f"MCC {mean_corr_coef(prob.S, S):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
