"""Conditional priors (prior tables [U, K, C], one group per row chosen by prior_index) and the
closed-form KL bound (kl="bound") on every CPU path, against the plain PyTorch reference."""
import pytest
import torch

import halfvae_ext as hv
from halfvae_ext import reference as ref
from halfvae_ext.table_optim import FusedRowOptimizer, fused_rows_kl

from conftest import assert_float32_close_to_truth

pytestmark = pytest.mark.usefixtures("one_thread")

KL_KINDS = ["mc", "bound"]
_ops = torch.ops.halfvae_ext


def conditional_problem(N, K, C, U, dtype=torch.float64, seed=0, requires_grad=True,
                        groups=None):
    """mu, logvar, eps [N, K], prior tensors [U, K, C] and prior_index [N], random; prior_index
    takes values in range(groups) (default U: every group can occur)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    mu, logvar = r(N, K), r(N, K, scale=0.7)
    eps = torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype)
    prior = (r(U, K, C), r(U, K, C, scale=2.0), r(U, K, C, scale=0.5))
    prior_index = torch.randint(0, U if groups is None else groups, (N,), generator=g)
    return mu, logvar, eps, prior, prior_index


def weighted_grads(outputs, inputs, seed=1):
    """Gradients of sum_i sum(w_i * outputs[i]), fixed random weights w_i (drawn in float64, so the
    same for a float32 op and its float64 reference)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
               for o in outputs)
    return torch.autograd.grad(loss, inputs)


def assert_all_close(actual, expected, tol):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"output {i}: {m}")


# (N, K, C, U, groups present). The CPU kernels read the per-group tables directly when K is a
# multiple of the vector width W (4 float64 lanes on AVX2, 8 on AVX-512), blend the tables of the
# W/K rows a vector holds when K divides W (K = 2; K = 4 on AVX-512), else copy them per block;
# they keep all U groups when the tables are small next to the batch (4*U*K*C <= N), else only
# those present (the (40, 8, ...) and (41, 2, ...) cases have groups absent: their gradients must
# be zero). An odd N with K = 2 ends in a partial vector. K = 4099 is past the pattern limit
# (partial vectors at each row's end).
CASES = [(600, 8, 3, 5, None), (600, 5, 2, 4, None), (40, 8, 3, 9, 6), (30, 13, 1, 3, None),
         (3, 4099, 2, 2, None), (601, 2, 3, 5, None), (41, 2, 2, 9, 6), (300, 4, 3, 7, None)]


@pytest.mark.parametrize("reduction", ["row", "none"])
@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("N,K,C,U,groups", CASES)
def test_reparam_gmm_kl_matches_reference_float64(N, K, C, U, groups, kl, reduction):
    mu, logvar, eps, prior, pi = conditional_problem(N, K, C, U, seed=N + K + C, groups=groups)
    inputs = [mu, logvar, *prior]
    out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl=kl,
                            reduction=reduction)
    want = ref.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl=kl,
                              reduction=reduction)
    assert_all_close(out, want, 1e-12)
    got_grads, want_grads = weighted_grads(out, inputs), weighted_grads(want, inputs)
    assert_all_close(got_grads, want_grads, 1e-10)
    if groups is not None:
        for g in got_grads[2:]:
            assert torch.count_nonzero(g[groups:]) == 0 and torch.count_nonzero(g[:groups]) > 0
    # In-kernel eps: the Philox stream of the seed the generator gives.
    seed = hv.ops.draw_seed(torch.Generator().manual_seed(5), "cpu")
    eps_k = hv.philox_normal(seed, (N, K), torch.float64)
    out = hv.reparam_gmm_kl(mu, logvar, *prior, generator=torch.Generator().manual_seed(5),
                            prior_index=pi, kl=kl, reduction=reduction)
    want = ref.reparam_gmm_kl(mu, logvar, *prior, eps=eps_k, prior_index=pi, kl=kl,
                              reduction=reduction)
    assert_all_close(out, want, 1e-12)
    assert_all_close(weighted_grads(out, inputs), weighted_grads(want, inputs), 1e-10)


