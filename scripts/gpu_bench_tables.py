"""The fused table step against nn.Embedding(sparse=True) + torch.optim.SparseAdam on one device:
a latent table of --rows rows (K = 8, C = 3), batches of --batch random rows, in-kernel eps,
loss = sum(kl) + 0.5 sum(z^2), backward, step. The two set-ups alternate step by step in one
process (the machine's drift does not enter the ratio); median step times and their ratio.

    python scripts/gpu_bench_tables.py --device cuda --rows 1e8 [--steps 50] [--json out.json]
"""
import argparse
import statistics
import sys

import torch

import halfvae_ext as hv
from benchmarks.bench_ops import time_once
from halfvae_ext.atomic_io import write_json_atomic
from halfvae_ext.models import GMMPrior, LatentTable

K, C = 8, 3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=float, default=1e8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device, N, B = torch.device(args.device), int(args.rows), args.batch
    prior = GMMPrior(K, C).to(device)
    fused = LatentTable(N, K, fused_optimizer="adam", lr=1e-2).to(device)
    emb = torch.nn.Embedding(N, 2 * K, sparse=True, device=device)
    sparse_adam = torch.optim.SparseAdam(emb.parameters(), lr=1e-2)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, N, (B,), device=device, generator=gen) for _ in range(8)]

    def fused_step(idx):
        z, kl = fused(idx, prior, generator=gen)
        (kl.sum() + 0.5 * (z * z).sum()).backward()

    def embedding_step(idx):
        rows = emb(idx)
        z, kl = hv.reparam_gmm_kl(rows[:, :K], rows[:, K:], prior.logits, prior.means,
                                  prior.logvars, generator=gen)
        sparse_adam.zero_grad()
        (kl.sum() + 0.5 * (z * z).sum()).backward()
        sparse_adam.step()

    def run(fn):
        return time_once(fn, device)
    times = {"fused": [], "embedding": []}
    for s in range(args.steps + 3):
        idx = batches[s % len(batches)]
        for name, step in (("fused", fused_step), ("embedding", embedding_step)):
            t = run(lambda: step(idx))
            if s >= 3:  # warm-up
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": str(device), "rows": N, "batch": B, "steps": args.steps,
              "fused_ms": 1e3 * med["fused"], "embedding_sparse_adam_ms": 1e3 * med["embedding"],
              "speedup": med["embedding"] / med["fused"], "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    print(f"table step, {N} rows, batch {B}: fused {result['fused_ms']:.3f} ms, "
          f"nn.Embedding(sparse)+SparseAdam {result['embedding_sparse_adam_ms']:.3f} ms, "
          f"ratio {result['speedup']:.2f}x")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
