"""Synthetic ICA problems with known sources and mixing, for testing and benchmarking Half-VAE.

Every generator takes ``n_samples`` and ``random_state`` (an int seed, a ``np.random.Generator`` or
None) and returns an :class:`ICAProblem`:

- ``X``: [n_samples, n_observed] observed mixtures,
- ``S``: [n_samples, n_sources] true sources, each column standardized (zero mean, unit variance;
  except :func:`make_nonstationary`, which returns the raw sources of the iVAE code),
- ``A``: [n_observed, n_sources] mixing matrix (linear problems, ``X = S @ A.T`` up to noise) or None,
- ``mixer``: the nonlinear map with ``X = mixer(S)`` (nonlinear problems) or None,
- ``u``: [n_samples] auxiliary segment labels (piecewise-stationary problem) or None.

The nonstationary simulations of the iVAE and ICE-BeeM papers are :mod:`.nonstationary_data`.

The mixtures are always computed from the *returned* (standardized) sources, so the identities above
hold exactly, not only up to a rescaling.

All randomness comes from one ``np.random.Generator``, so the same ``random_state`` gives the same
problem bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Optional

import numpy as np
from scipy import signal

__all__ = [
    "ICAProblem",
    "LeakyReLUMLP",
    "make_paper_linear",
    "make_linear",
    "make_nonlinear",
    "make_piecewise_stationary",
    "make_underdetermined",
    "make_sample_images",
    "make_eeg_like",
]

# Slope of the negative part of the mixing MLPs' leaky ReLU: nonzero, so each layer is invertible.
LEAKY_SLOPE = 0.2
# Largest condition number allowed for square mixing / weight matrices: keeps the problems
# identifiable in practice (an ill-conditioned mix makes two observations nearly collinear).
MAX_COND = 10.0
_SOURCE_KINDS = ("laplace", "uniform", "mixed", "assorted")
# Source distributions of the segment-wise simulations (each segment rescales them).
DISTRIBUTIONS = ("laplace", "gaussian")
# "assorted" cycles these over the columns: the kinds a user's recording mixes together.
_ASSORTED_KINDS = ("laplace", "uniform", "bimodal", "periodic")


@dataclass(eq=False)  # eq=False: element-wise array comparison makes a generated __eq__ useless
class ICAProblem:
    """One synthetic ICA problem; see the module docstring for the fields' shapes."""

    X: np.ndarray
    S: np.ndarray
    A: Optional[np.ndarray]
    name: str
    mixer: Optional[Callable[[np.ndarray], np.ndarray]] = None
    u: Optional[np.ndarray] = None
    image_shape: Optional[tuple] = None  # (height, width) when each source is an image
    noise_var: Optional[np.ndarray] = None  # [n_observed] variance of the added sensor noise

    @property
    def n_samples(self) -> int:
        return self.X.shape[0]

    @property
    def n_observed(self) -> int:
        return self.X.shape[1]

    @property
    def n_sources(self) -> int:
        return self.S.shape[1]


@dataclass(eq=False)
class LeakyReLUMLP:
    """Invertible MLP mixer: square weights, leaky ReLU *between* layers (none after the last).

    ``weights[i]``: [d, d]. ``mixer(S)`` maps [n, d] sources to [n, d] mixtures,
    ``x = W_L (g(W_{L-1} ... g(W_1 s)))`` with ``g`` the leaky ReLU; one layer is a plain linear mix.
    Square invertible weights and a nonzero slope make the map a bijection, so the sources are
    recoverable in principle; ``inverse`` undoes it exactly.
    """

    weights: tuple
    slope: float = LEAKY_SLOPE

    def __call__(self, S: np.ndarray) -> np.ndarray:
        """S: [n, d] -> X: [n, d]."""
        H = np.asarray(S, dtype=np.float64)
        for i, W in enumerate(self.weights):
            if i > 0:
                H = np.where(H >= 0, H, self.slope * H)
            H = H @ W.T
        return H

    def inverse(self, X: np.ndarray) -> np.ndarray:
        """X: [n, d] -> S: [n, d], the exact inverse of ``__call__`` (up to rounding)."""
        H = np.asarray(X, dtype=np.float64)
        for i in reversed(range(len(self.weights))):
            H = np.linalg.solve(self.weights[i], H.T).T
            if i > 0:
                # The leaky ReLU preserves signs, so the sign of the output picks the branch.
                H = np.where(H >= 0, H, H / self.slope)
        return H


