"""The GPU check, in one call: the benchmark, then the report's pair (cifar_resnet14x4 ->
cifar_resnet8x4) on full CIFAR-10 with short schedules: the teacher on the training split
less the validation split (its validation accuracy judges the recipe), the final teacher on
all 50k training images, the student baseline and every distillation mode. Writes one JSON
summary and prints the comparison table. Reads the data from the folder it is given: nothing
is downloaded. Planned to fit 8 minutes of one H100.

    python scripts/gpu_check.py DATASET_DIR [--out DIR]
    python scripts/gpu_check.py DATASET_DIR --smoke      # CPU smoke test: tiny budgets, same steps
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd.data import is_local_dataset  # noqa: E402
from kd.distillers import DISTILLERS  # noqa: E402

PRESETS = REPO / "presets"
SMOKE_FLAGS = ["--epochs", "1", "--max-train-samples", "256", "--max-eval-samples", "128", "--val-size", "128", "--batch-size", "64"]


def train(name: str, script: str, args, out: Path, smoke: bool) -> dict:
    """Runs one training as a user would; returns its wall time, speed and metrics."""
    run_dir = out / name
    smoke_flags = SMOKE_FLAGS if smoke else []  # first: the run's own flags (the final teacher's --val-size 0) win
    command = [sys.executable, str(REPO / script), *smoke_flags, *map(str, args), "--output-dir", str(run_dir), "--overwrite", "--report-to", "none"]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(f"{name}: FAILED (exit {result.returncode}), see {out / (name + '.log')}", flush=True)
        return {"failed": result.returncode, "wall_s": round(wall, 1)}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    speeds = sorted(h["images_per_s"] for h in history)
    summary = {"wall_s": round(wall, 1), "train_s": round(sum(h["train_time_s"] for h in history), 1),
               "median_images_per_s": round(speeds[len(speeds) // 2]), "epochs": len(history),
               "test_accuracy": metrics["test"]["accuracy"], "test_f1_macro": metrics["test"]["f1_macro"],
               "val_accuracy": metrics.get("val", {}).get("accuracy"), "val_f1_macro": metrics.get("val", {}).get("f1_macro"),
               "mixed_precision": json.loads((run_dir / "run_config.json").read_text())["mixed_precision"]}
    val = f", val acc {summary['val_accuracy']:.4f}" if summary["val_accuracy"] is not None else ""
    print(f"{name}: wall {wall:.0f} s, training {summary['train_s']:.0f} s, {summary['median_images_per_s']} img/s, "
          f"test acc {summary['test_accuracy']:.4f}, f1 {summary['test_f1_macro']:.4f}{val}", flush=True)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="local CIFAR-10 folder (the Hub's parquet schema)")
    parser.add_argument("--out", default="outputs/gpu-check", help="folder for the runs, logs and gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets (1 epoch on 256 images) to test the script on a CPU")
    parser.add_argument("--modes", nargs="*", default=list(DISTILLERS), help="distillation modes (default: all)")
    args = parser.parse_args(argv)
    # absolute: the children run in the repository, which need not be where this was started
    out = Path(args.out).expanduser().resolve()
    if is_local_dataset(args.dataset):
        args.dataset = str(Path(args.dataset).expanduser().resolve())
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    summary = {"dataset": args.dataset, "smoke": args.smoke, "runs": {}}

    bench = [sys.executable, "-m", "kd.bench", "--dataset", args.dataset, "--output", str(out / "bench.json"), *(["--quick"] if args.smoke else [])]
    bench_run = subprocess.run(bench, cwd=REPO, capture_output=True, text=True)
    print(bench_run.stdout, flush=True)
    summary["bench"] = json.loads((out / "bench.json").read_text()) if bench_run.returncode == 0 else {"failed": bench_run.stderr[-2000:]}

    data = ["--dataset", args.dataset]
    runs = summary["runs"]
    runs["teacher-val"] = train("teacher-val", "train_teacher.py", [*data, "--config", PRESETS / "gpu-teacher.yaml"], out, args.smoke)
    # the final teacher: the recipe judged on validation above, now on every training image
    runs["teacher"] = train("teacher", "train_teacher.py", [*data, "--config", PRESETS / "gpu-teacher.yaml", "--val-size", "0"], out, args.smoke)
    student = [*data, "--config", PRESETS / "gpu-student.yaml"]
    runs["student"] = train("student", "train_student.py", student, out, args.smoke)
    if "failed" not in runs["teacher"]:
        for mode in args.modes:
            runs[f"distill-{mode}"] = train(f"distill-{mode}", "distill.py", [*student, "--mode", mode, "--teacher", out / "teacher"], out, args.smoke)

    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    finished = [str(out / name) for name, run in runs.items() if "failed" not in run]
    subprocess.run([sys.executable, "-m", "kd.report", *finished, "--output", str(out / "report.md")], cwd=REPO)
    print(f"gpu check: {summary['elapsed_s']:.0f} s in all; summary in {out / 'gpu_check.json'}")
    return 1 if any("failed" in run for run in runs.values()) or "failed" in summary["bench"] else 0


if __name__ == "__main__":
    sys.exit(main())
