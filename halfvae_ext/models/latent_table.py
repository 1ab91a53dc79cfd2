"""LatentTable: the amortization-free posterior, one trainable row (mu, logvar) per data point,
and the protocol every latents object of a HalfVAE satisfies."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import reparam_gmm_kl, reparam_gmm_kl_rows
from ..table_memory import empty_record_table, empty_table, record_views
from ..table_optim import ROWWISE, FusedRowOptimizer, check_fused_optimizer, fused_rows_kl
from ._checks import LOG_2PI, _check_kl, _check_pos_int
from .prior import GMMPrior

__all__ = ["LatentTable", "Latents", "COVARIANCES"]


@runtime_checkable
class Latents(Protocol):
    """What a HalfVAE needs of its latents: ``num_rows`` rows of ``num_latents`` posterior
    parameters, the means ``mu`` [N, K], and ``sample(idx, prior, generator=, eps=, u=, kl=)``
    returning (z [B, K], KL [B], mu_rows [B, K], logvar_rows [B, K]) for rows idx (all for None).
    :class:`LatentTable` and ``halfvae_ext.distributed.ShardedLatentTable`` satisfy it."""

    num_rows: int
    num_latents: int
    mu: torch.Tensor

    def sample(self, idx, prior, generator=None, eps=None, u=None, kl: str = "mc"): ...


class LatentTable(nn.Module):
    """q(z_n) = N(mu[n], diag(exp(logvar[n]))) for every data point n: parameters [N, K].

    ``forward(idx, prior)`` returns the fused op's reparameterized sample z [B, K] and Monte-Carlo
    KL [B] (``reduction="row"``) for rows ``idx`` (all rows for None); the rows are gathered inside
    the kernel (``reparam_gmm_kl_rows``), no [B, K] copy is made first. ``sample(idx, prior)``
    also returns the rows (mu[idx], logvar[idx]) for a likelihood that reads them. Both take
    ``u`` (the group of each row in idx, for a conditional prior) and ``kl`` ("mc" or "bound").

    Table gradients: dense [N, K] by default; ``sparse=True`` gives coalesced sparse COO gradients
    (for ``torch.optim.SparseAdam``/``SGD``: mini-batches leave other rows' optimizer state alone);
    ``fused_optimizer="adam"|"rowwise_adam"|"rowwise_adagrad"|"sgd"`` (with ``lr``, ``betas``,
    ``eps``, ``state_dtype``; the rules: :class:`~halfvae_ext.table_optim.FusedRowOptimizer`) runs
    the optimizer step inside the backward on the touched rows only: no gradient of the table is
    ever created, a step costs O(batch), and the optimizer state (``table_optimizer``, buffers) is
    part of state_dict. Leave mu/logvar out of any other optimizer in that mode.

    Memory: with the row-wise optimizers or bfloat16 moments (``state_dtype=torch.bfloat16``), a
    row's mu, logvar and optimizer state are one record of whole cache lines (mu, logvar and the
    state are views of it): K = 8 float32 with rowwise_adam and bfloat16 moments is 128 bytes a row,
    2 cache lines, where exact Adam takes 192 (3). ``bytes_per_row`` tells.

    ``covariance="full"``: q(z_n) = N(mu[n], L_n L_n^T) with L_n lower triangular, its diagonal
    exp(logvar[n] / 2) and its K (K - 1) / 2 entries below the diagonal a third table,
    ``scale_tril_offdiag`` [N, K (K - 1) / 2] (starting at 0: the diagonal posterior). A mean-field
    posterior pays, in its entropy, for every latent basis in which the decoder's Jacobian columns
    are not orthogonal (Hadamard's inequality), so it pulls the latents toward such a basis; a full
    one does not. Its KL and sample are computed in
    PyTorch around the fused prior kernel (``gmm_log_prob``); not with a fused optimizer.
    """

    _INIT_BLOCK_ROWS = 1 << 16

    def __init__(self, num_rows: int, num_latents: int, *, init_mu: torch.Tensor | None = None,
                 init_logvar: float = -2.0, init_std: float = 1.0,
                 generator: torch.Generator | None = None, sparse: bool = False,
                 dtype: torch.dtype | None = None, fused_optimizer: str | None = None,
                 lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8,
                 state_dtype: torch.dtype | None = None, covariance: str = "diagonal"):
        super().__init__()
        N = _check_pos_int("num_rows", num_rows)
        K = _check_pos_int("num_latents", num_latents)
        self.covariance = _check_covariance(covariance)
        if covariance == "full" and fused_optimizer is not None:
            raise ValueError("covariance='full' is not available with a fused_optimizer (the fused "
                             "kernels step diagonal posteriors): pass fused_optimizer=None")
        if fused_optimizer is not None and sparse:
            raise ValueError("sparse: a table with a fused optimizer has no gradient at all; "
                             "pass sparse=False with fused_optimizer")
        dtype = dtype or torch.get_default_dtype()
        if fused_optimizer is None and state_dtype is not None:
            raise ValueError("state_dtype is the dtype of a fused optimizer's moments: pass "
                             "fused_optimizer too")
        if fused_optimizer is not None:
            check_fused_optimizer(fused_optimizer, dtype, state_dtype)
            state_dtype = state_dtype or dtype
        # Tables are filled in place (huge pages asked for first, see table_memory) and the random
        # start is drawn in blocks of rows, so that a 10^8-row table needs no full-size temporary.
        self._record = None
        views = None
        if _uses_record(fused_optimizer, dtype, state_dtype):
            # A row's table values and optimizer state in one record of whole cache lines
            # (table_memory.record_layout): a touched row costs 2 lines with compact state.
            self._record = empty_record_table(N, K, dtype, fused_optimizer, state_dtype)
            mu, logvar, *views = record_views(self._record, K, fused_optimizer, state_dtype)
        elif fused_optimizer is not None:
            # mu and logvar are the halves of one [N, 2, K] table: a touched row's mu and logvar
            # share a cache line (K = 8 float32), one DRAM access where there would be two. The
            # kernels take such row-strided views as they are.
            both = empty_table((N, 2, K), dtype=dtype)
            mu, logvar = both[:, 0], both[:, 1]
        else:
            mu, logvar = empty_table((N, K), dtype=dtype), empty_table((N, K), dtype=dtype)
        if init_mu is None:
            for r in range(0, N, self._INIT_BLOCK_ROWS):
                n = min(self._INIT_BLOCK_ROWS, N - r)
                mu[r:r + n] = init_std * torch.randn(n, K, generator=generator,
                                                     dtype=torch.float64)
        else:
            init_mu = torch.as_tensor(init_mu)
            if init_mu.shape != (N, K):
                raise ValueError(f"init_mu must have shape {(N, K)}, got {tuple(init_mu.shape)}")
            mu.copy_(init_mu)
        self.mu = nn.Parameter(mu)
        self.logvar = nn.Parameter(logvar.fill_(float(init_logvar)))
        if self.covariance == "full":
            self.scale_tril_offdiag = nn.Parameter(torch.zeros(N, K * (K - 1) // 2, dtype=dtype))
        self.sparse = bool(sparse)
        self.table_optimizer = (None if fused_optimizer is None else
                                FusedRowOptimizer(N, K, fused_optimizer, lr=lr, betas=betas,
                                                  eps=eps, dtype=dtype, state_dtype=state_dtype,
                                                  views=views))

    def _joint_table(self):
        """The [N, 2, K] table whose halves mu and logvar are (fused optimizer), else None."""
        mu, logvar = self.mu.detach(), self.logvar.detach()
        N, K = mu.shape
        if (self.table_optimizer is None or self._record is not None
                or mu.dtype != logvar.dtype or mu.device != logvar.device
                or mu.untyped_storage().data_ptr() != logvar.untyped_storage().data_ptr()
                or mu.stride() != (2 * K, 1) or logvar.stride() != (2 * K, 1)
                or logvar.storage_offset() != mu.storage_offset() + K):
            return None
        return mu.as_strided((N, 2, K), (2 * K, K, 1), mu.storage_offset())

    def _apply(self, fn, recurse=True):
        # Module.to/cuda/double/... convert every parameter and buffer on its own, which would copy
        # the views of one table (the halves of [N, 2, K], or a record's table and state) into
        # separate tensors. Convert the joint table once, or build the record anew, and make the
        # parameters and the optimizer's buffers its views again.
        if self._record is not None:
            return self._apply_to_record(fn, recurse)
        joint = self._joint_table()
        if joint is None:
            return super()._apply(fn, recurse)
        new = fn(joint)
        if new.shape != joint.shape:
            return super()._apply(fn, recurse)
        halves = {id(self.mu): new[:, 0], id(self.logvar): new[:, 1]}
        return super()._apply(lambda t: halves.get(id(t)) if id(t) in halves else fn(t), recurse)

    def _apply_to_record(self, fn, recurse):
        opt = self.table_optimizer
        probe = fn(self.mu.detach()[:0])  # where, and as what dtype, the table goes
        dtype = probe.dtype
        own = {id(t) for t in (self.mu, self.logvar, opt.state, opt.row_state) if t is not None}
        if dtype == self.mu.dtype and probe.device == self.mu.device:  # the record stays as it is
            return super()._apply(lambda t: t if id(t) in own else fn(t), recurse)
        state_dtype = dtype if opt.state_dtype == opt.table_dtype else opt.state_dtype
        check_fused_optimizer(opt.kind, dtype, state_dtype)
        record = empty_record_table(self.num_rows, self.num_latents, dtype, opt.kind, state_dtype,
                                    device=probe.device)
        new = record_views(record, self.num_latents, opt.kind, state_dtype)
        old = (self.mu, self.logvar, opt.state, opt.row_state)
        with torch.no_grad():
            for target, source in zip(new, old):
                if source is not None:
                    target.copy_(source)
        views = {id(t): v for t, v in zip(old, new) if t is not None}
        result = super()._apply(lambda t: views[id(t)] if id(t) in views else fn(t), recurse)
        self._record = record
        opt.table_dtype, opt.state_dtype = dtype, state_dtype
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state saved by another optimizer or state dtype: load nothing (the optimizer reports
        # why), not the table alone.
        opt = self.table_optimizer
        if opt is not None and opt.load_problems(state_dict, prefix + "table_optimizer."):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def num_rows(self) -> int:
        return self.mu.shape[0]

    @property
    def bytes_per_row(self) -> int:
        """Bytes of memory a row takes: its mu and logvar, and its optimizer state if fused."""
        if self._record is not None:
            return self._record.shape[1] * self._record.element_size()
        size = 2 * self.num_latents * self.mu.element_size()
        if self.table_optimizer is not None:
            opt = self.table_optimizer
            size += opt.state[:1].numel() * opt.state.element_size()
            if opt.row_state is not None:
                size += opt.row_state[:1].numel() * opt.row_state.element_size()
        return size

    @property
    def num_latents(self) -> int:
        return self.mu.shape[1]

    def forward(self, idx: torch.Tensor | None, prior: GMMPrior,
                generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                u=None, kl: str = "mc"):
        """(z [B, K], KL [B]) for rows idx (all rows for None); u: the group of each of those rows
        (a conditional prior only); kl: "mc" or "bound"."""
        if self.covariance == "full":
            return self.sample_full(idx, prior, generator, eps, u, kl)[:2]
        idx, prior_params, options = self._op_arguments(idx, prior, generator, eps, u, kl)
        if self.table_optimizer is not None:
            return fused_rows_kl(self.mu, self.logvar, self._rows_idx(idx), *prior_params,
                                 self.table_optimizer, **options)
        if idx is None:
            return reparam_gmm_kl(self.mu, self.logvar, *prior_params, **options)
        return reparam_gmm_kl_rows(self.mu, self.logvar, idx, *prior_params,
                                   table_grad="sparse" if self.sparse else "dense", **options)

    def sample(self, idx: torch.Tensor | None, prior: GMMPrior,
               generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
               u=None, kl: str = "mc"):
        """(z [B, K], KL [B], mu_rows [B, K], logvar_rows [B, K]) for rows idx (all rows for None):
        forward's sample and KL, and the rows themselves, for terms of the loss that read them (a
        likelihood). Gradients reach the table through all four, in every mode; with a fused
        optimizer the rows' gradients join the KL's in the one op that steps the table. u, kl: as
        in forward. With ``covariance="full"`` see :meth:`sample_full` (logvar is then the
        diagonal of the scale factor, not the variances)."""
        if self.covariance == "full":
            return self.sample_full(idx, prior, generator, eps, u, kl)[:4]
        idx, prior_params, options = self._op_arguments(idx, prior, generator, eps, u, kl)
        if self.table_optimizer is not None:
            return fused_rows_kl(self.mu, self.logvar, self._rows_idx(idx), *prior_params,
                                 self.table_optimizer, return_rows=True, **options)
        mu, logvar = self._rows(self.mu, idx), self._rows(self.logvar, idx)
        z, kl_value = reparam_gmm_kl(mu, logvar, *prior_params, **options)
        return z, kl_value, mu, logvar

    def _op_arguments(self, idx, prior: GMMPrior, generator, eps, u, kl):
        """(checked idx, the prior's tables, the ops' keyword arguments) of forward and sample."""
        idx = None if idx is None else self._check_idx(idx)
        options = dict(eps=eps, generator=generator, reduction="row", kl=_check_kl(kl),
                       prior_index=prior.group_index(u, self._batch_rows(idx)))
        return idx, (prior.logits, prior.means, prior.logvars), options

    def _rows(self, table: torch.Tensor, idx):
        """Rows idx of one of the table's parameters (all for None), sparse-gradient when the
        table is sparse."""
        if idx is None:
            return table
        if self.sparse:
            return F.embedding(idx, table, sparse=True)
        return table.index_select(0, idx)

    def scale_tril(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """L [B, K, K] of rows idx (all rows for None): the lower-triangular factor of each row's
        posterior covariance (diag(exp(logvar / 2)) for the diagonal posterior)."""
        idx = None if idx is None else self._check_idx(idx)
        return self._scale_tril_rows(self._rows(self.logvar, idx), idx)

    def _scale_tril_rows(self, logvar_rows: torch.Tensor, idx) -> torch.Tensor:
        """scale_tril of checked rows idx whose logvar rows are already gathered."""
        L = torch.diag_embed(torch.exp(0.5 * logvar_rows))
        if self.covariance == "full":
            L = L + _scatter_tril(self._rows(self.scale_tril_offdiag, idx), self.num_latents)
        return L

    def sample_full(self, idx, prior: GMMPrior, generator=None, eps=None, u=None,
                    kl: str = "mc"):
        """(z, KL, mu_rows, logvar_rows, L) for rows idx with the full posterior N(mu, L L^T):
        z = mu + L eps (eps [B, K] standard normal, drawn from ``generator`` unless given).
        kl="mc": log N(z; mu, L L^T) - log p(z | u) at that z. kl="bound": the fused kernel's
        closed-form bound for the marginals N(mu_k, (L L^T)_kk), plus the entropy the marginals
        overstate, sum_k log sqrt((L L^T)_kk) - log L_kk (the prior is a product over k, so its
        expectation needs only the marginals)."""
        kl = _check_kl(kl)
        idx = None if idx is None else self._check_idx(idx)
        mu, logvar = self._rows(self.mu, idx), self._rows(self.logvar, idx)
        L = self._scale_tril_rows(logvar, idx)
        B, K = mu.shape
        if eps is None:
            eps = torch.randn(B, K, generator=generator, dtype=mu.dtype, device=mu.device)
        elif eps.shape != (B, K):
            raise ValueError(f"eps must have shape {(B, K)}, got {tuple(eps.shape)}")
        z = mu + (L @ eps.unsqueeze(-1)).squeeze(-1)
        if kl == "mc":
            log_q = -0.5 * (eps * eps).sum(1) - 0.5 * logvar.sum(1) - 0.5 * K * LOG_2PI
            kl_value = log_q - prior.log_prob(z, u).sum(1)
        else:
            marginal_logvar = torch.log((L * L).sum(-1))
            _, kl_value = reparam_gmm_kl(mu, marginal_logvar, prior.logits, prior.means,
                                         prior.logvars, eps=eps, reduction="row", kl="bound",
                                         prior_index=prior.group_index(u, B))
            kl_value = kl_value + 0.5 * (marginal_logvar - logvar).sum(1)
        return z, kl_value, mu, logvar, L

    def _batch_rows(self, idx) -> int:
        return self.num_rows if idx is None else idx.shape[0]

    def _rows_idx(self, idx):
        if idx is None:
            return torch.arange(self.num_rows, device=self.mu.device)
        return self._check_idx(idx)

    def _check_idx(self, idx):
        idx = torch.as_tensor(idx, device=self.mu.device)
        if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
            raise ValueError(f"idx must be a 1-D integer tensor of row indices, got dtype "
                             f"{idx.dtype} and shape {tuple(idx.shape)}")
        return idx

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, num_latents={self.num_latents}, sparse={self.sparse}"
                + (", covariance='full'" if self.covariance == "full" else ""))


COVARIANCES = ("diagonal", "full")


def _check_covariance(covariance) -> str:
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    return covariance


def _scatter_tril(offdiag: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K (K - 1) / 2] entries -> [B, K, K], strictly below the diagonal (row by row)."""
    r, c = torch.tril_indices(K, K, -1, device=offdiag.device)
    out = offdiag.new_zeros(offdiag.shape[0], K * K)
    return out.index_copy(1, r * K + c, offdiag).view(-1, K, K)


def _uses_record(kind, dtype, state_dtype) -> bool:
    """One record per row for the compact optimizers and for bfloat16 moments; exact Adam and SGD
    with state of the table's dtype keep the [N, 2, K] table and a separate state (the layout
    ShardedLatentTable shares)."""
    if kind is None:
        return False
    return kind in ROWWISE or (state_dtype or dtype) != dtype
