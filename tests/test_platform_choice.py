"""Kernels are chosen by the platform a computation is lowered for, not by the process.

`kda` picks the CUDA target's decode kernel, split forward or chunked fallbacks only for the
CUDA lowering (jax.lax.platform_dependent); lowered for the CPU the same call takes the C++
target. Seen through `jax.export`, which lowers for a platform the process need not have: in a
CPU process with the CUDA extension loaded (it is built wherever nvcc is, CI included) an
export for CUDA holds the CUDA choices and one for the CPU the C++ target's calls, and a module
exported for both runs on the CPU with the C++ target's answers. Marked gpu: a computation
placed on the CPU of a GPU process (which used to reach the CUDA-only decode target and fail).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashkda import _ffi, kda, split
from jax_flashkda.ops import _cpu_target_ready
from oracle import oracle
from inputs import make_inputs, rel_err

FWD, BWD, DECODE = _ffi.FWD_TARGET, _ffi.BWD_TARGET, _ffi.DECODE_TARGET
DISABLED = [jax.export.DisabledSafetyCheck.custom_call(t)
            for t in (FWD, BWD, DECODE, _ffi.FWD_SPLIT_TARGET, _ffi.BWD_SPLIT_TARGET)]

needs_both_targets = pytest.mark.skipif(
    _ffi.load_error("CUDA") is not None or not _cpu_target_ready(),
    reason="needs the C++ target and the CUDA extension loaded (built where nvcc is)")


def call(args, kwargs):
    """f(q, k, v, g, beta, h0) = kda(...) with the other keywords (NumPy: constants that follow
    the computation to whichever device it runs on), and its arguments as JAX arrays."""
    def f(q, k, v, g, beta, h0):
        return kda(q, k, v, g, beta, **dict(kwargs, initial_state=h0))
    return f, tuple(jnp.asarray(a) for a in (*args, kwargs["initial_state"]))


def cotangents(o_shape, final_shape):
    return (np.linspace(-1.0, 1.0, int(np.prod(o_shape))).reshape(o_shape),
            np.full(final_shape, 0.5))


def loss_grad(f):
    """The gradients of <o, do> + <final, dfinal> in q, k, v, g, beta, h0."""
    def loss(*x):
        o, final = f(*x)
        do, dfinal = cotangents(o.shape, final.shape)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * dfinal)
    return jax.grad(loss, argnums=tuple(range(6)))


def targets(fn, x, platforms):
    exported = jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=DISABLED)(*x)
    return set(re.findall(r"custom_call @([\w.]+)", exported.mlir_module())), exported


def bf16_case(rng, T, value_dim=128):
    args, kwargs = make_inputs(rng, B=2, T=T, H=2, K=128, V=value_dim, dtype=jnp.bfloat16)
    return call(args, kwargs) + (args, kwargs)


@needs_both_targets
def test_decode_kernel_only_where_lowered_for_cuda(rng):
    f, x, args, kwargs = bf16_case(rng, T=1)
    assert targets(f, x, ("cuda",))[0] == {DECODE}
    assert targets(f, x, ("cpu",))[0] == {FWD}
    both, exported = targets(f, x, ("cpu", "cuda"))
    assert both == {FWD, DECODE}
    o, final = exported.call(*x)
    o_ref, final_ref = oracle(args, kwargs)
    assert rel_err(o, o_ref) < 2e-2 and rel_err(final, final_ref) < 1e-2
    o_direct, final_direct = jax.jit(f)(*x)
    # The same kernels as the direct call (another path would differ at bf16's precision; the
    # exported module may fuse the XLA ops around them differently, so not bit for bit).
    assert rel_err(o, o_direct) < 1e-5 and rel_err(final, final_direct) < 1e-5


@needs_both_targets
def test_cuda_refused_backward_only_where_lowered_for_cuda(rng):
    # The CUDA backward takes K = V only (its forward V = 64 with K = 128 too): lowered for
    # CUDA, autodiff of the chunked path; lowered for the CPU, the C++ target's backward.
    assert _ffi.cuda_refusal(backward=True, B=1, T=1, H=1, K=128, V=64, N=1, is_varlen=False,
                             f16=False, memory_bytes=0)
    f, x, args, kwargs = bf16_case(rng, T=40, value_dim=64)
    grad = loss_grad(f)
    assert targets(grad, x, ("cuda",))[0] == set()
    assert targets(grad, x, ("cpu",))[0] == {BWD}
    _, exported = targets(grad, x, ("cpu", "cuda"))
    for got, direct in zip(exported.call(*x), jax.jit(grad)(*x)):
        assert rel_err(got, direct) < 1e-5


@needs_both_targets
def test_cuda_refusal_sizes_the_split_calls():
    # The split calls' memory is their own (the forward's segment states, the backward's two
    # extra state buffers): a device too small for them is named in the refusal.
    sizes = dict(B=1, T=4096, H=4, K=128, V=128, is_varlen=True, f16=False)
    for backward, n in ((False, 1), (True, 5)):
        assert _ffi.cuda_refusal(backward=backward, N=n, memory_bytes=0, segment_tokens=1024,
                                 **sizes) is None
        why = _ffi.cuda_refusal(backward=backward, N=n, memory_bytes=1 << 20,
                                segment_tokens=1024, **sizes)
        assert why.startswith("the split " + ("backward" if backward else "forward")), why
        assert ("segment states" in why) != backward, why
        plain = _ffi.cuda_refusal(backward=backward, N=n, memory_bytes=1 << 20, **sizes)
        bytes_of = lambda msg: int(msg.split(" needs ")[1].split()[0])
        assert bytes_of(why) > bytes_of(plain), (why, plain)


@needs_both_targets
def test_cuda_refused_forward_only_where_lowered_for_cuda(rng):
    # float32 q/k/v: the CUDA target refuses them, the C++ target takes them.
    args, kwargs = make_inputs(rng, B=2, T=40, H=2, K=128, V=128)
    f, x = call(args, kwargs)
    assert targets(f, x, ("cuda",))[0] == set()
    assert targets(f, x, ("cpu",))[0] == {FWD}
    _, exported = targets(f, x, ("cpu", "cuda"))
    o, final = exported.call(*x)
    o_ref, final_ref = oracle(args, kwargs)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(final, final_ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not _cpu_target_ready(), reason="the C++ target is not built")
@pytest.mark.parametrize("T", [1, 40], ids=["decode", "chunks"])
def test_cpu_computation_in_a_gpu_process(rng, T):
    cpu = jax.devices("cpu")[0]
    f, x, args, kwargs = bf16_case(rng, T=T)
    x = jax.device_put(x, cpu)
    o, final = jax.jit(f)(*x)
    assert o.devices() == {cpu}
    o_ref, final_ref = oracle(args, kwargs)
    assert rel_err(o, o_ref) < 2e-2 and rel_err(final, final_ref) < 1e-2
    grads = jax.jit(loss_grad(f))(*x)
    _, _, ref = oracle(args, kwargs, cotangents=cotangents(o.shape, final.shape))
    for name, got in zip(("q", "k", "v", "g", "beta", "initial_state"), grads):
        assert got.devices() == {cpu}
        assert rel_err(got, ref[name]) < 3e-2, name


@needs_both_targets
def test_split_calls_only_where_lowered_for_cuda(monkeypatch, rng):
    # A split forced with its backward: lowered for CUDA, the split forward (it returns the
    # segments' states) and the split backward, one call each; lowered for the CPU, the plain
    # calls.
    monkeypatch.setenv(split.SEGMENT_TOKENS_ENV, "16")
    monkeypatch.setenv(split.SPLIT_BACKWARD_ENV, "1")
    f, x, args, kwargs = bf16_case(rng, T=40)
    grad = loss_grad(f)
    assert targets(grad, x, ("cuda",))[0] == {_ffi.FWD_SPLIT_TARGET, _ffi.BWD_SPLIT_TARGET}
    assert targets(grad, x, ("cpu",))[0] == {FWD, BWD}
    _, exported = targets(grad, x, ("cpu", "cuda"))
    o, final = f(*x)
    _, _, ref = oracle(args, kwargs, cotangents=cotangents(o.shape, final.shape))
    for name, got in zip(("q", "k", "v", "g", "beta", "initial_state"), exported.call(*x)):
        assert rel_err(got, ref[name]) < 3e-2, name
