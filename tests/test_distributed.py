"""Row-keyed draws (philox_normal_rows) and the row-sharded latent table on torch.distributed.

The multi-process tests start one process per rank (this file run as a script: `python
tests/test_distributed.py worker SCENARIO RANK WORLD PORT OUT ...`), gloo on localhost, one thread
each, a hard timeout per test, and every child killed and reaped whatever happens. The ranks dump
what they computed; the comparisons run here, against a single-process LatentTable given the same
global batches and the same row-keyed eps.

Tolerance of the N-rank vs 1-rank comparisons (float32): rtol 1e-5, atol 1e-6. The forward of the
first step is compared exactly (same parameters, same eps, the kernels compute each row on its
own). After that the prior's gradient is a sum of per-owner partial sums (each rounded to float32)
all-reduced across ranks, and the decoder's gradient a sum of per-rank matmuls, where one process
sums one batch: the replicated parameters differ by float32 rounding, a few units of 1e-7 relative
per step, and every row and moment inherits that. Duplicate ids are summed in the same order on
any number of ranks, so they add no difference.
"""
from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import halfvae_ext
from halfvae_ext import GMMPrior, LatentTable
from halfvae_ext.ops import philox_normal, philox_normal_rows

HERE = os.path.abspath(__file__)
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- philox_normal_rows
def _seed(a, b):
    return torch.tensor([a, b], dtype=torch.int64)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_are_the_stream_at_row_positions(K, dtype):
    N = 301
    seed = _seed(123456789, -987654321)
    full = philox_normal(seed, (N, K), dtype)
    g = torch.Generator().manual_seed(K)
    rows = torch.randint(0, N, (517,), generator=g)  # unsorted, with duplicates
    got = philox_normal_rows(seed, rows, K, dtype)
    assert got.shape == (517, K) and got.dtype == dtype
    assert torch.equal(got, full[rows])
    assert torch.equal(philox_normal_rows(seed, rows.int(), K, dtype), full[rows])


def test_rows_depend_on_seed_offset_and_row_only():
    rows = torch.tensor([5, 0, 5, 1_000_000_007, 2**40])
    a = philox_normal_rows(_seed(1, 2), rows, 8)
    assert torch.equal(a[0], a[2])  # a row's draw: the same wherever it sits
    assert torch.equal(philox_normal_rows(_seed(1, 2), rows[3:], 8), a[3:])
    assert torch.isfinite(a).all()
    assert not torch.equal(a[3], a[4])
    assert not torch.equal(philox_normal_rows(_seed(1, 3), rows, 8), a)
    assert not torch.equal(philox_normal_rows(_seed(2, 2), rows, 8), a)
    # a large batch: the moments of N(0, 1)
    big = philox_normal_rows(_seed(9, 0), torch.arange(3, 200_003, 2), 8)
    assert abs(float(big.mean())) < 0.005 and abs(float(big.std()) - 1) < 0.005


def test_rows_empty_and_bad_arguments():
    assert philox_normal_rows(_seed(1, 1), torch.empty(0, dtype=torch.int64), 4).shape == (0, 4)
    with pytest.raises(IndexError, match="rows values must be in"):
        philox_normal_rows(_seed(1, 1), torch.tensor([3, -1]), 4)
    with pytest.raises(ValueError, match="rows must be a 1-D int64 or int32"):
        philox_normal_rows(_seed(1, 1), torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="num_latents must be a positive integer"):
        philox_normal_rows(_seed(1, 1), torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="seed must be an int64 tensor of 2 elements"):
        philox_normal_rows(torch.tensor([1, 2, 3]), torch.tensor([1]), 4)
    with pytest.raises(TypeError, match="rows must be a torch.Tensor"):
        philox_normal_rows(_seed(1, 1), [1, 2], 4)


def test_rows_fake_and_opcheck():
    seed, rows = _seed(3, 4), torch.tensor([4, 1, 4])
    torch.library.opcheck(torch.ops.halfvae_ext.philox_normal_rows.default,
                          (seed, rows, 5, torch.float32))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        out = philox_normal_rows(mode.from_tensor(seed), mode.from_tensor(rows), 5)
        assert out.shape == (3, 5)


@pytest.mark.skipif(not halfvae_ext.cuda_kernels_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("K", [1, 3, 8])
def test_rows_cuda_matches_cpu(K):
    seed, rows = _seed(11, 12), torch.randint(0, 10_000, (4099,))
    cpu = philox_normal_rows(seed, rows, K, torch.float64)
    gpu = philox_normal_rows(seed.cuda(), rows.cuda(), K, torch.float64).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-12, atol=1e-12)
    full = philox_normal(seed.cuda(), (10_000, K), torch.float32).cpu()
    torch.testing.assert_close(philox_normal_rows(seed.cuda(), rows.cuda(), K).cpu(), full[rows])


