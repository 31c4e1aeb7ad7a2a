"""Turns benchmark rows (json) into a markdown table of times and ratios, and a png chart.

    python benchmarks/report.py benchmarks/results/gpu_h100.json

Writes <name>.md and <name>.png beside the json. Ratios are peer time over ours (> 1: we
are faster), and ours over the memory floor. Rows of examples/train_lm.py --report (tokens/s
per GPU) get a scaling table instead: strong and weak scaling efficiency.
"""

from __future__ import annotations

import json
import pathlib
import sys

OURS = "jax_flashkda"
ORDER = ["floor", "jax_flashkda", "flashkda", "fla", "jla", "jax_chunked", "jax_flashkda_chunk",
         "fla_fused_recurrent", "jax_flashkda_unsplit", "jax_flashkda_forced_split_4096",
         "jax_flashkda_forced_split_8192",
         # decode_h100 run 2: the decode kernel's tilings measured and removed
         "jax_flashkda[lanes32]", "jax_flashkda[warps32]",
         # decode_h100 runs 4-5: the 16-byte tiling's variants (r8cs became the kernel)
         "jax_flashkda[r16]", "jax_flashkda[r8cs]"]


def table(rows, mode, digits=3):
    cases = list(dict.fromkeys(r["case"] for r in rows if r["mode"] == mode))
    impls = [i for i in ORDER if any(r["impl"] == i and r["mode"] == mode for r in rows)]
    ms = {(r["case"], r["impl"]): r["ms"] for r in rows if r["mode"] == mode}
    peers = [i for i in impls if i not in ("floor", OURS)]
    head = ["case"] + [f"{i} ms" for i in impls] + [f"{p} / ours" for p in peers]
    if "floor" in impls:
        head.append("ours / floor")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        ours = ms.get((case, OURS))
        cells = [case] + [f"{ms[(case, i)]:.{digits}f}" if (case, i) in ms else "—"
                          for i in impls]
        for p in peers:
            ok = ours and (case, p) in ms
            cells.append(f"{ms[(case, p)] / ours:.2f}×" if ok else "—")
        if "floor" in impls:
            cells.append(f"{ours / ms[(case, 'floor')]:.2f}×" if ours else "—")
        lines.append("| " + " | ".join(cells) + " |")
    # The same table of the kernels' device time, where a profiler gave it (the floor beside).
    device = [{k: v for k, v in r.items() if k != "device_ms"} | {"ms": r["device_ms"]}
              for r in rows if r["mode"] == mode and "device_ms" in r]
    if device:
        floors = [r for r in rows if r["mode"] == mode and r["impl"] == "floor"]
        lines += ["", "Device time per call (the kernels alone, from a profiler):", "",
                  table(device + floors, mode, digits=4)]
    return "\n".join(lines)


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        cases = list(dict.fromkeys(r["case"] for r in sel))
        impls = [i for i in ORDER if any(r["impl"] == i for r in sel)]
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys = [next((r["ms"] for r in sel if r["case"] == c and r["impl"] == impl), 0)
                  for c in cases]
            ax.bar([i + j * width for i in range(len(cases))], ys, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=20, fontsize=8)
        ax.set_ylabel("ms (lower is better)")
        ax.set_yscale("log")
        ax.set_title(f"KDA {mode}, {sel[0]['gpu']}, {sel[0]['date']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def data_axis(mesh):
    """The data-axis size of a mesh string such as "data=2,model=1" ("single": 1)."""
    sizes = dict(part.split("=") for part in mesh.split(",") if "=" in part)
    return int(sizes.get("data", 1))


def scaling(rows, path):
    gpu, date = rows[0]["gpu"], rows[0]["date"]
    parts = [f"# Training the example model across GPUs: {gpu}, {date}", "",
             "examples/train_lm.py (2 KDA layers, 4 heads of 128, bf16, the CUDA kernels), "
             "jit of the whole training step; tokens/s per GPU excludes the compiling steps. "
             "Efficiency is per-GPU tokens/s over the same run's one-GPU tokens/s: *strong* at "
             "the same global batch, *weak* at the same batch per GPU (the one-GPU row with "
             "tokens/step divided by the data axis). One GPU's tokens/s grows with its batch "
             "(more heads×sequences in flight per kernel), so strong scaling understates data "
             "parallelism.", "",
             "| run | tokens/step | gpus | mesh | tokens/s per GPU | strong | weak |",
             "|---|---|---|---|---|---|---|"]
    for run in dict.fromkeys(r.get("run", 1) for r in rows):
        sel = [r for r in rows if r.get("run", 1) == run]
        single = {r.get("tokens_per_step"): r["tokens_per_s"] for r in sel if r["gpus"] == 1}
        for r in sel:
            step = r.get("tokens_per_step")
            strong = single.get(step)
            weak = single.get(step // data_axis(r["mesh"])) if step and data_axis(r["mesh"]) > 1 else None
            eff = [f"{r['tokens_per_s'] / one:.2f}" if one else "—" for one in (strong, weak)]
            parts.append(f"| {run} | {step or '—'} | {r['gpus']} | {r['mesh']} "
                         f"| {r['tokens_per_s']:,} | {eff[0]} | {eff[1]} |")
    path.with_suffix(".md").write_text("\n".join(parts + [""]))
    print(path.with_suffix(".md").read_text())


def main(path):
    path = pathlib.Path(path)
    rows = json.loads(path.read_text())
    if "tokens_per_s" in rows[0]:
        return scaling(rows, path)
    gpu, date = rows[0]["gpu"], rows[0]["date"]
    parts = [f"# KDA benchmarks: {gpu}, {date}", "",
             "Side by side in one process on one GPU; bf16, D=128 (D=64 where the case name "
             "ends in _D64), fused mode (l2norm, safe "
             "gate lower_bound=-5, beta sigmoid), fp32 state in and out. "
             "`floor` is the bytes that must move over the measured copy bandwidth.", ""]
    runs = {}
    for r in rows:
        runs.setdefault(r.get("run", 1), dict.fromkeys([]))[r["case"]] = None
    if len(runs) > 1:
        # Each case is side by side within one run; different runs are different processes
        # (and machines of the same GPU model), so compare across cases with care.
        parts += ["Runs: " + "; ".join(f"run {k}: {', '.join(v)}" for k, v in runs.items()), ""]
    # A case measured in several runs gets a table per run (times of different processes and
    # machines are never put side by side).
    repeated = sum(len(cases) for cases in runs.values()) > len({c for v in runs.values() for c in v})
    for mode in dict.fromkeys(r["mode"] for r in rows):
        if not repeated:
            parts += [f"## {mode}", "", table(rows, mode), ""]
            continue
        for run in runs:
            of_run = [r for r in rows if r.get("run", 1) == run]
            if any(r["mode"] == mode for r in of_run):
                parts += [f"## {mode}, run {run}", "", table(of_run, mode), ""]
    notes = dict.fromkeys((r.get("run", 1), r.get("commit"), r["note"]) for r in rows if "note" in r)
    for run, commit, note in notes:
        parts += [f"Run {run}" + (f" ({commit})" if commit else "") + f": {note}", ""]
    mem = [r for r in rows if "extra_gib" in r]
    if mem:
        parts += ["## extra device memory of forward+backward", "",
                  "jax_flashkda: the rise of JAX's peak over the inputs in a fresh process "
                  "(its CUDA workspace is XLA scratch, which temp size does not count); "
                  "jax_chunked: XLA's temp allocation of the compiled step; fla: the rise of "
                  "torch's peak allocation. The peaks include the gradients.", "",
                  "| case | impl | GiB |", "|---|---|---|"]
        parts += [f"| {r['case']} | {r['impl']} | {r['extra_gib']} |" for r in mem]
        parts.append("")
    path.with_suffix(".md").write_text("\n".join(parts))
    chart(rows, path.with_suffix(".png"))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main(sys.argv[1])
