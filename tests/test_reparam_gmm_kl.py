"""The fused ops against the plain PyTorch reference: values, every gradient, gradcheck."""
import json
import os
import subprocess
import sys

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


def nan_propagation_failures():
    """Puts one NaN into one input of the fused ops (a prior logit, mean or log-variance, an entry
    of mu or logvar) and lists every output and gradient whose NaNs are not exactly where that
    NaN reaches: the elements of the poisoned latent dimension in the rows of the poisoned prior
    group, or the poisoned element itself (and the prior-gradient rows they feed). Empty when
    NaN propagates as in plain floating point. Covers float32 and float64, a compile-time (3)
    and a runtime (4) component count, one prior and a conditional one, K = 5 (vectors span
    rows) and K = 16 (whole vectors per row), each component position of the poisoned mean or
    log-variance, and every op: reparam_gmm_kl ("mc", "bound"; per element and per row),
    reparam_gmm_kl_rows and gmm_log_prob."""
    failures = []
    N = 24
    for dtype in (torch.float32, torch.float64):
        for K in (5, 16):
            for C in (3, 4):
                for U in (1, 2):
                    for which in ("logits", "means", "logvars", "mu", "logvar"):
                        positions = range(C) if which in ("means", "logvars") else [0]
                        for c in positions:
                            failures += _nan_case(N, K, C, U, dtype, which, c)
    return failures


def _nan_case(N, K, C, U, dtype, which, c):
    g = torch.Generator().manual_seed(K * 100 + C * 10 + U)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    mu, logvar, eps = r(N, K), r(N, K, scale=0.5), r(N, K)
    pshape = (K, C) if U == 1 else (U, K, C)
    prior = {"logits": r(*pshape), "means": r(*pshape, scale=2.0),
             "logvars": r(*pshape, scale=0.5)}
    group = torch.arange(N) % U  # the group of each (gathered) row; every group has rows
    pidx = None if U == 1 else group
    k, u, n = K - 2, U - 1, N // 2
    poisoned = torch.zeros(N, K, dtype=torch.bool)  # of mu / logvar
    if which in prior:
        prior[which][(k, c) if U == 1 else (u, k, c)] = float("nan")
    else:
        (mu if which == "mu" else logvar)[n, k] = float("nan")
        poisoned[n, k] = True

    def reached(latent_rows):
        """The NaN elements of an op on rows latent_rows of mu / logvar (groups: `group`)."""
        if which in prior:
            return (group == u)[:, None] & (torch.arange(K) == k)[None, :]
        return poisoned[latent_rows]

    tag = f"{dtype} K={K} C={C} U={U} NaN in {which}" + (f"[c={c}]" if which in prior else "")
    failures = []

    def expect(name, t, want):
        got = t.detach().isnan()
        if not torch.equal(got, want):
            failures.append(f"{tag}: {name} has NaN at {got.nonzero().tolist()[:6]}, "
                            f"want at {want.nonzero().tolist()[:6]}")

    def expect_prior_grads(name, grads, bad):
        # Row (group, k) of each prior gradient is all NaN when a NaN element of that group's
        # dimension k feeds it, else finite.
        want = torch.zeros(U, K, dtype=torch.bool)
        nz = bad.nonzero()
        want[group[nz[:, 0]], nz[:, 1]] = True
        for pname, gr in zip(prior, grads):
            rows = gr.detach().reshape(U, K, C).isnan()
            if not (torch.equal(rows.any(2), want) and torch.equal(rows.all(2), want)):
                failures.append(f"{tag}: {name}: the gradient of prior {pname} has NaN in rows "
                                f"{rows.any(2).nonzero().tolist()}, want {want.nonzero().tolist()}")

    leaves = [mu, logvar, *prior.values()]
    for t in leaves:
        t.requires_grad_(True)
    # Rows gathered from the tables in another order, one twice.
    idx = (torch.arange(N) * 5 + 3) % N
    idx[0] = idx[1]
    for kl_kind in ("mc", "bound"):
        for reduction in ("none", "row"):
            name = f"reparam_gmm_kl(kl={kl_kind}, reduction={reduction})"
            z, kl = hv.reparam_gmm_kl(mu, logvar, *prior.values(), eps=eps, prior_index=pidx,
                                      reduction=reduction, kl=kl_kind)
            bad = reached(torch.arange(N))
            expect(name + " kl", kl, bad if reduction == "none" else bad.any(1))
            gm, gl, *gp = torch.autograd.grad(kl.sum() + z.sum(), leaves)
            expect(name + " grad_mu", gm, bad)
            expect(name + " grad_logvar", gl, bad)
            expect_prior_grads(name, gp, bad)
        name = f"reparam_gmm_kl_rows(kl={kl_kind})"
        z, kl = hv.reparam_gmm_kl_rows(mu, logvar, idx, *prior.values(), eps=eps,
                                       prior_index=pidx, reduction="none", kl=kl_kind)
        bad = reached(idx)
        expect(name + " kl", kl, bad)
        gm, gl, *gp = torch.autograd.grad(kl.sum() + z.sum(), leaves)
        table_bad = torch.zeros(N, K).index_add_(0, idx, bad.to(torch.float32)) > 0
        expect(name + " grad of the mu table", gm, table_bad)
        expect(name + " grad of the logvar table", gl, table_bad)
        expect_prior_grads(name, gp, bad)
    if which != "logvar":  # gmm_log_prob at z = eps, with mu's NaN as z's
        z = eps.clone()
        if which == "mu":
            z[n, k] = float("nan")
        z.requires_grad_(True)
        lp = hv.gmm_log_prob(z, *prior.values(), prior_index=pidx)
        bad = reached(torch.arange(N))
        expect("gmm_log_prob", lp, bad)
        gz, *gp = torch.autograd.grad(lp.sum(), [z, *prior.values()])
        expect("gmm_log_prob grad_z", gz, bad)
        expect_prior_grads("gmm_log_prob", gp, bad)
    return failures


def test_a_nan_input_gives_nan_exactly_where_it_reaches():
    """A NaN prior parameter or latent must not vanish in the log-sum-exp (a float32 fast log
    turned NaN into a finite KL, float64 did not); nor may it spread past the elements it
    feeds. This CPU's own kernel variant; the others: the test below."""
    failures = nan_propagation_failures()
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_a_nan_input_gives_nan_in_every_cpu_kernel_variant(capability):
    variant = f"cpu-{capability.upper()}"
    missing = hv._C.cpu_kernel_variants().get(variant)
    if missing is None:
        pytest.skip(f"{variant} is not built here")
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}")
    script = ("import sys, json; sys.path.insert(0, sys.argv[1]); import test_reparam_gmm_kl as t; "
              "from halfvae_ext import _C; "
              "print(json.dumps([_C.cpu_kernel_name(), t.nan_propagation_failures()]))")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env.pop("HALFVAE_CPU_HIDE_FEATURES", None)
    proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert name == variant
    assert not failures, f"{variant}: {len(failures)} failures:\n" + "\n".join(failures[:20])
