#!/usr/bin/env bash
# One call on a machine with 2 GPUs: build, run the multi_gpu tests (sharded training step,
# shard_map, sequence-sharded op), then train the example model on 1 GPU and on 2 (data
# parallel, and heads over a model axis) and record tokens/s per GPU to $OUT/multi_gpu.json.
# One GPU trains at every batch in SINGLE_BATCHES (default BATCH and BATCH/2): the same global
# batch (strong scaling) and the same batch per GPU as data=2 (weak scaling). Logs under $OUT.
source "$(dirname "$0")/device_preamble.sh"
bash scripts/build_cuda_module.sh "$OUT/build.log" || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ "${TESTS:-1}" = 1 ] && timeout 180 python3 -m pytest -q -rfE -p no:cacheprovider -m multi_gpu tests/test_multi_device.py tests/test_parallel.py \
  2>&1 | tee "$OUT/pytest_multi_gpu.log" | tail -8

# Large enough per step that kernels, not the per-step host round trip, set the pace.
BATCH=${BATCH:-64}
TRAIN="--steps ${STEPS:-30} --seq-len ${SEQ:-4096} --heads 4 --layers 2 --report $OUT/multi_gpu.json"
for batch in ${SINGLE_BATCHES:-$BATCH $((BATCH / 2))}; do
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 examples/train_lm.py $TRAIN --batch "$batch" 2>&1 | grep -v "^train" | tail -4
done
for mesh in ${MESHES:-data=2 data=1,model=2}; do
  timeout 150 python3 examples/train_lm.py $TRAIN --batch "$BATCH" --mesh $mesh 2>&1 | grep -v "^train" | tail -4
done
cat "$OUT/multi_gpu.json"
