#!/usr/bin/env bash
# One device call for the CUDA backward: build _kda_cuda with CMake, run tests/test_cuda_bwd.py,
# time forward/backward at the two benchmark shapes (BENCH=1), sanitize once (SANITIZE=1).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kda_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi -L
PY=$(command -v python3)
cmake -S . -B build/bwd-gpu -G Ninja -DJAX_FLASHKDA_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$PY" >"$OUT/build.log" 2>&1 &&
  cmake --build build/bwd-gpu --target _kda_cuda -j 16 >>"$OUT/build.log" 2>&1 ||
  { tail -40 "$OUT/build.log"; exit 1; }
cp build/bwd-gpu/_kda_cuda*.so jax_flashkda/
export PYTHONPATH=$PWD
grep -A2 "kda_bwd" "$OUT/build.log" | grep -E "registers|spill" | sort | uniq -c

if [ "${TESTS:-1}" = 1 ]; then
  KDA_BWD_ERRLOG="$OUT/relerr.log" timeout 420 "$PY" -m pytest -q -rfE -p no:cacheprovider \
    tests/test_cuda_bwd.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25
  cat "$OUT/relerr.log" 2>/dev/null
fi

if [ "${BENCH:-1}" = 1 ]; then
  for shape in big long; do
    timeout 150 "$PY" scripts/bench_cuda_bwd.py --shape $shape 2>&1 | tee -a "$OUT/bench.log" | tail -3
  done
fi

if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool $tool --kernel-name regex=kda_bwd --print-limit 20 \
      "$PY" scripts/sanitize_bwd_case.py >"$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi
