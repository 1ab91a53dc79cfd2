"""HalfVAEICA: independent component analysis with an encoder-free VAE, scikit-learn style.

The model (arXiv 2409.04140): every sample n owns a Gaussian posterior q(z_n) = N(mu_n, sigma_n^2)
(a trainable table, no encoder), each latent dimension has a trainable 1-D Gaussian-mixture prior,
and a decoder maps z to x with Gaussian observation noise. Training maximizes the ELBO.

The class is a thin layer over the recipe: :mod:`halfvae_ext.preprocessing` (input checks,
whitening), :mod:`halfvae_ext.recipe` (model, initialization, prior warm-up, schedule, one epoch,
final ELBO), :mod:`halfvae_ext.restarts` (restarts chosen by ELBO, as a resumable run) and
:mod:`halfvae_ext.param_validation` (the parameter table). It adds fitting, the outputs and files.

Two kinds of recovered sources:

- ``transform(X)``: a function of each row alone (to floating-point accuracy: the batch shape and
  thread count can change the last bits). Linear decoder: (X - mean_) @ components_.T, as
  scikit-learn's FastICA. Other decoders: the posterior mode of each row.
- ``posterior_means_``: the trained latent table, the posterior means of the training rows (with
  the prior's shrinkage). The README's figures and the demo report them. On the paper's linear
  problem they are as good as the linear projection on sine and sawtooth and worse on the square
  wave (seed 0, defaults: RMSE 0.00073 against 0.000037).

Typical use::

    est = HalfVAEICA(n_components=3, random_state=0).fit(X)   # X: [n_samples, n_features]
    S = est.posterior_means_        # sources of the training rows, [n_samples, 3]
    S_new = est.transform(X_new)    # sources of any rows, row by row

Nonstationary data (an auxiliary variable u, e.g. the segment of a recording, makes nonlinear ICA
identifiable: Hyvarinen & Morioka 2016, Khemakhem et al. 2020)::

    est = HalfVAEICA(5, decoder="residual", n_mixture=1, noise=(0.5, 0.05),
                     posterior_covariance="full", random_state=0)
    est.fit(X, u=u)                                          # u: [n_samples] integer labels
    S_new = est.transform(X_new, u=u_new)

With u the prior is conditional: one Gaussian mixture per segment and latent dimension.
"""
from __future__ import annotations

import copy
import hashlib
import os
import types
import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from .atomic_io import atomic_torch_save, atomic_write, check_writable
from .models import ACTIVATIONS, COVARIANCES, DECODERS, FlowDecoder
from .param_validation import (Device, Interval, InvalidParameterError, Options, PathLike,
                               PositivePair, RandomState, Widths, validate_parameters)
from .preprocessing import FLOAT_DTYPES, Whitening, check_data, fingerprint, fit_whitening
from .recipe import (FUSED_TABLE_OPTIMIZERS, Recipe, elbo_change, posterior_mode,
                     restart_seeds, torch_threads)
from .restarts import RUN_FORMAT, RUN_FORMAT_VERSION, RunState, run_restarts

__all__ = ["HalfVAEICA", "atomic_write", "atomic_torch_save"]

# Parameters added after files were first written, with the behaviour those files had.
_ADDED_PARAM_DEFAULTS = {"table_optimizer": "torch", "kl": "mc",
                         "posterior_covariance": "diagonal"}
# Parameters that do not change the training computation: they may differ on resume.
_NON_TRAINING_PARAMS = ("verbose", "checkpoint_path", "checkpoint_every", "device",
                        "transform_max_iter", "n_threads", "tol")
# Below this many latent entries (n_samples * n_components) one CPU thread is faster: the steps are
# too small to split, and on a busy machine a waiting OpenMP team costs several times the work.
_SMALL_PROBLEM = 1 << 17
# How a numpy RandomState given as random_state is written to files (the run keeps its seeds).
_RANDOM_STATE_OBJECT = "RandomState"
_DIVERGED = ("training diverged in every restart (non-finite ELBO); try a smaller learning_rate "
             "or table_learning_rate")

_POSITIVE = Interval(float, 0, None, closed="neither")


