"""Linear ICA where FastICA is strong: Half-VAE against FastICA and Picard on assorted sources
(Laplace, uniform, bimodal, periodic; ``make_linear(..., "assorted")``), 3-6 sources, noise-free
and with 1% noise; worst per-component RMSE per data set (issue 14's goal).

    OMP_NUM_THREADS=1 python scripts/linear_peers_bench.py SEEDS [SOURCES [NOISES [PARAMS_JSON]]]

SEEDS, SOURCES (default 3,4,5,6), NOISES (default 0,0.01): comma-separated; PARAMS_JSON: more
HalfVAEICA parameters (e.g. '{"noise": [0.5, 0.05]}'). Half-VAE: its defaults and PARAMS,
reported as the demo reports it (experiments.halfvae_sources: the unmixing transform(X)), and
its posterior means beside it. One line per data set.
"""
import json
import sys
import time

import torch

from halfvae_ext import HalfVAEICA
from halfvae_ext.ica.baselines import fit_linear_peer
from halfvae_ext.ica.demo import halfvae_sources
from halfvae_ext.ica import make_linear, per_component_rmse

torch.set_num_threads(1)
seeds = [int(s) for s in sys.argv[1].split(",")]
sources = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "3,4,5,6").split(",")]
noises = [float(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,0.01").split(",")]
params = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
for k in sources:
    for noise in noises:
        for seed in seeds:
            P = make_linear(5000, k, "assorted", noise=noise, random_state=seed)
            t0 = time.perf_counter()
            est = HalfVAEICA(k, random_state=seed, **params).fit(P.X)
            dt = time.perf_counter() - t0
            worst = {"halfvae": per_component_rmse(P.S, halfvae_sources(est, P.X)).max(),
                     "halfvae_means": per_component_rmse(P.S, est.posterior_means_).max()}
            for m in ("fastica", "picard"):
                worst[m] = per_component_rmse(P.S, fit_linear_peer(m, P.X, k, seed)).max()
            ok = worst["halfvae"] <= min(worst["fastica"], worst["picard"])
            print(f"K={k} noise={noise:g} seed={seed} worst RMSE: " +
                  " ".join(f"{m} {v:.4f}" for m, v in worst.items()) +
                  f"  {'ok' if ok else 'WORSE'}  ({dt:.0f}s)", flush=True)
