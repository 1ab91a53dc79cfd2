"""Optimizer steps fused into the backward of a latent table's KL.

With `FusedRowOptimizer`, the backward of `fused_rows_kl` computes the gradients of the gathered
rows ([B, K], O(batch) memory), adds what other terms of the loss give the same rows (a likelihood
that reads them: `return_rows`), sums duplicate indices in batch order and applies the rule to
those rows of the table, and of the optimizer state, in place, all in one op. No gradient of the
table exists at any point, and a step costs O(B) whatever the number of rows. The rules
(FusedRowOptimizer): exact Adam (torch.optim.SparseAdam), FBGEMM's row-wise Adam and row-wise
Adagrad (one second moment or sum per row: compact state), SGD.
"""
from __future__ import annotations

import contextlib

import torch

from .ops import rows_op_arguments
from .table_memory import MOMENTS_PER_ELEMENT, ROW_STATE_SIZE, empty_table

_ops = torch.ops.halfvae_ext

# Calls inside an autograd.Function's forward skip the autograd layer of the op they call (the
# Function records the graph): no Python redispatch per step. A private torch API; a torch without
# it (none known) only loses those microseconds.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


FUSED_OPTIMIZERS = ("adam", "rowwise_adam", "rowwise_adagrad", "sgd")
ROWWISE = ("rowwise_adam", "rowwise_adagrad")
# The fused table optimizers by the names users pick them by (HalfVAEICA's table_optimizer, the
# benchmarks' methods), each as the arguments LatentTable takes for it: (fused_optimizer,
# state_dtype; None: the table's dtype). "fused" is exact Adam; "rowwise_adam_bf16" keeps the
# per-element moments in bfloat16. The one mapping, so that a name means the same table
# everywhere.
FUSED_TABLE_OPTIMIZERS = {"fused": ("adam", None), "rowwise_adam": ("rowwise_adam", None),
                          "rowwise_adam_bf16": ("rowwise_adam", torch.bfloat16),
                          "rowwise_adagrad": ("rowwise_adagrad", None)}


