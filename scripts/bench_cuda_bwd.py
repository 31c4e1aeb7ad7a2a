"""Times the CUDA forward, backward and forward+backward (jax.vjp of kda(impl="cuda")) at the
benchmark shapes of shared/design.md §6 (l2norm + safe gate -5 + beta sigmoid, bf16, D = 128),
and the peak device memory the forward+backward adds over its inputs. One shape per process,
so that the allocator's peak belongs to that shape.

    python scripts/bench_cuda_bwd.py --shape big|long [--iters 20]
"""

import argparse
import time

import numpy as np

import jax
import jax.numpy as jnp

from jax_flashkda import _ffi, kda

SHAPES = {"big": (1, 8192, 96), "long": (1, 32768, 16)}
FLA_FWDBWD_MS = {"big": 14.78, "long": 10.73}
FLA_PEAK_GIB = {"big": 5.8, "long": 3.9}
D = 128


def inputs(B, T, H, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    bf = jnp.bfloat16
    return (jax.random.normal(ks[0], (B, T, H, D), bf), jax.random.normal(ks[1], (B, T, H, D), bf),
            jax.random.normal(ks[2], (B, T, H, D), bf), jax.random.normal(ks[3], (B, T, H, D), bf),
            jax.random.normal(ks[4], (B, T, H), bf), jax.random.uniform(ks[5], (H,), jnp.float32),
            0.5 * jax.random.normal(ks[6], (H, D), jnp.float32)), jax.random.normal(ks[7], (B, T, H, D), bf)


def fwd(q, k, v, g, beta, A_log, dt_bias):
    return kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, use_qk_l2norm_in_kernel=True,
               use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, lower_bound=-5.0,
               impl="cuda")[0]


def fwd_bwd(args, do):
    o, vjp = jax.vjp(fwd, *args)
    return o, vjp(do)


def bwd_only(args, do):
    q, k, v, g, beta, A_log, dt_bias = args
    B, _, H, _ = q.shape
    cfg = _ffi.CallConfig(scale=D ** -0.5, use_qk_l2norm=True, use_beta_sigmoid=True,
                          gate_mode=_ffi.GATE_SAFE, lower_bound=-5.0, state_v_first=False,
                          is_varlen=False)
    state = jnp.zeros((B, H, D, D), jnp.float32)
    return _ffi._bwd_raw(cfg, q, k, v, g, beta, A_log, dt_bias, state, jnp.zeros((1,), jnp.int32),
                         do, state)


def time_ms(f, args, iters):
    for _ in range(3):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts)), 1e3 * float(np.min(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="big", choices=sorted(SHAPES))
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    B, T, H = SHAPES[a.shape]
    dev = jax.devices()[0]
    args, do = inputs(B, T, H)
    jax.block_until_ready((args, do))
    base = dev.memory_stats()["bytes_in_use"]
    step = jax.jit(fwd_bwd)
    jax.block_until_ready(step(args, do))
    peak_gib = (dev.memory_stats()["peak_bytes_in_use"] - base) / 2 ** 30
    t_fb = time_ms(step, (args, do), a.iters)
    t_f = time_ms(jax.jit(lambda args: fwd(*args)), (args,), a.iters)
    t_b = time_ms(jax.jit(bwd_only), (args, do), a.iters)
    print(f"device: {dev.device_kind}")
    print(f"{a.shape}: B={B} T={T} H={H} fwd {t_f[0]:.3f} ms | bwd {t_b[0]:.3f} ms | fwd+bwd "
          f"{t_fb[0]:.3f} ms (min {t_fb[1]:.3f}) | fla fwd+bwd {FLA_FWDBWD_MS[a.shape]} ms -> "
          f"{FLA_FWDBWD_MS[a.shape] / t_fb[0]:.2f}x | peak extra {peak_gib:.2f} GiB "
          f"(fla +{FLA_PEAK_GIB[a.shape]} GiB)")


if __name__ == "__main__":
    main()