def test_halfvae_takes_a_table_of_its_size_only():
    from halfvae_ext import HalfVAE
    table = LatentTable(10, 3, fused_optimizer="adam")
    assert HalfVAE(10, 4, 3, latents=table).latents is table
    with pytest.raises(ValueError, match=r"latents has 10 rows of 3 latents, the model 11 of 3"):
        HalfVAE(11, 4, 3, latents=table)
    with pytest.raises(TypeError, match="latents must provide the Latents protocol"):
        HalfVAE(10, 4, 3, latents=torch.nn.Linear(3, 3))


def test_sharded_table_needs_an_initialized_group():
    from halfvae_ext.distributed import ShardedLatentTable
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        ShardedLatentTable(10, 3)
    with pytest.raises(ValueError, match="fused_optimizer must be one of"):
        ShardedLatentTable(10, 3, fused_optimizer=None)


# ----------------------------------------------------------------------------- the shared problem
N, K, C, D, SEED, TABLE_LR, LR, BATCH = 37, 8, 3, 5, 7, 0.05, 0.01, 30


class Net(torch.nn.Module):
    """What every rank replicates (prior, decoder) next to a table (sharded or not)."""

    def __init__(self, table, groups=1):
        super().__init__()
        self.table = table
        self.prior = GMMPrior(K, C, num_groups=groups, jitter=0.1,
                              generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        self.dec = torch.nn.Linear(K, D, bias=False)

    def replicated(self):
        return list(self.prior.parameters()) + list(self.dec.parameters())


def global_batch(step):
    """The step's global batch: ids with duplicates (row 3 in every rank's share), data, groups."""
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, N, (BATCH,), generator=g)
    idx[::7] = 3
    idx[1] = idx[2]
    return idx, torch.randn(BATCH, D, generator=g), idx % 2


def rank_share(step, world, rank):
    """[lo, hi) of the global batch that `rank` asks for: equal shares on even steps; on odd
    steps rank 0 asks for nothing."""
    if world > 1 and step % 2 == 1:
        bounds = [0] + torch.linspace(0, BATCH, world).round().long().tolist()
    else:
        bounds = torch.linspace(0, BATCH, world + 1).round().long().tolist()
    return bounds[rank], bounds[rank + 1]


def loss_of(net, z, kl, mu_rows, logvar_rows, x):
    # every output of sample() takes part, so every gradient path reaches the owners
    return (kl.sum() + ((net.dec(z) - x) ** 2).sum() + 0.1 * (mu_rows ** 2).sum()
            + 0.05 * logvar_rows.sum()) / BATCH


def initial_mu():
    key = _seed(SEED, -1)
    return (philox_normal_rows(key, torch.arange(N), K, torch.float64)).float()


def table_optimizer(spec):
    """A test's optimizer spec, "kind" or "kind:bf16", as table arguments."""
    kind, _, state = spec.partition(":")
    return dict(fused_optimizer=kind, state_dtype=torch.bfloat16 if state == "bf16" else None)


def reference_run(steps, groups=1, kl="mc", optimizer="adam"):
    """One process, a plain LatentTable fed the global batches and the row-keyed eps."""
    torch.set_num_threads(1)
    table = LatentTable(N, K, init_mu=initial_mu(), init_logvar=-2.0, lr=TABLE_LR,
                        **table_optimizer(optimizer))
    net = Net(table, groups)
    opt = torch.optim.Adam(net.replicated(), lr=LR)
    zs, kls = [], []
    for step in range(steps):
        idx, x, u = global_batch(step)
        eps = philox_normal_rows(_seed(SEED, step), idx, K)
        z, k, m, lv = table.sample(idx, net.prior, eps=eps, u=u if groups > 1 else None, kl=kl)
        zs.append(z.detach().clone())
        kls.append(k.detach().clone())
        opt.zero_grad()
        loss_of(net, z, k, m, lv, x).backward()
        opt.step()
    return dict(zs=zs, kls=kls, mu=table.mu.detach().clone(), logvar=table.logvar.detach().clone(),
                state=table.table_optimizer.state.clone(), row_state=_row_state(table),
                step=int(table.table_optimizer.step),
                prior={k: v.detach().clone() for k, v in net.prior.state_dict().items()},
                dec=net.dec.weight.detach().clone(), opt=opt.state_dict())


