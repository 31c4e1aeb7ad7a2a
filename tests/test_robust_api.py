"""docs/robustness.md at the API: concrete offsets of any integer dtype, the argument types,
empty batches and sequences on every path, float64 through the compiled target, and the
checkify hook for traced offsets. CPU; the CUDA side is in test_robust_cuda.py."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from inputs import float64_on_cpu, make_inputs
from jax_flashkda import check_cu_seqlens, kda
from jax_flashkda.ops import _cpu_target_ready

PURE_IMPLS = ["auto", "chunked", "recurrent"]
IMPLS = PURE_IMPLS + (["ffi"] if _cpu_target_ready() else [])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint8])
def test_concrete_decreasing_offsets_raise_whatever_the_dtype(rng, dtype):
    args, kw = make_inputs(rng, seqlens=[3, 5])
    # np.diff of this uint32 array wraps to a huge positive step instead of -1.
    kw["cu_seqlens"] = np.array([0, 6, 5, 8], dtype)
    kw.pop("initial_state")
    with pytest.raises(ValueError, match=r"kda: cu_seqlens must start at 0, be non-decreasing and end at T=8, "
                       r"got \[0, 6, 5, 8\]"):
        kda(*args, **kw)


@pytest.mark.parametrize("name,value", [("A_log", [0.1, 0.2, 0.3]), ("A_log", 0.5),
                                        ("dt_bias", 0.0), ("dt_bias", [[0.0] * 16] * 3)])
def test_per_head_parameters_must_be_arrays(rng, name, value):
    args, kw = make_inputs(rng, H=3, K=16, gate_mode="softplus")
    kw[name] = value
    with pytest.raises(TypeError, match=f"kda: {name} must be an array, got {type(value).__name__}"):
        kda(*args, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,T", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence(rng, impl, B, T):
    args, kw = make_inputs(rng, B=max(B, 1), T=max(T, 1), H=2, K=8, V=8)
    args = tuple(a[:B, :T] for a in args)
    kw["initial_state"] = kw["initial_state"][:B]

    def f(*a):
        o, ht = kda(*a, impl=impl, **kw)
        return jnp.sum(o) + jnp.sum(ht * ht), (o, ht)

    grads, (o, ht) = jax.grad(f, argnums=tuple(range(5)), has_aux=True)(*args)
    assert o.shape == args[2].shape and o.dtype == args[2].dtype
    np.testing.assert_array_equal(ht, kw["initial_state"])
    for g_, a in zip(grads, args):
        assert g_.shape == a.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequences_with_no_tokens(rng, impl):
    args, kw = make_inputs(rng, seqlens=[1], H=2, K=8, V=8)
    args = tuple(a[:, :0] for a in args)
    kw["cu_seqlens"] = np.array([0, 0, 0], np.int32)
    kw["initial_state"] = (0.1 * rng.standard_normal((2, 2, 8, 8))).astype(np.float32)
    o, ht = kda(*args, impl=impl, **kw)
    assert o.shape == (1, 0, 2, 8)
    np.testing.assert_array_equal(ht, kw["initial_state"])


@pytest.mark.skipif(not _cpu_target_ready(), reason="the C++ target is not built")
def test_float64_through_the_compiled_target_keeps_float64(rng):
    args, kw = make_inputs(rng, dtype=np.float64)
    with float64_on_cpu():
        args = tuple(jnp.asarray(a, jnp.float64) for a in args)
        o, ht = kda(*args, impl="ffi", **kw)
        ref, ref_ht = kda(*args, impl="recurrent", **kw)
        assert o.dtype == jnp.float64
        np.testing.assert_allclose(o, ref, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(ht, ref_ht, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("offsets,message", [
    ([0, 3, 8], None), ([1, 3, 8], "cu_seqlens\\[0\\] must be 0"),
    ([0, 3, 7], "must be T=8"), ([0, 5, 3, 8], "decreases after entry 1"),
])
def test_check_cu_seqlens_under_checkify(offsets, message):
    def step(cu):
        check_cu_seqlens(cu, 8)
        return cu.sum()

    err, _ = jax.jit(checkify.checkify(step))(jnp.asarray(offsets, jnp.int32))
    if message is None:
        err.throw()
    else:
        with pytest.raises(checkify.JaxRuntimeError, match=message):
            err.throw()
