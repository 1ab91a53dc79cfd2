"""Large latent tables: optimizer step time and memory against the number of rows N at a fixed
batch (B = 4096, K = 8), for the ways to train a table:

  fused      LatentTable(N, K, fused_optimizer="adam"): the Adam step runs in the backward on the
             touched rows; no table gradient exists; mu|logvar interleaved, huge pages
  rowwise_adam, rowwise_adam_bf16, rowwise_adagrad
             the same with compact state (LatentTable(fused_optimizer="rowwise_adam" |
             "rowwise_adagrad", state_dtype=float32 | bfloat16)): one second moment or sum per row
             of mu and of logvar, a row's table and state in one record (128 bytes for
             rowwise_adam_bf16 and rowwise_adagrad, 192 for rowwise_adam and exact Adam)
  sparse     reparam_gmm_kl_rows(table_grad="sparse") + torch.optim.SparseAdam
  embedding  nn.Embedding(N, 2K, sparse=True) rows -> reparam_gmm_kl + torch.optim.SparseAdam
  dense      index_select -> reparam_gmm_kl, dense gradients + torch.optim.Adam
  touch      not a method: the memory floor. torch.index_select + index_copy_ of the batch's rows
             of one [N, 6K] table (mu, logvar and two Adam moments: 3 cache lines per row for
             K = 8), i.e. the reads and write-backs a step cannot avoid, with no arithmetic

    python -m benchmarks.bench_tables [--rows 1e4,1e5,1e6,1e7,1e8] [--steps 20]
        [--out results/bench]

Each step: a random batch of row indices, in-kernel eps, loss = sum(kl) + 0.5*sum(z^2), backward,
optimizer step. Median step time after warm-up steps; peak memory allocated during one step (torch
profiler) next to the bytes of table + optimizer state, and the memory on transparent huge
pages. Methods whose tables would not fit in memory are skipped and say so; set-ups of 4 GiB or
more run in a fresh process.

Then the speed goals, each measured as a ratio of two set-ups whose steps alternate in one process
(GOAL_PAIRS), so that the machine's drift does not enter the ratio.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

import halfvae_ext as hv
from halfvae_ext.atomic_io import save_figure_atomic, write_json_atomic
from halfvae_ext.table_memory import empty_table, huge_page_bytes, huge_pages_enabled
from halfvae_ext.table_optim import FUSED_TABLE_OPTIMIZERS

from .bench_ops import peak_memory

K, C = 8, 3


def fused_bytes_per_row(name):
    """Bytes a row of LatentTable takes with this method's optimizer (float32, K = 8)."""
    kind, state_dtype = FUSED_TABLE_OPTIMIZERS[name]
    return hv.LatentTable(1, K, fused_optimizer=kind, state_dtype=state_dtype).bytes_per_row


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
        if name == "touch":  # no arithmetic: the memory a step must touch (see module doc)
            self.rows = empty_table((N, 6 * K)).zero_()  # mu | logvar | Adam moments, per row
            self.params = [self.rows[:, :2 * K]]
            self.buf = torch.empty(0)
        elif name == "embedding":
            self.emb = torch.nn.Embedding(N, 2 * K, sparse=True)
            with torch.no_grad():
                self.emb.weight[:, K:].mul_(0.1).sub_(2)
            self.opt = torch.optim.SparseAdam(list(self.emb.parameters()), lr=lr)
            self.params = [self.emb.weight]
        elif name in FUSED_TABLE_OPTIMIZERS:  # as a user gets it: LatentTable(fused_optimizer=)
            kind, state_dtype = FUSED_TABLE_OPTIMIZERS[name]
            self.table = hv.LatentTable(N, K, fused_optimizer=kind, state_dtype=state_dtype, lr=lr,
                                        init_logvar=-2.0)
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
        if self.name in FUSED_TABLE_OPTIMIZERS:
            return self.N * self.table.bytes_per_row
        return 3 * sum(p.numel() * p.element_size() for p in self.params)

    def step(self, idx):
        if self.name == "touch":
            torch.index_select(self.rows, 0, idx, out=self.buf).add_(1e-3)
            self.rows.index_copy_(0, idx, self.buf)
            return
        if self.name in FUSED_TABLE_OPTIMIZERS:
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


