"""The Flax KimiDeltaAttention layer and the example language model built from it."""

import functools
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_flashkda.nn import KDACache, KimiDeltaAttention

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import kda_lm as lm  # noqa: E402

HIDDEN, HEADS, HEAD_DIM = 32, 2, 16


def make_layer(seed=0, **kwargs):
    layer = KimiDeltaAttention(HIDDEN, HEADS, HEAD_DIM, rngs=nnx.Rngs(seed), **kwargs)
    # Fresh layers have a zero output-gate bias and unit norm weight; perturb every parameter
    # so that a wrong wiring cannot hide behind a symmetric initialisation.
    state = nnx.state(layer, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    nnx.update(layer, jax.tree.unflatten(treedef, leaves))
    return layer


def inputs(b, t, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, t, HIDDEN), jnp.float32)


@nnx.jit(static_argnames="return_cache")
def call(layer, x, cache=None, cu_seqlens=None, return_cache=None):
    return layer(x, cache=cache, cu_seqlens=cu_seqlens, return_cache=return_cache)


def assert_close(actual, expected, tol=2e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-6)
    assert err < tol, f"max error {err:.3e} (relative to max |expected|)"


def assert_cache_close(actual, expected, tol=2e-5):
    for name in KDACache._fields:
        assert_close(getattr(actual, name), getattr(expected, name), tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shape_and_cache(dtype):
    layer = make_layer(dtype=dtype)
    x = inputs(2, 7).astype(dtype)
    y, cache = call(layer, x)
    assert y.shape == x.shape and y.dtype == dtype and cache is None
    y, cache = call(layer, x, return_cache=True)
    assert cache.state.shape == (2, HEADS, HEAD_DIM, HEAD_DIM) and cache.state.dtype == jnp.float32
    assert cache.conv_q.shape == (2, 3, HEADS * HEAD_DIM)
    assert np.isfinite(np.asarray(y, np.float32)).all()


def test_token_by_token_generation_matches_full_sequence():
    layer = make_layer()
    x = inputs(2, 12)
    y_full, cache_full = call(layer, x, return_cache=True)

    cache = layer.init_cache(2)
    steps = []
    for t in range(x.shape[1]):
        y_t, cache = call(layer, x[:, t : t + 1], cache)
        steps.append(y_t)
    assert_close(jnp.concatenate(steps, axis=1), y_full)
    assert_cache_close(cache, cache_full)

    # Prefill a prompt, then continue with the rest in one call.
    y_a, cache_a = call(layer, x[:, :5], return_cache=True)
    y_b, cache_b = call(layer, x[:, 5:], cache_a)
    assert_close(jnp.concatenate([y_a, y_b], axis=1), y_full)
    assert_cache_close(cache_b, cache_full)


def test_jitted_step_with_donated_cache_updates_in_place():
    """A decoding step jitted with the cache donated: XLA accepts every donated buffer (a
    "donated buffers were not usable" warning fails the test), the donated cache is consumed,
    and the steps give the full-sequence forward's outputs and cache."""
    layer = make_layer()
    x = inputs(2, 9)
    y_full, cache_full = call(layer, x, return_cache=True)

    @functools.partial(nnx.jit, donate_argnums=1)
    def step(layer, cache, x_t):
        return layer(x_t, cache=cache)

    y_pre, cache = call(layer, x[:, :4], layer.init_cache(2))   # prefill
    steps = [y_pre]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(4, x.shape[1]):
            old = cache
            y_t, cache = step(layer, cache, x[:, t : t + 1])
            assert all(a.is_deleted() for a in old), "the donated cache was not consumed"
            steps.append(y_t)
    assert_close(jnp.concatenate(steps, axis=1), y_full)
    assert_cache_close(cache, cache_full)


@pytest.mark.parametrize("packed", [False, True])
def test_state_pool_slots(packed):
    """state_indices: each sequence continues from its slot of a pool cache and writes back to
    it; a padding sequence (negative slot) gives y = 0 and writes nothing; other slots keep
    their values."""
    layer = make_layer()
    pool_size, slots = 5, np.array([3, -1, 0], np.int32)
    x1, x2 = inputs(3, 4, seed=1), inputs(3, 2, seed=2)
    # Histories in the pool's slots 3 and 0, from a first call on sequences 0 and 2 alone.
    _, rows = call(layer, x1, return_cache=True)
    pool = jax.tree.map(
        lambda a, full: jnp.asarray(a).at[3].set(full[0]).at[0].set(full[2]),
        jax.tree.map(lambda a: 0.5 + 0.1 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)
                     / a.size, layer.init_cache(pool_size)), rows)
    y_ref, rows_ref = call(layer, x2, rows)
    if packed:
        cu = jnp.array([0, 2, 4, 6], jnp.int32)
        y, new = nnx.jit(lambda l, x, c, s: l(x.reshape(1, -1, HIDDEN), cache=c,
                                               state_indices=s, cu_seqlens=cu))(
            layer, x2, pool, slots)
        y = y.reshape(3, 2, HIDDEN)
    else:
        y, new = nnx.jit(lambda l, x, c, s: l(x, cache=c, state_indices=s))(
            layer, x2, pool, slots)
    assert_close(y[0], y_ref[0])
    assert_close(y[2], y_ref[2])
    np.testing.assert_array_equal(np.asarray(y[1]), 0)
    for name in KDACache._fields:
        got, before, ref = (np.asarray(getattr(c, name)) for c in (new, pool, rows_ref))
        assert_close(got[3], ref[0])
        assert_close(got[0], ref[2])
        for untouched in (1, 2, 4):
            np.testing.assert_array_equal(got[untouched], before[untouched])


def test_packed_sequences_match_separate_calls():
    layer = make_layer()
    # Empty and shorter-than-the-conv sequences exercise the convolution's history handling;
    # lengths repeat so that the per-sequence calls compile only three times.
    bounds = [0, 2, 2, 9, 11, 18]
    cu_seqlens = jnp.array(bounds, jnp.int32)
    x = inputs(1, bounds[-1])
    y1, cache1 = call(layer, x, cu_seqlens=cu_seqlens, return_cache=True)
    y2, cache2 = call(layer, x, cache1, cu_seqlens=cu_seqlens)
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        row = layer.init_cache(1)
        for y_packed, cache_packed in ((y1, cache1), (y2, cache2)):
            # An empty sequence leaves its cache row as it was.
            if e > s:
                y_row, row = call(layer, x[:, s:e], row)
                assert_close(y_packed[:, s:e], y_row)
            assert_cache_close(jax.tree.map(lambda a: a[n : n + 1], cache_packed), row)


def test_gradients_are_finite_and_reach_every_parameter():
    layer = make_layer()
    x = inputs(2, 9)

    def loss(layer, x):
        y, _ = layer(x)
        return jnp.mean(y**2)

    grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, path


def test_training_lowers_loss():
    vocab, batch, seq_len = 16, 8, 32
    model = lm.LM(vocab, hidden=32, layers=1, heads=2, rngs=nnx.Rngs(0))
    optimizer = lm.make_optimizer(model, lr=1e-2, steps=20)
    table = lm.markov_chain(jax.random.key(1), vocab)
    losses = []
    for step in range(20):
        tokens = lm.sample_batch(jax.random.key(step), table, batch, seq_len)
        losses.append(float(lm.train_step(model, optimizer, tokens)))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < losses[0] - 0.2, losses
