"""Sequence parallelism: the token axis split over 4 host devices gives the unsplit answer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from inputs import make_inputs, rel_err
from jax_flashkda import kda
from jax_flashkda.parallel import kda_sequence_sharded

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices")


def _sharded(static, impl):
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    tok = P(None, "seq")

    def block(q, k, v, g, beta, A_log, dt_bias, h0):
        return kda_sequence_sharded(q, k, v, g, beta, axis_name="seq", A_log=A_log,
                                    dt_bias=dt_bias, initial_state=h0, impl=impl, **static)

    return jax.shard_map(block, mesh=mesh, in_specs=(tok,) * 5 + (P(),) * 3,
                         out_specs=(tok, P()), check_vma=False)


@pytest.mark.parametrize("impl", ["chunked", "ffi"])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_sequence_sharded_matches_whole(rng, impl, state_v_first):
    if impl == "ffi" and jax.default_backend() != "cpu":
        pytest.skip("the C++ target runs on CPU")
    args, kwargs = make_inputs(rng, B=2, T=36, H=2, gate_mode="safe",
                               state_v_first=state_v_first)
    arrays = [jnp.asarray(a) for a in args]
    params = [jnp.asarray(kwargs.pop(n)) for n in ("A_log", "dt_bias", "initial_state")]
    kwargs.pop("output_final_state")
    static = dict(kwargs, output_final_state=True)
    fn = _sharded(static, impl)
    o, ht = jax.jit(fn)(*arrays, *params)

    def whole(impl_whole, *a):
        return kda(*a[:5], A_log=a[5], dt_bias=a[6], initial_state=a[7], impl=impl_whole,
                   **static)

    o_ref, ht_ref = whole("recurrent", *arrays, *params)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(ht, ht_ref) < 1e-4

    w_o = jnp.asarray(rng.standard_normal(o_ref.shape), jnp.float32)
    w_h = jnp.asarray(rng.standard_normal(ht_ref.shape), jnp.float32)

    def loss(f):
        def run(*a):
            o, ht = f(*a)
            return jnp.sum(o * w_o) + jnp.sum(ht * w_h)
        return run

    grads = jax.jit(jax.grad(loss(fn), argnums=tuple(range(8))))(*arrays, *params)
    expected = jax.grad(loss(lambda *a: whole("chunked", *a)), argnums=tuple(range(8)))(
        *arrays, *params)
    for name, got, want in zip(("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0"),
                               grads, expected):
        assert rel_err(got, want) < 1e-4, name
