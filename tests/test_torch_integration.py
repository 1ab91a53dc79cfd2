"""The ops as PyTorch custom operators: opcheck, torch.compile, CPU kernel variants."""
import os
import subprocess
import sys

import pytest
import torch

import halfvae_ext as hv
from halfvae_ext import reference as ref

from conftest import make_problem


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck_reparam_gmm_kl(requires_grad, reduction):
    mu, logvar, eps, prior = make_problem(11, 5, 3, dtype=torch.float64,
                                          requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.halfvae_ext.reparam_gmm_kl,
                          (mu, logvar, *prior, eps, None, reduction))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_gmm_log_prob(requires_grad):
    z, _, _, prior = make_problem(11, 5, 3, dtype=torch.float64, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.halfvae_ext.gmm_log_prob, (z, *prior))


def test_opcheck_backward_ops_and_philox():
    mu, logvar, eps, prior = make_problem(11, 5, 3, requires_grad=False)
    seed = torch.tensor([3, 4], dtype=torch.int64)
    # The backward ops are called from autograd; they are pure ops in their own right too.
    torch.library.opcheck(torch.ops.halfvae_ext.reparam_gmm_kl_backward,
                          (torch.randn(11, 5), torch.randn(11), mu, logvar, *prior, None, seed, 1,
                           True), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.halfvae_ext.gmm_log_prob_backward,
                          (torch.randn(11, 5), mu, *prior, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.halfvae_ext.philox_normal, (seed, 10, torch.float32))


def test_torch_compile_fullgraph_forward_and_backward():
    mu, logvar, eps, prior = make_problem(64, 8, 3)
    inputs = [mu, logvar, *prior]

    def elbo_kl(mu, logvar, logits, means, logvars, eps):
        z, kl = hv.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps)
        lp = hv.gmm_log_prob(z, logits, means, logvars)
        return kl.mean() + 0.1 * (z * z).sum() - 0.01 * lp.sum()

    def elbo_kl_ref(mu, logvar, logits, means, logvars, eps):
        z, kl = ref.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps)
        lp = ref.gmm_log_prob(z, logits, means, logvars)
        return kl.mean() + 0.1 * (z * z).sum() - 0.01 * lp.sum()

    compiled = torch.compile(elbo_kl, fullgraph=True, backend="inductor")
    loss = compiled(*inputs, eps)
    grads = torch.autograd.grad(loss, inputs)
    loss_ref = elbo_kl_ref(*inputs, eps)
    grads_ref = torch.autograd.grad(loss_ref, inputs)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-3, atol=1e-3)


def test_torch_compile_fullgraph_in_kernel_eps():
    mu, logvar, _, prior = make_problem(32, 4, 3)
    fn = torch.compile(lambda *a: hv.reparam_gmm_kl(*a)[1].sum(), fullgraph=True)
    loss = fn(mu, logvar, *prior)
    grads = torch.autograd.grad(loss, [mu, logvar, *prior])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


_VARIANT_SCRIPT = r"""
import sys, torch, halfvae_ext as hv
from halfvae_ext import _C
print(_C.cpu_kernel_name())
g = torch.Generator().manual_seed(0)
mu = torch.randn(1001, 7, generator=g, requires_grad=True)
lv = torch.randn(1001, 7, generator=g, requires_grad=True)
prior = [torch.randn(7, 3, generator=g, requires_grad=True) for _ in range(3)]
z, kl = hv.reparam_gmm_kl(mu, lv, *prior, generator=torch.Generator().manual_seed(1))
grads = torch.autograd.grad(kl.sum() + z.sum(), [mu, lv, *prior])
torch.save([z, kl, *grads], sys.argv[1])
"""


def test_cpu_kernel_variants_agree(tmp_path):
    """DEFAULT, AVX2 and AVX512 builds (chosen through ATEN_CPU_CAPABILITY) compute the same."""
    results = {}
    for cap in ("default", "avx2", "avx512"):
        out = tmp_path / f"{cap}.pt"
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        proc = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT, str(out)], env=env,
                              capture_output=True, text=True, check=True)
        results[proc.stdout.strip()] = torch.load(out)
    assert "cpu-DEFAULT" in results  # the others exist only where the CPU supports them
    base = results["cpu-DEFAULT"]
    for name, tensors in results.items():
        for a, b in zip(tensors, base):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
