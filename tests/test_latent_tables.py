"""Row-gathering op, sparse table gradients and the optimizer step fused into the backward."""
import pytest
import torch

import halfvae_ext as hv
from halfvae_ext import reference as ref
from halfvae_ext.table_optim import FusedRowOptimizer, fused_rows_kl

from conftest import has_cuda, requires_cuda


def tables(N, K, C, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(N, K, generator=g, dtype=torch.float64).to(device, dtype)
    logvar = (0.3 * torch.randn(N, K, generator=g, dtype=torch.float64)).to(device, dtype)
    prior = [torch.randn(K, C, generator=g, dtype=torch.float64).to(device, dtype)
             for _ in range(3)]
    return mu, logvar, prior


DEVICES = ["cpu"] + (["cuda"] if has_cuda() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["row", "none", "sum"])
def test_rows_op_equals_gather_then_reference(device, reduction):
    N, K, C, B = 300, 5, 3, 1000  # B > N: many duplicates
    mu, logvar, prior = tables(N, K, C, torch.float64, device)
    idx = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(1)).to(device)
    eps = torch.randn(B, K, dtype=torch.float64, device=device)
    mu.requires_grad_(), logvar.requires_grad_(), [p.requires_grad_() for p in prior]
    z, kl = hv.reparam_gmm_kl_rows(mu, logvar, idx, *prior, eps=eps, reduction=reduction)
    z_r, kl_r = ref.reparam_gmm_kl(mu[idx], logvar[idx], *prior, eps=eps, reduction=reduction)
    torch.testing.assert_close(z, z_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, kl_r, rtol=1e-10, atol=1e-10)
    w = (torch.randn_like(z), torch.randn_like(kl))
    params = [mu, logvar, *prior]
    got = torch.autograd.grad((z * w[0]).sum() + (kl * w[1]).sum(), params)
    want = torch.autograd.grad((z_r * w[0]).sum() + (kl_r * w[1]).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gradcheck_rows_op_with_duplicates():
    mu, logvar, prior = tables(6, 3, 3, torch.float64)
    idx = torch.tensor([0, 2, 2, 5, 0, 3, 2])
    eps = torch.randn(7, 3, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (mu, logvar, *prior)]
    for reduction in ("row", "none"):
        fn = lambda m, lv, a, b, c: hv.reparam_gmm_kl_rows(m, lv, idx, a, b, c, eps=eps,
                                                           reduction=reduction)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_rows_op_in_kernel_eps_matches_philox_stream():
    mu, logvar, prior = tables(40, 8, 3)
    idx = torch.randint(0, 40, (100,))
    seed = hv.ops.draw_seed(torch.Generator().manual_seed(3), "cpu")
    eps = hv.philox_normal(seed, (100, 8))
    z, kl = hv.reparam_gmm_kl_rows(mu, logvar, idx, *prior,
                                   generator=torch.Generator().manual_seed(3))
    z_r, kl_r = ref.reparam_gmm_kl(mu[idx], logvar[idx], *prior, eps=eps)
    torch.testing.assert_close(z, z_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_r, rtol=1e-4, atol=1e-3)


def test_sparse_table_gradient_equals_dense():
    mu, logvar, prior = tables(50, 4, 3)
    idx = torch.tensor([3, 7, 3, 49, 0, 7, 7])
    eps = torch.randn(7, 4)
    grads = {}
    for mode in ("dense", "sparse"):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = hv.reparam_gmm_kl_rows(m, lv, idx, *prior, eps=eps, table_grad=mode)
        (kl.sum() + z.sum()).backward()
        grads[mode] = (m.grad, lv.grad)
    for d, s in zip(grads["dense"], grads["sparse"]):
        # Duplicates summed: one entry per distinct row (autograd's accumulation drops the
        # coalesced flag, not the property).
        assert s.is_sparse and s._nnz() == 4
        assert s._indices().unique().numel() == 4
        torch.testing.assert_close(s.to_dense(), d)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[idx] = False
    assert torch.count_nonzero(grads["dense"][0][untouched]) == 0


def run_reference_steps(mu0, logvar0, prior, batches, kind, lr):
    mu, logvar = mu0.clone().requires_grad_(), logvar0.clone().requires_grad_()
    opt = (torch.optim.SparseAdam([mu, logvar], lr=lr) if kind == "adam"
           else torch.optim.SGD([mu, logvar], lr=lr))
    for idx, eps in batches:
        z, kl = ref.reparam_gmm_kl(torch.nn.functional.embedding(idx, mu, sparse=True),
                                   torch.nn.functional.embedding(idx, logvar, sparse=True),
                                   *prior, eps=eps)
        opt.zero_grad()
        (kl.sum() + 0.5 * (z * z).sum()).backward()
        opt.step()
    return mu.detach(), logvar.detach()


def run_fused_steps(mu0, logvar0, prior, batches, kind, lr):
    mu, logvar = mu0.clone().requires_grad_(), logvar0.clone().requires_grad_()
    opt = FusedRowOptimizer(mu.shape[0], mu.shape[1], kind, lr=lr, dtype=mu.dtype,
                            device=mu.device)
    for idx, eps in batches:
        z, kl = fused_rows_kl(mu, logvar, idx, *prior, opt, eps=eps)
        (kl.sum() + 0.5 * (z * z).sum()).backward()
        assert mu.grad is None and logvar.grad is None  # no table gradient, ever
    return mu.detach(), logvar.detach(), opt


# K = 8 float32: a row's mu|logvar is one AVX-512 vector. K = 5 float64 with ~1300 touched rows:
# the vector tail, many prefetch chunks, rows split across threads; float64 so that Adam's
# 1/sqrt(v) cannot amplify float32 rounding of tiny gradients, and the match must be near-exact.
# 100000 rows: most rows of a batch occur once and are stepped inside the backward's block loop,
# the others after it.
@pytest.mark.parametrize("N,K,B,dtype,tol", [(200, 8, 64, torch.float32, 1e-5),
                                             (5000, 5, 1500, torch.float64, 1e-12),
                                             (100000, 8, 3000, torch.float64, 1e-12)])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_fused_steps_equal_gather_reference_sparse_optimizer(kind, N, K, B, dtype, tol):
    C = 3
    mu0, logvar0, prior = tables(N, K, C, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(6):
        idx = torch.randint(0, N // 4, (B,), generator=g)  # small range: duplicates in a batch
        batches.append((idx, torch.randn(B, K, generator=g, dtype=torch.float64).to(dtype)))
    mu_r, lv_r = run_reference_steps(mu0, logvar0, prior, batches, kind, lr=0.05)
    mu_f, lv_f, opt = run_fused_steps(mu0, logvar0, prior, batches, kind, lr=0.05)
    torch.testing.assert_close(mu_f, mu_r, rtol=tol, atol=tol)
    torch.testing.assert_close(lv_f, lv_r, rtol=tol, atol=tol)
    assert not torch.equal(mu_f, mu0)
    touched = torch.zeros(N, dtype=torch.bool)
    for idx, _ in batches:
        touched[idx] = True
    assert torch.equal(mu_f[~touched], mu0[~touched])  # untouched rows keep their values
    if kind == "adam":
        assert int(opt.step) == 6
        assert torch.count_nonzero(opt.mu_exp_avg[~touched]) == 0


def test_fused_steps_are_deterministic_with_duplicates():
    mu0, logvar0, prior = tables(30, 8, 3)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 5, (4096,), generator=g), torch.randn(4096, 8, generator=g))
               for _ in range(3)]
    a = run_fused_steps(mu0, logvar0, prior, batches, "adam", 0.01)
    b = run_fused_steps(mu0, logvar0, prior, batches, "adam", 0.01)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_optimizer_state_round_trips_through_state_dict():
    mu0, logvar0, prior = tables(20, 4, 3)
    batches = [(torch.tensor([1, 2, 2, 19]), torch.randn(4, 4)) for _ in range(2)]
    _, _, opt = run_fused_steps(mu0, logvar0, prior, batches, "adam", 0.1)
    fresh = FusedRowOptimizer(20, 4, "adam", lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    for name, buf in opt.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], buf)
    assert int(fresh.step) == 2


