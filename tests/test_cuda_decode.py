"""The Hopper decode kernel (`jax_flashkda_decode`): the state read and written in place, plain
or through a state pool (docs/decode.md), against a float64 token loop; and `kda` routing
generation-sized calls to it."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import test_cuda_fwd
from inputs import rel_err
from oracle import pool_oracle

pytestmark = pytest.mark.gpu


def _decode(arrays, attrs, state, indices=None, accepted=None):
    from jax_flashkda import _ffi

    cfg = _ffi.CallConfig(scale=attrs["scale"], use_qk_l2norm=attrs["l2norm"],
                          use_beta_sigmoid=attrs["beta_sigmoid"], gate_mode=attrs["gate_mode"],
                          lower_bound=attrs["lower_bound"], state_v_first=attrs["v_first"],
                          is_varlen=attrs["varlen"])
    rank = 0 if indices is None else np.ndim(indices)
    dcfg = _ffi.DecodeConfig(cfg, index_rank=rank, num_accepted=accepted is not None)
    dummy = jnp.zeros((1,), jnp.int32)
    idx = dummy if indices is None else jnp.asarray(indices, jnp.int32)
    acc = dummy if accepted is None else jnp.asarray(accepted, jnp.int32)
    q, k, v, g, beta, A_log, dt_bias, _, cu = arrays
    run = jax.jit(lambda *a: _ffi._decode_raw(dcfg, *a))
    o, st = run(q, k, v, g, beta, A_log, dt_bias, jnp.asarray(state, jnp.float32), cu, idx, acc)
    return np.asarray(o.astype(jnp.float32)), np.asarray(st)


def _numpy(arrays):
    return [np.asarray(a.astype(jnp.float32)) if a.dtype != jnp.int32 else np.asarray(a)
            for a in arrays]


def pool_reference(arrays, attrs, pool, indices, accepted):
    """o and the updated pool by the float64 oracle of docs/decode.md (oracle.pool_oracle)."""
    x = _numpy(arrays)
    kw = dict(use_qk_l2norm_in_kernel=attrs["l2norm"],
              use_beta_sigmoid_in_kernel=attrs["beta_sigmoid"],
              use_gate_in_kernel=attrs["gate_mode"] != 0, A_log=x[5], dt_bias=x[6],
              lower_bound=attrs["lower_bound"] if attrs["gate_mode"] == 2 else None,
              state_v_first=attrs["v_first"], initial_state=pool,
              cu_seqlens=x[8] if attrs["varlen"] else None)
    return pool_oracle(x[:5], kw, indices, accepted)


@pytest.mark.parametrize("gate_mode", [0, 1, 2])
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("kv", [64, 128])
def test_plain_against_float64(rng, gate_mode, T, kv):
    arrays, attrs = test_cuda_fwd.make_case(rng, B=3, T=T, H=2, K=kv, V=kv, gate_mode=gate_mode)
    o, st = _decode(arrays, attrs, arrays[7])
    ref_o, ref_s = test_cuda_fwd.reference(*_numpy(arrays), **attrs)
    assert rel_err(o, ref_o) <= 6e-3 and rel_err(st, ref_s) <= 5e-3


@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("l2norm,beta_sigmoid", [(True, True), (False, False)])
def test_flags_layouts_dtypes(rng, v_first, l2norm, beta_sigmoid):
    for dtype, g_dtype in ((jnp.bfloat16, jnp.float32), (jnp.float16, jnp.bfloat16)):
        arrays, attrs = test_cuda_fwd.make_case(rng, B=2, T=5, H=3, v_first=v_first,
                                                l2norm=l2norm, beta_sigmoid=beta_sigmoid,
                                                dtype=dtype, g_dtype=g_dtype)
        o, st = _decode(arrays, attrs, arrays[7])
        ref_o, ref_s = test_cuda_fwd.reference(*_numpy(arrays), **attrs)
        assert rel_err(o, ref_o) <= 6e-3 and rel_err(st, ref_s) <= 5e-3


def test_varlen_outside_tokens_and_empty_sequences(rng):
    arrays, attrs = test_cuda_fwd.make_case(rng, H=2, seqlens=[0, 3, 1, 0, 16], tail=4)
    cu = np.asarray(arrays[8]).copy()
    cu[:2] = 2  # tokens 0-1 belong to no sequence (legal offsets need not start at 0)
    arrays = arrays[:8] + (jnp.asarray(cu),)
    o, st = _decode(arrays, attrs, arrays[7])
    ref_o, ref_s = test_cuda_fwd.reference(*_numpy(arrays), **attrs)
    assert (o[:, :2] == 0).all() and (o[:, int(cu[-1]):] == 0).all()
    assert rel_err(o, ref_o) <= 6e-3 and rel_err(st, ref_s) <= 5e-3
    np.testing.assert_array_equal(st[3], np.asarray(arrays[7])[3])  # empty: state unchanged


@pytest.mark.parametrize("v_first", [False, True])
def test_pool_one_slot_per_sequence(rng, v_first):
    arrays, attrs = test_cuda_fwd.make_case(rng, B=4, T=2, H=2, v_first=v_first)
    pool = 0.3 * rng.standard_normal((9,) + arrays[7].shape[1:])
    indices = np.array([7, -1, 2, 12])  # -1 and 12 (>= P) are padding
    o, st = _decode(arrays, attrs, pool, indices)
    ref_o, ref_pool = pool_reference(arrays, attrs, pool, indices, None)
    assert (o[1] == 0).all() and (o[3] == 0).all()
    assert rel_err(o, ref_o) <= 6e-3 and rel_err(st, ref_pool) <= 5e-3
    untouched = [i for i in range(9) if i not in (7, 2)]
    np.testing.assert_array_equal(st[untouched], pool[untouched].astype(np.float32))


@pytest.mark.parametrize("with_accepted", [False, True])
def test_pool_slot_per_token(rng, with_accepted):
    arrays, attrs = test_cuda_fwd.make_case(rng, H=2, seqlens=[4, 1, 3, 0])
    pool = 0.3 * rng.standard_normal((20,) + arrays[7].shape[1:])
    indices = np.array([[0, 1, 2, 3], [4, -1, -1, -1], [5, 6, 7, 19], [8, 9, 10, 11]])
    accepted = np.array([3, 1, 9, 0]) if with_accepted else None  # 9 and 0 are clipped
    o, st = _decode(arrays, attrs, pool, indices, accepted)
    ref_o, ref_pool = pool_reference(arrays, attrs, pool, indices, accepted)
    assert rel_err(o, ref_o) <= 6e-3 and rel_err(st, ref_pool) <= 5e-3


@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("V", [80, 42])
def test_value_columns_partly_outside_the_state(rng, v_first, V):
    """V = 80: the last warp's 16 columns lie partly outside the state (its lanes there load
    zeros and store nothing); V = 42 (not a multiple of 4) also takes the [K,V] layout's
    float-at-a-time accesses. Over varlen sequences of 0 to 16 tokens (an empty one among
    them)."""
    arrays, attrs = test_cuda_fwd.make_case(rng, H=3, K=128, V=V, seqlens=[2, 0, 16, 1],
                                            v_first=v_first)
    o, st = _decode(arrays, attrs, arrays[7])
    ref_o, ref_s = test_cuda_fwd.reference(*_numpy(arrays), **attrs)
    assert rel_err(o, ref_o) <= 6e-3 and rel_err(st, ref_s) <= 5e-3
    np.testing.assert_array_equal(st[1], np.asarray(arrays[7])[1])  # empty: state unchanged


def test_quarantine_is_causal(rng):
    arrays, attrs = test_cuda_fwd.make_case(rng, B=2, T=6, H=2)
    q, k, v = (np.array(a.astype(jnp.float32)) for a in arrays[:3])
    k[0, 3, 1, 5] = np.nan       # head 1 of sequence 0 dies at token 3
    v[1, 2, 0, 7] = np.inf       # column 7 of head 0 of sequence 1 dies at token 2
    bad = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16))
    o, st = _decode(bad + arrays[3:], attrs, arrays[7])
    clean_o, _ = _decode(arrays, attrs, arrays[7])
    np.testing.assert_array_equal(o[0, :3], clean_o[0, :3])
    assert np.isnan(o[0, 3:, 1]).all() and np.isnan(st[0, 1]).all()
    np.testing.assert_array_equal(o[0, :, 0], clean_o[0, :, 0])
    assert np.isnan(o[1, 2:, 0, 7]).all() and np.isnan(st[1, 0, :, 7]).all()
    others = np.delete(o[1, :, 0], 7, axis=-1)
    np.testing.assert_array_equal(others, np.delete(clean_o[1, :, 0], 7, axis=-1))
    assert np.isfinite(np.delete(st[1, 0], 7, axis=-1)).all()


def test_kda_takes_the_decode_kernel_and_differentiates(rng):
    from jax_flashkda import kda

    arrays, attrs = test_cuda_fwd.make_case(rng, B=4, T=2, H=2, gate_mode=2)
    q, k, v, g, beta, A_log, dt_bias, h0, _ = arrays

    def f(q, k, v, h0):
        o, ht = kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, initial_state=h0,
                    output_final_state=True, use_qk_l2norm_in_kernel=True,
                    use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, lower_bound=-5.0,
                    impl="cuda")
        return o, ht

    assert "jax_flashkda_decode" in jax.jit(f).lower(q, k, v, h0).as_text()
    o, ht = jax.jit(f)(q, k, v, h0)
    ref_o, ref_s = test_cuda_fwd.reference(*_numpy(arrays), **attrs)
    assert rel_err(np.asarray(o.astype(jnp.float32)), ref_o) <= 6e-3
    assert rel_err(np.asarray(ht), ref_s) <= 5e-3

    def loss(impl):
        def run(q, k, v, h0):
            o, ht = kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, initial_state=h0,
                        output_final_state=True, use_qk_l2norm_in_kernel=True,
                        use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                        lower_bound=-5.0, impl=impl)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(ht ** 2)
        return jax.jit(jax.grad(run, argnums=(0, 1, 2, 3)))

    got = loss("cuda")(q, k, v, h0)
    want = loss("chunked")(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), h0)
    for a, b in zip(got, want):
        assert rel_err(np.asarray(a.astype(jnp.float32)), np.asarray(b)) <= 2e-2


def test_donated_state_is_updated_in_place(rng):
    from jax_flashkda import kda

    arrays, attrs = test_cuda_fwd.make_case(rng, B=2, T=1, H=2, gate_mode=0)
    q, k, v, g, beta, _, _, h0, _ = arrays

    @jax.jit
    def step(h0):
        return kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                   use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, impl="cuda")

    donated = jax.jit(step, donate_argnums=0)
    state = jnp.array(h0)
    pointer = state.unsafe_buffer_pointer()
    o, ht = donated(state)
    assert ht.unsafe_buffer_pointer() == pointer, "the final state must reuse the donated buffer"
    ref_o, ref_s = test_cuda_fwd.reference(*_numpy(arrays), **attrs)
    assert rel_err(np.asarray(ht), ref_s) <= 5e-3


@pytest.mark.parametrize("rank", [1, 2])
def test_kda_pool_calls_run_the_kernel_and_match_the_definition(rng, rank):
    from jax_flashkda import kda

    arrays, attrs = test_cuda_fwd.make_case(rng, H=2, seqlens=[2, 1, 0, 3], gate_mode=1)
    q, k, v, g, beta, A_log, dt_bias, _, cu = arrays
    pool = jnp.asarray(0.3 * rng.standard_normal((9,) + arrays[7].shape[1:]), jnp.float32)
    if rank == 1:
        indices, accepted = jnp.asarray([5, -1, 2, 8], jnp.int32), None
    else:
        indices = jnp.asarray([[0, 1, 2], [3, -1, -1], [4, 4, 4], [5, 6, 7]], jnp.int32)
        accepted = jnp.asarray([2, 1, 3, 1], jnp.int32)

    def run(impl, q, k, v, pool):
        return kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, initial_state=pool,
                   output_final_state=True, use_qk_l2norm_in_kernel=True,
                   use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, cu_seqlens=cu,
                   state_indices=indices, num_accepted_tokens=accepted, impl=impl)

    assert "jax_flashkda_decode" in jax.jit(lambda *a: run("cuda", *a)).lower(q, k, v, pool).as_text()
    o, new_pool = jax.jit(lambda *a: run("cuda", *a))(q, k, v, pool)
    f32 = lambda x: x.astype(jnp.float32)
    ref_o, ref_pool = jax.jit(lambda *a: run("recurrent", *a))(f32(q), f32(k), f32(v), pool)
    assert rel_err(np.asarray(f32(o)), np.asarray(ref_o)) <= 6e-3
    assert rel_err(np.asarray(new_pool), np.asarray(ref_pool)) <= 5e-3

    def loss(impl):
        def f(q, k, v, pool):
            o, new_pool = run(impl, q, k, v, pool)
            return jnp.sum(f32(o) ** 2) + jnp.sum(new_pool ** 2)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    got = loss("cuda")(q, k, v, pool)
    want = loss("recurrent")(f32(q), f32(k), f32(v), pool)
    for a, b in zip(got, want):
        assert rel_err(np.asarray(f32(a)), np.asarray(b)) <= 2e-2