# ----------------------------------------------------------------------------- worker side
def _train_steps(net, opt, first, last, world, rank, groups, kl="mc"):
    from halfvae_ext.distributed import all_reduce_gradients
    zs, kls = {}, {}
    for step in range(first, last):
        idx, x, u = global_batch(step)
        lo, hi = rank_share(step, world, rank)
        z, k, m, lv = net.table.sample(idx[lo:hi], net.prior,
                                       u=u[lo:hi] if groups > 1 else None, kl=kl)
        zs[step], kls[step] = z.detach().clone(), k.detach().clone()
        opt.zero_grad()
        loss_of(net, z, k, m, lv, x[lo:hi]).backward()
        all_reduce_gradients(net.replicated())
        opt.step()
    return zs, kls


def _row_state(table):
    """The per-row optimizer state (row-wise kinds) as a plain copy, else None."""
    rs = table.table_optimizer.row_state
    return None if rs is None else rs.clone()


def _dump(net, opt, out, rank, **more):
    mu, logvar = net.table.read_rows(torch.arange(N))
    t = net.table
    torch.save(dict(mu=mu, logvar=logvar, state=t.table_optimizer.state.clone(),
                    row_state=_row_state(t),
                    row_start=t.row_start, step=int(t.table_optimizer.step),
                    draws=int(t.draws),
                    prior={k: v.detach().clone() for k, v in net.prior.state_dict().items()},
                    dec=net.dec.weight.detach().clone(), opt=opt.state_dict(), **more),
               os.path.join(out, f"rank{rank}.pt"))


def _sharded_net(groups=1, timeout=60, optimizer="adam"):
    from halfvae_ext.distributed import ShardedLatentTable
    table = ShardedLatentTable(N, K, lr=TABLE_LR, seed=SEED, init_logvar=-2.0, timeout=timeout,
                               **table_optimizer(optimizer))
    net = Net(table, groups)
    return net, torch.optim.Adam(net.replicated(), lr=LR)


def scenario_train(rank, world, out, steps, groups, kl, optimizer="adam"):
    net, opt = _sharded_net(int(groups), optimizer=optimizer)
    zs, kls = _train_steps(net, opt, 0, int(steps), world, rank, int(groups), kl)
    _dump(net, opt, out, rank, zs=zs, kls=kls)


def scenario_resume(rank, world, out, load, first, last, save, optimizer="adam"):
    """Load (unless "-"), train steps [first, last), save (unless "-"), dump."""
    from halfvae_ext.distributed import load_checkpoint, save_checkpoint
    net, opt = _sharded_net(optimizer=optimizer)
    first, last = int(first), int(last)
    if load != "-":
        extra = load_checkpoint(load, net, opt, extra={"step": torch.tensor(0)})
        assert int(extra["step"]) == first, (int(extra["step"]), first)
    zs, kls = _train_steps(net, opt, first, last, world, rank, 1)
    if save != "-":
        save_checkpoint(save, net, opt, extra={"step": torch.tensor(last)})
    _dump(net, opt, out, rank, zs=zs, kls=kls)


def scenario_bad_id(rank, world, out):
    from halfvae_ext.distributed import all_reduce_gradients
    net, opt = _sharded_net()
    before = net.table.read_rows(torch.arange(N))
    state_before = net.table.table_optimizer.state.clone()
    report = {}
    for bad in (torch.tensor([0, N]), torch.tensor([-1, 2]), torch.tensor([[1]])):
        idx = bad if rank == world - 1 else torch.tensor([1, 2, 3])
        try:
            net.table.sample(idx, net.prior)
        except (IndexError, ValueError) as e:
            report.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
    try:  # a bad argument other than idx, on one rank
        net.table.sample(torch.tensor([1]), net.prior, kl="bogus" if rank == world - 1 else "mc")
    except ValueError as e:
        report.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
    after = net.table.read_rows(torch.arange(N))
    report["unchanged"] = bool(torch.equal(before[0], after[0]) and
                               torch.equal(before[1], after[1]) and
                               torch.equal(state_before, net.table.table_optimizer.state))
    report["draws"] = int(net.table.draws)
    report["step"] = int(net.table.table_optimizer.step)
    # given eps travel with their ids: the in-kernel draw of the same rows gives the same z
    idx = torch.tensor([rank, 5, 36])
    d = int(net.table.draws)
    z_drawn, _ = net.table(idx, net.prior)
    z_given, _ = net.table(idx, net.prior, eps=philox_normal_rows(_seed(SEED, d), idx, K))
    report["eps_given_equal"] = bool(torch.equal(z_drawn, z_given))
    report["draws_after_eps"] = int(net.table.draws) - d  # given eps draw nothing
    # generators seeded alike agree; seeded differently, every rank refuses
    z_gen, _ = net.table(idx, net.prior, generator=torch.Generator().manual_seed(5))
    report["generator_ok"] = z_gen.shape == (3, K)
    try:
        net.table(idx, net.prior, generator=torch.Generator().manual_seed(rank))
    except ValueError as e:
        report["generator_disagree"] = str(e)
    # the group is still usable: a good step goes through
    z, kl, m, lv = net.table.sample(torch.tensor([rank, 5]), net.prior)
    (kl.sum() + m.sum()).backward()
    all_reduce_gradients(net.replicated())
    report["after_good_step"] = int(net.table.table_optimizer.step)
    torch.save(report, os.path.join(out, f"rank{rank}.pt"))


