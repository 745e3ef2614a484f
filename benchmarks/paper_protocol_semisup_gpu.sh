#!/bin/bash
# Semi-supervised vs supervised at 8 labels at the LA paper protocol on one GPU (issue 21): la_seg_finetune
# (supervised-8), cvrl_semisup and simcvd_distill, side by side on the dev split (cases 1-60 train, the first 8
# labeled, the other 52 unlabeled; 61-80 test), full resolution 0.625 mm, patch 112x112x80, AMP, one schedule for all.
# usage: bash benchmarks/paper_protocol_semisup_gpu.sh DATASET_DIR OUT TRAIN_SECONDS
#   1. timing: the three trainings side by side for CALIBRATION_ITERATIONS (default 30) iterations; the slowest median
#      seconds per iteration sets the schedule: TRAIN_SECONDS / that, rounded down to ROUND=250 (250..6000), lr x0.1 at
#      2500/6000 of it. Chosen from the lease before any result; ITERATIONS=N fixes it instead.
#   2. `python -m medssl benchmark --profile paper --methods supervised,cvrl,simcvd --labels 8 --iterations N
#      --parallel 3`, then the evaluation on the native grid (sliding-window stride 18/18/4; no post-processing and
#      the largest component). STEPS=pretrain,train leaves the evaluation to another machine (a short lease):
#        bash benchmarks/paper_protocol_semisup_gpu.sh --evaluate DATASET_DIR DEVICE_OUT
#      unpacks DEVICE_OUT (what step 3 wrote there), puts the weights back and runs the same benchmark, which then
#      only evaluates, and writes DEVICE_OUT/evaluated/ (results.md with the paired Wilcoxon comparisons, PNGs).
#   3. OUT/results.tar.gz (results.json/md, PNGs, every step's log, per-case metrics, the schedule) and
#      OUT/<run>.model.fp16.{0,1}.pt (each run's final weights in half precision, under 16 MiB a file; load with
#      medssl.weights.load_split_state). At most 7 files, as a device's $OUT returns them.
# OVERRIDES='{"patch_size": [32, 32, 32], "sw_stride": [16, 16, 16]}' adds bundle overrides (smoke tests on a CPU:
#   CALIBRATION_ITERATIONS=3 ROUND=1 OVERRIDES=... bash benchmarks/paper_protocol_semisup_gpu.sh DATA OUT 20).
set -u
EVALUATE=0; [ "${1:-}" = "--evaluate" ] && { EVALUATE=1; shift; }
DATA=$(realpath "$1"); OUT=$(realpath -m "$2"); BUDGET=${3:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE/shared${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}; [[ $PY == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # cd below
WORK=${WORK:-/tmp/paper_semisup}
METHODS=supervised,cvrl,simcvd
mkdir -p "$OUT" "$WORK"
BENCH=(-m medssl benchmark --profile paper --dataset_dir "$DATA" --methods $METHODS --labels 8 --upper_bound false
       --parallel 3 ${OVERRIDES:+--overrides "$OVERRIDES"})

if [ $EVALUATE = 1 ]; then  # the device's runs, evaluated here
  BACK="$WORK/evaluate"; rm -rf "$BACK"; mkdir -p "$BACK"
  tar xzf "$OUT/results.tar.gz" -C "$BACK" || exit 1
  ITERS=$(sed -n 's/^schedule: \([0-9]*\) iterations.*/\1/p' "$BACK/schedule.txt" | tail -1)
  for part in "$OUT"/*.model.fp16.0.pt; do
    name=$(basename "$part" .model.fp16.0.pt)
    mkdir -p "$BACK/runs/$name/models"
    $PY -c "import torch; from medssl.weights import load_split_state as l; torch.save(l('$OUT/$name.model.fp16'), '$BACK/runs/$name/models/model.pt')" || exit 1
  done
  $PY "${BENCH[@]}" --iterations "$ITERS" --out "$BACK" 2>&1 | tee "$BACK/evaluate.log" | grep -v "^ *$" | tail -3
  rc=${PIPESTATUS[0]}
  mkdir -p "$OUT/evaluated"
  cp "$BACK"/results.json "$BACK"/results.md "$BACK"/*.png "$BACK/evaluate.log" "$OUT/evaluated/"
  for run in "$BACK"/runs/*/; do
    [ -f "$run/eval/metrics.csv" ] && cp "$run/eval/metrics.csv" "$OUT/evaluated/$(basename "$run").metrics.csv"
  done
  exit $rc
fi

if [ -z "${ITERATIONS:-}" ]; then
  N=${CALIBRATION_ITERATIONS:-30}
  start=$(date +%s)
  $PY "${BENCH[@]}" --iterations $N --steps train --out "$WORK/timing" > "$WORK/timing.log" 2>&1 \
    || { echo "timing runs failed: $WORK/timing.log"; tail -20 "$WORK/timing.log"; exit 1; }
  SPI=$($PY -c "
import json
runs = json.load(open('$WORK/timing/results.json'))['runs']
print(max(r['seconds_per_iteration'] for r in runs))")
  ITERS=$($PY -c "b, s, r = float('$BUDGET'), float('$SPI'), int('${ROUND:-250}'); print(6000 if b <= 0 else max(r, min(6000, int(b / s) // r * r)))")
  echo "timing: $N iterations side by side in $(( $(date +%s) - start )) s, slowest ${SPI} s/iteration" | tee "$WORK/schedule.txt"
else
  ITERS=$ITERATIONS; : > "$WORK/schedule.txt"
fi
echo "schedule: $ITERS iterations for every method, lr x0.1 every $((ITERS * 2500 / 6000)) (budget ${BUDGET}s)" | tee -a "$WORK/schedule.txt"

start=$(date +%s)
$PY "${BENCH[@]}" --iterations $ITERS --steps "${STEPS:-pretrain,train,evaluate}" --out "$WORK/bench" > "$WORK/bench.log" 2>&1
rc=$?
echo "benchmark: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$WORK/schedule.txt"
tail -5 "$WORK/bench.log"

cd "$WORK/bench"
for run in runs/*/; do
  name=$(basename "$run")
  [ -f "$run/models/model.pt" ] && $PY -c "from medssl.weights import save_split_state as s; s('$run/models/model.pt', '$OUT/$name.model.fp16')"
done
cp "$WORK/schedule.txt" "$WORK/bench.log" .
tar czf "$OUT/results.tar.gz" schedule.txt bench.log results.json results.md ./*.png runs/*/*.log runs/*/*.json runs/*/eval/metrics.csv 2>/dev/null
ls -la "$OUT"
exit $rc
