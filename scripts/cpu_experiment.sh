#!/usr/bin/env bash
# The report's experiment at CPU scale on real CIFAR-10: one cifar_resnet20 teacher, then the
# cifar_resnet8 student baseline and every distillation mode, each with several seeds, the
# same student budget (presets/cpu-thin-student.yaml). Runs two trainings at a time, one
# thread each (2-core machine). Finished runs are skipped, so it can be restarted.
#
#   scripts/cpu_experiment.sh DATASET_DIR [RUNS_DIR]
#   SEEDS="0 1 2" MODES="logits hidden hidden-trained hybrid" PARALLEL=2 scripts/cpu_experiment.sh ../shared/data/cifar10
# then:  python -m kd.report RUNS_DIR --output RUNS_DIR/report.md
set -euo pipefail
DATASET=${1:?usage: scripts/cpu_experiment.sh DATASET_DIR [RUNS_DIR]}
RUNS=${2:-outputs/cpu-thin}
SEEDS=${SEEDS:-0 1 2}
MODES=${MODES:-logits hidden hidden-trained hybrid}
PARALLEL=${PARALLEL:-2}
EXTRA=${EXTRA:-}   # more flags for every student-side run, e.g. "--temperature 2"
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
COMMON=(--dataset "$DATASET" --report-to none)

train() {  # OUT SCRIPT ARGS...: run unless OUT already holds finished metrics; log wall time
  local out=$1; shift
  [ -f "$out/metrics.json" ] && return 0
  local start=$SECONDS
  mkdir -p "$out"
  python "$@" --output-dir "$out" --overwrite "${COMMON[@]}" > "$out.log" 2>&1 || { echo "FAILED: $out (see $out.log)"; return 1; }
  echo "$out: $((SECONDS - start)) s wall, $(python -c "import json;m=json.load(open('$out/metrics.json'))['test'];print(f\"test acc {m['accuracy']:.4f} f1 {m['f1_macro']:.4f}\")")"
}

train "$RUNS/teacher" train_teacher.py --config presets/cpu-thin-teacher.yaml
jobs_list=()
for seed in $SEEDS; do
  jobs_list+=("$RUNS/student-s$seed train_student.py --config presets/cpu-thin-student.yaml --seed $seed")
  for mode in $MODES; do
    jobs_list+=("$RUNS/$mode-s$seed distill.py --mode $mode --teacher $RUNS/teacher --config presets/cpu-thin-student.yaml --seed $seed $EXTRA")
  done
done
for job in "${jobs_list[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || true; done
  # shellcheck disable=SC2086
  train $job &
done
wait
python -m kd.report "$RUNS" --output "$RUNS/report.md"