class FusedRowOptimizer(torch.nn.Module):
    """Optimizer state for latent tables `mu`, `logvar` [rows, K], as buffers (so it round-trips
    through state_dict). kind:

    - "adam": torch.optim.SparseAdam exactly (both moments per element, bias correction by the
      table's step count);
    - "rowwise_adam": FBGEMM's partial row-wise Adam: first moments per element, one second moment
      per row of each table (v += (1-b2)(mean_k g^2 - v)), bias correction by each row's own step
      count (a row touched late is corrected as a fresh one, not under-corrected by a shared count,
      lazy Adam's known flaw);
    - "rowwise_adagrad": FBGEMM's row-wise Adagrad, one sum of mean_k g^2 per row of each table;
    - "sgd".

    state_dtype: the dtype of the per-element moments, the table's (default) or torch.bfloat16
    (updated in float32, stored with stochastic rounding: unbiased, so the small updates of an
    average are not lost; its random bits are a hash of row, element and step, deterministic).
    Per-row values (second moments, sums, step counts) have the table's dtype; a row's step count
    counts exactly up to 2^24 in float32, past which its bias corrections are 1 anyway.

    Buffers: ``state`` [rows, M, K] (adam M = 4: m of mu, m of logvar, v of mu, v of logvar;
    rowwise_adam M = 2; else 0) and, for the row-wise kinds, ``row_state`` [rows, R]
    (rowwise_adam: v of mu, v of logvar, step count; rowwise_adagrad: sum of mu, sum of logvar).
    views: (state, row_state) to use instead of new buffers (LatentTable's one-record-per-row
    layout); a state dict then holds bfloat16 moments as a copy (torch.save refuses views of one
    memory as two dtypes). row_offset: the global number of row 0 when these rows are one shard of
    a larger table (ShardedLatentTable): the rounding bits are the global row's, so a sharded
    table steps bit for bit as one process."""

    def __init__(self, num_rows: int, num_latents: int, kind: str = "adam", lr: float = 1e-2,
                 betas=(0.9, 0.999), eps: float = 1e-8, dtype=torch.float32, device=None,
                 state_dtype=None, views=None, row_offset: int = 0):
        super().__init__()
        check_fused_optimizer(kind, dtype, state_dtype)
        if isinstance(row_offset, bool) or not isinstance(row_offset, int) or row_offset < 0:
            raise ValueError(f"row_offset must be an integer >= 0, got {row_offset!r}")
        self.row_offset = row_offset
        if not lr >= 0:
            raise ValueError(f"lr must be non-negative, got {lr}")
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.kind, self.lr, self.betas, self.eps = kind, float(lr), (float(b1), float(b2)), eps
        self.table_dtype = dtype
        self.state_dtype = state_dtype or dtype
        self.in_record = views is not None
        if views is not None:
            state, row_state = views
        else:
            # Adam moments in one buffer [rows, 4, K]: a row's moments are contiguous (2 cache
            # lines for K = 8), one DRAM burst per touched row.
            state = empty_table((num_rows, MOMENTS_PER_ELEMENT[kind], num_latents),
                                dtype=self.state_dtype, device=device)
            row_state = (empty_table((num_rows, ROW_STATE_SIZE[kind]), dtype=dtype, device=device)
                         if kind in ROWWISE else None)
        self.register_buffer("state", state.zero_())
        if row_state is not None:
            self.register_buffer("row_state", row_state.zero_())
        else:
            self.row_state = None
        # The step count (Adam's bias correction) is a Python int: the op takes it as an argument,
        # and reading it from a buffer on the GPU would synchronize every step. state_dict still
        # holds it as the 0-d int64 tensor "step" (what tables saved before this held).
        self.num_steps = 0

    @property
    def step(self) -> int:
        """The number of steps taken (shared by all rows of the table)."""
        return self.num_steps

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "step"] = torch.tensor(self.num_steps, dtype=torch.int64)
        if self.in_record and self.state.dtype != self.table_dtype:
            destination[prefix + "state"] = self.state.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        problems = self.load_problems(state_dict, prefix)
        if problems:
            error_msgs.extend(problems)
            return
        key = prefix + "step"
        if key in state_dict:
            self.num_steps = int(state_dict[key])
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def load_problems(self, state_dict, prefix) -> list[str]:
        """Why state_dict[prefix...] is not this optimizer's format (kind, shapes, state dtype),
        or []: a table saved in one format loads only into the same one, and nothing is loaded
        otherwise."""
        problems = []
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if not isinstance(saved, torch.Tensor) or buf is None:
                continue
            if saved.shape != buf.shape or saved.dtype != buf.dtype:
                problems.append(
                    f"{prefix + name}: saved as {saved.dtype} {tuple(saved.shape)}, this table's is "
                    f"{buf.dtype} {tuple(buf.shape)} (fused_optimizer={self.kind!r}, "
                    f"state_dtype={self.state.dtype}); load it into a table built with the "
                    f"fused optimizer and state_dtype it was saved with")
        if self.row_state is None and prefix + "row_state" in state_dict:
            problems.append(f"{prefix}row_state: saved by a row-wise optimizer, this table's is "
                            f"{self.kind!r}")
        return problems

    @property
    def mu_exp_avg(self):
        return self.state[:, 0]

    @property
    def logvar_exp_avg(self):
        return self.state[:, 1]

    def step_rows(self, mu, logvar, idx, grad_mu_rows, grad_logvar_rows):
        """One step on rows idx of both tables, from their per-index gradients [B, K]."""
        self.num_steps += 1
        b1, b2 = self.betas
        with torch.no_grad():
            _ops.latent_rows_update_(mu, logvar, self.state, idx, grad_mu_rows, grad_logvar_rows,
                                     self.kind, self.lr, b1, b2, self.eps, self.num_steps,
                                     self.row_state, self.row_offset)

    def backward_step(self, grad_z, grad_kl, mu, logvar, idx, prior_logits, prior_means,
                      prior_logvars, eps, seed, reduction, prior_grads, grad_mu_rows=None,
                      grad_logvar_rows=None, prior_index=None, kl=0, range_checked=False):
        """The backward of reparam_gmm_kl_rows and this optimizer's step on rows idx, in one op
        (the row gradients never leave it); grad_mu_rows, grad_logvar_rows: [B, K] gradients of
        the gathered rows from other terms, or None; prior_index, kl: as the forward's (kl as
        its code). range_checked: idx and prior_index were range-checked by the forward and are
        unchanged since (then the step makes no host synchronization). Returns the prior's
        gradients."""
        self.num_steps += 1
        b1, b2 = self.betas
        with torch.no_grad():
            return _ops.reparam_gmm_kl_rows_backward_step_(
                grad_z, grad_kl, grad_mu_rows, grad_logvar_rows, mu, logvar, self.state, idx,
                prior_logits, prior_means, prior_logvars, eps, seed, reduction, prior_grads,
                self.kind, self.lr, b1, b2, self.eps, self.num_steps, prior_index, kl,
                range_checked, self.row_state, self.row_offset)

    def extra_repr(self):
        return (f"kind={self.kind!r}, lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"state_dtype={self.state.dtype}")


def check_fused_optimizer(kind, dtype, state_dtype):
    """Refuse an unknown fused optimizer or a state dtype it cannot use, naming the argument."""
    if kind not in FUSED_OPTIMIZERS:
        raise ValueError(f"fused_optimizer must be one of {FUSED_OPTIMIZERS} or None, got "
                         f"{kind!r}")
    if state_dtype is None:
        return
    if state_dtype not in (dtype, torch.bfloat16):
        raise ValueError(f"state_dtype must be the table's dtype ({dtype}) or torch.bfloat16, got "
                         f"{state_dtype}")
    if state_dtype != dtype and MOMENTS_PER_ELEMENT[kind] == 0:
        raise ValueError(f"state_dtype={state_dtype}: fused_optimizer={kind!r} keeps no "
                         f"per-element moments to store in it")
    if kind in ROWWISE and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"fused_optimizer={kind!r} steps float32 or float64 tables, got {dtype}")


