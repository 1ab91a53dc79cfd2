"""A latent table split by rows across the processes of a torch.distributed process group.

Usage (every rank runs the same code; ``torchrun --nproc-per-node 2 train.py``)::

    import torch, torch.distributed as dist
    from halfvae_ext import HalfVAE
    from halfvae_ext.distributed import (ShardedLatentTable, all_reduce_gradients,
                                         init_process_group, save_checkpoint, load_checkpoint)

    init_process_group("gloo", timeout_s=300)        # "nccl" with CUDA tensors
    table = ShardedLatentTable(num_rows, K, fused_optimizer="adam", lr=1e-2)
    model = HalfVAE(num_rows, D, K, latents=table)   # the table is a drop-in for LatentTable
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)   # prior, decoder, likelihood
    for idx, x in my_batches():                      # this rank's global row ids and their data
        loss = model(x, idx).sum() / global_batch_size
        opt.zero_grad(); loss.backward()             # the backward steps the table's rows
        all_reduce_gradients(model)                  # sum over ranks: the prior stays replicated
        opt.step()
    save_checkpoint("ckpt", model, opt)              # DCP; load on any number of ranks

Ready-made: ``torchrun --nproc-per-node 2 -m halfvae_ext.fit_sharded DATA.npy --latent-dim 8
--batch-size 4096 --epochs 5 --out MEANS.npy --checkpoint CKPT`` (add ``--resume`` to continue
from CKPT on any number of processes), or ``torchrun --nproc-per-node 2 -m halfvae_ext.cli
separate DATA.npy -k 8 -o SOURCES.npy --batch-size 4096``.

Design (benchmarks/SCALING.md has the numbers):

- Rows are split in contiguous blocks, ceil(N / W) per rank (the last ones may hold fewer or
  none), the layout of torch.chunk and of a DTensor sharded on dim 0: the owner of a row is one
  division, a rank's rows are one slice (a block read of a memory-mapped file), and checkpoints are
  DTensors that torch.distributed.checkpoint reshards to any other number of ranks. Random
  placement (hashing) would balance hot ids better but needs neither here: a Half-VAE touches
  every row equally often.
- A call ``table(idx, prior)`` is collective: one all_gather of a few integers per rank (error
  flag, seed, per-owner counts), one all_to_all of the ids (and u, eps when given) to their
  owners, the fused gather + sample + KL kernel on the owner, one all_to_all of z, kl (and the
  rows) back. The backward sends grad_z, grad_kl (and the rows' gradients) to the owners, which
  run the fused backward + optimizer step on their rows: the table never has a gradient.
- Draws are keyed by the global row: eps[r, k] at a call is element r * K + k of the Philox
  stream (seed, draw counter) (``philox_normal_rows``), so the result does not depend on the number
  of ranks, the owner or the batch position. A row that occurs several times in one call gets the
  same eps each time (the draw is keyed by the row, not by the position).
- Each owner sees its rows in rank-major order (rank 0's ids first, each rank's in its own order):
  the batch of a 1-rank run over the concatenated global batch, restricted to the owner's rows.
  The fused step sums duplicates in batch order, so duplicate ids, within and across ranks, are
  summed in the same order whatever the number of ranks.
- The prior is replicated. The backward hands each rank the prior gradient of the rows it owns;
  ``all_reduce_gradients`` sums every parameter's gradient across ranks (prior partial sums plus
  the decoder's), which is the full-batch gradient when each rank's loss is its share of the
  global loss (sum over its rows / global batch size).
- A bad id, u or eps on any rank is found before anything is sent or written, and every rank
  raises the same error. Every collective waits at most ``timeout`` (a dead rank: the others
  raise within it). Resume from the last checkpoint with ``load_checkpoint`` on any number of
  ranks.
"""
from __future__ import annotations

import datetime
import time
from numbers import Integral
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .collectives import Comm, Plan, timedelta_of
from .ops import kl_code as op_kl_code, philox_normal_rows
from .sharded_checkpoint import load_checkpoint, save_checkpoint
from .table_memory import empty_table
from .table_optim import FUSED_OPTIMIZERS, FusedRowOptimizer, check_fused_optimizer

__all__ = ["ShardedLatentTable", "all_reduce_gradients", "init_process_group", "save_checkpoint",
           "load_checkpoint", "row_block"]

_ops = torch.ops.halfvae_ext
DEFAULT_TIMEOUT_S = 300.0
# The stream of the default random start: an offset the per-call draw counter never reaches.
_INIT_OFFSET = -1


def init_process_group(backend: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                       **kwargs) -> None:
    """torch.distributed.init_process_group with a finite timeout (its default is 30 minutes for
    gloo; a dead peer should surface sooner). Environment variables as set by torchrun."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def row_block(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the rows `rank` owns: ceil(num_rows / world_size) a rank, in order (the
    layout of torch.chunk and of a DTensor sharded on dim 0)."""
    per = -(-num_rows // world_size)
    start = min(num_rows, rank * per)
    return start, min(num_rows, start + per)


class ShardedLatentTable(nn.Module):
    """q(z_n) = N(mu[n], diag(exp(logvar[n]))) for num_rows data points, rows split across the
    ranks of `process_group` (default: the world) in contiguous blocks (:func:`row_block`); each
    rank holds only its rows and their optimizer state (fused: ``fused_optimizer`` "adam",
    "rowwise_adam", "rowwise_adagrad" or "sgd", with ``lr``, ``betas``, ``eps``, as in
    LatentTable; the row-wise ones keep their state per rank too, so a row's step count lives
    with its owner). state_dtype: the dtype of the per-element moments, the table's (default) or
    torch.bfloat16 (as LatentTable's; their stochastic rounding takes the bits of the global row,
    so any number of ranks steps bit for bit as one process).

    init_mu: None (init_std * N(0, 1), drawn per global row from ``seed``: any number of ranks
    starts from the same table), a callable ``rows (int64 global row ids) -> [len(rows), K]`` that
    each rank calls for the rows it owns, or a full [num_rows, K] tensor (each rank copies its
    rows). init_logvar: the start of every logvar. seed: the key of the random start and of the
    in-kernel draws (call c draws with Philox key (seed, c)). timeout: seconds (or a timedelta)
    each collective may take. device: where the rows live (default: the current CUDA device for
    an NCCL group, else the CPU).

    Calls are collective: every rank of the group calls forward/sample/read_rows (with its own
    ids, possibly none) in the same order, and runs the backward of every forward. The prior
    must be the same on every rank (each owner evaluates its rows' KL with its own copy; keep it
    replicated with all_reduce_gradients). u (a conditional prior) travels with the ids to the
    owners.
    """

    def __init__(self, num_rows: int, num_latents: int, *, process_group=None,
                 fused_optimizer: str = "adam", state_dtype=None, lr: float = 1e-2,
                 betas=(0.9, 0.999),
                 eps: float = 1e-8, init_mu: Callable | torch.Tensor | None = None,
                 init_std: float = 1.0, init_logvar: float = -2.0, seed: int = 0,
                 dtype: torch.dtype | None = None, device=None,
                 timeout=DEFAULT_TIMEOUT_S):
        super().__init__()
        for name, v in (("num_rows", num_rows), ("num_latents", num_latents)):
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if fused_optimizer not in FUSED_OPTIMIZERS:
            raise ValueError(f"fused_optimizer must be one of {FUSED_OPTIMIZERS} (a sharded "
                             f"table is always stepped in its backward), got {fused_optimizer!r}")
        check_fused_optimizer(fused_optimizer, dtype or torch.get_default_dtype(), state_dtype)
        if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedLatentTable needs torch.distributed initialized first "
                               "(halfvae_ext.distributed.init_process_group, or "
                               "torch.distributed.init_process_group)")
        group = process_group if process_group is not None else dist.group.WORLD
        if device is None:
            backend = dist.get_backend(group)
            device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                      else torch.device("cpu"))
        device = torch.device(device)
        self.process_group = group
        self.comm = Comm(group, timedelta_of(timeout), device)
        N, K = int(num_rows), int(num_latents)
        self.num_rows, self.num_latents = N, K
        self.world_size, self.rank = self.comm.world, self.comm.rank
        self.rows_per_rank = -(-N // self.world_size)
        self.row_start, self.row_stop = row_block(N, self.world_size, self.rank)
        n = self.row_stop - self.row_start
        dtype = dtype or torch.get_default_dtype()
        self.seed = int(seed)
        # mu and logvar: the halves of one [n, 2, K] block, as in LatentTable's fused mode (a
        # row's mu and logvar share a cache line).
        self.rows = empty_table((n, 2, K), dtype=dtype, device=device)
        # Not a registered submodule: its buffers are this rank's rows only, and the state dict
        # carries them as a sharded tensor instead (_save_to_state_dict).
        self.__dict__["table_optimizer"] = FusedRowOptimizer(
            n, K, fused_optimizer, lr=lr, betas=betas, eps=eps, dtype=dtype, device=device,
            state_dtype=state_dtype, row_offset=self.row_start)
        self.draws = torch.zeros((), dtype=torch.int64)  # calls that drew eps: the Philox offset
        self._grad_anchor = torch.zeros((), requires_grad=True)  # makes every call differentiable
        self._init_rows(init_mu, float(init_std), float(init_logvar))

    # ------------------------------------------------------------------ layout
    @property
    def mu(self) -> torch.Tensor:
        """This rank's rows of mu, [row_stop - row_start, K] (a view)."""
        return self.rows[:, 0]

    @property
    def logvar(self) -> torch.Tensor:
        return self.rows[:, 1]

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def owner(self, idx: torch.Tensor) -> torch.Tensor:
        """The rank that owns each global row id."""
        return torch.div(idx, self.rows_per_rank, rounding_mode="floor")

    def _init_rows(self, init_mu, init_std, init_logvar):
        K, start, stop = self.num_latents, self.row_start, self.row_stop
        self.logvar.fill_(init_logvar)
        if init_mu is not None and not callable(init_mu):
            init_mu = torch.as_tensor(init_mu)
            if init_mu.shape != (self.num_rows, K):
                raise ValueError(f"init_mu must be a callable or have shape "
                                 f"{(self.num_rows, K)}, got {tuple(init_mu.shape)}")
            self.mu.copy_(init_mu[start:stop])
            return
        seed = torch.tensor([self.seed, _INIT_OFFSET], dtype=torch.int64, device=self.device)
        block = 1 << 16  # no full-size temporary for a large shard
        for r0 in range(start, stop, block):
            rows = torch.arange(r0, min(stop, r0 + block), device=self.device)
            if init_mu is None:
                values = init_std * philox_normal_rows(seed, rows, K, torch.float64)
            else:
                values = torch.as_tensor(init_mu(rows))
                if values.shape != (rows.numel(), K):
                    raise ValueError(f"init_mu({rows.numel()} row ids) must return shape "
                                     f"{(rows.numel(), K)}, got {tuple(values.shape)}")
            self.mu[r0 - start:r0 - start + rows.numel()] = values

    # ------------------------------------------------------------------ state dict
    def _sharded(self, local: torch.Tensor):
        """local rows [n, ...] as a DTensor sharded on dim 0 over the group (for DCP)."""
        from torch.distributed.tensor import DTensor, Shard
        mesh = self._mesh()
        shape = (self.num_rows, *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=stride)

    def _mesh(self):
        if getattr(self, "_device_mesh", None) is None:
            from torch.distributed.device_mesh import DeviceMesh
            self._device_mesh = DeviceMesh.from_group(self.process_group, self.device.type)
        return self._device_mesh

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "rows"] = self._sharded(self.rows)
        destination[prefix + "optimizer_state"] = self._sharded(self.table_optimizer.state)
        if self.table_optimizer.row_state is not None:
            destination[prefix + "optimizer_row_state"] = self._sharded(
                self.table_optimizer.row_state)
        destination[prefix + "optimizer_step"] = torch.tensor(self.table_optimizer.num_steps)
        destination[prefix + "draws"] = self.draws

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        opt = self.table_optimizer
        step = torch.tensor(opt.num_steps)  # the count is a Python int
        targets = {"rows": self.rows, "optimizer_state": opt.state, "optimizer_step": step,
                   "draws": self.draws}
        if opt.row_state is not None:
            targets["optimizer_row_state"] = opt.row_state
        # This rank's part of every value, then every check before any copy: a state of another
        # format (optimizer, dtype, shape) loads nothing, not the rows alone.
        local = {}
        for name in (*targets, "optimizer_row_state"):
            key = prefix + name
            if key not in state_dict:
                if name in targets:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if hasattr(value, "to_local"):  # a DTensor of this layout (as DCP loads it)
                value = value.to_local()
            elif value.dim() and value.shape[0] == self.num_rows and value.dim() > 1:
                value = value[self.row_start:self.row_stop]  # a full table: take our rows
            local[name] = value
        # The optimizer's state: FusedRowOptimizer's own checks (its buffers "state" and
        # "row_state" are saved here as "optimizer_state" and "optimizer_row_state").
        problems = opt.load_problems({prefix + name: v for name, v in local.items()},
                                     prefix + "optimizer_")
        rows = local.get("rows")
        if rows is not None and (rows.shape != self.rows.shape or rows.dtype != self.rows.dtype):
            problems.append(f"{prefix}rows: saved as {rows.dtype} {tuple(rows.shape)}, this "
                            f"rank's is {self.rows.dtype} {tuple(self.rows.shape)}; load it into "
                            f"a table of the dtype it was saved with")
        problems += [f"{prefix}{name}: saved with shape {tuple(local[name].shape)}, expected a "
                     f"single count" for name in ("optimizer_step", "draws")
                     if name in local and local[name].dim() != 0]
        if problems:
            error_msgs.extend(problems)
            return
        with torch.no_grad():
            for name, value in local.items():
                if value.data_ptr() != targets[name].data_ptr():
                    targets[name].copy_(value)
        if "optimizer_step" in local:
            opt.num_steps = int(step)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix)
                                   and k[len(prefix):] not in targets)

    # ------------------------------------------------------------------ calls
    def forward(self, idx, prior, generator: torch.Generator | None = None,
                eps: torch.Tensor | None = None, u=None, kl: str = "mc"):
        """(z [B, K], KL [B]) for this rank's global row ids idx (collective)."""
        return self._call(idx, prior, generator, eps, u, kl, with_rows=False)

    def sample(self, idx, prior, generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None, u=None, kl: str = "mc"):
        """(z, KL, mu_rows, logvar_rows), as LatentTable.sample: the rows' gradients from other
        terms of the loss join the KL's in the owner's fused step (collective)."""
        return self._call(idx, prior, generator, eps, u, kl, with_rows=True)

    @torch.no_grad()
    def read_rows(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [B, K], logvar [B, K]): the current values of any global rows (collective)."""
        idx, error = self._check_call(idx, None, None, None, None)
        plan, _ = self._plan(idx, error, (0, 0, 0, 0, 0))
        local = self._received_ids(plan, idx) - self.row_start
        both = self.rows.index_select(0, local).flatten(1)
        out = plan.to_callers(self.comm, both).view(-1, 2, self.num_latents)
        return out[:, 0], out[:, 1]

    def _check_call(self, idx, prior, eps, u, generator):
        """idx as int64 on the table's device, and the first problem with this rank's
        arguments (type, message) or None. Nothing is raised here: every rank must learn of an
        error before any of them sends or writes anything."""
        try:
            idx = torch.as_tensor(idx, device=self.device)
        except (TypeError, ValueError, RuntimeError) as e:
            return None, ("ValueError", f"idx must be a 1-D integer tensor of row ids: {e}")
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            return None, ("ValueError", f"idx must be a 1-D int64 or int32 tensor of global row "
                                        f"ids, got dtype {idx.dtype} and shape "
                                        f"{tuple(idx.shape)}")
        idx = idx.long()
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_rows:
                return idx, ("IndexError", f"idx values must be in [0, {self.num_rows}) "
                                           f"(num_rows), got min {lo} and max {hi}")
        B, K = idx.shape[0], self.num_latents
        if eps is not None:
            if not isinstance(eps, torch.Tensor) or eps.shape != (B, K):
                shape = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
                return idx, ("ValueError", f"eps must be a tensor of shape {(B, K)} (one row "
                                           f"per id), got {shape}")
            if generator is not None:
                return idx, ("ValueError", "generator: pass either eps or generator, not both")
        if prior is not None:
            try:
                prior.group_index(u, B)
            except (ValueError, TypeError) as e:
                return idx, (type(e).__name__, str(e))
        return idx, None

    def _plan(self, idx, error, flags):
        """The collective start of every call: each rank's error, flags and per-owner counts
        go to every rank; all raise if any rank's arguments are bad. flags: values every rank
        must agree on (seed, eps given, u given, ...)."""
        W = self.world_size
        if error is None:
            owner = self.owner(idx)
            counts = torch.bincount(owner, minlength=W).cpu()
            order = torch.sort(owner, stable=True).indices
        else:
            counts, order = torch.zeros(W, dtype=torch.int64), None
        meta = self.comm.all_gather_ints([int(error is not None), *flags, *counts.tolist()])
        if meta[:, 0].any():
            errors = self.comm.all_gather_objects(error)
            rank, (kind, message) = next((r, e) for r, e in enumerate(errors) if e is not None)
            exc = {"IndexError": IndexError, "TypeError": TypeError}.get(kind, ValueError)
            raise exc(f"ShardedLatentTable: rank {rank} of {W}: {message} (nothing was "
                      f"computed or written on any rank)")
        nf = len(flags)
        disagree = (meta[:, 1:1 + nf] != meta[0, 1:1 + nf]).any(dim=0)
        if disagree.any():
            names = ("seed", "offset", "eps given", "u given", "kl")
            what = ", ".join(names[i] for i in torch.nonzero(disagree).flatten().tolist())
            raise ValueError(f"ShardedLatentTable: the ranks disagree on {what} "
                             f"(generator: seed every rank's generator alike; eps and u: pass "
                             f"them on every rank or on none; kl: the same on every rank)")
        send_counts = meta[self.rank, 1 + nf:].tolist()
        recv_counts = meta[:, 1 + nf + self.rank].tolist()
        return Plan(order, send_counts, recv_counts), meta

    def _received_ids(self, plan, idx):
        return plan.to_owners(self.comm, idx)

    def _call(self, idx, prior, generator, eps, u, kl, with_rows):
        idx, error = self._check_call(idx, prior, eps, u, generator)
        try:
            kl_code = op_kl_code(kl)
        except ValueError as e:
            kl_code, error = -1, error or ("ValueError", str(e))
        if generator is not None and error is None:
            from .ops import draw_seed
            s = draw_seed(generator, self.device).cpu().tolist()
        else:
            s = [self.seed, int(self.draws)]
        prior_index = None
        if error is None and prior is not None:
            prior_index = prior.group_index(u, idx.shape[0])
        flags = (s[0], s[1], int(eps is not None), int(prior_index is not None), kl_code)
        plan, _ = self._plan(idx, error, flags)
        if generator is None and eps is None:
            self.draws += 1
        return _ShardedRows.apply(self._grad_anchor, prior.logits, prior.means, prior.logvars,
                                  self, idx, plan, eps, prior_index, s, kl_code, with_rows)

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, num_latents={self.num_latents}, rank={self.rank} of "
                f"{self.world_size}, rows=[{self.row_start}, {self.row_stop})")


class _ShardedRows(torch.autograd.Function):
    """Forward: ids to owners, the fused kernel there, (z, kl, rows) back. Backward: gradients
    to owners, the fused backward + optimizer step there, the prior's partial gradient out."""

    @staticmethod
    def forward(ctx, anchor, logits, means, logvars, table, idx, plan, eps, prior_index, seed,
                kl_code, with_rows):
        comm, K = table.comm, table.num_latents
        ids = idx.unsqueeze(1)
        if prior_index is not None:
            ids = torch.cat([ids, prior_index.to(ids.device).long().unsqueeze(1)], 1)
        recv = plan.to_owners(comm, ids)
        rows_global = recv[:, 0]
        local = rows_global - table.row_start
        local_index = recv[:, 1].contiguous() if prior_index is not None else None
        if eps is not None:
            local_eps = plan.to_owners(comm, eps.to(table.rows.dtype))
        else:
            t0 = time.perf_counter()
            key = torch.tensor(seed, dtype=torch.int64, device=table.device)
            local_eps = philox_normal_rows(key, rows_global, K, table.rows.dtype)
            comm.kernel_s += time.perf_counter() - t0
        mu, logvar = table.mu, table.logvar
        n = local.shape[0]
        t0 = time.perf_counter()
        with torch.no_grad():
            if n:
                z, kl = _ops.reparam_gmm_kl_rows(mu, logvar, local, logits, means, logvars,
                                                 local_eps, None, 1, 0, local_index, kl_code)
            else:
                z, kl = mu.new_empty((0, K)), mu.new_empty((0,))
            parts = [z, kl.unsqueeze(1)]
            if with_rows:
                parts += [mu.index_select(0, local), logvar.index_select(0, local)]
            packed = torch.cat(parts, 1)
            comm.kernel_s += time.perf_counter() - t0
            back = plan.to_callers(comm, packed)
        ctx.table, ctx.plan, ctx.kl_code, ctx.with_rows = table, plan, kl_code, with_rows
        ctx.save_for_backward(logits, means, logvars, local, local_eps, local_index)
        ctx.set_materialize_grads(False)
        out = (back[:, :K].contiguous(), back[:, K].contiguous())
        if with_rows:
            out += (back[:, K + 1:2 * K + 1].contiguous(), back[:, 2 * K + 1:].contiguous())
        return out

    @staticmethod
    def backward(ctx, grad_z, grad_kl, grad_mu_rows=None, grad_logvar_rows=None):
        table, plan, K = ctx.table, ctx.plan, ctx.table.num_latents
        logits, means, logvars, local, local_eps, local_index = ctx.saved_tensors
        B = plan.order.shape[0]
        like = table.rows
        widths = [K, 1] + ([K, K] if ctx.with_rows else [])
        grads = [grad_z, None if grad_kl is None else grad_kl.unsqueeze(1)]
        if ctx.with_rows:
            grads += [grad_mu_rows, grad_logvar_rows]
        # Missing gradients (an output nobody used) travel as zeros: every rank packs the same
        # width, and a zero gradient adds nothing to the owner's sums.
        packed = torch.cat([like.new_zeros((B, w)) if g is None else g.to(like.dtype).reshape(B, w)
                            for g, w in zip(grads, widths)], 1)
        recv = plan.to_owners(table.comm, packed)
        opt = table.table_optimizer
        prior_grads = bool(any(ctx.needs_input_grad[1:4]))
        t0 = time.perf_counter()
        if local.shape[0]:
            g_z = recv[:, :K].contiguous()
            g_kl = recv[:, K].contiguous()
            g_mu = recv[:, K + 1:2 * K + 1].contiguous() if ctx.with_rows else None
            g_lv = recv[:, 2 * K + 1:].contiguous() if ctx.with_rows else None
            g = opt.backward_step(g_z, g_kl, table.mu, table.logvar, local, logits, means,
                                  logvars, local_eps, None, 1, prior_grads, g_mu, g_lv,
                                  local_index, ctx.kl_code)
        else:
            opt.num_steps += 1  # the step count is shared by the whole table: keep ranks in step
            g = (torch.zeros_like(logits), torch.zeros_like(means), torch.zeros_like(logvars))
        table.comm.kernel_s += time.perf_counter() - t0
        need = ctx.needs_input_grad
        return (None, g[0] if need[1] else None, g[1] if need[2] else None,
                g[2] if need[3] else None) + (None,) * 8


# ----------------------------------------------------------------------------- replicated params
def all_reduce_gradients(module_or_params, process_group=None,
                         timeout=DEFAULT_TIMEOUT_S) -> None:
    """Sum every parameter's gradient across the ranks, in one flat buffer per dtype (a parameter
    without a gradient counts as zeros, so all ranks pack the same buffer). With each rank's loss
    its share of the global loss, the result is the full-batch gradient on every rank, so
    identical optimizers keep the replicated parameters (prior, decoder, likelihood) identical."""
    params = (list(module_or_params.parameters()) if isinstance(module_or_params, nn.Module)
              else list(module_or_params))
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    group = process_group if process_group is not None else dist.group.WORLD
    comm = Comm(group, timedelta_of(timeout), params[0].device)
    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault((p.dtype, p.device), []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in ps])
        comm.all_reduce_sum(flat)
        offset = 0
        for p in ps:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