# ----------------------------------------------------------------------------- argument checks


def check_int(name: str, value, minimum: int) -> int:
    # bool is an Integral, but n_samples=True is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value, low: float, high: float, high_open: bool) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be a real number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def make_rng(random_state) -> np.random.Generator:
    """An int seed, a Generator (used as is, so the caller's stream advances) or None (fresh)."""
    if random_state is None or isinstance(random_state, np.random.Generator):
        return np.random.default_rng(random_state)
    if isinstance(random_state, Integral) and not isinstance(random_state, bool) and random_state >= 0:
        return np.random.default_rng(int(random_state))
    raise ValueError(
        "random_state must be None, a non-negative integer or a numpy.random.Generator, "
        f"got {random_state!r}"
    )


# ----------------------------------------------------------------------------- building blocks


def _standardize(S: np.ndarray) -> np.ndarray:
    """Columns of S [n, k] to zero mean and unit (population) variance."""
    S = S - S.mean(axis=0)
    std = S.std(axis=0)
    if np.any(std == 0):  # the generators guarantee non-constant sources; this is a safety net
        raise RuntimeError(f"constant source column(s) {np.flatnonzero(std == 0).tolist()}")
    return S / std


def _add_relative_noise(X: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """X plus Gaussian noise of std ``noise`` times each column's std (a noise-to-signal ratio).
    Drawn last, after the sources and the mix, so a seed gives the same S and A with or without
    noise."""
    if noise > 0:
        X = X + noise * X.std(axis=0) * rng.standard_normal(X.shape)
    return X


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    """A Haar-random d x d orthogonal matrix."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    # Without this sign fix QR's output is not uniformly distributed over the orthogonal group.
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _well_conditioned(rng: np.random.Generator, d: int, max_cond: float = MAX_COND) -> np.ndarray:
    """A random d x d matrix U diag(s) V^T with cond <= max_cond and singular values around 1.

    Built from its SVD rather than drawn and rejected: a Gaussian d x d matrix has a condition number
    of order d, so rejection would loop for long at large d.
    """
    half = 0.5 * np.log(max_cond)
    s = np.exp(rng.uniform(-half, half, size=d))  # in [1/sqrt(c), sqrt(c)], so cond <= c
    return (_orthogonal(rng, d) * s) @ _orthogonal(rng, d).T


def _leaky_mlp(rng: np.random.Generator, d: int, n_layers: int) -> LeakyReLUMLP:
    return LeakyReLUMLP(tuple(_well_conditioned(rng, d) for _ in range(n_layers)))


def _paper_sources(n_samples: int, n_sources: int, rng: np.random.Generator) -> np.ndarray:
    """[n_samples, n_sources] raw sources: sine, square, sawtooth over t in [0, 8], then Laplace.

    The three periodic signals follow the Half-VAE paper's (and scikit-learn's FastICA) example.
    The sawtooth runs at 0.9 cycles per unit time rather than 1 so that no grid of n_samples >= 2
    points on [0, 8] samples it at a single phase (at 1 cycle, t = 0, 4, 8 would all give -1).
    """
    t = np.linspace(0.0, 8.0, n_samples)
    periodic = [np.sin(2 * t), np.sign(np.sin(3 * t)), signal.sawtooth(2 * np.pi * 0.9 * t)]
    cols = periodic[:n_sources]
    # Extra sources are i.i.d. Laplace: non-Gaussian, so still identifiable.
    cols += [rng.laplace(size=n_samples) for _ in range(n_sources - len(cols))]
    return np.stack(cols, axis=1)


def _paper_mixing(rng: np.random.Generator, max_tries: int = 1000) -> np.ndarray:
    """3 x 3 mixing with entries uniform in [0.5, 2], redrawn until cond <= MAX_COND.

    All-positive entries like the paper's example; about one draw in five passes, so the loop is short.
    """
    for _ in range(max_tries):
        A = rng.uniform(0.5, 2.0, size=(3, 3))
        if np.linalg.cond(A) <= MAX_COND:
            return A
    raise RuntimeError("could not draw a well-conditioned 3 x 3 mixing matrix")  # pragma: no cover


def _iid_source(rng: np.random.Generator, kind: str, n_samples: int) -> np.ndarray:
    if kind == "laplace":  # super-Gaussian (excess kurtosis 3)
        return rng.laplace(size=n_samples)
    if kind == "uniform":  # sub-Gaussian (excess kurtosis -1.2)
        return rng.uniform(-1.0, 1.0, size=n_samples)
    if kind == "bimodal":  # two well-separated modes at +-1 (excess kurtosis about -1.7)
        return rng.choice([-1.0, 1.0], size=n_samples) + 0.25 * rng.standard_normal(n_samples)
    if kind == "periodic":  # a sine of 3-15 cycles over the record at a random phase
        t = np.arange(n_samples) / n_samples
        return np.sin(2 * np.pi * rng.uniform(3.0, 15.0) * t + rng.uniform(0.0, 2 * np.pi))
    return rng.exponential(size=n_samples)  # skewed: non-Gaussian through the third moment


# ----------------------------------------------------------------------------- generators


def make_paper_linear(n_samples: int = 5000, noise: float = 0.0, random_state=None) -> ICAProblem:
    """The Half-VAE paper's linear problem: sine, square and sawtooth sources, a random 3 x 3 mix.

    Returns X [n_samples, 3], S [n_samples, 3], A [3, 3] with ``X = S @ A.T + noise_term``; A's
    entries are uniform in [0.5, 2] and cond(A) <= 10. ``noise`` >= 0 adds Gaussian noise whose std
    is ``noise`` times each clean mixture's std (so it is a noise-to-signal ratio).
    """
    n_samples = check_int("n_samples", n_samples, 2)
    noise = check_real("noise", noise, 0.0, np.inf, high_open=True)
    rng = make_rng(random_state)
    S = _standardize(_paper_sources(n_samples, 3, rng))
    A = _paper_mixing(rng)
    return ICAProblem(X=_add_relative_noise(S @ A.T, noise, rng), S=S, A=A, name="paper_linear")


def make_linear(n_samples: int = 5000, n_sources: int = 3, source: str = "laplace",
                noise: float = 0.0, random_state=None) -> ICAProblem:
    """Square linear ICA with i.i.d. non-Gaussian sources.

    ``source``: "laplace", "uniform", "mixed" (cycles Laplace, uniform, exponential over the
    columns) or "assorted" (cycles Laplace, uniform, bimodal (+-1 plus N(0, 0.25^2)) and periodic
    (a sine of 3-15 cycles over the record, random phase)). Returns X [n_samples, n_sources],
    S [n_samples, n_sources], A [n_sources, n_sources] with ``X = S @ A.T + noise_term`` and
    cond(A) <= 10. ``noise`` >= 0 adds Gaussian noise whose std is ``noise`` times each clean
    mixture's std (drawn after A: the same seed gives the same S and A with or without noise).
    """
    n_samples = check_int("n_samples", n_samples, 2)
    n_sources = check_int("n_sources", n_sources, 1)
    source = check_choice("source", source, _SOURCE_KINDS)
    noise = check_real("noise", noise, 0.0, np.inf, high_open=True)
    rng = make_rng(random_state)
    if source == "mixed":
        kinds = [("laplace", "uniform", "exponential")[j % 3] for j in range(n_sources)]
    elif source == "assorted":
        kinds = [_ASSORTED_KINDS[j % len(_ASSORTED_KINDS)] for j in range(n_sources)]
    else:
        kinds = [source] * n_sources
    S = _standardize(np.stack([_iid_source(rng, k, n_samples) for k in kinds], axis=1))
    A = _well_conditioned(rng, n_sources)
    name = f"linear_{source}" + (f"_noise{noise:g}" if noise > 0 else "")
    return ICAProblem(X=_add_relative_noise(S @ A.T, noise, rng), S=S, A=A, name=name)


def make_nonlinear(n_samples: int = 5000, n_sources: int = 3, n_layers: int = 2,
                   random_state=None) -> ICAProblem:
    """Paper-style sources through a random invertible leaky-ReLU MLP.

    Sources as in :func:`make_paper_linear` (sine, square, sawtooth; i.i.d. Laplace beyond three).
    The mixer is ``x = W_L g(... g(W_1 s))`` with ``n_layers`` >= 2 square, well-conditioned
    (cond <= 10) weights and ``g`` the leaky ReLU of slope 0.2. The hidden width equals
    ``n_sources`` on purpose: square layers and a nonzero slope make the map a bijection (a wider
    hidden layer would not be invertible as a map onto the observations).
    Returns X [n_samples, n_sources], S [n_samples, n_sources], A None and
    ``mixer`` (a :class:`LeakyReLUMLP`, with ``mixer(S) == X`` and ``mixer.inverse(X) ~= S``).
    """
    n_samples = check_int("n_samples", n_samples, 2)
    n_sources = check_int("n_sources", n_sources, 1)
    n_layers = check_int("n_layers", n_layers, 2)
    rng = make_rng(random_state)
    S = _standardize(_paper_sources(n_samples, n_sources, rng))
    mixer = _leaky_mlp(rng, n_sources, n_layers)
    return ICAProblem(X=mixer(S), S=S, A=None, name="nonlinear", mixer=mixer)


def make_piecewise_stationary(n_samples: int = 5000, n_sources: int = 3, n_segments: int = 10,
                              n_layers: int = 2, distribution: str = "laplace", means: bool = False,
                              random_state=None) -> ICAProblem:
    """Nonstationary nonlinear ICA (TCL, Hyvarinen & Morioka 2016; iVAE, Khemakhem et al. 2020).

    The samples are cut into ``n_segments`` contiguous, near-equal segments. In segment ``j`` source
    ``i`` is Laplace (or Gaussian, ``distribution="gaussian"``) with scale ``exp(U(log 0.1, 0))``
    drawn per (segment, source), and with mean ``U(-1, 1)`` when ``means`` is true; the changing
    scales are what make the nonlinear mix identifiable. The sources are then standardized over all
    samples and mixed by a :class:`LeakyReLUMLP` of ``n_layers`` square, well-conditioned layers
    (``n_layers=1``: a linear mix).
    Returns X, S [n_samples, n_sources], A None, ``mixer``, and ``u`` [n_samples] int64 segment
    labels 0 .. n_segments-1 (non-decreasing).

    This is a smaller, standardized variant; :func:`make_nonstationary` is the benchmark of the
    iVAE / ICE-BeeM papers (scales U(0.5, 3), their mixing matrices), for comparisons with them.
    """
    n_samples = check_int("n_samples", n_samples, 2)
    n_sources = check_int("n_sources", n_sources, 1)
    n_segments = check_int("n_segments", n_segments, 1)
    if n_segments > n_samples:
        raise ValueError(f"n_segments ({n_segments}) must not exceed n_samples ({n_samples})")
    n_layers = check_int("n_layers", n_layers, 1)
    distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
    if not isinstance(means, (bool, np.bool_)):
        raise ValueError(f"means must be a bool, got {means!r}")
    rng = make_rng(random_state)

    sizes = [len(c) for c in np.array_split(np.arange(n_samples), n_segments)]  # differ by <= 1
    u = np.repeat(np.arange(n_segments, dtype=np.int64), sizes)
    shape = (n_segments, n_sources)
    scales = np.exp(rng.uniform(np.log(0.1), 0.0, size=shape))
    locs = rng.uniform(-1.0, 1.0, size=shape) if means else np.zeros(shape)
    draw = rng.laplace if distribution == "laplace" else rng.normal
    # Indexing the per-segment tables by u gives every sample its own segment's parameters.
    S = _standardize(draw(loc=locs[u], scale=scales[u]))
    mixer = _leaky_mlp(rng, n_sources, n_layers)
    return ICAProblem(X=mixer(S), S=S, A=None, name="piecewise_stationary", mixer=mixer, u=u)


def make_underdetermined(n_samples: int = 5000, n_sources: int = 3, n_observed: int = 2,
                         sparsity: float = 0.8, random_state=None) -> ICAProblem:
    """Sparse sources, fewer mixtures than sources: X [n, n_observed] = S [n, n_sources] @ A.T.

    Each source entry is zero with probability ``sparsity`` (in [0, 1)) and Laplace otherwise
    (Bernoulli-Laplace). Each source keeps at least two nonzero entries, and is standardized by
    shifting only its *nonzero* entries to make the column mean zero, then scaling, so the zeros
    stay exactly zero. A: [n_observed, n_sources], Gaussian with unit-norm columns.
    """
    n_samples = check_int("n_samples", n_samples, 2)
    n_sources = check_int("n_sources", n_sources, 2)
    n_observed = check_int("n_observed", n_observed, 1)
    if n_observed >= n_sources:
        raise ValueError(
            f"n_observed ({n_observed}) must be smaller than n_sources ({n_sources}) "
            "for an underdetermined problem"
        )
    sparsity = check_real("sparsity", sparsity, 0.0, 1.0, high_open=True)
    rng = make_rng(random_state)

    active = rng.random((n_samples, n_sources)) >= sparsity
    S = np.where(active, rng.laplace(size=(n_samples, n_sources)), 0.0)
    for i in range(n_sources):
        if active[:, i].sum() < 2:  # too few nonzeros to give the column a variance
            rows = rng.choice(n_samples, size=2, replace=False)
            active[rows, i] = True
            S[rows, i] = rng.laplace(size=2)
        nz = active[:, i]
        S[nz, i] -= S[nz, i].mean()  # zero column mean while the inactive entries stay 0
        S[:, i] /= S[:, i].std()
    A = rng.standard_normal((n_observed, n_sources))
    A /= np.linalg.norm(A, axis=0)
    return ICAProblem(X=S @ A.T, S=S, A=A, name="underdetermined")


def make_sample_images(stride: int = 4, random_state=None) -> ICAProblem:
    """A real-signal problem with no download: scikit-learn's two bundled photographs
    (``sklearn.datasets.load_sample_images``: china.jpg, flower.jpg, 427 x 640 RGB) as sources.

    Each photograph is converted to grayscale (ITU-R 601 luma), subsampled by ``stride`` in both
    directions (4: 107 x 160 = 17,120 pixels), flattened and standardized; the two are mixed by a
    random 2 x 2 matrix with cond <= 10. Returns X [pixels, 2], S [pixels, 2], A [2, 2] and
    ``image_shape`` (height, width). The two photographs are not independent (their pixels are
    correlated, ``np.corrcoef(problem.S.T)``), so ICA's assumption holds only approximately.
    """
    stride = check_int("stride", stride, 1)
    from sklearn.datasets import load_sample_images

    rng = make_rng(random_state)
    images = load_sample_images().images
    gray = [img[::stride, ::stride, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            for img in images]
    shape = gray[0].shape
    S = _standardize(np.stack([g.ravel() for g in gray], axis=1))
    A = _well_conditioned(rng, 2)
    return ICAProblem(X=S @ A.T, S=S, A=A, name="sample_images", image_shape=shape)


# Source kinds of make_eeg_like, cycled over the sources: super-Gaussian (sparse activity, blinks,
# heavy tails), sub-Gaussian (line noise, a bounded drift, two-state switching) and an
# amplitude-modulated rhythm.
_RECORDING_KINDS = ("laplace", "blinks", "line", "student", "rhythm", "uniform", "switching")


def _recording_source(rng: np.random.Generator, kind: str, n: int, rate: float) -> np.ndarray:
    t = np.arange(n) / rate
    if kind == "blinks":  # ~0.3 s bumps at random times, a few per 10 s
        spikes = (rng.random(n) < 0.3 / rate).astype(np.float64)
        width = int(0.1 * rate) + 1
        kernel = np.exp(-0.5 * (np.arange(-3 * width, 3 * width + 1) / width) ** 2)
        return np.convolve(spikes, kernel, mode="same") + 0.05 * rng.standard_normal(n)
    if kind == "line":  # mains hum: a sine of 50 Hz at a random phase
        return np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 2 * np.pi))
    if kind == "student":
        return rng.standard_t(4, size=n)
    if kind == "rhythm":  # an 8-12 Hz oscillation whose amplitude drifts over seconds
        envelope = 1.0 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t
                                      + rng.uniform(0, 2 * np.pi))
        return envelope * np.sin(2 * np.pi * rng.uniform(8.0, 12.0) * t
                                 + rng.uniform(0, 2 * np.pi))
    if kind == "switching":  # a two-state process, dwelling ~0.5 s in each state
        flips = rng.random(n) < 2.0 / rate
        return np.where(np.cumsum(flips) % 2 == 0, -1.0, 1.0) + 0.2 * rng.standard_normal(n)
    return _iid_source(rng, kind, n)


RADII = (0.6, 0.85)  # dipole radii (the scalp at 1)


def _hemisphere_lattice(n: int) -> np.ndarray:
    """[n, 3] points spread evenly over the unit sphere's upper half (a Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = i / n
    phi = np.pi * (1 + 5 ** 0.5) * i
    rho = np.sqrt(1 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def _scalp_lead_field(rng: np.random.Generator, n_channels: int, n_sources: int) -> np.ndarray:
    """[n_channels, n_sources], unit columns: the potentials at electrodes spread over a unit
    sphere's upper half of current dipoles with random orientations, one under each patch of
    scalp (spread as the electrodes are, in random order, at depths 0.15-0.4), in an infinite
    homogeneous conductor (p . (r - r0) / |r - r0|^3): smooth, overlapping scalp maps, as EEG
    mixing is (condition numbers of a few hundred to thousands)."""
    electrodes = _hemisphere_lattice(n_channels)
    places = _hemisphere_lattice(n_sources)[rng.permutation(n_sources)] \
        * rng.uniform(*RADII, size=(n_sources, 1))
    moments = rng.standard_normal((n_sources, 3))
    moments /= np.linalg.norm(moments, axis=1, keepdims=True)
    d = electrodes[:, None, :] - places[None, :, :]  # [channels, sources, 3]
    A = (d * moments[None]).sum(-1) / np.linalg.norm(d, axis=-1) ** 3
    return A / np.linalg.norm(A, axis=0, keepdims=True)


def make_eeg_like(n_samples: int = 250_000, n_channels: int = 64, noise: float = 0.01,
                  rate: float = 250.0, random_state=None) -> ICAProblem:
    """A synthetic EEG-sized recording with known sources: ``n_channels`` sources (as many as
    channels), cycling over sparse activity (Laplace), blinks, mains hum, heavy tails (t, 4
    degrees of freedom), an amplitude-modulated alpha rhythm, a bounded drift (uniform) and
    two-state switching, sampled at ``rate`` Hz; mixed by dipoles' scalp maps
    (:func:`_scalp_lead_field`, ill-conditioned like real lead fields), plus Gaussian sensor
    noise of ``noise`` times each clean channel's std. X [n_samples, n_channels]."""
    n_samples = check_int("n_samples", n_samples, 2)
    n_channels = check_int("n_channels", n_channels, 1)
    noise = check_real("noise", noise, 0.0, np.inf, high_open=True)
    rate = check_real("rate", rate, 0.0, np.inf, high_open=True)
    rng = make_rng(random_state)
    kinds = [_RECORDING_KINDS[j % len(_RECORDING_KINDS)] for j in range(n_channels)]
    S = _standardize(np.stack([_recording_source(rng, k, n_samples, rate) for k in kinds],
                              axis=1))
    A = _scalp_lead_field(rng, n_channels, n_channels)
    return ICAProblem(X=_add_relative_noise(S @ A.T, noise, rng), S=S, A=A,
                      name=f"eeg_like_{n_channels}x{n_samples}")
