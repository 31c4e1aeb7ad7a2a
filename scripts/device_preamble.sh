# Sourced by the scripts that run on the GPU machine: strict pipes, unbuffered Python, logs
# under $OUT, the repository root as the working directory, and the GPUs named in the log.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kda_out}
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
nvidia-smi -L
