"""Nonstationary nonlinear ICA (issue 14): run_nonstationary from the command line.

    OMP_NUM_THREADS=1 python scripts/nonstationary_bench.py METHODS SEEDS [SETTINGS_JSON [PROBLEM_JSON]]

METHODS: comma-separated, from halfvae_u, halfvae, ivae, tcl, fastica, picard, amica; SEEDS: comma-separated ints
(data seed = method seed); SETTINGS_JSON: run_nonstationary_method arguments; PROBLEM_JSON:
make_nonstationary arguments (defaults: 5 sources, 40 segments of 1000 rows, L = 2 leaky ReLU).
Example (benchmarks/ICA_EXPERIMENTS.md, section 13):

    python scripts/nonstationary_bench.py halfvae_u,fastica 0,1,2 \
        '{"max_iter": 600, "n_restarts": 1, "decoder": "residual", "n_mixture": 1}'
"""
import sys, time, json
import numpy as np
from halfvae_ext.ica.demo import run_nonstationary
methods = sys.argv[1].split(",")
seeds = [int(s) for s in sys.argv[2].split(",")]
settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
if "hidden" in settings: settings["hidden"] = tuple(settings["hidden"])
kw = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
out = run_nonstationary(seeds, methods, progress=lambda m: print(m, flush=True), **kw, **settings)
for m in methods:
    print(m, "mcc", np.round(out[m]["mcc"], 4), "median", round(float(np.median(out[m]["mcc"])), 4),
          "|s| mcc", np.round(out[m]["mcc_abs"], 4), "median",
          round(float(np.median(out[m]["mcc_abs"])), 4))
