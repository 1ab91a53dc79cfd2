"""The Half-VAE paper's ICA experiment: Half-VAE vs a VAE with an encoder vs FastICA.

Problems (3 sources: sine, square, sawtooth, standardized):
- ``linear``: the paper's linear mix (``make_paper_linear``), X = S A^T with a random 3 x 3 A.
- ``nonlinear``: the same sources through a random invertible 2-layer leaky-ReLU MLP
  (``make_nonlinear``).

Methods:
- ``halfvae``: :class:`HalfVAEICA` with its defaults (PCA init, prior warm-up, 4 restarts chosen by
  ELBO); on the nonlinear problem the residual decoder x = W z + mlp(z) (one hidden layer of 32
  leaky-ReLU units). Every Half-VAE method reports the trained posterior means of the rows,
  ``posterior_means_`` (not ``transform``).
- ``halfvae_random``: the same with ``init="random"`` (random latent means and decoder).
- ``halfvae_plain``: the straightforward version: random init, no prior warm-up, one restart.
- ``halfvae_fastica``: Half-VAE warm-started from FastICA's sources (``init="fastica"``, opt-in;
  not the default, which runs no other ICA algorithm).
- ``vae``: a VAE with an MLP encoder, trained with the same recipe (whitening, closed-form
  expected log-likelihood for the linear decoder, prior warm-up, restarts chosen by ELBO).
- ``fastica``: scikit-learn's FastICA (``whiten="unit-variance"``).

Nonstationary nonlinear ICA (issue 14; :func:`run_nonstationary`): the iVAE / ICE-BeeM benchmark
(``make_nonstationary``: segments, a mixing MLP) with Half-VAE given the segments u
(``halfvae_u``: the conditional prior), Half-VAE without u (``halfvae``), the iVAE baseline
(:func:`fit_ivae`: encoder q(z | x, u), Gaussian prior with per-segment variances) and FastICA,
on the same data and seeds; metric MCC.

Metrics: the paper's per-component RMSE (standardize, match by |corr|, fix signs) and the mean
correlation coefficient (MCC). ``run_experiments`` returns a dict of all numbers; ``main`` (and
``halfvae demo``) prints a table, writes ``results.json`` and ``sources.png`` (atomically).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from .atomic_io import atomic_write
from .estimator import HalfVAEICA
from .ica import (make_nonlinear, make_nonstationary, make_paper_linear, mean_corr_coef,
                  per_component_rmse)
from .ica.metrics import align_sources
from .models import VAE, GMMPrior, ResidualDecoder, make_mlp
from .preprocessing import check_data, fit_whitening
from .recipe import (INIT_NOISE_STD, Recipe, random_orthogonal, reset_parameters, restart_seeds,
                     torch_threads)
from .restarts import RunState, run_restarts

__all__ = ["run_experiments", "format_table", "plot_sources", "fit_vae", "VAERecipe", "METHODS",
           "PROBLEMS", "SOURCE_NAMES", "IVAE", "IVAERecipe", "fit_ivae", "run_nonstationary",
           "NONSTATIONARY_METHODS"]

SOURCE_NAMES = ("sine", "square", "sawtooth")
PROBLEMS = ("linear", "nonlinear")
METHODS = ("halfvae", "halfvae_random", "halfvae_plain", "halfvae_fastica", "vae", "fastica")
_N_SOURCES = 3


# ----------------------------------------------------------------------------- file helpers
def write_json(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False))


# ----------------------------------------------------------------------------- problems
def make_problem(name: str, n_samples: int, seed: int):
    if name == "linear":
        return make_paper_linear(n_samples, random_state=seed)
    if name == "nonlinear":
        return make_nonlinear(n_samples, _N_SOURCES, n_layers=2, random_state=seed)
    raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS}")


# ----------------------------------------------------------------------------- VAE baseline
@dataclass(frozen=True)
class VAERecipe(Recipe):
    """:class:`~halfvae_ext.recipe.Recipe` with an encoder in place of the latent table: the same
    schedule, prior warm-up, epoch, final ELBO and restarts (:func:`run_restarts`); its own
    model, initialization, optimizer (one Adam, the encoder's group at its own rate) and
    full-batch ELBO terms."""
    encoder_hidden: tuple = (64, 64)
    encoder_learning_rate: float = 0.01

    def build_model(self, n_rows, data_dim, device) -> VAE:
        K = self.n_components
        return VAE(data_dim, K, encoder_hidden=self.encoder_hidden, decoder=self.decoder,
                   prior=GMMPrior(K, self.n_mixture), hidden=self.hidden,
                   activation=self.activation, noise=self.noise,
                   init_logvar=2 * math.log(INIT_NOISE_STD),
                   init_noise_std=INIT_NOISE_STD).to(device)

    def initialize(self, model: VAE, Xw, restart, seed, generator) -> None:
        """Default layers drawn from ``generator``, posterior variance started small, the linear
        part of the decoder at the identity (restart 0) or a random rotation when the whitened
        data has K dimensions, the residual correction at zero."""
        K = self.n_components
        reset_parameters(model.encoder, generator)
        reset_parameters(model.decoder, generator)
        with torch.no_grad():
            model.encoder[-1].bias[K:].fill_(2 * math.log(INIT_NOISE_STD))
            residual = isinstance(model.decoder, ResidualDecoder)
            linear = model.decoder if self.decoder == "linear" else \
                model.decoder.linear if residual else None
            if residual:
                model.decoder.zero_correction_()
            if linear is not None and Xw.shape[1] == K:
                R = torch.eye(K, dtype=torch.float64) if restart == 0 else \
                    random_orthogonal(K, generator)
                linear.weight.copy_(R.float())

    def make_optimizers(self, model: VAE) -> list:
        return [torch.optim.Adam([
            dict(params=model.encoder.parameters(), lr=self.encoder_learning_rate),
            dict(params=list(model.decoder.parameters()) + list(model.likelihood.parameters())
                 + list(model.prior.parameters()), lr=self.learning_rate)])]

    def set_learning_rates(self, model: VAE, optimizers: list, factor: float) -> None:
        optimizers[0].param_groups[0]["lr"] = self.encoder_learning_rate * factor
        optimizers[0].param_groups[1]["lr"] = self.learning_rate * factor

    def batch_elbo_terms(self, model: VAE, x, idx, generator, u=None):
        # full batch: the encoder sees every row
        return model.elbo_terms(x, generator=generator, u=u)


def fit_vae(X, n_components, *, decoder="linear", hidden=(32,), activation="leaky_relu",
            encoder_hidden=(64, 64),
            n_mixture=3, max_iter=1500, n_restarts=4, learning_rate=0.01,
            encoder_learning_rate=0.01, prior_warmup=0.3, lr_decay=0.3, random_state=0):
    """The VAE-with-encoder baseline, trained with :class:`HalfVAEICA`'s recipe (the same
    whitening from :mod:`halfvae_ext.preprocessing`; the same seeds, initial noise, prior
    warm-up, learning-rate schedule, epoch, final ELBO and restarts chosen by it from
    :mod:`halfvae_ext.recipe` and :mod:`halfvae_ext.restarts`, through :class:`VAERecipe`;
    closed-form expected log-likelihood for the linear decoder, antithetic draws for the MLP).
    Returns (sources [n, K] = the encoder means, info dict)."""
    X = check_data(X)
    whitening, Xw_np = fit_whitening(X, n_components, "pca", keep_all_dims=decoder != "linear")
    Xw = torch.as_tensor(Xw_np, dtype=torch.float32)
    recipe = VAERecipe(n_components=whitening.n_components, n_mixture=n_mixture, decoder=decoder,
                       hidden=hidden, activation=activation, max_iter=max_iter,
                       learning_rate=learning_rate, prior_warmup=prior_warmup, lr_decay=lr_decay,
                       encoder_hidden=encoder_hidden,
                       encoder_learning_rate=encoder_learning_rate)
    device = torch.device("cpu")
    # The run's params and fingerprint are only for resuming, which the baseline never does.
    run = RunState({}, "", restart_seeds(random_state, n_restarts))
    run_restarts(run, recipe, Xw, device)
    best = run.best
    model = recipe.build_model(Xw.shape[0], Xw.shape[1], device)
    model.load_state_dict(best.snapshot.model)
    with torch.no_grad():
        S = model.encode(Xw)[0].double().numpy().copy()
    return S, {"elbo": best.elbo, "best_restart": best.restart,
               "restart_elbos": [f.elbo for f in run.finished]}


# ----------------------------------------------------------------------------- iVAE baseline
class IVAE(VAE):
    """iVAE (Khemakhem et al. 2020): a VAE whose encoder sees the segment, q(z | x, u), and whose
    prior is conditional, p(z | u) = prod_k N(z_k; m_uk, exp(v_uk)).

    The prior is a one-component :class:`GMMPrior` with a group per segment: a table of
    per-segment log-variances (iVAE's lambda(u) for a one-hot u is a linear map, i.e. a table)
    and means fixed at 0 (``learn_means=False``, centered sources) or learned (uncentered). The
    encoder is an MLP on [x, one_hot(u)]; decoder and likelihood are those of :class:`VAE` (the
    same family as Half-VAE's)."""

    def __init__(self, data_dim: int, latent_dim: int, num_segments: int, *,
                 encoder_hidden=(64, 64), activation="leaky_relu", learn_means=False,
                 init_logvar: float = -2.0, **kwargs):
        prior = GMMPrior(latent_dim, 1, num_groups=num_segments)
        super().__init__(data_dim, latent_dim, encoder_hidden=encoder_hidden, prior=prior,
                         activation=activation, init_logvar=init_logvar, **kwargs)
        self.num_segments = int(num_segments)
        self.learn_means = bool(learn_means)
        # The encoder reads x and the one-hot segment.
        self.encoder = make_mlp(data_dim + num_segments, 2 * latent_dim, encoder_hidden,
                                activation)
        with torch.no_grad():
            self.encoder[-1].bias[latent_dim:].fill_(float(init_logvar))

    def encode(self, x: torch.Tensor, u: torch.Tensor):
        onehot = torch.nn.functional.one_hot(u, self.num_segments).to(x.dtype)
        h = self.encoder(torch.cat([x, onehot], dim=1))
        return h[:, :self.latent_dim], h[:, self.latent_dim:]

    def elbo_terms(self, x, generator=None, eps=None, recon="auto", u=None):
        from .models import elbo_terms
        if u is None:
            raise ValueError("u is required: the iVAE encoder and prior condition on the segment")
        mu, logvar = self.encode(x, u)
        return elbo_terms(self, x, mu.contiguous(), logvar.contiguous(), generator=generator,
                          eps=eps, recon=recon, u=u, kl=self.kl)


@dataclass(frozen=True)
class IVAERecipe(VAERecipe):
    """:class:`VAERecipe` for :class:`IVAE`: the same schedule, restarts by final ELBO and
    initialization; the prior's means stay at 0 unless ``learn_means`` (they are left out of the
    optimizer, so the prior warm-up's unfreezing cannot move them)."""
    learn_means: bool = False

    def build_model(self, n_rows, data_dim, device) -> IVAE:
        return IVAE(data_dim, self.n_components, self.n_groups,
                    encoder_hidden=self.encoder_hidden, activation=self.activation,
                    learn_means=self.learn_means, init_logvar=2 * math.log(INIT_NOISE_STD),
                    decoder=self.decoder, hidden=self.hidden, noise=self.noise,
                    init_noise_std=INIT_NOISE_STD, kl=self.kl).to(device)

    def make_optimizers(self, model: IVAE) -> list:
        prior = [model.prior.logvars] + ([model.prior.means] if self.learn_means else [])
        return [torch.optim.Adam([
            dict(params=model.encoder.parameters(), lr=self.encoder_learning_rate),
            dict(params=list(model.decoder.parameters()) + list(model.likelihood.parameters())
                 + prior, lr=self.learning_rate)])]


def fit_ivae(X, u, n_components, *, decoder="mlp", hidden=(32,), activation="leaky_relu",
             encoder_hidden=(64, 64), learn_means=False, max_iter=1500, n_restarts=4,
             batch_size=None, learning_rate=0.01, encoder_learning_rate=0.01, prior_warmup=0.0,
             lr_decay=0.3, kl="mc", random_state=0):
    """The iVAE baseline on X [n, d] with segments u [n] (integers), trained with Half-VAE's
    recipe as :func:`fit_vae` is (PCA whitening to all dimensions, restarts chosen by final
    ELBO, the learning-rate tail; no prior warm-up by default: a one-component prior has no
    positions to protect). Returns (sources [n, K] = the encoder means, info dict with the
    kept ``model``)."""
    X = check_data(X)
    segments, codes = np.unique(np.asarray(u), return_inverse=True)
    whitening, Xw_np = fit_whitening(X, n_components, "pca", keep_all_dims=decoder != "linear")
    Xw = torch.as_tensor(Xw_np, dtype=torch.float32)
    ut = torch.as_tensor(codes.reshape(-1), dtype=torch.int64)
    recipe = IVAERecipe(n_components=whitening.n_components, n_mixture=1, decoder=decoder,
                        hidden=hidden, activation=activation, max_iter=max_iter,
                        batch_size=batch_size, learning_rate=learning_rate,
                        prior_warmup=prior_warmup, lr_decay=lr_decay, kl=kl,
                        n_groups=len(segments), encoder_hidden=encoder_hidden,
                        encoder_learning_rate=encoder_learning_rate, learn_means=learn_means)
    device = torch.device("cpu")
    run = RunState({}, "", restart_seeds(random_state, n_restarts))
    run_restarts(run, recipe, Xw, device, u=ut)
    best = run.best
    model = recipe.build_model(Xw.shape[0], Xw.shape[1], device)
    model.load_state_dict(best.snapshot.model)
    with torch.no_grad():
        S = model.encode(Xw, ut)[0].double().numpy().copy()
    return S, {"elbo": best.elbo, "best_restart": best.restart,
               "restart_elbos": [f.elbo for f in run.finished], "model": model}


# ----------------------------------------------------------------------------- nonstationary
NONSTATIONARY_METHODS = ("halfvae_u", "halfvae", "ivae", "fastica")


def run_nonstationary_method(method, P, seed, *, uncentered=False, max_iter=1500, n_restarts=4, decoder="mlp",
                             hidden=(32,), n_mixture=3, kl="mc", batch_size=None,
                             ivae_batch_size=None, halfvae_params=None, ivae_params=None):
    """Recovered sources [n, K] of one method on a nonstationary problem P (X, S, u).
    halfvae_params: more HalfVAEICA parameters (a dict) for the Half-VAE methods; ivae_params:
    :func:`fit_ivae` arguments that replace the shared ones for iVAE (e.g. its own max_iter,
    which counts epochs, and a mini-batch epoch is many steps)."""
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
    if method == "fastica":
        from sklearn.decomposition import FastICA
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return FastICA(K, whiten="unit-variance", random_state=seed,
                           max_iter=1000).fit_transform(P.X)
    raise ValueError(f"unknown method {method!r}; choose from {NONSTATIONARY_METHODS}")


def run_nonstationary(seeds=(0, 1, 2), methods=NONSTATIONARY_METHODS, *, n_per_segment=1000,
                      n_segments=40, n_sources=5, n_layers=2, activation="lrelu",
                      uncentered=False, progress=None, **settings):
    """Every method on ``make_nonstationary(..., random_state=seed)`` for every seed (the data
    seed is also the method's random_state); ``settings`` go to
    :func:`run_nonstationary_method`. Returns {method: {"mcc": [...], "seconds": [...]}} plus
    "config"."""
    out = {"config": dict(seeds=[int(s) for s in seeds], n_per_segment=n_per_segment,
                          n_segments=n_segments, n_sources=n_sources, n_layers=n_layers,
                          activation=activation, uncentered=uncentered, **settings)}
    for seed in seeds:
        P = make_nonstationary(n_per_segment, n_segments, n_sources, n_layers=n_layers,
                               activation=activation, uncentered=uncentered, random_state=seed)
        for method in methods:
            t0 = time.perf_counter()
            with torch_threads(1):
                S = run_nonstationary_method(method, P, seed, uncentered=uncentered, **settings)
            r = out.setdefault(method, {"mcc": [], "seconds": []})
            r["mcc"].append(float(mean_corr_coef(P.S, S)))
            r["seconds"].append(time.perf_counter() - t0)
            if progress is not None:
                progress(f"seed {seed:3d} {method:10s} mcc {r['mcc'][-1]:.4f} "
                         f"{r['seconds'][-1]:6.1f}s")
    return out


# ----------------------------------------------------------------------------- one run
def _method_settings(quick: bool):
    return dict(max_iter=600 if quick else 1500, n_restarts=2 if quick else 4)


def run_method(method: str, problem: str, X, seed: int, quick: bool = False):
    """Recovered sources [n, 3] of one method on one problem's X."""
    s = _method_settings(quick)
    decoder = "linear" if problem == "linear" else "residual"
    if method == "halfvae":
        est = HalfVAEICA(_N_SOURCES, decoder=decoder, random_state=seed, **s)
    elif method == "halfvae_random":
        est = HalfVAEICA(_N_SOURCES, decoder=decoder, init="random", random_state=seed, **s)
    elif method == "halfvae_fastica":
        est = HalfVAEICA(_N_SOURCES, decoder=decoder, init="fastica", random_state=seed, **s)
    elif method == "halfvae_plain":
        est = HalfVAEICA(_N_SOURCES, decoder=decoder, init="random", prior_warmup=0.0,
                         n_restarts=1, max_iter=s["max_iter"], random_state=seed)
    else:
        est = None
    if est is not None:
        # The trained posterior means of the rows (not transform, the per-row linear projection
        # or posterior mode): what the README's tables were computed from.
        with warnings.catch_warnings():
            if quick:  # the quick settings are short; the full ones are expected to converge
                warnings.simplefilter("ignore", ConvergenceWarning)
            return est.fit(X).posterior_means_
    if method == "vae":
        return fit_vae(X, _N_SOURCES, decoder=decoder, random_state=seed, **s)[0]
    if method == "fastica":
        from sklearn.decomposition import FastICA
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings on the nonlinear problem
            return FastICA(_N_SOURCES, whiten="unit-variance", random_state=seed,
                           max_iter=1000).fit_transform(X)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _run_task(task):
    """One (problem, seed, method) fit; module-level so that worker processes can run it."""
    problem, seed, method, n_samples, quick, keep = task
    with torch_threads(1):
        P = make_problem(problem, n_samples, seed)
        t0 = time.perf_counter()
        S = run_method(method, problem, P.X, seed, quick)
        dt = time.perf_counter() - t0
    out = {"rmse": [float(v) for v in per_component_rmse(P.S, S)],
           "mcc": float(mean_corr_coef(P.S, S)), "seconds": dt}
    if keep:
        out["true"] = P.S
        out["aligned"] = align_sources(P.S, S)
    return out


def run_experiments(seeds=(0, 1, 2), problems=PROBLEMS, methods=METHODS, n_samples=5000,
                    quick=False, keep_sources_of_seed=None, progress=None, n_jobs=1,
                    skip=()):
    """Run every method on every problem for every seed (the data seed is also the method's
    random_state). Returns ``{"config": ..., "results": {problem: {method: {"rmse": [[3 per
    seed]], "mcc": [...], "seconds": [...]}}}, "summary": ...}``; with ``keep_sources_of_seed``,
    also ``"sources"`` (true and recovered, aligned) of that seed for plotting.

    n_jobs > 1 runs the fits in that many worker processes (each fit uses one thread; the
    results do not depend on n_jobs). ``skip``: (problem, method) pairs not to run.
    """
    seeds = [int(s) for s in seeds]
    tasks = [(p, seed, m, n_samples, bool(quick), seed == keep_sources_of_seed)
             for p in problems for seed in seeds for m in methods if (p, m) not in set(skip)]
    done = {}

    def record(task, r):
        done[task[:3]] = r
        if progress is not None:
            problem, seed, method = task[:3]
            progress(f"{problem:9s} seed {seed:3d} {method:15s} rmse "
                     + " ".join(f"{v:.4f}" for v in r["rmse"])
                     + f"  mcc {r['mcc']:.4f}  {r['seconds']:5.1f}s")

    if n_jobs is None or n_jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            record(task, _run_task(task))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        # spawn, not fork: forking after OpenMP has started can hang the children.
        with cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")) as ex:
            futures = {ex.submit(_run_task, t): t for t in tasks}
            for fut in cf.as_completed(futures):
                record(futures[fut], fut.result())
    results = {}
    kept = {}
    for problem in problems:
        results[problem] = {}
        for method in methods:
            if (problem, method) in set(skip):
                continue
            r = results[problem][method] = {"rmse": [], "mcc": [], "seconds": []}
            for seed in seeds:
                d = done[(problem, seed, method)]
                r["rmse"].append(d["rmse"])
                r["mcc"].append(d["mcc"])
                r["seconds"].append(d["seconds"])
                if "aligned" in d:
                    kept.setdefault(problem, {"true": d["true"]})[method] = d["aligned"]
    out = {"config": {"seeds": seeds, "problems": list(problems), "methods": list(methods),
                      "skipped": [list(x) for x in skip], "n_samples": n_samples,
                      "quick": bool(quick), "method_settings": _method_settings(quick),
                      "n_jobs": int(n_jobs or 1), "torch": torch.__version__},
           "results": results, "summary": summarize(results)}
    if kept:
        out["sources"] = kept
    return out


def summarize(results):
    """Mean, std, median (over seeds) of each component's RMSE and of MCC."""
    summary = {}
    for problem, by_method in results.items():
        summary[problem] = {}
        for method, r in by_method.items():
            rmse = np.asarray(r["rmse"], dtype=np.float64).reshape(-1, _N_SOURCES)
            mcc = np.asarray(r["mcc"], dtype=np.float64)
            summary[problem][method] = {
                "rmse_mean": rmse.mean(0).tolist(), "rmse_std": rmse.std(0).tolist(),
                "rmse_median": np.median(rmse, 0).tolist(),
                "mcc_mean": float(mcc.mean()), "mcc_std": float(mcc.std()),
                "mcc_median": float(np.median(mcc)),
                "seconds_mean": float(np.mean(r["seconds"])), "n_seeds": int(len(mcc))}
    return summary


def format_table(out) -> str:
    """A text table of per-component RMSE (mean +- std, [median]) and MCC per problem/method."""
    lines = []
    n = len(out["config"]["seeds"])
    for problem, by_method in out["summary"].items():
        lines.append(f"{problem} mixing, {n} seed(s), {out['config']['n_samples']} samples "
                     "(per-component RMSE: mean +- std [median]; lower is better)")
        header = f"  {'method':15s}" + "".join(f"{name:>24s}" for name in SOURCE_NAMES) \
            + f"{'MCC':>22s}{'time':>8s}"
        lines.append(header)
        for method, s in by_method.items():
            cells = "".join(f"{m:8.4f} +-{sd:7.4f} [{md:.3f}]"
                            for m, sd, md in zip(s["rmse_mean"], s["rmse_std"], s["rmse_median"]))
            lines.append(f"  {method:15s}{cells}  {s['mcc_mean']:.4f} +-{s['mcc_std']:.4f}"
                         f"{s['seconds_mean']:7.1f}s")
        lines.append("")
    return "\n".join(lines)


def plot_sources(sources, path, window=None):
    """PNG of true vs recovered sources (the first ``window`` samples; None: all): one column per
    problem, one row per method (the true sources in every panel, dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(sources)
    methods = []
    for p in problems:
        methods += [m for m in sources[p] if m != "true" and m not in methods]
    fig, axes = plt.subplots(len(methods), len(problems), figsize=(6.5 * len(problems),
                                                                  1.9 * len(methods)),
                             squeeze=False, sharex=True)
    colors = ("tab:blue", "tab:orange", "tab:green")
    for j, problem in enumerate(problems):
        true = sources[problem]["true"][:window]
        t = np.arange(true.shape[0])
        for i, method in enumerate(methods):
            ax = axes[i, j]
            if method not in sources[problem]:
                ax.set_axis_off()
                continue
            est = sources[problem][method][:window]
            est = (est - est.mean(0)) / np.maximum(est.std(0), 1e-12)
            for k in range(true.shape[1]):
                off = 3.2 * (true.shape[1] - 1 - k)
                ax.plot(t, true[:, k] + off, color="0.55", lw=1.6, ls="--")
                ax.plot(t, est[:, k] + off, color=colors[k % 3], lw=0.7)
            ax.set_yticks([])
            ax.set_title(f"{problem}: {method}", fontsize=9)
    fig.suptitle("true sources (grey, dashed) vs recovered (color)", fontsize=10)
    fig.tight_layout()

    def write(f):
        fig.savefig(f, format="png", dpi=90)

    try:
        atomic_write(path, write, mode="wb")
    finally:
        plt.close(fig)


def _jsonable(out):
    res = {k: v for k, v in out.items() if k != "sources"}
    return res


# The init ablations (random, plain) are about the linear problem; on the nonlinear one they
# would double the demo's time.
DEMO_SKIP = (("nonlinear", "halfvae_random"), ("nonlinear", "halfvae_plain"))


def run_demo(out_dir="halfvae_demo", seeds=3, quick=False, n_samples=5000, methods=METHODS,
             problems=PROBLEMS, n_jobs=None, skip=DEMO_SKIP, first_seed=0, stream=None):
    """The CLI's ``demo``: run, print the table, write results.json and sources.png."""
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
                          n_jobs=n_jobs, skip=skip)
    out["config"]["total_seconds"] = time.perf_counter() - t0
    print("", file=stream)
    print(format_table(out), file=stream)
    json_path = os.path.join(out_dir, "results.json")
    png_path = os.path.join(out_dir, "sources.png")
    write_json(_jsonable(out), json_path)
    plot_sources(out["sources"], png_path)
    print(f"wrote {json_path} and {png_path} ({out['config']['total_seconds']:.0f}s)",
          file=stream)
    return out
