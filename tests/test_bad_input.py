"""Bad input raises a clear error naming the argument."""
import pytest
import torch

import halfvae_ext as hv

from conftest import make_problem


@pytest.fixture
def good():
    mu, logvar, eps, prior = make_problem(6, 4, 3, requires_grad=False)
    return dict(mu=mu, logvar=logvar, prior_logits=prior[0], prior_means=prior[1],
                prior_logvars=prior[2], eps=eps)


def call(args):
    a = dict(args)
    pos = [a.pop(k) for k in ("mu", "logvar", "prior_logits", "prior_means", "prior_logvars")]
    return hv.reparam_gmm_kl(*pos, **a)


CASES = [
    ("mu rank 1", dict(mu=torch.randn(6)), ValueError, "mu must have shape"),
    ("mu rank 3", dict(mu=torch.randn(6, 4, 1)), ValueError, "mu must have shape"),
    ("logvar other N", dict(logvar=torch.randn(5, 4)), ValueError, "logvar must have the shape"),
    ("mu other K", dict(mu=torch.randn(6, 5), logvar=torch.randn(6, 5), eps=torch.randn(6, 5)),
     ValueError, "mu has K = 5"),
    ("prior rank 1", dict(prior_logits=torch.randn(4)), ValueError, "prior_logits must have shape"),
    ("prior shapes differ", dict(prior_means=torch.randn(4, 2)), ValueError, "one shape"),
    ("prior no components", dict(prior_logits=torch.randn(4, 0), prior_means=torch.randn(4, 0),
                                 prior_logvars=torch.randn(4, 0)), ValueError, "components"),
    ("integer mu", dict(mu=torch.ones(6, 4, dtype=torch.int64)), TypeError, "mu must be a floating"),
    ("integer prior", dict(prior_means=torch.ones(4, 3, dtype=torch.int32)), TypeError,
     "prior_means must be a floating"),
    ("not a tensor", dict(mu=[[0.0] * 4] * 6), TypeError, "mu must be a torch.Tensor"),
    ("mixed dtypes", dict(logvar=torch.randn(6, 4, dtype=torch.float64)), TypeError,
     "logvar has dtype"),
    ("mixed prior dtype", dict(prior_logvars=torch.randn(4, 3, dtype=torch.float64)), TypeError,
     "prior_logvars has dtype"),
    ("half on cpu", dict(mu=torch.randn(6, 4).half(), logvar=torch.randn(6, 4).half(),
                         eps=torch.randn(6, 4).half(), prior_logits=torch.randn(4, 3).half(),
                         prior_means=torch.randn(4, 3).half(),
                         prior_logvars=torch.randn(4, 3).half()), TypeError,
     r"mu has dtype torch.float16, which the cpu-\w+ kernels do not support \(float32, float64\)"),
    ("unknown reduction", dict(reduction="mean"), ValueError, "reduction must be"),
    ("reduction not str", dict(reduction=None), ValueError, "reduction must be"),
    ("eps wrong shape", dict(eps=torch.randn(6, 5)), ValueError, "eps must have the shape"),
    ("eps integer", dict(eps=torch.ones(6, 4, dtype=torch.int64)), TypeError, "eps must be a"),
    ("eps and generator", dict(generator=torch.Generator()), ValueError, "generator"),
    ("mixed devices", dict(prior_means=torch.randn(4, 3, device="meta")), ValueError,
     "prior_means is on meta"),
]


