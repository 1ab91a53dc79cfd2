"""Large latent tables: optimizer step time and memory against the number of rows N at a fixed
batch (B = 4096, K = 8), for four ways to train a table:

  fused      LatentTable(N, K, fused_optimizer="adam"): the Adam step runs in the backward on the
             touched rows; no table gradient exists; mu|logvar interleaved, huge pages
  sparse     reparam_gmm_kl_rows(table_grad="sparse") + torch.optim.SparseAdam
  embedding  nn.Embedding(N, 2K, sparse=True) rows -> reparam_gmm_kl + torch.optim.SparseAdam
  dense      index_select -> reparam_gmm_kl, dense gradients + torch.optim.Adam

    python benchmarks/bench_tables.py [--rows 1e4,1e5,1e6,1e7,1e8] [--steps 20] [--out results/bench]

Each step: a random batch of row indices, in-kernel eps, loss = sum(kl) + 0.5*sum(z^2), backward,
optimizer step. Median step time after warm-up steps; peak memory allocated during one step (torch
profiler) next to the bytes of table + optimizer state. Methods whose tables would not fit in
memory are skipped and say so.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

import halfvae_ext as hv
from .atomic_io import save_figure_atomic, write_json_atomic
from .bench_ops import peak_memory
from .table_memory import empty_table, huge_page_bytes, huge_pages_enabled

K, C = 8, 3


def _prior():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(K, C, generator=g).requires_grad_() for _ in range(3)]


def _table(N, scale, huge_pages):
    """The sparse method's tables (our op) come from empty_table, as LatentTable's do
    (transparent huge pages unless HALFVAE_HUGE_PAGES=0); stock-PyTorch baselines: torch.empty."""
    t = empty_table((N, K)) if huge_pages else torch.empty(N, K)
    t.normal_(0, scale)
    return t


class Method:
    """Builds tables for one method and takes steps; `state_bytes` = table + optimizer state."""

    def __init__(self, name, N, lr=1e-2):
        self.name, self.N = name, N
        self.prior = _prior()
        if name == "embedding":
            self.emb = torch.nn.Embedding(N, 2 * K, sparse=True)
            with torch.no_grad():
                self.emb.weight[:, K:].mul_(0.1).sub_(2)
            self.opt = torch.optim.SparseAdam(list(self.emb.parameters()), lr=lr)
            self.params = [self.emb.weight]
        elif name == "fused":  # the product as a user gets it: LatentTable(fused_optimizer=)
            self.table = hv.LatentTable(N, K, fused_optimizer="adam", lr=lr, init_logvar=-2.0)
            self.gmm = hv.GMMPrior(K, C)
            with torch.no_grad():
                for dst, src in zip((self.gmm.logits, self.gmm.means, self.gmm.logvars),
                                    self.prior):
                    dst.copy_(src)
            self.params = [self.table.mu, self.table.logvar]
        else:
            self.mu = _table(N, 1.0, name == "sparse").requires_grad_()
            self.logvar = _table(N, 0.1, name == "sparse").sub_(2).requires_grad_()
            self.params = [self.mu, self.logvar]
            if name == "sparse":
                self.opt = torch.optim.SparseAdam(self.params, lr=lr)
            else:
                self.opt = torch.optim.Adam(self.params, lr=lr)

    def state_bytes(self):
        """Table plus optimizer state (Adam: two moments), whether or not allocated yet."""
        return 3 * sum(p.numel() * p.element_size() for p in self.params)

    def step(self, idx):
        if self.name == "fused":
            z, kl = self.table(idx, self.gmm)
            (kl.sum() + 0.5 * (z * z).sum()).backward()
            return
        self.opt.zero_grad(set_to_none=True)
        if self.name == "sparse":
            z, kl = hv.reparam_gmm_kl_rows(self.mu, self.logvar, idx, *self.prior,
                                           table_grad="sparse")
        elif self.name == "embedding":
            mu, logvar = self.emb(idx).split(K, dim=1)
            z, kl = hv.reparam_gmm_kl(mu, logvar, *self.prior)
        else:
            z, kl = hv.reparam_gmm_kl(self.mu.index_select(0, idx),
                                      self.logvar.index_select(0, idx), *self.prior)
        (kl.sum() + 0.5 * (z * z).sum()).backward()
        self.opt.step()


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}
        return info.get("MemAvailable", 0)
    except OSError:
        return 1 << 62


def needed_bytes(name, N):
    table = 2 * N * K * 4
    extra = {"fused": 2 * table, "sparse": 2 * table, "embedding": 2 * table,
             "dense": 3 * table}[name]  # Adam moments (+ the dense gradient)
    return table + extra


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1e4,1e5,1e6,1e7,1e8")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--methods", default="fused,sparse,embedding,dense")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    sizes = [int(float(s)) for s in args.rows.split(",")]
    methods = args.methods.split(",")
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"B={args.batch} K={K} C={C} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} huge_pages={huge_pages_enabled()}")
    print(f"{'N':>11} {'method':>10} {'step ms':>9} {'state MiB':>10} {'step peak MiB':>14} "
          f"{'THP MiB':>10}")
    for N in sizes:
        for name in methods:
            need = needed_bytes(name, N)
            if need > 0.85 * available_bytes():
                print(f"{N:>11} {name:>10}   skipped: needs {need / 2**30:.1f} GiB, "
                      f"{available_bytes() / 2**30:.1f} GiB available")
                rows.append({"N": N, "method": name, "skipped": "memory"})
                continue
            m = Method(name, N)
            batches = [torch.randint(0, N, (args.batch,), generator=g)
                       for _ in range(args.steps + 3)]
            for idx in batches[:3]:  # warm-up (also allocates lazily created optimizer state)
                m.step(idx)
            times = []
            for idx in batches[3:]:
                t0 = time.perf_counter()
                m.step(idx)
                times.append(time.perf_counter() - t0)
            peak = peak_memory(lambda: m.step(batches[0]), torch.device("cpu"))
            huge = huge_page_bytes()
            row = {"N": N, "method": name, "step_seconds": statistics.median(times),
                   "state_bytes": m.state_bytes(), "step_peak_bytes": peak,
                   "huge_page_bytes": huge}
            rows.append(row)
            print(f"{N:>11} {name:>10} {row['step_seconds'] * 1e3:9.3f} "
                  f"{row['state_bytes'] / 2**20:10.1f} {peak / 2**20:14.2f} "
                  f"{'-' if huge is None else f'{huge / 2**20:.0f}':>10}", flush=True)
            del m, batches
            gc.collect()
    summarize(rows)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "bench_tables.json"),
                      {"args": vars(args), "threads": torch.get_num_threads(),
                       "huge_pages": huge_pages_enabled(), "rows": rows})
    plot(rows, os.path.join(args.out, "bench_tables.png"))
    print(f"wrote {args.out}/bench_tables.json and {args.out}/bench_tables.png")
    return rows


def summarize(rows):
    t = {(r["N"], r["method"]): r["step_seconds"] for r in rows if "step_seconds" in r}
    fused = sorted((N, s) for (N, m), s in t.items() if m == "fused")
    if len(fused) >= 2:
        (n0, s0), (n1, s1) = fused[0], fused[-1]
        print(f"fused step at N={n1:.0e} / at N={n0:.0e}: {s1 / s0:.2f}x")
    for N in sorted({N for N, _ in t}):
        if (N, "fused") in t and (N, "embedding") in t:
            print(f"N={N:.0e}: fused is {t[(N, 'embedding')] / t[(N, 'fused')]:.1f}x faster than "
                  f"nn.Embedding(sparse=True)+SparseAdam, {t.get((N, 'dense'), float('nan')) / t[(N, 'fused')]:.1f}x than dense Adam")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({r["method"] for r in rows}):
        pts = [(r["N"], r["step_seconds"], r["step_peak_bytes"]) for r in rows
               if r["method"] == name and "step_seconds" in r]
        if not pts:
            continue
        n, s, b = zip(*pts)
        ax[0].loglog(n, [x * 1e3 for x in s], "-o", label=name)
        ax[1].loglog(n, [x / 2**20 for x in b], "-o", label=name)
    ax[0].set(xlabel="table rows N", ylabel="step time (ms, median)", title="B=4096, K=8")
    ax[1].set(xlabel="table rows N", ylabel="memory allocated in a step (MiB)")
    for a in ax:
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=110)
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