def measure(specs, batch, steps, seed, block=10):
    """Step times of one or more (method, N) set-ups, taken in turns of `block` steps each
    (a x10, b x10, a x10, ...) so that a ratio between them sees the same machine: this VM's
    speed drifts by up to 1.7x from one second to the next, which sequential measurements would
    put into the ratio. Turns of several steps keep each set-up's caches as warm as in a training
    loop (strict a, b, a, b alternation would start every step with the other's data in cache).

    Per set-up: median step time (after 3 warm-up steps that also allocate lazily created
    optimizer state), the memory allocated in one step, and the huge pages in use."""
    g = torch.Generator().manual_seed(seed)
    methods = [Method(name, N) for name, N in specs]
    batches = [[torch.randint(0, N, (batch,), generator=g) for _ in range(steps + 3)]
               for _, N in specs]
    for m, bs in zip(methods, batches):
        for idx in bs[:3]:
            m.step(idx)
    times = [[] for _ in specs]
    for first in range(3, steps + 3, block):
        for m, bs, ts in zip(methods, batches, times):
            for i in range(first, min(first + block, steps + 3)):
                t0 = time.perf_counter()
                m.step(bs[i])
                ts.append(time.perf_counter() - t0)
    rows = []
    for (name, N), m, bs, ts in zip(specs, methods, batches, times):
        peak = peak_memory(lambda: m.step(bs[0]), torch.device("cpu"))
        rows.append({"N": N, "method": name, "step_seconds": statistics.median(ts),
                     "state_bytes": m.state_bytes(), "step_peak_bytes": peak,
                     "huge_page_bytes": huge_page_bytes()})
    del methods, batches
    gc.collect()
    _release_freed_heap()
    return rows