@pytest.mark.parametrize("name,change,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(good, name, change, exc, match):
    args = dict(good)
    args.update(change)
    with pytest.raises(exc, match=match):
        call(args)


def test_bad_generator(good):
    args = dict(good)
    args["eps"] = None
    args["generator"] = "seed"
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        call(args)


def test_gmm_log_prob_bad_input(good):
    p = (good["prior_logits"], good["prior_means"], good["prior_logvars"])
    with pytest.raises(ValueError, match="z must have shape"):
        hv.gmm_log_prob(torch.randn(6), *p)
    with pytest.raises(ValueError, match="z has K = 3"):
        hv.gmm_log_prob(torch.randn(6, 3), *p)
    with pytest.raises(TypeError, match="z must be a floating"):
        hv.gmm_log_prob(torch.ones(6, 4, dtype=torch.int64), *p)
    with pytest.raises(TypeError, match="prior_logits has dtype"):
        hv.gmm_log_prob(torch.randn(6, 4, dtype=torch.float64), *p)


def test_raw_ops_check_their_arguments_too(good):
    # The C++ ops are where shapes, dtypes and devices are checked: torch.ops.halfvae_ext.* raise
    # the same ValueError / TypeError as the Python functions.
    ops = torch.ops.halfvae_ext
    p = (good["prior_logits"], good["prior_means"], good["prior_logvars"])
    with pytest.raises(ValueError, match="mu must have shape"):
        ops.reparam_gmm_kl(torch.randn(6), good["logvar"], *p, good["eps"], None, 1)
    with pytest.raises(ValueError, match="K = 5"):
        ops.reparam_gmm_kl(torch.randn(6, 5), torch.randn(6, 5), *p, torch.randn(6, 5), None, 1)
    with pytest.raises(ValueError, match="exactly one of eps and seed"):
        ops.reparam_gmm_kl(good["mu"], good["logvar"], *p, None, None, 1)
    with pytest.raises(ValueError, match="reduction code"):
        ops.reparam_gmm_kl(good["mu"], good["logvar"], *p, good["eps"], None, 7)
    with pytest.raises(TypeError, match="seed must be an int64 tensor"):
        ops.reparam_gmm_kl(good["mu"], good["logvar"], *p, None, torch.zeros(2), 1)
    with pytest.raises(ValueError, match="seed must be an int64 tensor of 2 elements"):
        ops.reparam_gmm_kl(good["mu"], good["logvar"], *p, None,
                           torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="prior_means must have the shape"):
        ops.gmm_log_prob(good["mu"], p[0], torch.randn(4, 2), p[2])
    with pytest.raises(ValueError, match="grad_kl must have shape"):
        ops.reparam_gmm_kl_backward(good["mu"], torch.randn(5), good["mu"], good["logvar"], *p,
                                    good["eps"], None, 1, True)
    with pytest.raises(ValueError, match="grad_z must have shape"):
        ops.reparam_gmm_kl_backward(torch.randn(6, 3), torch.randn(6), good["mu"], good["logvar"],
                                    *p, good["eps"], None, 1, True)
    with pytest.raises(ValueError, match="grad must have the shape of z"):
        ops.gmm_log_prob_backward(torch.randn(5, 4), good["mu"], *p, True)
    with pytest.raises(TypeError,
                       match="eps has dtype torch.float64 but mu has dtype torch.float32"):
        ops.reparam_gmm_kl(good["mu"], good["logvar"], *p, good["eps"].double(), None, 1)
    # The CPU kernels are float32/float64 only (their kernel table says so).
    half = [t.half() for t in (good["mu"], good["logvar"], *p, good["eps"])]
    with pytest.raises(TypeError, match=r"cpu-\w+ kernels do not support \(float32, float64\)"):
        ops.reparam_gmm_kl(*half[:5], half[5], None, 1)
    with pytest.raises(TypeError, match=r"dtype is torch.float16, which the cpu-\w+ kernels"):
        ops.philox_normal(torch.zeros(2, dtype=torch.long), 4, torch.float16)
    with pytest.raises(ValueError, match="numel must be non-negative"):
        ops.philox_normal(torch.zeros(2, dtype=torch.long), -1, torch.float32)


def test_a_meta_tensor_among_cpu_tensors_is_refused():
    # The dispatcher sends such a call to the fake kernel, past the C++ checks.
    z = torch.randn(6, 4)
    p = [torch.randn(4, 3) for _ in range(3)]
    with pytest.raises(ValueError, match="prior_means is on meta but z is on cpu"):
        torch.ops.halfvae_ext.gmm_log_prob(z, p[0], p[1].to("meta"), p[2])
    with pytest.raises(ValueError, match="seed is on meta but mu is on cpu"):
        torch.ops.halfvae_ext.reparam_gmm_kl(z, z, *p, None, torch.zeros(2, dtype=torch.long,
                                                                       device="meta"), 1)


def test_philox_normal_bad_input():
    with pytest.raises(TypeError, match="seed must be an int64"):
        hv.philox_normal(torch.zeros(2), 4)
    with pytest.raises(ValueError, match="non-negative"):
        hv.philox_normal(torch.zeros(2, dtype=torch.int64), (-1, 2))
