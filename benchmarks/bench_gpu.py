"""Side-by-side GPU timings of KDA forward (and forward+backward) against the peers.

One process, one GPU, the same inputs for everyone. Peers that are not installed are
skipped with a note. Writes rows {"case", "impl", "mode", "ms", "gpu", "date"} as json.

    python benchmarks/bench_gpu.py --modes fwd fwd_bwd --out benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --modes fwd fwd_bwd --split auto \
        --cases B1_T32768_H16 B1_T32768_H12 B1_T65536_H8 B1_T131072_H4 varlen_65536_8x1024_H8

Mode: fused (l2norm + safe gate lower_bound=-5 + beta sigmoid), bf16, D=128 (64 in the _D64
cases), fp32 state in and out. jla (jax-linear-attention) has no fused gate: it gets the
activated log-decay and post-sigmoid beta, plus its own in-kernel l2norm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_flashkda import kda
from jax_flashkda.preprocess import gate_activation

CASES = {
    "B1_T8192_H96": dict(B=1, T=8192, H=96),
    "B1_T8192_H64": dict(B=1, T=8192, H=64),
    "varlen6_H96": dict(seqlens=[1300, 547, 2048, 963, 271, 3063], H=96),
    "B4_T8192_H32": dict(B=4, T=8192, H=32),
    "B1_T32768_H16": dict(B=1, T=32768, H=16),
    # Few heads, long sequences (docs/sequence_split.md).
    "B1_T32768_H12": dict(B=1, T=32768, H=12),
    "B1_T65536_H8": dict(B=1, T=65536, H=8),
    "B1_T131072_H4": dict(B=1, T=131072, H=4),
    "varlen_65536_8x1024_H8": dict(seqlens=[65536] + [1024] * 8, H=8),
    # Head dim 64 (K = V = 64), forward and backward on the CUDA target.
    "B1_T8192_H96_D64": dict(B=1, T=8192, H=96, D=64),
    "B4_T8192_H32_D64": dict(B=4, T=8192, H=32, D=64),
}
DEFAULT_CASES = ["B1_T8192_H96", "B1_T8192_H64", "varlen6_H96", "B4_T8192_H32",
                 "B1_T32768_H16"]
LOWER_BOUND = -5.0


def make_case(key, B=1, T=None, H=1, seqlens=None, D=128):
    if seqlens is not None:
        B, T = 1, sum(seqlens)
    ks = jax.random.split(key, 8)
    bf = jnp.bfloat16
    x = dict(
        q=jax.random.normal(ks[0], (B, T, H, D), bf), k=jax.random.normal(ks[1], (B, T, H, D), bf),
        v=jax.random.normal(ks[2], (B, T, H, D), bf), g=jax.random.normal(ks[3], (B, T, H, D), bf),
        beta=jax.random.normal(ks[4], (B, T, H), bf),
        A_log=jax.random.uniform(ks[5], (H,), jnp.float32),
        dt_bias=jax.random.uniform(ks[6], (H, D), jnp.float32))
    n = B
    cu = None
    if seqlens is not None:
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(seqlens)]), jnp.int32)
        n = len(seqlens)
    x["h0"] = 0.1 * jax.random.normal(ks[7], (n, H, D, D), jnp.float32)
    return x, cu


def bench(fn, sync, iters=20, repeats=5):
    """Median ms per call: many calls queued back to back, synchronised at the end."""
    for _ in range(3):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters - 1):
            fn()
        sync(fn())
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def jax_sync(out):
    jax.block_until_ready(out)


def copy_bandwidth():
    """Device copy rate in bytes/s (bytes read + bytes written), the floor's denominator."""
    x = jnp.ones((1 << 29,), jnp.float32)  # 2 GiB
    copy = jax.jit(lambda a: a + 0.0)
    ms = bench(lambda: copy(x), jax_sync)
    return 2 * x.nbytes / (ms * 1e-3)


def xla_temp_gib(jitted, args):
    """Device memory XLA sets aside for the compiled step's temporaries."""
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**30