def test_bad_indices_raise_and_write_nothing():
    mu, logvar, prior = tables(10, 4, 3)
    eps = torch.randn(3, 4)
    for bad in (torch.tensor([0, 10, 1]), torch.tensor([0, -1, 1])):
        with pytest.raises(IndexError, match=r"idx values must be in \[0, 10\)"):
            hv.reparam_gmm_kl_rows(mu, logvar, bad, *prior, eps=eps)
        # The raw ops check (C++: IndexError), and the optimizer writes nothing before raising.
        with pytest.raises(IndexError, match="idx values must be in"):
            torch.ops.halfvae_ext.reparam_gmm_kl_rows(mu, logvar, bad, *prior, eps, None, 1, 0)
        before = mu.clone()
        state = torch.zeros(10, 4, 4)
        with pytest.raises(IndexError, match="idx values must be in"):
            torch.ops.halfvae_ext.latent_rows_update_(mu, logvar, state, bad, torch.ones(3, 4),
                                                      torch.ones(3, 4), "adam", 0.1, 0.9, 0.999,
                                                      1e-8, 1)
        assert torch.equal(mu, before) and torch.count_nonzero(state) == 0
    with pytest.raises(ValueError, match="idx must be a 1-D"):
        hv.reparam_gmm_kl_rows(mu, logvar, torch.zeros(3, 1, dtype=torch.long), *prior, eps=eps)
    with pytest.raises(ValueError, match="idx must be a 1-D int64"):
        hv.reparam_gmm_kl_rows(mu, logvar, torch.zeros(3), *prior, eps=eps)
    with pytest.raises(ValueError, match="eps must have shape"):
        hv.reparam_gmm_kl_rows(mu, logvar, torch.tensor([0, 1]), *prior, eps=eps)
    with pytest.raises(ValueError, match="fused_optimizer must be"):
        FusedRowOptimizer(10, 4, "adagrad")