def _release_freed_heap():
    """Give the C heap's free memory back to the system (glibc keeps freed arenas otherwise),
    so that later set-ups see the memory that earlier ones used."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Set-ups whose memory would be at least this large run in a fresh process. Near the machine's
# memory limit (10^8 rows take 18 of 24 GB here) the heap left behind by earlier measurements
# pushes the kernel into reclaim and compaction during the timed steps, and step times of every
# method swing by 5x from one run to the next.
ISOLATE_BYTES = 4 << 30
# Largest share of the available memory a set-up may need (the rest: interpreter, batches, the
# page cache that keeps torch's code in memory).
MEMORY_FRACTION = 0.88


def _child(conn, *args):
    try:
        torch.set_num_threads(conn.recv())
        conn.send(measure(*args))
    except BaseException as e:  # report, do not hang the parent
        conn.send(e)


def measure_isolated(specs, batch, steps, seed):
    """measure() in a fresh process when the set-ups need ISOLATE_BYTES or more."""
    if sum(needed_bytes(name, N) for name, N in specs) < ISOLATE_BYTES:
        return measure(specs, batch, steps, seed)
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, specs, batch, steps, seed))
    proc.start()
    parent.send(torch.get_num_threads())
    result = parent.recv()
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return result


# Speed goals, each a ratio measured with alternating steps: (numerator, denominator, goal).
# fused(1e8) / fused(1e4) <= 1.3 (exact Adam: accepted as measured against the memory floor);
# embedding(1e7) / fused(1e7) >= 5; rowwise_adam_bf16 at 1e8 within 1.3x of its step at 1e4, and
# >= 1.3x faster than exact Adam at the largest N where both tables fit in memory together
# (1e8: 19.2 + 12.8 GB, more than this 24 GB machine; 5e7 here; the two at 1e8 run one after the
# other in the table above).
GOAL_PAIRS = ((("fused", 10**8), ("fused", 10**4), "<=", 1.3),
              (("embedding", 10**7), ("fused", 10**7), ">=", 5.0),
              (("rowwise_adam_bf16", 10**8), ("rowwise_adam_bf16", 10**4), "<=", 1.3),
              (("fused", 5 * 10**7), ("rowwise_adam_bf16", 5 * 10**7), ">=", 1.3))


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f}
        return info.get("MemAvailable", 0)
    except OSError:
        return 1 << 62


def needed_bytes(name, N):
    if name in FUSED_TABLE_OPTIMIZERS:
        return N * fused_bytes_per_row(name)
    table = 2 * N * K * 4
    extra = {"fused": 2 * table, "sparse": 2 * table, "embedding": 2 * table,
             "dense": 3 * table, "touch": 2 * table}[name]  # Adam moments (+ dense gradient)
    return table + extra


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1e4,1e5,1e6,1e7,1e8")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--methods", default="fused,rowwise_adam,rowwise_adam_bf16,rowwise_adagrad,"
                                        "sparse,embedding,dense,touch")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--goal-steps", type=int, default=100,
                   help="steps per set-up in the alternating goal measurements")
    p.add_argument("--no-goals", action="store_true", help="skip the goal measurements")
    args = p.parse_args(argv)
    sizes = [int(float(s)) for s in args.rows.split(",")]
    methods = args.methods.split(",")
    seed = 0
    rows = []
    print(f"B={args.batch} K={K} C={C} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} huge_pages={huge_pages_enabled()}")
    print(f"{'N':>11} {'method':>10} {'step ms':>9} {'state MiB':>10} {'step peak MiB':>14} "
          f"{'THP MiB':>10}")
    for N in sizes:
        for name in methods:
            need = needed_bytes(name, N)
            if need > MEMORY_FRACTION * available_bytes():
                print(f"{N:>11} {name:>10}   skipped: needs {need / 2**30:.1f} GiB, "
                      f"{available_bytes() / 2**30:.1f} GiB available")
                rows.append({"N": N, "method": name, "skipped": "memory"})
                continue
            row, = measure_isolated([(name, N)], args.batch, args.steps, seed)
            rows.append(row)
            huge = row["huge_page_bytes"]
            print(f"{N:>11} {name:>10} {row['step_seconds'] * 1e3:9.3f} "
                  f"{row['state_bytes'] / 2**20:10.1f} {row['step_peak_bytes'] / 2**20:14.2f} "
                  f"{'-' if huge is None else f'{huge / 2**20:.0f}':>10}", flush=True)
            seed += 1
    summarize(rows)
    goals = []
    if not args.no_goals:
        print("goals, alternating steps of the two set-ups in one process "
              f"({args.goal_steps} steps each):")
    for a, b, sense, goal in ([] if args.no_goals else GOAL_PAIRS):
        if not all(name in methods and N in sizes for name, N in (a, b)):
            continue
        need = needed_bytes(*a) + needed_bytes(*b)
        if need > MEMORY_FRACTION * available_bytes():
            print(f"  {a[0]}@{a[1]:.0e} / {b[0]}@{b[1]:.0e}: skipped, needs {need / 2**30:.1f} GiB")
            continue
        ra, rb = measure_isolated([a, b], args.batch, args.goal_steps, seed)
        seed += 1
        ratio = ra["step_seconds"] / rb["step_seconds"]
        met = ratio <= goal if sense == "<=" else ratio >= goal
        goals.append({"numerator": ra, "denominator": rb, "ratio": ratio,
                      "goal": f"{sense} {goal}", "met": met})
        print(f"  {a[0]}@{a[1]:.0e} {ra['step_seconds'] * 1e3:.3f} ms / {b[0]}@{b[1]:.0e} "
              f"{rb['step_seconds'] * 1e3:.3f} ms = {ratio:.2f}x (goal {sense} {goal}: "
              f"{'met' if met else 'not met'})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "bench_tables.json"),
                      {"args": vars(args), "threads": torch.get_num_threads(),
                       "huge_pages": huge_pages_enabled(), "rows": rows, "goals": goals})
    plot(rows, os.path.join(args.out, "bench_tables.png"))
    print(f"wrote {args.out}/bench_tables.json and {args.out}/bench_tables.png")
    return rows


def summarize(rows):
    t = {(r["N"], r["method"]): r["step_seconds"] for r in rows if "step_seconds" in r}
    for method in FUSED_TABLE_OPTIMIZERS:
        steps = sorted((N, s) for (N, m), s in t.items() if m == method)
        if len(steps) >= 2:
            (n0, s0), (n1, s1) = steps[0], steps[-1]
            print(f"{method} step at N={n1:.0e} / at N={n0:.0e}: {s1 / s0:.2f}x "
                  f"({fused_bytes_per_row(method)} bytes a row)")
    for N in sorted({N for N, _ in t}):
        for method in list(FUSED_TABLE_OPTIMIZERS)[1:]:
            if (N, "fused") in t and (N, method) in t:
                print(f"N={N:.0e}: {method} is {t[(N, 'fused')] / t[(N, method)]:.2f}x as fast as "
                      f"exact Adam (fused), one after the other")
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
    save_figure_atomic(fig, path, dpi=110)  # closes the figure, written or not


if __name__ == "__main__":
    main()