FORMATS_REFUSED = ("adam", "sgd", "rowwise_adagrad", "rowwise_adam:bf16", "adam:bf16")


def scenario_formats(rank, world, out):
    """A rowwise_adam table's state dict into tables of the other kinds (bfloat16 moments
    included): refused, nothing loaded; into a rowwise_adam table: loaded."""
    from halfvae_ext.distributed import ShardedLatentTable
    saved, _ = _sharded_net(optimizer="rowwise_adam")
    lo, hi = rank_share(0, world, rank)
    idx, x, _ = global_batch(0)
    z, k, m, lv = saved.table.sample(idx[lo:hi], saved.prior)
    loss_of(saved, z, k, m, lv, x[lo:hi]).backward()  # a step: non-zero moments and counts
    state = saved.table.state_dict()
    errors, untouched = {}, True
    for kind in FORMATS_REFUSED:
        other = ShardedLatentTable(N, K, seed=SEED + 1, **table_optimizer(kind))
        before = (other.rows.clone(), other.table_optimizer.state.clone())
        try:
            other.load_state_dict(state)
        except RuntimeError as e:
            errors[kind] = str(e)
        untouched &= bool(torch.equal(other.rows, before[0])
                          and torch.equal(other.table_optimizer.state, before[1]))
    same = ShardedLatentTable(N, K, fused_optimizer="rowwise_adam", seed=SEED + 1)
    same.load_state_dict(state)
    same_kind_loads = bool(torch.equal(same.rows, saved.table.rows) and torch.equal(
        same.table_optimizer.row_state, saved.table.table_optimizer.row_state))
    torch.save(dict(errors=errors, untouched=untouched, same_kind_loads=same_kind_loads),
               os.path.join(out, f"rank{rank}.pt"))


def scenario_edges(rank, world, out):
    """init_mu as a callable, a rank that owns no rows, read_rows of any rows."""
    from halfvae_ext.distributed import ShardedLatentTable, all_reduce_gradients
    report = {}
    t = ShardedLatentTable(N, K, init_mu=lambda rows: rows.double().unsqueeze(1) + 0.01 *
                           torch.arange(K), seed=SEED)
    mu, logvar = t.read_rows(torch.tensor([36, 0, 36, 20]))
    report["init_callable"] = bool(torch.equal(
        mu, torch.tensor([36, 0, 36, 20]).float().unsqueeze(1) + 0.01 * torch.arange(K)))
    report["init_logvar"] = bool((logvar == -2.0).all())
    try:
        ShardedLatentTable(N, K, init_mu=lambda rows: torch.zeros(len(rows), K + 1))
    except ValueError as e:
        report["init_bad_shape"] = str(e)
    # one row for two ranks: the last owns nothing, yet both ask for it and step in lockstep
    tiny = ShardedLatentTable(1, K, seed=SEED)
    report["tiny_rows"] = (tiny.row_start, tiny.row_stop)
    prior = GMMPrior(K, C)
    z, kl, m, lv = tiny.sample(torch.tensor([0, 0]), prior)
    (kl.sum() + (m ** 2).sum()).backward()
    all_reduce_gradients(prior)
    report["tiny_step"] = int(tiny.table_optimizer.step)
    report["tiny_mu"] = tiny.read_rows(torch.tensor([0]))[0]
    report["z_dup_equal"] = bool(torch.equal(z[0], z[1]))  # the draw is keyed by the row
    torch.save(report, os.path.join(out, f"rank{rank}.pt"))


def scenario_dead_rank(rank, world, out, how):
    net, opt = _sharded_net(timeout=DEAD_RANK_TIMEOUT)
    z, kl = net.table(torch.tensor([rank, 10 + rank]), net.prior)
    kl.sum().backward()
    if rank == world - 1:
        if how == "hang":  # alive, connected, but never calls the next collective
            time.sleep(DEAD_RANK_TIMEOUT + 5)
        os._exit(17)  # dies without a word, like a killed process
    start = time.monotonic()
    try:
        for _ in range(3):
            z, kl = net.table(torch.tensor([1, 20]), net.prior)
            kl.sum().backward()
        report = {"raised": None}
    except RuntimeError as e:
        report = {"raised": str(e)}
    report["seconds"] = time.monotonic() - start
    torch.save(report, os.path.join(out, f"rank{rank}.pt"))
    os._exit(0)  # the group is broken: skip its teardown


