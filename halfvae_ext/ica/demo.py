"""The ICA experiments behind ``halfvae demo``: Half-VAE against a VAE with an encoder, iVAE and
the classical linear ICA algorithms (FastICA, Picard, AMICA), on the same data and seeds.

Problems (``DEMO_PROBLEMS``; sources standardized):
- ``linear``: the Half-VAE paper's problem, sine, square and sawtooth, X = S A^T with a random
  3 x 3 A (``make_paper_linear``).
- ``nonlinear``: the same sources through a random invertible 2-layer leaky-ReLU MLP.
- ``laplace``, ``assorted``, ``assorted_noisy``: 4 sources, Laplace or assorted (Laplace,
  uniform, bimodal, periodic), linear mix with cond <= 10, the last with 1% noise
  (``make_linear``): where FastICA and Picard are strong.
- ``images``: scikit-learn's two bundled photographs, grayscale, mixed by a random 2 x 2 matrix
  (``make_sample_images``; real signals, not exactly independent).
- ``nonstationary``: the iVAE / ICE-BeeM benchmark (``make_nonstationary``: 5 Gaussian sources,
  40 segments of 1000 rows with per-segment scales, 2-layer leaky-ReLU mix); identifiable only
  with the segment labels u.

Methods:
- ``halfvae``: :class:`HalfVAEICA` with its defaults (PCA init, prior warm-up, 4 restarts chosen by
  ELBO); on the nonlinear problems the residual decoder x = W z + mlp(z) (one hidden layer of 32
  leaky-ReLU units). Every Half-VAE method reports :func:`halfvae_sources`: the unmixing
  ``transform(X)`` with the linear decoder, the trained posterior means otherwise.
- ``halfvae_random``: the same with ``init="random"`` (random latent means and decoder).
- ``halfvae_plain``: the straightforward version: random init, no prior warm-up, one restart.
- ``halfvae_fastica``: Half-VAE warm-started from FastICA's sources (``init="fastica"``, opt-in;
  not the default, which runs no other ICA algorithm).
- ``halfvae_u`` (nonstationary): Half-VAE given u, one prior mixture component per segment and
  latent, the invertible decoder (``decoder="flow"``, coupling MLPs (64, 64); the table held at
  the decoder's inverse), 60 epochs, one restart.
- ``vae``: a VAE with an MLP encoder, trained with the same recipe (whitening, closed-form
  expected log-likelihood for the linear decoder, prior warm-up, restarts chosen by ELBO).
- ``ivae`` (nonstationary): :func:`fit_ivae`, encoder q(z | x, u), Gaussian prior with
  per-segment variances, MLP decoder.
- ``fastica``, ``picard``, ``amica``: scikit-learn's FastICA, Picard (``python-picard``) and
  AMICA (``jamica``), :func:`fit_linear_peer`.
:func:`run_nonstationary` runs the nonstationary methods on the benchmark's other settings
(deeper mixes, xtanh, uncentered sources) for the research log.

Metrics: the paper's per-component RMSE (standardize, match by |corr|, fix signs) and the mean
correlation coefficient (MCC). ``run_experiments`` returns a dict of all numbers; ``run_demo``
(``halfvae demo``) prints a table and writes ``results.json`` and ``sources_<problem>.png``
(atomically).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from ..atomic_io import save_figure_atomic, write_json_atomic
from .baselines import fit_ivae, fit_linear_peer, fit_tcl, fit_vae
from .data import make_linear, make_nonlinear, make_paper_linear, make_sample_images
from .estimator import HalfVAEICA
from .metrics import align_sources, mean_corr_coef, per_component_rmse
from .nonstationary_data import make_nonstationary
from .recipe import torch_threads

__all__ = ["run_experiments", "run_demo", "format_table", "plot_sources", "METHODS", "PROBLEMS",
           "DEMO_PROBLEMS", "DemoProblem", "SOURCE_NAMES", "make_problem", "default_samples",
           "halfvae_sources", "run_method", "plan_methods", "run_nonstationary",
           "run_nonstationary_method", "NONSTATIONARY_METHODS"]

SOURCE_NAMES = ("sine", "square", "sawtooth")
ASSORTED_NAMES = ("laplace", "uniform", "bimodal", "periodic")
# Every method; which of them apply to a problem is DemoProblem.allowed.
METHODS = ("halfvae", "halfvae_random", "halfvae_plain", "halfvae_fastica", "vae", "fastica",
           "picard", "amica", "halfvae_u", "ivae")
_UNSUPERVISED = ("halfvae", "halfvae_random", "halfvae_plain", "halfvae_fastica", "vae",
                 "fastica", "picard", "amica")
_LINEAR_PEERS = ("halfvae", "fastica", "picard", "amica")


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class DemoProblem:
    """One problem of the demo: a line for its table, its sources' names, the methods that apply
    to it and those the demo runs by default."""
    title: str
    source_names: tuple
    allowed: tuple
    default_methods: tuple


# The defaults keep `make demo` under 10 minutes on 2 cores: the ablations (halfvae_random,
# halfvae_plain, halfvae_fastica) and the VAE on the nonlinear problem are opt-in (--methods).
DEMO_PROBLEMS = {
    "linear": DemoProblem("the paper's problem: sine, square, sawtooth, linear mix", SOURCE_NAMES,
                          _UNSUPERVISED, ("halfvae", "vae") + _LINEAR_PEERS[1:]),
    "nonlinear": DemoProblem("the paper's sources through a 2-layer leaky-ReLU MLP",
                             SOURCE_NAMES, _UNSUPERVISED, ("halfvae", "fastica", "picard")),
    "laplace": DemoProblem("4 Laplace sources, linear mix", tuple(f"laplace{i}" for i in range(4)),
                           _UNSUPERVISED, _LINEAR_PEERS),
    "assorted": DemoProblem("4 assorted sources, linear mix", ASSORTED_NAMES, _UNSUPERVISED,
                            _LINEAR_PEERS),
    "assorted_noisy": DemoProblem("4 assorted sources, linear mix, 1% noise", ASSORTED_NAMES,
                                  _UNSUPERVISED, _LINEAR_PEERS),
    "images": DemoProblem("scikit-learn's two photographs (grayscale), linear mix",
                          ("china", "flower"), _UNSUPERVISED, _LINEAR_PEERS),
    "nonstationary": DemoProblem("5 Gaussian sources, 40 segments, 2-layer leaky-ReLU MLP "
                                 "(segment labels u given to halfvae_u and ivae)",
                                 tuple(f"s{i}" for i in range(5)),
                                 _UNSUPERVISED + ("halfvae_u", "ivae"),
                                 ("halfvae_u", "ivae", "fastica")),
}
PROBLEMS = tuple(DEMO_PROBLEMS)
_N_SEGMENTS = 40


def default_samples(name: str, quick: bool = False) -> int:
    """Rows of a problem when n_samples is not given: 5000 for the synthetic problems, the
    iVAE benchmark's 40 segments x 1000 (quick: x 250), 17,120 pixels (quick: 4,320)."""
    if name == "nonstationary":
        return _N_SEGMENTS * (250 if quick else 1000)
    if name == "images":
        return 4320 if quick else 17120
    return 5000


