"""The fused ops against the plain PyTorch reference: values, every gradient, gradcheck."""
import pytest
import torch

import halfvae_ext as hv
from halfvae_ext import reference as ref

from conftest import assert_float32_close_to_truth, make_problem

# N not a multiple of the vector width (16 floats / 8 doubles), K = 1, C = 1, C = 8, a K that does
# not divide the vector width, and a K wider than the CPU kernel's pattern limit.
SHAPES = [(1, 1, 1), (7, 8, 3), (33, 5, 1), (100, 1, 8), (17, 3, 3), (64, 8, 3), (9, 16, 2),
          (5, 4099, 3), (1000, 8, 3), (513, 7, 8), (2, 1, 3), (3, 12, 5)]


def grads_of(outputs, weights, inputs):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs)


def assert_close_all(actual, expected, rtol, atol):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"output {i}: {m}")


def as_float64(tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("reduction", ["row", "none", "sum"])
@pytest.mark.parametrize("N,K,C", SHAPES)
def test_forward_and_gradients_match_reference_float32(N, K, C, reduction):
    mu, logvar, eps, prior = make_problem(N, K, C, seed=N * 131 + K * 7 + C)
    inputs = [mu, logvar, *prior]
    z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, reduction=reduction)
    inputs64 = as_float64(inputs)
    z_ref, kl_ref = ref.reparam_gmm_kl(*inputs64, eps=eps.double(), reduction=reduction)
    assert z.shape == z_ref.shape and kl.shape == kl_ref.shape
    w = (torch.randn_like(z), torch.randn_like(kl))
    got = grads_of((z, kl), w, inputs)
    want = grads_of((z_ref, kl_ref), [t.double() for t in w], inputs64)
    assert_float32_close_to_truth((z, kl, *got), (z_ref, kl_ref, *want))


@pytest.mark.parametrize("N,K,C", SHAPES)
def test_gmm_log_prob_matches_reference_float32(N, K, C):
    z, _, _, prior = make_problem(N, K, C, seed=N + K + C)
    inputs = [z, *prior]
    inputs64 = as_float64(inputs)
    lp = hv.gmm_log_prob(z, *prior)
    lp_ref = ref.gmm_log_prob(*inputs64)
    w = torch.randn_like(lp)
    got = grads_of((lp,), (w,), inputs)
    want = grads_of((lp_ref,), (w.double(),), inputs64)
    assert_float32_close_to_truth((lp, *got), (lp_ref, *want))


@pytest.mark.parametrize("N,K,C", [(1, 1, 1), (7, 3, 3), (19, 2, 4), (5, 8, 3), (4, 17, 8)])
@pytest.mark.parametrize("reduction", ["row", "none", "sum"])
def test_gradcheck_reparam_gmm_kl_float64(N, K, C, reduction):
    mu, logvar, eps, prior = make_problem(N, K, C, dtype=torch.float64, seed=N * K * C)
    fn = lambda m, lv, a, b, c: hv.reparam_gmm_kl(m, lv, a, b, c, eps=eps, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (mu, logvar, *prior), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["row", "none"])
def test_gradcheck_with_in_kernel_eps_float64(reduction):
    # A fixed generator per call makes the sampled op a deterministic function of its inputs.
    mu, logvar, _, prior = make_problem(6, 5, 3, dtype=torch.float64, seed=3)

    def fn(m, lv, a, b, c):
        g = torch.Generator().manual_seed(1234)
        return hv.reparam_gmm_kl(m, lv, a, b, c, generator=g, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (mu, logvar, *prior), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("N,K,C", [(1, 1, 1), (7, 3, 3), (19, 2, 4), (4, 17, 8)])
def test_gradcheck_gmm_log_prob_float64(N, K, C):
    z, _, _, prior = make_problem(N, K, C, dtype=torch.float64, seed=N + 5 * K + C)
    assert torch.autograd.gradcheck(hv.gmm_log_prob, (z, *prior), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("N,K,C", [(40, 8, 3), (33, 5, 1), (10, 3, 8)])
def test_float64_matches_reference_tightly(N, K, C):
    mu, logvar, eps, prior = make_problem(N, K, C, dtype=torch.float64, seed=11)
    inputs = [mu, logvar, *prior]
    out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, reduction="none")
    out_ref = ref.reparam_gmm_kl(mu, logvar, *prior, eps=eps, reduction="none")
    assert_close_all(out, out_ref, rtol=1e-12, atol=1e-12)
    w = (torch.randn_like(out[0]), torch.randn_like(out[1]))
    assert_close_all(grads_of(out, w, inputs), grads_of(out_ref, w, inputs), rtol=1e-10,
                     atol=1e-10)


def test_only_requested_gradients_are_returned():
    mu, logvar, eps, prior = make_problem(9, 4, 3)
    prior = [p.detach() for p in prior]
    z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps)
    gmu, glv = torch.autograd.grad(kl.sum() + z.sum(), [mu, logvar])
    z_r, kl_r = ref.reparam_gmm_kl(mu, logvar, *prior, eps=eps)
    gmu_r, glv_r = torch.autograd.grad(kl_r.sum() + z_r.sum(), [mu, logvar])
    torch.testing.assert_close(gmu, gmu_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glv, glv_r, rtol=1e-5, atol=1e-5)


