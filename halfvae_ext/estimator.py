"""HalfVAEICA: independent component analysis with an encoder-free VAE, scikit-learn style.

The model (arXiv 2409.04140): every sample n owns a Gaussian posterior q(z_n) = N(mu_n, sigma_n^2)
(a trainable table, no encoder), each latent dimension has a trainable 1-D Gaussian-mixture prior,
and a decoder maps z to x with Gaussian observation noise. Training maximizes the ELBO; the recovered
sources are the trained posterior means mu_n.

The training recipe (see benchmarks/ICA_EXPERIMENTS.md for what it came from):

- X is centered and PCA-whitened to ``n_components`` dimensions (``whiten="pca"``; PCA is not ICA:
  it only fixes scale and correlation, the rotation is left to the model).
- ``init="pca"``: the latent means start at the whitened data (restart 0) or at a random rotation of
  it (restarts 1, 2, ...), with the decoder set so that decode(mu) reproduces the data exactly.
- The observation noise starts small (std 0.1 of the whitened data) and is learned; the posterior
  variances start at the same value. Starting at a noise std of 1 lets the noise explain everything
  (posterior collapse).
- For the linear decoder the expected log-likelihood E_q log p(x | z) is computed in closed form;
  only the KL term is Monte-Carlo (one draw, in the fused kernel).
- ``prior_warmup``: for that fraction of the iterations the GMM components keep their initial
  positions (means [-1, 0, 1]) and equal weights; only their variances learn. With a fully flexible
  prior from the start, the marginal of two mixed sub-Gaussian sources (sine + sawtooth) is fit so
  well by a 3-component mixture that the mix is a local optimum; a fixed flat-topped prior has no
  such optimum, and free variances still let a dimension become super-Gaussian (Laplace) at once.
- Adam with a larger learning rate for the latent table (``table_learning_rate``) than for the
  decoder, noise and prior (``learning_rate``); both decay along a half cosine over the last
  ``lr_decay`` fraction of the epochs, which settles the table rows.
- ``n_restarts`` restarts; the one with the highest final ELBO (averaged over ``n_eval_samples``
  draws) is kept. The ground truth is never looked at.
- Nonlinear mixtures: ``decoder="residual"`` (x = W z + mlp(z), the MLP's output layer started at
  zero) starts from the linear model and learns a correction; ``init="fastica"`` (opt-in) starts
  from FastICA's sources, which did best on the nonlinear benchmark.

Typical use::

    S = HalfVAEICA(n_components=3, random_state=0).fit_transform(X)   # [n_samples, 3]
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from .atomic_io import atomic_torch_save, atomic_write
from .models import ACTIVATIONS, DECODERS, GMMPrior, HalfVAE, ResidualDecoder, elbo_terms

__all__ = ["HalfVAEICA", "atomic_write", "atomic_torch_save"]

_FORMAT = "halfvae_ext.HalfVAEICA"
_FORMAT_VERSION = 1
# Noise std of the likelihood (and posterior std of the table) at the start, in whitened units.
_INIT_NOISE_STD = 0.1
# Parameters added after files were first written, with the behaviour those files had.
_ADDED_PARAM_DEFAULTS = {"table_optimizer": "torch"}
# Parameters that do not change the training computation: they may differ on resume.
_NON_TRAINING_PARAMS = ("verbose", "checkpoint_path", "checkpoint_every", "device",
                        "transform_max_iter", "n_threads")
# Below this many latent entries (n_samples * n_components) one CPU thread is faster: the steps are
# too small to split, and on a busy machine a waiting OpenMP team costs several times the work.
_SMALL_PROBLEM = 1 << 17


def _fingerprint(X: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(X.shape).encode())
    h.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    return h.hexdigest()


def _random_orthogonal(k: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def _reset_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """nn.Linear's default initialization, drawn from ``generator`` (not the global RNG)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                bound = 1.0 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