@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("K", [8, 5])
def test_bound_without_prior_index_matches_reference_float64(K, kl):
    mu, logvar, eps, prior, _ = conditional_problem(500, K, 3, 1, seed=K)
    prior = [p.detach()[0].requires_grad_() for p in prior]  # [K, C]: one prior
    inputs = [mu, logvar, *prior]
    out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, kl=kl, reduction="none")
    want = ref.reparam_gmm_kl(mu, logvar, *prior, eps=eps, kl=kl, reduction="none")
    assert_all_close(out, want, 1e-12)
    assert_all_close(weighted_grads(out, inputs), weighted_grads(want, inputs), 1e-10)


@pytest.mark.parametrize("N,K,C,U,groups", CASES)
def test_gmm_log_prob_matches_reference_float64(N, K, C, U, groups):
    z, _, _, prior, pi = conditional_problem(N, K, C, U, seed=2 * N + K, groups=groups)
    inputs = [z, *prior]
    lp = hv.gmm_log_prob(z, *prior, prior_index=pi)
    want = ref.gmm_log_prob(z, *prior, prior_index=pi)
    torch.testing.assert_close(lp, want, rtol=1e-12, atol=1e-12)
    assert_all_close(weighted_grads([lp], inputs), weighted_grads([want], inputs), 1e-10)


def interleaved(mu, logvar):
    """mu and logvar as the two halves of one [rows, 2, K] table (row stride 2K), LatentTable's
    layout for the fused step."""
    both = torch.stack([mu.detach(), logvar.detach()], dim=1)
    return both[:, 0], both[:, 1]


