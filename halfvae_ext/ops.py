"""Public fused ops and their autograd and fake (meta) registrations.

The C++ operators (torch.ops.halfvae_ext.*) are deterministic in their inputs: the random stream of
reparam_gmm_kl is a (seed, offset) int64 tensor drawn here from a torch generator, so opcheck,
torch.compile and the backward (which regenerates eps from the same seed) all see a pure function.
"""
from __future__ import annotations

import torch

_REDUCTION_CODES = {"none": 0, "row": 1, "sum": 1}
_KL_CODES = {"mc": 0, "bound": 1}
_ops = torch.ops.halfvae_ext


# ----------------------------------------------------------------------------- arguments
# The ops check shapes, dtypes, devices and index ranges themselves (C++: ValueError, TypeError,
# IndexError naming the argument). Here only what they cannot see: Python objects that are not
# tensors (the dispatcher's own error would be a RuntimeError), reduction names, the generator.
def _require_tensors(**tensors):
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _reduction_code(reduction) -> int:
    if not isinstance(reduction, str) or reduction not in _REDUCTION_CODES:
        raise ValueError(f"reduction must be 'row', 'none' or 'sum', got {reduction!r}")
    return _REDUCTION_CODES[reduction]


def kl_code(kl) -> int:
    """The ops' integer code of a KL estimator name (\"mc\" or \"bound\"); ValueError otherwise."""
    if not isinstance(kl, str) or kl not in _KL_CODES:
        raise ValueError(f"kl must be 'mc' (Monte-Carlo estimate) or 'bound' (closed-form upper "
                         f"bound), got {kl!r}")
    return _KL_CODES[kl]


def _prior_index_argument(prior_index):
    if prior_index is not None:
        _require_tensors(prior_index=prior_index)
    return prior_index


def _seed_unless_eps(eps, generator, device):
    """The seed tensor of an in-kernel draw from `generator`, or None when eps is given."""
    if eps is None:
        return draw_seed(generator, device)
    _require_tensors(eps=eps)
    if generator is not None:
        raise ValueError("generator: pass either eps or generator, not both")
    return None


def draw_seed(generator: torch.Generator | None, device) -> torch.Tensor:
    """The (seed, offset) int64[2] tensor of one in-kernel draw, taken from `generator` (or the
    default generator of `device`); advances the generator like any other random call."""
    device = torch.device(device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but mu is on {device}")
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device,
                         generator=generator)


# ----------------------------------------------------------------------------- public API
def reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, *, eps=None,
                   generator=None, reduction="row", prior_index=None, kl="mc"):
    """Reparameterized sample and KL against a per-dimension Gaussian-mixture prior.

    z = mu + exp(logvar/2) * eps;  kl = log N(z; mu, exp(logvar)) - log p_k(z), one fused pass.

    mu, logvar: [N, K]; prior_logits, prior_means, prior_logvars: [K, C], or [U, K, C] (a
    conditional prior: one mixture per group and dimension) with prior_index [N] (int64/int32,
    values in [0, U)) choosing each row's group.
    kl: "mc" -> the one-sample Monte-Carlo estimate above; "bound" -> the closed-form upper bound
    -H(q) - log sum_c pi_c exp(-KL(q || N(m_c, v_c))) (Hershey & Olsen 2007) of KL(q || p_k),
    which does not depend on eps (z is still the sample).
    eps: [N, K] or None; with None, eps ~ N(0, 1) is drawn inside the kernel (Philox, seeded from
    `generator` or the default generator of the device) and never stored; the backward regenerates
    it. reduction: "row" -> kl [N] (sum over k), "none" -> [N, K], "sum" -> scalar.
    Returns (z [N, K], kl). Differentiable in mu, logvar and the three prior tensors.
    """
    _require_tensors(mu=mu, logvar=logvar, prior_logits=prior_logits, prior_means=prior_means,
                     prior_logvars=prior_logvars)
    code, kl_id = _reduction_code(reduction), kl_code(kl)
    prior_index = _prior_index_argument(prior_index)
    seed = _seed_unless_eps(eps, generator, mu.device)
    z, kl_out = _ops.reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, eps,
                                    seed, code, prior_index, kl_id)
    if reduction == "sum":
        kl_out = kl_out.sum()
    return z, kl_out