def interleaved(mu, logvar):
    """mu and logvar as the two halves of one [rows, 2, K] table (row stride 2K), leaves."""
    both = torch.stack([mu.detach(), logvar.detach()], dim=1)
    return both[:, 0], both[:, 1]


def test_rows_op_on_interleaved_tables_equals_contiguous():
    mu, logvar, prior = tables(30, 5, 3, torch.float64)
    mu_s, lv_s = interleaved(mu, logvar)
    assert mu_s.stride() == (10, 1) and mu_s.untyped_storage().data_ptr() == \
        lv_s.untyped_storage().data_ptr()
    idx = torch.tensor([0, 29, 7, 7, 3, 12, 29, 1, 0])
    eps = torch.randn(9, 5, dtype=torch.float64)
    for reduction in ("row", "none"):
        want = hv.reparam_gmm_kl_rows(mu, logvar, idx, *prior, eps=eps, reduction=reduction)
        got = hv.reparam_gmm_kl_rows(mu_s, lv_s, idx, *prior, eps=eps, reduction=reduction)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    # In-kernel eps: the same draws whatever the layout.
    want = hv.reparam_gmm_kl_rows(mu, logvar, idx, *prior,
                                  generator=torch.Generator().manual_seed(4))
    got = hv.reparam_gmm_kl_rows(mu_s, lv_s, idx, *prior,
                                 generator=torch.Generator().manual_seed(4))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    inputs = [mu_s.requires_grad_(), lv_s.requires_grad_(), *(p.requires_grad_() for p in prior)]
    fn = lambda m, lv, a, b, c: hv.reparam_gmm_kl_rows(m, lv, idx, a, b, c, eps=eps)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_fused_steps_on_interleaved_tables_equal_contiguous(kind):
    mu0, logvar0, prior = tables(300, 8, 3)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 100, (256,), generator=g), torch.randn(256, 8, generator=g))
               for _ in range(4)]
    mu_c, lv_c, opt_c = run_fused_steps(mu0, logvar0, prior, batches, kind, lr=0.05)
    mu_s, lv_s = interleaved(mu0, logvar0)
    mu_s.requires_grad_()
    lv_s.requires_grad_()
    opt_s = FusedRowOptimizer(300, 8, kind, lr=0.05)
    for idx, eps in batches:
        z, kl = fused_rows_kl(mu_s, lv_s, idx, *prior, opt_s, eps=eps)
        (kl.sum() + 0.5 * (z * z).sum()).backward()
    assert torch.equal(mu_s.detach(), mu_c) and torch.equal(lv_s.detach(), lv_c)
    assert torch.equal(opt_s.state, opt_c.state)


def test_update_op_refuses_tables_of_other_layouts():
    mu, logvar, _ = tables(10, 4, 3)
    idx = torch.tensor([1, 2])
    g = torch.ones(2, 4)
    state = torch.zeros(10, 4, 4)
    before = mu.clone()
    for m, lv in [(mu, interleaved(mu, logvar)[1]),   # row strides differ
                  (mu.t().contiguous().t(), logvar)]:  # elements of a row not contiguous
        with pytest.raises(ValueError, match="rows are contiguous and equally spaced"):
            torch.ops.halfvae_ext.latent_rows_update_(m, lv, state, idx, g, g, "adam", 0.1, 0.9,
                                                      0.999, 1e-8, 1)
    assert torch.equal(mu, before)


def test_rows_op_opcheck():
    mu, logvar, prior = tables(12, 4, 3, torch.float64)
    idx = torch.tensor([0, 3, 3, 11])
    eps = torch.randn(4, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.halfvae_ext.reparam_gmm_kl_rows,
                          (mu.requires_grad_(), logvar, idx, *prior, eps, None, 1, 0))


def test_update_ops_opcheck():
    """Schemas (mutated arguments), fake kernels and the dispatcher of the two in-place ops."""
    mu, logvar, prior = tables(12, 4, 3, torch.float64)
    idx = torch.tensor([0, 3, 3, 11])
    state = torch.zeros(12, 4, 4, dtype=torch.float64)
    g = torch.randn(4, 4, dtype=torch.float64)
    eps = torch.randn(4, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.halfvae_ext.latent_rows_update_,
                          (mu, logvar, state, idx, g, g, "adam", 0.1, 0.9, 0.999, 1e-8, 1))
    for extra in ((None, None), (g, None), (g, 2 * g)):  # the rows' gradients from other terms
        torch.library.opcheck(torch.ops.halfvae_ext.reparam_gmm_kl_rows_backward_step_,
                              (g, torch.ones(4, dtype=torch.float64), *extra, mu, logvar, state,
                               idx, *prior, eps, None, 1, True, "adam", 0.1, 0.9, 0.999, 1e-8, 2))


