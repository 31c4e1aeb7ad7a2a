# Sourced by the scripts that run on the GPU machine: strict pipes, unbuffered Python, logs
# under $OUT, the repository root as the working directory, the GPUs named in the log, and the
# wheels carried in the git-excluded .whl/ (fla-core, ...: that machine has no network)
# installed into /tmp/site and put on PYTHONPATH.
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
