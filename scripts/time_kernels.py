"""Our kernels alone, for tuning: forward, backward and forward+backward times and the peak
memory forward+backward adds, at the shapes of docs/performance.md (l2norm + safe gate -5 + beta
sigmoid, bf16, D = 128, fp32 state). Side-by-side numbers with the peers come from
benchmarks/bench_gpu.py; this prints only our own milliseconds.

    python scripts/time_kernels.py [--shapes big long] [--warps auto,1,2,4,8] [--iters 30]
                                   [--split auto,0,4096] [--gate safe|softplus]

--gate softplus times the in-kernel softplus gate (-e^{A_log}·softplus(g + dt_bias), no lower
bound) instead of the safe one. JAX_FLASHKDA_FWD_WARPS selects the forward's warps per CTA;
--warps times each in turn.
JAX_FLASHKDA_SEGMENT_TOKENS sets the sequence split (0: never, auto: the planner, or a length;
docs/sequence_split.md);
--split times each setting in turn, forward and forward+backward.
"""

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashkda import _ffi, kda

SHAPES = {"big": (1, 8192, 96), "long": (1, 32768, 16), "h64": (1, 8192, 64), "b4": (4, 8192, 32),
          "h12": (1, 32768, 12), "h8": (1, 65536, 8), "h4": (1, 131072, 4)}
D = 128
CFG = _ffi.CallConfig(scale=D ** -0.5, use_qk_l2norm=True, use_beta_sigmoid=True,
                      gate_mode=_ffi.GATE_SAFE, lower_bound=-5.0, state_v_first=False,
                      is_varlen=False)
GATES = {"safe": CFG, "softplus": dataclasses.replace(CFG, gate_mode=_ffi.GATE_SOFTPLUS,
                                                      lower_bound=0.0)}


def inputs(B, T, H, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    bf = jnp.bfloat16
    x = tuple(jax.random.normal(ks[i], (B, T, H, D), bf) for i in range(4))
    x += (jax.random.normal(ks[4], (B, T, H), bf), jax.random.uniform(ks[5], (H,), jnp.float32),
          0.5 * jax.random.normal(ks[6], (H, D), jnp.float32),
          0.3 * jax.random.normal(ks[7], (B, H, D, D), jnp.float32))
    return x, jax.random.normal(ks[8], (B, T, H, D), bf)


def forward(q, k, v, g, beta, A_log, dt_bias, h0):
    safe = CFG.gate_mode == _ffi.GATE_SAFE
    return kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, initial_state=h0,
               output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
               use_beta_sigmoid_in_kernel=True, lower_bound=CFG.lower_bound if safe else None,
               impl="cuda")


def forward_backward(args, do):
    (o, ht), vjp = jax.vjp(forward, *args)
    return o, vjp((do, jnp.zeros_like(ht)))


def backward_only(args, do):
    h0 = args[7]
    return _ffi._bwd_raw(CFG, *args, jnp.zeros((1,), jnp.int32), do, jnp.zeros_like(h0))


def median_min_ms(f, args, iters):
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
    ap.add_argument("--shapes", nargs="+", default=["big", "long"], choices=list(SHAPES))
    ap.add_argument("--warps", default="auto")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--split", default=None,
                    help="comma-separated JAX_FLASHKDA_SEGMENT_TOKENS settings: 0, auto, a length")
    ap.add_argument("--gate", default="safe", choices=list(GATES))
    a = ap.parse_args()
    global CFG
    CFG = GATES[a.gate]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}")
    fwd = jax.jit(forward)
    for name in a.shapes:
        B, T, H = SHAPES[name]
        args, do = inputs(B, T, H)
        if a.split is not None:
            time_split(name, args, do, a.split.split(","), a.iters, a.no_backward)
            continue
        for warps in a.warps.split(","):
            if warps == "auto":
                os.environ.pop("JAX_FLASHKDA_FWD_WARPS", None)
            else:
                os.environ["JAX_FLASHKDA_FWD_WARPS"] = warps
            med, best = median_min_ms(fwd, args, a.iters)
            print(f"{name} B={B} T={T} H={H} warps={warps}: fwd {med:.3f} ms (min {best:.3f})")
        os.environ.pop("JAX_FLASHKDA_FWD_WARPS", None)
        if a.no_backward:
            continue
        base = dev.memory_stats()["bytes_in_use"]
        step = jax.jit(forward_backward)
        jax.block_until_ready(step(args, do))
        # The process's peak is never reset, so its rise over this shape's baseline is this
        # shape's only for the first shape measured; XLA's temporaries plus the step's outputs
        # (the gradients) are this step's whatever ran before.
        first = name == a.shapes[0]
        peak = (dev.memory_stats()["peak_bytes_in_use"] - base) / 2 ** 30 if first else None
        ma = step.lower(args, do).compile().memory_analysis()
        xla_gib = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2 ** 30
        fb = median_min_ms(step, (args, do), a.iters)
        b = median_min_ms(jax.jit(backward_only), (args, do), a.iters)
        print(f"{name}: bwd {b[0]:.3f} ms | fwd+bwd {fb[0]:.3f} ms (min {fb[1]:.3f}) | extra "
              f"memory: XLA temp+outputs {xla_gib:.2f} GiB"
              + (f", process peak rise {peak:.2f} GiB" if first else ""))
        del args, do


def time_split(name, args, do, settings, iters, no_backward):
    """Forward (and forward+backward) per sequence-split setting; the setting is read when a
    call is traced, so each gets freshly traced functions."""
    for setting in settings:
        os.environ["JAX_FLASHKDA_SEGMENT_TOKENS"] = setting
        fwd = jax.jit(lambda *x: forward(*x))
        med, best = median_min_ms(fwd, args, iters)
        line = f"{name} split={setting}: fwd {med:.3f} ms (min {best:.3f})"
        if not no_backward:
            step = jax.jit(lambda *x: forward_backward(*x))
            fb = median_min_ms(step, (args, do), iters)
            line += f" | fwd+bwd {fb[0]:.3f} ms (min {fb[1]:.3f})"
        print(line, flush=True)
    os.environ.pop("JAX_FLASHKDA_SEGMENT_TOKENS", None)


if __name__ == "__main__":
    main()
