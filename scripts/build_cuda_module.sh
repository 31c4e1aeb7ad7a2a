#!/usr/bin/env bash
# Builds the extension modules with CMake next to the sources (jax_flashkda/_kda_*.so): faster
# than a pip build on the GPU machine, and independent of whether it has scikit-build-core.
# The log (ptxas register and spill report included) goes to $1.
set -o pipefail
log=${1:-/tmp/kda_build.log}
cd "$(dirname "$0")/.." || exit 1
PY=$(command -v python3)
cmake -S . -B build/gpu -G Ninja -DJAX_FLASHKDA_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$PY" >"$log" 2>&1 &&
  cmake --build build/gpu -j "$(nproc)" >>"$log" 2>&1 || { tail -40 "$log"; exit 1; }
cp build/gpu/_kda_*.so jax_flashkda/
grep -E "registers|spill" "$log" | sort | uniq -c | head -30 || true  # nothing when ninja had no work