class _FusedRowsKL(torch.autograd.Function):
    """(z, kl) of reparam_gmm_kl_rows, and with_rows also the gathered rows (mu[idx],
    logvar[idx]) for other terms; the backward steps the optimizer on rows idx from all their
    gradients, in one op."""

    @staticmethod
    def forward(ctx, mu, logvar, prior_logits, prior_means, prior_logvars, idx, eps, seed,
                reduction, optimizer, with_rows, prior_index, kl):
        if eps is None and mu.device.type == "cpu":
            # Draw eps once and keep it for the backward ([B, K], O(batch)), instead of drawing it
            # again there: on the CPU a draw costs more than the KL kernel's reads of a stored eps
            # (~7% of a 4096-row step). Same numbers: the in-kernel draw is this stream.
            eps, seed = _ops.philox_normal(seed, idx.shape[0] * mu.shape[1], mu.dtype), None
            eps = eps.view(idx.shape[0], mu.shape[1])
        with _below_autograd():  # the op's own (Python) autograd layer has nothing to do here
            z, kl_out = _ops.reparam_gmm_kl_rows(mu, logvar, idx, prior_logits, prior_means,
                                                 prior_logvars, eps, seed, reduction, 0,
                                                 prior_index, kl)
        ctx.save_for_backward(mu, logvar, prior_logits, prior_means, prior_logvars, idx, eps, seed,
                              prior_index)
        ctx.reduction = reduction
        ctx.optimizer = optimizer
        ctx.kl = kl
        if not with_rows:
            return z, kl_out
        # Outputs nobody uses get no gradient (None), not zeros: a likelihood that does not read
        # logvar adds nothing to the step.
        ctx.set_materialize_grads(False)
        return z, kl_out, mu.index_select(0, idx), logvar.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad_z, grad_kl, grad_mu_rows=None, grad_logvar_rows=None):
        mu, logvar, prior_logits, prior_means, prior_logvars, idx, eps, seed, prior_index = (
            ctx.saved_tensors)
        need = ctx.needs_input_grad
        B, K = idx.shape[0], mu.shape[1]
        if grad_z is None:
            grad_z = mu.new_zeros((B, K))
        if grad_kl is None:
            grad_kl = mu.new_zeros((B,) if ctx.reduction == 1 else (B, K))
        g_logits, g_means, g_logvars = ctx.optimizer.backward_step(
            grad_z, grad_kl, mu, logvar, idx, prior_logits, prior_means, prior_logvars, eps, seed,
            ctx.reduction, bool(need[2] or need[3] or need[4]), grad_mu_rows, grad_logvar_rows,
            prior_index, ctx.kl, range_checked=True)  # the forward checked the saved idx
        return (None, None, g_logits if need[2] else None, g_means if need[3] else None,
                g_logvars if need[4] else None, None, None, None, None, None, None, None, None)


def fused_rows_kl(mu, logvar, idx, prior_logits, prior_means, prior_logvars,
                  optimizer: FusedRowOptimizer, *, eps=None, generator=None, reduction="row",
                  return_rows=False, prior_index=None, kl="mc"):
    """reparam_gmm_kl_rows whose backward steps `optimizer` on the touched rows of mu and logvar
    (in place) instead of returning their gradients. The prior still gets ordinary gradients.

    return_rows: also return mu[idx] and logvar[idx] ([B, K] each) for other terms of the loss;
    their gradients join the KL's in the same step. Returns (z, kl) or (z, kl, mu_rows,
    logvar_rows). prior_index, kl: as in reparam_gmm_kl_rows (a conditional prior [U, K, C] with
    one group per gathered row; the Monte-Carlo KL or its closed-form bound)."""
    code, seed, kl_code = rows_op_arguments(mu, logvar, idx, prior_logits, prior_means,
                                            prior_logvars, eps, generator, reduction,
                                            prior_index, kl)
    if not mu.requires_grad:
        raise ValueError("mu must require grad: its optimizer step runs in the backward")
    out = _FusedRowsKL.apply(mu, logvar, prior_logits, prior_means, prior_logvars, idx, eps, seed,
                             code, optimizer, bool(return_rows), prior_index, kl_code)
    if reduction == "sum":
        out = (out[0], out[1].sum(), *out[2:])
    return out
