"""Times the CPU paths: the C++ FFI target, chunked pure JAX (chunk 16/32/64), the recurrence.

B=1, T=4096, H=4, K=V=128, fp32, Kimi's fused mode (qk l2norm, safe gate lower_bound=-5, beta
sigmoid). Forward, and forward+backward (gradients of every input), each under jit, after a
warm-up, median of several runs. Writes benchmarks/results/cpu.json and cpu.md; the ratio of
cpu_target to chunked_c64 decides what `impl="auto"` takes on CPU (ops._AUTO_PREFERS_CPU_TARGET).

    python benchmarks/bench_cpu.py [--runs 5]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashkda import kda
from jax_flashkda.chunked import kda_chunked
from jax_flashkda.reference import kda_recurrent

B, T, H, K, V = 1, 4096, 4, 128, 128
CASE = f"B{B}_T{T}_H{H}_K{K}_V{V}_f32_fused"
OUT = pathlib.Path(__file__).parent / "results" / "cpu.json"


def inputs():
    rng = np.random.default_rng(2024)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return dict(
        q=f32(rng.standard_normal((B, T, H, K))), k=f32(rng.standard_normal((B, T, H, K))),
        v=f32(rng.standard_normal((B, T, H, V))), g=f32(rng.standard_normal((B, T, H, K))),
        beta=f32(rng.standard_normal((B, T, H))), A_log=f32(rng.uniform(-1, 1, (H,))),
        dt_bias=f32(rng.standard_normal((H, K)) * 0.1))


def loss_fn(impl):
    def loss(q, k, v, g, beta, A_log, dt_bias):
        o, s = impl(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                    use_beta_sigmoid_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                    lower_bound=-5.0)
        return o, s
    return loss


def median_ms(fn, args, runs):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    x = inputs()
    order = ("q", "k", "v", "g", "beta", "A_log", "dt_bias")
    operands = tuple(x[n] for n in order)
    impls = {"recurrent": kda_recurrent, "cpu_target": functools.partial(kda, impl="ffi", output_final_state=True)}
    for c in (16, 32, 64):
        impls[f"chunked_c{c}"] = functools.partial(kda_chunked, chunk_size=c)

    device = f"{platform.processor() or platform.machine()} x{jax.local_device_count()} " \
             f"({jax.devices()[0].device_kind}, jax {jax.__version__})"
    date = datetime.date.today().isoformat()
    rows = []
    for name, impl in impls.items():
        f = loss_fn(impl)
        fwd = jax.jit(lambda *a, f=f: f(*a))
        bwd = jax.jit(jax.grad(lambda *a, f=f: sum(jnp.sum(r ** 2) for r in f(*a)),
                               argnums=tuple(range(len(order)))))
        for mode, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
            ms = median_ms(fn, operands, args.runs)
            rows.append(dict(case=CASE, impl=name, mode=mode, ms=round(ms, 2), device=device,
                             date=date))
            print(f"{name:14s} {mode:8s} {ms:10.1f} ms", flush=True)

    base = {r["mode"]: r["ms"] for r in rows if r["impl"] == "recurrent"}
    print(f"\n{CASE}\n{'impl':14s} {'mode':8s} {'ms':>10s} {'vs recurrent':>13s}")
    for r in rows:
        print(f"{r['impl']:14s} {r['mode']:8s} {r['ms']:10.1f} {base[r['mode']] / r['ms']:12.1f}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# CPU paths: {device}, {date}", "", f"Case {CASE}, median ms of jitted calls.", "",
             "| impl | fwd ms | fwd+bwd ms | fwd+bwd vs recurrent |", "|---|---|---|---|"]
    ms = {(r["impl"], r["mode"]): r["ms"] for r in rows}
    for name in impls:
        lines.append(f"| {name} | {ms[(name, 'fwd')]} | {ms[(name, 'fwd+bwd')]} | "
                     f"{base['fwd+bwd'] / ms[(name, 'fwd+bwd')]:.1f}× |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
