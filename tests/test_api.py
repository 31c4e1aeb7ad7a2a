"""Bad input is refused at trace time with a message naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import make_inputs
from jax_flashkda import kda


def _base(rng, **overrides):
    args, kwargs = make_inputs(rng, B=1, T=8, H=2, K=8, V=8, gate_mode="safe")
    kwargs.update(overrides)
    return list(args), kwargs


def _expect(error, match, args, kwargs):
    with pytest.raises(error, match=match):
        kda(*args, **kwargs)
    # The same check fires while tracing under jit.
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: kda(*a, **kwargs))(*args)


@pytest.mark.parametrize("index,name,bad_shape", [
    (0, "q", (1, 8, 2)), (1, "k", (1, 8, 2, 8, 1)), (2, "v", (8, 2, 8)), (3, "g", (1, 8, 2)),
    (4, "beta", (1, 8, 2, 1))])
def test_wrong_rank(rng, index, name, bad_shape):
    args, kwargs = _base(rng)
    args[index] = rng.standard_normal(bad_shape).astype(np.float32)
    _expect(ValueError, f"{name} must have rank", args, kwargs)


def test_mismatched_heads(rng):
    args, kwargs = _base(rng)
    args[1] = rng.standard_normal((1, 8, 3, 8)).astype(np.float32)
    _expect(ValueError, "k must have shape", args, kwargs)
    args, kwargs = _base(rng)
    args[2] = rng.standard_normal((1, 8, 3, 8)).astype(np.float32)
    _expect(ValueError, "v must have shape", args, kwargs)
    args, kwargs = _base(rng)
    args[4] = rng.standard_normal((1, 8, 3)).astype(np.float32)
    _expect(ValueError, "beta must have shape", args, kwargs)


def test_wrong_dtypes(rng):
    args, kwargs = _base(rng)
    args[0] = args[0].astype(np.int32)
    _expect(TypeError, "q must be bfloat16", args, kwargs)
    args, kwargs = _base(rng)
    args[2] = args[2].astype(jnp.bfloat16)
    _expect(TypeError, "q, k and v must share a dtype", args, kwargs)


def test_initial_state_shape(rng):
    args, kwargs = _base(rng, initial_state=np.ones((1, 2, 8, 9), np.float32))
    _expect(ValueError, r"initial_state must have shape \(1, 2, 8, 8\)", args, kwargs)


def test_cu_seqlens_with_batch(rng):
    args, kwargs = make_inputs(rng, B=2, T=8, H=2, K=8, V=8, with_state=False)
    kwargs["cu_seqlens"] = np.array([0, 3, 8], np.int32)
    _expect(ValueError, "cu_seqlens requires B == 1", list(args), kwargs)


def test_cu_seqlens_float(rng):
    args, kwargs = _base(rng, initial_state=None, output_final_state=False,
                         cu_seqlens=np.array([0.0, 3.0, 8.0], np.float32))
    _expect(TypeError, "cu_seqlens must be int32 or int64", args, kwargs)


def test_cu_seqlens_values(rng):
    args, kwargs = _base(rng, initial_state=None, cu_seqlens=np.array([0, 5, 3, 8], np.int32))
    with pytest.raises(ValueError, match="non-decreasing and end at T=8"):
        kda(*args, **kwargs)
    kwargs["cu_seqlens"] = np.array([0, 5], np.int32)
    with pytest.raises(ValueError, match="end at T=8"):
        kda(*args, **kwargs)


def test_gate_without_A_log(rng):
    args, kwargs = _base(rng)
    kwargs.pop("lower_bound")
    kwargs.pop("A_log")
    _expect(ValueError, "needs A_log", args, kwargs)


@pytest.mark.parametrize("lower_bound", [-5.5, 0.0, 0.5])
def test_lower_bound_range(rng, lower_bound):
    args, kwargs = _base(rng, lower_bound=lower_bound)
    _expect(ValueError, r"lower_bound must be in \[-5, 0\)", args, kwargs)


def test_gate_parameters_without_gate(rng):
    args, kwargs = make_inputs(rng, B=1, T=8, H=2, K=8, V=8, gate_mode="log_decay")
    kwargs["A_log"] = np.zeros((2,), np.float32)
    _expect(ValueError, "A_log is only used with use_gate_in_kernel=True", list(args), kwargs)


def test_A_log_and_dt_bias_shapes(rng):
    args, kwargs = _base(rng, A_log=np.zeros((3,), np.float32))
    _expect(ValueError, r"A_log must have shape \[H\]", args, kwargs)
    args, kwargs = _base(rng, dt_bias=np.zeros((2, 7), np.float32))
    _expect(ValueError, r"dt_bias must have shape \[H, K\]", args, kwargs)


def test_unknown_impl(rng):
    args, kwargs = _base(rng, impl="triton")
    _expect(ValueError, "impl must be one of", args, kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off-GPU")
def test_cuda_where_it_cannot_run(rng):
    args, kwargs = _base(rng, impl="cuda")
    _expect(ValueError, "impl='cuda' cannot run this call: .*not a CUDA GPU", args, kwargs)


def test_flat_dt_bias_accepted(rng):
    args, kwargs = _base(rng, impl="recurrent")
    o_2d, _ = kda(*args, **kwargs)
    kwargs["dt_bias"] = kwargs["dt_bias"].reshape(-1)
    o_flat, _ = kda(*args, **kwargs)
    np.testing.assert_array_equal(np.asarray(o_2d), np.asarray(o_flat))


def test_final_state_only_when_asked(rng):
    args, kwargs = _base(rng, output_final_state=False, impl="chunked")
    o, ht = kda(*args, **kwargs)
    assert ht is None and o.shape == (1, 8, 2, 8) and o.dtype == jnp.float32
