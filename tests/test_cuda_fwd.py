"""The Hopper CUDA forward (`jax_flashkda_fwd`, platform CUDA) called directly through
`jax.ffi.ffi_call`, against the suite's float64 oracle (tests/oracle.py)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from inputs import KERNEL_OPERANDS, kernel_inputs, rel_err
from oracle import oracle

pytestmark = pytest.mark.gpu

_TARGET = "jax_flashkda_fwd"
_registered = False


def _ensure_target():
    global _registered
    if _registered:
        return
    try:
        from jax_flashkda import _kda_cuda
    except ImportError as e:
        pytest.skip(f"jax_flashkda._kda_cuda did not load: {e}")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("no CUDA device")
    try:
        jax.ffi.register_ffi_target(_TARGET, _kda_cuda.registrations()[_TARGET], platform="CUDA")
    except Exception as e:  # the package itself may have registered the same handler first
        if "already" not in str(e).lower() and "duplicate" not in str(e).lower():
            raise
    _registered = True


def cuda_fwd(q, k, v, g, beta, A_log, dt_bias, h0, cu, *, scale, l2norm, beta_sigmoid,
             gate_mode, lower_bound, v_first, varlen):
    _ensure_target()
    out = (jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(h0.shape, jnp.float32))
    call = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")
    return call(q, k, v, g, beta, A_log, dt_bias, h0, cu, scale=np.float32(scale),
                use_qk_l2norm=bool(l2norm), use_beta_sigmoid=bool(beta_sigmoid),
                gate_mode=np.int32(gate_mode), lower_bound=np.float32(lower_bound),
                state_v_first=bool(v_first), is_varlen=bool(varlen))


def reference(q, k, v, g, beta, A_log, dt_bias, h0, cu, *, scale, l2norm, beta_sigmoid,
              gate_mode, lower_bound, v_first, varlen):
    """The suite's float64 oracle (tests/oracle.py) for one raw call: o and the final state in
    the call's layout."""
    gate = gate_mode > 0
    kw = dict(scale=scale, use_qk_l2norm_in_kernel=l2norm, use_beta_sigmoid_in_kernel=beta_sigmoid,
              state_v_first=v_first, use_gate_in_kernel=gate,
              lower_bound=lower_bound if gate_mode == 2 else None,
              A_log=A_log if gate else None, dt_bias=dt_bias if gate else None,
              initial_state=h0, cu_seqlens=cu if varlen else None)
    return oracle((q, k, v, g, beta), kw)


def make_case(rng, *, B=1, T=40, H=2, K=128, V=128, dtype=jnp.bfloat16, gate_mode=2,
              g_dtype=jnp.float32, beta_dtype=jnp.float32, l2norm=True, beta_sigmoid=True,
              v_first=False, seqlens=None, tail=0, extreme=False, lower_bound=-5.0):
    """The operands of one call, from tests/inputs.py (A_log and dt_bias for every gate mode;
    cu_seqlens [0] when not varlen), and its attributes."""
    x = kernel_inputs(rng, B=B, T=T, H=H, K=K, V=V, gate_mode=gate_mode, dtype=dtype,
                      g_dtype=g_dtype, beta_dtype=beta_dtype, l2norm=l2norm,
                      beta_sigmoid=beta_sigmoid, v_first=v_first, seqlens=seqlens, tail=tail,
                      extreme=extreme, always_gate_params=True)
    cu = x.get("cu_seqlens", np.zeros((1,), np.int32))
    arrays = tuple(jnp.asarray(x[n]) for n in KERNEL_OPERANDS) + (jnp.asarray(cu),)
    attrs = dict(scale=K ** -0.5, l2norm=l2norm, beta_sigmoid=beta_sigmoid, gate_mode=gate_mode,
                 lower_bound=lower_bound, v_first=v_first, varlen=seqlens is not None)
    return arrays, attrs


def check(arrays, attrs, o_tol=6e-3, s_tol=5e-3):
    o, st = cuda_fwd(*arrays, **attrs)
    o, st = np.asarray(o.astype(jnp.float32)), np.asarray(st)
    assert np.isfinite(o).all() and np.isfinite(st).all()
    ref_o, ref_s = reference(*(np.asarray(a.astype(jnp.float32)) if a.dtype != jnp.int32 else
                               np.asarray(a) for a in arrays), **attrs)
    if attrs["varlen"]:
        end = int(arrays[8][-1])
        assert (o[:, end:] == 0).all(), "tokens past the last sequence must get o = 0"
        o, ref_o = o[:, :end], ref_o[:, :end]
    eo, es = rel_err(o, ref_o), rel_err(st, ref_s)
    assert eo <= o_tol, f"o rel err {eo:.2e}"
    assert es <= s_tol, f"final state rel err {es:.2e}"
    return eo, es


