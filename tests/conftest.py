import pytest
import torch

import halfvae_ext  # noqa: F401


def make_problem(N, K, C, dtype=torch.float32, device="cpu", seed=0, requires_grad=True,
                 logvar_scale=1.0):
    """Random latents, eps and a GMM prior; prior tensors [K, C]."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    mu = r(N, K)
    logvar = r(N, K, scale=logvar_scale)
    eps = torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype).to(device)
    prior = (r(K, C), r(K, C, scale=2.0), r(K, C, scale=0.5))
    return mu, logvar, eps, prior


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny problems (`pytestmark =
    pytest.mark.usefixtures("one_thread")`): one thread is fastest there, and on a busy 2-core
    machine a 2-thread OpenMP team can stall for a scheduler tick at every parallel region."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def has_cuda():
    return halfvae_ext.cuda_kernels_available()


requires_cuda = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU and the CUDA kernels")
