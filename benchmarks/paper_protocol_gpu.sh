#!/bin/bash
# la_seg_finetune at the LA paper protocol (full resolution 0.625 mm, patch 112x112x80, batch 4, SGD lr 0.01 x0.1
# every 2500, 6000 iterations, AMP) on one GPU, two runs side by side:
#   dev      cases 1-60 all labeled, evaluated on cases 61-80 (native grid, sliding-window stride 18/18/4)
#   release  all 80 labeled cases (a release candidate: python -m medssl package --weights ...)
# usage: bash benchmarks/paper_protocol_gpu.sh DATASET_DIR OUT [TRAIN_SECONDS] [SECONDS_PER_ITERATION]
#   TRAIN_SECONDS (default: no limit): wall-clock budget of the two trainings. With SECONDS_PER_ITERATION (measured
#   for two runs side by side) the iteration count is cut to what fits, rounded down to 250, and the learning-rate
#   step scaled with it (2500/6000 of the iterations), so a short lease gives a complete, shorter schedule instead of
#   a truncated one; a run still unfinished at the limit is stopped and its newest checkpoint used.
# ITERATIONS=N fixes the iteration count; EXTRA="--patch_size [32,32,32] ..." adds bundle overrides (smoke tests).
# Writes OUT/<run>.model.fp16.{0,1}.pt (the weights in half precision, split to stay under 16 MiB a file; load with
# medssl.weights.load_split_state) and OUT/logs.tar.gz (training logs, dev metrics, the schedule used).
set -u
DATA=$(realpath "$1"); OUT=$(realpath "$2"); BUDGET=${3:-0}; SPI=${4:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE/shared${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/paper_protocol}
mkdir -p "$OUT" "$WORK"
ITERS=${ITERATIONS:-$($PY -c "b, s = float('$BUDGET'), float('$SPI'); print(6000 if b <= 0 or s <= 0 else max(250, min(6000, int(b / s) // 250 * 250)))")}
LR_STEP=$((ITERS * 2500 / 6000))
echo "schedule: $ITERS iterations, lr x0.1 every $LR_STEP (budget ${BUDGET}s, ${SPI}s/iteration)" | tee "$WORK/schedule.txt"
$PY -m medssl dev_split --dataset_dir "$DATA" --out "$WORK/dev" --num_train 60 > /dev/null || exit 1
TRAIN=(-m monai.bundle run --config_file "$HERE/bundles/la_seg_finetune/configs/train.json" --max_iterations $ITERS
       --lr_step $LR_STEP --save_interval 250 --num_workers ${NUM_WORKERS:-6} ${EXTRA:-})
LIMIT=(); [ "${BUDGET%.*}" -gt 0 ] && LIMIT=(timeout --signal=INT --kill-after=30 $((${BUDGET%.*} + 60)))
"${LIMIT[@]}" $PY "${TRAIN[@]}" --bundle_root "$WORK/dev" --dataset_dir "$WORK/dev" --num_labeled 60 > "$WORK/dev.log" 2>&1 &
"${LIMIT[@]}" $PY "${TRAIN[@]}" --bundle_root "$WORK/release" --dataset_dir "$DATA" --num_labeled 80 > "$WORK/release.log" 2>&1 &
wait
for run in dev release; do
  $PY -c "from medssl.weights import finish_from_checkpoint as f; print(f('$WORK/$run/models'))" >> "$WORK/$run.log" 2>&1
done
$PY -m monai.bundle run --config_file "['$HERE/bundles/la_seg_finetune/configs/train.json','$HERE/bundles/la_seg_finetune/configs/evaluate.json']" \
  --bundle_root "$WORK/dev" --dataset_dir "$WORK/dev" --sw_stride "[18,18,4]" ${EXTRA:-} > "$WORK/dev_eval.log" 2>&1
for run in dev release; do
  $PY -c "from medssl.weights import save_split_state as s; s('$WORK/$run/models/model.pt', '$OUT/$run.model.fp16')"
done
tar czf "$OUT/logs.tar.gz" -C "$WORK" schedule.txt dev.log release.log dev_eval.log dev/eval
