"""The GPU check script on a CPU: the full profile's smoke mode, and the quick profile's FLOP-based
plans and time budgets."""

import os
import subprocess
import sys
import time

import psutil  # an accelerate dependency
import pytest

from conftest import REPO, read_json


def test_gpu_check_smoke_runs_every_step(tiny_dataset, tmp_path):
    """Started outside the repository, with relative paths: its children run in the repository,
    and must read the same dataset and write to the same folder as the script itself."""
    out = tmp_path / "check"
    dataset = os.path.relpath(tiny_dataset, tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), dataset, "--smoke", "--out", "check",
                             "--modes", "logits", "hybrid"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_json(out / "gpu_check.json")
    assert summary["smoke"] is True and summary["bench"]["rows"], summary.get("bench")
    assert list(summary["runs"]) == ["teacher-val", "teacher", "student", "distill-logits", "distill-hybrid"]
    for name, run in summary["runs"].items():
        assert 0 <= run["test_accuracy"] <= 1 and run["epochs"] == 1 and run["median_images_per_s"] > 0, (name, run)
    # the final teacher trains on every training image: no validation split, so no validation metrics
    assert summary["runs"]["teacher"]["val_accuracy"] is None and summary["runs"]["teacher-val"]["val_accuracy"] is not None
    assert read_json(out / "teacher" / "run_config.json")["data"]["num_val"] == 0
    assert read_json(out / "distill-logits" / "run_config.json")["teacher"] == str(out / "teacher")
    assert (out / "report.md").is_file() and "gpu check: " in result.stdout
    assert not (REPO / "check").exists()  # nothing landed where the children run


def load_script():
    """scripts/gpu_check.py as a module (it is no package's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conv_macs(layers, widths, size: int = 32, num_classes: int = 10) -> int:
    """Multiply-adds of a CifarResNet's convs and classifier per image, counted by hand from its
    architecture (kd/models.py: 3x3 stem, BasicBlocks, 1x1 projection where the shape changes)."""
    macs, in_chs = 3 * widths[0] * 9 * size * size, widths[0]
    for stage, (depth, width) in enumerate(zip(layers, widths)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            size //= stride
            macs += in_chs * width * 9 * size * size + width * width * 9 * size * size
            if stride != 1 or in_chs != width:
                macs += in_chs * width * size * size
            in_chs = width
    return macs + in_chs * num_classes


def test_flops_per_image_match_the_architecture():
    """The estimates' FLOPs are FlopCounterMode's counts: 2 per multiply-add of the convs and the
    classifier, and a training step about 3x its forward; the teacher costs 2.2x the student."""
    from kd.bench.budget import count_flops

    student, teacher = count_flops("cifar_resnet8x4"), count_flops("cifar_resnet14x4")
    assert student.forward == 2 * conv_macs((1, 1, 1), (64, 128, 256))
    assert teacher.forward == 2 * conv_macs((2, 2, 2), (64, 128, 256))
    for model in (student, teacher):
        assert 2.9 < model.train / model.forward < 3.1, model
    assert 2.1 < teacher.train / student.train < 2.3


def test_estimates_and_epochs_follow_flops_and_rate():
    from kd.bench.budget import Estimate, epochs_that_fit

    estimate = Estimate(flops=80e12, overhead_s=10, tflops=40, rate_source="assumed")
    assert estimate.compute_s == 2 and estimate.seconds == 12
    assert Estimate(160e12, 10, 40, "assumed").compute_s == 2 * estimate.compute_s  # twice the FLOPs, twice the time
    # 100 s budget, 40 s overhead, 4 s of fixed work (the test pass), 10 s an epoch: 5 epochs; none under the overhead
    assert epochs_that_fit(100, per_epoch_flops=400e12, fixed_flops=160e12, overhead_s=40, tflops=40) == 5
    assert epochs_that_fit(30, per_epoch_flops=400e12, fixed_flops=0, overhead_s=40, tflops=40) == 0


def test_a_step_is_stopped_at_its_budget_with_what_it_started(tmp_path):
    """run_bounded ends the step's whole process group, a grandchild too (kd.bench's forkserver)."""
    from kd.bench.budget import run_bounded

    grandchild = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                  "print(p.pid, flush=True); time.sleep(120)")
    result = run_bounded([sys.executable, "-c", grandchild], 3, tmp_path / "log", tmp_path)
    assert result.returncode is None  # stopped, not finished
    pid = int((tmp_path / "log").read_text().split()[0])
    try:  # the group's SIGKILL lands asynchronously: wait for the grandchild to be gone (a zombie, or reaped)
        grandchild_process = psutil.Process(pid)
        for _ in range(300):
            if grandchild_process.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.1)
        assert grandchild_process.status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped
    except psutil.NoSuchProcess:
        pass  # killed and reaped


def test_budget_flags_are_checked():
    from kd.errors import UsageError

    script = load_script()
    assert script.parse_budgets(["bench=90", "teacher=30.5"])["teacher"] == 30.5
    for bad in ("bench", "tea=3", "bench=soon"):
        with pytest.raises(UsageError, match="NAME=SECONDS"):
            script.parse_budgets([bad])


def test_gpu_check_quick_plans_from_flops_and_keeps_to_budgets(tiny_dataset, tmp_path):
    """The quick profile on a CPU with tiny budgets: the throughput step runs out of its budget
    (cut), the benchmark's estimate exceeds its budget (skipped, never started), the teacher and
    one distillation mode run end to end; every estimate is its FLOPs over the rate plus overhead."""
    out = tmp_path / "quick"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tiny_dataset), "--quick", "--out", str(out),
                             "--batch-size", "32", "--epochs", "1", "--budget", "throughput=12", "--budget", "teacher=120",
                             "--budget", "distill=90", "--budget", "bench=5"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_json(out / "gpu_check.json")
    steps = summary["steps"]
    assert list(steps) == ["throughput", "teacher", "distill", "bench"]
    assert summary["num_train"] == 192 and summary["num_test"] == 64
    for name, step in steps.items():
        estimate = step["estimate"]
        assert estimate["flops"] > 0 and estimate["seconds"] > 0, (name, estimate)
        assert abs(estimate["compute_s"] - estimate["flops"] / (estimate["tflops"] * 1e12)) < 0.01, (name, estimate)
        assert f"[{name}] estimate " in result.stdout  # printed before it ran
    flops = summary["flops_per_image"]
    student, teacher = flops["cifar_resnet8x4"], flops["cifar_resnet14x4"]
    # the runs' FLOPs: an epoch over the 192 training images, one pass over the 64 test images
    assert steps["teacher"]["estimate"]["flops"] == 192 * teacher["train"] + 64 * teacher["forward"]
    assert steps["distill"]["estimate"]["flops"] == 192 * (student["train"] + teacher["forward"]) + 64 * student["forward"]
    assert steps["throughput"]["status"] == "cut" and steps["throughput"]["wall_s"] is not None, steps["throughput"]
    assert steps["bench"]["status"] == "skipped" and "exceeds its budget" in steps["bench"]["note"]
    assert "wall_s" not in steps["bench"] and not (out / "bench.log").exists()
    for name in ("teacher", "distill"):
        assert steps[name]["status"] == "ran" and steps[name]["epochs"] == 1, steps[name]
        assert 0 <= steps[name]["result"]["test_accuracy"] <= 1
    assert steps["distill"]["mode"] == "logits"
    assert read_json(out / "distill" / "run_config.json")["teacher"] == str(out / "teacher")
    assert read_json(out / "teacher" / "run_config.json")["data"]["num_val"] == 0
    assert "peak_memory_mb" in summary and "gpu check --quick: " in result.stdout
