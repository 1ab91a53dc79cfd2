"""halfvae_ext: encoder-free variational inference (Half-VAE) with fused CPU/CUDA kernels."""
import torch  # noqa: F401  (must come before _C: the kernels link against torch)

from . import _C  # noqa: F401  (registers the torch.ops.halfvae_ext operators)
from . import reference
from .ops import (cuda_kernels_available, cuda_kernels_compiled, gmm_log_prob, philox_normal,
                  philox_normal_rows, reparam_gmm_kl, reparam_gmm_kl_rows)
from .table_optim import FusedRowOptimizer, fused_rows_kl
from .models import VAE, GMMPrior, HalfVAE, LatentTable
from . import _moved  # noqa: F401  (the modules' old import paths)

__all__ = [
    "reparam_gmm_kl",
    "reparam_gmm_kl_rows",
    "fused_rows_kl",
    "FusedRowOptimizer",
    "gmm_log_prob",
    "philox_normal",
    "philox_normal_rows",
    "cuda_kernels_available",
    "cuda_kernels_compiled",
    "reference",
    "GMMPrior",
    "LatentTable",
    "HalfVAE",
    "VAE",
    "HalfVAEICA",
    "ShardedLatentTable",
]


def __getattr__(name):
    # The estimator pulls in scikit-learn, the sharded table torch.distributed: import them on
    # first use, not with the package.
    if name == "HalfVAEICA":
        from .ica.estimator import HalfVAEICA
        return HalfVAEICA
    if name == "ShardedLatentTable":
        from .distributed import ShardedLatentTable
        return ShardedLatentTable
    raise AttributeError(f"module 'halfvae_ext' has no attribute {name!r}")


__version__ = "0.1.0"