def scenario_nccl(rank, world, out, steps):
    """scenario_train with CUDA tensors on NCCL (the caller set up the group)."""
    from halfvae_ext.distributed import ShardedLatentTable
    table = ShardedLatentTable(N, K, fused_optimizer="adam", lr=TABLE_LR, seed=SEED,
                               init_logvar=-2.0, timeout=60)
    net = Net(table).to(table.device)
    opt = torch.optim.Adam(net.replicated(), lr=LR)
    zs, kls = {}, {}
    from halfvae_ext.distributed import all_reduce_gradients
    for step in range(int(steps)):
        idx, x, _ = global_batch(step)
        lo, hi = rank_share(step, world, rank)
        z, kl, m, lv = table.sample(idx[lo:hi].cuda(), net.prior)
        zs[step], kls[step] = z.detach().cpu(), kl.detach().cpu()
        opt.zero_grad()
        loss_of(net, z, kl, m, lv, x[lo:hi].cuda()).backward()
        all_reduce_gradients(net.replicated())
        opt.step()
    mu, logvar = table.read_rows(torch.arange(N, device=table.device))
    torch.save(dict(zs=zs, kls=kls, mu=mu.cpu(), logvar=logvar.cpu()),
               os.path.join(out, f"rank{rank}.pt"))


SCENARIOS = {"formats": scenario_formats, "edges": scenario_edges, "nccl": scenario_nccl, "train": scenario_train, "resume": scenario_resume, "bad_id": scenario_bad_id,
             "dead_rank": scenario_dead_rank}


def worker_main(argv):
    scenario, rank, world, port, out, *args = argv
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    from halfvae_ext.distributed import init_process_group
    backend = "nccl" if scenario == "nccl" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    init_process_group(backend, timeout_s=60, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                       world_size=world)
    SCENARIOS[scenario](rank, world, out, *args)
    print(f"rank {rank}: scenario done", flush=True)
    import torch.distributed as dist
    gc.collect()  # tables and pending work freed while their group is alive
    dist.barrier()  # no rank tears down while a peer may still talk to it
    dist.destroy_process_group()
    print(f"rank {rank}: group destroyed", flush=True)
    # Skip interpreter finalization: a rank aborted now and then (std::terminate, no Python error,
    # about 1 run in 20 of the 2-rank tests here), and gloo's threads torn down during finalization
    # are a known cause (pytorch/pytorch#179291). The prints above show how far a rank got if it
    # happens again. Everything the test checks is written and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- parent side
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario, world, out, *args, timeout=150):
    """Start `world` ranks of a scenario; wait at most `timeout` s for all; kill and reap every
    child whatever happens. Returns [(returncode, stderr)]."""
    port = free_port()
    # faulthandler: a rank that crashes shows its Python stack in its log
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    procs = []
    try:
        for r in range(world):
            log = open(os.path.join(out, f"log{r}.txt"), "w+")
            procs.append((subprocess.Popen(
                [sys.executable, HERE, "worker", scenario, str(r), str(world), str(port), out,
                 *map(str, args)], stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True), log))
        deadline = time.monotonic() + timeout
        for p, _ in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario} on {world} ranks did not finish within {timeout} s:\n"
                    + _logs(procs))
    finally:
        for p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    result = [(p.returncode, _read(log)) for p, log in procs]
    for _, log in procs:
        log.close()
    return result


def _read(log):
    log.flush()
    log.seek(0)
    return log.read()


def _logs(procs):
    return "\n".join(f"--- rank {r}:\n{_read(log)[-3000:]}" for r, (_, log) in enumerate(procs))


def check_ok(results):
    for r, (rc, log) in enumerate(results):
        assert rc == 0, f"rank {r} exited with {rc}:\n{log[-4000:]}"


def load_dumps(out, world):
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


