import os
import tempfile

import pytest
import torch

import halfvae_ext  # noqa: F401


# torch 2.14.1's inductor keys its FX-graph cache without the vector ISA it wrote the code for: a
# graph cached at the CPU's own capability (AVX-512, 16 floats a vector) and reused under
# ATEN_CPU_CAPABILITY=avx2 is built for 8-float vectors and sums every other 8 elements (x.sum()
# of arange(64.) gives 880, not 2016), and under =default it does not compile ("'at::vec' has not
# been declared"). The other way round, a graph cached under avx2 (8-float steps) and built for
# AVX-512 reads and writes past its buffers: the process aborts. So every capability, the CPU's
# own included, gets a cache directory of its own (set before anything compiles; inductor reads
# the variable when it first needs the cache, and child processes inherit it), unless the user
# chose one. benchmarks/NOTES.md, "torch.compile under a forced capability".
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(),
        f"torchinductor_halfvae_{os.getuid()}_{torch.backends.cpu.get_cpu_capability().lower()}")


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


def assert_float32_close_to_truth(actual, truth):
    """float32 results against the float64 reference on the same inputs. The absolute tolerance is
    relative to each tensor's largest entry: prior gradients and row sums add up many terms, and
    float32 rounding of such sums scales with their size, not with each entry."""
    for i, (a, t) in enumerate(zip(actual, truth)):
        assert a.dtype == torch.float32
        atol = 1e-5 * max(1.0, t.abs().max().item()) if t.numel() else 1e-5
        torch.testing.assert_close(a.double(), t, rtol=1e-4, atol=atol,
                                   msg=lambda m: f"output {i}: {m}")




def has_cuda():
    return halfvae_ext.cuda_kernels_available()


requires_cuda = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU and the CUDA kernels")


def assert_same_fit(a, b):
    """Two fitted HalfVAEICA are the same fit: model states, ELBO histories and restarts equal."""
    import numpy as np
    sa, sb = a.model_.state_dict(), b.model_.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    np.testing.assert_array_equal(a.elbo_history_, b.elbo_history_)
    np.testing.assert_array_equal(a.restart_elbos_, b.restart_elbos_)
    assert a.best_restart_ == b.best_restart_ and a.n_iter_ == b.n_iter_
