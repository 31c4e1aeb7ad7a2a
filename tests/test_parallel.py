"""Sequence parallelism: the token axis split over devices gives the unsplit answer.

On two or more GPUs (marked multi_gpu) the split runs the CUDA kernels over 2 GPUs in bf16 and
is compared with the unsplit CUDA op; on a CPU with 4 host devices it runs the chunked path and
the C++ target in float32 against the token recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from inputs import make_inputs, rel_err
from test_cuda_bwd import grad_errors
from jax_flashkda import kda
from jax_flashkda.parallel import kda_sequence_sharded

GPUS = [d for d in jax.devices() if d.platform == "gpu"]
if len(GPUS) >= 2:
    pytestmark = pytest.mark.multi_gpu
    DEVICES, IMPLS, DTYPE, DIM, TOL = GPUS[:2], ["cuda"], jnp.bfloat16, 128, 2e-2
else:
    pytestmark = pytest.mark.skipif(len(jax.devices()) < 4 or jax.default_backend() != "cpu",
                                    reason="needs 2 GPUs or 4 host devices")
    DEVICES, IMPLS, DTYPE, DIM, TOL = jax.devices()[:4], ["chunked", "ffi"], np.float32, None, 1e-4


def _sharded(static, impl):
    mesh = Mesh(np.array(DEVICES), ("seq",))
    tok = P(None, "seq")

    def block(q, k, v, g, beta, A_log, dt_bias, h0):
        return kda_sequence_sharded(q, k, v, g, beta, axis_name="seq", A_log=A_log,
                                    dt_bias=dt_bias, initial_state=h0, impl=impl, **static)

    return jax.shard_map(block, mesh=mesh, in_specs=(tok,) * 5 + (P(),) * 3,
                         out_specs=(tok, P()), check_vma=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("state_v_first", [False, True])
def test_sequence_sharded_matches_whole(rng, impl, state_v_first):
    dims = {} if DIM is None else dict(K=DIM, V=DIM)
    args, kwargs = make_inputs(rng, B=2, T=36, H=2, gate_mode="safe", dtype=DTYPE,
                               state_v_first=state_v_first, **dims)
    arrays = [jnp.asarray(a) for a in args]
    params = [jnp.asarray(kwargs.pop(n)) for n in ("A_log", "dt_bias", "initial_state")]
    kwargs.pop("output_final_state")
    static = dict(kwargs, output_final_state=True)
    fn = _sharded(static, impl)
    o, ht = jax.jit(fn)(*arrays, *params)

    def whole(impl_whole, *a):
        return kda(*a[:5], A_log=a[5], dt_bias=a[6], initial_state=a[7], impl=impl_whole,
                   **static)

    # On GPUs the unsplit CUDA op (the same bf16 kernels, one pass) is the reference.
    exact = "cuda" if impl == "cuda" else "recurrent"
    o_ref, ht_ref = whole(exact, *arrays, *params)
    assert rel_err(o, o_ref) < TOL and rel_err(ht, ht_ref) < TOL

    w_o = jnp.asarray(rng.standard_normal(o_ref.shape), jnp.float32)
    w_h = jnp.asarray(rng.standard_normal(ht_ref.shape), jnp.float32)

    def loss(f):
        def run(*a):
            o, ht = f(*a)
            return jnp.sum(o * w_o) + jnp.sum(ht * w_h)
        return run

    grads = jax.jit(jax.grad(loss(fn), argnums=tuple(range(8))))(*arrays, *params)
    exact = "cuda" if impl == "cuda" else "chunked"
    expected = jax.grad(loss(lambda *a: whole(exact, *a)), argnums=tuple(range(8)))(
        *arrays, *params)
    names = ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0")
    got = {n: np.asarray(a, np.float64) for n, a in zip(names, grads)}
    want = {n: np.asarray(a, np.float64) for n, a in zip(names, expected)}
    x = {n: np.asarray(a, np.float64) for n, a in zip(names, arrays + params)}
    errs = grad_errors(got, want, x, static)
    assert all(e < TOL for e in errs.values()), errs
