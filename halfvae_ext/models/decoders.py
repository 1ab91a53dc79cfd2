"""Decoders z -> x: linear, MLP, residual (linear + MLP correction) and the invertible flow.

A new decoder is one class here plus its name in :data:`DECODERS` and :func:`build_decoder`,
and one recipe class in :mod:`halfvae_ext.ica.recipe` for the way it is trained.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._checks import _check_hidden, _check_pos_int

__all__ = ["ACTIVATIONS", "DECODERS", "make_mlp", "ResidualDecoder", "FlowDecoder",
           "random_orthogonal", "build_decoder"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


def random_orthogonal(k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random k x k rotation (float64) drawn from ``generator``."""
    q, r = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def make_mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (64, 64),
             activation: str = "relu") -> nn.Sequential:
    """Linear -> activation -> ... -> Linear; ``hidden`` are the hidden widths (may be empty)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    widths = (_check_pos_int("in_dim", in_dim), *_check_hidden(hidden),
              _check_pos_int("out_dim", out_dim))
    layers = []
    for i in range(len(widths) - 1):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


class ResidualDecoder(nn.Module):
    """x = W z + mlp(z): a linear mixing (no bias) plus a nonlinear correction.

    The MLP's output layer starts at zero, so the decoder starts as exactly the linear model and
    can be initialized like it (``linear.weight``); training then learns the nonlinear part. For
    nonlinear ICA this starts from a linear solution instead of a random map.
    """

    def __init__(self, latent_dim: int, data_dim: int, hidden=(32,), activation="leaky_relu"):
        super().__init__()
        self.linear = nn.Linear(latent_dim, data_dim, bias=False)
        self.mlp = make_mlp(latent_dim, data_dim, hidden, activation)
        self.zero_correction_()

    @torch.no_grad()
    def zero_correction_(self):
        """Set the MLP's output layer to zero: the decoder becomes its linear part."""
        self.mlp[-1].weight.zero_()
        self.mlp[-1].bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z) + self.mlp(z)


class _InvertibleLinear(nn.Module):
    """y = x A^T + b with a square A, and log|det A| (one value for every row)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor):
        return x @ self.weight.T + self.bias, torch.linalg.slogdet(self.weight)[1]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.weight, (y - self.bias).T).T


class _AffineCoupling(nn.Module):
    """RealNVP's affine coupling: the coordinates where ``mask`` is 1 pass through and condition
    an MLP that scales and shifts the others, y_B = x_B * exp(s(x_A)) + t(x_A). The log-scale is
    bounded (tanh) so that no step can blow up; the MLP's output layer starts at zero (identity)."""

    def __init__(self, dim: int, mask: torch.Tensor, hidden, activation):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = make_mlp(dim, 2 * dim, hidden, activation)
        self.zero_()

    @torch.no_grad()
    def zero_(self):
        self.net[-1].weight.zero_()
        self.net[-1].bias.zero_()

    def _scale_shift(self, x_pass: torch.Tensor):
        s, t = self.net(x_pass).chunk(2, dim=-1)
        keep = 1.0 - self.mask
        return torch.tanh(s) * keep, t * keep

    def forward(self, x: torch.Tensor):
        s, t = self._scale_shift(x * self.mask)
        return x * torch.exp(s) + t, s.sum(dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._scale_shift(y * self.mask)  # the passed coordinates are unchanged
        return (y - t) * torch.exp(-s)


class FlowDecoder(nn.Module):
    """An invertible decoder x = g(z) of R^K (data_dim must equal latent_dim), written through its
    inverse h = g^-1: a linear map (the unmixing), then ``n_blocks`` of [affine coupling with an
    MLP of ``hidden`` widths, linear map] (``n_blocks=0``: the linear flow h(x) = W x + b, linear
    ICA by exact likelihood). Both directions are exact and h comes with
    log|det dh/dx|, so with a flow decoder a row's optimal posterior at zero noise is the point
    h(x_n) and the ELBO's zero-noise limit is the model's exact log-likelihood
    log p(h(x) | u) + log|det dh/dx| (:meth:`HalfVAE.flow_log_likelihood`): the recipe trains
    that, with the latent table at h(x). The couplings start at the identity, so the decoder
    starts as the linear map its first map's inverse.
    """

    def __init__(self, dim: int, hidden=(64, 64), activation="leaky_relu", n_blocks: int = 8):
        super().__init__()
        dim = _check_pos_int("dim", dim)
        n_blocks = _check_pos_int("n_blocks", n_blocks, minimum=0)
        steps = [_InvertibleLinear(dim)]
        for i in range(n_blocks):
            mask = (torch.arange(dim) % 2 == i % 2).float()
            steps += [_AffineCoupling(dim, mask, hidden, activation), _InvertibleLinear(dim)]
        self.steps = nn.ModuleList(steps)

    @property
    def unmixing(self) -> _InvertibleLinear:
        """The first map of h (x -> z): the decoder's linear start."""
        return self.steps[0]

    @torch.no_grad()
    def start_(self, unmixing: torch.Tensor, generator: torch.Generator | None = None):
        """Start as the linear decoder ``unmixing``^-1 (h(x) = unmixing @ x): the couplings at the
        identity, the maps after them Haar-random rotations (drawn from ``generator``) so that
        each coupling sees other coordinates, and the first map ``unmixing`` with those
        rotations undone."""
        rotations = torch.eye(unmixing.shape[0], dtype=torch.float64)
        for step in self.steps[1:]:
            if isinstance(step, _AffineCoupling):
                step.zero_()
                continue
            q = random_orthogonal(step.weight.shape[0], generator)
            step.weight.copy_(q)
            step.bias.zero_()
            rotations = q @ rotations
        self.unmixing.weight.copy_(rotations.T @ unmixing.double())
        self.unmixing.bias.zero_()

    def inverse(self, x: torch.Tensor):
        """(z = h(x) [B, K], log|det dh/dx| [B])."""
        logdet = x.new_zeros(x.shape[:-1])
        for step in self.steps:
            x, ld = step(x)
            logdet = logdet + ld
        return x, logdet

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z


DECODERS = ("linear", "mlp", "residual", "flow")


def build_decoder(decoder, latent_dim, data_dim, hidden, activation) -> nn.Module:
    if isinstance(decoder, nn.Module):
        return decoder
    if decoder == "linear":
        # No bias: the ICA model x = A s on centered data; a GMM prior's means carry any offset.
        return nn.Linear(latent_dim, data_dim, bias=False)
    if decoder == "mlp":
        return make_mlp(latent_dim, data_dim, hidden, activation)
    if decoder == "residual":
        return ResidualDecoder(latent_dim, data_dim, hidden, activation)
    if decoder == "flow":
        if data_dim != latent_dim:
            raise ValueError(f"decoder='flow' is invertible, so it needs data_dim == latent_dim, "
                             f"got data_dim={data_dim} and latent_dim={latent_dim}")
        return FlowDecoder(latent_dim, hidden, activation)
    raise ValueError(f"decoder must be 'linear', 'mlp', 'residual', 'flow' or an nn.Module, "
                     f"got {decoder!r}")
