# shellcheck shell=bash
# Sourced by the scripts that run on the GPU machine: strict pipes, unbuffered Python, logs
# under $OUT, the repository root as the working directory, the GPUs named in the log, and the
# wheels carried in the git-excluded .whl/ (fla-core, ...: that machine has no network)
# installed into /tmp/site and put on PYTHONPATH. Compile caches (Triton's, with the autotune
# results of fla's kernels, and with JAX_CACHE=1 JAX's persistent one) come from the
# git-excluded .device_cache/ when carried, and `save_compile_caches` packs them into $OUT for the next call: most of a peer
# benchmark's time is compiling and autotuning.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kda_out}
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
nvidia-smi -L
if ls .whl/*.whl >/dev/null 2>&1; then
  pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

export TRITON_CACHE_DIR=/tmp/triton_cache TRITON_CACHE_AUTOTUNING=1
COMPILE_CACHES=triton_cache
# JAX's cache only where a script asks (the benchmark): tests compile their own programs.
if [ "${JAX_CACHE:-0}" = 1 ]; then
  export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2
  COMPILE_CACHES="$COMPILE_CACHES jax_cache"
fi
for cache in $COMPILE_CACHES; do
  [ -f ".device_cache/$cache.tgz" ] && tar xzf ".device_cache/$cache.tgz" -C /tmp
done
save_compile_caches() {
  for cache in $COMPILE_CACHES; do
    [ -d "/tmp/$cache" ] || continue
    tar czf "$OUT/$cache.tgz" -C /tmp "$cache"
    # Files over 16 MiB do not come back: then Triton's autotune results alone (the kernels
    # they pick compile again in seconds).
    if [ "$(stat -c %s "$OUT/$cache.tgz")" -gt $((15 << 20)) ]; then
      if [ "$cache" = triton_cache ]; then
        (cd /tmp && find triton_cache -name '*.autotune.json' | tar czf "$OUT/$cache.tgz" -T -)
      else
        rm "$OUT/$cache.tgz"
      fi
    fi
  done
  ls -la "$OUT"/*_cache.tgz 2>/dev/null
}
