"""Short demonstration: the ELBO's KL term on a random latent table, fused against reference.

Run: python -m halfvae_ext.demo   (or `make demo`)
"""
import argparse
import time

import torch

import halfvae_ext as hv
from halfvae_ext import reference


def _time(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2**18, help="latent table rows N")
    parser.add_argument("--latents", type=int, default=8, help="latent dimensions K")
    parser.add_argument("--components", type=int, default=3, help="mixture components C")
    args = parser.parse_args(argv)
    N, K, C = args.rows, args.latents, args.components
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(N, K, generator=g).requires_grad_()
    logvar = (torch.randn(N, K, generator=g) * 0.1 - 1).requires_grad_()
    prior = [torch.randn(K, C, generator=g).requires_grad_() for _ in range(3)]
    eps = torch.randn(N, K, generator=g)
    params = [mu, logvar, *prior]

    def step(fn, **kw):
        z, kl = fn(mu, logvar, *prior, reduction="sum", **kw)
        torch.autograd.grad(kl, params)
        return kl.item()

    kl_fused = step(hv.reparam_gmm_kl, eps=eps)
    kl_ref = step(reference.reparam_gmm_kl, eps=eps)
    t_fused = _time(lambda: step(hv.reparam_gmm_kl, eps=eps))
    t_ref = _time(lambda: step(reference.reparam_gmm_kl, eps=eps))
    t_rng = _time(lambda: step(hv.reparam_gmm_kl))
    print(f"latent table N={N}, K={K}, GMM prior C={C}, float32, {torch.get_num_threads()} threads,"
          f" CPU kernel {hv._C.cpu_kernel_name()}")
    print(f"KL (sum over table), fused op     : {kl_fused:.6f}")
    print(f"KL (sum over table), reference    : {kl_ref:.6f}")
    print(f"relative difference               : {abs(kl_fused - kl_ref) / abs(kl_ref):.2e}")
    print(f"forward+backward, fused (eps given): {t_fused * 1e3:8.2f} ms")
    print(f"forward+backward, fused (in-kernel eps): {t_rng * 1e3:8.2f} ms")
    print(f"forward+backward, reference eager : {t_ref * 1e3:8.2f} ms  ({t_ref / t_fused:.1f}x slower)")


if __name__ == "__main__":
    main()
