"""Benchmark suite: the fused reparam_gmm_kl against what users would write instead.

    python -m benchmarks.bench_ops [--device cpu|cuda] [--quick] [--out results/bench]
    halfvae bench ...        (the same, with the package installed from a source checkout)

Compared in one run, per size N*K (K = 8) and mixture size C: the fused op with eps given and with
in-kernel eps, torch.randn followed by the eps-given op, the eager reference, torch.distributions
(Normal + MixtureSameFamily, validation off), torch.compile of the reference (compilation timed
apart and excluded), a copy of as many bytes as the fused op must move (the memory floor), and
one `torch.exp(x)` over N*K elements (the "exp pass": a unit that carries over between machines,
since it scales with the same vector width and memory system as the fused kernels).
Each of these for every variant of the op (--variants): "mc" (the Monte-Carlo KL against one
prior [K, C]), "prior_index" (a conditional prior: --groups tables [U, K, C], a random group per
row) and "bound" (kl="bound"); the eager reference and torch.compile get the same arguments,
torch.distributions runs for "mc" only.
Forward and forward+backward; median of repeats after warm-up; inputs rotate through several copies
when one set would sit in cache. Writes a table (stdout), bench_ops.json and bench_ops.png, plus
peak memory of a forward+backward step for the fused and reference paths.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
import time

import torch

import halfvae_ext as hv
from halfvae_ext import reference
from halfvae_ext.atomic_io import save_figure_atomic, write_json_atomic

CACHE_BYTES = 64 << 20  # rotate inputs until the working set exceeds this (last-level cache here)


# ----------------------------------------------------------------------------- implementations
def distributions_kl(mu, logvar, logits, means, logvars, eps, **variant):
    D = torch.distributions
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * eps
    q = D.Normal(mu, sigma, validate_args=False)
    prior = D.MixtureSameFamily(D.Categorical(logits=logits, validate_args=False),
                                D.Normal(means, torch.exp(0.5 * logvars), validate_args=False),
                                validate_args=False)
    return z, (q.log_prob(z) - prior.log_prob(z)).sum(1)


# variant: the op's optional arguments (prior_index, kl), the same for every implementation.
def reference_kl(mu, logvar, logits, means, logvars, eps, **variant):
    return reference.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps, **variant)


def fused_kl(mu, logvar, logits, means, logvars, eps, **variant):
    return hv.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps, **variant)


def fused_rng_kl(mu, logvar, logits, means, logvars, eps, **variant):
    return hv.reparam_gmm_kl(mu, logvar, logits, means, logvars, **variant)


def randn_fused_kl(mu, logvar, logits, means, logvars, eps, **variant):
    return hv.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=torch.randn_like(mu),
                             **variant)


# Implementations that do not take a variant's arguments.
MC_ONLY = {"distributions"}


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device):
    if device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(make_fn, n_sets, device, budget_s, min_repeats, max_repeats):
    """make_fn(i) -> a closure on input set i. One warm-up per set, then repeats in rotation."""
    return median_times([make_fn], n_sets, device, budget_s, min_repeats, max_repeats)[0]


def median_times(make_fns, n_sets, device, budget_s, min_repeats, max_repeats):
    """median_time of several closures (budget_s each), timed in turn, one call of each per
    repeat: on a machine whose speed drifts, their ratios stay those of the same moments."""
    fns = [[make_fn(i) for i in range(n_sets)] for make_fn in make_fns]
    first = [[time_once(f, device) for f in sets] for sets in fns]  # warm-up
    per = max(sum(statistics.median(t) for t in first), 1e-7)
    repeats = int(min(max_repeats, max(min_repeats, budget_s * len(fns) / per)))
    times = [[] for _ in fns]
    for r in range(repeats):
        for sets, t in zip(fns, times):
            t.append(time_once(sets[r % n_sets], device))
    return [statistics.median(t) for t in times]


class Inputs:
    """n_sets input sets; variant "prior_index": prior tables [groups, K, C] and a random group per
    row, "bound": kl="bound"."""

    def __init__(self, N, K, C, device, dtype, n_sets, seed=0, variant="mc", groups=40):
        g = torch.Generator().manual_seed(seed)
        mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)
        prior_shape = (groups, K, C) if variant == "prior_index" else (K, C)
        self.sets, self.kwargs = [], []
        for _ in range(n_sets):
            mu = mk(N, K).requires_grad_()
            logvar = mk(N, K, scale=0.3).requires_grad_()
            prior = [mk(*prior_shape).requires_grad_(), mk(*prior_shape, scale=2).requires_grad_(),
                     mk(*prior_shape, scale=0.3).requires_grad_()]
            self.sets.append((mu, logvar, *prior, mk(N, K)))
            kwargs = {}
            if variant == "prior_index":
                kwargs["prior_index"] = torch.randint(0, groups, (N,), generator=g).to(device)
            elif variant == "bound":
                kwargs["kl"] = "bound"
            self.kwargs.append(kwargs)
        self.grad_z = torch.full((N, K), 1e-3, device=device, dtype=dtype)
        self.grad_kl = torch.ones(N, device=device, dtype=dtype)

    def forward(self, impl, i):
        args, kwargs = self.sets[i], self.kwargs[i]

        def run():
            with torch.no_grad():
                impl(*args, **kwargs)
        return run

    def forward_backward(self, impl, i):
        args, kwargs = self.sets[i], self.kwargs[i]
        params = list(args[:5])

        def run():
            z, kl = impl(*args, **kwargs)
            torch.autograd.grad([z, kl], params, [self.grad_z, self.grad_kl])
        return run


def copy_floor(bytes_moved, device, dtype, budget_s):
    """A device copy that reads and writes bytes_moved bytes in all."""
    numel = max(1, bytes_moved // (2 * torch.tensor([], dtype=dtype).element_size()))
    n_sets = max(1, min(8, math.ceil(CACHE_BYTES / (2 * numel * 4)))) if device.type == "cpu" else 1
    srcs = [torch.randn(numel, device=device).to(dtype) for _ in range(n_sets)]
    dsts = [torch.empty_like(s) for s in srcs]
    return median_time(lambda i: (lambda: dsts[i].copy_(srcs[i])), n_sets, device, budget_s, 5, 200)


def exp_pass(numel, device, dtype, budget_s):
    """torch.exp(x) over numel elements, as a user writes it (a new output each call)."""
    n_sets = max(1, min(8, math.ceil(CACHE_BYTES / (numel * 4)))) if device.type == "cpu" else 1
    xs = [torch.randn(numel, device=device).to(dtype) for _ in range(n_sets)]
    return median_time(lambda i: (lambda: torch.exp(xs[i])), n_sets, device, budget_s, 5, 200)


def peak_memory(step, device):
    """Peak bytes allocated while `step` runs, counting only what it allocates."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--sizes", default="14,16,18,20,22,23,24",
                   help="log2 of N*K, comma-separated")
    p.add_argument("--components", default="1,3,8", help="mixture sizes C, comma-separated")
    p.add_argument("--latents", type=int, default=8)
    p.add_argument("--variants", default="mc,prior_index,bound",
                   help="op variants, comma-separated: mc, prior_index, bound")
    p.add_argument("--groups", type=int, default=40,
                   help="prior groups U of the prior_index variant")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell")
    p.add_argument("--quick", action="store_true",
                   help="sizes 16,20,23 and C=3 only, shorter budget (a few minutes on 2 cores)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--impls", default=None,
                   help="implementations to time, comma-separated (default all): fused, "
                        "fused_rng, randn+fused, eager, distributions, compile; e.g. --impls "
                        "fused --variants mc,prior_index for the conditional prior's ratio alone")
    p.add_argument("--slow-max-log2", type=int, default=24,
                   help="skip eager/distributions/compile above this size (they take seconds)")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.components, args.budget = "16,20,23", "3", 0.5
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_ops: --device cuda but no GPU is available")
    sizes = [int(s) for s in args.sizes.split(",")]
    comps = [int(c) for c in args.components.split(",")]
    variants = args.variants.split(",")
    if not variants or any(v not in ("mc", "prior_index", "bound") for v in variants):
        sys.exit(f"bench_ops: --variants takes mc, prior_index, bound; got {args.variants!r}")
    K = args.latents
    esize = torch.tensor([], dtype=dtype).element_size()

    impls = {
        "fused": fused_kl,
        "fused_rng": fused_rng_kl,
        "randn+fused": randn_fused_kl,
        "eager": reference_kl,
        "distributions": distributions_kl,
    }
    if not args.no_compile:
        impls["compile"] = torch.compile(reference_kl, dynamic=False)
    if args.impls is not None:
        wanted = args.impls.split(",")
        unknown = [n for n in wanted if n not in impls and n != "compile"]
        if unknown or "fused" not in wanted:
            sys.exit(f"bench_ops: --impls takes fused (always) and any of {', '.join(impls)}, "
                     f"compile; got {args.impls!r}")
        impls = {n: f for n, f in impls.items() if n in wanted}
    slow = {"eager", "distributions", "compile"}

    meta = {"device": str(device), "dtype": args.dtype, "K": K, "groups": args.groups,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_kernel": hv._C.cpu_kernel_name(),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    print(f"# bench_ops {meta}")
    header = (f"{'C':>2} {'log2 NK':>7} {'variant':>11} {'mode':>7} "
              + " ".join(f"{n:>13}" for n in [*impls, "copy floor", "exp pass"]))
    print(header + "   (ms)")
    for C, lg in itertools.product(comps, sizes):
        NK = 2**lg
        N = NK // K
        bytes_set = NK * esize * 3 + 3 * K * C * esize
        n_sets = max(1, min(16, math.ceil(CACHE_BYTES / bytes_set))) if device.type == "cpu" else 1
        # Each implementation times its variants in turn (median_times): their ratios then come
        # from the same moments of a (shared) machine whose speed drifts.
        inputs = {v: Inputs(N, K, C, device, dtype, n_sets, seed=lg * 10 + C, variant=v,
                            groups=args.groups) for v in variants}
        # Compulsory traffic of the fused op (eps given): fwd reads mu, logvar, eps and
        # writes z, kl[N]; bwd reads grad_z, grad_kl, mu, logvar, eps, writes 2 gradients.
        # (prior_index adds 8 bytes per row each way, left out: the floor is the mc op's.)
        moved = {"fwd": NK * esize * 4 + N * esize,
                 "fwd+bwd": NK * esize * 4 + N * esize + NK * esize * 6 + N * esize}
        for mode in ("fwd", "fwd+bwd"):
            mode_rows = {v: {"C": C, "log2_NK": lg, "NK": NK, "variant": v, "mode": mode,
                             "seconds": {}, "bytes_moved": moved[mode]} for v in variants}
            for name, impl in impls.items():
                if name in slow and lg > args.slow_max_log2:
                    continue
                timed = [v for v in variants if name not in MC_ONLY or v == "mc"]
                makes = {v: inputs[v].forward if mode == "fwd" else inputs[v].forward_backward
                         for v in timed}
                if name == "compile":
                    for v in timed:
                        t0 = time.perf_counter()
                        makes[v](impl, 0)()  # first call compiles for this shape, mode, variant
                        sync(device)
                        mode_rows[v]["compile_seconds"] = time.perf_counter() - t0
                seconds = median_times([lambda i, make=makes[v]: make(impl, i) for v in timed],
                                       n_sets, device, args.budget, 3, 100)
                for v, t in zip(timed, seconds):
                    mode_rows[v]["seconds"][name] = t
            floor = copy_floor(moved[mode], device, dtype, args.budget)
            exp = exp_pass(NK, device, dtype, args.budget)
            for variant, row in mode_rows.items():
                row["seconds"]["copy floor"], row["seconds"]["exp pass"] = floor, exp
                rows.append(row)
                cells = " ".join(f"{row['seconds'][n] * 1e3:13.3f}" if n in row["seconds"]
                                 else f"{'-':>13}" for n in [*impls, "copy floor", "exp pass"])
                print(f"{C:>2} {lg:>7} {variant:>11} {mode:>7} {cells}", flush=True)
        del inputs

    # Peak memory of one forward+backward at the largest size not above 2^22, C = 3 if measured.
    mem_lg = max(s for s in sizes if s <= 22) if any(s <= 22 for s in sizes) else min(sizes)
    C = 3 if 3 in comps else comps[0]
    NK, N = 2**mem_lg, 2**mem_lg // K
    inp = Inputs(N, K, C, device, dtype, 1)
    # What one step must create: outputs z and kl, their upstream gradients, input gradients.
    necessary = (NK + N) * esize * 2 + 2 * NK * esize + 3 * K * C * esize
    grad_z, grad_kl = inp.grad_z, inp.grad_kl

    def step(impl):
        def run():
            args = inp.sets[0]
            z, kl = impl(*args)
            gz, gk = torch.full_like(z, 1e-3), torch.ones_like(kl)  # created by the step
            torch.autograd.grad([z, kl], list(args[:5]), [gz, gk])
        return run

    memory = {"log2_NK": mem_lg, "C": C, "necessary_bytes": necessary}
    measured = [n for n in ("fused", "fused_rng", "eager", "distributions") if n in impls]
    for name in measured:
        step(impls[name])()  # warm-up
        memory[name] = peak_memory(step(impls[name]), device)
    print(f"\npeak memory of one fwd+bwd step, N*K=2^{mem_lg}, C={C} "
          f"(outputs + upstream grads + input grads = {necessary / 2**20:.1f} MiB):")
    for name in measured:
        print(f"  {name:14s} {memory[name] / 2**20:9.1f} MiB  ({memory[name] / necessary:.2f}x)")

    summarize(rows, meta)
    os.makedirs(args.out, exist_ok=True)
    result = {"meta": meta, "rows": rows, "memory": memory}
    write_json_atomic(os.path.join(args.out, "bench_ops.json"), result)
    plot(rows, meta, os.path.join(args.out, "bench_ops.png"))
    print(f"\nwrote {args.out}/bench_ops.json and {args.out}/bench_ops.png")
    return result


def summarize(rows, meta):
    print("\nratios (fused, eps given = 1; higher = fused faster), fwd+bwd:")
    key = lambda r: (r["C"], r["log2_NK"], r["variant"])
    fwd = {key(r): r["seconds"]["fused"] for r in rows if r["mode"] == "fwd"}
    mc = {key(r)[:2]: r["seconds"]["fused"] for r in rows
          if r["mode"] == "fwd+bwd" and r["variant"] == "mc"}
    for r in rows:
        if r["mode"] != "fwd+bwd":
            continue
        s = r["seconds"]
        f = s["fused"]
        parts = [f"{n} {s[n] / f:6.1f}x" for n in ("eager", "distributions", "compile") if n in s]
        if "randn+fused" in s and "fused_rng" in s:
            parts.append(f"randn+fused/fused_rng {s['randn+fused'] / s['fused_rng']:.2f}x")
        parts.append(f"copy floor reached {s['copy floor'] / f * 100:5.1f}%")
        parts.append(f"fused = {f / s['exp pass']:.2f} exp passes "
                     f"(fwd {fwd[key(r)] / s['exp pass']:.2f})")
        if r["variant"] != "mc" and key(r)[:2] in mc:
            parts.append(f"fused {r['variant']}/mc {f / mc[key(r)[:2]]:.2f}x")
        cs = f" (compile took {r['compile_seconds']:.1f} s)" if "compile_seconds" in r else ""
        print(f"  C={r['C']} N*K=2^{r['log2_NK']} {r['variant']}: " + ", ".join(parts) + cs)


def plot(rows, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    comps = sorted({r["C"] for r in rows})
    fig, axes = plt.subplots(2, len(comps), figsize=(5.5 * len(comps), 8), squeeze=False)
    for j, C in enumerate(comps):
        sel = [r for r in rows if r["C"] == C and r["mode"] == "fwd+bwd"]
        # One curve per implementation and variant; the floors are the same for every variant.
        curves = sorted({(n, r["variant"]) for r in sel for n in r["seconds"]
                         if r["variant"] == "mc" or n not in ("copy floor", "exp pass")})
        for n, variant in curves:
            pts = [(r["NK"], r["seconds"][n]) for r in sel
                   if r["variant"] == variant and n in r["seconds"]]
            xs, ts = zip(*pts)
            style = "k--" if n == "copy floor" else "k:" if n == "exp pass" else "-o"
            label = n if variant == "mc" else f"{n} ({variant})"
            axes[0][j].loglog(xs, ts, style, label=label, markersize=3)
            axes[1][j].loglog(xs, [x / t for x, t in zip(xs, ts)], style, label=label,
                              markersize=3)
        axes[0][j].set_title(f"fwd+bwd, C={C}, K={meta['K']}, {meta['device']}")
        axes[0][j].set_ylabel("seconds (median)")
        axes[1][j].set_ylabel("elements / second")
        axes[1][j].set_xlabel("N*K")
        axes[0][j].legend(fontsize=7)
        axes[0][j].grid(True, which="both", alpha=0.3)
        axes[1][j].grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)  # closes the figure, written or not


if __name__ == "__main__":
    main()
