"""The baselines Half-VAE is measured against, trained on the same data and seeds:

- :func:`fit_vae`: a VAE with an MLP encoder (:class:`VAERecipe`: the estimator's recipe with an
  encoder in place of the latent table);
- :func:`fit_ivae`: iVAE (Khemakhem et al. 2020), :class:`IVAE` with :class:`IVAERecipe`;
- :func:`fit_tcl`: time-contrastive learning (Hyvarinen & Morioka 2016);
- :func:`fit_linear_peer`: the classical linear ICA algorithms (FastICA, Picard, AMICA).

Each returns the recovered sources [n, K] (and, for the trained ones, an info dict).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..models import VAE, GMMPrior, ResidualDecoder, elbo_terms, make_mlp, random_orthogonal
from .preprocessing import check_data, fit_whitening
from .recipe import INIT_NOISE_STD, Recipe, lr_factor, reset_parameters, restart_seeds
from .restarts import RunState, run_restarts

__all__ = ["VAERecipe", "fit_vae", "IVAE", "IVAERecipe", "fit_ivae", "fit_tcl",
           "fit_linear_peer", "LINEAR_PEERS"]

LINEAR_PEERS = ("fastica", "picard", "amica")


@dataclass(frozen=True)
class VAERecipe(Recipe):
    """:class:`~halfvae_ext.ica.recipe.Recipe` with an encoder in place of the latent table: the same
    schedule, prior warm-up, epoch, final ELBO and restarts (:func:`run_restarts`); its own
    model, initialization, optimizer (one Adam, the encoder's group at its own rate) and
    full-batch ELBO terms."""
    encoder_hidden: tuple = (64, 64)
    encoder_learning_rate: float = 0.01

    def build_model(self, n_rows, data_dim, device) -> VAE:
        K = self.n_components
        return VAE(data_dim, K, encoder_hidden=self.encoder_hidden, decoder=self.decoder,
                   prior=GMMPrior(K, self.n_mixture), hidden=self.hidden,
                   activation=self.activation, noise=self.initial_noise,
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

    def initialize_prior(self, model: VAE, u) -> None:
        """The prior keeps its default start (an encoder has no latent means before training)."""

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
                    decoder=self.decoder, hidden=self.hidden, noise=self.initial_noise,
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
             lr_decay=0.3, kl="mc", noise="learned", random_state=0):
    """The iVAE baseline on X [n, d] with segments u [n] (integers), trained with Half-VAE's
    recipe as :func:`fit_vae` is (PCA whitening to all dimensions, restarts chosen by final
    ELBO, the learning-rate tail; no prior warm-up by default: a one-component prior has no
    positions to protect; ``noise`` as HalfVAEICA's). Returns (sources [n, K] = the encoder means, info dict with the
    kept ``model``)."""
    X = check_data(X)
    segments, codes = np.unique(np.asarray(u), return_inverse=True)
    whitening, Xw_np = fit_whitening(X, n_components, "pca", keep_all_dims=decoder != "linear")
    Xw = torch.as_tensor(Xw_np, dtype=torch.float32)
    ut = torch.as_tensor(codes.reshape(-1), dtype=torch.int64)
    recipe = IVAERecipe(n_components=whitening.n_components, n_mixture=1, decoder=decoder,
                        hidden=hidden, activation=activation, max_iter=max_iter,
                        batch_size=batch_size, learning_rate=learning_rate,
                        prior_warmup=prior_warmup, lr_decay=lr_decay, kl=kl, noise=noise,
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


def fit_tcl(X, u, n_components, *, hidden=(32, 32), activation="leaky_relu", max_iter=30,
            batch_size=1000, learning_rate=0.003, weight_decay=1e-4, random_state=0):
    """Time-contrastive learning (Hyvarinen & Morioka 2016) on X [n, d] with segments u [n]:
    an MLP feature extractor h (``hidden`` widths, ``activation``; n_components outputs) and a
    multinomial logistic regression that tells the segment from |h(x)|, trained together by Adam
    on the cross-entropy (``max_iter`` epochs of mini-batches, a half-cosine rate decay over the
    last 30%); X is PCA-whitened (all dimensions) first, as for Half-VAE and iVAE.

    TCL identifies the sources through their log-densities per segment: for sources whose scale
    changes with the segment, |h(x)| is a linear map of |s|, which FastICA undoes. So TCL
    recovers the sources' absolute values, not their signs: the first return value is FastICA of
    |h(x)| [n, K], to be compared with |S| (as the authors' evaluation does). Returns (that, info
    dict with the final training ``accuracy`` and the ``features`` h(x))."""
    X = check_data(X)
    segments, codes = np.unique(np.asarray(u), return_inverse=True)
    _, Xw_np = fit_whitening(X, n_components, "pca", keep_all_dims=True)
    Xw = torch.as_tensor(Xw_np, dtype=torch.float32)
    ut = torch.as_tensor(codes.reshape(-1), dtype=torch.int64)
    seed = restart_seeds(random_state, 1)[0]
    g = torch.Generator().manual_seed(seed)
    features = make_mlp(Xw.shape[1], n_components, hidden, activation)
    classifier = torch.nn.Linear(n_components, len(segments))
    reset_parameters(features, g)
    reset_parameters(classifier, g)
    params = list(features.parameters()) + list(classifier.parameters())
    opt = torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    for epoch in range(max_iter):
        for group in opt.param_groups:
            group["lr"] = learning_rate * lr_factor(epoch, max_iter, 0.3)
        for idx in torch.split(torch.randperm(Xw.shape[0], generator=g), batch_size):
            logits = classifier(features(Xw[idx]).abs())
            loss = torch.nn.functional.cross_entropy(logits, ut[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        H = features(Xw)
        accuracy = float((classifier(H.abs()).argmax(1) == ut).double().mean())
    H = H.double().numpy()
    S_abs = fit_linear_peer("fastica", np.abs(H), n_components, seed % (2**32))
    return S_abs, {"accuracy": accuracy, "features": H}


def fit_linear_peer(method: str, X, n_components: int, seed: int):
    """Sources [n, K] of a classical linear ICA algorithm: scikit-learn's FastICA
    (``whiten="unit-variance"``), Picard (``python-picard``'s scikit-learn estimator:
    orthogonal, extended, so sub- and super-Gaussian sources) or AMICA (``jamica``: one model,
    3 generalized-Gaussian mixture components per source, its own PCA whitening)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on the nonlinear problems
        if method == "fastica":
            from sklearn.decomposition import FastICA
            return FastICA(n_components, whiten="unit-variance", random_state=seed,
                           max_iter=1000).fit_transform(X)
        if method == "picard":
            from picard import Picard
            return Picard(n_components, random_state=seed, max_iter=1000).fit_transform(X)
        if method == "amica":
            import jamica
            X = np.asarray(X, dtype=np.float64)
            return jamica.amica(X.T, n_components=n_components, whiten=True,
                                random_state=seed)[2].T
    raise ValueError(f"unknown linear ICA method {method!r}")
