"""HalfVAEICA: independent component analysis with an encoder-free VAE, scikit-learn style.

The model (arXiv 2409.04140): every sample n owns a Gaussian posterior q(z_n) = N(mu_n, sigma_n^2)
(a trainable table, no encoder), each latent dimension has a trainable 1-D Gaussian-mixture prior,
and a decoder maps z to x with Gaussian observation noise. Training maximizes the ELBO.

The class is a thin layer over :mod:`.preprocessing` (input checks, whitening), :mod:`.recipe`
(the decoder family's model, start, schedule, epoch and final ELBO), :mod:`.restarts` (restarts
chosen by ELBO, as a resumable run), :mod:`.file_format` (the files) and
:mod:`.param_validation` (the parameter table). It adds fitting, the outputs and files.
"""
from __future__ import annotations

import os
import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data

from ..atomic_io import check_writable
from . import file_format
from .param_validation import (HALFVAEICA_PARAMETERS, InvalidParameterError, usable_device,
                               validate_parameters)
from .preprocessing import (Whitening, check_data, check_new_rows, check_u, fit_whitening,
                            run_fingerprint, segment_codes)
from .recipe import Recipe, elbo_change, restart_seeds, torch_threads
from .run_parameters import (ADDED_PARAMETER_DEFAULTS, recipe_for, recipe_from_parameters,
                             resolve_decoder, training_parameters)
from .restarts import RunState, run_restarts

__all__ = ["HalfVAEICA"]

# Below this many latent entries (n_samples * n_components) one CPU thread is faster: the steps are
# too small to split, and on a busy machine a waiting OpenMP team costs several times the work.
_SMALL_PROBLEM = 1 << 17
_DIVERGED = ("training diverged in every restart (non-finite ELBO); try a smaller learning_rate "
             "or table_learning_rate")

