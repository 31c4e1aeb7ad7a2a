"""Bad input is refused at trace time with a message naming the argument."""

import re

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
    rank = 3 if name == "beta" else 4
    _expect(ValueError, re.escape(f"kda: {name} must have rank {rank}, got shape {bad_shape}"),
            args, kwargs)


def test_mismatched_heads(rng):
    args, kwargs = _base(rng)
    args[1] = rng.standard_normal((1, 8, 3, 8)).astype(np.float32)
    _expect(ValueError, re.escape("kda: k must have shape (1, 8, 2, 8) ([B, T, H, K] like q), "
                                  "got (1, 8, 3, 8)"), args, kwargs)
    args, kwargs = _base(rng)
    args[2] = rng.standard_normal((1, 8, 3, 8)).astype(np.float32)
    _expect(ValueError, re.escape("kda: v must have shape [B, T, H, V] = [1, 8, 2, V] matching "
                                  "q, got (1, 8, 3, 8)"), args, kwargs)
    args, kwargs = _base(rng)
    args[4] = rng.standard_normal((1, 8, 3)).astype(np.float32)
    _expect(ValueError, re.escape("kda: beta must have shape (1, 8, 2) ([B, T, H]), got "
                                  "(1, 8, 3)"), args, kwargs)


def test_wrong_dtypes(rng):
    args, kwargs = _base(rng)
    args[0] = args[0].astype(np.int32)
    _expect(TypeError, "kda: q must be bfloat16, float16, float32 or float64, got int32", args,
            kwargs)
    args, kwargs = _base(rng)
    args[2] = args[2].astype(jnp.bfloat16)
    _expect(TypeError, "kda: q, k and v must share a dtype, got float32, float32, bfloat16", args,
            kwargs)


def test_initial_state_shape(rng):
    args, kwargs = _base(rng, initial_state=np.ones((1, 2, 8, 9), np.float32))
    _expect(ValueError, re.escape("kda: initial_state must have shape (1, 2, 8, 8) ([N, H, K, V] "
                                  "with N = B), got (1, 2, 8, 9)"), args, kwargs)


def test_cu_seqlens_with_batch(rng):
    args, kwargs = make_inputs(rng, B=2, T=8, H=2, K=8, V=8, with_state=False)
    kwargs["cu_seqlens"] = np.array([0, 3, 8], np.int32)
    _expect(ValueError, "kda: cu_seqlens requires B == 1 \\(packed sequences\\), got B=2", list(args), kwargs)


def test_cu_seqlens_float(rng):
    args, kwargs = _base(rng, initial_state=None, output_final_state=False,
                         cu_seqlens=np.array([0.0, 3.0, 8.0], np.float32))
    _expect(TypeError, "kda: cu_seqlens must be int32 or int64, got float32", args, kwargs)


def test_cu_seqlens_values(rng):
    args, kwargs = _base(rng, initial_state=None, cu_seqlens=np.array([0, 5, 3, 8], np.int32))
    with pytest.raises(ValueError, match=re.escape(
            "kda: cu_seqlens must start at 0, be non-decreasing and end at T=8, got "
            "[0, 5, 3, 8]")):
        kda(*args, **kwargs)
    kwargs["cu_seqlens"] = np.array([0, 5], np.int32)
    with pytest.raises(ValueError, match=re.escape(
            "kda: cu_seqlens must start at 0, be non-decreasing and end at T=8, got [0, 5]")):
        kda(*args, **kwargs)


def test_gate_without_A_log(rng):
    args, kwargs = _base(rng)
    kwargs.pop("lower_bound")
    kwargs.pop("A_log")
    _expect(ValueError, r"use_gate_in_kernel=True without lower_bound needs A_log \(\[H\]\)", args,
            kwargs)


@pytest.mark.parametrize("lower_bound", [-5.5, 0.0, 0.5])
def test_lower_bound_range(rng, lower_bound):
    args, kwargs = _base(rng, lower_bound=lower_bound)
    _expect(ValueError, re.escape(f"kda: lower_bound must be in [-5, 0), got {lower_bound}"),
            args, kwargs)


def test_gate_parameters_without_gate(rng):
    args, kwargs = make_inputs(rng, B=1, T=8, H=2, K=8, V=8, gate_mode="log_decay")
    kwargs["A_log"] = np.zeros((2,), np.float32)
    _expect(ValueError, "kda: A_log is only used with use_gate_in_kernel=True; pass "
            "use_gate_in_kernel=True or leave A_log as None", list(args), kwargs)


