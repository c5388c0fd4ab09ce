#!/usr/bin/env bash
# The report's whole table on one GPU with a short schedule: the cifar_resnet14x4 teacher, the
# cifar_resnet8x4 student baseline and the four distillation modes, on full CIFAR-10 read from
# a local folder (nothing is downloaded). Prints each run's wall time, images/s and test
# metrics, then the comparison table. Not yet run on a GPU: see README "Results".
#
#   scripts/gpu_reproduce.sh DATASET_DIR [RUNS_DIR]
#   TEACHER_EPOCHS=18 STUDENT_EPOCHS=18 scripts/gpu_reproduce.sh /data/cifar10
set -euo pipefail
DATASET=${1:?usage: scripts/gpu_reproduce.sh DATASET_DIR [RUNS_DIR]}
RUNS=${2:-outputs/gpu}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-18}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-18}
MODES=${MODES:-logits hidden hidden-trained hybrid}
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled}
# global batch 512, peak lr 0.4 (0.2 per 256 images), bf16, channels_last: the short GPU recipe
RECIPE=(--batch-size 512 --lr 0.4 --warmup-epochs 1 --weight-decay 5e-4 --mixed-precision bf16 --channels-last
        --dataset "$DATASET" --report-to none --overwrite ${EXTRA:-})  # EXTRA: more flags, e.g. for a CPU smoke test

run() {  # NAME SCRIPT ARGS...
  local name=$1; shift
  local start=$SECONDS
  python "$@" "${RECIPE[@]}" --output-dir "$RUNS/$name" > "$RUNS/$name.log" 2>&1 || { echo "FAILED: $name"; tail -5 "$RUNS/$name.log"; exit 1; }
  python - "$RUNS/$name" $((SECONDS - start)) <<'PY'
import json, sys
run, wall = sys.argv[1], sys.argv[2]
test = json.load(open(f"{run}/metrics.json"))["test"]
history = [json.loads(line) for line in open(f"{run}/history.jsonl")]
train_s = sum(h["train_time_s"] for h in history)
ips = sorted(h["images_per_s"] for h in history)[len(history) // 2]
print(f"{run}: wall {wall} s, training {train_s:.0f} s, median {ips:.0f} img/s, test acc {test['accuracy']:.4f}, f1 {test['f1_macro']:.4f}")
PY
}

mkdir -p "$RUNS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
run teacher train_teacher.py --model cifar_resnet14x4 --epochs "$TEACHER_EPOCHS"
run student train_student.py --model cifar_resnet8x4 --epochs "$STUDENT_EPOCHS"
for mode in $MODES; do
  run "distill-$mode" distill.py --mode "$mode" --teacher "$RUNS/teacher" --epochs "$STUDENT_EPOCHS"
done
python -m kd.report "$RUNS" --output "$RUNS/report.md"
