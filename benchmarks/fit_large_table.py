"""A Half-VAE fit on a latent table of 10^7 rows with mini-batches and a fused table optimizer.

    python benchmarks/fit_large_table.py [--rows 10000000] [--steps 300] [--batch 4096]
        [--optimizers fused,rowwise_adam,rowwise_adam_bf16,rowwise_adagrad]

Data: --rows samples of 4 Laplace sources mixed by a random 4x4 matrix. The table (mu, logvar) is
trained by the optimizer fused into the backward (LatentTable(fused_optimizer=...), see
halfvae_ext.table_optim.FUSED_TABLE_OPTIMIZERS), the decoder, noise and prior by
torch.optim.Adam. Each optimizer gets the same data, initialization and batches. Prints step time,
the negative ELBO per sample over training and the table + optimizer-state bytes; then each
optimizer's final -ELBO (mean of the last 20 steps) against exact Adam's.
"""
import argparse
import time

import torch

from halfvae_ext.models import HalfVAE
from halfvae_ext.table_optim import FUSED_TABLE_OPTIMIZERS


def fit(X, method, steps, batch, seed=0):
    """(median step seconds, per-step -ELBO per sample, bytes a table row takes)."""
    N, D = X.shape
    kind, state_dtype = FUSED_TABLE_OPTIMIZERS[method]
    torch.manual_seed(seed)
    model = HalfVAE(N, D, D, decoder="linear", table_optimizer=kind,
                    table_state_dtype=state_dtype, table_lr=0.05, init_noise_std=0.5)
    others = [p for n, p in model.named_parameters() if not n.startswith("latents.")]
    opt = torch.optim.Adam(others, lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    times, losses = [], []
    for step in range(steps):
        idx = torch.randint(0, N, (batch,), generator=g)
        t0 = time.perf_counter()
        loss = model.negative_elbo(X[idx], idx).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # the table rows are updated here
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            print(f"  {method:>17} step {step:5d}  -ELBO/sample {loss.item():9.4f}", flush=True)
    assert model.latents.mu.grad is None, "no table gradient should exist"
    return sorted(times)[len(times) // 2], losses, model.latents.bytes_per_row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--optimizers", default=",".join(FUSED_TABLE_OPTIMIZERS),
                   help=f"comma-separated, of {', '.join(FUSED_TABLE_OPTIMIZERS)} "
                   "(fused: exact Adam)")
    args = p.parse_args(argv)
    methods = args.optimizers.split(",")
    unknown = [m for m in methods if m not in FUSED_TABLE_OPTIMIZERS]
    if unknown:
        p.error(f"--optimizers: unknown {unknown}; choose from {list(FUSED_TABLE_OPTIMIZERS)}")
    g = torch.Generator().manual_seed(0)
    N, D = args.rows, args.dim
    S = torch.distributions.Laplace(0.0, 1.0).sample((N, D))
    A = torch.randn(D, D, generator=g)
    X = S @ A.T
    X = (X - X.mean(0)) / X.std(0)
    del S
    print(f"rows={N:,} dim={D} batch={args.batch} steps={args.steps}; data "
          f"{X.numel() * 4 / 2**20:.0f} MiB")
    results = {}
    for method in methods:
        med, losses, per_row = fit(X, method, args.steps, args.batch)
        last = sum(losses[-20:]) / min(20, len(losses))
        results[method] = last
        print(f"{method:>17}: median step {med * 1e3:.2f} ms; -ELBO/sample first 20 steps "
              f"{sum(losses[:20]) / min(20, len(losses)):.4f} -> last 20 {last:.4f}; "
              f"{per_row} bytes a row ({N * per_row / 2**30:.2f} GiB table + state)", flush=True)
    if "fused" in results:
        print(f"final -ELBO/sample (mean of the last 20 of {args.steps} steps) against exact Adam:")
        for method, last in results.items():
            print(f"  {method:>17} {last:.4f}  ({100 * (last / results['fused'] - 1):+.2f}%)")


if __name__ == "__main__":
    main()
