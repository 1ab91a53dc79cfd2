"""The nonstationary simulations of the iVAE (Khemakhem et al. 2020) and ICE-BeeM papers: sources
whose distribution changes across segments u, mixed by an invertible MLP (:func:`make_nonstationary`,
:class:`NonstationaryMixer`). Returns :class:`~halfvae_ext.ica.data.ICAProblem` like the other
generators."""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from .data import DISTRIBUTIONS, ICAProblem, check_choice, check_int, check_real, make_rng

__all__ = ["make_nonstationary", "NonstationaryMixer", "nonstationary_cond_threshold"]

_MIXER_ACTIVATIONS = ("lrelu", "xtanh")
# Default slopes: leaky ReLU 0.2 (ICE-BeeM's and TCL's code; the iVAE code's default is 0.1),
# xtanh(x) = tanh(x) + 0.1 x (the iVAE code).
_DEFAULT_SLOPES = {"lrelu": 0.2, "xtanh": 0.1}
# Whose simulation make_nonstationary follows (see its docstring).
_NONSTATIONARY_BENCHMARKS = ("ivae", "icebeem")


@dataclass(eq=False)
class NonstationaryMixer:
    """The mixing MLP of the iVAE / ICE-BeeM benchmark, in their row-vector convention.

    ``matrices[i]``: [d, d]; ``mixer(S)`` computes ``H = S``, then for each layer
    ``H = H @ matrices[i]`` followed by the activation on every layer but the last (the iVAE
    code); with ``activation_first``, ``H = act(H) @ matrices[i]`` for every layer (ICE-BeeM's
    code: the activation acts on the sources first, none after the last matrix). Activation:
    "lrelu" (``x`` if x >= 0 else ``slope * x``) or "xtanh" (``tanh(x) + slope * x``). Both are
    strictly increasing (slope > 0), so with invertible matrices the map is a bijection and
    ``inverse`` undoes it.
    """

    matrices: tuple
    activation: str = "lrelu"
    slope: float = 0.2
    activation_first: bool = False

    def _act(self, H):
        if self.activation == "lrelu":
            return np.where(H >= 0, H, self.slope * H)
        return np.tanh(H) + self.slope * H

    def _act_inverse(self, Y):
        if self.activation == "lrelu":
            return np.where(Y >= 0, Y, Y / self.slope)
        # xtanh has no closed-form inverse. It is increasing with |tanh(x)| < 1, so the root of
        # tanh(x) + s x = y lies in [(y - 1) / s, (y + 1) / s]: bisection on that bracket, to the
        # last bit of the (width 2/s) interval after 64 halvings.
        lo, hi = (Y - 1.0) / self.slope, (Y + 1.0) / self.slope
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = np.tanh(mid) + self.slope * mid < Y
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def __call__(self, S: np.ndarray) -> np.ndarray:
        """S: [n, d] -> X: [n, d]."""
        H = np.asarray(S, dtype=np.float64)
        if self.activation_first:
            for A in self.matrices:
                H = self._act(H) @ A
            return H
        last = len(self.matrices) - 1
        for i, A in enumerate(self.matrices):
            H = H @ A
            if i < last:
                H = self._act(H)
        return H

    def inverse(self, X: np.ndarray) -> np.ndarray:
        """X: [n, d] -> S: [n, d], the inverse of ``__call__`` (up to rounding)."""
        H = np.asarray(X, dtype=np.float64)
        if self.activation_first:
            for A in reversed(self.matrices):
                H = self._act_inverse(np.linalg.solve(A.T, H.T).T)
            return H
        last = len(self.matrices) - 1
        for i in reversed(range(len(self.matrices))):
            if i < last:
                H = self._act_inverse(H)
            H = np.linalg.solve(self.matrices[i].T, H.T).T
        return H


