#!/usr/bin/env bash
# Tuning on the validation split (never on test), seed 0, the same student budget as
# scripts/cpu_experiment.sh: one knob per mode, around its default. Compare with
#   python -m kd.report RUNS_DIR/tune RUNS_DIR/*-s0 --split val
#   scripts/cpu_tuning.sh DATASET_DIR [RUNS_DIR]
set -euo pipefail
DATASET=${1:?usage: scripts/cpu_tuning.sh DATASET_DIR [RUNS_DIR]}
RUNS=${2:-outputs/cpu-thin}
PARALLEL=${PARALLEL:-2}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {  # NAME ARGS...
  local name=$1; shift
  [ -f "$RUNS/tune/$name/metrics.json" ] && return 0
  mkdir -p "$RUNS/tune"
  local start=$SECONDS
  python distill.py --teacher "$RUNS/teacher" --config presets/cpu-thin-student.yaml --seed 0 --dataset "$DATASET" \
    --report-to none --overwrite --output-dir "$RUNS/tune/$name" "$@" > "$RUNS/tune/$name.log" 2>&1 || { echo "FAILED: $name"; return 1; }
  echo "$name: $((SECONDS - start)) s wall, val f1 $(python -c "import json;print(round(json.load(open('$RUNS/tune/$name/metrics.json'))['val']['f1_macro'],4))")"
}
jobs_list=(
  "logits-T2 --mode logits --temperature 2"
  "logits-T8 --mode logits --temperature 8"
  "hidden-f10 --mode hidden --hidden-factor 10"
  "hidden-trained-f10 --mode hidden-trained --hidden-factor 10"
)
for job in "${jobs_list[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || true; done
  # shellcheck disable=SC2086
  run $job &
done
wait