@contextlib.contextmanager
def _torch_threads(n):
    """Run the block with torch's intra-op thread count set to n (None: unchanged)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def lr_factor(epoch: int, max_iter: int, lr_decay: float) -> float:
    """Learning-rate multiplier: 1, then a half cosine down to 0.01 over the last ``lr_decay``
    fraction of the ``max_iter`` epochs."""
    start = (1.0 - lr_decay) * max_iter
    if lr_decay == 0 or epoch < start:
        return 1.0
    frac = (epoch - start) / (max_iter - start)
    return max(0.5 * (1.0 + math.cos(math.pi * frac)), 0.01)


def _to_state(obj):
    """Deep copy of a state dict / nested structure (tensors cloned), detached from live objects."""
    return copy.deepcopy(obj)


# ----------------------------------------------------------------------------- estimator
class HalfVAEICA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Independent component analysis with an encoder-free VAE (Half-VAE).

    Parameters
    ----------
    n_components : int or None
        Number of sources K (None: the number of features). At most the rank of X.
    n_mixture : int
        Components C of each latent dimension's Gaussian-mixture prior.
    decoder : {"linear", "mlp", "residual"}
        x = W z (linear ICA); an MLP; or "residual", x = W z + mlp(z) with the MLP's output layer
        started at zero, so that training starts from the linear model (initialized like it) and
        learns a nonlinear correction. For nonlinear mixtures "residual" did best
        (benchmarks/ICA_EXPERIMENTS.md).
    hidden, activation : MLP widths and activation (decoders "mlp" and "residual"). The defaults,
        one hidden layer of 32 leaky-ReLU units, did best on the nonlinear benchmark (wider and
        deeper decoders fit the data as well without separating the sources).
    noise : "learned" or float
        Observation noise: a learned per-feature variance, or a fixed std (in whitened units).
    whiten : {"pca", "standardize", False}
        "pca": center and PCA-whiten (to K dimensions for the linear decoder, to all nondegenerate
        dimensions for the MLP); "standardize": center and scale each feature; False: center only.
    init : {"pca", "random", "fastica"}
        Latent means at the start: the whitened PCA scores (randomly rotated for restarts >= 1),
        random normals, or scikit-learn's FastICA sources (an opt-in warm start; the default never
        runs another ICA algorithm).
    max_iter : int
        Training epochs per restart (full passes over the data; one step each when full-batch).
    batch_size : int or None
        None: full batch. Else mini-batches (the table then uses sparse gradients and SparseAdam,
        so rows outside a batch are not moved by stale momentum).
    table_optimizer : {"torch", "fused"}
        How the latent table is optimized. "torch": torch.optim.Adam (full batch) or SparseAdam
        (mini-batches) on the table's gradients. "fused": the row-wise Adam of
        :class:`~halfvae_ext.LatentTable` (``fused_optimizer="adam"``), which steps the touched rows
        inside the backward: no gradient of the table is ever created and a mini-batch step costs
        O(batch_size) whatever n_samples. It follows SparseAdam's formula (lazy moments, eps
        added to sqrt(v)); its state is saved with the model.
    learning_rate : float
        Adam learning rate of the decoder, noise and prior.
    table_learning_rate : float
        Adam learning rate of the latent table (mu, logvar).
    prior_warmup : float in [0, 1)
        Fraction of each restart's epochs during which the prior's component means and weights
        stay at their initialization (the variances learn).
    lr_decay : float in [0, 1]
        Fraction of each restart's epochs, at the end, over which the learning rates decay to 1%
        along a half cosine (constant before). It settles the latent table, whose rows otherwise
        keep jittering with the Monte-Carlo gradients.
    n_restarts : int
        Independent restarts; the one with the best final ELBO is kept.
    n_eval_samples : int
        Monte-Carlo draws of the final ELBO used to compare restarts.
    transform_max_iter : int
        Adam steps used by :meth:`transform` to fit the latent rows of new data.
    checkpoint_path : path or None
        Where to write checkpoints (atomically); ``fit(X, resume=True)`` resumes from it.
    checkpoint_every : int or None
        Write a checkpoint every that many epochs (and when a restart ends or a fit stops).
    random_state : int or None
        Seed of everything random (initializations, Monte-Carlo draws, mini-batch order).
    device : str or torch.device
    n_threads : int or None
        CPU threads for torch while fitting and transforming (restored afterwards). None: one
        thread for small problems (n_samples * n_components < 131072), where it is fastest,
        else torch's current setting. Results do not depend on it.
    verbose : bool
        Show a tqdm progress bar.

    Attributes
    ----------
    n_components_ : int
    n_features_in_ : int
    mean_ : ndarray [n_features]
    whitening_ : ndarray [d, n_features]
        Preprocessing map: X_white = (X - mean_) @ whitening_.T.
    dewhitening_ : ndarray [n_features, d]
    mixing_ : ndarray [n_features, n_components]  (linear decoder only)
        X ~= S @ mixing_.T + mean_.
    components_ : ndarray [n_components, n_features]  (linear decoder only)
        The pseudo-inverse of ``mixing_``: S ~= (X - mean_) @ components_.T.
    elbo_ : float
        Final ELBO per sample of the kept restart (nats, in the whitened space).
    elbo_history_ : ndarray [n_iter_]
        ELBO per sample at every epoch of the kept restart (of the epoch's one-draw estimates).
    n_iter_ : int
    best_restart_ : int
    restart_elbos_ : ndarray [n_restarts]
    model_ : HalfVAE
        The trained model of the kept restart (on ``device``).
    """

    def __init__(self, n_components=None, *, n_mixture=3, decoder="linear", hidden=(32,),
                 activation="leaky_relu", noise="learned", whiten="pca", init="pca", max_iter=1500,
                 batch_size=None, table_optimizer="torch", learning_rate=0.01,
                 table_learning_rate=0.05,
                 prior_warmup=0.3, lr_decay=0.3, n_restarts=4, n_eval_samples=8, transform_max_iter=300,
                 checkpoint_path=None, checkpoint_every=None, random_state=None, device="cpu",
                 n_threads=None, verbose=False):
        self.n_components = n_components
        self.n_mixture = n_mixture
        self.decoder = decoder
        self.hidden = hidden
        self.activation = activation
        self.noise = noise
        self.whiten = whiten
        self.init = init
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.table_optimizer = table_optimizer
        self.learning_rate = learning_rate
        self.table_learning_rate = table_learning_rate
        self.prior_warmup = prior_warmup
        self.lr_decay = lr_decay
        self.n_restarts = n_restarts
        self.n_eval_samples = n_eval_samples
        self.transform_max_iter = transform_max_iter
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.random_state = random_state
        self.device = device
        self.n_threads = n_threads
        self.verbose = verbose

    # ------------------------------------------------------------------ validation
    def _validate_hyperparameters(self):
        def pos_int(name, minimum=1, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, Integral):
                raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
            if v < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {v}")

        def pos_real(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Real):
                raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v}")

        pos_int("n_components", allow_none=True)
        pos_int("n_mixture")
        if self.n_mixture > 64:
            raise ValueError(f"n_mixture must be at most 64, got {self.n_mixture}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, "
                             f"got {self.decoder!r}")
        hidden = (self.hidden,) if isinstance(self.hidden, Integral) else self.hidden
        try:
            hidden = tuple(hidden)
        except TypeError:
            raise TypeError(f"hidden must be a sequence of layer widths, got {self.hidden!r}") \
                from None
        if any(isinstance(h, bool) or not isinstance(h, Integral) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be positive integers, got {self.hidden!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        if isinstance(self.noise, str):
            if self.noise != "learned":
                raise ValueError(f"noise must be 'learned' or a positive float, got {self.noise!r}")
        else:
            pos_real("noise")
        if self.whiten not in ("pca", "standardize", False):
            raise ValueError(f"whiten must be 'pca', 'standardize' or False, got {self.whiten!r}")
        if self.init not in ("pca", "random", "fastica"):
            raise ValueError(f"init must be 'pca', 'random' or 'fastica', got {self.init!r}")
        pos_int("max_iter")
        pos_int("batch_size", allow_none=True)
        if self.table_optimizer not in ("torch", "fused"):
            raise ValueError(f"table_optimizer must be 'torch' or 'fused', got "
                             f"{self.table_optimizer!r}")
        pos_real("learning_rate")
        pos_real("table_learning_rate")
        if isinstance(self.prior_warmup, bool) or not isinstance(self.prior_warmup, Real) \
                or not 0 <= self.prior_warmup < 1:
            raise ValueError(f"prior_warmup must be a number in [0, 1), got {self.prior_warmup!r}")
        if isinstance(self.lr_decay, bool) or not isinstance(self.lr_decay, Real) \
                or not 0 <= self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be a number in [0, 1], got {self.lr_decay!r}")
        pos_int("n_restarts")
        pos_int("n_eval_samples")
        pos_int("transform_max_iter", minimum=0)
        pos_int("checkpoint_every", allow_none=True)
        pos_int("n_threads", allow_none=True)
        if self.checkpoint_every is not None and self.checkpoint_path is None:
            raise ValueError("checkpoint_every needs a checkpoint_path")
        if self.checkpoint_path is not None and not isinstance(self.checkpoint_path,
                                                               (str, os.PathLike)):
            raise TypeError(f"checkpoint_path must be a path, got {self.checkpoint_path!r}")
        rs = self.random_state
        if rs is not None and (isinstance(rs, bool) or not isinstance(rs, Integral) or rs < 0):
            raise ValueError(f"random_state must be None or a non-negative integer, got {rs!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device, got {self.device!r}") from None
        return device

    def _check_X(self, X, reset: bool) -> np.ndarray:
        if X is None or isinstance(X, (str, bytes)) or np.isscalar(X):
            raise TypeError(f"X must be a 2-D array-like of numbers, got {type(X).__name__}")
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        try:
            X = validate_data(self, X, reset=reset, dtype=np.float64,
                              ensure_min_samples=2 if reset else 1, ensure_all_finite=True)
        except ValueError as e:
            raise ValueError(f"X: {e}") from None
        except TypeError as e:
            raise TypeError(f"X: {e}") from None
        return X

    def _training_params(self) -> dict:
        p = self.get_params(deep=False)
        for name in _NON_TRAINING_PARAMS:
            p.pop(name)
        p["hidden"] = list(p["hidden"]) if not isinstance(p["hidden"], Integral) else p["hidden"]
        return p

    # ------------------------------------------------------------------ preprocessing
    def _fit_preprocessing(self, X: np.ndarray) -> np.ndarray:
        n, d = X.shape
        self.mean_ = X.mean(axis=0)
        Xc = X - self.mean_
        K = self.n_components if self.n_components is not None else d
        if K > d:
            raise ValueError(f"n_components={K} is larger than the number of features ({d}); "
                             "this estimator needs at least as many observed signals as sources")
        _, s, vt = np.linalg.svd(Xc, full_matrices=False)
        tol = max(n, d) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
        rank = int((s > max(tol, 1e-10 * s[0] if s.size and s[0] > 0 else 1e-300)).sum())
        if rank < K:
            raise ValueError(f"n_components={K} exceeds the rank of the centered X ({rank}): "
                             "there are not that many independent directions in the data "
                             f"({n} samples, {d} features)")
        self.n_components_ = K
        if self.whiten == "pca":
            keep = K if self.decoder == "linear" else rank
            self.whitening_ = vt[:keep] / s[:keep, None] * math.sqrt(n)
            self.dewhitening_ = vt[:keep].T * s[:keep] / math.sqrt(n)
        elif self.whiten == "standardize":
            std = Xc.std(axis=0)
            std = np.where(std > 0, std, 1.0)
            self.whitening_ = np.diag(1.0 / std)
            self.dewhitening_ = np.diag(std)
        else:
            self.whitening_ = np.eye(d)
            self.dewhitening_ = np.eye(d)
        return Xc @ self.whitening_.T

    def _preprocess(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) @ self.whitening_.T

    # ------------------------------------------------------------------ model construction
    def _seeds(self) -> list:
        if self.random_state is None:
            entropy = None
        else:
            entropy = int(self.random_state)
        ss = np.random.SeedSequence(entropy)
        return [int(c.generate_state(1, np.uint64)[0] >> np.uint64(1)) for c in
                ss.spawn(self.n_restarts)]

    def _build_model(self, n_rows: int, data_dim: int, device) -> HalfVAE:
        prior = GMMPrior(self.n_components_, self.n_mixture)
        noise = self.noise
        init_lv = 2.0 * math.log(_INIT_NOISE_STD if noise == "learned" else min(float(noise), 1.0))
        model = HalfVAE(n_rows, data_dim, self.n_components_, decoder=self.decoder, prior=prior,
                        hidden=self.hidden, activation=self.activation, noise=noise,
                        init_mu=torch.zeros(n_rows, self.n_components_), init_logvar=init_lv,
                        init_noise_std=_INIT_NOISE_STD,
                        sparse=self.batch_size is not None and not self._fused_table,
                        table_optimizer="adam" if self._fused_table else None,
                        table_lr=self.table_learning_rate)
        return model.to(device)

    def _initialize(self, model: HalfVAE, Xw: torch.Tensor, restart: int, seed: int,
                    generator: torch.Generator) -> None:
        """Set the latent means and decoder of a fresh restart (draws from ``generator``)."""
        n, dw = Xw.shape
        K = self.n_components_
        Xd = Xw.detach().cpu().double()
        _reset_parameters(model.decoder, generator)
        residual = isinstance(model.decoder, ResidualDecoder)
        if residual:
            model.decoder.zero_correction_()
        if self.init == "random":
            mu = torch.randn(n, K, generator=generator, dtype=torch.float64)
            W = None  # keep the random decoder
        elif self.init == "pca":
            u, s, vt = torch.linalg.svd(Xd, full_matrices=False)
            R = torch.eye(K, dtype=torch.float64) if restart == 0 else \
                _random_orthogonal(K, generator)
            mu = u[:, :K] * math.sqrt(n) @ R
            W = (vt[:K].T * (s[:K] / math.sqrt(n))) @ R
        else:  # fastica (opt-in warm start)
            from sklearn.decomposition import FastICA
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ica = FastICA(K, whiten="unit-variance", random_state=seed % (2**32),
                              max_iter=1000)
                mu = torch.from_numpy(ica.fit_transform(Xd.numpy()))
            W = torch.linalg.lstsq(mu, Xd).solution.T
        with torch.no_grad():
            model.latents.mu.copy_(mu.to(model.latents.mu))
            if W is not None and isinstance(model.decoder, nn.Linear):
                model.decoder.weight.copy_(W.to(model.decoder.weight))
            elif W is not None and residual:
                model.decoder.linear.weight.copy_(W.to(model.decoder.linear.weight))

    @property
    def _fused_table(self) -> bool:
        return self.table_optimizer == "fused"

    def _make_optimizers(self, model: HalfVAE):
        """[table optimizer, the rest's Adam]; with the fused table only [the rest's Adam] (the
        table's optimizer lives in the model, model.latents.table_optimizer)."""
        table = list(model.latents.parameters())
        rest = [dict(params=list(model.decoder.parameters())
                     + [p for p in model.likelihood.parameters()], lr=self.learning_rate),
                dict(params=list(model.prior.parameters()), lr=self.learning_rate)]
        if self._fused_table:
            return [torch.optim.Adam(rest)]
        if self.batch_size is None:
            opt_table = torch.optim.Adam(table, lr=self.table_learning_rate)
        else:
            opt_table = torch.optim.SparseAdam(table, lr=self.table_learning_rate)
        return [opt_table, torch.optim.Adam(rest)]

    # ------------------------------------------------------------------ training loop
    def _set_prior_trainable(self, prior: GMMPrior, epoch: int) -> None:
        # Warm-up: component positions and weights fixed, component variances free. The variances
        # alone can turn the flat-topped start super-Gaussian (narrow center, wide sides) or
        # multimodal, but cannot fit the marginal of two mixed sub-Gaussian sources.
        frozen = epoch < int(self.prior_warmup * self.max_iter)
        prior.means.requires_grad_(not frozen)
        prior.logits.requires_grad_(not frozen)
        prior.logvars.requires_grad_(True)

    def _lr_factor(self, epoch: int) -> float:
        return lr_factor(epoch, self.max_iter, self.lr_decay)

    def _epoch(self, model, optimizers, Xw, generator, epoch: int) -> float:
        """One pass over the data; returns the epoch's mean one-draw ELBO per sample."""
        self._set_prior_trainable(model.prior, epoch)
        f = self._lr_factor(epoch)
        if self._fused_table:
            model.latents.table_optimizer.lr = self.table_learning_rate * f
        else:
            optimizers[0].param_groups[0]["lr"] = self.table_learning_rate * f
        for group in optimizers[-1].param_groups:
            group["lr"] = self.learning_rate * f
        n = Xw.shape[0]
        if self.batch_size is None or self.batch_size >= n:
            batches = [None]
        else:
            perm = torch.randperm(n, generator=generator, device=generator.device)
            batches = list(torch.split(perm.to(Xw.device), self.batch_size))
        total = 0.0
        for idx in batches:
            x = Xw if idx is None else Xw.index_select(0, idx)
            ll, kl = model.elbo_terms(x, idx, generator=generator)
            elbo = ll - kl
            loss = -elbo.mean()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            total += float(elbo.detach().sum())
        return total / n

    @torch.no_grad()
    def _final_elbo(self, model, Xw, seed: int) -> float:
        g = torch.Generator(device=Xw.device).manual_seed((seed + 1) % (2**63))
        vals = []
        for _ in range(self.n_eval_samples):
            ll, kl = model.elbo_terms(Xw, None, generator=g)
            vals.append(float((ll - kl).mean()))
        return float(np.mean(vals))

    def _new_run(self, X: np.ndarray) -> dict:
        return {"format": _FORMAT, "version": _FORMAT_VERSION,
                "params": self._training_params(), "fingerprint": _fingerprint(X),
                "seeds": self._seeds(), "restart": 0, "epoch": 0, "current": None,
                "finished": [], "best": None, "done": False}

    def _start_restart(self, run, Xw, device):
        r = run["restart"]
        seed = run["seeds"][r]
        g = torch.Generator(device=device).manual_seed(seed)
        model = self._build_model(Xw.shape[0], Xw.shape[1], device)
        self._initialize(model, Xw, r, seed, g)
        opts = self._make_optimizers(model)
        return {"model": model, "optimizers": opts, "generator": g, "history": []}

    def _restore_restart(self, state, Xw, device):
        model = self._build_model(Xw.shape[0], Xw.shape[1], device)
        model.load_state_dict(state["model"])
        opts = self._make_optimizers(model)
        for opt, sd in zip(opts, state["optimizers"]):
            opt.load_state_dict(sd)
        g = torch.Generator(device=device)
        g.set_state(state["generator"].cpu())
        return {"model": model, "optimizers": opts, "generator": g,
                "history": list(state["history"])}

    @staticmethod
    def _snapshot(live) -> dict:
        return {"model": _to_state(live["model"].state_dict()),
                "optimizers": [_to_state(o.state_dict()) for o in live["optimizers"]],
                "generator": live["generator"].get_state(), "history": list(live["history"])}

    def _write_checkpoint(self, run, live):
        if self.checkpoint_path is None:
            return
        run = dict(run)
        run["current"] = self._snapshot(live) if live is not None else None
        atomic_torch_save(self._payload(run), self.checkpoint_path)

    def fit(self, X, y=None, *, resume=False, stop_after=None):
        """Fit the model to X [n_samples, n_features].

        resume: continue the unfinished run held by this estimator (a fit stopped by
        ``stop_after``, or one restored by :meth:`load`) or, if none (e.g. after a fit was
        interrupted by an exception), the checkpoint at ``checkpoint_path``; X and the training
        parameters must be those of that run. The result is identical to an uninterrupted fit.
        Without a run to continue, a fresh fit starts.
        stop_after: stop after that many epochs (counted over all restarts) in this call; the run
        stays resumable and the estimator is not fitted until the run completes.
        """
        device = self._validate_hyperparameters()
        if stop_after is not None and (isinstance(stop_after, bool)
                                       or not isinstance(stop_after, Integral) or stop_after < 0):
            raise ValueError(f"stop_after must be None or a non-negative integer, got {stop_after!r}")
        X = self._check_X(X, reset=True)
        self._clear_fitted()
        Xw_np = self._fit_preprocessing(X)
        run = None
        if resume:
            run = getattr(self, "_run", None)
            if run is None and self.checkpoint_path is not None \
                    and os.path.exists(self.checkpoint_path):
                run = self._read_payload(self.checkpoint_path)["run"]
            if run is not None:
                self._check_resumable(run, X)
        if run is None:
            run = self._new_run(X)
        self._run = run
        Xw = torch.as_tensor(Xw_np, dtype=torch.float32, device=device).contiguous()
        if self.decoder != "linear":  # transform() starts new rows at their nearest neighbor
            self._Xw_train = Xw.detach().cpu()
        try:
            with _torch_threads(self._threads(X.shape[0])):
                self._train(run, Xw, device, stop_after)
        except BaseException:
            # Interrupted mid-epoch (Ctrl-C, an error): the live state is lost or half-updated,
            # so forget the in-memory run; fit(X, resume=True) then resumes from the last
            # checkpoint at checkpoint_path (consistent), or starts afresh.
            self._run = None
            raise
        if run["done"]:
            self._set_fitted(run, device)
        return self

    def _threads(self, n_rows):
        if self.n_threads is not None:
            return self.n_threads
        return 1 if n_rows * self.n_components_ < _SMALL_PROBLEM else None

    _FITTED_ATTRS = ("model_", "best_restart_", "elbo_", "elbo_history_", "n_iter_",
                     "restart_elbos_", "mixing_", "components_", "_Xw_train")

    def _clear_fitted(self):
        for name in self._FITTED_ATTRS:
            if hasattr(self, name):
                delattr(self, name)

    def _check_resumable(self, run, X):
        if run.get("format") != _FORMAT:
            raise ValueError("the run to resume is not a HalfVAEICA run")
        if run["fingerprint"] != _fingerprint(X):
            raise ValueError("cannot resume: X is not the data of the run being resumed")
        mine = self._training_params()
        theirs = {**_ADDED_PARAM_DEFAULTS, **run["params"]}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError("cannot resume: these training parameters differ from the run's: "
                             + ", ".join(diff))

    def _train(self, run, Xw, device, stop_after):
        total = self.n_restarts * self.max_iter
        done_epochs = run["restart"] * self.max_iter + run["epoch"]
        bar = None
        if self.verbose:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=min(done_epochs, total), desc="HalfVAEICA",
                       unit="epoch", dynamic_ncols=True)
        budget = math.inf if stop_after is None else stop_after
        live = None
        try:
            while not run["done"]:
                if live is None:
                    if run["current"] is not None:
                        live = self._restore_restart(run["current"], Xw, device)
                    else:
                        live = self._start_restart(run, Xw, device)
                    run["current"] = None
                if run["epoch"] >= self.max_iter:
                    self._finish_restart(run, live, Xw)
                    live = None
                    self._write_checkpoint(run, None)
                    continue
                if budget <= 0:
                    break
                live["history"].append(self._epoch(live["model"], live["optimizers"], Xw,
                                                   live["generator"], run["epoch"]))
                run["epoch"] += 1
                budget -= 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(restart=run["restart"], elbo=f"{live['history'][-1]:.4f}")
                if self.checkpoint_every and run["epoch"] % self.checkpoint_every == 0 \
                        and run["epoch"] < self.max_iter:
                    self._write_checkpoint(run, live)
            if not run["done"]:
                # Stopped by stop_after: keep the live state resumable in memory and on disk.
                run["current"] = self._snapshot(live)
                if self.checkpoint_path is not None:
                    atomic_torch_save(self._payload(run), self.checkpoint_path)
        finally:
            if bar is not None:
                bar.close()

    def _finish_restart(self, run, live, Xw):
        r = run["restart"]
        elbo = self._final_elbo(live["model"], Xw, run["seeds"][r])
        if not math.isfinite(elbo):
            elbo = -math.inf
        run["finished"].append({"elbo": elbo, "n_iter": run["epoch"],
                                "history": list(live["history"])})
        if run["best"] is None or elbo > run["best"]["elbo"]:
            run["best"] = {"restart": r, "elbo": elbo, "n_iter": run["epoch"],
                           **self._snapshot(live)}
        run["restart"] += 1
        run["epoch"] = 0
        run["done"] = run["restart"] >= self.n_restarts

    def _set_fitted(self, run, device):
        best = run["best"]
        if not math.isfinite(best["elbo"]):
            raise RuntimeError("training diverged in every restart (non-finite ELBO); try a "
                               "smaller learning_rate or table_learning_rate")
        model = self._build_model(best["model"]["latents.mu"].shape[0],
                                  self.dewhitening_.shape[1], device)
        model.load_state_dict(best["model"])
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_ = model
        self.best_restart_ = int(best["restart"])
        self.elbo_ = float(best["elbo"])
        self.elbo_history_ = np.asarray(best["history"], dtype=np.float64)
        self.n_iter_ = int(best["n_iter"])
        self.restart_elbos_ = np.asarray([f["elbo"] for f in run["finished"]], dtype=np.float64)
        if self.decoder == "linear":
            W = model.decoder.weight.detach().cpu().double().numpy()  # [dw, K]
            self.mixing_ = self.dewhitening_ @ W
            self.components_ = np.linalg.pinv(self.mixing_)
        else:
            for name in ("mixing_", "components_"):
                if hasattr(self, name):
                    delattr(self, name)

    # ------------------------------------------------------------------ outputs
    def fit_transform(self, X, y=None, **fit_params):
        """Fit and return the trained latent means (the recovered sources), [n_samples, K]."""
        self.fit(X, y, **fit_params)
        check_is_fitted(self, "model_")
        return self.model_.latents.mu.detach().cpu().double().numpy().copy()

    def transform(self, X):
        """Sources of new rows X [m, n_features] -> [m, K].

        There is no encoder: a fresh latent table for the new rows is fitted by maximizing their
        ELBO with the decoder, noise and prior frozen (``transform_max_iter`` Adam steps, started at
        the pseudo-inverse solution for the linear decoder, at the nearest training row's latent
        mean for the MLP). Deterministic for a given ``random_state``. Because the rows are fitted
        anew with Monte-Carlo KL gradients, ``transform`` of the training data agrees with
        ``fit_transform`` only approximately (to about 1e-2), and a row's result depends slightly
        (about 1e-3) on its position in X.
        """
        check_is_fitted(self, "model_")
        X = self._check_X(X, reset=False)
        with _torch_threads(self._threads(X.shape[0])):
            return self._transform(X)

    def _transform(self, X):
        model = self.model_
        device = model.latents.mu.device
        Xw = torch.as_tensor(self._preprocess(X), dtype=torch.float32, device=device)
        m, K = Xw.shape[0], self.n_components_
        with torch.no_grad():
            if isinstance(model.decoder, nn.Linear):
                mu0 = Xw @ torch.linalg.pinv(model.decoder.weight).T
            else:
                Xtrain = self._training_whitened(device)
                nearest = torch.cat([torch.cdist(chunk, Xtrain).argmin(1)
                                     for chunk in torch.split(Xw, 1024)])
                mu0 = model.latents.mu[nearest]
            lv0 = model.latents.logvar.mean(0).expand(m, K)
        mu = mu0.clone().requires_grad_(True)
        logvar = lv0.clone().requires_grad_(True)
        seed = self._run["seeds"][self.best_restart_]
        g = torch.Generator(device=device).manual_seed((seed + 2) % (2**63))
        opt = torch.optim.Adam([mu, logvar], lr=self.table_learning_rate)
        for _ in range(self.transform_max_iter):
            ll, kl = elbo_terms(model, Xw, mu, logvar, generator=g)
            loss = (kl - ll).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return mu.detach().cpu().double().numpy()

    def _training_whitened(self, device):
        if not hasattr(self, "_Xw_train"):
            raise RuntimeError("transform with the MLP decoder needs the training data, which a "
                               "loaded model does not keep; refit")  # pragma: no cover
        return self._Xw_train.to(device)

    def inverse_transform(self, S):
        """Mixtures of sources S [m, K] -> X [m, n_features] (the decoder's mean)."""
        check_is_fitted(self, "model_")
        if S is None or isinstance(S, (str, bytes)):
            raise TypeError(f"S must be a 2-D array-like of numbers, got {type(S).__name__}")
        if isinstance(S, torch.Tensor):
            S = S.detach().cpu().numpy()
        from sklearn.utils import check_array
        try:
            S = check_array(S, dtype=np.float64, ensure_min_samples=1, ensure_all_finite=True)
        except ValueError as e:
            raise ValueError(f"S: {e}") from None
        if S.shape[1] != self.n_components_:
            raise ValueError(f"S must have {self.n_components_} columns (n_components_), "
                             f"got {S.shape[1]}")
        device = self.model_.latents.mu.device
        with torch.no_grad():
            Xw = self.model_.decode(torch.as_tensor(S, dtype=torch.float32, device=device))
        return Xw.cpu().double().numpy() @ self.dewhitening_.T + self.mean_

    @property
    def _n_features_out(self):
        return self.n_components_

    # ------------------------------------------------------------------ persistence
    _FITTED_ARRAYS = ("mean_", "whitening_", "dewhitening_")

    def _payload(self, run) -> dict:
        params = self.get_params(deep=False)
        params["hidden"] = list(params["hidden"]) if not isinstance(params["hidden"], Integral) \
            else params["hidden"]
        if params["checkpoint_path"] is not None:
            params["checkpoint_path"] = os.fspath(params["checkpoint_path"])
        params["device"] = str(params["device"])
        fitted = {name: torch.from_numpy(np.asarray(getattr(self, name)))
                  for name in self._FITTED_ARRAYS if hasattr(self, name)}
        fitted["n_components_"] = self.n_components_
        fitted["n_features_in_"] = self.n_features_in_
        if hasattr(self, "_Xw_train"):
            fitted["Xw_train"] = self._Xw_train.cpu()
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "params": params,
                "fitted": fitted, "run": run}

    def save(self, path) -> None:
        """Write the estimator (parameters, preprocessing, the run with model and optimizer
        states; an unfinished run included) to ``path`` atomically."""
        run = getattr(self, "_run", None)
        if run is None:
            raise ValueError("nothing to save: call fit first")
        atomic_torch_save(self._payload(run), path)

    @staticmethod
    def _read_payload(path) -> dict:
        try:
            payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a readable HalfVAEICA file ({e})") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a HalfVAEICA file")
        if payload.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported HalfVAEICA file version "
                             f"{payload.get('version')!r}")
        return payload

    @classmethod
    def load(cls, path, device=None) -> "HalfVAEICA":
        """Read a file written by :meth:`save` (or a checkpoint). A completed run comes back
        fitted; an unfinished one can be continued with ``fit(X, resume=True)``."""
        payload = cls._read_payload(path)
        params = dict(payload["params"])
        if isinstance(params.get("hidden"), list):
            params["hidden"] = tuple(params["hidden"])
        if device is not None:
            params["device"] = device
        est = cls(**params)
        dev = est._validate_hyperparameters()
        fitted = payload["fitted"]
        for name in cls._FITTED_ARRAYS:
            if name in fitted:
                setattr(est, name, fitted[name].numpy())
        est.n_components_ = int(fitted["n_components_"])
        est.n_features_in_ = int(fitted["n_features_in_"])
        if "Xw_train" in fitted:
            est._Xw_train = fitted["Xw_train"]
        est._run = payload["run"]
        if est._run["done"]:
            est._set_fitted(est._run, dev)
        return est
