"""One decode step side by side: our CUDA decode kernel, our chunk kernels on the same call, and
flash-linear-attention's `fused_recurrent_kda`, with the state-bytes floor. One process, one
GPU, the same inputs for everyone; rows {"case", "impl", "mode": "decode", "ms", "gpu",
"date"} (plus "device_ms" where a profiler timed the kernels alone).

    python benchmarks/bench_decode.py --out benchmarks/results/decode.json [--tokens 1 4 16]

Fused mode (l2norm + safe gate lower_bound=-5 + beta sigmoid), bf16 q/k/v, D = 128, fp32 state
read and written once per step: ours with the state donated (updated in place), fla's public
call writing a new final state and its in-place serving call (`inplace_final_state`), the
faster of the two reported. `ms`: wall-clock per call with calls queued back to back;
`device_ms`: the kernels' own time per call, every kernel of the process summed over 20 calls
as CUPTI records them (through torch.profiler, which sees JAX's launches too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import bench, copy_bandwidth, jax_sync  # noqa: E402

from jax_flashkda import _ffi, kda  # noqa: E402

D = 128
LOWER_BOUND = -5.0
BATCHES = (1, 8, 64, 256)
HEADS = (12, 32, 96)


def make_step(B, T, H, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    bf = jnp.bfloat16
    x = dict(q=jax.random.normal(ks[0], (B, T, H, D), bf),
             k=jax.random.normal(ks[1], (B, T, H, D), bf),
             v=jax.random.normal(ks[2], (B, T, H, D), bf),
             g=jax.random.normal(ks[3], (B, T, H, D), bf),
             beta=jax.random.normal(ks[4], (B, T, H), bf),
             A_log=jax.random.uniform(ks[5], (H,), jnp.float32),
             dt_bias=jax.random.uniform(ks[6], (H, D), jnp.float32),
             h0=0.1 * jax.random.normal(ks[7], (B, H, D, D), jnp.float32))
    return x


def floor_ms(B, T, H, bandwidth):
    """The state read and written once, plus q, k, v, g (bf16), beta and o."""
    state = 2 * B * H * D * D * 4
    tokens = B * T * H * (5 * D * 2 + 2)
    return (state + tokens) / bandwidth * 1e3


def ours(x, chunk: bool):
    """One step with the state donated; `chunk`: the chunk kernels instead of the decode."""
    if chunk:
        cfg = _ffi.CallConfig(scale=D ** -0.5, use_qk_l2norm=True, use_beta_sigmoid=True,
                              gate_mode=_ffi.GATE_SAFE, lower_bound=LOWER_BOUND,
                              state_v_first=False, is_varlen=False)
        fwd = _ffi.fwd_call(cfg)

        def step(q, k, v, g, beta, A_log, dt_bias, h0):
            return fwd(q, k, v, g, beta, A_log, dt_bias, h0, jnp.zeros((1,), jnp.int32))
    else:
        def step(q, k, v, g, beta, A_log, dt_bias, h0):
            return kda(q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, initial_state=h0,
                       output_final_state=True, use_qk_l2norm_in_kernel=True,
                       use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                       lower_bound=LOWER_BOUND, impl="cuda")
    jitted = jax.jit(step, donate_argnums=7)
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias")]
    state = {"h": jnp.array(x["h0"])}

    def run():
        o, state["h"] = jitted(*args, state["h"])
        return o

    return run


def fla_steps(x):
    """fla's public call (new final state) and its in-place serving call, or (None, why)."""
    try:
        import torch
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda, fused_recurrent_kda_fwd
    except Exception as e:  # noqa: BLE001 - any import failure means: not measured
        return None, f"fla not importable ({type(e).__name__}: {e})"
    t = {n: torch.from_dlpack(jnp.array(a)) for n, a in x.items()}
    kw = dict(A_log=t["A_log"], dt_bias=t["dt_bias"].reshape(-1), scale=D ** -0.5,
              use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
              use_beta_sigmoid_in_kernel=True, lower_bound=LOWER_BOUND)
    args = (t["q"], t["k"], t["v"], t["g"], t["beta"])
    public = lambda: fused_recurrent_kda(*args, initial_state=t["h0"], output_final_state=True, **kw)
    state = t["h0"].clone()
    in_place = lambda: fused_recurrent_kda_fwd(*args, initial_state=state,
                                               inplace_final_state=True,
                                               output_final_state=True, **kw)
    return (public, in_place), torch.cuda.synchronize


def device_ms(fn, sync, calls=20):
    """Device time per call: the durations of every kernel the process ran during `calls` calls
    (CUPTI's activity records, through torch.profiler), or None without torch or kernels."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    sync(fn())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls - 1):
            fn()
        sync(fn())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    us = sum(e["dur"] for e in events if e.get("cat") == "kernel")
    return us / calls / 1e3 if us else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--heads", type=int, nargs="+", default=list(HEADS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1],
                    help="tokens per sequence (decode rows are T = 1; more: the crossover)")
    a = ap.parse_args()
    gpu = jax.devices()[0].device_kind
    date = datetime.date.today().isoformat()
    bandwidth = copy_bandwidth()
    print(f"{gpu}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for T in a.tokens:
        for H in a.heads:
            for B in a.batches:
                case = f"decode_B{B}_H{H}" + (f"_T{T}" if T > 1 else "")
                x = make_step(B, T, H)
                step = ours(x, chunk=False)
                times = {"floor": floor_ms(B, T, H, bandwidth),
                         "jax_flashkda": bench(step, jax_sync),
                         "jax_flashkda_chunk": bench(ours(x, chunk=True), jax_sync)}
                device = {"jax_flashkda": device_ms(step, jax_sync)}
                fla, sync = fla_steps(x) if T == 1 else (None, "decode steps only")
                if fla is None:
                    print(f"  fla skipped: {sync}")
                else:
                    times["fla_fused_recurrent"] = min(bench(f, sync) for f in fla)
                    device["fla_fused_recurrent"] = min(
                        (d for d in (device_ms(f, sync) for f in fla) if d is not None),
                        default=None)
                for impl, ms in times.items():
                    row = dict(case=case, impl=impl, mode="decode", ms=round(ms, 5), gpu=gpu,
                               date=date)
                    if device.get(impl) is not None:
                        row["device_ms"] = round(device[impl], 5)
                    rows.append(row)
                line = "  ".join(f"{k} {1e3 * v:8.1f} us" for k, v in times.items())
                line += "  device: " + "  ".join(
                    f"{k} {1e3 * v:.1f} us" for k, v in device.items() if v is not None)
                print(f"{case:24s} {line}")
                del x
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
