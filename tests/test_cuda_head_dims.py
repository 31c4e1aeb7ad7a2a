"""Head dims through the public op on the CUDA target: every K = V the extension's forward
takes (`ops.cuda_head_dims()`, from the kernels' own checks), forward and gradients against the
float64 token recurrence. Where the CUDA backward refuses a head dim, impl="auto" takes the
chunked backward after the CUDA forward, and impl="cuda" refuses the gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import float64_on_cpu, make_inputs, rel_err
from jax_flashkda import kda, ops

pytestmark = pytest.mark.gpu

FWD_DIMS = ops.cuda_head_dims()
BWD_DIMS = ops.cuda_head_dims(backward=True)


def _bf16(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def _case(rng, d, gate_mode="safe"):
    args, kwargs = make_inputs(rng, B=1, T=0, H=2, K=d, V=d, gate_mode=gate_mode,
                               seqlens=[70, 0, 33])
    return [_bf16(a) if i < 3 else a for i, a in enumerate(args)], kwargs


def _loss(impl, dtype, kwargs):
    static = {n: x for n, x in kwargs.items() if n != "initial_state"}

    def loss(q, k, v, g, beta, h0, wo, wf):
        o, final = kda(q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta,
                       initial_state=h0, impl=impl, **static)
        return jnp.sum(o.astype(wo.dtype) * wo) + jnp.sum(final.astype(wf.dtype) * wf)
    return loss


def _grads(args, kwargs, impl, dtype, wo, wf):
    f = jax.jit(jax.value_and_grad(_loss(impl, dtype, kwargs), argnums=tuple(range(6))))
    return f(*args, kwargs["initial_state"], wo, wf)


@pytest.mark.parametrize("d", FWD_DIMS)
@pytest.mark.parametrize("gate_mode", ["log_decay", "safe"])
def test_forward_every_head_dim(rng, d, gate_mode):
    args, kwargs = _case(rng, d, gate_mode)
    x = [jnp.asarray(a, jnp.bfloat16 if i < 3 else jnp.float32) for i, a in enumerate(args)]
    o, final = kda(*x, impl="cuda", **kwargs)
    with float64_on_cpu():
        o_ref, f_ref = kda(*[np.asarray(a, np.float64) for a in args], impl="recurrent",
                           **{n: (np.asarray(v, np.float64) if isinstance(v, np.ndarray)
                                  and v.dtype.kind == "f" else v) for n, v in kwargs.items()})
    assert rel_err(o.astype(jnp.float32), o_ref) < 8e-3
    assert rel_err(final, f_ref) < 8e-3


@pytest.mark.parametrize("d", FWD_DIMS)
def test_gradients_every_head_dim(rng, d):
    args, kwargs = _case(rng, d)
    wrng = np.random.default_rng(d)
    wo = wrng.standard_normal((1, 103, 2, d)).astype(np.float32)
    wf = wrng.standard_normal(kwargs["initial_state"].shape).astype(np.float32)
    _, got = _grads([jnp.asarray(a) for a in args], kwargs, "auto", jnp.bfloat16,
                    jnp.asarray(wo), jnp.asarray(wf))
    with float64_on_cpu():
        kw64 = {n: (np.asarray(v, np.float64) if isinstance(v, np.ndarray)
                    and v.dtype.kind == "f" else v) for n, v in kwargs.items()}
        _, want = _grads([np.asarray(a, np.float64) for a in args], kw64, "recurrent",
                         jnp.float64, wo.astype(np.float64), wf.astype(np.float64))
    for name, x, y in zip(("q", "k", "v", "g", "beta", "h0"), got, want):
        assert rel_err(np.asarray(x, np.float32), y) < 2e-2, (d, name, rel_err(x, y))
    # Which backward ran: the CUDA target's where it takes the head dim, else the chunked path.
    lowered = jax.jit(jax.grad(_loss("auto", jnp.bfloat16, kwargs), argnums=tuple(range(6)))).lower(
        *[jnp.asarray(a) for a in args], kwargs["initial_state"], wo, wf).as_text()
    assert ("jax_flashkda_bwd" in lowered) == (d in BWD_DIMS)
    if d not in BWD_DIMS:
        with pytest.raises(ValueError, match="the CUDA backward cannot run this call"):
            _grads([jnp.asarray(a) for a in args], kwargs, "cuda", jnp.bfloat16,
                   jnp.asarray(wo), jnp.asarray(wf))


def test_head_dims_come_from_the_extension():
    assert 128 in FWD_DIMS and {64, 128} <= set(BWD_DIMS)
    assert set(BWD_DIMS) <= set(FWD_DIMS)
    for d in (32, 256):
        if d not in FWD_DIMS:
            assert ops.cuda_unavailable_reason(jnp.bfloat16, d, d)
