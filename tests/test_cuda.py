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


def test_cuda_draws_match_the_cpu_stream_and_are_normal():
    from scipy import stats
    seed = torch.tensor([123456789, 42], dtype=torch.int64)
    cpu = hv.philox_normal(seed, 10**6, dtype=torch.float64)
    gpu = hv.philox_normal(seed.cuda(), 10**6, dtype=torch.float64).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-9)
    # float32: the same counters and uniforms, normals equal up to float32 rounding (Sleef on the
    # CPU, sincospif/logf on CUDA), not bit for bit.
    cpu32 = hv.philox_normal(seed, 10**6)
    gpu32 = hv.philox_normal(seed.cuda(), 10**6).cpu()
    torch.testing.assert_close(gpu32, cpu32, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(gpu32.double(), cpu, rtol=2e-6, atol=2e-6)
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
    """Every op launches on the current stream. The inputs are NaN until a copy on a side stream
    s fills them, and that copy waits behind a long sleep on s: an op launched on s sees the
    values, one launched on any other stream would run first and read the NaNs."""
    N, K, C = 4096, 8, 3
    mu, logvar, eps, prior = make_problem(N, K, C)
    real = to_cuda([mu, logvar, *prior])
    eps = eps.cuda()
    nan_inputs = [torch.full_like(t, float("nan")).requires_grad_(t.requires_grad) for t in real]
    table_mu, table_lv = (torch.full((N, K), float("nan"), device="cuda") for _ in range(2))
    state = torch.zeros(N, 4, K, device="cuda")
    idx = torch.randint(0, N, (N,), device="cuda")
    g = torch.randn(N, K, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time on s
        with torch.no_grad():
            for t, value in zip(nan_inputs, real):
                t.copy_(value)
            table_mu.copy_(real[0])
            table_lv.copy_(real[1])
        z, kl = hv.reparam_gmm_kl(*nan_inputs, eps=eps)
        grads = torch.autograd.grad(kl.sum() + z.sum(), nan_inputs)
        lp = hv.gmm_log_prob(z.detach(), *nan_inputs[2:])
        torch.ops.halfvae_ext.latent_rows_update_(table_mu, table_lv, state, idx, g, g, "adam",
                                                  0.1, 0.9, 0.999, 1e-8, 1)
    torch.cuda.synchronize()
    z_r, kl_r = ref.reparam_gmm_kl(*real, eps=eps)
    torch.testing.assert_close(kl, kl_r, rtol=1e-4, atol=1e-3)
    for a, b in zip(grads, torch.autograd.grad(kl_r.sum() + z_r.sum(), real)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * max(1.0, b.abs().max().item()))
    torch.testing.assert_close(lp, ref.gmm_log_prob(z_r.detach(), *real[2:]), rtol=1e-4,
                               atol=1e-3)
    assert torch.isfinite(table_mu).all() and torch.isfinite(table_lv).all()


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


# ----------------------------------------------------------------------------- the general kernels
# kl="bound" and priors chosen per row (prior_index, prior tensors [U, K, C]) run the general
# kernels. U = None: one prior [K, C] (the bound only); U = 1: a group index that never changes a
# lane's prior; U = 7 and 40: lanes change groups from row to row; "7s": U = 7 with the index
# sorted (long runs of one group, the prior and sums moved at run boundaries only).
GROUPS = [None, 1, 7, 40, "7s"]
# (N, K, C): C = 3 is the unrolled kernel, others the runtime-C one. The prior sums table
# U*K*(3C+1) doubles is staged in shared memory up to 6144 entries and added to global memory
# directly beyond: (64, 300, 3) with U >= 7 and (33, 11, 8) with U = 40 take the global path.
GENERAL_SHAPES = [(300, 8, 3), (64, 300, 3), (97, 5, 2), (33, 11, 8), (5, 1, 1)]


def grouped_prior(K, C, groups, N, dtype=torch.float64, seed=0):
    """Prior tensors [U, K, C] (leaves requiring grad) and prior_index [N] on the CPU for an entry
    of GROUPS; None, None for groups=None."""
    if groups is None:
        return None, None
    U = 7 if groups == "7s" else groups
    g = torch.Generator().manual_seed(seed)
    prior = tuple((torch.randn(U, K, C, generator=g, dtype=torch.float64) * scale).to(dtype)
                  .requires_grad_() for scale in (1.0, 2.0, 0.5))
    index = torch.randint(0, U, (N,), generator=g)
    return prior, index.sort().values if groups == "7s" else index


def grouped_problem(N, K, C, groups, dtype=torch.float64, seed=0):
    """make_problem with the prior and prior_index of grouped_prior (make_problem's [K, C] prior
    and None for groups=None)."""
    mu, logvar, eps, prior = make_problem(N, K, C, dtype=dtype, seed=seed)
    if groups is None:
        return mu, logvar, eps, prior, None
    return (mu, logvar, eps, *grouped_prior(K, C, groups, N, dtype, seed + 1))


def assert_close_to_float64(got, want, dtype):
    """got (a kernel's result in dtype) against a float64 reference: the tolerances of
    test_cuda_matches_float64_reference."""
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, t in zip(got, want):
        assert a.shape == t.shape
        scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        torch.testing.assert_close(a.double(), t, rtol=10 * tol, atol=tol * scale)


@pytest.mark.parametrize("reduction", ["row", "none"])
@pytest.mark.parametrize("kl", ["mc", "bound"])
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("N,K,C", GENERAL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_general_kernels_match_float64_reference(N, K, C, groups, kl, reduction, dtype):
    if groups is None and kl == "mc":
        pytest.skip("the specialized kernels: test_cuda_matches_float64_reference")
    mu, logvar, eps, prior, index = grouped_problem(N, K, C, groups, dtype, seed=N + K + C)
    inputs = to_cuda([mu, logvar, *prior])
    eps = eps.cuda()
    index = None if index is None else index.cuda()
    z, kl_out = hv.reparam_gmm_kl(*inputs, eps=eps, reduction=reduction, prior_index=index, kl=kl)
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    z_r, kl_r = ref.reparam_gmm_kl(*in64, eps=eps.double(), reduction=reduction,
                                   prior_index=index, kl=kl)
    w = (torch.randn_like(z), torch.randn_like(kl_out))
    got = torch.autograd.grad((z * w[0]).sum() + (kl_out * w[1]).sum(), inputs, retain_graph=True)
    want = torch.autograd.grad((z_r * w[0].double()).sum() + (kl_r * w[1].double()).sum(), in64)
    assert_close_to_float64((z, kl_out, *got), (z_r, kl_r, *want), dtype)
    # Without prior gradients (no sums table): the same latent gradients.
    got_latent = torch.autograd.grad((z * w[0]).sum() + (kl_out * w[1]).sum(), inputs[:2])
    for a, b in zip(got_latent, got[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_prior_index_int32_equals_int64():
    mu, logvar, eps, prior, index = grouped_problem(200, 8, 3, 40)
    inputs = to_cuda([mu, logvar, *prior])
    for kl in ("mc", "bound"):
        a = hv.reparam_gmm_kl(*inputs, eps=eps.cuda(), prior_index=index.cuda(), kl=kl)
        b = hv.reparam_gmm_kl(*inputs, eps=eps.cuda(), prior_index=index.int().cuda(), kl=kl)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["row", "none"])
@pytest.mark.parametrize("kl", ["mc", "bound"])
@pytest.mark.parametrize("groups", [None, 40])
def test_cuda_general_kernels_in_kernel_eps(groups, kl, reduction):
    """The general kernels draw the same Philox stream as philox_normal, and the backward draws it
    again."""
    if groups is None and kl == "mc":
        pytest.skip("the specialized kernels: test_cuda_in_kernel_eps_and_backward_regeneration")
    N, K = 77, 6
    mu, logvar, _, prior, index = grouped_problem(N, K, 3, groups, torch.float32)
    inputs = to_cuda([mu, logvar, *prior])
    index = None if index is None else index.cuda()
    seed = draw_seed(torch.Generator(device="cuda").manual_seed(5), "cuda")
    eps = hv.philox_normal(seed, (N, K))
    z, kl_out = hv.reparam_gmm_kl(*inputs, generator=torch.Generator(device="cuda").manual_seed(5),
                                  reduction=reduction, prior_index=index, kl=kl)
    z_r, kl_r = hv.reparam_gmm_kl(*inputs, eps=eps, reduction=reduction, prior_index=index, kl=kl)
    torch.testing.assert_close(z, z_r)
    torch.testing.assert_close(kl_out, kl_r)
    for x, y in zip(torch.autograd.grad(kl_out.sum() + z.sum(), inputs),
                    torch.autograd.grad(kl_r.sum() + z_r.sum(), inputs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)
    if kl == "bound":  # the bound does not depend on eps
        _, kl_other = hv.reparam_gmm_kl(*inputs, eps=torch.randn_like(eps), reduction=reduction,
                                        prior_index=index, kl=kl)
        torch.testing.assert_close(kl_other, kl_out)


def interleaved(mu, logvar):
    """mu and logvar as the two halves of one [rows, 2, K] table (row stride 2K)."""
    both = torch.stack([mu.detach(), logvar.detach()], dim=1)
    return both[:, 0], both[:, 1]


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("reduction", ["row", "none"])
@pytest.mark.parametrize("kl", ["mc", "bound"])
@pytest.mark.parametrize("groups", GROUPS)
def test_cuda_rows_ops_general_match_reference(groups, kl, reduction, layout):
    """reparam_gmm_kl_rows and its backward (one gradient per gathered row, prior gradients) with
    prior_index aligned with idx (duplicates in idx, each with its own group), float64."""
    if groups is None and kl == "mc":
        pytest.skip("the specialized kernels: test_latent_tables.py")
    rows, K, C, B = 300, 5, 3, 1000
    g = torch.Generator().manual_seed(5)
    table_mu = torch.randn(rows, K, generator=g, dtype=torch.float64).cuda()
    table_lv = (0.5 * torch.randn(rows, K, generator=g, dtype=torch.float64)).cuda()
    if layout == "interleaved":
        table_mu, table_lv = interleaved(table_mu, table_lv)
    prior, index = grouped_prior(K, C, groups, B, seed=3)  # index: one group per gathered row
    if groups is None:
        prior = make_problem(1, K, C, dtype=torch.float64, seed=3)[3]
    prior = [p.detach().cuda() for p in prior]
    index = None if index is None else index.cuda()
    idx = torch.randint(0, rows, (B,), generator=g).cuda()  # B > rows: duplicates
    eps, grad_z = (torch.randn(B, K, generator=g, dtype=torch.float64).cuda() for _ in range(2))
    code = 1 if reduction == "row" else 0
    kl_code = 1 if kl == "bound" else 0
    grad_kl = torch.randn((B,) if code == 1 else (B, K), generator=g, dtype=torch.float64).cuda()
    ops = torch.ops.halfvae_ext
    z, kl_out = ops.reparam_gmm_kl_rows(table_mu, table_lv, idx, *prior, eps, None, code, 0,
                                        index, kl_code)
    grads = ops.reparam_gmm_kl_rows_backward(grad_z, grad_kl, table_mu, table_lv, idx, *prior,
                                             eps, None, code, True, index, kl_code)
    leaves = [t.detach().clone().requires_grad_()
              for t in (table_mu[idx], table_lv[idx], *prior)]
    z_r, kl_r = ref.reparam_gmm_kl(*leaves, eps=eps, reduction=reduction, prior_index=index,
                                   kl=kl)
    want = torch.autograd.grad((z_r * grad_z).sum() + (kl_r * grad_kl).sum(), leaves)
    assert_close_to_float64((z, kl_out, *grads), (z_r, kl_r, *want), torch.float64)
    # In-kernel eps: the same as the stream's eps given.
    seed = draw_seed(torch.Generator(device="cuda").manual_seed(6), "cuda")
    eps_s = hv.philox_normal(seed, (B, K), dtype=torch.float64)
    for a, b in zip(ops.reparam_gmm_kl_rows(table_mu, table_lv, idx, *prior, None, seed, code, 0,
                                            index, kl_code),
                    ops.reparam_gmm_kl_rows(table_mu, table_lv, idx, *prior, eps_s, None, code, 0,
                                            index, kl_code)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(ops.reparam_gmm_kl_rows_backward(grad_z, grad_kl, table_mu, table_lv, idx,
                                                     *prior, None, seed, code, True, index,
                                                     kl_code),
                    ops.reparam_gmm_kl_rows_backward(grad_z, grad_kl, table_mu, table_lv, idx,
                                                     *prior, eps_s, None, code, True, index,
                                                     kl_code)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("kl", ["mc", "bound"])
@pytest.mark.parametrize("groups", [None, 1, 7, 40])
def test_cuda_fused_table_step_general_matches_reference(groups, kl, kind):
    """reparam_gmm_kl_rows_backward_step_ (the general backward, then latent_rows_update_) with the
    rows' gradients from other terms, on an interleaved table: the table after one SparseAdam (or
    SGD) step on the reference's gradients, and the prior's gradients, float64."""
    if groups is None and kl == "mc":
        pytest.skip("the specialized kernels: test_latent_tables.py")
    rows, K, C, B = 500, 8, 3, 256
    prior, index = grouped_prior(K, C, groups, B, seed=7)
    if groups is None:
        prior = make_problem(1, K, C, dtype=torch.float64, seed=7)[3]
    g = torch.Generator().manual_seed(8)
    mu0 = torch.randn(rows, K, generator=g, dtype=torch.float64).cuda()
    lv0 = (0.3 * torch.randn(rows, K, generator=g, dtype=torch.float64)).cuda()
    idx = torch.randint(0, 100, (B,), generator=g).cuda()  # duplicates
    eps, grad_z, gm, gl = (torch.randn(B, K, generator=g, dtype=torch.float64).cuda()
                           for _ in range(4))
    grad_kl = torch.randn(B, generator=g, dtype=torch.float64).cuda()
    prior = [p.detach().cuda() for p in prior]
    index = None if index is None else index.cuda()
    # Reference: sparse gradients of the gathered rows, summed over duplicates, and the step.
    mu_r, lv_r = mu0.clone().requires_grad_(), lv0.clone().requires_grad_()
    prior_r = [p.clone().requires_grad_() for p in prior]
    gathered = (torch.nn.functional.embedding(idx, mu_r, sparse=True),
                torch.nn.functional.embedding(idx, lv_r, sparse=True))
    z, kl_r = ref.reparam_gmm_kl(*gathered, *prior_r, eps=eps, prior_index=index, kl=kl)
    loss = ((z * grad_z).sum() + (kl_r * grad_kl).sum() + (gathered[0] * gm).sum()
            + (gathered[1] * gl).sum())
    loss.backward()
    opt = (torch.optim.SparseAdam([mu_r, lv_r], lr=0.05) if kind == "adam"
           else torch.optim.SGD([mu_r, lv_r], lr=0.05))
    opt.step()
    mu, logvar = interleaved(mu0, lv0)
    state = torch.zeros(rows, 4 if kind == "adam" else 0, K, dtype=torch.float64, device="cuda")
    prior_grads = torch.ops.halfvae_ext.reparam_gmm_kl_rows_backward_step_(
        grad_z, grad_kl, gm, gl, mu, logvar, state, idx, *prior, eps, None, 1, True, kind, 0.05,
        0.9, 0.999, 1e-8, 1, index, 1 if kl == "bound" else 0)
    torch.testing.assert_close(mu, mu_r.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logvar, lv_r.detach(), rtol=1e-10, atol=1e-10)
    assert_close_to_float64(prior_grads, [p.grad for p in prior_r], torch.float64)


@pytest.mark.parametrize("groups", [1, 7, 40, "7s"])
@pytest.mark.parametrize("N,K,C", GENERAL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_gmm_log_prob_prior_index(N, K, C, groups, dtype):
    z, _, _, prior, index = grouped_problem(N, K, C, groups, dtype, seed=N)
    inputs = to_cuda([z, *prior])
    index = index.cuda()
    lp = hv.gmm_log_prob(*inputs, prior_index=index)
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    lp_r = ref.gmm_log_prob(*in64, prior_index=index)
    w = torch.randn_like(lp)
    got = torch.autograd.grad((lp * w).sum(), inputs)
    want = torch.autograd.grad((lp_r * w.double()).sum(), in64)
    assert_close_to_float64((lp, *got), (lp_r, *want), dtype)
    # Without prior gradients (no sums table): the same gradient of z.
    (g_z,) = torch.autograd.grad((hv.gmm_log_prob(*inputs, prior_index=index) * w).sum(),
                                 inputs[:1])
    torch.testing.assert_close(g_z, got[0], rtol=0, atol=0)


# Unit roundoff of the half types: round to nearest is off by at most unit * |x|.
HALF_UNITS = [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)]


@pytest.mark.parametrize("reduction", ["row", "none"])
@pytest.mark.parametrize("kl", ["mc", "bound"])
@pytest.mark.parametrize("groups", [None, 7])
@pytest.mark.parametrize("N,K,C", [(300, 8, 3), (97, 5, 2)])
@pytest.mark.parametrize("dtype,unit", HALF_UNITS)
def test_cuda_half_types_round_once(dtype, unit, N, K, C, groups, kl, reduction):
    """float16/bfloat16 inputs are computed in float32 and every output is rounded once: against
    the float64 reference on the same (rounded) inputs and upstream gradients, the error is one
    rounding, unit * |x| (about 4e-3 bfloat16, 5e-4 float16), plus float32 arithmetic, well under
    2^-16 of the largest value. groups=None with kl="mc": the specialized kernels; the others:
    the general ones. A second rounding anywhere (an intermediate stored in the half type) fails
    this, a looser tolerance would hide it."""
    mu, logvar, eps, prior, index = grouped_problem(N, K, C, groups, dtype, seed=N + K)
    inputs = to_cuda([mu, logvar, *prior])
    eps = eps.cuda()
    index = None if index is None else index.cuda()
    z, kl_out = hv.reparam_gmm_kl(*inputs, eps=eps, reduction=reduction, prior_index=index, kl=kl)
    assert z.dtype == dtype and kl_out.dtype == dtype
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    z_r, kl_r = ref.reparam_gmm_kl(*in64, eps=eps.double(), reduction=reduction,
                                   prior_index=index, kl=kl)
    w = (torch.randn(z.shape).to(dtype).cuda(), torch.randn(kl_out.shape).to(dtype).cuda())
    # The op's backward receives exactly w (the upstream gradients of these sums).
    got = torch.autograd.grad((z * w[0]).sum() + (kl_out * w[1]).sum(), inputs)
    want = torch.autograd.grad((z_r * w[0].double()).sum() + (kl_r * w[1].double()).sum(), in64)
    for a, t in zip((z, kl_out, *got), (z_r, kl_r, *want)):
        assert a.dtype == dtype
        scale = max(1.0, t.abs().max().item())
        torch.testing.assert_close(a.double(), t, rtol=unit, atol=2.0**-16 * scale)


@pytest.mark.parametrize("dtype,unit", HALF_UNITS)
def test_cuda_gmm_log_prob_prior_index_half_types_round_once(dtype, unit):
    z, _, _, prior, index = grouped_problem(300, 8, 3, 7, dtype)
    inputs = to_cuda([z, *prior])
    index = index.cuda()
    lp = hv.gmm_log_prob(*inputs, prior_index=index)
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    lp_r = ref.gmm_log_prob(*in64, prior_index=index)
    w = torch.randn(lp.shape).to(dtype).cuda()
    got = torch.autograd.grad((lp * w).sum(), inputs)
    want = torch.autograd.grad((lp_r * w.double()).sum(), in64)
    for a, t in zip((lp, *got), (lp_r, *want)):
        assert a.dtype == dtype
        scale = max(1.0, t.abs().max().item())
        torch.testing.assert_close(a.double(), t, rtol=unit, atol=2.0**-16 * scale)


def test_cuda_opcheck_prior_index_and_bound():
    mu, logvar, eps, prior, index = grouped_problem(11, 5, 3, 4)
    inputs = to_cuda([mu, logvar, *prior])
    ops = torch.ops.halfvae_ext
    for kl_code in (0, 1):
        torch.library.opcheck(ops.reparam_gmm_kl,
                              (*inputs, eps.cuda(), None, 1, index.cuda(), kl_code))
    torch.library.opcheck(ops.gmm_log_prob, (inputs[0], *inputs[2:], index.cuda()))


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_properties(0).total_memory < 60 * 2**30,
                    reason="needs a GPU with 60 GB")
@pytest.mark.parametrize("general", [False, True])
def test_cuda_more_than_2_pow_31_elements(general):
    # 64-bit indexing: N*K = 2^31 + 8; check the last rows against the reference. general: the KL
    # bound with a prior chosen per row (the general kernels), the last row in a group of its own.
    N, K = 2**28 + 1, 8
    mu = torch.zeros(N, K, device="cuda")
    logvar = torch.zeros(N, K, device="cuda")
    mu[-1] = torch.arange(K, device="cuda", dtype=torch.float32)
    prior = [torch.zeros(K, 3, device="cuda") for _ in range(3)]
    options, last = {}, {}
    if general:
        g = torch.Generator().manual_seed(0)
        prior = [torch.randn(3, K, 3, generator=g).cuda().requires_grad_() for _ in range(3)]
        index = torch.zeros(N, dtype=torch.int64, device="cuda")
        index[-1] = 2
        options, last = dict(prior_index=index, kl="bound"), dict(prior_index=index[-1:],
                                                                  kl="bound")
    z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, generator=torch.Generator("cuda").manual_seed(0),
                              **options)
    seed = draw_seed(torch.Generator("cuda").manual_seed(0), "cuda")
    # The first and last rows' eps from the stream (philox_normal_rows: without drawing, and
    # keeping alive, the 8 GiB in between).
    ends = torch.tensor([0, N - 1], device="cuda")
    eps_ends = hv.philox_normal_rows(seed, ends, K)
    first = dict(prior_index=index[:1], kl="bound") if general else {}
    z_r, kl_r = ref.reparam_gmm_kl(mu[-1:], logvar[-1:], *prior, eps=eps_ends[1:], **last)
    torch.testing.assert_close(z[-1:], z_r)
    torch.testing.assert_close(kl[-1:], kl_r, rtol=1e-5, atol=1e-4)
    z_0, kl_0 = ref.reparam_gmm_kl(mu[:1], logvar[:1], *prior, eps=eps_ends[:1], **first)
    torch.testing.assert_close(z[:1], z_0)
    torch.testing.assert_close(kl[:1], kl_0, rtol=1e-5, atol=1e-4)
    del z, kl
    g = torch.autograd.grad  # backward over the same size
    mu.requires_grad_()
    z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, generator=torch.Generator("cuda").manual_seed(0),
                              **options)
    gmu, *prior_grads = g(kl.sum(), [mu, *prior] if general else [mu])
    del z, kl
    # The last row's gradients (the elements past 2^31; grad_mu starts uninitialized, so an
    # element the kernel missed would hold garbage), and the first row's.
    mu_last = mu[-1:].detach().requires_grad_()
    leaves = [mu_last, *prior] if general else [mu_last]
    gmu_r, *prior_r = g(ref.reparam_gmm_kl(mu_last, logvar[-1:], *prior, eps=eps_ends[1:],
                                           **last)[1].sum(), leaves)
    torch.testing.assert_close(gmu[-1:], gmu_r, rtol=1e-4, atol=1e-4)
    mu_first = mu[:1].detach().requires_grad_()
    (gmu_0,) = g(ref.reparam_gmm_kl(mu_first, logvar[:1], *prior, eps=eps_ends[:1],
                                    **first)[1].sum(), [mu_first])
    torch.testing.assert_close(gmu[:1], gmu_0, rtol=1e-4, atol=1e-4)
    if general:
        # Group 2 is the last row's alone: its prior gradients are that row's, summed past 2^31.
        for got, want in zip(prior_grads, prior_r):
            torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- determinism
@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for the test; the previous setting after."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("groups", [None, 7])
@pytest.mark.parametrize("K", [7, 8, 9, 12])
def test_cuda_deterministic_mode_row_kl(K, groups, deterministic):
    """Row sums by atomics depend on their order once a row spans more than two groups of 4
    (K = 7, K >= 9). In deterministic mode the kernel writes the elements and a torch reduction
    sums them: kl equals the "none" kl summed by torch, bit for bit, run after run."""
    N = 3000
    mu, logvar, eps, prior, index = grouped_problem(N, K, 3, groups, torch.float32)
    inputs = [t.detach().cuda() for t in (mu, logvar, *prior)]
    eps = eps.cuda()
    index = None if index is None else index.cuda()
    kl_none = hv.reparam_gmm_kl(*inputs, eps=eps, reduction="none", prior_index=index)[1]
    runs = [hv.reparam_gmm_kl(*inputs, eps=eps, prior_index=index)[1] for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    if K in (7, 9, 12):
        assert torch.equal(runs[0], kl_none.sum(1))
    kl_r = ref.reparam_gmm_kl(*[t.double() for t in inputs], eps=eps.double(),
                              prior_index=index)[1]
    torch.testing.assert_close(runs[0].double(), kl_r, rtol=1e-5, atol=1e-4)


def test_cuda_deterministic_mode_refuses_prior_gradients(deterministic):
    """The prior's gradients are sums by atomics: torch's deterministic mode raises (or, with
    warn_only, warns); the latent gradients alone are deterministic and allowed."""
    mu, logvar, eps, prior = make_problem(500, 8, 3)
    inputs = to_cuda([mu, logvar, *prior])
    eps = eps.cuda()
    fixed_prior = [p.detach() for p in inputs[2:]]
    z, kl = hv.reparam_gmm_kl(*inputs[:2], *fixed_prior, eps=eps)
    a = torch.autograd.grad(kl.sum() + z.sum(), inputs[:2])
    z, kl = hv.reparam_gmm_kl(*inputs[:2], *fixed_prior, eps=eps)
    b = torch.autograd.grad(kl.sum() + z.sum(), inputs[:2])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    z, kl = hv.reparam_gmm_kl(*inputs, eps=eps)
    with pytest.raises(RuntimeError, match="reparam_gmm_kl backward.*deterministic"):
        torch.autograd.grad(kl.sum(), inputs)
    lp = hv.gmm_log_prob(z.detach(), *inputs[2:])
    with pytest.raises(RuntimeError, match="gmm_log_prob backward.*deterministic"):
        torch.autograd.grad(lp.sum(), inputs[2:])
    torch.use_deterministic_algorithms(True, warn_only=True)
    z, kl = hv.reparam_gmm_kl(*inputs, eps=eps)
    with pytest.warns(UserWarning, match="reparam_gmm_kl backward"):
        torch.autograd.grad(kl.sum(), inputs)


# ----------------------------------------------------------------------------- the table step
@pytest.mark.parametrize("pattern", ["one row", "all distinct", "reversed", "duplicates",
                                     "one index"])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_cuda_update_grouping_equals_cpu(pattern, kind):
    """latent_rows_update_ groups indices on the device (the first thread of each run of a
    stable sort sums the run in batch order): the same table as the CPU's, float64, for runs of
    every length."""
    rows, K, B = 1000, 5, 3000
    g = torch.Generator().manual_seed(1)
    idx = {"one row": torch.full((B,), 17),
           "all distinct": torch.randperm(rows, generator=g),
           "reversed": torch.arange(rows - 1, -1, -1),
           "duplicates": torch.randint(0, 50, (B,), generator=g),
           "one index": torch.tensor([rows - 1])}[pattern]
    n = idx.shape[0]
    mu, logvar = (torch.randn(rows, K, generator=g, dtype=torch.float64) for _ in range(2))
    state = torch.rand(rows, 4 if kind == "adam" else 0, K, generator=g, dtype=torch.float64)
    gm, gl = (torch.randn(n, K, generator=g, dtype=torch.float64) for _ in range(2))
    out = {}
    for device in ("cpu", "cuda"):
        t = [x.clone().to(device) for x in (mu, logvar, state)]
        torch.ops.halfvae_ext.latent_rows_update_(*t, idx.to(device), gm.to(device),
                                                  gl.to(device), kind, 0.05, 0.9, 0.999, 1e-8, 3)
        out[device] = [x.cpu() for x in t]
    for a, b in zip(out["cuda"], out["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cuda_conditional_prior_range_checked_by_the_op():
    """On a GPU GMMPrior.group_index leaves u's range to the op (no extra synchronization): a bad
    group still raises before anything is written, naming prior_index."""
    from halfvae_ext.models import GMMPrior, LatentTable
    prior = GMMPrior(4, 3, num_groups=3).cuda()
    table = LatentTable(20, 4, fused_optimizer="adam").cuda()
    before = table.mu.detach().clone()
    idx = torch.tensor([0, 5, 7], device="cuda")
    with pytest.raises(IndexError, match=r"prior_index values must be in \[0, 3\)"):
        table(idx, prior, u=torch.tensor([0, 3, 1], device="cuda"))
    z, kl = table(idx, prior, u=torch.tensor([0, 2, 1], device="cuda"))
    assert torch.equal(table.mu.detach(), before) and torch.isfinite(kl).all()


@pytest.mark.parametrize("kind,state_dtype", [("rowwise_adam", None),
                                              ("rowwise_adam", torch.bfloat16),
                                              ("rowwise_adagrad", None),
                                              ("adam", torch.bfloat16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_compact_table_step_equals_cpu(kind, state_dtype, dtype):
    """The compact optimizers' CUDA update (one thread per touched row for the row-wise rules) on
    a LatentTable's record: the same table and state as the CPU's, duplicates included. bfloat16
    moments use the same random bits on both devices (a hash of row, element and step)."""
    from halfvae_ext.models import LatentTable
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 40, (300,), generator=g)
    grads = [torch.randn(300, 8, generator=g, dtype=dtype) for _ in range(6)]
    out = {}
    for device in ("cpu", "cuda"):
        t = LatentTable(200, 8, fused_optimizer=kind, state_dtype=state_dtype, dtype=dtype,
                        generator=torch.Generator().manual_seed(0)).to(device)
        for s in range(3):
            with torch.no_grad():
                t.table_optimizer.step_rows(t.mu, t.logvar, idx.to(device),
                                            grads[2 * s].to(device), grads[2 * s + 1].to(device))
        out[device] = {k: v.cpu() for k, v in t.state_dict().items()}
    tol = (dict(rtol=2 ** -7, atol=1e-6) if state_dtype == torch.bfloat16 else
           dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12))
    for k in out["cpu"]:
        torch.testing.assert_close(out["cuda"][k].float(), out["cpu"][k].float(), **tol)


def test_cuda_rowwise_refuses_wide_rows_and_half_tables():
    from halfvae_ext.models import LatentTable
    t = LatentTable(10, 65, fused_optimizer="rowwise_adagrad").cuda()
    opt = t.table_optimizer
    idx, g = torch.tensor([1], device="cuda"), torch.ones(1, 65, device="cuda")
    with pytest.raises(ValueError, match="K <= 64"):
        opt.step_rows(t.mu.detach(), t.logvar.detach(), idx, g, g)
    h = [x.detach().half() for x in (t.mu, t.logvar)]
    with pytest.raises(ValueError, match="float32 or float64"):
        torch.ops.halfvae_ext.latent_rows_update_(*h, opt.state.half(), idx, g.half(), g.half(),
                                                  "rowwise_adagrad", 0.1, 0.9, 0.999, 1e-8, 1,
                                                  opt.row_state.half())