def floor_ms(x, bandwidth, mode):
    bf16 = 2
    *_, D = x["q"].shape
    tokens_heads = x["q"].shape[0] * x["q"].shape[1] * x["q"].shape[2]
    inputs = tokens_heads * (4 * D * bf16 + bf16)
    states = 2 * x["h0"].size * 4
    out = tokens_heads * D * bf16
    total = inputs + out + states
    if mode == "fwd_bwd":
        # Backward reads the inputs and do again and writes dq, dk, dv, dg, dbeta.
        total += inputs + out + inputs + states
    return total / bandwidth * 1e3


def jax_timings(call, args):
    """Jitted forward and forward+backward (gradients of every argument) of a JAX op."""
    fwd = jax.jit(call)

    def loss(*a):
        o, ht = call(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(ht)

    fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    return ({"fwd": lambda: fwd(*args), "fwd_bwd": lambda: fwd_bwd(*args)}, jax_sync,
            lambda: xla_temp_gib(fwd_bwd, args))


def ours(x, cu, impl):
    def call(q, k, v, g, beta, A_log, dt_bias, h0):
        return kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                   use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                   use_beta_sigmoid_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                   lower_bound=LOWER_BOUND, cu_seqlens=cu, impl=impl)

    args = [x[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0")]
    fns, sync, temp_gib = jax_timings(call, args)
    # The CUDA calls take their workspace from XLA's scratch allocator, which temp_size does not
    # count: main() measures that path in fresh processes instead (cuda_peak_gib).
    return fns, sync, (temp_gib if impl == "chunked" else None)


def print_cuda_peak(case):
    """Run in a fresh process: the rise of JAX's peak device memory over the inputs for one
    forward+backward of the CUDA path (outputs, gradients and workspace included, as torch's
    peak for fla). The peak is per process and cannot be reset, hence one process per case."""
    x, cu = make_case(jax.random.key(0), **CASES[case])
    fns, sync, _ = ours(x, cu, "cuda")
    jax.block_until_ready(x)
    dev = jax.devices()[0]
    base = dev.memory_stats()["bytes_in_use"]
    sync(fns["fwd_bwd"]())
    print((dev.memory_stats()["peak_bytes_in_use"] - base) / 2**30)


def cuda_peak_gib(case):
    """print_cuda_peak in a child process, run before this process takes GPU memory."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run([sys.executable, __file__, "--cuda-peak-of", case], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def peer_fla(x, cu):
    import torch
    from fla.ops.kda import chunk_kda

    t = {n: torch.from_dlpack(a) for n, a in x.items()}
    cu_t = torch.from_dlpack(cu).long() if cu is not None else None

    def fwd(grad=False):
        ins = {n: (t[n].detach().requires_grad_(grad) if n != "A_log" else t[n]) for n in t}
        o, ht = chunk_kda(ins["q"], ins["k"], ins["v"], ins["g"], ins["beta"],
                          initial_state=ins["h0"], output_final_state=True,
                          use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                          use_beta_sigmoid_in_kernel=True, safe_gate=True,
                          lower_bound=LOWER_BOUND, A_log=ins["A_log"],
                          dt_bias=ins["dt_bias"].reshape(-1), cu_seqlens=cu_t)
        return o, ht

    def fwd_bwd():
        o, ht = fwd(grad=True)
        (o.float().sum() + ht.sum()).backward()
        return o

    def sync(_):
        torch.cuda.synchronize()

    def with_grad_enabled(f):
        def run():
            with torch.enable_grad():
                return f()
        return run

    def no_grad(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    def extra_gib():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with_grad_enabled(fwd_bwd)()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**30

    return {"fwd": no_grad(fwd), "fwd_bwd": with_grad_enabled(fwd_bwd)}, sync, extra_gib


def peer_flashkda(x, cu):
    import torch
    import flash_kda

    t = {n: torch.from_dlpack(a) for n, a in x.items()}
    cu_t = torch.from_dlpack(cu).long() if cu is not None else None
    out = torch.empty_like(t["v"])
    h0 = t["h0"].transpose(-1, -2).contiguous()  # FlashKDA keeps [N, H, V, K]
    ht = torch.empty_like(h0)

    def fwd():
        flash_kda.fwd(t["q"], t["k"], t["v"], t["g"], t["beta"], t["q"].shape[-1] ** -0.5, out,
                      A_log=t["A_log"], dt_bias=t["dt_bias"], lower_bound=LOWER_BOUND,
                      initial_state=h0, final_state=ht, cu_seqlens=cu_t)
        return out

    return {"fwd": fwd}, lambda _: torch.cuda.synchronize(), None


def peer_jla(x, cu):
    from jla.ops.mosaic_gpu.kda import kda as jla_kda

    if cu is not None:
        raise RuntimeError("jla takes no cu_seqlens")
    g = gate_activation(x["g"], x["A_log"], x["dt_bias"], LOWER_BOUND, True)
    beta = jax.nn.sigmoid(x["beta"].astype(jnp.float32)).astype(jnp.bfloat16)

    def call(q, k, v, g, beta, h0):
        return jla_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                       use_qk_l2norm=True)

    args = (x["q"], x["k"], x["v"], g, beta, x["h0"])
    return jax_timings(call, args)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["fwd"], choices=["fwd", "fwd_bwd"])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    parser.add_argument("--split", choices=["off", "auto"], default="auto",
                        help="the sequence split for jax_flashkda (JAX_FLASHKDA_SEGMENT_TOKENS): "
                             "auto (the planner, the default) or off; recorded in each row")
    impls = ["jax_flashkda", "flashkda", "fla", "jla", "jax_chunked"]
    # The floor is computed for every case; it is not an implementation to pick.
    parser.add_argument("--impls", nargs="+", default=impls, choices=impls)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    parser.add_argument("--cuda-peak-of", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cuda_peak_of:  # the child of cuda_peak_gib: its parent's environment as it is
        print_cuda_peak(args.cuda_peak_of)
        return
    # Read when a call is traced; the memory-figure children inherit it.
    os.environ["JAX_FLASHKDA_SEGMENT_TOKENS"] = "auto" if args.split == "auto" else "0"

    cuda_peaks = {}
    if "jax_flashkda" in args.impls and "fwd_bwd" in args.modes:
        for case in args.cases:
            try:
                cuda_peaks[case] = cuda_peak_gib(case)
            except subprocess.CalledProcessError as e:
                print(f"{case:16s} jax_flashkda   no memory figure: {e.stderr.strip()[-160:]}",
                      flush=True)
    device = jax.devices()[0]
    gpu = device.device_kind
    date = datetime.date.today().isoformat()
    bandwidth = copy_bandwidth()
    print(f"{gpu}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []

    def record(case, impl, mode, ms, **extra):
        rows.append(dict(case=case, impl=impl, mode=mode, ms=round(ms, 4), gpu=gpu, date=date,
                         **extra))
        print(f"{case:16s} {mode:8s} {impl:14s} {ms:9.3f} ms", flush=True)

    for case in args.cases:
        x, cu = make_case(jax.random.key(0), **CASES[case])
        for mode in args.modes:
            record(case, "floor", mode, floor_ms(x, bandwidth, mode))
        for impl in args.impls:
            try:
                if impl in ("jax_flashkda", "jax_chunked"):
                    fns, sync, extra_gib = ours(x, cu, "cuda" if impl == "jax_flashkda" else "chunked")
                    if impl == "jax_flashkda" and case in cuda_peaks:
                        extra_gib = lambda peak=cuda_peaks[case]: peak
                else:
                    fns, sync, extra_gib = {"fla": peer_fla, "flashkda": peer_flashkda,
                                            "jla": peer_jla}[impl](x, cu)
            except Exception as e:  # a peer that is missing or refuses the case
                print(f"{case:16s} {impl:14s} skipped: {type(e).__name__}: {str(e)[:160]}",
                      flush=True)
                continue
            for mode in args.modes:
                if mode not in fns:
                    continue
                try:
                    ms = bench(fns[mode], sync, iters=5 if impl == "jax_chunked" else 20)
                except Exception as e:
                    print(f"{case:16s} {mode:8s} {impl:14s} failed: {type(e).__name__}: "
                          f"{str(e)[:160]}", flush=True)
                    continue
                extra = {"split": args.split} if impl == "jax_flashkda" else {}
                if mode == "fwd_bwd" and extra_gib is not None:
                    extra["extra_gib"] = round(extra_gib(), 3)
                record(case, impl, mode, ms, **extra)
        del x
        # After every case, so that a run cut short keeps what it measured.
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
