#!/usr/bin/env bash
# One device call for kernel work: build the CUDA module, run the GPU tests, time our kernels.
#   TESTS=0 skips the tests; SANITIZE=1 adds compute-sanitizer memcheck + racecheck;
#   NCU=1 adds per-kernel ncu sections at NCU_SHAPES (big long); WARPS=auto,1,2,4,8 times
#   forward variants. Logs under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kda_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi -L
PY=$(command -v python3)

# The CUDA module alone, next to the sources: faster than a pip build, and independent of
# whether the machine has scikit-build-core.
cmake -S . -B build/gpu -G Ninja -DJAX_FLASHKDA_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$PY" >"$OUT/build.log" 2>&1 &&
  cmake --build build/gpu -j 16 >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp build/gpu/_kda_*.so jax_flashkda/
export PYTHONPATH=$PWD
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | head -30

if [ "${TESTS:-1}" = 1 ]; then
  KDA_BWD_ERRLOG="$OUT/relerr.log" timeout 420 "$PY" -m pytest -q -rfE -p no:cacheprovider \
    tests/test_cuda_fwd.py tests/test_cuda_bwd.py 2>&1 | tee "$OUT/pytest.log" | tail -25
  cat "$OUT/relerr.log" 2>/dev/null
fi

if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 300 compute-sanitizer --tool $tool --kernel-name regex=kda_ --print-limit 20 \
      "$PY" scripts/sanitize_cases.py >"$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi

if [ "${NCU:-0}" = 1 ]; then
  for shape in ${NCU_SHAPES:-big long}; do
    timeout 240 ncu --kernel-name regex:kda_ --launch-skip 4 --launch-count 6 \
      --section SpeedOfLight --section WarpStateStats --section Occupancy \
      --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
      "$PY" scripts/time_kernels.py --shapes "$shape" --iters 1 >"$OUT/ncu_$shape.log" 2>&1
    echo "ncu $shape:"
    grep -E "^  [a-z_: ]*kda_|Duration|Memory Throughput|DRAM Throughput|Warp Cycles Per Issued" \
      "$OUT/ncu_$shape.log" | sed -E 's/\((Fwd|Bwd)Params.*//' | head -40
  done
fi

timeout 300 "$PY" scripts/time_kernels.py --warps "${WARPS:-auto}" 2>&1 | tee "$OUT/time.log"