def test_gradient_of_kl_alone_and_of_z_alone():
    mu, logvar, eps, prior = make_problem(12, 3, 3)
    inputs = [mu, logvar, *prior]
    for pick in (0, 1):
        out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps)
        out_ref = ref.reparam_gmm_kl(mu, logvar, *prior, eps=eps)
        got = torch.autograd.grad(out[pick].sum(), inputs, allow_unused=True)
        want = torch.autograd.grad(out_ref[pick].sum(), inputs, allow_unused=True)
        for g, w in zip(got, want):
            w = torch.zeros_like(g) if w is None else w
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs_give_contiguous_results():
    mu, logvar, eps, prior = make_problem(20, 6, 3, requires_grad=False)
    big = torch.randn(6, 40)
    mu_t = big[:, :20].t()  # [20, 6], non-contiguous
    lv_t = torch.randn(6, 20).t()
    eps_t = torch.randn(6, 20).t()
    pl = torch.randn(3, 6).t()
    assert not mu_t.is_contiguous() and not pl.is_contiguous()
    args = (mu_t, lv_t, pl, prior[1], prior[2])
    args_c = tuple(a.contiguous() for a in args)
    for red in ("row", "none"):
        a = hv.reparam_gmm_kl(*args, eps=eps_t, reduction=red)
        b = hv.reparam_gmm_kl(*args_c, eps=eps_t.contiguous(), reduction=red)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(hv.gmm_log_prob(mu_t, pl, prior[1], prior[2]),
                       hv.gmm_log_prob(mu_t.contiguous(), pl.contiguous(), prior[1], prior[2]))


@pytest.mark.parametrize("reduction", ["row", "none", "sum"])
def test_empty_batch(reduction):
    mu, logvar, eps, prior = make_problem(0, 4, 3)
    z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, reduction=reduction)
    assert z.shape == (0, 4)
    assert kl.shape == {"row": (0,), "none": (0, 4), "sum": ()}[reduction]
    z2, kl2 = hv.reparam_gmm_kl(mu, logvar, *prior, reduction=reduction)  # in-kernel eps
    assert z2.shape == (0, 4)
    loss = kl.sum() + z.sum()
    grads = torch.autograd.grad(loss, [mu, logvar, *prior])
    assert grads[0].shape == (0, 4)
    for g, p in zip(grads[2:], prior):
        assert g.shape == p.shape and torch.count_nonzero(g) == 0
    assert hv.gmm_log_prob(mu, *prior).shape == (0, 4)


def test_extreme_values_give_finite_results_and_gradients():
    # logvar anywhere in [-30, 30], z far from every component, prior variances down to 1e-6.
    N, K, C = 64, 4, 3
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        logvar = torch.linspace(-30, 30, N * K, dtype=dtype).view(N, K).requires_grad_()
        mu = (torch.randn(N, K, generator=g, dtype=dtype) * 1e3).requires_grad_()
        eps = torch.randn(N, K, generator=g, dtype=dtype)
        logits = torch.randn(K, C, dtype=dtype, requires_grad=True)
        means = torch.randn(K, C, dtype=dtype, requires_grad=True)
        logvars = torch.full((K, C), torch.log(torch.tensor(1e-6)).item(), dtype=dtype,
                             requires_grad=True)
        z, kl = hv.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps, reduction="none")
        grads = torch.autograd.grad(kl.sum() + z.sum(), [mu, logvar, logits, means, logvars])
        assert torch.isfinite(z).all() and torch.isfinite(kl).all()
        for grad in grads:
            assert torch.isfinite(grad).all()
        lp = hv.gmm_log_prob(z.detach().requires_grad_(), logits, means, logvars)
        assert torch.isfinite(lp).all()
    # Where the float64 reference is itself accurate, the fused op agrees with it.
    mu64, lv64 = mu.detach(), logvar.detach()
    z_r, kl_r = ref.reparam_gmm_kl(mu64, lv64, logits, means, logvars, eps=eps, reduction="none")
    torch.testing.assert_close(kl.detach(), kl_r.detach(), rtol=1e-9, atol=1e-6)


def test_prior_gradients_are_deterministic_and_thread_count_independent():
    mu, logvar, eps, prior = make_problem(50_000, 8, 3, seed=5)
    inputs = [mu, logvar, *prior]

    def run():
        z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps)
        return torch.autograd.grad(kl.sum() + z.sum(), inputs)

    threads = torch.get_num_threads()
    try:
        first = run()
        again = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)