def _unit_column_matrices(rng: np.random.Generator, d: int, count: int) -> np.ndarray:
    """[count, d, d] matrices with entries U(-1, 1), each column scaled to unit norm (the iVAE
    code's "uniform" mixing matrices)."""
    A = rng.uniform(-1.0, 1.0, size=(count, d, d))
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def nonstationary_cond_threshold(d: int, rng: np.random.Generator, n_draws: int = 10000) -> float:
    """The 25th percentile of the condition number of ``n_draws`` random unit-column d x d
    matrices: the iVAE code keeps only mixing matrices below it (the best-conditioned quarter),
    so that no layer makes two outputs nearly collinear."""
    return float(np.percentile(np.linalg.cond(_unit_column_matrices(rng, d, n_draws)), 25))


def _nonstationary_matrix(rng: np.random.Generator, d: int, threshold: float,
                          max_tries: int = 100000) -> np.ndarray:
    """A unit-column d x d matrix with cond <= threshold, redrawn until it is (a quarter of the
    draws pass, by the threshold's definition, so the loop is short)."""
    for _ in range(max_tries):
        A = _unit_column_matrices(rng, d, 1)[0]
        if np.linalg.cond(A) <= threshold:
            return A
    raise RuntimeError("could not draw a well-conditioned mixing matrix")  # pragma: no cover


def make_nonstationary(n_per_segment: int = 1000, n_segments: int = 40, n_sources: int = 5,
                       n_layers: int = 2, activation: str = "lrelu",
                       distribution: str = "gaussian", uncentered: bool = False,
                       slope: float | None = None, noise: float = 0.0, n_cond_draws: int = 10000,
                       benchmark: str = "ivae", random_state=None) -> ICAProblem:
    """The nonstationary nonlinear-ICA benchmark of the iVAE (Khemakhem et al. 2020) and ICE-BeeM
    (Khemakhem et al. 2020) code, written from its description.

    Sources: ``n_segments`` contiguous segments of ``n_per_segment`` rows. In segment j source i is
    ``m[j, i] + L[j, i] * e`` with ``e`` standard Gaussian (``distribution="gaussian"``) or
    Laplace of unit variance (``"laplace"``), the scale ``L[j, i] ~ U(0.5, 3)`` and the mean
    ``m[j, i] ~ U(-5, 5)`` when ``uncentered`` (else 0). Mixing: ``n_layers`` square matrices with
    entries U(-1, 1) and unit-norm columns, each redrawn until its condition number is below the
    25th percentile of ``n_cond_draws`` random draws of the same kind; between layers the
    activation ``"lrelu"`` (leaky ReLU, ``slope`` 0.2 by default) or ``"xtanh"``
    (tanh(x) + slope x, ``slope`` 0.1 by default), none after the last layer
    (:class:`NonstationaryMixer`, row convention ``X = act(S A_1) A_2 ...``). ``noise`` > 0 adds
    Gaussian noise of that std to X.

    Unlike the other generators the sources are *not* standardized: they are mixed as drawn, as in
    the iVAE code (with uncentered means, or the xtanh activation, the scale changes how nonlinear
    the mix is). MCC does not depend on a source's scale or offset.

    ``benchmark="icebeem"``: ICE-BeeM's simulation instead (its ``gen_TCL_data_ortho``, the data
    behind the figures its paper and repository report), an easier problem at the same
    ``n_layers``: the e's standardized over all rows, scales ``L ~ U(0.01, 3)``, means
    ``U(-3, 3)`` when ``uncentered``, and ``n_layers - 1`` layers each of the activation, then a
    random orthogonal matrix (Haar; condition number 1, no threshold), so ``n_layers=1`` is
    ``X = S`` and the first activation acts on the sources themselves
    (``NonstationaryMixer(activation_first=True)``). Its configuration: 5 sources, 20 segments,
    100-2000 points a segment, leaky ReLU 0.2, 2 or 4 layers, centered.

    Returns X, S [n_per_segment * n_segments, n_sources], A None, ``mixer`` (``mixer(S)`` is the
    noise-free X) and ``u`` [n] int64 segment labels 0 .. n_segments - 1 (non-decreasing).
    """
    n_per_segment = check_int("n_per_segment", n_per_segment, 1)
    n_segments = check_int("n_segments", n_segments, 1)
    n_sources = check_int("n_sources", n_sources, 1)
    n_layers = check_int("n_layers", n_layers, 1)
    activation = check_choice("activation", activation, _MIXER_ACTIVATIONS)
    distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
    if not isinstance(uncentered, (bool, np.bool_)):
        raise ValueError(f"uncentered must be a bool, got {uncentered!r}")
    if slope is None:
        slope = _DEFAULT_SLOPES[activation]
    # slope > 0 keeps every activation strictly increasing, hence the mixing invertible.
    slope = check_real("slope", slope, 0.0, np.inf, high_open=True)
    if slope == 0.0:
        raise ValueError("slope must be a real number > 0 (the mixing must stay invertible), "
                         "got 0.0")
    noise = check_real("noise", noise, 0.0, np.inf, high_open=True)
    n_cond_draws = check_int("n_cond_draws", n_cond_draws, 1)
    benchmark = check_choice("benchmark", benchmark, _NONSTATIONARY_BENCHMARKS)
    rng = make_rng(random_state)
    if benchmark == "icebeem":
        S, mixer, u = _icebeem_sources_and_mixer(rng, n_per_segment, n_segments, n_sources,
                                                 n_layers, activation, distribution, uncentered,
                                                 slope)
    else:
        S, mixer, u = _ivae_sources_and_mixer(rng, n_per_segment, n_segments, n_sources,
                                              n_layers, activation, distribution, uncentered,
                                              slope, n_cond_draws)
    X = mixer(S)
    if noise > 0:
        X = X + noise * rng.standard_normal(X.shape)
    name = f"nonstationary_{activation}{n_layers}" + ("_icebeem" if benchmark == "icebeem" else "")
    return ICAProblem(X=X, S=S, A=None, name=name, mixer=mixer, u=u)