def make_problem(name: str, n_samples, seed: int, quick: bool = False):
    """The problem ``name`` of about ``n_samples`` rows (None: :func:`default_samples`) drawn
    with ``seed``."""
    n = default_samples(name, quick) if n_samples is None else int(n_samples)
    if name == "linear":
        return make_paper_linear(n, random_state=seed)
    if name == "nonlinear":
        return make_nonlinear(n, len(SOURCE_NAMES), n_layers=2, random_state=seed)
    if name == "laplace":
        return make_linear(n, 4, "laplace", random_state=seed)
    if name == "assorted":
        return make_linear(n, 4, "assorted", random_state=seed)
    if name == "assorted_noisy":
        return make_linear(n, 4, "assorted", noise=0.01, random_state=seed)
    if name == "images":
        # the subsampling step that leaves at most n pixels of the 427 x 640 photographs
        stride = max(1, math.ceil(math.sqrt(427 * 640 / max(n, 1))))
        return make_sample_images(stride, random_state=seed)
    if name == "nonstationary":
        return make_nonstationary(max(n // _N_SEGMENTS, 2), _N_SEGMENTS, 5, n_layers=2,
                                  random_state=seed)
    raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS}")


# ----------------------------------------------------------------------------- nonstationary
NONSTATIONARY_METHODS = ("halfvae_u", "halfvae", "ivae", "tcl", "fastica", "picard", "amica")


