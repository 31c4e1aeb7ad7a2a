#!/usr/bin/env bash
# The one entry point for work on the GPU machine: builds the CUDA module in place, runs the
# steps asked for, writes every log under $OUT (default /tmp/kda_out) and prints a short table
# of what ran, last.
#
#   scripts/gpu_session.sh [STEP ...]          or   STEPS="STEP ..." scripts/gpu_session.sh
#
# Steps run in this order whatever the order given; `all` is every step, `help` prints this.
#   build     always, first: scripts/build_cuda_module.sh (build.log; ptxas report ptxas.txt)
#   test      the GPU tests: TEST_FILES (pytest arguments; default the CUDA test files and
#             test_vs_fla; TEST_FILES=all: every test marked gpu), TEST_TIMEOUT (default 420 s:
#             test_vs_fla compiles and autotunes fla's Triton kernels first) (pytest.log;
#             relerr.log: the measured gradient errors)
#   sanitize  compute-sanitizer SANITIZE_TOOLS (default "memcheck racecheck") over
#             scripts/sanitize_cases.py SANITIZE_ARGS ("split": the sequence split's cases
#             alone; "split_forward": its CUDA forward alone; "head64": the K = V = 64
#             backward's), kernels matching kda_, with XLA_PYTHON_CLIENT_ALLOCATOR=platform
#             (sanitize_<tool>.log)
#   profile   full ncu reports at NCU_SHAPES (scripts/time_kernels.py shapes, default "big
#             long"), per SASS line too; NCU_KERNEL (regex, default kda_), NCU_COUNT (default 2),
#             NCU_TIME_ARGS (default --no-backward; for the backward's kernels NCU_KERNEL=kda_bwd
#             NCU_TIME_ARGS="") (ncu_<shape>.log, ncu_<shape>_sass.csv: stall samples by SASS
#             line, sass.txt)
#   ktimes    each kernel's duration (ncu, one metric) at NCU_SHAPES; NCU_KERNEL, NCU_COUNT
#             (default 12), NCU_TIME_ARGS (default: forward and backward) (ktimes_<shape>.csv)
#   time      our kernels alone, scripts/time_kernels.py --warps WARPS (default auto) TIME_ARGS
#             (time.log). With BASELINE=dir (a carried, git-excluded `git archive <commit>` of an
#             earlier tree) that tree is built too and the two are timed interleaved, baseline,
#             ours, baseline, ours; TIME_ARGS then defaults to --shapes big long b4 --iters 15
#             (ab.log)
#   bench     benchmarks/bench_gpu.py side by side with the peers: --modes MODES (default "fwd
#             fwd_bwd"), --cases CASES, --impls IMPLS (default all), BENCH_TIMEOUT (default
#             540 s) (gpu.json, gpu.md through benchmarks/report.py, bench.log)
#   decode    benchmarks/bench_decode.py DECODE_ARGS (e.g. "--tokens 1 4 16"), DECODE_TIMEOUT
#             (default 300 s) (decode.json, decode.md, decode.log)
#
# Without steps: test and time, as switched by TESTS=0 and TIME=0, plus sanitize, profile,
# ktimes, bench and decode where SANITIZE=1, NCU=1, KTIMES=1, BENCH=1 or DECODE=1.
# One device call is limited in time (10 minutes): ask for the steps that fit.
#
# Peers, for bench and decode (that machine has no network): device_preamble.sh installs every
# wheel carried in the git-excluded .whl/ (fla-core, jax-linear-attention, nvidia-cutlass, ...).
# FlashKDA is not on PyPI: a copy of its source tree carried at FLASHKDA_SRC (default .flashkda/,
# kept out of git) is built in the background while the tests run, with its CUTLASS headers
# taken from the nvidia-cutlass wheel where the tree has none, into /tmp/flashkda_site (on
# PYTHONPATH; flashkda_build.log), packed as $OUT/flashkda_site.tgz: carried back in
# .device_cache/, it is unpacked instead of built. A peer build started outside this script
# (PEER_BUILD_PID) is waited for too. Timings start only after both builds are done.
#
# Compile caches: Triton's (with the autotune results of fla's kernels) and, for bench and
# decode, JAX's persistent one come from .device_cache/ when carried and go back as
# $OUT/*_cache.tgz: put them in .device_cache/ and carry it next time (most of a peer
# benchmark's time is compiling and autotuning).

# shellcheck disable=SC2329  # the step_* functions are called as "step_$name"
ALL_STEPS="test sanitize profile ktimes time bench decode"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