@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("K", [8, 5])
def test_rows_op_with_duplicates_and_interleaved_tables_matches_reference(K, kl):
    rows, C, U, B = 60, 3, 4, 700  # B > rows: many duplicate indices
    mu, logvar, _, prior, _ = conditional_problem(rows, K, C, U, seed=K)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, rows, (B,), generator=g)
    pi = torch.randint(0, U, (B,), generator=g)  # one group per gathered row
    eps = torch.randn(B, K, generator=g, dtype=torch.float64)
    inputs = [mu, logvar, *prior]
    for reduction in ("row", "none"):
        out = hv.reparam_gmm_kl_rows(mu, logvar, idx, *prior, eps=eps, prior_index=pi, kl=kl,
                                     reduction=reduction)
        want = ref.reparam_gmm_kl(mu[idx], logvar[idx], *prior, eps=eps, prior_index=pi, kl=kl,
                                  reduction=reduction)
        assert_all_close(out, want, 1e-12)
        assert_all_close(weighted_grads(out, inputs), weighted_grads(want, inputs), 1e-10)
    # Row-strided tables give the same bits, with given and with in-kernel eps.
    mu_s, lv_s = interleaved(mu, logvar)
    for draws in (None, 4):
        def eps_or_generator():
            return (dict(eps=eps) if draws is None
                    else dict(generator=torch.Generator().manual_seed(draws)))
        want = hv.reparam_gmm_kl_rows(mu, logvar, idx, *prior, prior_index=pi, kl=kl,
                                      **eps_or_generator())
        got = hv.reparam_gmm_kl_rows(mu_s, lv_s, idx, *prior, prior_index=pi, kl=kl,
                                     **eps_or_generator())
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("K", [8, 5])
def test_fused_table_step_equals_sparse_gradients_and_sparse_adam(K, kl):
    """fused_rows_kl (the backward steps the table) against reparam_gmm_kl_rows(table_grad=
    "sparse") + torch.optim.SparseAdam, on the same in-kernel draws, float64: the same z and kl,
    prior gradients and tables. Rows occurring once (stepped in the backward's block loop) and
    repeated ones (after it); the fused table in LatentTable's interleaved layout."""
    rows, C, U, B = 400, 3, 6, 256
    g = torch.Generator().manual_seed(21)
    mu0 = torch.randn(rows, K, generator=g, dtype=torch.float64)
    lv0 = 0.3 * torch.randn(rows, K, generator=g, dtype=torch.float64)
    prior0 = [torch.randn(U, K, C, generator=g, dtype=torch.float64) for _ in range(3)]
    mu_f, lv_f = (t.requires_grad_() for t in interleaved(mu0, lv0))
    opt = FusedRowOptimizer(rows, K, "adam", lr=0.05, dtype=torch.float64)
    mu_s, lv_s = mu0.clone().requires_grad_(), lv0.clone().requires_grad_()
    sparse_opt = torch.optim.SparseAdam([mu_s, lv_s], lr=0.05)
    prior_f = [p.clone().requires_grad_() for p in prior0]
    prior_s = [p.clone().requires_grad_() for p in prior0]
    for step in range(3):
        idx = torch.cat([torch.randperm(rows, generator=g)[:B // 2],
                         torch.randint(0, 16, (B // 2,), generator=g)])
        pi = torch.randint(0, U, (B,), generator=g)
        w = torch.randn(B, K, generator=g, dtype=torch.float64)
        outs = []
        for fused in (True, False):
            draws = torch.Generator().manual_seed(100 + step)
            if fused:
                z, kl_out = fused_rows_kl(mu_f, lv_f, idx, *prior_f, opt, generator=draws,
                                          prior_index=pi, kl=kl)
            else:
                z, kl_out = hv.reparam_gmm_kl_rows(mu_s, lv_s, idx, *prior_s, generator=draws,
                                                   table_grad="sparse", prior_index=pi, kl=kl)
            (kl_out.sum() + (w * z).sum()).backward()
            outs.append((z.detach(), kl_out.detach()))
        sparse_opt.step()
        sparse_opt.zero_grad()
        if step == 0:  # same tables, same draws: the same bits
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        else:  # the two Adams round differently in the last bits
            assert_all_close(outs[0], outs[1], 1e-12)
        for pf, ps in zip(prior_f, prior_s):
            torch.testing.assert_close(pf.grad, ps.grad, rtol=1e-12, atol=1e-12)
            assert torch.count_nonzero(pf.grad) > 0
            pf.grad, ps.grad = None, None
    assert mu_f.grad is None
    torch.testing.assert_close(mu_f.detach(), mu_s.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lv_f.detach(), lv_s.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(mu_f.detach(), mu0)


@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("K", [4, 3, 2])  # float64: direct or blended (4), copied (3), blended (2)
def test_gradcheck_every_input_float64(K, kl):
    mu, logvar, eps, prior, pi = conditional_problem(7, K, 2, 3, seed=K)
    for reduction in ("row", "none"):
        fn = lambda m, lv, a, b, c: hv.reparam_gmm_kl(m, lv, a, b, c, eps=eps, prior_index=pi,
                                                      kl=kl, reduction=reduction)
        assert torch.autograd.gradcheck(fn, (mu, logvar, *prior), eps=1e-6, atol=1e-6, rtol=1e-5)
    idx = torch.tensor([0, 2, 2, 6, 0, 3])
    pi_rows = torch.tensor([1, 0, 2, 1, 1, 2])
    eps_rows = eps[:6]
    fn = lambda m, lv, a, b, c: hv.reparam_gmm_kl_rows(m, lv, idx, a, b, c, eps=eps_rows,
                                                       prior_index=pi_rows, kl=kl)
    assert torch.autograd.gradcheck(fn, (mu, logvar, *prior), eps=1e-6, atol=1e-6, rtol=1e-5)
    if kl == "mc":  # gmm_log_prob has no kl argument: once
        fn = lambda z, a, b, c: hv.gmm_log_prob(z, a, b, c, prior_index=pi)
        assert torch.autograd.gradcheck(fn, (mu, *prior), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_opcheck_new_arguments():
    mu, logvar, eps, prior, pi = conditional_problem(11, 5, 3, 4, seed=7)
    for reduction in (0, 1):
        for prior_index, kl in ((pi, 0), (pi, 1)):
            torch.library.opcheck(_ops.reparam_gmm_kl,
                                  (mu, logvar, *prior, eps, None, reduction, prior_index, kl))
    one_prior = [p.detach()[0].requires_grad_() for p in prior]
    torch.library.opcheck(_ops.reparam_gmm_kl, (mu, logvar, *one_prior, eps, None, 1, None, 1))
    torch.library.opcheck(_ops.gmm_log_prob, (mu, *prior, pi.int()))
    idx = torch.tensor([0, 3, 3, 10, 7])
    pi_rows = torch.tensor([3, 0, 1, 1, 2])
    torch.library.opcheck(_ops.reparam_gmm_kl_rows,
                          (mu, logvar, idx, *prior, eps[:5], None, 1, 0, pi_rows, 1))
    seed = torch.tensor([3, 4], dtype=torch.int64)
    plain = [t.detach() for t in (mu, logvar, *prior)]
    schema_and_fake = ("test_schema", "test_faketensor")
    torch.library.opcheck(_ops.reparam_gmm_kl_backward,
                          (torch.randn(11, 5, dtype=torch.float64),
                           torch.randn(11, dtype=torch.float64), *plain, None, seed, 1, True, pi,
                           1), test_utils=schema_and_fake)
    torch.library.opcheck(_ops.reparam_gmm_kl_rows_backward,
                          (torch.randn(5, 5, dtype=torch.float64),
                           torch.randn(5, dtype=torch.float64), plain[0], plain[1], idx,
                           *plain[2:], None, seed, 1, True, pi_rows, 1),
                          test_utils=schema_and_fake)
    torch.library.opcheck(_ops.gmm_log_prob_backward,
                          (torch.randn(11, 5, dtype=torch.float64), plain[0], *plain[2:], True,
                           pi), test_utils=schema_and_fake)
    state = torch.zeros(11, 4, 5, dtype=torch.float64)
    torch.library.opcheck(_ops.reparam_gmm_kl_rows_backward_step_,
                          (torch.randn(5, 5, dtype=torch.float64),
                           torch.ones(5, dtype=torch.float64), None, None, plain[0].clone(),
                           plain[1].clone(), state, idx, *plain[2:], eps[:5], None, 1, True,
                           "adam", 0.1, 0.9, 0.999, 1e-8, 1, pi_rows, 1))


def test_torch_compile_fullgraph_with_prior_index_and_bound():
    mu, logvar, eps, prior, pi = conditional_problem(64, 8, 3, 5, dtype=torch.float32, seed=6)
    inputs = [mu, logvar, *prior]

    def loss_of(lib):
        def loss(mu, logvar, logits, means, logvars, eps, pi):
            z, kl_bound = lib.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps,
                                             prior_index=pi, kl="bound")
            _, kl_mc = lib.reparam_gmm_kl(mu, logvar, logits, means, logvars, eps=eps,
                                          prior_index=pi)
            lp = lib.gmm_log_prob(z, logits, means, logvars, prior_index=pi)
            return kl_bound.mean() + 0.5 * kl_mc.mean() - 0.01 * lp.sum() + 0.1 * (z * z).sum()
        return loss

    compiled = torch.compile(loss_of(hv), fullgraph=True, backend="inductor")
    got = compiled(*inputs, eps, pi)
    want = loss_of(ref)(*inputs, eps, pi)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("C", [1, 3, 5])
@pytest.mark.parametrize("K", [1, 3, 8, 13])
@pytest.mark.parametrize("U", [1, 40, 7])
def test_float32_sweep_against_float64_reference(U, K, C):
    mu, logvar, eps, prior, pi = conditional_problem(300, K, C, U, dtype=torch.float32,
                                                     seed=U * 100 + K * 10 + C)
    inputs = [mu, logvar, *prior]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    for kl in KL_KINDS:
        out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl=kl,
                                reduction="none")
        want = ref.reparam_gmm_kl(*inputs64, eps=eps.double(), prior_index=pi, kl=kl,
                                  reduction="none")
        assert_float32_close_to_truth((*out, *weighted_grads(out, inputs)),
                                      (*want, *weighted_grads(want, inputs64)))
    lp = hv.gmm_log_prob(mu, *prior, prior_index=pi)
    want = ref.gmm_log_prob(inputs64[0], *inputs64[2:], prior_index=pi)
    assert_float32_close_to_truth((lp, *weighted_grads([lp], [mu, *prior])),
                                  (want, *weighted_grads([want], [inputs64[0], *inputs64[2:]])))


@pytest.mark.parametrize("C", [3, 1])
def test_kl_bound_and_jensen_bound_bracket_the_monte_carlo_kl(C):
    """reference.kl_jensen_lower <= KL(q || p_k) <= the fused kl="bound", per (row, dimension),
    KL estimated by the mean of S Monte-Carlo draws of the fused kl="mc"; the margin is 4 standard
    errors of that mean (one-sided; the draws are fixed, so the test is deterministic). With one
    component the bound is the exact KL: the mean must then be within 4 standard errors of it."""
    N, K, U, S = 4, 3, 2, 20000
    mu, logvar, _, prior, pi = conditional_problem(N, K, C, U, seed=3, requires_grad=False)
    eps = torch.randn(S * N, K, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    _, mc = hv.reparam_gmm_kl(mu.repeat(S, 1), logvar.repeat(S, 1), *prior, eps=eps,
                              prior_index=pi.repeat(S), reduction="none")
    mc = mc.view(S, N, K)
    mean, margin = mc.mean(0), 4.0 * mc.std(0) / S**0.5
    _, bound = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps[:N], prior_index=pi, kl="bound",
                                 reduction="none")
    lower = ref.kl_jensen_lower(mu, logvar, *prior, prior_index=pi)
    assert (lower <= mean + margin).all(), (lower - mean) / margin
    assert (mean - margin <= bound).all(), (mean - bound) / margin
    if C == 1:
        assert ((mean - bound).abs() <= margin).all(), (mean - bound) / margin
    else:  # not vacuous: somewhere each bound is further from the estimate than the margin
        assert ((bound - mean) > margin).any() and ((mean - lower) > margin).any()


@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("K", [16, 8, 5, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_group_for_all_rows_equals_the_unconditional_op_on_its_table(dtype, K, kl):
    """Every row in group u: z, kl and the latents' gradients are bit for bit those of the [K, C]
    op on table u (the same arithmetic on the same values); the prior gradients of table u agree to
    rounding (their sums are grouped differently: per group and k here, per pattern position
    there), and the other groups' are zero."""
    N, C, U, u = 3000, 3, 4, 2
    mu, logvar, eps, prior, _ = conditional_problem(N, K, C, U, dtype=dtype, seed=K)
    pi = torch.full((N,), u)
    table = [p.detach()[u].clone().requires_grad_() for p in prior]
    out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl=kl, reduction="none")
    out1 = hv.reparam_gmm_kl(mu, logvar, *table, eps=eps, kl=kl, reduction="none")
    assert torch.equal(out[0], out1[0]) and torch.equal(out[1], out1[1])
    grads = weighted_grads(out, [mu, logvar, *prior])
    grads1 = weighted_grads(out1, [mu, logvar, *table])
    assert torch.equal(grads[0], grads1[0]) and torch.equal(grads[1], grads1[1])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    others = torch.arange(U) != u
    for g, g1 in zip(grads[2:], grads1[2:]):
        assert torch.count_nonzero(g[others]) == 0
        torch.testing.assert_close(g[u], g1, rtol=tol, atol=tol * g1.abs().max().item())
    lp = hv.gmm_log_prob(mu, *prior, prior_index=pi)
    assert torch.equal(lp, hv.gmm_log_prob(mu, *table))


@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("K,U,runs", [(8, 40, False), (5, 40, False), (8, 5000, False),
                                      (4, 40, False), (16, 40, True), (4, 3, True)])
def test_prior_gradients_do_not_depend_on_the_thread_count(K, U, runs, kl):
    """Bit for bit, float32 (where a different order of the sums would show): all U groups kept
    (U = 40), or only those present (U = 5000); the tables read directly, blended or copied (K =
    16 or 8, 4, 5 on AVX-512); rows in runs of one group (runs: sums in registers until the group
    changes)."""
    mu, logvar, eps, prior, pi = conditional_problem(20000, K, 3, U, dtype=torch.float32, seed=U)
    if runs:
        pi = pi.sort().values
    inputs = [mu, logvar, *prior]

    def run():
        out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl=kl)
        lp = hv.gmm_log_prob(mu, *prior, prior_index=pi)
        return weighted_grads((*out, lp), inputs)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run()
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(two, one):
        assert torch.equal(a, b)


def test_empty_batch_with_prior_index():
    mu, logvar, eps, prior, pi = conditional_problem(0, 4, 3, 5)
    z, kl = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl="bound")
    assert z.shape == (0, 4) and kl.shape == (0,)
    grads = torch.autograd.grad(kl.sum() + z.sum(), [*prior])
    for g, p in zip(grads, prior):
        assert g.shape == p.shape and torch.count_nonzero(g) == 0


def test_huge_group_count_with_a_small_batch():
    """U = 10^5 groups for 64 rows: only the groups present are worked on; the op's own output (the
    [U, K, C] gradients) is the only thing of the tables' size."""
    mu, logvar, eps, prior, pi = conditional_problem(64, 8, 3, 100_000, seed=8)
    out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl="bound")
    want = ref.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl="bound")
    assert_all_close(out, want, 1e-12)
    got = weighted_grads(out, [mu, logvar, *prior])
    assert_all_close(got, weighted_grads(want, [mu, logvar, *prior]), 1e-10)
    absent = torch.ones(100_000, dtype=torch.bool)
    absent[pi] = False
    for g in got[2:]:
        assert torch.count_nonzero(g[absent]) == 0


BAD_PRIOR_INDEX = [
    ("float dtype", lambda pi, U: pi.double(), TypeError, "prior_index must be an int64 or int32"),
    ("not a tensor", lambda pi, U: pi.tolist(), TypeError, "prior_index must be a torch.Tensor"),
    ("too long", lambda pi, U: torch.cat([pi, pi[:1]]), ValueError,
     r"prior_index must have shape \[N\]"),
    ("2-D", lambda pi, U: pi[:, None], ValueError, r"prior_index must have shape \[N\]"),
    ("value U", lambda pi, U: torch.where(pi == pi[0], U, pi), IndexError,
     r"prior_index values must be in \[0, 4\)"),
    ("negative", lambda pi, U: torch.where(pi == pi[0], -1, pi), IndexError,
     r"prior_index values must be in \[0, 4\)"),
]


@pytest.mark.parametrize("op", ["reparam_gmm_kl", "reparam_gmm_kl_rows", "gmm_log_prob"])
def test_bad_prior_index_raises_naming_it(op):
    mu, logvar, eps, prior, pi = conditional_problem(6, 3, 2, 4, requires_grad=False)
    idx = torch.tensor([5, 0, 0, 2, 3, 1])

    def call(prior, prior_index):
        if op == "reparam_gmm_kl":
            return hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=prior_index)
        if op == "reparam_gmm_kl_rows":
            return hv.reparam_gmm_kl_rows(mu, logvar, idx, *prior, eps=eps,
                                          prior_index=prior_index)
        return hv.gmm_log_prob(mu, *prior, prior_index=prior_index)

    call(prior, pi)  # the good call works
    for name, make_bad, exc, match in BAD_PRIOR_INDEX:
        with pytest.raises(exc, match=match):
            call(prior, make_bad(pi, 4))
    with pytest.raises(ValueError, match="prior_index chooses among groups"):
        call([p[0] for p in prior], pi)  # [K, C] tables with prior_index
    with pytest.raises(ValueError, match="need prior_index"):
        call(prior, None)  # [U, K, C] tables without


def test_bad_prior_index_in_the_fused_table_step_writes_nothing():
    rows, K, U, B = 20, 3, 4, 6
    mu, logvar, _, prior, _ = conditional_problem(rows, K, 2, U, requires_grad=False)
    g = torch.Generator().manual_seed(2)
    idx = torch.tensor([5, 0, 0, 19, 3, 1])
    pi = torch.randint(0, U, (B,), generator=g)
    eps, grad_z = (torch.randn(B, K, generator=g, dtype=torch.float64) for _ in range(2))
    grad_kl = torch.randn(B, generator=g, dtype=torch.float64)
    state = torch.rand(rows, 4, K, generator=g, dtype=torch.float64)
    before = [t.clone() for t in (mu, logvar, state)]

    def step_op(prior, prior_index):
        return _ops.reparam_gmm_kl_rows_backward_step_(
            grad_z, grad_kl, None, None, mu, logvar, state, idx, *prior, eps, None, 1, True,
            "adam", 0.1, 0.9, 0.999, 1e-8, 1, prior_index, 0)

    cases = [(make_bad(pi, U), exc, match) for _, make_bad, exc, match in BAD_PRIOR_INDEX
             if not isinstance(make_bad(pi, U), list)]
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            step_op(prior, bad)
    with pytest.raises(ValueError, match="prior_index chooses among groups"):
        step_op([p[0] for p in prior], pi)
    with pytest.raises(ValueError, match="need prior_index"):
        step_op(prior, None)
    for t, t0 in zip((mu, logvar, state), before):
        assert torch.equal(t, t0)
    # Through fused_rows_kl: the forward refuses it; table, state and step count stay.
    mu_t, lv_t = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    opt = FusedRowOptimizer(rows, K, "adam", dtype=torch.float64)
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            fused_rows_kl(mu_t, lv_t, idx, *prior, opt, eps=eps, prior_index=bad)
    assert torch.equal(mu_t.detach(), mu) and int(opt.step) == 0
    assert torch.count_nonzero(opt.state) == 0
    # The good call steps (the checks above refused the inputs, not the set-up).
    step_op(prior, pi)
    assert not torch.equal(mu, before[0]) and not torch.equal(state, before[2])


def test_bad_kl_raises():
    mu, logvar, eps, prior, pi = conditional_problem(6, 3, 2, 4, requires_grad=False)
    with pytest.raises(ValueError, match="kl must be 'mc'"):
        hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl="exact")
    with pytest.raises(ValueError, match="kl code must be 0"):
        _ops.reparam_gmm_kl(mu, logvar, *prior, eps, None, 1, pi, 2)