def test_A_log_and_dt_bias_shapes(rng):
    args, kwargs = _base(rng, A_log=np.zeros((3,), np.float32))
    _expect(ValueError, re.escape("kda: A_log must have shape [H] = (2,), got (3,)"), args,
            kwargs)
    args, kwargs = _base(rng, dt_bias=np.zeros((2, 7), np.float32))
    _expect(ValueError, re.escape("kda: dt_bias must have shape [H, K] = (2, 8) or [H * K] = "
                                  "(16,), got (2, 7)"), args, kwargs)


def test_unknown_impl(rng):
    args, kwargs = _base(rng, impl="triton")
    _expect(ValueError, r"impl must be one of \('auto', 'cuda', 'ffi', 'chunked', 'recurrent'\), "
            "got 'triton'", args, kwargs)


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


# ---------------------------------------------------------------------------------------
# Which implementation impl="auto" takes on CPU, and overrides that cannot be honoured.

def _auto_choice(monkeypatch, args, kwargs):
    """The implementation `_choose_impl` picked for kda(..., impl="auto"), and whether the
    lowered program calls the compiled forward."""
    from jax_flashkda import ops

    chosen = []
    choose = ops._choose_impl

    def spy(impl, q, v, cu_seqlens):
        chosen.append(choose(impl, q, v, cu_seqlens))
        return chosen[-1]

    monkeypatch.setattr(ops, "_choose_impl", spy)
    text = jax.jit(lambda *a: kda(*a, **kwargs, impl="auto")[0]).lower(*args).as_text()
    assert len(chosen) == 1, chosen
    return chosen[0], "jax_flashkda_fwd" in text


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU choice")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_takes_the_cpu_target_for_32_and_16_bit(rng, monkeypatch, dtype):
    from jax_flashkda.ops import _cpu_target_ready

    args, kwargs = make_inputs(rng, B=1, T=8, H=2, K=8, V=8, gate_mode="safe")
    args = [jnp.asarray(a, dtype) for a in args]
    chosen, compiled = _auto_choice(monkeypatch, args, kwargs)
    if _cpu_target_ready():
        assert chosen == "cpu" and compiled
    else:
        assert chosen == "chunked" and not compiled


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU choice")
def test_auto_takes_the_chunked_path_for_float64(rng, monkeypatch):
    with jax.enable_x64(True):
        args, kwargs = make_inputs(rng, B=1, T=8, H=2, K=8, V=8, gate_mode="safe",
                                   dtype=np.float64)
        chosen, compiled = _auto_choice(monkeypatch, args, kwargs)
    assert chosen == "chunked" and not compiled


@pytest.mark.parametrize("env,value,v_dim,match", [
    ("JAX_FLASHKDA_FWD_WARPS", "3", 128, r"JAX_FLASHKDA_FWD_WARPS must be 1, 2, 4 or 8, got '3'"),
    ("JAX_FLASHKDA_FWD_WARPS", "four", 128,
     r"JAX_FLASHKDA_FWD_WARPS must be 1, 2, 4 or 8, got 'four'"),
    ("JAX_FLASHKDA_FWD_WARPS", "8", 64,
     r"JAX_FLASHKDA_FWD_WARPS=8 must divide V / 16 \(one warp per 16 value columns\), got V=64"),
    ("JAX_FLASHKDA_BWD_CHAINS", "4x4x3", 128,
     r"JAX_FLASHKDA_BWD_CHAINS must be one of 4x12x1, 4x3x3, 2x12x1, 2x4x3, got '4x4x3'"),
])
@pytest.mark.parametrize("impl", ["cuda", "ffi", "auto"])
def test_invalid_cuda_override_raises(rng, monkeypatch, env, value, v_dim, match, impl):
    """A call the CUDA target would run raises on an override it cannot honour, instead of
    running the kernels' own choice. (Off-GPU, the target is made to look available: the
    check comes before any kernel is called.)"""
    from jax_flashkda import ops

    monkeypatch.setattr(ops, "_cuda_reason", lambda q, v, cu: None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    args, _ = make_inputs(rng, B=1, T=8, H=2, K=128, V=v_dim, gate_mode="safe")
    q, v = jnp.asarray(args[0], jnp.bfloat16), jnp.asarray(args[2], jnp.bfloat16)
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=match):
        ops._choose_impl(impl, q, v, None)


@pytest.mark.parametrize("warps,v_dim", [("1", 16), ("2", 64), ("4", 64), ("8", 128), ("", 48)])
def test_valid_cuda_overrides_pass(rng, monkeypatch, warps, v_dim):
    from jax_flashkda import ops

    monkeypatch.setattr(ops, "_cuda_reason", lambda q, v, cu: None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("JAX_FLASHKDA_FWD_WARPS", warps)
    monkeypatch.setenv("JAX_FLASHKDA_BWD_CHAINS", "2x4x3")
    q = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
    v = jnp.zeros((1, 8, 2, v_dim), jnp.bfloat16)
    assert ops._choose_impl("cuda", q, v, None) == "cuda"