def rows_reference_step(mu0, logvar0, idx, prior, eps, grad_z, grad_kl, extra, kind, lr):
    """The table after one SparseAdam (or SGD) step from the reference's gradients of the gathered
    rows plus `extra` (gradients of the same rows from other terms, None for none)."""
    mu, logvar = mu0.clone().requires_grad_(), logvar0.clone().requires_grad_()
    rows = (torch.nn.functional.embedding(idx, mu, sparse=True),
            torch.nn.functional.embedding(idx, logvar, sparse=True))
    z, kl = ref.reparam_gmm_kl(*rows, *prior, eps=eps)
    loss = (z * grad_z).sum() + (kl * grad_kl).sum()
    loss = loss + sum((r * e).sum() for r, e in zip(rows, extra) if e is not None)
    opt = (torch.optim.SparseAdam([mu, logvar], lr=lr) if kind == "adam"
           else torch.optim.SGD([mu, logvar], lr=lr))
    loss.backward()
    opt.step()
    return mu.detach(), logvar.detach()


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_step_op_adds_the_rows_gradients_from_other_terms(kind, layout):
    """reparam_gmm_kl_rows_backward_step_ with grad_mu_rows / grad_logvar_rows steps each row by
    the sum over its occurrences of (KL gradient + given gradient), in float64 against SparseAdam
    on the reference's gradients. Rows occurring once (stepped inside the backward's block loop)
    and repeated ones (after it) both."""
    N, K, C, B = 3000, 5, 3, 1200
    mu0, logvar0, prior = tables(N, K, C, torch.float64)
    g = torch.Generator().manual_seed(11)
    idx = torch.cat([torch.randperm(N, generator=g)[:800],  # mostly rows that occur once
                     torch.randint(0, 50, (400,), generator=g)])
    eps, grad_z = (torch.randn(B, K, generator=g, dtype=torch.float64) for _ in range(2))
    grad_kl = torch.randn(B, generator=g, dtype=torch.float64)
    gm, gl = (torch.randn(B, K, generator=g, dtype=torch.float64) for _ in range(2))
    for extra in ((gm, gl), (gm, None), (None, gl)):
        mu_r, lv_r = rows_reference_step(mu0, logvar0, idx, prior, eps, grad_z, grad_kl, extra,
                                         kind, lr=0.05)
        mu, logvar = ((mu0.clone(), logvar0.clone()) if layout == "contiguous"
                      else interleaved(mu0, logvar0))
        state = torch.zeros(N, 4 if kind == "adam" else 0, K, dtype=torch.float64)
        torch.ops.halfvae_ext.reparam_gmm_kl_rows_backward_step_(
            grad_z, grad_kl, *extra, mu, logvar, state, idx, *prior, eps, None, 1, False, kind,
            0.05, 0.9, 0.999, 1e-8, 1)
        torch.testing.assert_close(mu, mu_r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logvar, lv_r, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"grad_logvar_rows must have shape \[len\(idx\), K\]"):
        torch.ops.halfvae_ext.reparam_gmm_kl_rows_backward_step_(
            grad_z, grad_kl, gm, gl[:-1], mu, logvar, state, idx, *prior, eps, None, 1, False,
            kind, 0.05, 0.9, 0.999, 1e-8, 1)
    with pytest.raises(TypeError, match="grad_mu_rows has dtype torch.float32"):
        torch.ops.halfvae_ext.reparam_gmm_kl_rows_backward_step_(
            grad_z, grad_kl, gm.float(), gl, mu, logvar, state, idx, *prior, eps, None, 1, False,
            kind, 0.05, 0.9, 0.999, 1e-8, 1)