def run_nonstationary_method(method, P, seed, *, uncentered=False, max_iter=1500, n_restarts=4, decoder="mlp",
                             hidden=(32,), n_mixture=3, kl="mc", batch_size=None,
                             ivae_batch_size=None, halfvae_params=None, ivae_params=None,
                             tcl_params=None):
    """Recovered sources [n, K] of one method on a nonstationary problem P (X, S, u); for
    "tcl" their absolute values (:func:`fit_tcl`).
    halfvae_params: more HalfVAEICA parameters (a dict) for the Half-VAE methods; ivae_params:
    :func:`fit_ivae` arguments that replace the shared ones for iVAE (e.g. its own max_iter,
    which counts epochs, and a mini-batch epoch is many steps); tcl_params: :func:`fit_tcl`
    arguments."""
    K = P.S.shape[1]
    if method in ("halfvae_u", "halfvae"):
        est = HalfVAEICA(K, decoder=decoder, hidden=hidden, n_mixture=n_mixture, kl=kl,
                         max_iter=max_iter, n_restarts=n_restarts, batch_size=batch_size,
                         tol=None, random_state=seed, **(halfvae_params or {}))
        return est.fit(P.X, u=P.u if method == "halfvae_u" else None).posterior_means_
    if method == "ivae":
        args = dict(decoder=decoder, hidden=hidden, max_iter=max_iter, n_restarts=n_restarts,
                    batch_size=ivae_batch_size, kl=kl, learn_means=uncentered)
        args.update(ivae_params or {})
        return fit_ivae(P.X, P.u, K, random_state=seed, **args)[0]
    if method == "tcl":
        return fit_tcl(P.X, P.u, K, random_state=seed, **(tcl_params or {}))[0]
    if method in ("fastica", "picard", "amica"):
        return fit_linear_peer(method, P.X, K, seed)
    raise ValueError(f"unknown method {method!r}; choose from {NONSTATIONARY_METHODS}")


