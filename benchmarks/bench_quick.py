"""Quick benchmark: fused reparam_gmm_kl against the eager reference, forward+backward.

python benchmarks/bench_quick.py [--rows 1048576] [--latents 8] [--components 3] [--device cpu]
Median of --repeats timed runs after one warm-up; ratios come from one run, side by side.
"""
import argparse
import json
import platform
import statistics
import time

import torch

import halfvae_ext as hv
from halfvae_ext import reference


def timer(device):
    if device.type == "cuda":
        def run(fn, repeats):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, repeats):
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2**20)
    p.add_argument("--latents", type=int, default=8)
    p.add_argument("--components", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    N, K, C = args.rows, args.latents, args.components
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    mu, logvar, eps = mk(N, K).requires_grad_(), (mk(N, K) * 0.1).requires_grad_(), mk(N, K)
    prior = [mk(K, C).requires_grad_() for _ in range(3)]
    params = [mu, logvar, *prior]
    grad_kl = torch.ones(N, device=device, dtype=dtype)
    grad_z = torch.full((N, K), 1e-3, device=device, dtype=dtype)

    def fwd_bwd(fn, **kw):
        def run():
            z, kl = fn(mu, logvar, *prior, **kw)
            torch.autograd.grad([z, kl], params, [grad_z, grad_kl])
        return run

    def fwd(fn, **kw):
        def run():
            with torch.no_grad():
                fn(mu, logvar, *prior, **kw)
        return run

    t = timer(device)
    cases = {
        "fused fwd (eps given)": fwd(hv.reparam_gmm_kl, eps=eps),
        "reference fwd": fwd(reference.reparam_gmm_kl, eps=eps),
        "fused fwd+bwd (eps given)": fwd_bwd(hv.reparam_gmm_kl, eps=eps),
        "fused fwd+bwd (in-kernel eps)": fwd_bwd(hv.reparam_gmm_kl),
        "reference fwd+bwd": fwd_bwd(reference.reparam_gmm_kl, eps=eps),
    }
    results = {name: t(fn, args.repeats) for name, fn in cases.items()}
    print(f"N={N} K={K} C={C} {args.dtype} device={device} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} cpu_kernel={hv._C.cpu_kernel_name()} "
          f"machine={platform.processor() or platform.machine()}")
    for name, sec in results.items():
        print(f"  {name:32s} {sec * 1e3:10.3f} ms")
    ratio_fb = results["reference fwd+bwd"] / results["fused fwd+bwd (eps given)"]
    ratio_f = results["reference fwd"] / results["fused fwd (eps given)"]
    print(f"  speed-up fwd+bwd (eps given): {ratio_fb:.1f}x   fwd: {ratio_f:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"N": N, "K": K, "C": C, "device": str(device), "dtype": args.dtype,
                       "seconds": results, "speedup_fwd_bwd": ratio_fb}, f, indent=2)


if __name__ == "__main__":
    main()
