"""A Half-VAE fit on a latent table of 10^7 rows with mini-batches and the fused table optimizer.

    python benchmarks/fit_large_table.py [--rows 10000000] [--steps 300] [--batch 4096]

Data: --rows samples of 4 Laplace sources mixed by a random 4x4 matrix. The table (mu, logvar) is
trained by Adam fused into the backward (LatentTable(fused_optimizer="adam")), the decoder, noise
and prior by torch.optim.Adam. Prints step time, the negative ELBO per sample over training and
the process's peak resident memory against the table + optimizer-state bytes.
"""
import argparse
import resource
import time

import torch

from halfvae_ext.models import HalfVAE


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=4)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    N, D = args.rows, args.dim
    S = torch.distributions.Laplace(0.0, 1.0).sample((N, D))
    A = torch.randn(D, D, generator=g)
    X = S @ A.T
    X = (X - X.mean(0)) / X.std(0)
    del S
    torch.manual_seed(0)
    model = HalfVAE(N, D, D, decoder="linear", table_optimizer="adam", table_lr=0.05,
                    init_noise_std=0.5)
    others = [p for n, p in model.named_parameters() if not n.startswith("latents.")]
    opt = torch.optim.Adam(others, lr=1e-2)
    table_bytes = 2 * N * D * 4
    state_bytes = model.latents.table_optimizer.state.numel() * 4
    print(f"rows={N:,} dim={D} batch={args.batch} table {table_bytes / 2**20:.0f} MiB + "
          f"Adam state {state_bytes / 2**20:.0f} MiB; data {X.numel() * 4 / 2**20:.0f} MiB")
    times, losses = [], []
    for step in range(args.steps):
        idx = torch.randint(0, N, (args.batch,), generator=g)
        t0 = time.perf_counter()
        loss = model.negative_elbo(X[idx], idx).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # the table rows are updated here
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  -ELBO/sample {loss.item():9.4f}")
    assert model.latents.mu.grad is None, "no table gradient should exist"
    med = sorted(times)[len(times) // 2]
    first = sum(losses[:20]) / 20
    last = sum(losses[-20:]) / 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"median step {med * 1e3:.2f} ms; -ELBO/sample first 20 steps {first:.3f} -> last 20 "
          f"{last:.3f}; peak RSS {rss / 2**30:.2f} GiB (table + state "
          f"{(table_bytes + state_bytes) / 2**30:.2f} GiB, data {X.numel() * 4 / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
