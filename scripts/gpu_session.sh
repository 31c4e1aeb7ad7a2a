#!/usr/bin/env bash
# One device call: build the CUDA target, run the GPU tests, sanitize once, time the forward.
#   SANITIZE=1 adds compute-sanitizer memcheck + racecheck; NCU=1 adds per-kernel durations.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kda_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi -L

# pip needs the whole package (README, CPU target); when another part is mid-edit, build the
# CUDA module alone with CMake and put it next to the sources.
if JAX_FLASHKDA_CUDA=ON pip install --no-build-isolation -q -Cbuild-dir=build/gpu . >"$OUT/build.log" 2>&1; then
  echo "pip install: ok"
else
  echo "pip install failed (tail of $OUT/build.log below); building _kda_cuda with cmake"
  tail -5 "$OUT/build.log"
  cmake -S . -B build/gpu-cmake -G Ninja -DJAX_FLASHKDA_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v python)" >>"$OUT/build.log" 2>&1 &&
    cmake --build build/gpu-cmake --target _kda_cuda >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
find build/gpu build/gpu-cmake -maxdepth 1 -name '_kda_cuda*.so' -exec cp {} jax_flashkda/ \; 2>/dev/null
export PYTHONPATH=$PWD
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | head -20

timeout 300 python -m pytest -q -rfE tests/test_cuda_fwd.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -25

if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 200 compute-sanitizer --tool $tool --kernel-name regex=kda_ --print-limit 20 \
      python scripts/sanitize_case.py >"$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi

if [ "${NCU:-0}" = 1 ]; then
  for shape in ${NCU_SHAPES:-big long}; do
    timeout 200 ncu --kernel-name regex:kda_ --launch-skip 2 --launch-count 2 \
      --section SpeedOfLight --section WarpStateStats --section Occupancy \
      --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
      python scripts/bench_cuda_fwd.py --shapes "$shape" --iters 1 >"$OUT/ncu_$shape.log" 2>&1
    echo "ncu $shape:"
    grep -E "^  [a-z_: ]*kda_|Duration|Memory Throughput|Compute \(SM\) Throughput|DRAM Throughput|Stall|Warp Cycles Per Issued" \
      "$OUT/ncu_$shape.log" | sed -E 's/\(FwdParams.*//' | head -24
  done
fi

timeout 240 python scripts/bench_cuda_fwd.py --warps "${WARPS:-auto}" 2>&1 | tee "$OUT/bench.log"
