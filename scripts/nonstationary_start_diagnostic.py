"""Where a nonstationary fit's gap is: Half-VAE with u started at the true sources, or with a
decoder of the mixing's own shape (ICA_EXPERIMENTS.md section 20). A research tool: it swaps
the recipe's decoder and start by patching halfvae_ext.ica.recipe.Recipe in this process only.

    OMP_NUM_THREADS=1 python scripts/nonstationary_start_diagnostic.py SEED N_LAYERS START \
        [ESTIMATOR_JSON [PROBLEM_JSON]]

START:
  pca       the product's start (PCA latent means, the residual decoder's linear part fitted)
  truth     table means at the standardized true sources, the linear part fitted to them
  truearch  the truth, and a decoder of the mixing's own shape (N_LAYERS linear maps with the
            mixing's leaky ReLU between them) set to the true mixing composed with the whitening
  prelu     the PCA start, and a decoder of the mixing's shape with learnable per-unit slopes
            (nn.PReLU starting at 1: a linear decoder at first; first map at the PCA solution,
            the others at the identity). ESTIMATOR_JSON may give "depth" (default N_LAYERS).
  stacked   the PCA start, and a stack of "depth" residual blocks of width K (each h -> A h +
            mlp(h), the recipe's residual decoder with "hidden" widths, its MLP output at zero):
            a linear decoder at first that can write each mixing layer exactly (act(A h) = A h +
            an elementwise function of A h); first block's map at the PCA solution, the others
            at the identity.
ESTIMATOR_JSON: HalfVAEICA parameters that replace the defaults below (e.g. {"noise": 0.05});
PROBLEM_JSON: make_nonstationary arguments. Prints one JSON line: final ELBO per sample, MCC.
Only for leaky-ReLU mixing with truearch.
"""
import json
import sys

import numpy as np
import torch
from torch import nn

import halfvae_ext.ica.recipe as recipe
from halfvae_ext.ica.estimator import HalfVAEICA
from halfvae_ext.ica import make_nonstationary
from halfvae_ext.ica.metrics import mean_corr_coef
from halfvae_ext.models import ResidualDecoder


class StackedResidual(nn.Sequential):
    """Residual blocks of width K in a row; realignment acts on the first block."""


def first_linear_maps(decoder, base=recipe._first_linear_maps):
    if isinstance(decoder, StackedResidual):
        return base(decoder[0])
    return base(decoder)

STARTS = ("pca", "truth", "truearch", "prelu", "stacked")


def main():
    seed, n_layers, start = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if start not in STARTS:
        sys.exit(f"START must be one of {STARTS}, got {start!r}")
    params = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    problem = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    torch.set_num_threads(1)
    P = make_nonstationary(n_layers=n_layers, random_state=seed, **problem)
    K = P.S.shape[1]
    S_std = (P.S - P.S.mean(0)) / P.S.std(0)
    depth = int(params.pop("depth", n_layers))
    base_build, base_init = recipe.Recipe.build_model, recipe.Recipe.initialize

    def square_mlp(n, activation):
        layers = []
        for i in range(n):
            layers.append(nn.Linear(K, K))
            if i < n - 1:
                layers.append(activation())
        return nn.Sequential(*layers)

    def build_model(self, n_rows, data_dim, device):
        model = base_build(self, n_rows, data_dim, device)
        if start == "truearch":
            model.decoder = square_mlp(n_layers, lambda: nn.LeakyReLU(P.mixer.slope))
        elif start == "prelu":
            model.decoder = square_mlp(depth, lambda: nn.PReLU(K, init=1.0))
        elif start == "stacked":
            model.decoder = StackedResidual(*[ResidualDecoder(K, K, self.hidden, self.activation)
                                              for _ in range(depth)])
        model.decoder.to(device=device, dtype=model.latents.mu.dtype)
        return model

    @torch.no_grad()
    def initialize(self, model, Xw, restart, seed_, generator):
        base_init(self, model, Xw, restart, seed_, generator)
        Xd = Xw.detach().cpu().double()
        if start in ("truth", "truearch"):
            model.latents.mu.copy_(torch.from_numpy(S_std).to(model.latents.mu))
        mu = model.latents.mu.detach().cpu().double()
        W = torch.linalg.lstsq(mu, Xd).solution.T  # the linear decoder of the start
        if start == "truth":
            model.decoder.linear.weight.copy_(W.to(model.decoder.linear.weight))
        elif start == "prelu":
            for i, lin in enumerate(m for m in model.decoder if isinstance(m, nn.Linear)):
                lin.weight.copy_(W if i == 0 else torch.eye(K))
                lin.bias.zero_()
        elif start == "stacked":
            for i, block in enumerate(model.decoder):
                block.zero_correction_()
                block.linear.weight.copy_(W if i == 0 else torch.eye(K))
        elif start == "truearch":
            model.decoder.load_state_dict(true_decoder(mu, Xd).state_dict())

    def true_decoder(z, Xd):
        """The mixing on standardized sources, its last map refitted to the whitened data."""
        M = [torch.as_tensor(np.asarray(A), dtype=torch.float64) for A in P.mixer.matrices]
        m, sd = torch.from_numpy(P.S.mean(0)), torch.from_numpy(P.S.std(0))
        dec = square_mlp(len(M), lambda: nn.LeakyReLU(P.mixer.slope)).double()
        lins = [layer for layer in dec if isinstance(layer, nn.Linear)]
        for i, (lin, A) in enumerate(zip(lins, M)):
            lin.weight.copy_((sd[:, None] * A).T if i == 0 else A.T)
            lin.bias.copy_(m @ A if i == 0 else torch.zeros(K))
        H = dec[:-1](z)
        sol = torch.linalg.lstsq(torch.cat([H, torch.ones(len(H), 1, dtype=H.dtype)], 1),
                                 Xd).solution
        lins[-1].weight.copy_(sol[:K].T)
        lins[-1].bias.copy_(sol[K])
        residual = float((dec(z) - Xd).pow(2).mean())
        if residual > 1e-8:
            sys.exit(f"the true decoder does not reproduce the data (mean squared residual "
                     f"{residual:.2e}): truearch needs leaky-ReLU mixing")
        return dec

    recipe.Recipe.build_model, recipe.Recipe.initialize = build_model, initialize
    recipe._first_linear_maps = first_linear_maps
    settings = dict(decoder="residual", n_mixture=1, noise=(0.5, 0.05), tol=None,
                    posterior_covariance="full", max_iter=600, n_restarts=1, random_state=seed)
    settings.update(params)
    for key in ("hidden", "noise"):
        if isinstance(settings.get(key), list):
            settings[key] = tuple(settings[key])
    est = HalfVAEICA(K, **settings).fit(P.X, u=P.u)
    print(json.dumps(dict(seed=seed, n_layers=n_layers, start=start, params=params,
                          elbo=round(est.elbo_, 4),
                          mcc=round(mean_corr_coef(P.S, est.posterior_means_), 4))), flush=True)


if __name__ == "__main__":
    main()