def run_nonstationary(seeds=(0, 1, 2), methods=NONSTATIONARY_METHODS, *, n_per_segment=1000,
                      n_segments=40, n_sources=5, n_layers=2, activation="lrelu",
                      uncentered=False, benchmark="ivae", progress=None, **settings):
    """Every method on ``make_nonstationary(..., random_state=seed)`` for every seed (the data
    seed is also the method's random_state); ``settings`` go to
    :func:`run_nonstationary_method`. Returns {method: {"mcc": [...], "mcc_abs": [...],
    "seconds": [...]}} plus "config": "mcc" against the sources (for "tcl", which recovers only
    their absolute values, against |S|), "mcc_abs" of the absolute values, |S| against |S_hat|,
    for every method (TCL's own metric, so all methods can be compared on it)."""
    out = {"config": dict(seeds=[int(s) for s in seeds], n_per_segment=n_per_segment,
                          n_segments=n_segments, n_sources=n_sources, n_layers=n_layers,
                          activation=activation, uncentered=uncentered, benchmark=benchmark,
                          **settings)}
    for seed in seeds:
        P = make_nonstationary(n_per_segment, n_segments, n_sources, n_layers=n_layers,
                               activation=activation, uncentered=uncentered,
                               benchmark=benchmark, random_state=seed)
        for method in methods:
            t0 = time.perf_counter()
            with torch_threads(1):
                S = run_nonstationary_method(method, P, seed, uncentered=uncentered, **settings)
            r = out.setdefault(method, {"mcc": [], "mcc_abs": [], "seconds": []})
            r["seconds"].append(time.perf_counter() - t0)
            # TCL's output already estimates |s| (centered by its FastICA: no abs of it).
            r["mcc_abs"].append(float(mean_corr_coef(np.abs(P.S),
                                                     S if method == "tcl" else np.abs(S))))
            r["mcc"].append(r["mcc_abs"][-1] if method == "tcl" else
                            float(mean_corr_coef(P.S, S)))
            if progress is not None:
                progress(f"seed {seed:3d} {method:10s} mcc {r['mcc'][-1]:.4f} "
                         f"|s| mcc {r['mcc_abs'][-1]:.4f} {r['seconds'][-1]:6.1f}s")
    return out


# ----------------------------------------------------------------------------- one run
def _method_settings(quick: bool):
    return dict(max_iter=600 if quick else 1500, n_restarts=2 if quick else 4)


def _nonstationary_settings(quick: bool):
    """Half-VAE with u (the flow decoder: one prior component per segment, coupling MLPs
    (64, 64), 60 epochs of mini-batches of 1000) and iVAE (MLP decoder, 30 epochs of mini-batches
    of 1000), one restart each; quick: a quarter."""
    return dict(halfvae_u=dict(decoder="flow", n_mixture=1, hidden=(64, 64),
                               max_iter=15 if quick else 60, n_restarts=1),
                ivae=dict(max_iter=8 if quick else 30, n_restarts=1))


def halfvae_sources(est: HalfVAEICA, X):
    """The sources the demo and ``halfvae separate`` report from a fitted :class:`HalfVAEICA`:
    with the linear decoder ``est.transform(X)``, the unmixing (what FastICA's ``fit_transform``
    returns); with the nonlinear decoders the trained posterior means ``posterior_means_``
    (transform would be a per-row optimization). For the linear decoder the posterior means are
    shrunk toward the prior's modes by the learned noise; the unmixing is not."""
    if hasattr(est, "components_"):  # a linear decoder's unmixing
        return est.transform(X)
    return est.posterior_means_


def run_method(method: str, problem: str, P, seed: int, quick: bool = False):
    """Recovered sources [n, K] of one method on one problem P (X, S; u for nonstationary)."""
    if method not in DEMO_PROBLEMS[problem].allowed:
        raise ValueError(f"method {method!r} does not apply to problem {problem!r}; choose "
                         f"from {DEMO_PROBLEMS[problem].allowed}")
    X, K = P.X, P.S.shape[1]
    s = _method_settings(quick)
    decoder = "residual" if problem in ("nonlinear", "nonstationary") else "linear"
    if method == "halfvae":
        est = HalfVAEICA(K, decoder=decoder, random_state=seed, **s)
    elif method == "halfvae_random":
        est = HalfVAEICA(K, decoder=decoder, init="random", random_state=seed, **s)
    elif method == "halfvae_fastica":
        est = HalfVAEICA(K, decoder=decoder, init="fastica", random_state=seed, **s)
    elif method == "halfvae_plain":
        est = HalfVAEICA(K, decoder=decoder, init="random", prior_warmup=0.0,
                         n_restarts=1, max_iter=s["max_iter"], random_state=seed)
    elif method == "halfvae_u":
        est = HalfVAEICA(K, tol=None, random_state=seed,
                         **_nonstationary_settings(quick)["halfvae_u"])
    else:
        est = None
    if est is not None:
        with warnings.catch_warnings():
            if quick:  # the quick settings are short; the full ones are expected to converge
                warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, u=P.u if method == "halfvae_u" else None)
        return halfvae_sources(est, X)
    if method == "vae":
        return fit_vae(X, K, decoder=decoder, random_state=seed, **s)[0]
    if method == "ivae":
        return fit_ivae(X, P.u, K, decoder="mlp", batch_size=1000, random_state=seed,
                        **_nonstationary_settings(quick)["ivae"])[0]
    return fit_linear_peer(method, X, K, seed)


