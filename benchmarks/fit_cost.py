"""Fit cost: time and MCC of whole ICA fits against rows and sources, Half-VAE (HalfVAEICA's
defaults) next to FastICA, Picard and AMICA (jamica), all in one run on the same data: linear
mixes (cond <= 10) of "assorted" sources (Laplace, uniform, bimodal, periodic: super- and
sub-Gaussian, as a recording mixes them).

    python -m benchmarks.fit_cost                       # rows 1000 5000 30000, sources 4 8
    python -m benchmarks.fit_cost --rows 1000 10000 100000 1000000 --sources 4 8 16 32 64 \\
        --max-cells halfvae=2000000 amica=8000000 --out fit_cost.json --plot fit_cost.png

A method is skipped (and the table says so) on problems of more rows x sources than its
``--max-cells`` entry, so that a grid to 10^6 rows finishes. Prints one line per fit and a table
of seconds (and each method's time over Picard's); --out writes every fit as JSON, --plot the
seconds against rows per number of sources. Times are wall-clock on this machine: name the CPU
(``lscpu``) and the threads (OMP_NUM_THREADS) with any figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
import torch

from halfvae_ext.atomic_io import save_figure_atomic, write_json_atomic
from halfvae_ext.ica import HalfVAEICA, make_linear, mean_corr_coef
from halfvae_ext.ica.baselines import fit_linear_peer

METHODS = ("halfvae", "fastica", "picard", "amica")
DEFAULT_MAX_CELLS = {"halfvae": 400_000, "amica": 4_000_000}


def fit_sources(method: str, X: np.ndarray, k: int, seed: int) -> np.ndarray:
    if method == "halfvae":
        return HalfVAEICA(k, random_state=seed).fit_transform(X)
    return fit_linear_peer(method, X, k, seed)


def _max_cells(entries) -> dict:
    limits = dict(DEFAULT_MAX_CELLS)
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or name not in METHODS:
            raise SystemExit(f"--max-cells: expected METHOD=N with METHOD in {METHODS}, "
                             f"got {entry!r}")
        limits[name] = int(float(value))
    return limits


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def plot(results: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sources = sorted({r["sources"] for r in results})
    fig, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 3.6), squeeze=False)
    for ax, k in zip(axes[0], sources):
        for method in METHODS:
            pts = sorted((r["rows"], r["seconds"]) for r in results
                         if r["sources"] == k and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="rows", ylabel="fit seconds",
               title=f"{k} sources")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 5000, 30000])
    ap.add_argument("--sources", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cells", nargs="*", default=[], metavar="METHOD=N",
                    help=f"skip METHOD above N rows x sources (defaults {DEFAULT_MAX_CELLS})")
    ap.add_argument("--out", help="write every fit as JSON here")
    ap.add_argument("--plot", help="write the seconds-against-rows figure (PNG) here")
    args = ap.parse_args(argv)
    limits = _max_cells(args.max_cells)
    print(f"# {_cpu_name()}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    results = []
    for k in args.sources:
        for n in args.rows:
            P = make_linear(n, k, source="assorted", random_state=args.seed)
            for method in args.methods:
                if n * k > limits.get(method, float("inf")):
                    print(f"rows={n:8d} sources={k:3d} {method:8s} skipped (rows x sources > "
                          f"{limits[method]}; --max-cells)", flush=True)
                    continue
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    S = fit_sources(method, P.X, k, args.seed)
                dt = time.perf_counter() - t0
                mcc = float(mean_corr_coef(P.S, S))
                results.append(dict(rows=n, sources=k, method=method, seconds=dt, mcc=mcc))
                print(f"rows={n:8d} sources={k:3d} {method:8s} MCC {mcc:.4f} {dt:9.2f}s",
                      flush=True)
    print("\n| rows x sources | " + " | ".join(args.methods) + " |")
    print("|---" * (len(args.methods) + 1) + "|")
    for k in args.sources:
        for n in args.rows:
            got = {r["method"]: r for r in results if r["rows"] == n and r["sources"] == k}
            picard = got.get("picard")
            cells = []
            for method in args.methods:
                r = got.get(method)
                if r is None:
                    cells.append("-")
                    continue
                ratio = "" if picard is None or method == "picard" else \
                    f" ({r['seconds'] / max(picard['seconds'], 1e-9):.3g}x)"
                cells.append(f"{r['seconds']:.3f} s{ratio}, MCC {r['mcc']:.4f}")
            print(f"| {n:,} x {k} | " + " | ".join(cells) + " |")
    if args.out:
        write_json_atomic(args.out, dict(cpu=_cpu_name(), threads=torch.get_num_threads(),
                                         results=results))
    if args.plot and results:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
