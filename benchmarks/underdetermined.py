"""Underdetermined ICA (more sources than mixtures) on Bernoulli-Gaussian sources, every method
on the same data: the ceiling (the exact posterior mean given the true A, noise and prior), the
lasso given the true A (an oracle no blind method has; its alpha the best of a grid against
the true sources), direction clustering + lasso (blind; alpha likewise chosen by the truth,
which flatters it), and exact EM of Half-VAE's linear model (blind; nothing chosen by the
truth). Mean SNR in dB after matching permutation and scale (the worst source in brackets),
the largest column angle error and the fit seconds.

    python -m benchmarks.underdetermined                          # 3->2 and 4->2, p 0.1 / 0.3
    python -m benchmarks.underdetermined --sets 6:3 --activity 0.1 --seeds 10 11 --max-iter 100
    python -m benchmarks.underdetermined --out underdetermined.json

Seeds 0-3 were used while writing the methods; report held-out seeds (the default: 10, 11).
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from halfvae_ext.ica.sparse_baselines import cluster_directions, l1_decode
from halfvae_ext.ica.underdetermined import (bernoulli_gaussian_prior, column_angle_errors,
                                             exact_posterior, fit_exact_em,
                                             make_sparse_mixture, matched_snr)

ALPHAS = np.logspace(-4, -1.5, 6)


def _best_lasso(X, A, S):
    """The lasso's sources at the alpha of the best mean SNR against S (an oracle choice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = [l1_decode(X, A, a) for a in ALPHAS]
    return max(fits, key=lambda est: matched_snr(S, est).mean())


def run_one(K: int, D: int, activity: float, seed: int, args) -> list:
    P = make_sparse_mixture(args.samples, K, D, activity=activity, snr_db=args.snr,
                            random_state=seed)
    rows = []

    def record(method, S_est, seconds, A_est=None):
        snr = matched_snr(P.S, S_est)
        rows.append(dict(set=f"{K}->{D}", activity=activity, seed=seed, method=method,
                         snr=float(snr.mean()), worst=float(snr.min()), seconds=seconds,
                         angle=None if A_est is None else
                         float(column_angle_errors(P.A, A_est).max())))
        r = rows[-1]
        angle = "" if r["angle"] is None else f"  angle {r['angle']:.3f} deg"
        print(f"{K}->{D} p={activity} seed {seed} {method:22s} {r['snr']:6.2f} dB "
              f"[{r['worst']:6.2f}] {seconds:7.1f} s{angle}", flush=True)

    t = time.perf_counter()
    ceiling, _ = exact_posterior(P.X, P.A, P.noise_var, *bernoulli_gaussian_prior(K, activity))
    record("posterior mean, true", ceiling.numpy(), time.perf_counter() - t)
    t = time.perf_counter()
    record("lasso, true A", _best_lasso(P.X, P.A, P.S), time.perf_counter() - t)
    t = time.perf_counter()
    A_blind = cluster_directions(P.X, K, random_state=seed)
    record("clustering + lasso", _best_lasso(P.X, A_blind, P.S), time.perf_counter() - t,
           A_blind)
    t = time.perf_counter()
    fit = fit_exact_em(P.X, K, n_mixture=args.n_mixture, max_iter=args.max_iter,
                       random_state=seed)
    record("exact EM (Half-VAE's)", fit.sources, time.perf_counter() - t, fit.A.numpy())
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["3:2", "4:2"], metavar="K:D")
    ap.add_argument("--activity", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--snr", type=float, default=40.0, help="dB (default 40)")
    ap.add_argument("--n-mixture", type=int, default=2, help="prior components of exact EM")
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--out", help="write every row as JSON here")
    args = ap.parse_args(argv)
    sets = []
    for entry in args.sets:
        K, sep, D = entry.partition(":")
        if not (sep and K.isdigit() and D.isdigit() and int(D) < int(K)):
            raise SystemExit(f"--sets: expected K:D with D < K (e.g. 3:2), got {entry!r}")
        sets.append((int(K), int(D)))
    from benchmarks.fit_cost import _cpu_name
    print(f"# {_cpu_name()}, {args.samples} samples, {args.snr:g} dB", flush=True)
    rows = [r for K, D in sets for p in args.activity for seed in args.seeds
            for r in run_one(K, D, p, seed, args)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print("\n| set | p | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 2) + "|")
    for K, D in sets:
        for p in args.activity:
            cells = []
            for m in methods:
                got = [r for r in rows if r["set"] == f"{K}->{D}" and r["activity"] == p
                       and r["method"] == m]
                snr = np.median([r["snr"] for r in got])
                worst = min(r["worst"] for r in got)
                cells.append(f"{snr:.2f} dB [{worst:.2f}]")
            print(f"| {K} -> {D} | {p:g} | " + " | ".join(cells) + " |")
    if args.out:
        from halfvae_ext.atomic_io import write_json_atomic
        write_json_atomic(args.out, dict(cpu=_cpu_name(), samples=args.samples, snr_db=args.snr,
                                         rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