_TABLE_GRADS = {"dense": 0, "sparse": 1}


def rows_op_arguments(mu, logvar, idx, prior_logits, prior_means, prior_logvars, eps,
                      generator, reduction, prior_index=None, kl="mc"):
    """The Python side of a row-gathering op's arguments (reparam_gmm_kl_rows, and the fused
    table step in table_optim): the checks C++ cannot make; returns the reduction code, the
    seed tensor (None when eps is given) and the kl code."""
    _require_tensors(mu=mu, logvar=logvar, idx=idx, prior_logits=prior_logits,
                     prior_means=prior_means, prior_logvars=prior_logvars)
    code, kl_id = _reduction_code(reduction), kl_code(kl)
    _prior_index_argument(prior_index)
    return code, _seed_unless_eps(eps, generator, mu.device), kl_id


def reparam_gmm_kl_rows(mu, logvar, idx, prior_logits, prior_means, prior_logvars, *, eps=None,
                        generator=None, reduction="row", table_grad="dense", prior_index=None,
                        kl="mc"):
    """reparam_gmm_kl on rows `idx` of latent tables, gathered inside the kernel.

    mu, logvar: [rows, K] tables; idx: [B] int64/int32 row indices (duplicates allowed); prior:
    [K, C], or [U, K, C] with prior_index [B] (the group of each gathered row, aligned with idx).
    kl: "mc" or "bound" as in reparam_gmm_kl. Returns z [B, K] and kl as reparam_gmm_kl does for
    the gathered rows.
    table_grad: "dense" -> mu.grad/logvar.grad are [rows, K] tensors (zero off the batch);
    "sparse" -> coalesced sparse COO gradients (duplicates summed), for torch.optim.SparseAdam/SGD.
    For an optimizer step fused into the backward (no table gradient at all), use
    halfvae_ext.LatentTable(..., fused_optimizer="adam"|"rowwise_adam"|"rowwise_adagrad"|"sgd").
    """
    code, seed, kl_id = rows_op_arguments(mu, logvar, idx, prior_logits, prior_means,
                                            prior_logvars, eps, generator, reduction,
                                            prior_index, kl)
    if table_grad not in _TABLE_GRADS:
        raise ValueError(f"table_grad must be 'dense' or 'sparse', got {table_grad!r}")
    z, kl_out = _ops.reparam_gmm_kl_rows(mu, logvar, idx, prior_logits, prior_means,
                                         prior_logvars, eps, seed, code,
                                         _TABLE_GRADS[table_grad], prior_index, kl_id)
    if reduction == "sum":
        kl_out = kl_out.sum()
    return z, kl_out


def gmm_log_prob(z, prior_logits, prior_means, prior_logvars, *, prior_index=None):
    """log p_k(z[n, k]) under the per-dimension Gaussian mixture; z: [N, K], prior: [K, C] -> [N, K],
    or prior [U, K, C] with prior_index [N] choosing row n's group.
    Differentiable in z and the three prior tensors."""
    _require_tensors(z=z, prior_logits=prior_logits, prior_means=prior_means,
                     prior_logvars=prior_logvars)
    return _ops.gmm_log_prob(z, prior_logits, prior_means, prior_logvars,
                             _prior_index_argument(prior_index))


def philox_normal(seed: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """The standard normals reparam_gmm_kl draws in-kernel for `seed` (from draw_seed), in [N, K]
    order; for reproducing eps and for testing the generator."""
    _require_tensors(seed=seed)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list, torch.Size))
                                   else (shape,)))
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    numel = 1
    for s in shape:
        numel *= s
    return _ops.philox_normal(seed, numel, dtype).view(shape)