def _plain(v):
    """v with numpy scalars (also inside lists and tuples) as the Python numbers they hold: the
    parameter table accepts np.int64(3) or np.float32(0.01), but files are read with
    torch.load(weights_only=True), which refuses numpy objects, and the recipe should compute
    with the same values whether they came from the user or from a file."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    return v


def _check_u(u, n_rows: int) -> np.ndarray:
    """u as a 1-D integer numpy array of n_rows segment labels; ValueError naming u otherwise."""
    if isinstance(u, torch.Tensor):
        u = u.detach().cpu().numpy()
    if isinstance(u, (str, bytes)):
        raise ValueError(f"u must be a 1-D array of integer segment labels, got a {type(u).__name__}")
    arr = np.asarray(u)
    if arr.ndim != 1:
        raise ValueError(f"u must be a 1-D array of integer segment labels (one per row of X), "
                         f"got shape {arr.shape}")
    # Floats are refused even when integral: a float u is most likely a column taken by mistake.
    if arr.dtype.kind not in "iu":
        raise ValueError(f"u must hold integer segment labels, got dtype {arr.dtype}")
    if arr.shape[0] != n_rows:
        raise ValueError(f"u must have one segment label per row of X ({n_rows}), got "
                         f"{arr.shape[0]}")
    return arr.astype(np.int64, copy=False)


def _fingerprint(X: np.ndarray, segments, codes) -> str:
    """The run's data fingerprint: X's, and u's when given (the same X with other segments is
    other data). Without u it is fingerprint(X), as in files written before u existed."""
    fp = fingerprint(X)
    if segments is None:
        return fp
    h = hashlib.sha256(fp.encode())
    h.update(np.ascontiguousarray(segments, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    return h.hexdigest()


class HalfVAEICA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Independent component analysis with an encoder-free VAE (Half-VAE).

    A drop-in for scikit-learn's FastICA (``fit``, ``transform``, ``fit_transform``,
    ``inverse_transform``, ``mixing_``, ``components_``, ``n_iter_``), with the trained posterior
    means of the training rows in ``posterior_means_``.

    ``fit(X, u=u)``: with segment labels u (one integer per row) the prior is conditional,
    p(z | u) = prod_k p_{u,k}(z_k), one Gaussian mixture per segment and latent dimension
    (``n_mixture`` components each). Sources whose distribution changes across segments are then
    identifiable under nonlinear mixing (the iVAE setting). There use ``decoder="flow"``
    (invertible; see ``decoder``) with ``n_mixture=1`` for Gaussian sources, ``hidden=(64, 64)``
    and ``max_iter=200``: on the iVAE benchmark's fresh seeds MCC 0.986 / 0.945 / 0.974 (median
    at 2 and 4 leaky-ReLU layers and in iVAE's own 3-layer xtanh setting;
    benchmarks/ICA_EXPERIMENTS.md section 22). The flow's likelihood is noise-free; with
    observation noise in X the alternative is ``decoder="residual"`` (with noise of std 0.1 on
    X, one dev seed at L = 2: flow 0.934, residual 0.941) with the noise schedule
    ``noise=(0.5, 0.05)`` and ``posterior_covariance="full"`` (0.980 / 0.734 / 0.687 there;
    sections 15 and 19). ``transform(X, u=u)``
    takes the new rows' segments, which must be among those seen in fit (``segments_``).
    Without u nothing changes.

    Parameters
    ----------
    n_components : int or None
        Number of sources K (None: the number of features). Above the rank of the centered X it
        is reduced to the rank, with a UserWarning.
    n_mixture : int in [1, 64]
        Components C of each latent dimension's Gaussian-mixture prior.
    decoder : {"linear", "mlp", "residual", "flow"}
        x = W z (linear ICA); an MLP; or "residual", x = W z + mlp(z) with the MLP's output layer
        started at zero, so that training starts from the linear model (initialized like it) and
        learns a nonlinear correction. For nonlinear mixtures without u "residual" did best
        (benchmarks/ICA_EXPERIMENTS.md, sections 8 and 10). With u (nonstationary sources)
        "residual" too: it starts from the linear solution that the conditional prior already
        improves on (the per-segment variances identify a linear mix), and learns the nonlinear
        part from there; an "mlp" decoder starts as a random map while the latent table starts
        at the PCA scores, and did worse (MCC 0.70 against 0.76 on a dev seed, section 13 there).
        "flow": an invertible decoder (:class:`~halfvae_ext.models.FlowDecoder`: a linear map and
        eight affine-coupling blocks whose MLPs have ``hidden`` widths; X is whitened to K
        dimensions). A row's posterior at zero noise is then the point h(x_n), h the decoder's
        inverse, so the table is held there instead of trained, and the fit maximizes the
        ELBO's zero-noise limit, the model's exact log-likelihood log p(h(x) | u) + log|det
        dh/dx| (``noise``, ``kl``, ``prior_warmup`` and ``table_learning_rate`` do not apply;
        mini-batches of 1000 rows unless ``batch_size`` says otherwise), and ``transform`` is
        h, exact and instant. With u on the iVAE benchmark it separates where "residual" cannot:
        see the README's nonstationary table and ICA_EXPERIMENTS.md section 22.
    hidden, activation : MLP widths and activation (decoders "mlp" and "residual"; the flow's
        coupling MLPs). The defaults,
        one hidden layer of 32 leaky-ReLU units, did best on the nonlinear benchmark (wider and
        deeper decoders fit the data as well without separating the sources).
    noise : "learned", float or (start, end)
        Observation noise: a learned per-feature variance; a fixed std (in whitened units); or a
        schedule of fixed stds, ``start`` for the first half of the epochs, then falling
        geometrically to ``end`` at the last epoch. A large noise lets the latent table and the
        decoder move together, a small one makes the fit precise: with u on the nonstationary
        benchmark ``(0.5, 0.05)`` did better than a fixed 0.5 (benchmarks/ICA_EXPERIMENTS.md
        section 15).
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
        None (or at least n_samples): full batch. Else mini-batches (the table then uses sparse
        gradients and SparseAdam, so rows outside a batch are not moved by stale momentum).
    table_optimizer : {"torch", "fused", "rowwise_adam", "rowwise_adam_bf16", "rowwise_adagrad"}
        How the latent table is optimized. "torch": torch.optim.Adam (full batch) or SparseAdam
        (mini-batches) on the table's gradients. The others step the touched rows inside the
        backward (:class:`~halfvae_ext.LatentTable`'s ``fused_optimizer``): no gradient of the
        table is ever created and a mini-batch step costs O(batch_size) whatever n_samples; the
        state is saved with the model. "fused": exact Adam (SparseAdam's formula: lazy moments,
        eps added to sqrt(v)). "rowwise_adam": FBGEMM's partial row-wise Adam (one second moment
        per row of mu and of logvar, per-row bias correction); "rowwise_adam_bf16": the same with
        bfloat16 first moments (128 bytes a row for 8 components, exact Adam 192);
        "rowwise_adagrad": FBGEMM's row-wise Adagrad. The compact ones are for tables too big for
        exact Adam's state; on small problems they separate as well (tests/test_compact_table_optim.py).
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
    kl : {"mc", "bound"}
        KL term of the ELBO: the one-draw Monte-Carlo estimate, or the closed-form upper bound
        of the KL to a mixture (no sampling noise in the KL; the ELBO stays a lower bound).
    posterior_covariance : {"diagonal", "full"}
        Each row's posterior: mean-field (a variance per latent), or a full covariance (a
        Cholesky factor per row, K (K + 1) / 2 values; not with a fused ``table_optimizer``).
        A mean-field posterior pulls the latents toward a basis in which the decoder's Jacobian
        columns are orthogonal, which the sources of a non-orthogonal mixing are not. With u,
        ``n_mixture=1`` and "full" the latents are also realigned during a fit, every twentieth
        of the epochs through the prior warm-up, half way and at the end (the linear change of
        coordinates that maximizes the conditional prior's likelihood, taken by table, decoder
        and prior together): on the iVAE benchmark (L = 2) this raised the MCC from 0.93 / 0.85
        to 0.98 / 0.97 on the dev seeds, and to 0.980 [worst 0.964] on fresh ones
        (ICA_EXPERIMENTS.md section 19).
    transform_max_iter : int
        Adam steps of the posterior-mode search in :meth:`transform` (MLP and residual decoders).
    tol : float or None
        Convergence threshold, in nats per sample per epoch: a fit warns (ConvergenceWarning)
        when the ELBO per sample of the kept restart still changes faster than that at the end,
        measured as |mean over the last tenth of its epochs - mean over the tenth before| / (the
        number of epochs in a tenth). None: never warn.
    checkpoint_path : path or None
        Where to write checkpoints (atomically); ``fit(X, resume=True)`` resumes from it. Checked
        for writability before training starts.
    checkpoint_every : int or None
        Write a checkpoint every that many epochs (and when a restart ends or a fit stops).
    random_state : int, numpy RandomState or None
        Seed of everything random (initializations, Monte-Carlo draws, mini-batch order). A
        non-negative int of any size (it feeds numpy's SeedSequence; unlike
        sklearn.utils.check_random_state there is no 32-bit limit) gives the same fit every time;
        a RandomState gives one draw of entropy (the same for a RandomState seeded alike; each
        fit advances it, as in scikit-learn); None fresh entropy.
    device : str or torch.device
        Must be usable here (a CUDA device needs torch.cuda.is_available()).
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
        The pseudo-inverse of ``mixing_``: transform(X) = (X - mean_) @ components_.T.
    posterior_means_ : ndarray [n_samples, n_components]
        The trained latent means of the training rows (the posterior means, shrunk by the prior).
    segments_ : ndarray [n_segments] int64  (only when fitted with u)
        The sorted distinct segment labels of u; the prior has one mixture per label.
    elbo_ : float
        Final ELBO per sample of the kept restart (nats, in the whitened space); with
        ``decoder="flow"`` the model's exact log-likelihood per sample, the ELBO's zero-noise
        limit less the terms in the noise alone.
    elbo_history_ : ndarray [n_iter_]
        ELBO per sample at every epoch of the kept restart (of the epoch's one-draw estimates;
        the flow: the mean log-likelihood of the epoch's mini-batches).
    n_iter_ : int
    best_restart_ : int
    restart_elbos_ : ndarray [n_restarts]
    model_ : HalfVAE
        The trained model of the kept restart (on ``device``).

    The arrays are float32 for float32 X, else float64; transform and inverse_transform return
    float32 only when both their input and the fit were float32 (as FastICA).
    """

    # Our own table (halfvae_ext.param_validation), not scikit-learn's: its name is not
    # scikit-learn's reserved _parameter_constraints, whose constraint language differs.
    _hyperparameter_table = {
        "n_components": [None, Interval(int, 1)],
        "n_mixture": [Interval(int, 1, 64)],
        "decoder": [Options(DECODERS)],
        "hidden": [Widths()],
        "activation": [Options(sorted(ACTIVATIONS))],
        "noise": ["learned", _POSITIVE, PositivePair()],
        "whiten": [Options(("pca", "standardize")), False],
        "init": [Options(("pca", "random", "fastica"))],
        "max_iter": [Interval(int, 1)],
        "batch_size": [None, Interval(int, 1)],
        "table_optimizer": [Options(("torch", *FUSED_TABLE_OPTIMIZERS))],
        "learning_rate": [_POSITIVE],
        "table_learning_rate": [_POSITIVE],
        "prior_warmup": [Interval(float, 0, 1, closed="left")],
        "lr_decay": [Interval(float, 0, 1)],
        "n_restarts": [Interval(int, 1)],
        "n_eval_samples": [Interval(int, 1)],
        "kl": [Options(("mc", "bound"))],
        "posterior_covariance": [Options(COVARIANCES)],
        "transform_max_iter": [Interval(int, 0)],
        "tol": [None, Interval(float, 0)],
        "checkpoint_path": [None, PathLike()],
        "checkpoint_every": [None, Interval(int, 1)],
        "random_state": [None, RandomState()],
        "device": [Device()],
        "n_threads": [None, Interval(int, 1)],
        "verbose": [True, False, Interval(int, 0)],
    }

    def __init__(self, n_components=None, *, n_mixture=3, decoder="linear", hidden=(32,),
                 activation="leaky_relu", noise="learned", whiten="pca", init="pca", max_iter=1500,
                 batch_size=None, table_optimizer="torch", learning_rate=0.01,
                 table_learning_rate=0.05,
                 prior_warmup=0.3, lr_decay=0.3, n_restarts=4, n_eval_samples=8, kl="mc",
                 posterior_covariance="diagonal", transform_max_iter=300, tol=0.01, checkpoint_path=None, checkpoint_every=None, random_state=None,
                 device="cpu", n_threads=None, verbose=False):
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
        self.kl = kl
        self.posterior_covariance = posterior_covariance
        self.transform_max_iter = transform_max_iter
        self.tol = tol
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.random_state = random_state
        self.device = device
        self.n_threads = n_threads
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.non_deterministic = self.random_state is None
        return tags

    def __sklearn_is_fitted__(self):
        # A stopped fit sets mean_ and the like but is not fitted until its run completes.
        return hasattr(self, "model_")

    # ------------------------------------------------------------------ validation
    def _validate_params(self):
        """Validate the parameters against the table, what scikit-learn's method of this name
        does with its own table (so that its machinery, if it calls this, checks ours)."""
        validate_parameters(self._hyperparameter_table, self.get_params(deep=False))

    def _check_params(self) -> torch.device:
        """Validate the parameters against the table (and what it cannot say); return the device."""
        self._validate_params()
        if self.checkpoint_every is not None and self.checkpoint_path is None:
            raise InvalidParameterError("checkpoint_every needs a checkpoint_path")
        if self.decoder == "flow":
            for name, plain in (("table_optimizer", "torch"), ("posterior_covariance", "diagonal")):
                if getattr(self, name) != plain:
                    raise InvalidParameterError(
                        f"decoder='flow' holds each row's latents at the decoder's inverse (its "
                        f"posterior at zero noise) and trains no table: {name} must be "
                        f"{plain!r}, got {getattr(self, name)!r}")
        if self.posterior_covariance == "full" and self.table_optimizer != "torch":
            raise InvalidParameterError(
                f"posterior_covariance='full' needs table_optimizer='torch' (the fused table "
                f"optimizers step diagonal posteriors), got {self.table_optimizer!r}")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={self.device!r}: no usable CUDA device here "
                                 "(torch.cuda.is_available() is False); use device='cpu'")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device={self.device!r}: there are only "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
        return device

    def _training_params(self) -> dict:
        p = self._file_params()
        for name in _NON_TRAINING_PARAMS:
            p.pop(name)
        return p

    def _recipe(self) -> Recipe:
        p = {k: _plain(v) for k, v in self.get_params(deep=False).items()}
        hidden = (p["hidden"],) if isinstance(p["hidden"], Integral) else tuple(p["hidden"])
        return Recipe(n_components=int(self.n_components_), n_mixture=p["n_mixture"],
                      decoder=p["decoder"], hidden=hidden, activation=p["activation"],
                      noise=tuple(p["noise"]) if isinstance(p["noise"], list) else p["noise"],
                      init=p["init"], max_iter=p["max_iter"],
                      batch_size=p["batch_size"], table_optimizer=p["table_optimizer"],
                      learning_rate=p["learning_rate"],
                      table_learning_rate=p["table_learning_rate"],
                      prior_warmup=p["prior_warmup"], lr_decay=p["lr_decay"],
                      n_eval_samples=p["n_eval_samples"], kl=p["kl"],
                      posterior_covariance=p["posterior_covariance"],
                      n_groups=len(getattr(self, "segments_", ())) or 1)

    def _run_to_resume(self):
        run = getattr(self, "_run", None)
        if run is None and self.checkpoint_path is not None \
                and os.path.exists(self.checkpoint_path):
            run = RunState.from_dict(self._read_payload(self.checkpoint_path)["run"])
        # A run whose every restart diverged has nothing to continue: resume starts afresh.
        return None if run is not None and run.diverged else run

    def _check_resumable(self, run: RunState, X: np.ndarray, segments, codes) -> None:
        if run.fingerprint != _fingerprint(X, segments, codes):
            raise ValueError("cannot resume: X (or u) is not the data of the run being resumed")
        mine = self._training_params()
        theirs = {**_ADDED_PARAM_DEFAULTS, **run.params}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError("cannot resume: these training parameters differ from the run's: "
                             + ", ".join(diff))

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None, *, u=None, resume=False, stop_after=None):
        """Fit the model to X [n_samples, n_features].

        u: None, or the segment label (an integer) of every row, [n_samples]: the prior is then
        conditional, one mixture per distinct label (``segments_``) and latent dimension, each
        started at the mean and variance of its segment's starting latent means (the PCA
        scores; ICA_EXPERIMENTS.md section 16). y is ignored (scikit-learn's signature), so pass
        u by name.

        resume: continue the unfinished run held by this estimator (a fit stopped by
        ``stop_after``, or one restored by :meth:`load`) or, if none (e.g. after a fit was
        interrupted by an exception), the checkpoint at ``checkpoint_path``; X and the training
        parameters must be those of that run. The result is identical to an uninterrupted fit.
        Without a run to continue, a fresh fit starts.
        stop_after: stop after that many epochs (counted over all restarts) in this call; the run
        stays resumable and the estimator is not fitted until the run completes.

        Everything is checked (parameters, device, X, the run to resume, that checkpoint_path can
        be written) before any fitted state changes: a refused fit leaves the estimator as it was.
        """
        device = self._check_params()
        if stop_after is not None and (isinstance(stop_after, bool)
                                       or not isinstance(stop_after, Integral) or stop_after < 0):
            raise ValueError(f"stop_after must be None or a non-negative integer, got {stop_after!r}")
        Xa = check_data(X)
        segments, codes = (None, None) if u is None else \
            np.unique(_check_u(u, Xa.shape[0]), return_inverse=True)
        whitening, Xw_np = fit_whitening(Xa, self.n_components, self.whiten,
                                         keep_all_dims=self.decoder not in ("linear", "flow"))
        run = self._run_to_resume() if resume else None
        if run is not None:
            self._check_resumable(run, Xa, segments, codes)
        if self.checkpoint_path is not None:
            check_writable(self.checkpoint_path)

        validate_data(self, Xa if isinstance(X, torch.Tensor) else X, reset=True,
                      skip_check_array=True)
        self._clear_fitted()
        self._set_preprocessing(whitening, Xa.dtype)
        if segments is not None:
            self.segments_ = segments.astype(np.int64)
        if run is None:
            run = RunState(self._training_params(), _fingerprint(Xa, segments, codes),
                           restart_seeds(self.random_state, self.n_restarts))
        self._run = run
        Xw = torch.as_tensor(Xw_np, dtype=torch.float32, device=device).contiguous()
        ut = None if codes is None else \
            torch.as_tensor(codes.reshape(-1), dtype=torch.int64, device=device)
        if self.decoder not in ("linear", "flow"):  # transform() starts new rows at their
            self._Xw_train = Xw.detach().cpu()      # nearest training row
        recipe = self._recipe()
        try:
            with torch_threads(self._threads(Xa.shape[0])):
                self._train(run, recipe, Xw, device, stop_after, ut)
        except BaseException:
            # Interrupted mid-epoch (Ctrl-C, an error): the live state is lost or half-updated,
            # so forget the in-memory run; fit(X, resume=True) then resumes from the last
            # checkpoint at checkpoint_path (consistent), or starts afresh.
            self._run = None
            raise
        if run.diverged:
            # Nothing to keep: save() refuses and fit(X, resume=True) starts afresh.
            self._run = None
            raise RuntimeError(_DIVERGED)
        if run.done:
            self._set_fitted(run, device)
            self._warn_if_not_converged()
        return self

    def _threads(self, n_rows):
        if self.n_threads is not None:
            return self.n_threads
        return 1 if n_rows * self.n_components_ < _SMALL_PROBLEM else None

    def _train(self, run: RunState, recipe: Recipe, Xw, device, stop_after, u=None):
        bar = None
        progress = None
        if self.verbose:
            from tqdm.auto import tqdm
            total = run.n_restarts * recipe.max_iter
            bar = tqdm(total=total, initial=min(run.restart * recipe.max_iter + run.epoch, total),
                       desc="HalfVAEICA", unit="epoch", dynamic_ncols=True)

            def progress(state, elbo):
                bar.update(1)
                bar.set_postfix(restart=state.restart, elbo=f"{elbo:.4f}")
        checkpoint = None
        if self.checkpoint_path is not None:
            def checkpoint(state):
                atomic_torch_save(self._payload(state), self.checkpoint_path)
        try:
            run_restarts(run, recipe, Xw, device, stop_after=stop_after,
                         checkpoint=checkpoint,
                         checkpoint_every=self.checkpoint_every, progress=progress, u=u)
        finally:
            if bar is not None:
                bar.close()

    _FITTED_ATTRS = ("model_", "best_restart_", "elbo_", "elbo_history_", "n_iter_",
                     "restart_elbos_", "mixing_", "components_", "posterior_means_", "_Xw_train",
                     "segments_")
    _FITTED_ARRAYS = ("mean_", "whitening_", "dewhitening_")

    def _clear_fitted(self):
        for name in self._FITTED_ATTRS:
            if hasattr(self, name):
                delattr(self, name)

    def _set_preprocessing(self, w: Whitening, dtype) -> None:
        self.mean_ = w.mean.astype(dtype, copy=False)
        self.whitening_ = w.whitening.astype(dtype, copy=False)
        self.dewhitening_ = w.dewhitening.astype(dtype, copy=False)
        self.n_components_ = int(w.n_components)

    def _set_fitted(self, run: RunState, device):
        best = run.best
        dtype = self.mean_.dtype
        model = self._recipe().build_model(best.snapshot.model["latents.mu"].shape[0],
                                           self.dewhitening_.shape[1], device)
        model.load_state_dict(best.snapshot.model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_ = model
        self.best_restart_ = int(best.restart)
        self.elbo_ = float(best.elbo)
        self.elbo_history_ = np.asarray(best.snapshot.history, dtype=np.float64)
        self.n_iter_ = int(best.n_iter)
        self.restart_elbos_ = np.asarray([f.elbo for f in run.finished], dtype=np.float64)
        self.posterior_means_ = model.latents.mu.detach().cpu().double().numpy().astype(dtype)
        if self.decoder == "linear":
            W = model.decoder.weight.detach().cpu().double().numpy()  # [dw, K]
            mixing = self.dewhitening_.astype(np.float64) @ W
            self.mixing_ = mixing.astype(dtype)
            self.components_ = np.linalg.pinv(mixing).astype(dtype)

    def _warn_if_not_converged(self):
        if self.tol is None:
            return
        change = elbo_change(self.elbo_history_)
        if change > self.tol:
            warnings.warn(f"HalfVAEICA did not converge: over the last tenth of its {self.n_iter_} "
                          f"epochs the ELBO per sample of the kept restart still changed by "
                          f"{change:.3g} per epoch (tol={self.tol}); increase max_iter",
                          ConvergenceWarning, stacklevel=3)

    # ------------------------------------------------------------------ outputs
    def fit_transform(self, X, y=None, **fit_params):
        """``fit(X, u=u).transform(X, u=u)``: [n_samples, K]. The trained posterior means of the
        same rows are ``posterior_means_``."""
        return self.fit(X, y, **fit_params).transform(X, u=fit_params.get("u"))

    def _check_X(self, X, name="X") -> np.ndarray:
        if X is None or isinstance(X, (str, bytes)) or np.isscalar(X):
            raise TypeError(f"{name} must be a 2-D array-like of numbers, got {type(X).__name__}")
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        try:
            return validate_data(self, X, reset=False, dtype=FLOAT_DTYPES, ensure_all_finite=True)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        except TypeError as e:
            raise TypeError(f"{name}: {e}") from None

    def transform(self, X, u=None):
        """Sources of rows X [m, n_features] -> [m, K], each row's from that row alone: the
        same call gives the same bits; with other rows, another order or another thread count a
        row's result agrees to floating-point accuracy (the matrix products' rounding depends on
        the batch shape and threads).

        Linear decoder: (X - mean_) @ components_.T, as FastICA.
        Flow decoder: h(X), the decoder's inverse (a row's posterior at zero noise), in float64.
        MLP and residual decoders: the posterior mode argmax_z log p(x | z) + log p(z) with the
        trained decoder, noise and prior, found by ``transform_max_iter`` Adam steps (rate 0.02,
        cosine-decayed) on the sum over rows of the negative log joint, in float64, started at
        the posterior mean of the nearest training row (in the whitened space).

        The output dtype follows FastICA's rule for every decoder: numpy's result type of X's
        dtype and the fitted arrays' (float32 only when X is float32 and the model was fitted on
        float32). For the training rows the posterior means themselves are ``posterior_means_``.

        u: the segment label of every row [m], for an estimator fitted with u; each label must
        be one seen in fit (``segments_``). The posterior mode then uses each row's own segment
        prior. Required for the MLP and residual decoders; optional for the linear and flow decoders,
        whose maps do not use the prior (it is checked when given).
        """
        check_is_fitted(self)
        X = self._check_X(X)
        codes = self._segment_codes(u, X.shape[0])
        if isinstance(self.model_.decoder, nn.Linear):
            return (X - self.mean_) @ self.components_.T
        flow = isinstance(self.model_.decoder, FlowDecoder)
        if codes is None and hasattr(self, "segments_") and not flow:
            raise ValueError(f"u is required: the estimator was fitted with u "
                             f"({len(self.segments_)} segments) and its {self.decoder} decoder's "
                             "transform uses each row's segment prior; pass u=the rows' segments")
        with torch_threads(self._threads(X.shape[0])):
            S = self._flow_inverse(X) if flow else self._posterior_mode(X, codes)
        return S.astype(np.result_type(X.dtype, self.mean_.dtype), copy=False)

    def _segment_codes(self, u, n_rows):
        """u checked against X's rows and the segments seen in fit, as indices into segments_
        (None for u=None)."""
        if u is None:
            return None
        u = _check_u(u, n_rows)
        if not hasattr(self, "segments_"):
            raise ValueError("u: this estimator was fitted without u (an unconditional prior); "
                             "fit it with u=... to use segments")
        seen = np.isin(u, self.segments_)
        if not seen.all():
            unseen = np.unique(u[~seen])
            raise ValueError(f"u has segment label(s) not seen in fit: {unseen[:10].tolist()}"
                             f"{' ...' if unseen.size > 10 else ''} (the fitted segments are "
                             "segments_)")
        return np.searchsorted(self.segments_, u)

    def _posterior_mode(self, X: np.ndarray, codes=None) -> np.ndarray:
        model = self.model_
        device = model.latents.mu.device
        Xw = self._whitened64(X, device)
        train = self._training_whitened(device).double()
        # Pairwise distances computed per pair (no matrix product), so that a row's nearest
        # training row does not depend on the rows it is batched with.
        nearest = torch.cat([torch.cdist(chunk, train,
                                         compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
                             for chunk in torch.split(Xw, 256)]) if Xw.shape[0] else \
            torch.zeros(0, dtype=torch.int64, device=device)
        z0 = model.latents.mu.detach()[nearest].double()
        frozen = types.SimpleNamespace(decoder=copy.deepcopy(model.decoder).double(),
                                       prior=copy.deepcopy(model.prior).double(),
                                       likelihood=copy.deepcopy(model.likelihood).double())
        ut = None if codes is None else torch.as_tensor(codes, dtype=torch.int64, device=device)
        with torch.enable_grad():
            z = posterior_mode(frozen, Xw, z0, self.transform_max_iter, u=ut)
        return z.cpu().numpy()

    def _flow_inverse(self, X: np.ndarray) -> np.ndarray:
        """h(x) of the flow decoder (a row's posterior at zero noise), in float64, row by row."""
        decoder = self.model_.decoder
        Xw = self._whitened64(X, self.model_.latents.mu.device)
        with torch.no_grad():
            return copy.deepcopy(decoder).double().inverse(Xw)[0].cpu().numpy()

    def _whitened64(self, X: np.ndarray, device) -> torch.Tensor:
        """(X - mean_) @ whitening_.T in float64, on ``device``."""
        return torch.as_tensor(
            (X.astype(np.float64) - self.mean_) @ self.whitening_.astype(np.float64).T,
            dtype=torch.float64, device=device)

    def _training_whitened(self, device):
        # Kept by fit for the MLP and residual decoders, and written to and read from files.
        return self._Xw_train.to(device)

    def inverse_transform(self, S):
        """Mixtures of sources S [m, K] -> X [m, n_features] (the decoder's mean)."""
        check_is_fitted(self)
        S = check_data(S, min_samples=1, name="S")
        if S.shape[1] != self.n_components_:
            raise ValueError(f"S must have {self.n_components_} columns (n_components_), "
                             f"got {S.shape[1]}")
        device = self.model_.latents.mu.device
        with torch.no_grad():
            Xw = self.model_.decode(torch.as_tensor(S, dtype=torch.float32, device=device))
        X = Xw.cpu().double().numpy() @ self.dewhitening_.astype(np.float64).T + self.mean_
        return X.astype(np.result_type(S.dtype, self.mean_.dtype), copy=False)

    @property
    def _n_features_out(self):
        return self.n_components_

    # ------------------------------------------------------------------ persistence
    def _file_params(self) -> dict:
        """The parameters as files hold them: plain Python values (see _plain)."""
        params = {k: _plain(v) for k, v in self.get_params(deep=False).items()}
        params["hidden"] = list(params["hidden"]) if not isinstance(params["hidden"], Integral) \
            else params["hidden"]
        if isinstance(params["noise"], (tuple, list)):
            params["noise"] = [float(x) for x in params["noise"]]
        if params["checkpoint_path"] is not None:
            params["checkpoint_path"] = os.fspath(params["checkpoint_path"])
        params["device"] = str(params["device"])
        if isinstance(params["random_state"], np.random.RandomState):
            params["random_state"] = _RANDOM_STATE_OBJECT
        return params

    def _payload(self, run: RunState) -> dict:
        fitted = {name: torch.from_numpy(np.asarray(getattr(self, name)))
                  for name in self._FITTED_ARRAYS if hasattr(self, name)}
        fitted["n_components_"] = self.n_components_
        fitted["n_features_in_"] = self.n_features_in_
        if hasattr(self, "_Xw_train"):
            fitted["Xw_train"] = self._Xw_train.cpu()
        if hasattr(self, "segments_"):
            fitted["segments"] = torch.from_numpy(np.asarray(self.segments_, dtype=np.int64))
        return {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION,
                "params": self._file_params(), "fitted": fitted, "run": run.to_dict()}

    def save(self, path) -> None:
        """Write the estimator (parameters, preprocessing, the run with model and optimizer
        states; an unfinished run included) to ``path`` atomically. A read-only file at ``path``
        is not replaced (PermissionError)."""
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
        if not isinstance(payload, dict) or payload.get("format") != RUN_FORMAT:
            raise ValueError(f"{path}: not a HalfVAEICA file")
        if payload.get("version") != RUN_FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported HalfVAEICA file version "
                             f"{payload.get('version')!r}")
        return payload

    @classmethod
    def load(cls, path, device=None) -> "HalfVAEICA":
        """Read a file written by :meth:`save` (or a checkpoint). A completed run comes back
        fitted; an unfinished one can be continued with ``fit(X, resume=True)``."""
        payload = cls._read_payload(path)
        params = dict(payload["params"])
        for name in ("hidden", "noise"):
            if isinstance(params.get(name), list):
                params[name] = tuple(params[name])
        if params.get("random_state") == _RANDOM_STATE_OBJECT:
            params["random_state"] = np.random.RandomState()
        if device is not None:
            params["device"] = device
        est = cls(**params)
        dev = est._check_params()
        fitted = payload["fitted"]
        for name in cls._FITTED_ARRAYS:
            if name in fitted:
                setattr(est, name, fitted[name].numpy())
        est.n_components_ = int(fitted["n_components_"])
        est.n_features_in_ = int(fitted["n_features_in_"])
        if "Xw_train" in fitted:
            est._Xw_train = fitted["Xw_train"]
        if "segments" in fitted:
            est.segments_ = fitted["segments"].numpy()
        est._run = RunState.from_dict(payload["run"])
        if est._run.diverged:  # a checkpoint written at the end of such a fit
            raise ValueError(f"{path}: nothing to load: {_DIVERGED}")
        if est._run.done:
            est._set_fitted(est._run, dev)
        return est