class HalfVAEICA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Independent component analysis with an encoder-free VAE (Half-VAE).

    A drop-in for scikit-learn's FastICA (``fit``, ``transform``, ``fit_transform``,
    ``inverse_transform``, ``mixing_``, ``components_``, ``n_iter_``), with the trained posterior
    means of the training rows in ``posterior_means_``.

    ``fit(X, u=u)``: with segment labels u (one integer per row) the prior is conditional,
    p(z | u) = prod_k p_{u,k}(z_k), one Gaussian mixture per segment and latent dimension
    (``n_mixture`` components each): sources whose distribution changes across segments are then
    identifiable under nonlinear mixing. ``transform(X, u=u)`` takes the new rows' segments,
    which must be among those seen in fit (``segments_``).

    Parameters
    ----------
    n_components : int or None
        Number of sources K (None: the number of features). Above the rank of the centered X it
        is reduced to the rank, with a UserWarning.
    n_mixture : int in [1, 64]
        Components C of each latent dimension's Gaussian-mixture prior.
    decoder : {"auto", "linear", "mlp", "residual", "flow"}
        "linear": x = W z (linear ICA). "mlp": an MLP. "residual": x = W z + mlp(z), the MLP's
        output layer started at zero, so that training starts from the linear model and learns
        a nonlinear correction. "flow": an invertible decoder
        (:class:`~halfvae_ext.models.FlowDecoder`; X whitened to K dimensions): a row's
        posterior at zero noise is the point h(x_n), h the decoder's inverse, so the table is
        held there and the fit maximizes the exact log-likelihood log p(h(x) | u) +
        log|det dh/dx| (``noise``, ``kl``, ``prior_warmup`` and ``table_learning_rate`` do not
        apply; mini-batches of 1000 rows unless ``batch_size`` says otherwise); ``transform`` is
        h. "auto" (the default), with u: the flow against the linear flow (h(x) = W x + b), each
        trained on 90% of the rows and kept by the other 10%'s likelihood (``decoder_``: "flow"
        or "linear_flow"); without u: "linear".
    hidden, activation : widths and activation of the MLPs (decoders "mlp", "residual", "flow").
    noise : "learned", float or (start, end)
        Observation noise: a learned per-feature variance; a fixed std (in whitened units); or a
        schedule of fixed stds, ``start`` for the first half of the epochs, then falling
        geometrically to ``end`` at the last epoch.
    whiten : {"pca", "standardize", False}
        "pca": center and PCA-whiten (to K dimensions for the linear and flow decoders, to all
        nondegenerate dimensions for the others); "standardize": center and scale each feature;
        False: center only.
    init : {"pca", "random", "fastica"}
        Latent means at the start: the whitened PCA scores (randomly rotated for restarts >= 1),
        random normals, or scikit-learn's FastICA sources (an opt-in warm start).
    max_iter : int or "auto"
        Training epochs per restart (full passes over the data; one step each when
        full-batch; an EM iteration with solver "em"). "auto": 1500; 1000 for EM, whose restarts
        stop once the ELBO per sample rises by less than 5e-4 nats an iteration; 200 for the
        flow decoder (each of its epochs is many mini-batch steps).
    batch_size : int or None
        None (or at least n_samples): full batch. Else mini-batches (the table then uses sparse
        gradients and SparseAdam, so rows outside a batch are not moved by stale momentum).
    table_optimizer : {"torch", "fused", "rowwise_adam", "rowwise_adam_bf16", "rowwise_adagrad"}
        How the latent table is optimized. "torch": torch.optim.Adam (full batch) or SparseAdam
        (mini-batches). The others step the touched rows inside the backward
        (:class:`~halfvae_ext.LatentTable`'s ``fused_optimizer``; no table gradient is created,
        a step costs O(batch_size)): "fused" exact Adam, "rowwise_adam" FBGEMM's row-wise Adam,
        "rowwise_adam_bf16" the same with bfloat16 first moments, "rowwise_adagrad" row-wise
        Adagrad.
    learning_rate, table_learning_rate : float
        Adam learning rates of the decoder, noise and prior, and of the latent table.
    prior_warmup : float in [0, 1)
        Fraction of each restart's epochs during which the prior's component means and weights
        stay at their initialization (the variances learn).
    lr_decay : float in [0, 1]
        Fraction of each restart's epochs, at the end, over which the learning rates decay to 1%
        along a half cosine (constant before).
    n_restarts : int or "auto"
        Independent restarts; the one with the best final ELBO is kept. "auto": 4; 2 for EM;
        1 for the flow; 2 for "auto" with u (restart 1 the linear flow).
    n_eval_samples : int
        Monte-Carlo draws of the final ELBO that compares restarts.
    kl : {"mc", "bound"}
        KL term of the ELBO: the one-draw Monte-Carlo estimate (with solver "em": its
        expectation, the KL itself, by Gauss-Hermite quadrature), or the closed-form upper bound
        of the KL to a mixture (no sampling noise in the KL; the ELBO stays a lower bound).
    solver : {"auto", "em", "adam"}
        How the linear decoder is fitted. "em": variational EM (:mod:`.em_recipe`; rows,
        prior, W and noise in closed form plus a Newton step in the unmixing; full batch,
        diagonal posterior; tens of times faster). "adam": gradient steps (every decoder).
        "auto": "em" for the linear decoder unless mini-batches, a fused ``table_optimizer``, a
        full posterior or a noise schedule ask for "adam"; "adam" for the others.
    posterior_covariance : {"diagonal", "full"}
        Each row's posterior: mean-field, or a full covariance (a Cholesky factor per row; not
        with a fused ``table_optimizer`` nor the flow decoder). With u, ``n_mixture=1`` and
        "full" the latents are also realigned during a fit (:mod:`halfvae_ext.ica.realign`).
    transform_max_iter : int
        Adam steps of the posterior-mode search in :meth:`transform` (MLP and residual decoders).
    tol : float or None
        Convergence threshold, in nats per sample per epoch: a fit warns (ConvergenceWarning)
        when the ELBO per sample of the kept restart still changes faster than that at the end
        (|mean over the last tenth of its epochs - mean over the tenth before| / the number of
        epochs in a tenth). None: never warn.
    checkpoint_path : path or None
        Where to write checkpoints (atomically); ``fit(X, resume=True)`` resumes from it. A fit
        without ``resume`` refuses to replace a file there (FileExistsError).
    checkpoint_every : int or None
        Write a checkpoint every that many epochs (and when a restart ends or a fit stops).
    random_state : int, numpy RandomState or None
        Seed of everything random. A non-negative int of any size gives the same fit every time;
        a RandomState gives one draw of entropy (each fit advances it, as in scikit-learn); None
        fresh entropy.
    device : str or torch.device
        Must be usable here (a CUDA device needs torch.cuda.is_available()).
    n_threads : int or None
        CPU threads while fitting and transforming (None: one for n_samples * n_components <
        131072, else torch's setting). Results do not depend on it.
    verbose : bool
        Show a tqdm progress bar.

    Attributes
    ----------
    n_components_, n_features_in_ : int
    decoder_ : str
        The decoder the fit used ("auto" resolved).
    mean_ [n_features], whitening_ [d, n_features], dewhitening_ [n_features, d] : ndarray
        Preprocessing: X_white = (X - mean_) @ whitening_.T.
    mixing_ : ndarray [n_features, n_components]  (linear decoder only)
        X ~= S @ mixing_.T + mean_.
    components_ : ndarray [n_components, n_features]  (linear decoder only)
        The pseudo-inverse of ``mixing_``: transform(X) = (X - mean_) @ components_.T.
    posterior_means_ : ndarray [n_samples, n_components]
        The trained latent means of the training rows (the posterior means, shrunk by the prior).
    segments_ : ndarray [n_segments] int64  (only when fitted with u)
        The sorted distinct segment labels of u; the prior has one mixture per label.
    elbo_ : float
        Final ELBO per sample of the kept restart (nats, in the whitened space); the flow: its
        exact log-likelihood per sample ("auto" with u: of the held-out rows).
    elbo_history_ : ndarray [n_iter_]
        ELBO per sample at every epoch of the kept restart (one-draw estimates; the flow: the
        mean log-likelihood of the epoch's mini-batches).
    n_iter_, best_restart_ : int;  restart_elbos_ : ndarray [n_restarts]
    model_ : HalfVAE
        The trained model of the kept restart (on ``device``).

    The arrays are float32 for float32 X, else float64; transform and inverse_transform return
    float32 only when both their input and the fit were float32 (as FastICA).

    Raises
    ------
    InvalidParameterError (a ValueError) naming the parameter, ValueError naming X or u for bad
    data, FileExistsError for a checkpoint a fit would replace.

    Examples
    --------
    >>> from halfvae_ext.ica import HalfVAEICA, make_paper_linear
    >>> P = make_paper_linear(2000, random_state=0)
    >>> S = HalfVAEICA(3, random_state=0).fit_transform(P.X)    # [2000, 3]
    >>> est = HalfVAEICA(5, random_state=0).fit(X, u=u)          # u: [n] segment labels
    >>> S_new = est.transform(X_new, u=u_new)
    """

    _hyperparameter_table = HALFVAEICA_PARAMETERS

    def __init__(self, n_components=None, *, n_mixture=3, decoder="auto", hidden=(32,),
                 activation="leaky_relu", noise="learned", whiten="pca", init="pca", max_iter="auto",
                 batch_size=None, table_optimizer="torch", learning_rate=0.01,
                 table_learning_rate=0.05,
                 prior_warmup=0.3, lr_decay=0.3, n_restarts="auto", n_eval_samples=8, kl="mc",
                 posterior_covariance="diagonal", solver="auto", transform_max_iter=300, tol=0.01,
                 checkpoint_path=None, checkpoint_every=None, random_state=None,
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
        self.solver = solver
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

    def _check_params(self, with_u: bool = False) -> torch.device:
        """Validate the parameters against the table and the decoder family (for a fit with or
        without u); return the device."""
        self._validate_params()
        if self.checkpoint_every is not None and self.checkpoint_path is None:
            raise InvalidParameterError("checkpoint_every needs a checkpoint_path")
        decoder = resolve_decoder(self.decoder, with_u, self.get_params(deep=False))
        recipe_for(decoder).check_parameters(self.table_optimizer, self.posterior_covariance)
        return usable_device(self.device)

    def _run_to_resume(self):
        run = getattr(self, "_run", None)
        if run is None and self.checkpoint_path is not None \
                and os.path.exists(self.checkpoint_path):
            run = RunState.from_dict(file_format.read(self.checkpoint_path)["run"])
        # A run whose every restart diverged has nothing to continue: resume starts afresh.
        return None if run is not None and run.diverged else run

    def _check_resumable(self, run: RunState, X: np.ndarray, segments, codes,
                         decoder: str) -> None:
        if run.fingerprint != run_fingerprint(X, segments, codes):
            raise ValueError("cannot resume: X (or u) is not the data of the run being resumed")
        mine = training_parameters(self.get_params(deep=False), decoder)
        theirs = {**ADDED_PARAMETER_DEFAULTS, **run.params}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError("cannot resume: these training parameters differ from the run's: "
                             + ", ".join(diff))

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None, *, u=None, resume=False, stop_after=None):
        """Fit the model to X [n_samples, n_features]; returns self.

        u: None, or the segment label (an integer) of every row, [n_samples]: the prior is then
        conditional, one mixture per distinct label (``segments_``) and latent dimension, each
        started at the mean and variance of its segment's starting latent means. y is ignored
        (scikit-learn's signature), so pass u by name.

        resume: continue the unfinished run held by this estimator (a fit stopped by
        ``stop_after``, or one restored by :meth:`load`) or, if none (e.g. after a fit was
        interrupted by an exception), the checkpoint at ``checkpoint_path``; X, u and the training
        parameters must be those of that run. The result is identical to an uninterrupted fit.
        Without a run to continue, a fresh fit starts.
        stop_after: stop after that many epochs (counted over all restarts) in this call; the run
        stays resumable and the estimator is not fitted until the run completes.

        Everything is checked (parameters, device, X, u, the run to resume, that checkpoint_path
        can be written and holds no file a fresh fit would replace) before any fitted state
        changes: a refused fit leaves the estimator and its files as they were.
        """
        device = self._check_params(with_u=u is not None)
        if stop_after is not None and (isinstance(stop_after, bool)
                                       or not isinstance(stop_after, Integral) or stop_after < 0):
            raise ValueError(f"stop_after must be None or a non-negative integer, got {stop_after!r}")
        Xa = check_data(X)
        segments, codes = (None, None) if u is None else \
            np.unique(check_u(u, Xa.shape[0]), return_inverse=True)
        decoder = resolve_decoder(self.decoder, u is not None, self.get_params(deep=False),
                                  n_rows=Xa.shape[0])
        traits = recipe_for(decoder)
        whitening, Xw_np = fit_whitening(Xa, self.n_components, self.whiten,
                                         keep_all_dims=traits.whitens_all_dimensions)
        run = self._run_to_resume() if resume else None
        if run is not None:
            self._check_resumable(run, Xa, segments, codes, decoder)
        if self.checkpoint_path is not None:
            check_writable(self.checkpoint_path)
            if run is None:
                file_format.refuse_to_replace(self.checkpoint_path, resume)

        validate_data(self, Xa if isinstance(X, torch.Tensor) else X, reset=True,
                      skip_check_array=True)
        self._clear_fitted()
        self._set_preprocessing(whitening, Xa.dtype)
        if segments is not None:
            self.segments_ = segments.astype(np.int64)
        if run is None:
            params = training_parameters(self.get_params(deep=False), decoder)
            run = RunState(params, run_fingerprint(Xa, segments, codes),
                           restart_seeds(self.random_state, params["n_restarts"]))
        self._run = run
        Xw = torch.as_tensor(Xw_np, dtype=torch.float32, device=device).contiguous()
        ut = None if codes is None else \
            torch.as_tensor(codes.reshape(-1), dtype=torch.int64, device=device)
        if traits.transform_kind == "posterior_mode":  # transform() starts new rows at their
            self._Xw_train = Xw.detach().cpu()         # nearest training row
        recipe = recipe_from_parameters(run.params, self.n_components_,
                                        len(getattr(self, "segments_", ())) or 1)
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
        bar = progress = checkpoint = None
        if self.verbose:
            from tqdm.auto import tqdm
            total = run.n_restarts * recipe.max_iter
            bar = tqdm(total=total, initial=min(run.restart * recipe.max_iter + run.epoch, total),
                       desc="HalfVAEICA", unit="epoch", dynamic_ncols=True)

            def progress(state, elbo):
                bar.update(1)
                bar.set_postfix(restart=state.restart, elbo=f"{elbo:.4f}")
        if self.checkpoint_path is not None:
            def checkpoint(state):
                self._write(state, self.checkpoint_path)
        try:
            run_restarts(run, recipe, Xw, device, stop_after=stop_after,
                         checkpoint=checkpoint,
                         checkpoint_every=self.checkpoint_every, progress=progress, u=u)
        finally:
            if bar is not None:
                bar.close()

    _FITTED_ATTRS = ("model_", "best_restart_", "elbo_", "elbo_history_", "n_iter_",
                     "restart_elbos_", "mixing_", "components_", "posterior_means_", "_Xw_train",
                     "segments_", "decoder_")
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
        recipe = recipe_from_parameters(run.params, self.n_components_,
                                        len(getattr(self, "segments_", ())) or 1
                                        ).of_restart(best.restart)
        model = recipe.build_model(best.snapshot.model["latents.mu"].shape[0],
                                   self.dewhitening_.shape[1], device)
        model.load_state_dict(best.snapshot.model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model_ = model
        self.decoder_ = recipe.fitted_name
        self._fit_recipe = recipe
        self.best_restart_ = int(best.restart)
        self.elbo_ = float(best.elbo)
        self.elbo_history_ = np.asarray(best.snapshot.history, dtype=np.float64)
        self.n_iter_ = int(best.n_iter)
        self.restart_elbos_ = np.asarray([f.elbo for f in run.finished], dtype=np.float64)
        self.posterior_means_ = model.latents.mu.detach().cpu().double().numpy().astype(dtype)
        W = recipe.linear_part(model)
        if W is not None:
            mixing = self.dewhitening_.astype(np.float64) @ W.detach().cpu().double().numpy()
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

    def transform(self, X, u=None):
        """Sources of rows X [m, n_features] -> [m, K], each row's from that row alone (the
        same call gives the same bits; other batches agree to floating-point accuracy).

        Linear decoder: (X - mean_) @ components_.T, as FastICA. Flow decoder: h(X), the
        decoder's inverse (a row's posterior at zero noise), in float64. MLP and residual
        decoders: the posterior mode argmax_z log p(x | z) + log p(z) with the trained decoder,
        noise and prior, found by ``transform_max_iter`` Adam steps in float64 from the posterior
        mean of the nearest training row. The output dtype follows FastICA's rule.

        u: the segment label of every row [m], for an estimator fitted with u; each label must
        be one seen in fit (``segments_``). Required for the MLP and residual decoders (the
        posterior mode uses each row's segment prior); optional, and checked, for the others.
        """
        check_is_fitted(self)
        X = check_new_rows(self, X)
        codes = segment_codes(u, X.shape[0], getattr(self, "segments_", None))
        kind = self._fit_recipe.transform_kind
        if kind == "unmixing":
            return (X - self.mean_) @ self.components_.T
        if codes is None and hasattr(self, "segments_") and kind == "posterior_mode":
            raise ValueError(f"u is required: the estimator was fitted with u "
                             f"({len(self.segments_)} segments) and its {self.decoder_} "
                             "decoder's transform uses each row's segment prior; pass u=the "
                             "rows' segments")
        device = self.model_.latents.mu.device
        ut = None if codes is None else torch.as_tensor(codes, dtype=torch.int64, device=device)
        train = getattr(self, "_Xw_train", None)  # kept for the posterior-mode start
        with torch_threads(self._threads(X.shape[0])):
            S = self._fit_recipe.sources(self.model_, self._whitened64(X, device),
                                         None if train is None else train.to(device),
                                         self.transform_max_iter, ut)
        return S.astype(np.result_type(X.dtype, self.mean_.dtype), copy=False)

    def _whitened64(self, X: np.ndarray, device) -> torch.Tensor:
        """(X - mean_) @ whitening_.T in float64, on ``device``."""
        return torch.as_tensor(
            (X.astype(np.float64) - self.mean_) @ self.whitening_.astype(np.float64).T,
            dtype=torch.float64, device=device)

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
    def _write(self, run: RunState, path) -> None:
        fitted = {name: torch.from_numpy(np.asarray(getattr(self, name)))
                  for name in self._FITTED_ARRAYS if hasattr(self, name)}
        fitted["n_components_"] = self.n_components_
        fitted["n_features_in_"] = self.n_features_in_
        if hasattr(self, "_Xw_train"):
            fitted["Xw_train"] = self._Xw_train.cpu()
        if hasattr(self, "segments_"):
            fitted["segments"] = torch.from_numpy(np.asarray(self.segments_, dtype=np.int64))
        file_format.write(path, file_format.file_params(self.get_params(deep=False)), fitted,
                          run.to_dict())

    def save(self, path) -> None:
        """Write the estimator (parameters, preprocessing, the run with model and optimizer
        states; an unfinished run included) to ``path`` atomically, with a checksum. A
        read-only file at ``path`` is not replaced (PermissionError)."""
        run = getattr(self, "_run", None)
        if run is None:
            raise ValueError("nothing to save: call fit first")
        self._write(run, path)

    @classmethod
    def load(cls, path, device=None) -> "HalfVAEICA":
        """Read a file written by :meth:`save` (or a checkpoint). A completed run comes back
        fitted; an unfinished one can be continued with ``fit(X, resume=True)``. ValueError
        naming ``path`` for a file that is not such a file or is damaged."""
        payload = file_format.read(path)
        params = file_format.estimator_params(payload["params"])
        params.setdefault("solver", ADDED_PARAMETER_DEFAULTS["solver"])  # files from before EM
        if device is not None:
            params["device"] = device
        est = cls(**params)
        fitted = payload["fitted"]
        dev = est._check_params(with_u="segments" in fitted)
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