requested=("$@")
[ ${#requested[@]} -eq 0 ] && [ -n "${STEPS:-}" ] && read -ra requested <<<"$STEPS"
if [ ${#requested[@]} -eq 0 ]; then
  [ "${TESTS:-1}" = 1 ] && requested+=(test)
  [ "${SANITIZE:-0}" = 1 ] && requested+=(sanitize)
  [ "${NCU:-0}" = 1 ] && requested+=(profile)
  [ "${KTIMES:-0}" = 1 ] && requested+=(ktimes)
  { [ "${TIME:-1}" = 1 ] || [ -n "${BASELINE:-}" ]; } && requested+=(time)
  [ "${BENCH:-0}" = 1 ] && requested+=(bench)
  [ "${DECODE:-0}" = 1 ] && requested+=(decode)
fi
declare -A want=()
for s in "${requested[@]}"; do
  case $s in
    -h | --help | help) usage; exit 0 ;;
    all) for a in $ALL_STEPS; do want[$a]=1; done ;;
    build) ;;
    test | sanitize | profile | ktimes | time | bench | decode) want[$s]=1 ;;
    *) echo "gpu_session.sh: unknown step '$s' (steps: build $ALL_STEPS all help)" >&2; exit 2 ;;
  esac
done
wants() { [ -n "${want[$1]:-}" ]; }