def _run_task(task):
    """One (problem, seed, method) fit; module-level so that worker processes can run it."""
    problem, seed, method, n_samples, quick, keep = task
    with torch_threads(1):
        P = make_problem(problem, n_samples, seed, quick)
        t0 = time.perf_counter()
        S = run_method(method, problem, P, seed, quick)
        dt = time.perf_counter() - t0
    out = {"rmse": [float(v) for v in per_component_rmse(P.S, S)],
           "mcc": float(mean_corr_coef(P.S, S)), "seconds": dt, "rows": int(P.X.shape[0])}
    if keep:
        out["true"] = P.S
        out["aligned"] = align_sources(P.S, S)
        out["image_shape"] = P.image_shape
    return out


def plan_methods(problems, methods=None):
    """{problem: methods to run}: each problem's default methods, or those of ``methods`` that
    apply to it. Raises ValueError naming an unknown problem or method, or a method that applies
    to none of the problems."""
    for p in problems:
        if p not in DEMO_PROBLEMS:
            raise ValueError(f"unknown problem {p!r}; choose from {', '.join(PROBLEMS)}")
    if methods is None:
        return {p: list(DEMO_PROBLEMS[p].default_methods) for p in problems}
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if not any(m in DEMO_PROBLEMS[p].allowed for p in problems):
            raise ValueError(f"method {m!r} applies to none of the problems "
                             f"{', '.join(problems)}")
    return {p: [m for m in methods if m in DEMO_PROBLEMS[p].allowed] for p in problems}


def run_experiments(seeds=(0, 1, 2), problems=PROBLEMS, methods=None, n_samples=None,
                    quick=False, keep_sources_of_seed=None, progress=None, n_jobs=1):
    """Run the methods on every problem for every seed (the data seed is also the method's
    random_state). ``methods``: None for each problem's default methods
    (``DEMO_PROBLEMS[p].default_methods``), or a list (each problem runs those that apply to
    it). ``n_samples``: rows of every problem (None: :func:`default_samples`). Returns
    ``{"config": ..., "results": {problem: {method: {"rmse": [[K per seed]], "mcc": [...],
    "seconds": [...]}}}, "summary": ...}``; with ``keep_sources_of_seed``, also ``"sources"``
    (true and recovered, aligned) of that seed for plotting.

    n_jobs > 1 runs the fits in that many worker processes (each fit uses one thread; the
    results do not depend on n_jobs). The longest fits are started first.
    """
    seeds = [int(s) for s in seeds]
    plan = plan_methods(problems, methods)
    problems = [p for p in problems if plan[p]]
    tasks = [(p, seed, m, n_samples, bool(quick), seed == keep_sources_of_seed)
             for p in problems for seed in seeds for m in plan[p]]
    done = {}

    def record(task, r):
        done[task[:3]] = r
        if progress is not None:
            problem, seed, method = task[:3]
            progress(f"{problem:14s} seed {seed:3d} {method:15s} rmse "
                     + " ".join(f"{v:.4f}" for v in r["rmse"])
                     + f"  mcc {r['mcc']:.4f}  {r['seconds']:5.1f}s")

    if n_jobs is None or n_jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            record(task, _run_task(task))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        # the few long fits first, so that no worker is left with one at the end
        def expected_cost(task):
            return {"halfvae_u": 3, "ivae": 2}.get(task[2], 1) * (task[0] == "nonstationary")
        ordered = sorted(tasks, key=expected_cost, reverse=True)
        # spawn, not fork: forking after OpenMP has started can hang the children.
        with cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")) as ex:
            futures = {ex.submit(_run_task, t): t for t in ordered}
            for fut in cf.as_completed(futures):
                record(futures[fut], fut.result())
    results = {}
    kept = {}
    for problem in problems:
        results[problem] = {}
        for method in plan[problem]:
            r = results[problem][method] = {"rmse": [], "mcc": [], "seconds": []}
            for seed in seeds:
                d = done[(problem, seed, method)]
                r["rmse"].append(d["rmse"])
                r["mcc"].append(d["mcc"])
                r["seconds"].append(d["seconds"])
                if "aligned" in d:
                    k = kept.setdefault(problem, {"true": d["true"]})
                    k[method] = d["aligned"]
                    if d["image_shape"] is not None:
                        k["image_shape"] = d["image_shape"]
    out = {"config": {"seeds": seeds, "problems": list(problems),
                      "methods": {p: list(plan[p]) for p in problems},
                      "n_samples": {p: done[(p, seeds[0], plan[p][0])]["rows"] for p in problems},
                      "quick": bool(quick), "method_settings": _method_settings(quick),
                      "nonstationary_settings": _nonstationary_settings(quick),
                      "n_jobs": int(n_jobs or 1), "torch": torch.__version__},
           "results": results, "summary": summarize(results)}
    if kept:
        out["sources"] = kept
    return out