@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("K", [2, 4, 8, 16])
def test_rows_in_runs_of_one_group_match_reference_float64(K, kl):
    """Rows sorted by group, runs of hundreds of rows (past the 64 rows after which a group's
    float accumulators are folded into the float64 sums), then a stretch of random groups: the
    registers that sum a run must hand every term on, at a change of group, at a fold and at the
    chunk's end. float64 and float32 (K = 2..16 cover the direct, vector-row and blended paths on
    AVX2 and AVX-512)."""
    N, C, U = 2500, 3, 4
    mu, logvar, eps, prior, pi = conditional_problem(N, K, C, U, seed=K)
    pi = torch.cat([pi[:2000].sort().values, pi[2000:]])
    out = hv.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl=kl, reduction="none")
    want = ref.reparam_gmm_kl(mu, logvar, *prior, eps=eps, prior_index=pi, kl=kl, reduction="none")
    assert_all_close(out, want, 1e-10)
    inputs = [mu, logvar, *prior]
    truth = weighted_grads(want, inputs)
    assert_all_close(weighted_grads(out, inputs), truth, 1e-9)
    lp = hv.gmm_log_prob(mu, *prior, prior_index=pi)
    lp_want = ref.gmm_log_prob(mu, *prior, prior_index=pi)
    assert_all_close(weighted_grads([lp], [mu, *prior]), weighted_grads([lp_want], [mu, *prior]),
                     1e-9)
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    out32 = hv.reparam_gmm_kl(f32[0], f32[1], *f32[2:], eps=eps.float(), prior_index=pi, kl=kl,
                              reduction="none")
    assert_float32_close_to_truth(weighted_grads(out32, f32), truth)