def _ivae_sources_and_mixer(rng, n_per_segment, n_segments, n_sources, n_layers, activation,
                            distribution, uncentered, slope, n_cond_draws):
    """make_nonstationary(benchmark="ivae")'s sources S, mixer and labels u, arguments checked."""
    shape = (n_segments, n_sources)
    scales = rng.uniform(0.5, 3.0, size=shape)
    means = rng.uniform(-5.0, 5.0, size=shape) if uncentered else np.zeros(shape)
    u = np.repeat(np.arange(n_segments, dtype=np.int64), n_per_segment)
    n = u.shape[0]
    if distribution == "gaussian":
        e = rng.standard_normal((n, n_sources))
    else:  # Laplace with scale 1/sqrt(2) has unit variance, so L is the std in both cases
        e = rng.laplace(scale=1.0 / np.sqrt(2.0), size=(n, n_sources))
    S = means[u] + scales[u] * e
    threshold = nonstationary_cond_threshold(n_sources, rng, n_cond_draws)
    mixer = NonstationaryMixer(
        tuple(_nonstationary_matrix(rng, n_sources, threshold) for _ in range(n_layers)),
        activation, slope)
    return S, mixer, u


def _icebeem_sources_and_mixer(rng, n_per_segment, n_segments, n_sources, n_layers, activation,
                               distribution, uncentered, slope):
    """make_nonstationary(benchmark="icebeem")'s sources S, mixer and labels u, arguments
    checked."""
    from scipy.stats import ortho_group

    u = np.repeat(np.arange(n_segments, dtype=np.int64), n_per_segment)
    n = u.shape[0]
    e = rng.standard_normal((n, n_sources)) if distribution == "gaussian" else \
        rng.laplace(size=(n, n_sources))
    std = e.std(axis=0)
    e = (e - e.mean(axis=0)) / np.where(std > 0, std, 1.0)  # a single row stays 0
    shape = (n_segments, n_sources)
    scales = rng.uniform(0.01, 3.0, size=shape)
    means = rng.uniform(-3.0, 3.0, size=shape) if uncentered else np.zeros(shape)
    S = means[u] + scales[u] * e
    matrices = tuple(ortho_group.rvs(n_sources, random_state=rng) if n_sources > 1
                     else np.ones((1, 1)) for _ in range(n_layers - 1))
    return S, NonstationaryMixer(matrices, activation, slope, activation_first=True), u