def summarize(results):
    """Mean, std, median and worst (over seeds) of each component's RMSE and of MCC."""
    summary = {}
    for problem, by_method in results.items():
        summary[problem] = {}
        for method, r in by_method.items():
            rmse = np.asarray(r["rmse"], dtype=np.float64)
            mcc = np.asarray(r["mcc"], dtype=np.float64)
            summary[problem][method] = {
                "rmse_mean": rmse.mean(0).tolist(), "rmse_std": rmse.std(0).tolist(),
                "rmse_median": np.median(rmse, 0).tolist(), "rmse_worst": rmse.max(0).tolist(),
                "mcc_mean": float(mcc.mean()), "mcc_std": float(mcc.std()),
                "mcc_median": float(np.median(mcc)), "mcc_worst": float(mcc.min()),
                "seconds_mean": float(np.mean(r["seconds"])), "n_seeds": int(len(mcc))}
    return summary


def format_table(out) -> str:
    """A text table per problem: each method's per-component RMSE (mean +- std [median]) and MCC
    (mean +- std [median, worst]) over the seeds, and its mean fit time."""
    lines = []
    n = len(out["config"]["seeds"])
    for problem, by_method in out["summary"].items():
        spec = DEMO_PROBLEMS[problem]
        rows = out["config"]["n_samples"].get(problem)
        lines.append(f"{problem}: {spec.title}; {n} seed(s), {rows} rows "
                     "(per-component RMSE: mean +- std [median]; lower is better)")
        lines.append(f"  {'method':15s}" + "".join(f"{name:>24s}" for name in spec.source_names)
                     + f"{'MCC [median, worst]':>35s}{'time':>8s}")
        for method, s in by_method.items():
            cells = "".join(f"{m:.4f} +-{sd:.4f} [{md:.3f}]".rjust(24)
                            for m, sd, md in zip(s["rmse_mean"], s["rmse_std"], s["rmse_median"]))
            lines.append(f"  {method:15s}{cells}   {s['mcc_mean']:.4f} +-{s['mcc_std']:.4f} "
                         f"[{s['mcc_median']:.4f}, {s['mcc_worst']:.4f}]{s['seconds_mean']:7.1f}s")
        lines.append("")
    return "\n".join(lines)


