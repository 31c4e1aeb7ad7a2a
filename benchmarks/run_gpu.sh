#!/usr/bin/env bash
# One device call: install the carried wheels, build jax_flashkda's modules in place, run the GPU
# tests, then time everything side by side. Logs and the json land under $OUT.
#   MODES="fwd fwd_bwd" CASES="..." IMPLS="..." TESTS=0 to skip the tests. The compile caches
#   come back as $OUT/*_cache.tgz (keep BENCH_TIMEOUT, default 540 s, inside the call's limit):
#   put them in .device_cache/ and carry it next time.
# Peers that are not importable (FlashKDA is built separately, it is not on PyPI) are skipped.
JAX_CACHE=1 source "$(dirname "$0")/../scripts/device_preamble.sh"
bash scripts/build_cuda_module.sh "$OUT/build.log" >"$OUT/ptxas.txt" || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import jax_flashkda as k; print('cuda:', k.cuda_unavailable_reason() or 'ready')"

if [ "${TESTS:-1}" = 1 ]; then
  (cd tests && timeout 420 python3 -m pytest -q -rfE -m gpu -p no:cacheprovider . 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15)
fi
# A peer build started beside this script (PEER_BUILD_PID) must finish before the timings.
while [ -n "${PEER_BUILD_PID:-}" ] && kill -0 "$PEER_BUILD_PID" 2>/dev/null; do sleep 2; done
timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/bench_gpu.py --modes ${MODES:-fwd fwd_bwd} \
  ${CASES:+--cases $CASES} ${IMPLS:+--impls $IMPLS} --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
save_compile_caches
