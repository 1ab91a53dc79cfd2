"""The latent table's optimizer step alone (`latent_rows_update_`, no autograd, no kernel of the
ELBO): exact Adam against the compact rules, on tables of 10^4 and 5 x 10^7 rows, so that the
rule's arithmetic and the memory it touches are seen without the Python layer of a full step.

    OMP_NUM_THREADS=1 python benchmarks/bench_row_update.py [--rows 1e4,5e7] [--batch 4096]
        [--methods fused,rowwise_adam_bf16] [--calls 300] [--turn 10]

Each (method, rows) set-up is a LatentTable (as a user gets it, float32, K = 8) whose
table_optimizer.step_rows is called on `batch` random rows, fresh ones every call (the same rows
every call would stay in the caches, 0.8 MB a set-up, and hide the memory traffic a large table
costs), with fixed random gradients; the set-ups take turns of `turn` calls, so their medians
share the machine's moments. Prints the median and minimum microseconds of a call and each
method's ratio to the first at each size.
"""
import argparse
import statistics
import time

import torch

import halfvae_ext as hv
from halfvae_ext.table_optim import FUSED_TABLE_OPTIMIZERS

K = 8


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1e4,5e7")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--methods", default="fused,rowwise_adam_bf16")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--turn", type=int, default=10)
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in FUSED_TABLE_OPTIMIZERS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {list(FUSED_TABLE_OPTIMIZERS)}")
    sizes = [int(float(r)) for r in a.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    setups = []
    for N in sizes:
        # the same rows for every method of a size: call c of each steps batches[c]
        batches = [torch.randint(0, N, (a.batch,), generator=g) for _ in range(a.calls)]
        gm, gl = torch.randn(a.batch, K, generator=g), 0.1 * torch.randn(a.batch, K, generator=g)
        for m in methods:
            kind, state_dtype = FUSED_TABLE_OPTIMIZERS[m]
            t = hv.LatentTable(N, K, fused_optimizer=kind, state_dtype=state_dtype)
            setups.append(dict(method=m, N=N, table=t, batches=batches, gm=gm, gl=gl, times=[]))
    for s in setups:  # the code and the small buffers warm, outside the timing
        for idx in s["batches"][:3]:
            s["table"].table_optimizer.step_rows(s["table"].mu.detach(), s["table"].logvar.detach(),
                                                 idx, s["gm"], s["gl"])
    for first in range(0, a.calls, a.turn):
        for s in setups:
            opt, mu, lv = s["table"].table_optimizer, s["table"].mu.detach(), s["table"].logvar.detach()
            for idx in s["batches"][first:first + a.turn]:
                t0 = time.perf_counter()
                opt.step_rows(mu, lv, idx, s["gm"], s["gl"])
                s["times"].append(time.perf_counter() - t0)
    print(f"latent_rows_update_ alone, {a.batch} random rows, K = {K}, float32, "
          f"{torch.get_num_threads()} thread(s), {a.calls} calls in turns of {a.turn}")
    print(f"{'method':20s}{'rows':>12s}{'median us':>11s}{'min us':>9s}{'p10 us':>9s}"
          f"{'p90 us':>9s}{'bytes/row':>10s}{'vs first':>9s}")
    for N in sizes:
        first = None
        for s in (s for s in setups if s["N"] == N):
            med = 1e6 * statistics.median(s["times"])
            first = first or med
            q = statistics.quantiles(s["times"], n=10)
            print(f"{s['method']:20s}{N:12.0e}{med:11.1f}{1e6 * min(s['times']):9.1f}"
                  f"{1e6 * q[0]:9.1f}{1e6 * q[-1]:9.1f}{s['table'].bytes_per_row:10d}"
                  f"{med / first:9.2f}x")


if __name__ == "__main__":
    main()