# JAX's persistent cache only for the benchmarks: the tests compile their own programs.
if wants bench || wants decode; then JAX_CACHE=${JAX_CACHE:-1}; fi
# shellcheck source=scripts/device_preamble.sh
source "$(dirname "$0")/device_preamble.sh"
JAX_CACHE_ENV=()
if [ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_CACHE_ENV=("JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR"
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-2}")
  unset JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
fi
PY=$(command -v python3)
SITE=${PYTHONPATH:-}
if [ -n "${BASELINE:-}" ]; then
  BASELINE=$(cd "$BASELINE" && pwd) || { echo "gpu_session.sh: BASELINE is no directory" >&2; exit 2; }
fi
NCU_SHAPES=${NCU_SHAPES:-big long}

# The table: one row per step, "name|result|seconds|summary".
ROWS=()
FAILED=0
SUMMARY=
# record NAME RESULT SECONDS SUMMARY [peer]: a peer's failure does not fail the session.
record() { ROWS+=("$1|$2|$3|${4//|//}"); [ "$2" = ok ] || [ -n "${5:-}" ] || FAILED=1; }
step() {
  local name=$1 t0=$SECONDS rc
  echo
  echo "== $name"
  SUMMARY=
  "step_$name"
  rc=$?
  record "$name" "$([ $rc = 0 ] && echo ok || echo "FAIL rc=$rc")" $((SECONDS - t0)) "$SUMMARY"
}
finish() {
  save_compile_caches
  {
    echo
    printf '%-9s %-11s %5s  %s\n' step result s summary
    local row name result secs summary
    for row in "${ROWS[@]}"; do
      IFS='|' read -r name result secs summary <<<"$row"
      printf '%-9s %-11s %5s  %s\n' "$name" "$result" "$secs" "$summary"
    done
    echo "logs: $OUT"
  } | tee "$OUT/summary.txt"
  exit $FAILED
}

# Short summaries of the timing logs for the table.
summarise() {
  "$PY" - "$@" 2>/dev/null <<'EOF'
import re, sys
kind, path = sys.argv[1], sys.argv[2]
LABEL = re.compile(r"(\S+?)(?: B=\S+ T=\S+ H=\S+ warps=(\S+)| split=(\S+))?:")
METRIC = re.compile(r"(fwd\+bwd|fwd|bwd) ([\d.]+) ms")

def parse(line):
    m = LABEL.match(line)
    if not m:
        return None, []
    label = m[1] + (f"/w{m[2]}" if m[2] and m[2] != "auto" else "") + (f"/split={m[3]}" if m[3] else "")
    return label, METRIC.findall(line)

lines = open(path).read().splitlines()
if kind == "time":
    out = {}
    for line in lines:
        label, metrics = parse(line)
        for name, ms in metrics:
            out.setdefault(label, []).append(f"{name} {ms}")
    if out:
        print("; ".join(f"{k} {' '.join(v)}" for k, v in out.items()) + " (ms)")
elif kind == "ab":
    best, tree = {}, None
    for line in lines:
        if line.startswith("== "):
            tree = "base" if tree in (None, "ours") else "ours"
            continue
        label, metrics = parse(line)
        for name, ms in metrics:
            key = (label, name)
            best.setdefault(key, {}).setdefault(tree, []).append(float(ms))
    cells = {}
    for (label, name), t in best.items():
        if name != "bwd" and "base" in t and "ours" in t:
            b, o = min(t["base"]), min(t["ours"])
            cells.setdefault(label, []).append(f"{name} {b:.3f}->{o:.3f} ({100 * (o / b - 1):+.0f}%)")
    print("baseline->ours ms, best of 2: "
          + "; ".join(f"{k} {', '.join(v)}" for k, v in cells.items()))
elif kind == "ktimes":
    ms = [float(l.split()[-1]) for l in lines if l.startswith("  ")]
    print(f"{len(ms)} launches, {sum(ms):.3f} ms")
elif kind == "rows":
    import json
    rows = json.load(open(path))
    print(f"{len(rows)} rows")
EOF
}

step_build() {
  bash scripts/build_cuda_module.sh "$OUT/build.log" | tee "$OUT/ptxas.txt"
  local rc=$?
  [ "$rc" = 0 ] || { SUMMARY="build failed: build.log"; return "$rc"; }
  local ready spills
  ready=$(PYTHONPATH=$PWD${SITE:+:$SITE} "$PY" -c \
    "import jax_flashkda as k; print(k.cuda_unavailable_reason() or 'ready')" 2>&1 | tail -1)
  echo "cuda: $ready"
  spills=$(grep -cE '\b[1-9][0-9]* bytes spill' "$OUT/build.log")
  SUMMARY="cuda: $ready; ptxas lines with spills: $spills"
  [ "$ready" = ready ]
}

# FlashKDA from a carried source tree, in the background (see the header).
FLASHKDA_SRC=${FLASHKDA_SRC:-.flashkda}
FLASHKDA_PID=
start_flashkda_build() {
  # A build of an earlier call, carried back in .device_cache/ (minutes saved).
  if [ -f .device_cache/flashkda_site.tgz ]; then
    tar xzf .device_cache/flashkda_site.tgz -C /tmp &&
      export PYTHONPATH=/tmp/flashkda_site${PYTHONPATH:+:$PYTHONPATH} &&
      echo "FlashKDA: from .device_cache/flashkda_site.tgz" && return 0
  fi
  [ -d "$FLASHKDA_SRC" ] || return 0
  local src=/tmp/flashkda_src cutlass
  rm -rf "$src" && cp -r "$FLASHKDA_SRC" "$src" || return 0
  # An archived tree is no git checkout: setup.py's `git submodule update` must not run (newer
  # FlashKDA raises when it fails; older ones ignore it).
  if [ -f "$src/build_utils.py" ]; then
    printf 'def update_cutlass_submodule(repo_dir):\n    pass\n' >"$src/build_utils.py"
  fi
  if [ ! -d "$src/cutlass/include/cutlass" ]; then
    cutlass=$("$PY" -c 'import importlib.util as u, os
s = u.find_spec("cutlass_library")
print(os.path.join(s.submodule_search_locations[0], "source"))' 2>/dev/null)
    if [ -d "$cutlass/include/cutlass" ]; then
      rm -rf "$src/cutlass" && ln -s "$cutlass" "$src/cutlass"
    else
      echo "FlashKDA: no cutlass/include in $FLASHKDA_SRC and no nvidia-cutlass wheel; building anyway"
    fi
  fi
  FLASHKDA_T0=$SECONDS
  FLASH_KDA_CUDA_ARCHS=90a "$PY" -m pip install -q --no-build-isolation --no-deps --no-compile \
    --target /tmp/flashkda_site "$src" >"$OUT/flashkda_build.log" 2>&1 &
  FLASHKDA_PID=$!
  export PYTHONPATH=/tmp/flashkda_site${PYTHONPATH:+:$PYTHONPATH}
  echo "FlashKDA: building $FLASHKDA_SRC in the background (pid $FLASHKDA_PID)"
}
wait_peer_builds() {
  if [ -n "$FLASHKDA_PID" ]; then
    if wait "$FLASHKDA_PID"; then
      record flashkda ok $((SECONDS - FLASHKDA_T0)) "built into /tmp/flashkda_site"
      tar czf "$OUT/flashkda_site.tgz" -C /tmp flashkda_site
    else
      tail -20 "$OUT/flashkda_build.log"
      record flashkda FAIL $((SECONDS - FLASHKDA_T0)) "flashkda_build.log (its rows are skipped)" peer
    fi
    FLASHKDA_PID=
  fi
  while [ -n "${PEER_BUILD_PID:-}" ] && kill -0 "$PEER_BUILD_PID" 2>/dev/null; do sleep 2; done
}

step_test() {
  local args rc
  if [ "${TEST_FILES:-}" = all ]; then
    args=(-m gpu tests)
  else
    read -ra args <<<"${TEST_FILES:-tests/test_robust_cuda.py tests/test_cuda_fwd.py tests/test_cuda_bwd.py tests/test_cuda_decode.py tests/test_vs_fla.py}"
  fi
  KDA_BWD_ERRLOG="$OUT/relerr.log" timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest -q -rfE \
    --durations=6 -p no:cacheprovider "${args[@]}" 2>&1 | tee "$OUT/pytest.log" | tail -25
  rc=$?
  cat "$OUT/relerr.log" 2>/dev/null
  SUMMARY=$(grep -E '[0-9]+ (passed|failed|error)|no tests ran' "$OUT/pytest.log" | tail -1 |
    tr -d '=' | sed -E 's/^ +| +$//g')
  [ "$rc" = 124 ] && SUMMARY="timed out after ${TEST_TIMEOUT:-420} s;$SUMMARY"
  return "$rc"
}

step_sanitize() {
  local tool r rc=0 line parts=()
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    # The platform allocator: inside JAX's preallocated pool an out-of-bounds access that stays
    # in the pool is invisible to the sanitizer. No autotuning: XLA's GEMM autotuner (split.py's
    # fp32 dots) runs a delay kernel that timed out under the sanitizer. The sanitizer still
    # died on the split's cases with it off (segfault, 2026-12-07, cause unknown;
    # SANITIZE_ARGS=split_forward runs the split forward alone, without the dots).
    # shellcheck disable=SC2086  # SANITIZE_ARGS: words for sanitize_cases.py
    XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_FLAGS="--xla_gpu_autotune_level=0 ${XLA_FLAGS:-}" timeout "${SANITIZE_TIMEOUT:-300}" compute-sanitizer \
      --tool "$tool" --kernel-name regex=kda_ --print-limit 20 --error-exitcode 86 \
      "$PY" scripts/sanitize_cases.py ${SANITIZE_ARGS:-} >"$OUT/sanitize_$tool.log" 2>&1
    r=$?
    line=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -2 |
      sed -E 's/^=+ *//' | tr '\n' ' ')
    echo "compute-sanitizer $tool rc=$r: $line"
    parts+=("$tool: ${line:-no summary, rc=$r}")
    [ "$r" = 0 ] || rc=$r
  done
  SUMMARY=$(IFS=';'; echo "${parts[*]}")
  return "$rc"
}

step_profile() {
  local shape rc=0
  cuobjdump -sass jax_flashkda/_kda_cuda*.so >"$OUT/sass.txt" 2>&1
  for shape in $NCU_SHAPES; do
    # shellcheck disable=SC2086  # NCU_TIME_ARGS: words for time_kernels.py
    timeout 240 ncu --kernel-name "regex:${NCU_KERNEL:-kda_}" --launch-skip 2 \
      --launch-count "${NCU_COUNT:-2}" --set full --import-source yes -f -o "/tmp/ncu_$shape" \
      "$PY" scripts/time_kernels.py --shapes "$shape" --iters 1 ${NCU_TIME_ARGS---no-backward} \
      >"$OUT/ncu_$shape.log" 2>&1 || rc=$?
    ncu --import "/tmp/ncu_$shape.ncu-rep" --page details >>"$OUT/ncu_$shape.log" 2>&1
    ncu --import "/tmp/ncu_$shape.ncu-rep" --page source --csv --print-source sass \
      >"$OUT/ncu_${shape}_sass.csv" 2>&1
    echo "ncu $shape:"
    grep -E "^  [a-z_: ]*kda_|Duration|DRAM Throughput|Warp Cycles Per Issued|Issued Ipc" \
      "$OUT/ncu_$shape.log" | sed -E 's/\((Fwd|Bwd)Params.*//' | head -40
  done
  SUMMARY="ncu_<shape>.log, ncu_<shape>_sass.csv for: $NCU_SHAPES"
  return "$rc"
}

step_ktimes() {
  local shape rc=0 parts=()
  for shape in $NCU_SHAPES; do
    echo "kernel times, $shape (ms):"
    # shellcheck disable=SC2086  # NCU_TIME_ARGS: words for time_kernels.py
    timeout 240 ncu --kernel-name "regex:${NCU_KERNEL:-kda_}" --launch-count "${NCU_COUNT:-12}" \
      --metrics gpu__time_duration.sum --csv "$PY" scripts/time_kernels.py --shapes "$shape" \
      --iters 1 ${NCU_TIME_ARGS:-} 2>"$OUT/ktimes_$shape.err" | tee "$OUT/ktimes_$shape.csv" |
      "$PY" -c 'import csv, sys
rows = [r for r in csv.reader(sys.stdin) if len(r) > 10 and r[-3] == "gpu__time_duration.sum"]
for r in rows:
    unit = r[-2]
    ms = float(r[-1].replace(",", "")) / {"ns": 1e6, "nsecond": 1e6, "us": 1e3, "usecond": 1e3, "ms": 1, "msecond": 1}[unit]
    name = r[4].split("(")[0].split("<")[0]
    print(f"  {name:40s} {ms:8.3f}")' | tee "$OUT/ktimes_$shape.txt" || rc=$?
    parts+=("$shape $(summarise ktimes "$OUT/ktimes_$shape.txt")")
  done
  SUMMARY=$(IFS=';'; echo "${parts[*]}")
  return "$rc"
}

step_time() {
  wait_peer_builds
  local tree rc=0
  if [ -n "${BASELINE:-}" ]; then
    wait "$BASELINE_PID" || { SUMMARY="baseline build failed: baseline_build.log"; return 1; }
    for tree in "$BASELINE" "$PWD" "$BASELINE" "$PWD"; do
      echo "== $tree" | tee -a "$OUT/ab.log"
      # shellcheck disable=SC2086  # TIME_ARGS: words for time_kernels.py
      (cd "$tree" && PYTHONPATH=$tree${SITE:+:$SITE} timeout 120 "$PY" scripts/time_kernels.py \
        ${TIME_ARGS:---shapes big long b4 --iters 15} 2>&1 | grep -E "fwd|bwd") |
        tee -a "$OUT/ab.log" || rc=$?
    done
    SUMMARY=$(summarise ab "$OUT/ab.log")
  else
    # shellcheck disable=SC2086  # TIME_ARGS: words for time_kernels.py
    timeout 300 "$PY" scripts/time_kernels.py --warps "${WARPS:-auto}" ${TIME_ARGS:-} 2>&1 |
      tee "$OUT/time.log"
    rc=$?
    SUMMARY=$(summarise time "$OUT/time.log")
  fi
  return "$rc"
}

step_bench() {
  wait_peer_builds
  local rc skipped
  # shellcheck disable=SC2086  # MODES, CASES, IMPLS: lists of words
  env "${JAX_CACHE_ENV[@]}" timeout "${BENCH_TIMEOUT:-540}" "$PY" benchmarks/bench_gpu.py \
    --modes ${MODES:-fwd fwd_bwd} ${CASES:+--cases $CASES} ${IMPLS:+--impls $IMPLS} \
    --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
  rc=$?
  [ -s "$OUT/gpu.json" ] && "$PY" benchmarks/report.py "$OUT/gpu.json" >/dev/null 2>>"$OUT/bench.log"
  skipped=$(awk '/ skipped: / { print $2 }' "$OUT/bench.log" | sort -u | tr '\n' ' ')
  SUMMARY="$(summarise rows "$OUT/gpu.json") in gpu.json, gpu.md${skipped:+; skipped: $skipped}"
  return "$rc"
}

step_decode() {
  wait_peer_builds
  local rc
  # shellcheck disable=SC2086  # DECODE_ARGS: words for bench_decode.py
  env "${JAX_CACHE_ENV[@]}" timeout "${DECODE_TIMEOUT:-300}" "$PY" benchmarks/bench_decode.py \
    --out "$OUT/decode.json" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log"
  rc=$?
  [ -s "$OUT/decode.json" ] && "$PY" benchmarks/report.py "$OUT/decode.json" >/dev/null 2>>"$OUT/decode.log"
  SUMMARY="$(summarise rows "$OUT/decode.json") in decode.json, decode.md"
  return "$rc"
}

step build
[ "$FAILED" = 0 ] || finish
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if wants time && [ -n "${BASELINE:-}" ]; then
  (cd "$BASELINE" && bash scripts/build_cuda_module.sh "$OUT/baseline_build.log" >/dev/null) &
  BASELINE_PID=$!
fi
if wants bench && { [ -z "${IMPLS:-}" ] || [[ " $IMPLS " == *" flashkda "* ]]; }; then
  start_flashkda_build
fi
for s in $ALL_STEPS; do
  wants "$s" && step "$s"
done
wait_peer_builds
finish
