#!/usr/bin/env bash
# One device call for kernel work: build the CUDA module, run the GPU tests, time our kernels.
#   TESTS=0 skips the tests, TEST_FILES picks them (TEST_TIMEOUT, default 420 s: test_vs_fla
#   compiles and autotunes fla's Triton kernels first); TIME=0 skips the timings; SANITIZE=1
#   adds compute-sanitizer memcheck + racecheck; NCU=1 adds full ncu reports at NCU_SHAPES
#   (big long), per SASS line too; KTIMES=1 prints each kernel's duration (ncu, one metric) at
#   NCU_SHAPES; WARPS=auto,1,2,4,8 times forward variants; BASELINE=dir (a carried, git-excluded
#   `git archive <commit>` of an earlier tree) builds that tree too and interleaves its timings
#   with ours (baseline, ours, baseline, ours). Logs, and the compile caches for the next call,
#   under $OUT.
source "$(dirname "$0")/device_preamble.sh"
PY=$(command -v python3)

bash scripts/build_cuda_module.sh "$OUT/build.log" || exit 1
[ -n "${BASELINE:-}" ] && { (cd "$BASELINE" && bash scripts/build_cuda_module.sh "$OUT/baseline_build.log" >/dev/null) & BASELINE_PID=$!; }
SITE=${PYTHONPATH:-}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${TESTS:-1}" = 1 ]; then
  KDA_BWD_ERRLOG="$OUT/relerr.log" timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest -q -rfE --durations=6 -p no:cacheprovider \
    ${TEST_FILES:-tests/test_robust_cuda.py tests/test_cuda_fwd.py tests/test_cuda_bwd.py tests/test_cuda_decode.py tests/test_vs_fla.py} 2>&1 | tee "$OUT/pytest.log" | tail -25
  cat "$OUT/relerr.log" 2>/dev/null
fi

if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    # The platform allocator: inside JAX's preallocated pool an out-of-bounds access that stays
    # in the pool is invisible to the sanitizer.
    XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout 300 compute-sanitizer --tool $tool \
      --kernel-name regex=kda_ --print-limit 20 \
      "$PY" scripts/sanitize_cases.py >"$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi

if [ "${NCU:-0}" = 1 ]; then
  # NCU_KERNEL picks the kernels (regex; for the backward's, NCU_KERNEL=kda_bwd with
  # NCU_TIME_ARGS="" so that time_kernels runs the backward too); the per-instruction table
  # (stall reasons by SASS line) lands in $OUT/ncu_<shape>_sass.csv, the SASS in $OUT/sass.txt.
  cuobjdump -sass jax_flashkda/_kda_cuda*.so >"$OUT/sass.txt" 2>&1
  for shape in ${NCU_SHAPES:-big long}; do
    timeout 240 ncu --kernel-name "regex:${NCU_KERNEL:-kda_}" --launch-skip 2 --launch-count "${NCU_COUNT:-2}" \
      --set full --import-source yes -f -o "/tmp/ncu_$shape" \
      "$PY" scripts/time_kernels.py --shapes "$shape" --iters 1 ${NCU_TIME_ARGS---no-backward} >"$OUT/ncu_$shape.log" 2>&1
    ncu --import "/tmp/ncu_$shape.ncu-rep" --page details >>"$OUT/ncu_$shape.log" 2>&1
    ncu --import "/tmp/ncu_$shape.ncu-rep" --page source --csv --print-source sass \
      >"$OUT/ncu_${shape}_sass.csv" 2>&1
    echo "ncu $shape:"
    grep -E "^  [a-z_: ]*kda_|Duration|DRAM Throughput|Warp Cycles Per Issued|Issued Ipc" \
      "$OUT/ncu_$shape.log" | sed -E 's/\((Fwd|Bwd)Params.*//' | head -40
  done
fi

if [ "${KTIMES:-0}" = 1 ]; then
  for shape in ${NCU_SHAPES:-big long}; do
    echo "kernel times, $shape (ms):"
    timeout 240 ncu --kernel-name "regex:${NCU_KERNEL:-kda_}" --launch-count "${NCU_COUNT:-12}" \
      --metrics gpu__time_duration.sum --csv "$PY" scripts/time_kernels.py --shapes "$shape" \
      --iters 1 ${NCU_TIME_ARGS:-} 2>"$OUT/ktimes_$shape.err" | tee "$OUT/ktimes_$shape.csv" |
      "$PY" -c 'import csv, sys
rows = [r for r in csv.reader(sys.stdin) if len(r) > 10 and r[-3] == "gpu__time_duration.sum"]
for r in rows:
    unit = r[-2]
    ms = float(r[-1].replace(",", "")) / {"ns": 1e6, "nsecond": 1e6, "us": 1e3, "usecond": 1e3, "ms": 1, "msecond": 1}[unit]
    name = r[4].split("(")[0].split("<")[0]
    print(f"  {name:40s} {ms:8.3f}")'
  done
fi

if [ -n "${BASELINE:-}" ]; then
  wait "$BASELINE_PID" || { echo "baseline build failed: $OUT/baseline_build.log"; exit 1; }
  for tree in "$BASELINE" "$PWD" "$BASELINE" "$PWD"; do
    echo "== $tree"
    (cd "$tree" && PYTHONPATH=$tree${SITE:+:$SITE} timeout 120 "$PY" scripts/time_kernels.py ${TIME_ARGS:---shapes big long b4 --iters 15} 2>&1 |
      grep -E "fwd|bwd") | tee -a "$OUT/ab.log"
  done
elif [ "${TIME:-1}" = 1 ]; then
  timeout 300 "$PY" scripts/time_kernels.py --warps "${WARPS:-auto}" ${TIME_ARGS:-} 2>&1 | tee "$OUT/time.log"
fi
save_compile_caches