def assert_matches_reference(dumps, ref, world, steps, exact_first=True):
    for r, d in enumerate(dumps):
        for step, z in d["zs"].items():
            idx, _, _ = global_batch(step)
            lo, hi = rank_share(step, world, r)
            if step == 0 and exact_first:
                assert torch.equal(z, ref["zs"][0][lo:hi]), f"rank {r} z at step 0"
                assert torch.equal(d["kls"][0], ref["kls"][0][lo:hi]), f"rank {r} kl at step 0"
            torch.testing.assert_close(z, ref["zs"][step][lo:hi], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(d["kls"][step], ref["kls"][step][lo:hi], rtol=RTOL,
                                       atol=ATOL)
        torch.testing.assert_close(d["mu"], ref["mu"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(d["logvar"], ref["logvar"], rtol=RTOL, atol=ATOL)
        start = d["row_start"]
        torch.testing.assert_close(d["state"], ref["state"][start:start + d["state"].shape[0]],
                                   rtol=RTOL, atol=ATOL)
        assert (d["row_state"] is None) == (ref["row_state"] is None)
        if d["row_state"] is not None:  # per-row second moments and step counts
            torch.testing.assert_close(d["row_state"],
                                       ref["row_state"][start:start + d["row_state"].shape[0]],
                                       rtol=RTOL, atol=ATOL)
        assert d["step"] == ref["step"] == steps
        assert d["draws"] == steps
        for k, v in ref["prior"].items():
            torch.testing.assert_close(d["prior"][k], v, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(d["dec"], ref["dec"], rtol=RTOL, atol=ATOL)
    # every rank's replicated parameters are identical, not merely close
    for d in dumps[1:]:
        for k in d["prior"]:
            assert torch.equal(d["prior"][k], dumps[0]["prior"][k])
        assert torch.equal(d["dec"], dumps[0]["dec"])
    assert sum(d["state"].shape[0] for d in dumps) == N


@pytest.fixture
def out_dir():
    with tempfile.TemporaryDirectory(prefix="halfvae-dist-") as d:
        yield d


# groups = 2: a conditional prior (u = id % 2), its [2, K, C] gradients summed over the owners.
@pytest.mark.parametrize("world,groups,kl", [(1, 1, "mc"), (2, 1, "mc"), (3, 1, "mc"),
                                             (2, 2, "mc"), (2, 2, "bound")])
def test_sharded_equals_one_process(world, groups, kl, out_dir):
    steps = 4
    check_ok(run_ranks("train", world, out_dir, steps, groups, kl))
    assert_matches_reference(load_dumps(out_dir, world), reference_run(steps, groups, kl), world,
                             steps)


@pytest.mark.parametrize("optimizer", ["rowwise_adam", "rowwise_adagrad", "sgd",
                                       "rowwise_adam:bf16", "adam:bf16"])
def test_sharded_compact_optimizers_equal_one_process(optimizer, out_dir):
    """The row-wise optimizers keep their per-row state (second moments, step counts) with the
    row's owner: 2 ranks step exactly as one process's LatentTable with the same optimizer.
    bfloat16 moments: each shard rounds with its rows' global numbers (row_offset), so the
    moments equal one process's to the bit pattern (a shard that hashed its local row numbers
    would differ by an ulp of bfloat16, far outside RTOL)."""
    steps = 4
    check_ok(run_ranks("train", 2, out_dir, steps, 1, "mc", optimizer))
    assert_matches_reference(load_dumps(out_dir, 2), reference_run(steps, 1, "mc", optimizer), 2,
                             steps)


def test_sharded_table_refuses_bad_state_dtype_and_other_formats(out_dir):
    """A state dtype the optimizer cannot use is an error naming the argument, before any group
    is needed; a state dict of another optimizer or state dtype loads nothing (2 ranks)."""
    from halfvae_ext.distributed import ShardedLatentTable
    with pytest.raises(ValueError, match="state_dtype"):
        ShardedLatentTable(10, 3, fused_optimizer="rowwise_adam", state_dtype=torch.float16)
    with pytest.raises(ValueError, match="state_dtype"):
        ShardedLatentTable(10, 3, fused_optimizer="sgd", state_dtype=torch.bfloat16)
    check_ok(run_ranks("formats", 2, out_dir))
    for r, d in enumerate(load_dumps(out_dir, 2)):
        for kind, error in d["errors"].items():
            assert "fused_optimizer" in error, (r, kind, error)
        assert set(d["errors"]) == set(FORMATS_REFUSED)
        assert d["untouched"], r
        assert d["same_kind_loads"], r


@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adam", "rowwise_adam:bf16"])
def test_checkpoint_2_to_3_to_1_ranks_equals_uninterrupted(optimizer, out_dir):
    """DCP checkpoints reshard the table and its optimizer state (rowwise_adam: the per-row
    second moments and step counts too; bfloat16 moments as saved) across 2, 3 and 1 ranks."""
    ck1, ck2 = os.path.join(out_dir, "ck1"), os.path.join(out_dir, "ck2")
    plan = [(2, "-", 0, 2, ck1), (3, ck1, 2, 4, ck2), (1, ck2, 4, 5, "-")]
    for world, load, first, last, save in plan:
        run_dir = os.path.join(out_dir, f"run{world}")
        os.mkdir(run_dir)
        check_ok(run_ranks("resume", world, run_dir, load, first, last, save, optimizer))
        if save != "-":
            assert os.path.isdir(save) and not os.path.exists(save + ".partial")
        dumps = load_dumps(run_dir, world)
        ref = reference_run(last, optimizer=optimizer)
        assert_matches_reference(dumps, ref, world, last, exact_first=first == 0)
        # the replicated Adam state came through the checkpoint too
        ref_opt = ref["opt"]
        for i, s in ref_opt["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(dumps[0]["opt"]["state"][i][name], s[name],
                                           rtol=RTOL, atol=ATOL)


def test_bad_id_on_one_rank_raises_everywhere_and_writes_nothing(out_dir):
    world = 2
    check_ok(run_ranks("bad_id", world, out_dir, timeout=90))
    for r, rep in enumerate(load_dumps(out_dir, world)):
        errors = rep["errors"]
        assert len(errors) == 4, (r, errors)
        assert errors[3].startswith("ValueError") and "kl must be 'mc'" in errors[3]
        assert errors[0].startswith("IndexError") and f"rank {world - 1} of {world}" in errors[0]
        assert f"idx values must be in [0, {N})" in errors[0] and "max 37" in errors[0]
        assert errors[1].startswith("IndexError") and "min -1" in errors[1]
        assert errors[2].startswith("ValueError") and "idx must be a 1-D" in errors[2]
        assert rep["unchanged"] and rep["draws"] == 0 and rep["step"] == 0
        assert rep["eps_given_equal"] and rep["draws_after_eps"] == 1 and rep["generator_ok"]
        assert "disagree on seed" in rep["generator_disagree"]
        assert rep["after_good_step"] == 1


def test_init_callable_empty_rank_and_read_rows(out_dir):
    world = 2
    check_ok(run_ranks("edges", world, out_dir, timeout=90))
    reps = load_dumps(out_dir, world)
    for r, rep in enumerate(reps):
        assert rep["init_callable"] and rep["init_logvar"]
        own = 19 if r == 0 else 18  # ceil(37 / 2) rows, then the rest
        assert f"init_mu({own} row ids) must return shape {(own, K)}" in rep["init_bad_shape"]
        assert rep["tiny_rows"] == ((0, 1) if r == 0 else (1, 1))
        assert rep["tiny_step"] == 1 and rep["z_dup_equal"]
    # both ranks read the same stepped row, and it moved from its start
    assert torch.equal(reps[0]["tiny_mu"], reps[1]["tiny_mu"])
    start = philox_normal_rows(_seed(SEED, -1), torch.tensor([0]), K, torch.float64).float()
    assert not torch.equal(reps[0]["tiny_mu"], start)


DEAD_RANK_TIMEOUT = 10


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_dead_or_hung_rank_makes_the_others_fail_not_hang(how, out_dir):
    world = 2
    results = run_ranks("dead_rank", world, out_dir, how, timeout=120)
    assert results[world - 1][0] == 17
    assert results[0][0] == 0, results[0][1][-3000:]
    rep = torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False)
    assert rep["raised"] is not None, "rank 0 went on as if its peer were alive"
    assert "ShardedLatentTable" in rep["raised"] and "resume from the last checkpoint" in \
        rep["raised"]
    # a dead peer's connection resets at once; a hung one is given the table's timeout (plus
    # slack for a loaded machine), not the process group's 60 s
    assert rep["seconds"] < DEAD_RANK_TIMEOUT + 10
    if how == "hang":
        assert rep["seconds"] >= DEAD_RANK_TIMEOUT * 0.9


def run_cmd(cmd, timeout, cwd):
    """Run a command (torchrun and its workers in one session), kill the whole session if it
    outlives `timeout`; returns its output, failing the test on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         text=True, start_new_session=True)
    try:
        output, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        output, _ = p.communicate()
        pytest.fail(f"{cmd} did not finish within {timeout} s:\n{output[-3000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, f"{cmd} exited with {p.returncode}:\n{output[-4000:]}"
    return output


def test_fit_sharded_end_to_end_torchrun_equals_one_process_and_resumes(out_dir):
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (600, 3)) @ rng.normal(size=(3, 4))
    np.save(os.path.join(out_dir, "x.npy"), x.astype(np.float32))
    fit = ["-m", "halfvae_ext.fit_sharded", "x.npy", "--latent-dim", "3", "--batch-size", "128"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]
    run_cmd([sys.executable, *fit, "--steps", "10", "--out", "one.npy"], 120, out_dir)
    run_cmd([*torchrun, *fit, "--steps", "10", "--out", "two.npy"], 120, out_dir)
    # interrupted after 6 steps on 2 processes, resumed on 1
    run_cmd([*torchrun, *fit, "--steps", "6", "--checkpoint", "ck"], 120, out_dir)
    out = run_cmd([sys.executable, *fit, "--steps", "10", "--checkpoint", "ck", "--resume",
                   "--out", "resumed.npy"], 120, out_dir)
    assert "resumed from ck at step 6" in out
    one = np.load(os.path.join(out_dir, "one.npy"))
    assert one.shape == (600, 3) and one.dtype == np.float32
    assert not any(f.endswith(".partial.npy") for f in os.listdir(out_dir))
    for name in ("two.npy", "resumed.npy"):
        np.testing.assert_allclose(np.load(os.path.join(out_dir, name)), one, rtol=RTOL,
                                   atol=ATOL, err_msg=name)
    # the means moved away from their random start (the fit did something)
    start = initial_mu_of(600, 3, seed=0)
    assert np.abs(one - start).max() > 0.05
    # `halfvae separate` under torchrun: fit_sharded with the one-process recipe's whitening,
    # start and schedules, the means standardized
    out = run_cmd([*torchrun, "-m", "halfvae_ext.cli", "separate", "x.npy", "-k", "3", "-o",
                   "sources.npy", "--batch-size", "128", "--max-iter", "10"], 120, out_dir)
    assert "10 steps on 2 process(es)" in out
    from halfvae_ext.cli import SHARDED_SEPARATE_RECIPE
    recipe = [a for k, v in SHARDED_SEPARATE_RECIPE.items()
              for a in ("--" + k.replace("_", "-"), str(v))]
    run_cmd([sys.executable, *fit, "--steps", "10", "--standardize-out", *recipe, "--out",
             "recipe.npy"], 120, out_dir)
    np.testing.assert_allclose(np.load(os.path.join(out_dir, "sources.npy")),
                               np.load(os.path.join(out_dir, "recipe.npy")), rtol=RTOL,
                               atol=ATOL)


def test_fit_sharded_compact_state_on_two_processes_equals_one(out_dir):
    """--table-optimizer rowwise_adam --state-dtype bfloat16: 2 processes give one process's
    means (the moments' rounding is the global row's), and not exact Adam's; bfloat16 for an
    optimizer without moments is refused before anything starts."""
    import numpy as np
    from halfvae_ext.fit_sharded import main
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (600, 3)) @ rng.normal(size=(3, 4))
    np.save(os.path.join(out_dir, "x.npy"), x.astype(np.float32))
    fit = ["-m", "halfvae_ext.fit_sharded", "x.npy", "--latent-dim", "3", "--batch-size", "128",
           "--steps", "10"]
    compact = ["--table-optimizer", "rowwise_adam", "--state-dtype", "bfloat16"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port())]
    run_cmd([sys.executable, *fit, *compact, "--out", "one.npy"], 120, out_dir)
    run_cmd([*torchrun, *fit, *compact, "--out", "two.npy"], 120, out_dir)
    run_cmd([sys.executable, *fit, "--out", "adam.npy"], 120, out_dir)
    one, two, adam = (np.load(os.path.join(out_dir, f"{n}.npy")) for n in ("one", "two", "adam"))
    np.testing.assert_allclose(two, one, rtol=RTOL, atol=ATOL)
    assert np.abs(one - adam).max() > 1e-3  # the option reached the table
    assert main([os.path.join(out_dir, "x.npy"), "--latent-dim", "3", "--table-optimizer",
                 "sgd", "--state-dtype", "bfloat16"]) == 2


def initial_mu_of(n, k, seed):
    return philox_normal_rows(_seed(seed, -1), torch.arange(n), k, torch.float64).float().numpy()


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not halfvae_ext.cuda_kernels_available(),
                    reason="NCCL test needs 2 GPUs and the CUDA kernels")
def test_nccl_two_gpus(out_dir):
    steps, world = 3, 2
    check_ok(run_ranks("nccl", world, out_dir, steps))
    ref = reference_run(steps)
    # CUDA's exp/log/sin/cos differ from the CPU's in the last bits: float32 rounding, amplified
    # by 3 Adam steps
    for r, d in enumerate(load_dumps(out_dir, world)):
        for step, z in d["zs"].items():
            lo, hi = rank_share(step, world, r)
            torch.testing.assert_close(z, ref["zs"][step][lo:hi], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(d["mu"], ref["mu"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(d["logvar"], ref["logvar"], rtol=1e-4, atol=1e-5)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker_main(sys.argv[2:])
