"""A zero-noise finish of linear Half-VAE fits (benchmarks/ICA_EXPERIMENTS.md section 17; a research
prototype, not in the package): after HalfVAEICA's fit, maximize the ICA likelihood with the learned
mixture densities, mean_n sum_k log p_k((B x_n)_k) + log|det B|, by L-BFGS over the unmixing B
("B") or B and the prior ("BP"), and compare worst per-component RMSE with FastICA and Picard.

    OMP_NUM_THREADS=1 python scripts/linear_ml_finish.py SEEDS SOURCES NOISES [B|BP]
"""
import sys, time, json, numpy as np, torch
from halfvae_ext import HalfVAEICA
from halfvae_ext.ica.baselines import fit_linear_peer
from halfvae_ext.ica.demo import halfvae_sources
from halfvae_ext.ica import make_linear, per_component_rmse
torch.set_num_threads(1)
seeds=[int(s) for s in sys.argv[1].split(",")]; sources=[int(s) for s in sys.argv[2].split(",")]
noises=[float(s) for s in sys.argv[3].split(",")]; mode=sys.argv[4] if len(sys.argv)>4 else "B"

def polish(est, X, mode, iters=200):
    m = est.model_
    Xw = torch.as_tensor((X - est.mean_) @ est.whitening_.T, dtype=torch.float64)
    W = m.decoder.weight.detach().double()          # [K, K], x_w ~ W z + b
    b = m.decoder.bias.detach().double() if m.decoder.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    B = torch.linalg.inv(W).contiguous().clone().requires_grad_()
    pr = m.prior
    lg, mu, lv = [p.detach().double().contiguous().clone().requires_grad_(mode == "BP") for p in (pr.logits, pr.means, pr.logvars)]
    params = [B] + ([lg, mu, lv] if mode == "BP" else [])
    opt = torch.optim.LBFGS(params, lr=1, max_iter=iters, history_size=20, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")
    Xc = Xw - b
    def nll():
        opt.zero_grad()
        z = Xc @ B.T
        lp = torch.log_softmax(lg, -1) - 0.5 * (np.log(2*np.pi) + lv + (z[:, :, None] - mu)**2 * torch.exp(-lv))
        l = -(torch.logsumexp(lp, -1).sum(1).mean() + torch.linalg.slogdet(B)[1])
        l.backward(); return l
    l0 = float(nll().detach()); opt.step(nll); l1 = float(nll().detach())
    Bn = B.detach().numpy()
    S = ((X - est.mean_) @ est.whitening_.T - b.numpy()) @ Bn.T
    return S, l0, l1

for k in sources:
    for noise in noises:
        for seed in seeds:
            P = make_linear(5000, k, "assorted", noise=noise, random_state=seed)
            t0=time.perf_counter(); est = HalfVAEICA(k, random_state=seed).fit(P.X); dt=time.perf_counter()-t0
            hv = per_component_rmse(P.S, halfvae_sources(est, P.X)).max()
            t0=time.perf_counter(); S, l0, l1 = polish(est, P.X, mode); dp=time.perf_counter()-t0
            pol = per_component_rmse(P.S, S).max()
            fi = per_component_rmse(P.S, fit_linear_peer("fastica", P.X, k, seed)).max()
            pi = per_component_rmse(P.S, fit_linear_peer("picard", P.X, k, seed)).max()
            print(f"K={k} noise={noise:g} seed={seed} halfvae {hv:.4f} polished({mode}) {pol:.4f} fastica {fi:.4f} picard {pi:.4f} nll {l0:.4f}->{l1:.4f} ({dt:.0f}s+{dp:.1f}s) {'ok' if pol<=min(fi,pi) else 'WORSE'}", flush=True)
