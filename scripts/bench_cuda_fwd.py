"""Times the CUDA forward (jax_flashkda_fwd through jax.ffi.ffi_call) at the benchmark shapes of
shared/design.md §6: l2norm + safe gate (lower_bound -5) + beta sigmoid, bf16, fp32 state.

    python scripts/bench_cuda_fwd.py [--warps 1,2,4,8] [--iters 30] [--shapes big,long]
"""

import argparse
import os
import time

import numpy as np

import jax
import jax.numpy as jnp

SHAPES = {"big": (1, 8192, 96), "long": (1, 32768, 16)}
FLASHKDA_MS = {"big": 1.48, "long": 3.40}
FLA_MS = {"big": 3.21, "long": 2.52}


def ffi_fwd(*arrays):
    from jax_flashkda import _kda_cuda
    try:
        jax.ffi.register_ffi_target("jax_flashkda_fwd", _kda_cuda.registrations()["jax_flashkda_fwd"],
                                    platform="CUDA")
    except Exception:
        pass
    v, h0 = arrays[2], arrays[7]
    out = (jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(h0.shape, jnp.float32))
    return jax.ffi.ffi_call("jax_flashkda_fwd", out, vmap_method="sequential")(
        *arrays, scale=np.float32(128 ** -0.5), use_qk_l2norm=True, use_beta_sigmoid=True,
        gate_mode=np.int32(2), lower_bound=np.float32(-5.0), state_v_first=False, is_varlen=False)


def inputs(B, T, H, D=128, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    bf = jnp.bfloat16
    return (jax.random.normal(ks[0], (B, T, H, D), bf), jax.random.normal(ks[1], (B, T, H, D), bf),
            jax.random.normal(ks[2], (B, T, H, D), bf), jax.random.normal(ks[3], (B, T, H, D), bf),
            jax.random.normal(ks[4], (B, T, H), bf), jax.random.uniform(ks[5], (H,), jnp.float32),
            0.5 * jax.random.normal(ks[6], (H, D), jnp.float32),
            0.3 * jax.random.normal(ks[7], (B, H, D, D), jnp.float32), jnp.zeros((1,), jnp.int32))


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
    ap.add_argument("--warps", default="auto")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--shapes", default="big,long")
    a = ap.parse_args()
    f = jax.jit(ffi_fwd)
    rows = []
    for name in a.shapes.split(","):
        B, T, H = SHAPES[name]
        args = inputs(B, T, H)
        for w in a.warps.split(","):
            if w == "auto":
                os.environ.pop("JAX_FLASHKDA_FWD_WARPS", None)
            else:
                os.environ["JAX_FLASHKDA_FWD_WARPS"] = w
            med, best = time_ms(f, args, a.iters)
            rows.append((name, B, T, H, w, med, best, FLASHKDA_MS[name] / med, FLA_MS[name] / med))
        del args
    os.environ.pop("JAX_FLASHKDA_FWD_WARPS", None)
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'shape':6} {'B':>2} {'T':>6} {'H':>3} {'warps':>5} {'median ms':>10} {'min ms':>8} "
          f"{'FlashKDA/ours':>13} {'fla/ours':>8}")
    for r in rows:
        print(f"{r[0]:6} {r[1]:>2} {r[2]:>6} {r[3]:>3} {r[4]:>5} {r[5]:>10.3f} {r[6]:>8.3f} "
              f"{r[7]:>13.2f} {r[8]:>8.2f}")


if __name__ == "__main__":
    main()
