"""CUDA kernels against the reference and the CPU kernels. Skipped without a GPU."""
import pytest
import torch

import halfvae_ext as hv
from halfvae_ext import reference as ref
from halfvae_ext.ops import draw_seed

from conftest import make_problem, requires_cuda

pytestmark = requires_cuda

SHAPES = [(1, 1, 1), (7, 8, 3), (33, 5, 1), (100, 1, 8), (1000, 8, 3), (513, 7, 8), (5, 4099, 3),
          (3, 1031, 2)]


def to_cuda(tensors):
    return [t.detach().cuda().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("reduction", ["row", "none", "sum"])
@pytest.mark.parametrize("N,K,C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_float64_reference(N, K, C, reduction, dtype):
    mu, logvar, eps, prior = make_problem(N, K, C, dtype=dtype, seed=N + K + C)
    inputs = to_cuda([mu, logvar, *prior])
    eps = eps.cuda()
    z, kl = hv.reparam_gmm_kl(*inputs, eps=eps, reduction=reduction)
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    z_r, kl_r = ref.reparam_gmm_kl(*in64, eps=eps.double(), reduction=reduction)
    w = (torch.randn_like(z), torch.randn_like(kl))
    got = torch.autograd.grad((z * w[0]).sum() + (kl * w[1]).sum(), inputs)
    want = torch.autograd.grad((z_r * w[0].double()).sum() + (kl_r * w[1].double()).sum(), in64)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, t in zip((z, kl, *got), (z_r, kl_r, *want)):
        torch.testing.assert_close(a.double(), t, rtol=10 * tol,
                                   atol=tol * max(1.0, t.abs().max().item()) if t.numel() else tol)


@pytest.mark.parametrize("N,K,C", SHAPES)
def test_cuda_gmm_log_prob(N, K, C):
    z, _, _, prior = make_problem(N, K, C, dtype=torch.float64, seed=N)
    inputs = to_cuda([z, *prior])
    lp = hv.gmm_log_prob(*inputs)
    lp_r = ref.gmm_log_prob(*inputs)
    w = torch.randn_like(lp)
    for a, b in zip(torch.autograd.grad((lp * w).sum(), inputs),
                    torch.autograd.grad((lp_r * w).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lp, lp_r, rtol=1e-10, atol=1e-10)


def test_cuda_gradcheck_float64():
    mu, logvar, eps, prior = make_problem(7, 3, 3, dtype=torch.float64)
    inputs = to_cuda([mu, logvar, *prior])
    eps = eps.cuda()
    fn = lambda *a: hv.reparam_gmm_kl(*a, eps=eps, reduction="none")
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(hv.gmm_log_prob, [inputs[0], *inputs[2:]], eps=1e-6,
                                    atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types_computed_in_float32(dtype):
    mu, logvar, eps, prior = make_problem(300, 8, 3, dtype=dtype)
    inputs = to_cuda([mu, logvar, *prior])
    z, kl = hv.reparam_gmm_kl(*inputs, eps=eps.cuda())
    assert z.dtype == dtype and kl.dtype == dtype
    in32 = [t.detach().float().requires_grad_() for t in inputs]
    z_r, kl_r = ref.reparam_gmm_kl(*in32, eps=eps.cuda().float())
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(z.float(), z_r, rtol=tol, atol=tol)
    torch.testing.assert_close(kl.float(), kl_r, rtol=tol, atol=tol * 10)
    grads = torch.autograd.grad(kl.float().sum(), inputs)
    grads_r = torch.autograd.grad(kl_r.sum(), in32)
    for g, gr in zip(grads, grads_r):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), gr, rtol=tol * 5,
                                   atol=tol * 5 * max(1.0, gr.abs().max().item()))


def test_cuda_draws_match_the_cpu_stream_and_are_normal():
    from scipy import stats
    seed = torch.tensor([123456789, 42], dtype=torch.int64)
    cpu = hv.philox_normal(seed, 10**6, dtype=torch.float64)
    gpu = hv.philox_normal(seed.cuda(), 10**6, dtype=torch.float64).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-9)
    x = hv.philox_normal(seed.cuda(), 10**6).cpu().double().numpy()
    assert stats.kstest(x, "norm").pvalue > 1e-3


@pytest.mark.parametrize("reduction", ["row", "none"])
def test_cuda_in_kernel_eps_and_backward_regeneration(reduction):
    mu, logvar, _, prior = make_problem(77, 6, 3)
    inputs = to_cuda([mu, logvar, *prior])
    g = torch.Generator(device="cuda").manual_seed(5)
    seed = draw_seed(torch.Generator(device="cuda").manual_seed(5), "cuda")
    eps = hv.philox_normal(seed, (77, 6))
    z, kl = hv.reparam_gmm_kl(*inputs, generator=g, reduction=reduction)
    z_r, kl_r = hv.reparam_gmm_kl(*inputs, eps=eps, reduction=reduction)
    torch.testing.assert_close(z, z_r)
    torch.testing.assert_close(kl, kl_r)
    a = torch.autograd.grad(kl.sum() + z.sum(), inputs)
    b = torch.autograd.grad(kl_r.sum() + z_r.sum(), inputs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)
    g2 = torch.Generator(device="cuda").manual_seed(5)
    z2, _ = hv.reparam_gmm_kl(*inputs, generator=g2, reduction=reduction)
    z3, _ = hv.reparam_gmm_kl(*inputs, generator=g2, reduction=reduction)
    assert torch.equal(z, z2) and not torch.equal(z2, z3)


def test_cuda_runs_on_the_current_stream():
    mu, logvar, eps, prior = make_problem(4096, 8, 3)
    inputs = to_cuda([mu, logvar, *prior])
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        z, kl = hv.reparam_gmm_kl(*inputs, eps=eps.cuda())
    s.synchronize()
    z_r, kl_r = ref.reparam_gmm_kl(*inputs, eps=eps.cuda())
    torch.testing.assert_close(kl, kl_r, rtol=1e-4, atol=1e-3)


def test_cuda_torch_compile_fullgraph():
    mu, logvar, eps, prior = make_problem(64, 8, 3)
    inputs = to_cuda([mu, logvar, *prior])
    fn = torch.compile(lambda *a: hv.reparam_gmm_kl(*a, eps=eps.cuda())[1].sum(), fullgraph=True)
    loss = fn(*inputs)
    loss_r = ref.reparam_gmm_kl(*inputs, eps=eps.cuda())[1].sum()
    torch.testing.assert_close(loss, loss_r, rtol=1e-4, atol=1e-3)


def test_cuda_opcheck():
    mu, logvar, eps, prior = make_problem(11, 5, 3, dtype=torch.float64)
    inputs = to_cuda([mu, logvar, *prior])
    torch.library.opcheck(torch.ops.halfvae_ext.reparam_gmm_kl, (*inputs, eps.cuda(), None, 1))


def test_cuda_empty_and_mixed_device_errors():
    mu, logvar, eps, prior = make_problem(0, 4, 3)
    z, kl = hv.reparam_gmm_kl(*to_cuda([mu, logvar, *prior]))
    assert z.shape == (0, 4) and kl.shape == (0,)
    mu, logvar, eps, prior = make_problem(3, 4, 3)
    with pytest.raises(ValueError, match="is on"):
        hv.reparam_gmm_kl(mu.cuda(), logvar, *prior, eps=eps)


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_properties(0).total_memory < 60 * 2**30,
                    reason="needs a GPU with 60 GB")
def test_cuda_more_than_2_pow_31_elements():
    # 64-bit indexing: N*K = 2^31 + 8; check the last rows against the reference.
    N, K = 2**28 + 1, 8
    mu = torch.zeros(N, K, device="cuda")
    logvar = torch.zeros(N, K, device="cuda")
    mu[-1] = torch.arange(K, device="cuda", dtype=torch.float32)
    prior = [torch.zeros(K, 3, device="cuda") for _ in range(3)]
    z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, generator=torch.Generator("cuda").manual_seed(0))
    seed = draw_seed(torch.Generator("cuda").manual_seed(0), "cuda")
    eps_tail = hv.philox_normal(seed, N * K)[-K:].view(1, K)
    z_r, kl_r = ref.reparam_gmm_kl(mu[-1:], logvar[-1:], *prior, eps=eps_tail)
    torch.testing.assert_close(z[-1:], z_r)
    torch.testing.assert_close(kl[-1:], kl_r, rtol=1e-5, atol=1e-4)
    del z, kl
    g = torch.autograd.grad  # backward over the same size
    mu.requires_grad_()
    z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, generator=torch.Generator("cuda").manual_seed(0))
    (gmu,) = g(kl.sum(), [mu])
    assert torch.isfinite(gmu[-1]).all()