@pytest.mark.parametrize("mode", ["dense", "sparse", "fused"])
def test_latent_table_sample_returns_the_rows_in_every_mode(mode):
    from halfvae_ext.models import GMMPrior, LatentTable
    prior = GMMPrior(3, 3).double()
    table = LatentTable(20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                        sparse=mode == "sparse", fused_optimizer="sgd" if mode == "fused" else None)
    idx = torch.tensor([4, 0, 4, 19])
    eps = torch.randn(4, 3, dtype=torch.float64)
    z, kl, mu_rows, logvar_rows = table.sample(idx, prior, eps=eps)
    assert torch.equal(mu_rows, table.mu[idx]) and torch.equal(logvar_rows, table.logvar[idx])
    z_f, kl_f = table(idx, prior, eps=eps)  # forward: the same sample and KL
    assert torch.equal(z, z_f) and torch.equal(kl, kl_f)
    z_all, _, mu_all, _ = table.sample(None, prior, eps=torch.randn(20, 3, dtype=torch.float64))
    assert z_all.shape == (20, 3) and torch.equal(mu_all, table.mu)
    if mode == "dense":  # gradients reach the table through all four outputs
        def fn(mu, logvar):
            table.mu, table.logvar = mu, logvar
            return table.sample(idx, prior, eps=eps)
        inputs = [torch.nn.Parameter(table.mu.detach().clone()),
                  torch.nn.Parameter(table.logvar.detach().clone())]
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("uses", ["both", "mu", "none"])
def test_fused_sample_steps_like_sparse_gradients_of_all_terms(kind, uses):
    """A loss of the fused table's (z, kl, mu_rows, logvar_rows) steps the table as SparseAdam (or
    SGD) does with sparse gradients of the same loss; rows the loss does not read add nothing."""
    from halfvae_ext.models import GMMPrior, LatentTable
    prior = GMMPrior(4, 3).double()
    tables_ = [LatentTable(300, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                           fused_optimizer=kind, lr=0.05),
               LatentTable(300, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                           sparse=True)]
    opt = (torch.optim.SparseAdam if kind == "adam" else torch.optim.SGD)(
        [tables_[1].mu, tables_[1].logvar], lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        idx = torch.randint(0, 100, (128,), generator=g)
        eps = torch.randn(128, 4, generator=g, dtype=torch.float64)
        w = torch.randn(128, 4, generator=g, dtype=torch.float64)
        for table in tables_:
            z, kl, mu_rows, logvar_rows = table.sample(idx, prior, eps=eps)
            loss = kl.sum() + (w * z).sum()
            if uses in ("both", "mu"):
                loss = loss + (w * mu_rows.sin()).sum()
            if uses == "both":
                loss = loss + logvar_rows.exp().sum()
            loss.backward()
        opt.step()
        opt.zero_grad()
    assert tables_[0].mu.grad is None
    torch.testing.assert_close(tables_[0].mu.detach(), tables_[1].mu.detach(), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(tables_[0].logvar.detach(), tables_[1].logvar.detach(), rtol=1e-12,
                               atol=1e-12)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_step_op_with_the_rows_other_gradients_equals_cpu(dtype):
    N, K, B = 500, 8, 256
    mu0, logvar0, prior = tables(N, K, 3, dtype)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 100, (B,), generator=g)
    args = [torch.randn(B, K, generator=g).to(dtype), torch.randn(B, generator=g).to(dtype),
            torch.randn(B, K, generator=g).to(dtype), torch.randn(B, K, generator=g).to(dtype)]
    eps = torch.randn(B, K, generator=g).to(dtype)
    out = {}
    for device in ("cpu", "cuda"):
        mu, logvar = (t.clone().to(device) for t in interleaved(mu0, logvar0))
        state = torch.zeros(N, 4, K, dtype=dtype, device=device)
        grads = torch.ops.halfvae_ext.reparam_gmm_kl_rows_backward_step_(
            *(a.to(device) for a in args), mu, logvar, state, idx.to(device),
            *(p.to(device) for p in prior), eps.to(device), None, 1, True, "adam", 0.05, 0.9,
            0.999, 1e-8, 1)
        out[device] = [t.cpu() for t in (mu, logvar, state, *grads)]
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(out["cuda"], out["cpu"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_cuda_fused_steps_equal_reference(kind):
    mu0, logvar0, prior = tables(200, 8, 3, device="cuda")
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randint(0, 50, (64,), generator=g).cuda(),
                torch.randn(64, 8, generator=g).cuda()) for _ in range(4)]
    mu_r, lv_r = run_reference_steps(mu0, logvar0, prior, batches, kind, lr=0.05)
    mu_f, lv_f, _ = run_fused_steps(mu0, logvar0, prior, batches, kind, lr=0.05)
    torch.testing.assert_close(mu_f, mu_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lv_f, lv_r, rtol=1e-5, atol=1e-5)
    # The same on interleaved [rows, 2, K] tables (LatentTable's fused layout).
    mu_s, lv_s = (t.requires_grad_() for t in interleaved(mu0, logvar0))
    opt = FusedRowOptimizer(200, 8, kind, lr=0.05, device="cuda")
    for idx, eps in batches:
        z, kl = fused_rows_kl(mu_s, lv_s, idx, *prior, opt, eps=eps)
        (kl.sum() + 0.5 * (z * z).sum()).backward()
    torch.testing.assert_close(mu_s.detach(), mu_f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lv_s.detach(), lv_f, rtol=1e-6, atol=1e-6)


def test_latent_table_module_fused_optimizer_matches_sparse_adam_and_round_trips():
    from halfvae_ext.models import GMMPrior, HalfVAE, LatentTable
    torch.manual_seed(0)
    prior = GMMPrior(4, 3)
    fused = LatentTable(100, 4, fused_optimizer="adam", lr=0.05,
                        generator=torch.Generator().manual_seed(1))
    ref_table = LatentTable(100, 4, sparse=True, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SparseAdam([ref_table.mu, ref_table.logvar], lr=0.05)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        idx = torch.randint(0, 30, (64,), generator=g)
        eps = torch.randn(64, 4, generator=g)
        z, kl = fused(idx, prior, eps=eps)
        (kl.sum() + (z * z).sum()).backward()
        z_r, kl_r = ref_table(idx, prior, eps=eps)
        opt.zero_grad()
        (kl_r.sum() + (z_r * z_r).sum()).backward()
        opt.step()
    assert fused.mu.grad is None
    torch.testing.assert_close(fused.mu.detach(), ref_table.mu.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.logvar.detach(), ref_table.logvar.detach(), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(fused.mu[30:], ref_table.mu[30:])  # untouched rows keep their values
    restored = LatentTable(100, 4, fused_optimizer="adam", lr=0.05)
    restored.load_state_dict(fused.state_dict())
    assert torch.equal(restored.table_optimizer.state, fused.table_optimizer.state)
    assert torch.equal(restored.mu, fused.mu) and torch.equal(restored.logvar, fused.logvar)
    assert int(restored.table_optimizer.step) == 5
    # The fused table keeps mu and logvar interleaved, [rows, 2, K], after loading too.
    for t in (fused, restored):
        assert t.mu.stride() == (8, 1) and t.logvar.data_ptr() == t.mu.data_ptr() + 4 * 4

    # Through HalfVAE (likelihood terms use the rows directly): same steps as the sparse path.
    x = torch.randn(100, 6)
    models = [HalfVAE(100, 6, 4, decoder="mlp", table_optimizer="adam", table_lr=0.05),
              HalfVAE(100, 6, 4, decoder="mlp", sparse=True)]
    models[1].load_state_dict(models[0].state_dict(), strict=False)
    opt = torch.optim.SparseAdam([models[1].latents.mu, models[1].latents.logvar], lr=0.05)
    for _ in range(3):
        idx = torch.randint(0, 100, (32,), generator=g)
        eps = torch.randn(32, 4, generator=g)
        models[0].negative_elbo(x[idx], idx, eps=eps).sum().backward()
        opt.zero_grad()
        models[1].negative_elbo(x[idx], idx, eps=eps).sum().backward()
        opt.step()
    assert models[0].latents.mu.grad is None
    torch.testing.assert_close(models[0].latents.mu.detach(), models[1].latents.mu.detach(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_table_with_in_kernel_eps_steps_like_sparse_adam_with_the_same_draws(device):
    # Without eps, the fused step draws eps in its forward (on the CPU: once, kept for the
    # backward); the sparse path draws inside the kernel and draws again in the backward. With the
    # same generator state both must see the same eps, so the same z, kl, steps and prior grads.
    from halfvae_ext.models import GMMPrior, LatentTable
    torch.manual_seed(0)
    priors = [GMMPrior(4, 3).to(device) for _ in range(2)]
    priors[1].load_state_dict(priors[0].state_dict())
    fused = LatentTable(100, 4, fused_optimizer="adam", lr=0.05,
                        generator=torch.Generator().manual_seed(1)).to(device)
    sparse = LatentTable(100, 4, sparse=True, generator=torch.Generator().manual_seed(1)).to(device)
    opt = torch.optim.SparseAdam([sparse.mu, sparse.logvar], lr=0.05)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        idx = torch.randint(0, 30, (64,), generator=g).to(device)  # duplicates in each batch
        outs = []
        for table, prior in ((fused, priors[0]), (sparse, priors[1])):
            draws = torch.Generator(device=device).manual_seed(100 + step)
            z, kl = table(idx, prior, generator=draws)
            (kl.sum() + (z * z).sum()).backward()
            outs.append((z.detach(), kl.detach()))
        opt.step()
        opt.zero_grad()
        if step == 0:  # same tables, same eps: the same bits, prior gradients included
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
            for name in ("logits", "means", "logvars"):
                assert torch.equal(getattr(priors[0], name).grad, getattr(priors[1], name).grad)
        else:  # the two Adams round differently in the last bits
            torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-4)
    assert fused.mu.grad is None
    torch.testing.assert_close(fused.mu.detach(), sparse.mu.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.logvar.detach(), sparse.logvar.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.mu[30:], sparse.mu[30:])  # untouched rows keep their values


# ----------------------------------------------------------------------------- no host syncs
def test_step_count_is_a_python_int_saved_as_the_step_tensor():
    """The step count never lives in a (GPU) buffer, which int() would synchronize every step; it
    still travels in state_dict as the 0-d int64 tensor "step", so tables saved by the versions
    that kept it as a buffer load, and theirs load here."""
    mu0, logvar0, prior = tables(20, 4, 3)
    batches = [(torch.tensor([1, 2, 2, 19]), torch.randn(4, 4)) for _ in range(3)]
    _, _, opt = run_fused_steps(mu0, logvar0, prior, batches, "adam", 0.1)
    assert type(opt.num_steps) is int and opt.step == 3
    assert "step" not in dict(opt.named_buffers())
    saved = opt.state_dict()
    assert saved["step"].dtype == torch.int64 and saved["step"].shape == () and saved["step"] == 3
    # A state_dict as the buffer version wrote it (same keys): the count comes back.
    old = {"state": saved["state"].clone(), "step": torch.tensor(7)}
    fresh = FusedRowOptimizer(20, 4, "adam", lr=0.1)
    fresh.load_state_dict(old)
    assert fresh.num_steps == 7 and torch.equal(fresh.state, old["state"])
    with pytest.raises(RuntimeError, match="Missing key.*step"):
        FusedRowOptimizer(20, 4, "adam").load_state_dict({"state": saved["state"]})
    # The next step continues from the loaded count (Adam's bias correction uses it).
    mu, logvar = (t.clone().requires_grad_() for t in (mu0, logvar0))
    z, kl = fused_rows_kl(mu, logvar, batches[0][0], *prior, fresh, eps=batches[0][1])
    kl.sum().backward()
    assert fresh.num_steps == 8


def _record_ops(fn):
    """The halfvae_ext ops fn calls, with their arguments (the step of autograd included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "halfvae_ext":
                calls.append((func._schema.name.split("::")[1], func._schema, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return calls


def _argument(call, name):
    _, schema, args, kwargs = call
    names = [a.name for a in schema.arguments]
    i = names.index(name)
    if name in kwargs:
        return kwargs[name]
    return args[i] if i < len(args) else schema.arguments[i].default_value


def test_backward_ops_skip_the_range_check_the_forward_made():
    """Autograd's backward tells the backward ops (gmm_log_prob's too) that the forward checked idx
    and prior_index (range_checked=True): one check, one CUDA synchronization, per training step.
    Called directly, they check (the default)."""
    mu, logvar, prior = tables(10, 4, 3)
    idx, eps = torch.tensor([0, 9, 3]), torch.randn(3, 4)
    opt = FusedRowOptimizer(10, 4, "adam", lr=0.1)
    m, lv = (t.clone().requires_grad_() for t in (mu, logvar))
    p = [t.clone().requires_grad_() for t in prior]

    def fused_step():
        z, kl = fused_rows_kl(m, lv, idx, *p, opt, eps=eps)
        (kl.sum() + z.sum()).backward()

    def rows_step():
        z, kl = hv.reparam_gmm_kl_rows(m, lv, idx, *p, eps=eps)
        (kl.sum() + z.sum()).backward()

    def dense_step():
        z, kl = hv.reparam_gmm_kl(m[:3].detach().requires_grad_(), lv[:3].detach(), *p, eps=eps)
        (kl.sum() + z.sum()).backward()

    grouped = [torch.randn(5, 4, 3, requires_grad=True) for _ in range(3)]
    u = torch.tensor([4, 0, 2])

    def log_prob_step():
        z = mu[:3].clone().requires_grad_()
        hv.gmm_log_prob(z, *grouped, prior_index=u).sum().backward()

    for fn, backward_op in ((fused_step, "reparam_gmm_kl_rows_backward_step_"),
                            (rows_step, "reparam_gmm_kl_rows_backward"),
                            (dense_step, "reparam_gmm_kl_backward"),
                            (log_prob_step, "gmm_log_prob_backward")):
        calls = [c for c in _record_ops(fn) if c[0] == backward_op]
        assert len(calls) == 1 and _argument(calls[0], "range_checked") is True, backward_op
    # Direct calls check by default, and before the step writes anything.
    ops = torch.ops.halfvae_ext
    bad = torch.tensor([0, 10, 3])
    g = torch.ones(3, 4)
    with pytest.raises(IndexError, match=r"idx values must be in \[0, 10\)"):
        ops.reparam_gmm_kl_rows_backward(g, torch.ones(3), mu, logvar, bad, *prior, eps, None, 1,
                                         True)
    with pytest.raises(IndexError, match="prior_index values must be in"):
        ops.gmm_log_prob_backward(g, mu[:3], *grouped, True, torch.tensor([0, 5, 1]))
    state, before = torch.zeros(10, 4, 4), mu.clone()
    with pytest.raises(IndexError, match="idx values must be in"):
        ops.reparam_gmm_kl_rows_backward_step_(g, torch.ones(3), None, None, mu, logvar, state,
                                               bad, *prior, eps, None, 1, True, "adam", 0.1, 0.9,
                                               0.999, 1e-8, 1)
    assert torch.equal(mu, before) and torch.count_nonzero(state) == 0


def test_one_check_covers_idx_and_prior_index():
    """The forward checks idx and prior_index together (one copy to the host), each with its own
    message."""
    mu, logvar, _ = tables(10, 4, 3)
    prior = [torch.randn(5, 4, 3) for _ in range(3)]
    eps = torch.randn(3, 4)
    ok_idx, ok_u = torch.tensor([0, 9, 3]), torch.tensor([4, 0, 2])
    hv.reparam_gmm_kl_rows(mu, logvar, ok_idx, *prior, eps=eps, prior_index=ok_u)
    with pytest.raises(IndexError, match=r"idx values must be in \[0, 10\), got min 0 and max 10"):
        hv.reparam_gmm_kl_rows(mu, logvar, torch.tensor([0, 10, 3]), *prior, eps=eps,
                               prior_index=ok_u)
    with pytest.raises(IndexError, match=r"prior_index values must be in \[0, 5\) \(the number "
                                         r"of prior groups\), got min -1 and max 2"):
        hv.reparam_gmm_kl_rows(mu, logvar, ok_idx, *prior, eps=eps,
                               prior_index=torch.tensor([-1, 0, 2], dtype=torch.int32))
    with pytest.raises(IndexError, match="prior_index values must be in"):
        hv.gmm_log_prob(mu[:3], *prior, prior_index=torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_update_op_with_no_latent_dimensions(device, fused):
    """K == 0 with a non-empty idx: nothing to step (on CUDA a grid of 0 blocks would be an
    invalid launch), but idx is still checked."""
    ops = torch.ops.halfvae_ext
    mu, logvar = torch.empty(6, 0, device=device), torch.empty(6, 0, device=device)
    state = torch.empty(6, 4, 0, device=device)
    idx = torch.tensor([0, 5, 5], device=device)
    g = torch.empty(3, 0, device=device)
    prior = [torch.empty(0, 3, device=device) for _ in range(3)]
    if fused:
        out = ops.reparam_gmm_kl_rows_backward_step_(
            g, torch.ones(3, device=device), None, None, mu, logvar, state, idx, *prior, g, None,
            1, True, "adam", 0.1, 0.9, 0.999, 1e-8, 1)
        assert all(o.shape == (0, 3) for o in out)
    else:
        ops.latent_rows_update_(mu, logvar, state, idx, g, g, "adam", 0.1, 0.9, 0.999, 1e-8, 1)
        with pytest.raises(IndexError, match="idx values must be in"):
            ops.latent_rows_update_(mu, logvar, state, idx + 1, g, g, "sgd", 0.1, 0.9, 0.999,
                                    1e-8, 1)
    if device == "cuda":
        torch.cuda.synchronize()  # a bad launch would surface here


# ----------------------------------------------------------------------------- layout on .to()
def _assert_interleaved(table):
    N, K = table.mu.shape
    mu, logvar = table.mu, table.logvar
    assert mu.stride() == (2 * K, 1) and logvar.stride() == (2 * K, 1)
    assert logvar.storage_offset() == mu.storage_offset() + K
    assert table._joint_table() is not None  # one storage


def test_latent_table_conversions_keep_the_interleaved_layout():
    """.to(dtype/device), .double(), .cuda() convert the [N, 2, K] table once: mu and logvar stay
    its halves (one storage, row stride 2K), and the fused step keeps working on them."""
    from halfvae_ext.models import GMMPrior, LatentTable
    table = LatentTable(50, 4, fused_optimizer="adam", lr=0.05,
                        generator=torch.Generator().manual_seed(1))
    _assert_interleaved(table)
    mu0, lv0 = table.mu.detach().clone(), table.logvar.detach().clone()
    table.double()
    _assert_interleaved(table)
    assert table.mu.dtype == torch.float64 and table.table_optimizer.state.dtype == torch.float64
    assert table.mu.untyped_storage().data_ptr() == table.logvar.untyped_storage().data_ptr()
    torch.testing.assert_close(table.mu.detach(), mu0.double(), rtol=0, atol=0)
    torch.testing.assert_close(table.logvar.detach(), lv0.double(), rtol=0, atol=0)
    assert isinstance(table.mu, torch.nn.Parameter) and table.mu.requires_grad
    # The step writes through the joint table: mu and logvar move, and stay its halves.
    prior = GMMPrior(4, 3).double()
    z, kl = table(torch.tensor([0, 3, 3]), prior, eps=torch.randn(3, 4, dtype=torch.float64))
    (kl.sum() + z.sum()).backward()
    assert not torch.equal(table.mu.detach(), mu0.double())
    assert not torch.equal(table.logvar.detach(), lv0.double())
    _assert_interleaved(table)
    # A device move (meta: no data, but the layout is the storage's)
    table.to("meta")
    assert table.mu.device.type == "meta"
    _assert_interleaved(table)
    # Tables without a fused optimizer keep their separate tensors.
    plain = LatentTable(50, 4).double()
    assert plain._joint_table() is None and plain.mu.is_contiguous()


@requires_cuda
def test_cuda_latent_table_keeps_the_interleaved_layout_on_the_gpu():
    from halfvae_ext.models import GMMPrior, LatentTable
    table = LatentTable(50, 4, fused_optimizer="adam", lr=0.05).to("cuda")
    _assert_interleaved(table)
    assert table.mu.is_cuda and table.table_optimizer.state.is_cuda
    z, kl = table(torch.tensor([0, 3, 3], device="cuda"), GMMPrior(4, 3).cuda(),
                  generator=torch.Generator("cuda").manual_seed(0))
    kl.sum().backward()
    _assert_interleaved(table.cpu())