def cuda_kernels_compiled() -> bool:
    """True when this build of halfvae_ext contains the CUDA kernels (a GPU may still be absent)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("halfvae_ext::reparam_gmm_kl", "CUDA")


def cuda_kernels_available() -> bool:
    """True when the CUDA kernels can run here: compiled in, and torch sees a CUDA device."""
    return cuda_kernels_compiled() and torch.cuda.is_available()


# ----------------------------------------------------------------------------- fake kernels
def _one_device(**tensors):
    """A meta tensor among real ones sends a call to the fake kernel, past the ops' own checks:
    refuse mixed devices here too (the outputs would be on the first tensor's device)."""
    (first, ref), *others = ((n, t) for n, t in tensors.items() if t is not None)
    for name, t in others:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {ref.device}; all "
                             "tensors must be on one device")


@torch.library.register_fake("halfvae_ext::reparam_gmm_kl")
def _reparam_gmm_kl_fake(mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed,
                         reduction, prior_index=None, kl=0):
    _one_device(mu=mu, logvar=logvar, prior_logits=prior_logits, prior_means=prior_means,
                prior_logvars=prior_logvars, eps=eps, seed=seed, prior_index=prior_index)
    kl = mu.new_empty((mu.shape[0],)) if reduction == 1 else torch.empty_like(mu)
    return torch.empty_like(mu), kl


@torch.library.register_fake("halfvae_ext::reparam_gmm_kl_backward")
def _reparam_gmm_kl_backward_fake(grad_z, grad_kl, mu, logvar, prior_logits, prior_means,
                                  prior_logvars, eps, seed, reduction, prior_grads,
                                  prior_index=None, kl=0, range_checked=False):
    _one_device(mu=mu, grad_z=grad_z, grad_kl=grad_kl, logvar=logvar, prior_logits=prior_logits,
                prior_means=prior_means, prior_logvars=prior_logvars, eps=eps, seed=seed,
                prior_index=prior_index)
    return (torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(prior_logits),
            torch.empty_like(prior_means), torch.empty_like(prior_logvars))


@torch.library.register_fake("halfvae_ext::reparam_gmm_kl_rows")
def _reparam_gmm_kl_rows_fake(mu, logvar, idx, prior_logits, prior_means, prior_logvars, eps,
                              seed, reduction, table_grad, prior_index=None, kl=0):
    _one_device(mu=mu, logvar=logvar, idx=idx, prior_logits=prior_logits,
                prior_means=prior_means, prior_logvars=prior_logvars, eps=eps, seed=seed,
                prior_index=prior_index)
    B, K = idx.shape[0], mu.shape[1]
    kl = mu.new_empty((B,)) if reduction == 1 else mu.new_empty((B, K))
    return mu.new_empty((B, K)), kl


@torch.library.register_fake("halfvae_ext::reparam_gmm_kl_rows_backward")
def _reparam_gmm_kl_rows_backward_fake(grad_z, grad_kl, mu, logvar, idx, prior_logits,
                                       prior_means, prior_logvars, eps, seed, reduction,
                                       prior_grads, prior_index=None, kl=0,
                                       range_checked=False):
    _one_device(mu=mu, grad_z=grad_z, grad_kl=grad_kl, logvar=logvar, idx=idx,
                prior_logits=prior_logits, prior_means=prior_means, prior_logvars=prior_logvars,
                eps=eps, seed=seed, prior_index=prior_index)
    B, K = idx.shape[0], mu.shape[1]
    return (mu.new_empty((B, K)), mu.new_empty((B, K)), torch.empty_like(prior_logits),
            torch.empty_like(prior_means), torch.empty_like(prior_logvars))


@torch.library.register_fake("halfvae_ext::latent_rows_update_")
def _latent_rows_update_fake(mu, logvar, state, idx, grad_mu, grad_logvar, optimizer, lr, beta1,
                             beta2, eps, step, row_state=None, row_offset=0):
    _one_device(mu=mu, logvar=logvar, state=state, idx=idx, grad_mu=grad_mu,
                grad_logvar=grad_logvar, row_state=row_state)
    return None


