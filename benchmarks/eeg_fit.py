"""EEG-sized fits: a synthetic 64-channel, 250,000-sample recording with known sources
(``make_eeg_like``: dipole scalp maps, super- and sub-Gaussian sources, 1% sensor noise) fitted
by Half-VAE (HalfVAEICA's defaults), Picard, FastICA and AMICA, each in a process of its own so
that the peak memory it reports is its own: fit seconds, MCC against the true sources, max RSS.

    python -m benchmarks.eeg_fit                              # 64 x 250,000, every method
    python -m benchmarks.eeg_fit --samples 50000 --channels 16 --methods halfvae picard
    python -m benchmarks.eeg_fit --timeout 1800 --out eeg_fit.json

"data" is the memory of making the recording alone (every method's RSS includes it). A fit
that runs past --timeout seconds is stopped and reported as such. Times are wall-clock: name the
CPU and OMP_NUM_THREADS with any figure (the first line printed says both).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import warnings

METHODS = ("halfvae", "picard", "fastica", "amica")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_child(method: str, samples: int, channels: int, seed: int) -> dict:
    """Fit one method in this process; returns seconds and MCC (nothing for "data")."""
    import numpy as np

    from halfvae_ext.ica import HalfVAEICA, mean_corr_coef
    from halfvae_ext.ica.baselines import fit_linear_peer
    from halfvae_ext.ica.data import make_eeg_like
    problem = make_eeg_like(samples, channels, random_state=seed)
    if method == "data":
        return {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "halfvae":
            est = HalfVAEICA(channels, random_state=seed)
            S = est.fit_transform(problem.X)
            extra = dict(iterations=int(est.n_iter_), solver=est._run.params["solver"])
        else:
            S = fit_linear_peer(method, problem.X, channels, seed)
            extra = {}
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, mcc=float(mean_corr_coef(problem.S, np.asarray(S))), **extra)


def measure(method: str, args) -> dict:
    """Run one method in a child process with a deadline; its result, max RSS and status."""
    cmd = [sys.executable, "-m", "benchmarks.eeg_fit", "--child", method,
           "--samples", str(args.samples), "--channels", str(args.channels),
           "--seed", str(args.seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + args.timeout
    status = "ok"
    # wait4 reaps the child and gives its own resource usage (ru_maxrss in KiB on Linux).
    reaped = False
    try:
        while True:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, code, usage = os.wait4(proc.pid, 0)
                status = f"stopped after {args.timeout:g} s"
                break
            time.sleep(0.2)
        reaped = True
    finally:
        if not reaped:  # interrupted: never leave the child running
            proc.kill()
            os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(code)
    out = proc.stdout.read()
    proc.stdout.close()
    result = dict(method=method, status=status, max_rss_mb=usage.ru_maxrss / 1024.0)
    if status == "ok":
        if proc.returncode != 0:
            result["status"] = f"failed (exit status {proc.returncode})"
        else:
            result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=250_000)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds a fit may run before it is stopped (default 3600)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child", choices=METHODS + ("data",), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.samples < 2 or args.channels < 2 or args.timeout <= 0:
        ap.error("--samples and --channels must be at least 2, --timeout positive")
    if args.child:
        print(json.dumps(run_child(args.child, args.samples, args.channels, args.seed)))
        return 0
    from benchmarks.fit_cost import _cpu_name
    print(f"# {_cpu_name()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{args.channels} channels x {args.samples} samples, seed {args.seed}", flush=True)
    results = []
    for method in ("data",) + tuple(args.methods):
        r = measure(method, args)
        results.append(r)
        fit = f"{r['seconds']:8.1f} s  MCC {r['mcc']:.4f}" if "seconds" in r else r["status"]
        print(f"{method:8s} {fit}  max RSS {r['max_rss_mb']:7.0f} MB", flush=True)
    if args.out:
        from halfvae_ext.atomic_io import write_json_atomic
        write_json_atomic(args.out, dict(samples=args.samples, channels=args.channels,
                                         seed=args.seed, cpu=_cpu_name(), results=results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
