"""HalfVAEICA's defaults with segment labels u against FastICA, on the data a new user tries:
nonstationary sources (40 segments x 500 rows) mixed linearly (n_layers=1) and by a 2-layer
leaky-ReLU MLP, several data seeds. Prints one line per (mix, seed, method): MCC and seconds.

    python -m benchmarks.auto_decoder [--seeds 0 1] [--sources 5] [--layers 1 2]
        [--methods halfvae_defaults_u fastica halfvae_linear_u halfvae_flow_m1]

halfvae_defaults_u: HalfVAEICA(K) with u (decoder="auto": the flow or the linear flow, kept
by held-out rows); halfvae_linear_u: the linear decoder with u; halfvae_flow_m1: the flow with
one Gaussian per segment and coupling MLPs (64, 64) (the settings the demo's halfvae_u uses,
200 epochs).
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from halfvae_ext.ica import HalfVAEICA, make_nonstationary, mean_corr_coef
from halfvae_ext.ica.baselines import fit_linear_peer


METHODS = {"halfvae_defaults_u": {}, "fastica": None, "halfvae_linear_u": {"decoder": "linear"},
           "halfvae_flow_m1": {"decoder": "flow", "n_mixture": 1, "hidden": (64, 64)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sources", type=int, default=5)
    ap.add_argument("--per-segment", type=int, default=500)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["halfvae_defaults_u", "fastica"],
                    choices=sorted(METHODS))
    args = ap.parse_args(argv)
    K = args.sources
    rows = []
    for layers in args.layers:
        for seed in args.seeds:
            P = make_nonstationary(args.per_segment, 40, K, n_layers=layers, random_state=seed)
            for name in args.methods:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if name == "fastica":
                        S = fit_linear_peer("fastica", P.X, K, seed)
                    else:
                        est = HalfVAEICA(K, random_state=seed, **METHODS[name])
                        S = est.fit_transform(P.X, u=P.u)
                dt = time.perf_counter() - t0
                mcc = mean_corr_coef(P.S, S)
                rows.append((layers, seed, name, mcc, dt))
                print(f"layers={layers} seed={seed} {name:20s} MCC {mcc:.4f} {dt:7.1f}s",
                      flush=True)
    for layers in args.layers:
        for name in args.methods:
            m = [r[3] for r in rows if r[0] == layers and r[2] == name]
            print(f"layers={layers} {name:20s} mean MCC {np.mean(m):.4f} worst {min(m):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
