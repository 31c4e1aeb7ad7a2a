"""Times the CPU paths: the C++ FFI target, chunked pure JAX (chunk 16/32/64), the recurrence.

B=1, T=4096, H=4, K=V=128, fp32, Kimi's fused mode (qk l2norm, safe gate lower_bound=-5, beta
sigmoid). Forward, and forward+backward (gradients of every input), each under jit, after a
warm-up, median of several runs. Adds its rows to benchmarks/results/cpu.json (old rows stay:
house rule) and rewrites cpu.md from all of them, one table per (date, machine, note); the ratio
of cpu_target to chunked_c64 is why `impl="auto"` takes the C++ target on CPU (ops._choose_impl).

    python benchmarks/bench_cpu.py [--runs 5] [--note "how _kda_cpu was built"] [--date D]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
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


def machine():
    """The CPU's model name and core count, e.g. 'Intel(R) Xeon(R) Processor, 2 cores'."""
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def write_md(rows):
    """One table per (date, device, note), oldest first; every row of cpu.json is shown."""
    groups = {}
    for r in rows:
        groups.setdefault((r["date"], r["device"], r.get("note", "")), []).append(r)
    lines = [f"# CPU paths, case {CASE}", "",
             "Median ms of jitted calls. Rows are only ever added (house rule); each run is "
             "one table.", ""]
    for (date, device, note), rs in groups.items():
        ms = {(r["impl"], r["mode"]): r["ms"] for r in rs}
        names = list(dict.fromkeys(r["impl"] for r in rs))
        base = ms.get(("recurrent", "fwd+bwd"))
        lines += [f"## {date}: {device}" + (f" ({note})" if note else ""), "",
                  "| impl | fwd ms | fwd+bwd ms | fwd+bwd vs recurrent |", "|---|---|---|---|"]
        for name in names:
            fb = ms.get((name, "fwd+bwd"))
            ratio = f"{base / fb:.1f}×" if base and fb else "-"
            lines.append(f"| {name} | {ms.get((name, 'fwd'), '-')} | {fb if fb else '-'} | "
                         f"{ratio} |")
        lines.append("")
    OUT.with_suffix(".md").write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--note", default="", help="stored with each row, e.g. the build flags")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--impls", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args()

    x = inputs()
    order = ("q", "k", "v", "g", "beta", "A_log", "dt_bias")
    operands = tuple(x[n] for n in order)
    impls = {"recurrent": kda_recurrent, "cpu_target": functools.partial(kda, impl="ffi", output_final_state=True)}
    for c in (16, 32, 64):
        impls[f"chunked_c{c}"] = functools.partial(kda_chunked, chunk_size=c)
    if args.impls:
        impls = {n: impls[n] for n in args.impls.split(",")}

    device = f"{machine()}, {platform.machine()} x{jax.local_device_count()} " \
             f"({jax.devices()[0].device_kind}, jax {jax.__version__})"
    date = args.date
    rows = []
    for name, impl in impls.items():
        f = loss_fn(impl)
        fwd = jax.jit(lambda *a, f=f: f(*a))
        bwd = jax.jit(jax.grad(lambda *a, f=f: sum(jnp.sum(r ** 2) for r in f(*a)),
                               argnums=tuple(range(len(order)))))
        for mode, fn in (("fwd", fwd), ("fwd+bwd", bwd)):
            ms = median_ms(fn, operands, args.runs)
            row = dict(case=CASE, impl=name, mode=mode, ms=round(ms, 2), device=device,
                       date=date)
            if args.note:
                row["note"] = args.note
            rows.append(row)
            print(f"{name:14s} {mode:8s} {ms:10.1f} ms", flush=True)

    base = {r["mode"]: r["ms"] for r in rows if r["impl"] == "recurrent"}
    print(f"\n{CASE}\n{'impl':14s} {'mode':8s} {'ms':>10s} {'vs recurrent':>13s}")
    for r in rows:
        ratio = f"{base[r['mode']] / r['ms']:12.1f}x" if r["mode"] in base else f"{'-':>13s}"
        print(f"{r['impl']:14s} {r['mode']:8s} {r['ms']:10.1f} {ratio}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(OUT.read_text()) if OUT.exists() else []
    all_rows = old + rows
    OUT.write_text(json.dumps(all_rows, indent=1) + "\n")
    write_md(all_rows)

if __name__ == "__main__":
    main()
