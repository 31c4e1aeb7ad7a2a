"""The example model trained under a sharded jit, and the op inside shard_map, across devices.

On two or more GPUs (marked multi_gpu) this runs the CUDA kernels; on a CPU with 4 host
devices the same tests run the C++ target, so CI covers the plumbing.
"""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from inputs import make_inputs, rel_err
from jax_flashkda import kda
from jax_flashkda import ops
from jax_flashkda.nn import place_params

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from kda_lm import LM, loss_fn, markov_chain, sample_batch  # noqa: E402

GPUS = [d for d in jax.devices() if d.platform == "gpu"]
ON_GPUS = len(GPUS) >= 2
if ON_GPUS:
    pytestmark = pytest.mark.multi_gpu
    IMPL, TOL, MESHES = "cuda", 2e-2, ((2, 1), (1, 2))
else:
    pytestmark = pytest.mark.skipif(
        not (jax.default_backend() == "cpu" and len(jax.devices()) >= 4
             and ops._cpu_target_ready()),
        reason="needs 2 GPUs, or 4 host devices with the C++ target")
    IMPL, TOL, MESHES = "ffi", 1e-4, ((2, 2), (4, 1), (1, 2))


def _mesh(shape):
    devices = np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape)
    return jax.sharding.Mesh(devices, ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _model(shard_axes, dtype):
    return LM(64, 256, 1, 2, dtype=dtype, impl=IMPL, shard_axes=shard_axes, rngs=nnx.Rngs(0))


def _loss_and_grads(model, tokens):
    graphdef, state = nnx.split(model)

    def loss(state):
        return loss_fn(nnx.merge(graphdef, state), tokens)

    return jax.jit(jax.value_and_grad(loss)), state


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"data{s[0]}_model{s[1]}")
def test_sharded_train_step_matches_one_device(shape):
    dtype = jnp.bfloat16 if ON_GPUS else jnp.float32
    tokens = sample_batch(jax.random.key(1), markov_chain(jax.random.key(0), 64), 4, 48)
    step, state = _loss_and_grads(_model(None, dtype), tokens)
    loss_one, grads_one = step(state)

    mesh = _mesh(shape)
    with jax.set_mesh(mesh):
        model = _model(("data", "model"), dtype)
        place_params(model, mesh)
        sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
        step, state = _loss_and_grads(model, sharded_tokens)
        hlo = step.lower(state).compile().as_text()
        loss, grads = step(state)

    # The custom calls see one device's block: batch / data and heads / model.
    b, h = 4 // shape[0], 2 // shape[1]
    for target in ("jax_flashkda_fwd", "jax_flashkda_bwd"):
        calls = [line for line in hlo.splitlines() if f'custom_call_target="{target}"' in line]
        assert calls, target
        for line in calls:
            # The first result (o, or dq) is [B, T, H, D] of the block the call ran on.
            first = re.search(r"= \((?:f32|bf16|f16)\[(\d+),47,(\d+),128\]", line)
            assert first and (int(first[1]), int(first[2])) == (b, h), line[:200]
    # Tensor-parallel weights (nn.place_params): nothing is gathered, forward or backward.
    gathers = [line.strip()[:160] for line in hlo.splitlines() if "all-gather" in line]
    assert not gathers, gathers
    assert abs(float(loss) - float(loss_one)) < TOL * abs(float(loss_one))
    flat = jax.tree.leaves(grads)
    flat_one = jax.tree.leaves(grads_one)
    for g, g_one in zip(flat, flat_one):
        assert rel_err(g, g_one) < (5 * TOL if ON_GPUS else TOL)


def test_shard_map_forward_and_backward_match_one_device(rng):
    n = 2 if ON_GPUS else 4
    dtype = jnp.bfloat16 if ON_GPUS else np.float32
    args, kwargs = make_inputs(rng, B=n, T=40, H=2, K=128, V=128, gate_mode="safe",
                               dtype=np.float32)
    arrays = [jnp.asarray(a, dtype) for a in args]
    params = [jnp.asarray(kwargs.pop(name)) for name in ("A_log", "dt_bias", "initial_state")]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))
    row = P("data")

    def run(*a):
        return kda(*a[:5], A_log=a[5], dt_bias=a[6], initial_state=a[7], impl=IMPL, **kwargs)

    sharded = jax.shard_map(run, mesh=mesh, in_specs=(row,) * 5 + (P(), P(), row),
                            out_specs=(row, row))
    w = jnp.asarray(rng.standard_normal((n, 40, 2, 128)), jnp.float32)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32) * w) + jnp.sum(fn(*a)[1])

    o, ht = jax.jit(sharded)(*arrays, *params)
    o_one, ht_one = jax.jit(run)(*arrays, *params)
    assert rel_err(o, o_one) < TOL and rel_err(ht, ht_one) < TOL
    grads = jax.jit(jax.grad(loss(sharded), argnums=tuple(range(8))))(*arrays, *params)
    grads_one = jax.jit(jax.grad(loss(run), argnums=tuple(range(8))))(*arrays, *params)
    for g, g_one in zip(grads, grads_one):
        assert rel_err(g, g_one) < TOL