@pytest.mark.parametrize("gate_mode", [0, 1, 2])
@pytest.mark.parametrize("T", [1, 16, 45])
def test_gate_modes(rng, gate_mode, T):
    check(*make_case(rng, B=2, T=T, H=3, gate_mode=gate_mode))


@pytest.mark.parametrize("gate_mode", [0, 1])
def test_extreme_decays(rng, gate_mode):
    arrays, attrs = make_case(rng, T=70, H=2, gate_mode=gate_mode, extreme=True)
    if gate_mode == 0:
        assert float(jnp.min(arrays[3])) == -1000.0
    check(arrays, attrs)


def test_safe_gate_other_bound(rng):
    check(*make_case(rng, T=50, gate_mode=2, lower_bound=-9.0))  # outside the fast path


@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("l2norm,beta_sigmoid", [(True, True), (False, False)])
def test_flags_and_layouts(rng, v_first, l2norm, beta_sigmoid):
    check(*make_case(rng, B=2, T=33, H=2, v_first=v_first, l2norm=l2norm,
                     beta_sigmoid=beta_sigmoid))


def test_varlen_with_empty_sequences(rng):
    arrays, attrs = make_case(rng, H=2, seqlens=[0, 17, 0, 40, 5, 16, 0], tail=9)
    check(arrays, attrs)
    o, st = cuda_fwd(*arrays, **attrs)
    h0 = np.asarray(arrays[7])
    for n in (0, 2, 6):  # an empty sequence hands its initial state through
        np.testing.assert_array_equal(np.asarray(st)[n], h0[n])


@pytest.mark.parametrize("dtype,g_dtype,beta_dtype", [
    (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.float32, jnp.float16),
])
def test_dtypes(rng, dtype, g_dtype, beta_dtype):
    check(*make_case(rng, B=1, T=37, H=2, dtype=dtype, g_dtype=g_dtype, beta_dtype=beta_dtype))


# JAX_FLASHKDA_FWD_WARPS must divide V / 16: 8 warps need V = 128 (at V = 64 the kernel would
# ignore it and run its own choice; kda refuses it, see test_api.py).
@pytest.mark.parametrize("warps,kv", [(w, kv) for kv in (64, 128) for w in ("1", "2", "4", "8")
                                      if (kv // 16) % int(w) == 0])
def test_value_blocks_and_head_dims(rng, monkeypatch, warps, kv):
    from jax_flashkda.ops import check_cuda_overrides
    monkeypatch.setenv("JAX_FLASHKDA_FWD_WARPS", warps)
    check_cuda_overrides(kv)  # the override is one the kernel takes, not a silent fallback
    check(*make_case(rng, B=2, T=70, H=3, K=kv, V=kv, gate_mode=int(warps) % 3))


def test_long_sequence(rng):
    check(*make_case(rng, B=1, T=600, H=2, gate_mode=2), o_tol=8e-3, s_tol=8e-3)


def test_deterministic(rng):
    arrays, attrs = make_case(rng, B=2, T=100, H=4, gate_mode=2)
    o1, s1 = cuda_fwd(*arrays, **attrs)
    o2, s2 = cuda_fwd(*arrays, **attrs)
    assert np.array_equal(np.asarray(o1), np.asarray(o2))
    assert np.array_equal(np.asarray(s1), np.asarray(s2))


def test_bad_input_is_an_error_not_a_crash(rng):
    arrays, attrs = make_case(rng, T=20, K=128, V=128)
    q = arrays[0].astype(jnp.float32)
    with pytest.raises(Exception, match=r"jax_flashkda_fwd \(CUDA\): k must have the dtype of q"):
        jax.block_until_ready(cuda_fwd(q, *arrays[1:], **attrs))
    qkv32 = tuple(a.astype(jnp.float32) for a in arrays[:3])
    with pytest.raises(Exception, match=r"jax_flashkda_fwd \(CUDA\): q must be bfloat16 or "
                                        "float16 on the CUDA target"):
        jax.block_until_ready(cuda_fwd(*qkv32, *arrays[3:], **attrs))
    arrays96, attrs96 = make_case(rng, T=20, K=96, V=96)
    with pytest.raises(Exception, match=r"jax_flashkda_fwd \(CUDA\): the CUDA target supports "
                                        "K = 64 or 128 only"):
        jax.block_until_ready(cuda_fwd(*arrays96, **attrs96))
