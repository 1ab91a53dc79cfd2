"""End-to-end benchmark: time per epoch of Half-VAE training with an MLP decoder, the model's KL on
the fused op against the same model on the plain PyTorch reference ops.

    python -m benchmarks.bench_training [--rows 10000,100000,1000000] [--batch-size 4096]

Same model, data, optimizer (Adam over all parameters) and batches for both; only the op behind
LatentTable differs (the reference draws eps with torch.randn). Median epoch time over --epochs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from halfvae_ext import models, reference
from halfvae_ext.atomic_io import write_json_atomic
from halfvae_ext.models import latent_table


def _reference_op(mu, logvar, logits, means, logvars, *, eps=None, generator=None, **options):
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return reference.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps, **options)


@contextlib.contextmanager
def reference_ops():
    """The reference op in place of the fused one where HalfVAE's ELBO calls it: the KL of
    LatentTable.sample (a table without a fused optimizer, as here)."""
    fused = latent_table.reparam_gmm_kl
    latent_table.reparam_gmm_kl = _reference_op
    try:
        yield
    finally:
        latent_table.reparam_gmm_kl = fused


def epoch_seconds(N, data_dim, latent_dim, batch_size, epochs, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, data_dim, generator=g).to(device)
    torch.manual_seed(seed)
    model = models.HalfVAE(N, data_dim, latent_dim, decoder="mlp", hidden=(64, 64)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs + 1):  # the first epoch is warm-up
        perm = torch.randperm(N, generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in range(0, N, batch_size):
            idx = perm[b:b + batch_size]
            loss = model.negative_elbo(X[idx], idx).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="10000,100000,1000000")
    p.add_argument("--data-dim", type=int, default=8)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{'N':>9} {'fused s/epoch':>14} {'reference s/epoch':>18} {'speed-up':>9}")
    for N in (int(n) for n in args.rows.split(",")):
        fused = epoch_seconds(N, args.data_dim, args.latent_dim, args.batch_size, args.epochs,
                              device)
        with reference_ops():
            ref = epoch_seconds(N, args.data_dim, args.latent_dim, args.batch_size, args.epochs,
                                device)
        rows.append({"N": N, "fused_seconds": fused, "reference_seconds": ref})
        print(f"{N:>9} {fused:14.3f} {ref:18.3f} {ref / fused:8.2f}x", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "bench_training.json"),
                      {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
