"""The CUDA kernels' grid (csrc/launch_plan.h), checked on the CPU: host arithmetic, exposed by
_C. Thread t starts at element 4t and strides by S; each of its 4 lanes must keep one latent
dimension k from pass to pass, and every element must be visited exactly once."""
import pytest

from halfvae_ext import _C

THREADS = 256


def visits(numel, K, blocks, stride):
    """Every element's visits, and whether each thread's lanes keep their k."""
    seen = [0] * numel
    lanes_fixed = True
    for t in range(blocks * THREADS):
        first = 4 * t
        for base in range(first, numel, stride):
            for q in range(4):
                i = base + q
                if i < numel:
                    seen[i] += 1
                    lanes_fixed &= (base - first) % K == 0  # lane q: element first + q, then + S
    return seen, lanes_fixed


@pytest.mark.parametrize("numel,K,cap", [
    (1, 1, 8), (20_000, 4099, 1056), (3 * 4099, 4099, 1056), (100_000, 7, 4), (100_000, 8, 4),
    (300_000, 1031, 2), (50_000, 3, 1), (5 * 1024 * 4 + 3, 5, 3), (4099 * 70, 4099, 8)])
def test_every_element_once_and_lanes_keep_their_dimension(numel, K, cap):
    blocks, stride = _C.plan_launch_blocks(numel, K, THREADS, cap)
    assert stride == blocks * THREADS * 4
    seen, lanes_fixed = visits(numel, K, blocks, stride)
    assert all(v == 1 for v in seen)
    assert lanes_fixed
    needed = max(1, -(-numel // (4 * THREADS)))
    assert blocks <= needed  # never more blocks than one pass needs
    if needed <= cap:
        assert blocks == needed  # one pass: exactly the blocks needed, whatever K
    else:
        q = K // __import__("math").gcd(K, 4 * THREADS)
        assert blocks == needed or blocks % q == 0


def test_a_large_prime_k_does_not_inflate_the_grid():
    # K = 4099 used to round 20 blocks up to 4099 for 20K elements.
    assert _C.plan_launch_blocks(20_000, 4099, THREADS, 1056) == (20, 20 * THREADS * 4)
    # Several passes: the fewest blocks that keep the stride a multiple of K.
    blocks, stride = _C.plan_launch_blocks(2**31 + 8, 4099, THREADS, 1056)
    assert blocks == 4099 and stride % 4099 == 0


def test_a_grid_too_large_is_refused_not_narrowed():
    # One pass over 2^46 elements would need 2^36 blocks of 256 threads; with a cap the grid
    # strides, without one (cap = numel) the block count cannot fit a grid.
    blocks, _ = _C.plan_launch_blocks(2**46, 8, THREADS, 1056)
    assert blocks == 1056
    with pytest.raises(ValueError, match="exceeds the grid limit"):
        _C.plan_launch_blocks(2**46, 8, THREADS, 2**40)
    # A K whose multiple-of-K grid is itself too large.
    with pytest.raises(ValueError, match="exceeds the grid limit"):
        _C.plan_launch_blocks(2**62, 2**31 + 11, THREADS, 1056)
