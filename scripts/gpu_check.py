"""The GPU check, in one call. Two profiles, both reading the data from the folder they are
given (nothing is downloaded) and writing gpu_check.json in --out:

--quick: at most 8 minutes (QUICK_LIMIT_S) on one H100/H200, so that it fits a 15-minute GPU
lease with the machine's start. Four steps, each with a time budget: bf16 training throughput
of the teacher, the student and a logits distillation step (python -m kd.bench.throughput, with
peak GPU memory); the teacher (cifar_resnet14x4) trained on all 50k training images; one
distillation mode (--mode, default logits) into the student (cifar_resnet8x4) on all 50k; the
benchmark (python -m kd.bench) with its time budget. Each step's time is estimated from its
FLOPs (kd.bench.budget) and printed before it runs; a step whose estimate exceeds its budget is
cut (fewer epochs or steps) or skipped, and one still running at its budget is stopped, each
with a note in gpu_check.json. See docs/gpu.md.

Without --quick: the benchmark, then the report's pair with the presets' schedules (about 20
minutes of one H100 by kd.bench.budget's assumed rate; not measured): the teacher on the training split less the validation split
(its validation accuracy judges the recipe), the final teacher on all 50k training images, the
student baseline and every distillation mode; then the comparison table (kd.report).

    python scripts/gpu_check.py DATASET_DIR --quick [--out DIR]
    python scripts/gpu_check.py DATASET_DIR [--out DIR]
    python scripts/gpu_check.py DATASET_DIR --smoke      # CPU smoke test of the full profile: tiny budgets, same steps
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

from kd.bench import budget as plans  # noqa: E402
from kd.bench.timing import STUDENT, TEACHER  # noqa: E402
from kd.data import is_local_dataset  # noqa: E402
from kd.distillers import DISTILLERS  # noqa: E402
from kd.errors import UsageError, main_guard  # noqa: E402
from kd.util.files import write_json_atomic  # noqa: E402

PRESETS = REPO / "presets"
SMOKE_FLAGS = ["--epochs", "1", "--max-train-samples", "256", "--max-eval-samples", "128", "--val-size", "128", "--batch-size", "64"]
CIFAR10_SIZES = (50_000, 10_000)  # a Hub id's (train, test) sizes; a local folder's are read from its parquet files
BENCH_START_S = 30  # of the bench step's budget, what kd.bench spends before its own clock starts (imports, the data)


def summarize(run_dir: Path) -> dict:
    """A run's speed from history.jsonl and, once it finished, its metrics."""
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()] if (run_dir / "history.jsonl").exists() else []
    summary = {"epochs": len(history)}
    if history:
        speeds = sorted(h["images_per_s"] for h in history)
        summary.update(train_s=round(sum(h["train_time_s"] for h in history), 1), median_images_per_s=round(speeds[len(speeds) // 2]))
    if (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        summary.update(test_accuracy=metrics["test"]["accuracy"], test_f1_macro=metrics["test"]["f1_macro"],
                       val_accuracy=metrics.get("val", {}).get("accuracy"), val_f1_macro=metrics.get("val", {}).get("f1_macro"),
                       mixed_precision=json.loads((run_dir / "run_config.json").read_text())["mixed_precision"])
    return summary


def train(name: str, script: str, args, out: Path, smoke: bool) -> dict:
    """Runs one training as a user would (the full profile); returns its wall time, speed and metrics."""
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
    summary = {"wall_s": round(wall, 1), **summarize(run_dir)}
    val = f", val acc {summary['val_accuracy']:.4f}" if summary["val_accuracy"] is not None else ""
    print(f"{name}: wall {wall:.0f} s, training {summary['train_s']:.0f} s, {summary['median_images_per_s']} img/s, "
          f"test acc {summary['test_accuracy']:.4f}, f1 {summary['test_f1_macro']:.4f}{val}", flush=True)
    return summary


def full(args, out: Path) -> int:
    start = time.perf_counter()
    summary = {"profile": "full", "dataset": args.dataset, "smoke": args.smoke, "runs": {}}
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


def dataset_sizes(dataset: str):
    """(train, test) image counts, from the parquet files' metadata (nothing decoded)."""
    if not is_local_dataset(dataset):
        return CIFAR10_SIZES
    import pyarrow.parquet as pq

    sizes = []
    for split in ("train", "test"):
        files = sorted(Path(dataset).rglob(f"{split}-*.parquet"))
        if not files:
            raise UsageError(f"no {split}-*.parquet file under {dataset}; pass a CIFAR-10 folder in the Hub's parquet layout")
        sizes.append(sum(pq.read_metadata(f).num_rows for f in files))
    return tuple(sizes)


def parse_budgets(pairs) -> dict:
    budgets = dict(plans.QUICK_BUDGETS_S)
    for pair in pairs or []:
        name, _, seconds = pair.partition("=")
        if name not in budgets or not seconds.replace(".", "", 1).isdigit():
            raise UsageError(f"--budget {pair}: give NAME=SECONDS with NAME one of {', '.join(budgets)}")
        budgets[name] = float(seconds)
    return budgets


class Quick:
    """The quick profile's steps, each planned from its FLOPs, bounded by its budget and recorded
    in gpu_check.json (status: ran, cut, skipped or failed, with a note)."""

    def __init__(self, args, out: Path):
        import torch

        self.args, self.out, self.start = args, out, time.perf_counter()
        self.budgets = parse_budgets(args.budget)
        self.student, self.teacher = plans.count_flops(STUDENT), plans.count_flops(TEACHER)
        self.n_train, self.n_test = dataset_sizes(args.dataset)
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.rates = {}  # workload -> TFLOP/s measured by the throughput step
        self.summary = {"profile": "quick", "dataset": args.dataset, "num_train": self.n_train, "num_test": self.n_test,
                        "device": torch.cuda.get_device_name() if self.device_type == "cuda" else "cpu",
                        "limit_s": plans.QUICK_LIMIT_S, "assumed_tflops": args.assumed_tflops, "budgets_s": self.budgets,
                        "flops_per_image": {STUDENT: vars(self.student), TEACHER: vars(self.teacher)}, "steps": {}}

    def estimate(self, name: str, flops: float, rate_of: str = None) -> plans.Estimate:
        if rate_of in self.rates:
            return plans.Estimate(flops, plans.OVERHEAD_S[name], self.rates[rate_of], f"measured: {rate_of}")
        return plans.Estimate(flops, plans.OVERHEAD_S[name], self.args.assumed_tflops, "assumed")

    def budget(self, name: str) -> float:
        """The step's budget, less whatever the whole profile no longer has."""
        left = plans.QUICK_LIMIT_S - plans.RESERVE_S - (time.perf_counter() - self.start)
        return max(0.0, min(self.budgets[name], left))

    def record(self, name: str, estimate: plans.Estimate, budget_s: float, status: str, note: str = "", **extra) -> dict:
        entry = {"status": status, "note": note, "budget_s": round(budget_s, 1), "estimate": estimate.to_dict(), **extra}
        self.summary["steps"][name] = entry
        self.summary["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        write_json_atomic(self.out / "gpu_check.json", self.summary)  # after every step: a profile stopped later keeps the earlier ones
        print(f"[{name}] {status}{': ' + note if note else ''}", flush=True)
        return entry

    def announce(self, name: str, estimate: plans.Estimate, budget_s: float) -> None:
        print(f"[{name}] estimate {estimate.line()}; budget {budget_s:.0f} s", flush=True)

    def plan(self) -> dict:
        """Every step's estimate at the assumed rate, before anything runs."""
        epochs = self.args.epochs
        return {"throughput": self.throughput_estimate(self.args.steps),
                "teacher": self.estimate("teacher", plans.run_flops(self.teacher.train, self.teacher.forward, self.n_train, self.n_test, epochs)),
                "distill": self.estimate("distill", plans.run_flops(self.distill_flops(), self.student.forward, self.n_train, self.n_test, epochs)),
                "bench": self.bench_estimate()}

    def distill_flops(self) -> float:
        return self.student.train + self.teacher.forward  # logits KD; the other modes differ by their (small) heads and taps

    def throughput_estimate(self, steps: int) -> plans.Estimate:
        return self.estimate("throughput", plans.throughput_flops(self.student, self.teacher, self.args.batch_size, self.args.warmup + steps))

    def bench_estimate(self) -> plans.Estimate:
        from kd.bench.__main__ import settings

        s = settings(argparse.Namespace(quick=False, dataset=self.args.dataset, threads=1), self.device_type, "bf16")
        return self.estimate("bench", plans.bench_flops(s, self.student, self.teacher, self.n_train, len(DISTILLERS)), rate_of=STUDENT)

    def run_throughput(self) -> None:
        budget_s = self.budget("throughput")
        estimate = self.throughput_estimate(self.args.steps)
        self.announce("throughput", estimate, budget_s)
        if estimate.overhead_s >= budget_s:
            self.record("throughput", estimate, budget_s, "skipped", f"its overhead alone ({estimate.overhead_s:.0f} s) exceeds its budget")
            return
        output = self.out / "throughput.json"
        output.unlink(missing_ok=True)
        # kd.bench.throughput keeps within --seconds itself (each workload stops at its share); the hard stop is a guard
        command = [sys.executable, "-m", "kd.bench.throughput", "--output", output, "--batch-size", self.args.batch_size, "--warmup", self.args.warmup,
                   "--steps", self.args.steps, "--seconds", max(1.0, budget_s - plans.OVERHEAD_S["throughput"])]
        run = plans.run_bounded(command, budget_s, self.out / "throughput.log", REPO)
        result = json.loads(output.read_text()) if output.exists() else {"workloads": {}}
        for name, workload in result["workloads"].items():
            self.rates[name] = workload["tflops"]
        cut = [name for name, w in result["workloads"].items() if w["cut"]]
        if run.returncode is None:
            status, note = "cut", f"stopped at its budget of {budget_s:.0f} s; {len(result['workloads'])} of 3 workloads measured"
        elif run.returncode != 0:
            status, note = "failed", f"exit {run.returncode}, see {self.out / 'throughput.log'}"
        elif cut:
            status, note = "cut", f"out of time before {self.args.steps} timed steps: {', '.join(cut)}"
        else:
            status, note = "ran", ""
        self.record("throughput", estimate, budget_s, status, note, wall_s=round(run.wall_s, 1), result=result)

    def run_training(self, name: str, script: str, flags, per_image: float, eval_per_image: float, rate_of: str) -> None:
        """One end-to-end run on the whole training split, its epochs cut to what fits the budget."""
        budget_s, wanted = self.budget(name), self.args.epochs
        probe = self.estimate(name, 0, rate_of)  # the rate and overhead this step is planned with
        epochs = min(wanted, plans.epochs_that_fit(budget_s, self.n_train * per_image, self.n_test * eval_per_image, probe.overhead_s, probe.tflops))
        estimate = self.estimate(name, plans.run_flops(per_image, eval_per_image, self.n_train, self.n_test, max(epochs, 1)), rate_of)
        self.announce(name, estimate, budget_s)
        if epochs < 1:
            self.record(name, estimate, budget_s, "skipped", f"one epoch's estimate ({estimate.seconds:.0f} s) exceeds its budget")
            return
        note = "" if epochs == wanted else f"cut from {wanted} to {epochs} epochs: {wanted} would take about " \
                                           f"{self.estimate(name, plans.run_flops(per_image, eval_per_image, self.n_train, self.n_test, wanted), rate_of).seconds:.0f} s"
        run_dir = self.out / name
        command = [sys.executable, REPO / script, "--dataset", self.args.dataset, *flags, "--val-size", 0, "--epochs", epochs,
                   "--warmup-epochs", epochs / 10, "--batch-size", self.args.batch_size, "--output-dir", run_dir, "--overwrite", "--report-to", "none"]
        run = plans.run_bounded(command, budget_s, self.out / f"{name}.log", REPO)
        result = summarize(run_dir) if run_dir.exists() else {}
        if run.returncode is None:
            status, note = "cut", f"stopped at its budget of {budget_s:.0f} s after {result.get('epochs', 0)} of {epochs} epochs"
        elif run.returncode != 0:
            status, note = "failed", f"exit {run.returncode}, see {self.out / (name + '.log')}"
        else:
            status = "cut" if epochs < wanted else "ran"
        self.record(name, estimate, budget_s, status, note, wall_s=round(run.wall_s, 1), epochs=epochs, result=result)

    def run_bench(self) -> None:
        budget_s, estimate = self.budget("bench"), self.bench_estimate()
        self.announce("bench", estimate, budget_s)
        if estimate.seconds > budget_s:
            self.record("bench", estimate, budget_s, "skipped", f"its estimate ({estimate.seconds:.0f} s) exceeds its budget")
            return
        output = self.out / "bench.json"
        output.unlink(missing_ok=True)
        command = [sys.executable, "-m", "kd.bench", "--dataset", self.args.dataset, "--output", output, "--budget", max(0, budget_s - BENCH_START_S)]
        run = plans.run_bounded(command, budget_s, self.out / "bench.log", REPO)
        result = json.loads(output.read_text()) if output.exists() else {}
        if run.returncode is None:
            status, note = "cut", f"stopped at its budget of {budget_s:.0f} s: no rows (kd.bench writes them at its end)"
        elif run.returncode != 0:
            status, note = "failed", f"exit {run.returncode}, see {self.out / 'bench.log'}"
        else:
            status, note = "ran", ""
        self.record("bench", estimate, budget_s, status, note, wall_s=round(run.wall_s, 1), result=result)

    def peak_memory(self) -> dict:
        """Peak memory (MiB) per workload of the throughput step and per memory row of the benchmark."""
        steps = self.summary["steps"]
        throughput = steps.get("throughput", {}).get("result", {})
        peaks = {"what": throughput.get("memory"), "throughput": {n: w["peak_memory_mb"] for n, w in throughput.get("workloads", {}).items()}}
        rows = steps.get("bench", {}).get("result", {}).get("rows", [])
        peaks["bench"] = {row["figure"]: row["ours"] for row in rows if row["figure"].startswith("4 ")}
        return peaks

    def run(self) -> int:
        print(f"gpu check --quick on {self.summary['device']}: {self.n_train} training images, at most {plans.QUICK_LIMIT_S} s; "
              f"FLOPs per image (forward / training step): {STUDENT} {self.student.forward / 1e9:.2f} / {self.student.train / 1e9:.2f} G, "
              f"{TEACHER} {self.teacher.forward / 1e9:.2f} / {self.teacher.train / 1e9:.2f} G", flush=True)
        if self.device_type == "cpu":
            print("no GPU: the budgets are an H100's, so on this CPU the steps are cut or skipped", flush=True)
        plan = self.plan()
        self.summary["plan"] = {name: e.to_dict() for name, e in plan.items()}
        for name, estimate in plan.items():
            print(f"plan: {name:<10} {estimate.line()}; budget {self.budgets[name]:.0f} s", flush=True)
        self.run_throughput()
        self.run_training("teacher", "train_teacher.py", ["--config", PRESETS / "gpu-teacher.yaml"], self.teacher.train, self.teacher.forward, TEACHER)
        mode = self.args.mode
        if self.summary["steps"]["teacher"]["status"] in ("ran", "cut") and (self.out / "teacher" / "metrics.json").exists():
            self.run_training("distill", "distill.py", ["--config", PRESETS / "gpu-student.yaml", "--mode", mode, "--teacher", self.out / "teacher"],
                              self.distill_flops(), self.student.forward, "distill-logits")
        else:
            self.record("distill", self.plan()["distill"], self.budget("distill"), "skipped", "no finished teacher")
        self.summary["steps"]["distill"]["mode"] = mode
        self.run_bench()
        self.summary["peak_memory_mb"] = self.peak_memory()
        self.summary["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        write_json_atomic(self.out / "gpu_check.json", self.summary)
        print(f"gpu check --quick: {self.summary['elapsed_s']:.0f} s in all; "
              + ", ".join(f"{n} {s['status']}" for n, s in self.summary["steps"].items()) + f"; summary in {self.out / 'gpu_check.json'}")
        return 1 if any(s["status"] == "failed" for s in self.summary["steps"].values()) else 0


@main_guard
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="local CIFAR-10 folder (the Hub's parquet schema)")
    parser.add_argument("--out", default="outputs/gpu-check", help="folder for the runs, logs and gpu_check.json")
    parser.add_argument("--quick", action="store_true", help=f"the {plans.QUICK_LIMIT_S // 60}-minute profile (see the description)")
    parser.add_argument("--smoke", action="store_true", help="full profile: tiny budgets (1 epoch on 256 images) to test the script on a CPU")
    parser.add_argument("--modes", nargs="*", default=list(DISTILLERS), help="full profile: distillation modes (default: all)")
    quick = parser.add_argument_group("--quick")
    quick.add_argument("--mode", choices=list(DISTILLERS), default="logits", help="the distillation mode run end to end (default: logits)")
    quick.add_argument("--epochs", type=int, default=10, help="epochs of the teacher and of the distillation, fewer where they do not fit (default: 10)")
    quick.add_argument("--batch-size", type=int, default=512, help="images per step of every step (default: 512, the GPU presets')")
    quick.add_argument("--steps", type=int, default=100, help="timed steps of each throughput workload (default: 100)")
    quick.add_argument("--warmup", type=int, default=10, help="untimed steps before them (default: 10)")
    quick.add_argument("--assumed-tflops", type=float, default=plans.ASSUMED_TFLOPS,
                       help=f"sustained training TFLOP/s assumed until the throughput step measures it (default: {plans.ASSUMED_TFLOPS:g})")
    quick.add_argument("--budget", action="append", metavar="NAME=SECONDS",
                       help=f"a step's budget instead of its default ({', '.join(f'{k}={v}' for k, v in plans.QUICK_BUDGETS_S.items())})")
    args = parser.parse_args(argv)
    # absolute: the children run in the repository, which need not be where this was started
    out = Path(args.out).expanduser().resolve()
    if is_local_dataset(args.dataset):
        args.dataset = str(Path(args.dataset).expanduser().resolve())
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    return Quick(args, out).run() if args.quick else full(args, out)


if __name__ == "__main__":
    sys.exit(main())
