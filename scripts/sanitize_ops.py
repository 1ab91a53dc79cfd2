"""Every halfvae_ext op, forward and backward, once, on small problems: the workload of
`compute-sanitizer --tool memcheck/racecheck` in scripts/gpu_check.sh (small, so that it runs in
seconds under the sanitizer). Each kernel variant the dispatch can pick appears: C = 3 (unrolled)
and C = 2, 8 (runtime C), eps given and drawn, row and element reductions, the KL bound, priors
chosen per row, prior sums in shared and in global memory, gathered rows on contiguous and
interleaved tables, the fused table step (Adam, SGD), K with rows spanning 3 groups of 4.

    python scripts/sanitize_ops.py [--device cuda]     (also runs on the CPU: --device cpu)

Exits non-zero when an op raises, a result is not finite, or an op of the library was not called.
"""
import argparse
import sys

import torch

import halfvae_ext as hv
from halfvae_ext.models import GMMPrior, LatentTable
from halfvae_ext.ops import draw_seed
from halfvae_ext.table_optim import FusedRowOptimizer, fused_rows_kl
from torch.utils._python_dispatch import TorchDispatchMode

OPS = torch.ops.halfvae_ext


class RecordOps(TorchDispatchMode):
    """Names of the halfvae_ext ops called (autograd's backward calls included)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "halfvae_ext":
            self.seen.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def library_ops():
    return {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("halfvae_ext::")}


def finite(*tensors):
    for t in tensors:
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise AssertionError(f"non-finite result of shape {tuple(t.shape)}")


def prior(shape, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * s).to(device, dtype).requires_grad_()
            for s in (1.0, 2.0, 0.5)]


def run(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    gen = lambda: torch.Generator(device=device).manual_seed(1)  # noqa: E731
    cases = 0
    # reparam_gmm_kl and gmm_log_prob: (N, K, C, U); U = None one prior [K, C]. (64, 300, 3, 7):
    # prior sums beyond shared memory (global atomics). K = 7: rows span 3 groups of 4.
    for N, K, C, U in [(97, 8, 3, None), (61, 7, 2, None), (33, 11, 8, 40), (64, 300, 3, 7),
                       (5, 1, 1, 1)]:
        mu = torch.randn(N, K, generator=g).to(device, dtype).requires_grad_()
        logvar = (0.3 * torch.randn(N, K, generator=g)).to(device, dtype).requires_grad_()
        p = prior((K, C) if U is None else (U, K, C), device, dtype, N)
        index = None if U is None else torch.randint(0, U, (N,), generator=g).to(device)
        eps = torch.randn(N, K, generator=g).to(device, dtype)
        for kl in ("mc", "bound"):
            for reduction in ("row", "none"):
                for source in (dict(eps=eps), dict(generator=gen())):
                    z, k = hv.reparam_gmm_kl(mu, logvar, *p, reduction=reduction,
                                             prior_index=index, kl=kl, **source)
                    grads = torch.autograd.grad(k.sum() + z.sum(), [mu, logvar, *p])
                    finite(z, k, *grads)
                    cases += 1
        lp = hv.gmm_log_prob(mu.detach(), *p, prior_index=index)
        finite(lp, *torch.autograd.grad(lp.sum(), p))
    # Gathered rows: contiguous and interleaved tables, dense and sparse table gradients.
    rows, K, B = 200, 8, 300
    for interleaved in (False, True):
        if interleaved:
            both = torch.randn(rows, 2, K, generator=g).to(device, dtype)
            mu, logvar = both[:, 0].requires_grad_(), both[:, 1].requires_grad_()
        else:
            mu = torch.randn(rows, K, generator=g).to(device, dtype).requires_grad_()
            logvar = torch.randn(rows, K, generator=g).to(device, dtype).requires_grad_()
        p = prior((K, 3), device, dtype, 1)
        idx = torch.randint(0, rows, (B,), generator=g).to(device)
        for table_grad in ("dense", "sparse"):
            z, k = hv.reparam_gmm_kl_rows(mu, logvar, idx, *p, generator=gen(),
                                          table_grad=table_grad)
            grads = torch.autograd.grad(k.sum() + z.sum(), [mu, logvar, *p])
            finite(z, k, *(x.to_dense() if x.is_sparse else x for x in grads))
    # The fused table step (backward + Adam/SGD in one op), with the rows' other gradients, and
    # the plain update op; a conditional prior with the bound.
    pr = GMMPrior(K, 3).to(device, dtype)
    for kind in ("adam", "sgd"):
        table = LatentTable(rows, K, fused_optimizer=kind, dtype=dtype).to(device)
        idx = torch.randint(0, rows, (B,), generator=g).to(device)
        z, k, mu_rows, lv_rows = table.sample(idx, pr, generator=gen())
        (k.sum() + z.sum() + mu_rows.sum() + lv_rows.exp().sum()).backward()
        finite(table.mu, table.logvar)
        opt = FusedRowOptimizer(rows, K, kind, dtype=dtype, device=device)
        mu = torch.randn(rows, K, generator=g).to(device, dtype).requires_grad_()
        logvar = torch.randn(rows, K, generator=g).to(device, dtype).requires_grad_()
        pu = prior((4, K, 3), device, dtype, 2)
        u = torch.randint(0, 4, (B,), generator=g).to(device)
        z, k = fused_rows_kl(mu, logvar, idx, *pu, opt, generator=gen(), prior_index=u,
                             kl="bound")
        k.sum().backward()
        with torch.no_grad():
            opt.step_rows(mu, logvar, idx, torch.ones(B, K, device=device, dtype=dtype),
                          torch.ones(B, K, device=device, dtype=dtype))
        finite(mu, logvar, opt.state)
    # Draws.
    seed = draw_seed(gen(), device)
    finite(hv.philox_normal(seed, (1000, 3)),
           hv.philox_normal_rows(seed, torch.tensor([0, 5, 2**20], device=device), 7))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    with RecordOps() as rec:
        cases = run(device)
    missing = sorted(library_ops() - rec.seen)
    print(f"sanitize_ops on {device}: {cases} reparam cases, {len(rec.seen)} ops called: "
          + ", ".join(sorted(n.split("::")[1] for n in rec.seen)))
    if missing:
        print("ops never called:", ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