def plot_sources(problem, kept, path, window=None):
    """PNG of one problem's true vs recovered sources (aligned to the truth): a panel per
    method with the true sources dashed under the recovered ones (the first ``window`` rows;
    None: all), or for image sources one row of images per method under the true images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in kept if m not in ("true", "image_shape")]
    names = DEMO_PROBLEMS[problem].source_names if problem in DEMO_PROBLEMS else None
    if "image_shape" in kept:
        shape = tuple(kept["image_shape"])
        rows = ["true"] + methods
        K = kept["true"].shape[1]
        fig, axes = plt.subplots(len(rows), K, figsize=(2.6 * K, 1.9 * len(rows)), squeeze=False)
        for i, row in enumerate(rows):
            for k in range(K):
                ax = axes[i, k]
                ax.imshow(kept[row][:, k].reshape(shape), cmap="gray")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{row}: {names[k] if names else k}", fontsize=8)
        fig.suptitle(f"{problem}: true images (top) and the unmixed ones", fontsize=10)
        fig.tight_layout()
        save_figure_atomic(fig, path, dpi=90)
        return
    true = kept["true"][:window]
    true = (true - true.mean(0)) / np.maximum(true.std(0), 1e-12)
    t = np.arange(true.shape[0])
    K = true.shape[1]
    fig, axes = plt.subplots(len(methods), 1, figsize=(9, (0.55 * K + 0.5) * len(methods)),
                             squeeze=False, sharex=True)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for i, method in enumerate(methods):
        ax = axes[i, 0]
        est = kept[method][:window]
        est = (est - est.mean(0)) / np.maximum(est.std(0), 1e-12)
        for k in range(K):
            off = 3.2 * (K - 1 - k)
            ax.plot(t, true[:, k] + off, color="0.55", lw=1.6, ls="--")
            ax.plot(t, est[:, k] + off, color=colors[k % len(colors)], lw=0.7)
        ax.set_yticks([])
        ax.set_title(f"{problem}: {method}", fontsize=9)
    fig.suptitle("true sources (grey, dashed) vs recovered (color)", fontsize=10)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=90)


def _jsonable(out):
    res = {k: v for k, v in out.items() if k != "sources"}
    return res


def _plot_window(problem, n_rows):
    """Rows shown in a problem's figure: 3 segments of the nonstationary problem (a whole
    record is too dense to read), everything otherwise."""
    return 3 * n_rows // _N_SEGMENTS if problem == "nonstationary" else None


def run_demo(out_dir="halfvae_demo", seeds=3, quick=False, n_samples=None, methods=None,
             problems=PROBLEMS, n_jobs=None, first_seed=0, stream=None):
    """The CLI's ``demo``: run, print the table, write results.json and one figure per problem,
    sources_<problem>.png."""
    import sys
    stream = stream or sys.stdout
    os.makedirs(out_dir, exist_ok=True)
    seed_list = list(range(int(first_seed), int(first_seed) + int(seeds)))
    if n_jobs is None:
        n_jobs = min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()

    def progress(msg):
        print(msg, file=stream, flush=True)

    out = run_experiments(seed_list, problems=problems, methods=methods, n_samples=n_samples,
                          quick=quick, keep_sources_of_seed=seed_list[0], progress=progress,
                          n_jobs=n_jobs)
    out["config"]["total_seconds"] = time.perf_counter() - t0
    print("", file=stream)
    print(format_table(out), file=stream)
    json_path = os.path.join(out_dir, "results.json")
    write_json_atomic(json_path, _jsonable(out))
    written = [json_path]
    for problem, kept in out.get("sources", {}).items():
        path = os.path.join(out_dir, f"sources_{problem}.png")
        plot_sources(problem, kept, path,
                     window=_plot_window(problem, out["config"]["n_samples"][problem]))
        written.append(path)
    print(f"wrote {', '.join(written)} ({out['config']['total_seconds']:.0f}s)", file=stream)
    return out
