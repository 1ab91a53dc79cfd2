"""Golden comparison for refactors: record every public computation's outputs, or compare with a
record, bit for bit.

    python scripts/golden_check.py record golden.npz   # before the change
    python scripts/golden_check.py compare golden.npz  # after it: exit 1 on any difference

Covers the ops (forward and backward, float32 and float64), the models' ELBOs, the estimator's
fits (every decoder, with and without u, the fused table optimizers, mini-batches, kl="bound",
the inits), stop/resume, save/load, and the baselines (VAE, iVAE, TCL, linear peers). Only
public import paths are used (halfvae_ext, halfvae_ext.models, halfvae_ext.ica and the demo's
functions), so the same script runs before and after a move. The estimator's fits with u name
their decoder explicitly: only the default decoder with u is meant to change.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

import halfvae_ext as hv
from halfvae_ext import HalfVAEICA
from halfvae_ext.ica import make_nonstationary, make_paper_linear


def _demo():
    try:
        from halfvae_ext.ica import baselines, demo
        return demo, baselines
    except ImportError:
        from halfvae_ext import experiments
        return experiments, experiments


def ops_outputs(out: dict) -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for K, C, U in ((8, 3, 1), (5, 2, 1), (8, 3, 4)):
            tag = f"ops/{dtype}/K{K}C{C}U{U}"
            N = 300
            mu = torch.randn(N, K, generator=g, dtype=dtype).requires_grad_()
            logvar = (0.3 * torch.randn(N, K, generator=g, dtype=dtype) - 1).requires_grad_()
            shape = (K, C) if U == 1 else (U, K, C)
            logits = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
            means = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
            logvars = (0.5 * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()
            eps = torch.randn(N, K, generator=g, dtype=dtype)
            pidx = None if U == 1 else torch.randint(0, U, (N,), generator=g)
            leaves = (mu, logvar, logits, means, logvars)
            for kl in ("mc", "bound"):
                z, klv = hv.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps,
                                           reduction="row", kl=kl, prior_index=pidx)
                grads = torch.autograd.grad((z.sin().sum() + klv.sum()), leaves)
                out[f"{tag}/{kl}/z"] = z
                out[f"{tag}/{kl}/kl"] = klv
                for i, gr in enumerate(grads):
                    out[f"{tag}/{kl}/grad{i}"] = gr
            zz = torch.randn(N, K, generator=g, dtype=dtype).requires_grad_()
            lp = hv.gmm_log_prob(zz, logits, means, logvars, prior_index=pidx)
            grads = torch.autograd.grad(lp.sum(), (zz, logits, means, logvars))
            out[f"{tag}/logprob"] = lp
            for i, gr in enumerate(grads):
                out[f"{tag}/logprob/grad{i}"] = gr
    seed = hv.ops.draw_seed(torch.Generator().manual_seed(9), "cpu")
    out["ops/philox_normal"] = hv.philox_normal(seed, (64, 8))
    out["ops/philox_normal_rows"] = hv.philox_normal_rows(seed, torch.tensor([5, 1, 70]), 8)


def models_outputs(out: dict) -> None:
    from halfvae_ext.models import GMMPrior, HalfVAE, LatentTable
    for decoder in ("linear", "mlp", "residual", "flow"):
        torch.manual_seed(1)
        m = HalfVAE(200, 4, 4, decoder=decoder, hidden=(8,), num_components=3, num_groups=3)
        x = torch.randn(200, 4, generator=torch.Generator().manual_seed(2))
        u = torch.arange(200) % 3
        g = torch.Generator().manual_seed(3)
        loss = m(x, u=u, generator=g).mean()
        loss.backward()
        out[f"models/{decoder}/loss"] = loss.detach()
        for name, p in m.named_parameters():
            out[f"models/{decoder}/grad/{name}"] = p.grad
    for kind, sdt in (("adam", None), ("rowwise_adam", None), ("rowwise_adam", torch.bfloat16),
                      ("rowwise_adagrad", None)):
        torch.manual_seed(4)
        t = LatentTable(500, 8, fused_optimizer=kind, lr=0.05, state_dtype=sdt)
        prior = GMMPrior(8, 3)
        g = torch.Generator().manual_seed(5)
        for step in range(3):
            idx = torch.randint(0, 500, (64,), generator=g)
            z, kl, *_ = t.sample(idx, prior, generator=g)
            (z.square().sum() + kl.sum()).backward()
        out[f"table/{kind}/{sdt}/mu"] = t.mu.detach().clone()
        out[f"table/{kind}/{sdt}/logvar"] = t.logvar.detach().clone()


def _fit_record(out: dict, tag: str, est: HalfVAEICA, X, u=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, u=u)
    for name in ("posterior_means_", "elbo_history_", "restart_elbos_", "mixing_",
                 "components_", "mean_", "whitening_"):
        if hasattr(est, name):
            out[f"{tag}/{name}"] = np.asarray(getattr(est, name))
    out[f"{tag}/elbo_"] = np.asarray(est.elbo_)
    kw = {} if u is None else {"u": u[:40]}
    out[f"{tag}/transform"] = est.transform(X[:40], **kw)
    out[f"{tag}/inverse"] = est.inverse_transform(est.posterior_means_[:40])


def estimator_outputs(out: dict) -> None:
    P = make_paper_linear(600, random_state=0)
    X = P.X
    base = dict(max_iter=40, n_restarts=2, random_state=0, transform_max_iter=20, n_threads=1)
    configs = {
        "linear": {},
        "linear_bound": {"kl": "bound"},
        "linear_random": {"init": "random"},
        "linear_fastica": {"init": "fastica"},
        "linear_minibatch": {"batch_size": 128},
        "mlp": {"decoder": "mlp", "hidden": (8,)},
        "residual": {"decoder": "residual", "hidden": (8,)},
        "residual_noise": {"decoder": "residual", "hidden": (8,), "noise": (0.5, 0.05)},
    }
    for opt in ("fused", "rowwise_adam", "rowwise_adam_bf16", "rowwise_adagrad"):
        configs[f"table_{opt}"] = {"table_optimizer": opt, "batch_size": 128}
    for tag, extra in configs.items():
        _fit_record(out, f"est/{tag}", HalfVAEICA(3, **base, **extra), X)
    Q = make_nonstationary(60, 6, 3, n_layers=2, random_state=1)
    uconfigs = {
        "u_linear": {"decoder": "linear"},
        "u_flow": {"decoder": "flow", "n_mixture": 1, "hidden": (8,)},
        "u_residual_full": {"decoder": "residual", "n_mixture": 1, "hidden": (8,),
                            "noise": (0.5, 0.05), "posterior_covariance": "full"},
    }
    for tag, extra in uconfigs.items():
        _fit_record(out, f"est/{tag}", HalfVAEICA(3, **base, **extra), Q.X, Q.u)
    # stop and resume give the bits of an uninterrupted fit; save/load round trips
    with tempfile.TemporaryDirectory() as d:
        for dec in ("linear", "residual"):
            est = HalfVAEICA(3, decoder=dec, hidden=(8,), **base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.fit(X, stop_after=30)
                path = os.path.join(d, f"{dec}.pt")
                est.save(path)
                est2 = HalfVAEICA.load(path)
                est2.fit(X, resume=True)
            out[f"resume/{dec}/posterior_means_"] = est2.posterior_means_
            out[f"resume/{dec}/elbo_"] = np.asarray(est2.elbo_)
            est2.save(path)
            est3 = HalfVAEICA.load(path)
            out[f"resume/{dec}/transform_loaded"] = est3.transform(X[:40])


def baselines_outputs(out: dict) -> None:
    demo, baselines = _demo()
    P = make_paper_linear(600, random_state=0)
    S, info = baselines.fit_vae(P.X, 3, max_iter=30, n_restarts=2, random_state=0)
    out["vae/S"] = S
    out["vae/elbo"] = np.asarray(info["elbo"])
    Q = make_nonstationary(60, 6, 3, n_layers=2, random_state=1)
    S, info = baselines.fit_ivae(Q.X, Q.u, 3, max_iter=20, n_restarts=1, random_state=0)
    out["ivae/S"] = S
    out["tcl/S"] = baselines.fit_tcl(Q.X, Q.u, 3, max_iter=3, random_state=0)[0]
    for m in ("fastica", "picard"):
        out[f"peer/{m}"] = baselines.fit_linear_peer(m, P.X, 3, 0)
    for name in demo.PROBLEMS:
        if name == "images":
            continue
        Pn = demo.make_problem(name, 400, seed=2, quick=True)
        out[f"problem/{name}/X"] = Pn.X


def collect() -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    ops_outputs(out)
    models_outputs(out)
    estimator_outputs(out)
    baselines_outputs(out)
    return {k: (v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor)
                and v.dtype == torch.bfloat16 else
                v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in out.items()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("record", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, path = argv
    out = collect()
    if mode == "record":
        np.savez(path, **out)
        print(f"recorded {len(out)} arrays to {path}")
        return 0
    ref = np.load(path)
    missing = sorted(set(ref.files) - set(out))
    added = sorted(set(out) - set(ref.files))
    differ = [k for k in ref.files if k in out
              and not (ref[k].shape == out[k].shape
                       and np.array_equal(ref[k], out[k], equal_nan=True))]
    for k in differ:
        print(f"DIFFERS {k}")
    for k in missing:
        print(f"MISSING {k}")
    print(f"{len(ref.files) - len(differ) - len(missing)} of {len(ref.files)} arrays identical; "
          f"{len(differ)} differ, {len(missing)} missing, {len(added)} new")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
