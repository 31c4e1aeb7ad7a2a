"""The compiled (FFI) path under jit, grad, vmap, shard_map and sharded jit.

On CPU these run the C++ target through the same custom_vjp / custom_vmap /
custom_partitioning stack as the CUDA target, so CI exercises the real plumbing.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from inputs import make_inputs, rel_err
from jax_flashkda import _ffi, kda, ops

on_cpu = jax.default_backend() == "cpu"
if os.environ.get("CI") and on_cpu:
    # CI must exercise the FFI path: a missing CPU target is a failure there, not a skip.
    assert ops._cpu_target_ready(), "the C++ CPU target did not build or register"
pytestmark = pytest.mark.skipif(
    not (on_cpu and ops._cpu_target_ready()), reason="needs the C++ CPU target on a CPU backend")

DIFF_ARGS = ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state")


def _split(args, kwargs):
    """Differentiable arrays as a dict; the rest stays static."""
    arrays = dict(zip(("q", "k", "v", "g", "beta"), map(jnp.asarray, args)))
    static = {}
    for name, value in kwargs.items():
        if name in DIFF_ARGS:
            arrays[name] = jnp.asarray(value)
        else:
            static[name] = value
    return arrays, static


def _call(arrays, static, impl):
    rest = {n: a for n, a in arrays.items() if n not in ("q", "k", "v", "g", "beta")}
    return kda(arrays["q"], arrays["k"], arrays["v"], arrays["g"], arrays["beta"],
               **rest, **static, impl=impl)


def _loss(arrays, static, impl, weights):
    o, ht = _call(arrays, static, impl)
    return jnp.sum(o * weights[0]) + jnp.sum(ht * weights[1])


def _weights(rng, arrays, static):
    o, ht = _call(arrays, static, "recurrent")
    return (jnp.asarray(rng.standard_normal(o.shape), o.dtype),
            jnp.asarray(rng.standard_normal(ht.shape), jnp.float32))


def _assert_grads_match_chunked(grads, arrays, static, weights):
    """Every gradient against plain autodiff of the chunked path on the same loss."""
    expected = jax.grad(lambda a: _loss(a, static, "chunked", weights))(arrays)
    assert set(grads) == set(expected)
    for name in expected:
        assert rel_err(grads[name], expected[name]) < 1e-4, name


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("gate_mode", ["log_decay", "softplus", "safe"])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_jit_forward_matches_reference(rng, gate_mode, state_v_first):
    args, kwargs = make_inputs(rng, gate_mode=gate_mode, state_v_first=state_v_first)
    arrays, static = _split(args, kwargs)
    o, ht = jax.jit(lambda a: _call(a, static, "ffi"))(arrays)
    o_ref, ht_ref = _call(arrays, static, "recurrent")
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(ht, ht_ref) < 1e-4


@pytest.mark.parametrize("gate_mode", ["log_decay", "softplus", "safe"])
def test_grad_matches_chunked_autodiff(rng, gate_mode):
    args, kwargs = make_inputs(rng, gate_mode=gate_mode)
    arrays, static = _split(args, kwargs)
    weights = _weights(rng, arrays, static)
    grads = jax.jit(jax.grad(lambda a: _loss(a, static, "ffi", weights)))(arrays)
    _assert_grads_match_chunked(grads, arrays, static, weights)


def test_varlen_grad_with_empty_sequence(rng):
    args, kwargs = make_inputs(rng, seqlens=[5, 0, 1, 17], gate_mode="safe")
    arrays, static = _split(args, kwargs)
    weights = _weights(rng, arrays, static)
    o, ht = jax.jit(lambda a: _call(a, static, "ffi"))(arrays)
    o_ref, ht_ref = _call(arrays, static, "recurrent")
    assert rel_err(o, o_ref) < 1e-4 and rel_err(ht, ht_ref) < 1e-4
    np.testing.assert_allclose(ht[1], arrays["initial_state"][1], rtol=0, atol=0)
    grads = jax.grad(lambda a: _loss(a, static, "ffi", weights))(arrays)
    _assert_grads_match_chunked(grads, arrays, static, weights)


def _per_group_inputs(rng, groups):
    """Inputs for `groups` independent calls stacked on a new axis 2 (next to the heads)."""
    args, kwargs = make_inputs(rng, B=2, T=21, H=2 * groups, gate_mode="safe")
    arrays, static = _split(args, kwargs)
    b, t, gh = arrays["q"].shape[:3]
    h = gh // groups
    stacked = {
        "q": arrays["q"].reshape(b, t, groups, h, -1), "k": arrays["k"].reshape(b, t, groups, h, -1),
        "v": arrays["v"].reshape(b, t, groups, h, -1), "g": arrays["g"].reshape(b, t, groups, h, -1),
        "beta": arrays["beta"].reshape(b, t, groups, h),
        "A_log": arrays["A_log"].reshape(groups, h),
        "dt_bias": arrays["dt_bias"].reshape(groups, h, -1),
        "initial_state": arrays["initial_state"].reshape(b, groups, h, *arrays["initial_state"].shape[2:]),
    }
    axes = {"q": 2, "k": 2, "v": 2, "g": 2, "beta": 2, "A_log": 0, "dt_bias": 0, "initial_state": 1}
    return arrays, stacked, axes, static


def test_vmap_over_heads_is_one_call(rng):
    groups = 3
    arrays, stacked, axes, static = _per_group_inputs(rng, groups)

    def per_group(a):
        return _call(a, static, "ffi")

    fn = jax.vmap(per_group, in_axes=(axes,), out_axes=(2, 1))
    o, ht = jax.jit(fn)(stacked)
    o_ref, ht_ref = _call(arrays, static, "recurrent")
    b, t = o_ref.shape[:2]
    assert rel_err(o.reshape(o_ref.shape), o_ref) < 1e-4
    assert rel_err(ht.reshape(ht_ref.shape), ht_ref) < 1e-4
    hlo = _compiled_text(fn, stacked)
    assert hlo.count('custom_call_target="jax_flashkda_fwd"') == 1
    assert "while" not in hlo


def test_vmap_over_batch_and_grad_of_vmap(rng):
    args, kwargs = make_inputs(rng, B=3, gate_mode="softplus")
    arrays, static = _split(args, kwargs)
    # Each mapped call sees a batch of one.
    per_row = {n: (a[:, None] if n != "A_log" and n != "dt_bias" else a) for n, a in arrays.items()}
    axes = {n: (None if n in ("A_log", "dt_bias") else 0) for n in arrays}
    fn = jax.vmap(lambda a: _call(a, static, "ffi"), in_axes=(axes,))
    o, ht = jax.jit(fn)(per_row)
    o_ref, ht_ref = _call(arrays, static, "recurrent")
    assert rel_err(o[:, 0], o_ref) < 1e-4 and rel_err(ht[:, 0], ht_ref) < 1e-4
    assert _compiled_text(fn, per_row).count('custom_call_target="jax_flashkda_fwd"') == 1

    weights = _weights(rng, arrays, static)
    w_rows = (weights[0][:, None], weights[1][:, None])

    def loss_vmapped(a):
        o, ht = fn(a)
        return jnp.sum(o * w_rows[0]) + jnp.sum(ht * w_rows[1])

    grads = jax.jit(jax.grad(loss_vmapped))(per_row)
    expected = jax.grad(lambda a: _loss(a, static, "chunked", weights))(arrays)
    for name in expected:
        got = grads[name][:, 0] if axes[name] == 0 else grads[name]
        assert rel_err(got, expected[name]) < 1e-4, name


def test_vmap_of_grad(rng):
    groups = 2
    arrays, stacked, axes, static = _per_group_inputs(rng, groups)

    def per_group_loss(a):
        o, ht = _call(a, static, "ffi")
        return jnp.sum(jnp.sin(o)) + jnp.sum(ht ** 2)

    grads = jax.jit(jax.vmap(jax.grad(per_group_loss), in_axes=(axes,), out_axes=axes))(stacked)

    def total_loss_chunked(a):
        o, ht = _call(a, static, "chunked")
        return jnp.sum(jnp.sin(o)) + jnp.sum(ht ** 2)

    expected = jax.grad(total_loss_chunked)(arrays)
    for name, value in expected.items():
        assert rel_err(grads[name].reshape(value.shape), value) < 1e-4, name


def _mesh():
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    return Mesh(devices, ("data", "model"))


SPECS = {"q": P("data", None, "model", None), "k": P("data", None, "model", None),
         "v": P("data", None, "model", None), "g": P("data", None, "model", None),
         "beta": P("data", None, "model"), "A_log": P("model"), "dt_bias": P("model", None),
         "initial_state": P("data", "model", None, None)}


def _mesh_inputs(rng, gate_mode="safe"):
    args, kwargs = make_inputs(rng, B=4, T=20, H=4, gate_mode=gate_mode)
    return _split(args, kwargs)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 host devices")
def test_shard_map_over_batch_and_heads(rng):
    arrays, static = _mesh_inputs(rng)
    weights = _weights(rng, arrays, static)
    mesh = _mesh()
    out_specs = (P("data", None, "model", None), P("data", "model", None, None))
    fn = jax.shard_map(lambda a: _call(a, static, "ffi"), mesh=mesh, in_specs=(SPECS,),
                       out_specs=out_specs)
    o, ht = jax.jit(fn)(arrays)
    o_ref, ht_ref = _call(arrays, static, "recurrent")
    assert rel_err(o, o_ref) < 1e-4 and rel_err(ht, ht_ref) < 1e-4

    def loss(a):
        o, ht = fn(a)
        return jnp.sum(o * weights[0]) + jnp.sum(ht * weights[1])

    grads = jax.jit(jax.grad(loss))(arrays)
    # A_log and dt_bias are replicated over the data axis: their gradients are summed over it.
    _assert_grads_match_chunked(grads, arrays, static, weights)


@pytest.fixture(params=["shardy", "gspmd"])
def partitioner(request):
    """Each partitioner JAX can use: Shardy (the sharding rule), and GSPMD where
    jax_use_shardy_partitioner=False still selects it (infer_sharding_from_operands)."""
    if request.param == "gspmd" and not _ffi.GSPMD_SELECTABLE:
        pytest.skip(f"jax {jax.__version__} partitions with Shardy alone")
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", request.param == "shardy")
    yield request.param
    jax.config.update("jax_use_shardy_partitioner", previous)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 host devices")
def test_sharded_jit_partitions_without_all_gather(rng, partitioner):
    arrays, static = _mesh_inputs(rng)
    weights = _weights(rng, arrays, static)
    mesh = _mesh()
    sharded = {n: jax.device_put(a, NamedSharding(mesh, SPECS[n])) for n, a in arrays.items()}

    def forward(a):
        return _call(a, static, "ffi")

    def grad_fn(a):
        return jax.grad(lambda a: _loss(a, static, "ffi", weights))(a)

    for fn, target in ((forward, "jax_flashkda_fwd"), (grad_fn, "jax_flashkda_bwd")):
        hlo = _compiled_text(fn, sharded)
        assert "all-gather" not in hlo, fn.__name__
        assert f'custom_call_target="{target}"' in hlo
    o, ht = jax.jit(forward)(sharded)
    o_ref, ht_ref = _call(arrays, static, "recurrent")
    assert rel_err(o, o_ref) < 1e-4 and rel_err(ht, ht_ref) < 1e-4
    assert tuple(o.sharding.spec)[:3] == ("data", None, "model")
    grads = jax.jit(grad_fn)(sharded)
    _assert_grads_match_chunked(grads, arrays, static, weights)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 host devices")
def test_sharded_sequence_axis_is_gathered_and_correct(rng):
    """A sequence-sharded input is gathered along T before the call (documented in README)."""
    arrays, static = _mesh_inputs(rng)
    mesh = _mesh()
    q_spec = P(None, "data", None, None)
    specs = {n: P() for n in arrays}
    specs.update(q=q_spec, k=q_spec, v=q_spec, g=q_spec, beta=P(None, "data", None))
    sharded = {n: jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in arrays.items()}
    fn = lambda a: _call(a, static, "ffi")
    o, ht = jax.jit(fn)(sharded)
    o_ref, ht_ref = _call(arrays, static, "recurrent")
    assert rel_err(o, o_ref) < 1e-4 and rel_err(ht, ht_ref) < 1e-4
    assert "all-gather" in _compiled_text(fn, sharded)