@torch.library.register_fake("halfvae_ext::reparam_gmm_kl_rows_backward_step_")
def _reparam_gmm_kl_rows_backward_step_fake(grad_z, grad_kl, grad_mu_rows, grad_logvar_rows, mu,
                                            logvar, state, idx, prior_logits, prior_means,
                                            prior_logvars, eps, seed, reduction, prior_grads,
                                            optimizer, lr, beta1, beta2, adam_eps, step,
                                            prior_index=None, kl=0, range_checked=False,
                                            row_state=None, row_offset=0):
    _one_device(mu=mu, grad_z=grad_z, grad_kl=grad_kl, grad_mu_rows=grad_mu_rows,
                grad_logvar_rows=grad_logvar_rows, logvar=logvar, state=state, idx=idx,
                row_state=row_state,
                prior_logits=prior_logits, prior_means=prior_means, prior_logvars=prior_logvars,
                eps=eps, seed=seed, prior_index=prior_index)
    return (torch.empty_like(prior_logits), torch.empty_like(prior_means),
            torch.empty_like(prior_logvars))


@torch.library.register_fake("halfvae_ext::gmm_log_prob")
def _gmm_log_prob_fake(z, prior_logits, prior_means, prior_logvars, prior_index=None):
    _one_device(z=z, prior_logits=prior_logits, prior_means=prior_means,
                prior_logvars=prior_logvars, prior_index=prior_index)
    return torch.empty_like(z)


@torch.library.register_fake("halfvae_ext::gmm_log_prob_backward")
def _gmm_log_prob_backward_fake(grad, z, prior_logits, prior_means, prior_logvars, prior_grads,
                                prior_index=None, range_checked=False):
    _one_device(z=z, grad=grad, prior_logits=prior_logits, prior_means=prior_means,
                prior_logvars=prior_logvars, prior_index=prior_index)
    return (torch.empty_like(z), torch.empty_like(prior_logits), torch.empty_like(prior_means),
            torch.empty_like(prior_logvars))


@torch.library.register_fake("halfvae_ext::philox_normal")
def _philox_normal_fake(seed, numel, dtype):
    return seed.new_empty((numel,), dtype=dtype)


# ----------------------------------------------------------------------------- autograd
# The autograd formulas of reparam_gmm_kl, reparam_gmm_kl_rows and gmm_log_prob are C++ autograd
# Functions registered at the Autograd key (csrc/ops/reparam_gmm_kl.cpp, gmm_log_prob.cpp): a
# Python formula (torch.library.register_autograd) cost ~100 us per small training step. They
# call the backward ops (reparam_gmm_kl_backward, ...) through the dispatcher with
# range_checked=True, so torch.compile and opcheck see the same ops as before.


# ----------------------------------------------------------------------------- row-keyed draws
def philox_normal_rows(seed: torch.Tensor, rows, num_latents: int,
                       dtype=torch.float32) -> torch.Tensor:
    """The draws of philox_normal(seed, (N, num_latents)) at rows `rows` of that [N, K] table:
    element (b, k) is element rows[b] * K + k of the stream, [len(rows), K], computed without
    drawing the other rows. A draw keyed by the row id: a sharded table (halfvae_ext.distributed)
    draws the same eps for a row whichever process owns it and wherever it sits in a batch.
    Repeated rows get the same numbers. rows: 1-D int64/int32 row ids (>= 0) on seed's device."""
    _require_tensors(seed=seed, rows=rows)
    if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 1:
        raise ValueError(f"num_latents must be a positive integer, got {num_latents!r}")
    return _ops.philox_normal_rows(seed, rows, num_latents, dtype)


@torch.library.register_fake("halfvae_ext::philox_normal_rows")
def _philox_normal_rows_fake(seed, rows, K, dtype):
    _one_device(seed=seed, rows=rows)
    return seed.new_empty((rows.shape[0], K), dtype=dtype)
