"""The benchmark runs end to end (--quick, tiny data) and reports every figure; no timing asserts."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO
from kd.bench import timing
from kd.distillers import DISTILLERS

COMPILE_ROW = "torch.compile vs eager"
EXPECTED_ROWS = [
    "1 train step cifar_resnet8x4", "1 train step cifar_resnet14x4", "1 cifar_resnet8x4: crop+flip+normalize",
    "2 input pipeline", "3 logits step vs student step + teacher forward", "3 hidden step (teacher stops at its tap) vs logits",
    *[f"3 {mode} step vs plain student step" for mode in DISTILLERS],
    "4 peak RSS cifar_resnet8x4 training: our loop", *[f"4 peak RSS {mode} vs plain student" for mode in DISTILLERS],
    "4 peak RSS cifar_resnet14x4 on the full train split", "5 cifar_resnet8x4 channels_last", "5 cifar_resnet8x4 bf16 autocast vs fp32",
    "5 cifar_resnet8x4 glibc malloc keeping freed memory", COMPILE_ROW,
]


@pytest.fixture(scope="module")
def quick_run(tiny_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "bench.json"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "kd.bench", "--quick", "--dataset", str(tiny_dataset), "--output", str(output)],
                            capture_output=True, text=True, env=environment, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    table = [line for i, line in enumerate(lines) if any(earlier.startswith("machine: ") for earlier in lines[: i + 1])]
    return table, json.loads(output.read_text())  # the table, without what loading the data printed before it


def _is_positive_number(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_table_has_every_figure_with_consistent_ratios(quick_run):
    table, results = quick_run
    header, columns, rule, *lines = table
    # the suite runs in fp32 (conftest sets ACCELERATE_MIXED_PRECISION=no), and the header says so and why
    assert header.startswith("machine: ") and "torch threads 1" in header and "device cpu" in header
    assert "precision fp32 (ACCELERATE_MIXED_PRECISION)" in header
    assert [c.strip() for c in columns.split("|")] == ["figure", "ours", "baseline", "ratio", "target"]
    cells = [[c.strip() for c in line.split("|")] for line in lines]
    assert all(len(row) == 5 for row in cells)
    for expected in EXPECTED_ROWS:
        assert sum(row[0].startswith(expected) or expected in row[0] for row in cells) == 1, expected
    for (figure, ours, _, ratio, target), row in zip(cells, results["rows"]):
        if COMPILE_ROW in figure and ours.startswith(("skipped:", "failed:")):
            continue
        assert _is_positive_number(float(ratio)), (figure, ratio)
        assert float(ratio) == pytest.approx(row["ours"] / row["baseline"], abs=6e-4), figure  # the printed ratio is ours / baseline
        assert target == (row["target"] if row["met"] is None else f"{row['target']} {'ok' if row['met'] else 'MISSED'}")


def test_precision_row_states_the_policys_claim(quick_run):
    """fp32 picked: the row's target says fp32 must be the faster; `met` is that claim checked."""
    _, results = quick_run
    assert results["machine"]["precision"] == "no" and results["settings"]["precision"] == "no"
    (row,) = [r for r in results["rows"] if "bf16 autocast vs fp32" in r["figure"]]
    assert "policy picks fp32" in row["figure"] and row["target"] == "< 1"
    assert row["met"] == (row["ours"] / row["baseline"] < 1)


def test_quick_json_matches_the_table(quick_run):
    table, results = quick_run
    assert results["machine"]["threads"] == 1 and results["settings"]["batch_size"] == 32
    assert results["machine"]["device"] == "cpu" and results["settings"]["device_type"] == "cpu"
    assert [row["figure"] for row in results["rows"]] == [line.split("|")[0].strip() for line in table[3:]]
    for row in results["rows"]:
        if COMPILE_ROW in row["figure"]:
            assert row["ratio"] == "skipped: --quick"  # --quick never waits for a compile
            continue
        assert _is_positive_number(row["ratio"]) and _is_positive_number(row["ours"]), row
        assert row["met"] in (True, False, None)


def test_time_steps_interleaves_and_excludes_warmup(monkeypatch):
    clock, calls = [0.0], []

    def advancing(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds
        return fn

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    medians = timing.time_steps({"a": advancing("a", 1.0), "b": advancing("b", 3.0)}, warmup=1, repeats=3)
    assert medians == {"a": 1.0, "b": 3.0}
    assert calls == ["a", "b"] * 4  # round-robin, warm-up round included
    assert timing.time_steps(advancing("c", 2.0), warmup=0, repeats=1) == 2.0


def test_row_ratio_and_target():
    assert timing.Row("x", 96.0, 100.0, "img/s", ">= 0.95").met is True
    assert timing.Row("x", 120.0, 100.0, "ms", "<= 1.10").met is False
    failed = timing.Row("x", "failed: boom", "-", "img/s", ">= 1")
    assert failed.ratio == "failed: boom" and failed.met is None


def test_the_benchmark_tunes_its_device_as_the_runner_does(tiny_dataset, monkeypatch):
    """kd.train.device.tune_for, which the runner calls (cuDNN autotuning and TF32 on CUDA, glibc's
    allocator on CPU), runs before any figure, in the benchmark and in each of its children."""
    import multiprocessing

    import torch

    from kd.train import device
    from kd.bench import __main__ as bench, figures, isolated

    events = []
    monkeypatch.setattr(device, "tune_for", lambda where: events.append(("tune_for", where.type)))
    for name in ("train_loop", "input_pipeline", "distillation", "memory", "speed_options"):
        monkeypatch.setattr(figures, name, lambda *args, name=name: events.append(("figure", name)) or [])
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--cpu", "--dataset", str(tiny_dataset), "--threads", str(threads)]) == 0
    assert events[0] == ("tune_for", "cpu") and [e for e in events if e[0] == "tune_for"] == [("tune_for", "cpu")], events
    # a child (peak memory, torch.compile) tunes the device its job names, then runs the job
    monkeypatch.setitem(isolated.JOBS, "probe", lambda device_type: {"ran_on": device_type, "after": list(events)})
    receive, send = multiprocessing.Pipe(duplex=False)
    events.clear()
    isolated._entry(send, "probe", {"threads": threads, "device_type": "cuda"})
    assert receive.recv() == {"ran_on": "cuda", "after": [("tune_for", "cuda")]}


def test_cuda_times_many_steps_per_call_and_compiles_with_inductors_workers():
    """On CUDA a step takes milliseconds: one step per timed call would set each call of our loop
    (a whole train_one_epoch, with its end-of-epoch syncs) against one bare step. And a GPU host
    compiles with inductor's own pool of workers, a CPU run without (its cores are timed)."""
    from types import SimpleNamespace

    from kd.bench import __main__ as bench, isolated

    for quick in (True, False):
        args = SimpleNamespace(dataset="d", threads=1, quick=quick)
        assert bench.settings(args, "cpu", "no").steps_per_call == 1
        assert bench.settings(args, "cuda", "bf16").steps_per_call >= 20
    assert isolated.compile_workers("cpu") == 1 and isolated.compile_workers("cuda") is None


def test_gpu_memory_is_not_held_to_the_cpu_machines_ram_target(monkeypatch):
    """Figure 4 on CUDA (its children mocked: there is no GPU here): the teacher's peak GPU
    memory is set against the GPU's own memory, with no 4 GiB target, and the loading peak,
    on the host, is read as RSS, not as GPU memory (which the load never touches: 0 MiB)."""
    from types import SimpleNamespace

    from kd.bench import figures

    child = {"peak_mb": 700.0, "train_peak_mb": 700.0, "load_peak_rss_mb": 1234.0, "num_train": 50000, "device_total_mb": 143771.0}
    monkeypatch.setattr(figures, "run_isolated", lambda job, timeout, **kwargs: dict(child))
    data = SimpleNamespace(train=[0] * 50000, num_classes=10)
    s = figures.Settings("d", 1, "cuda", "bf16", 256, 128, 1, 1, 50, 4, 1, False)
    (teacher,) = [row for row in figures.memory(data, s) if timing.TEACHER in row.figure]
    assert "4 GiB" not in teacher.figure and teacher.target == "-" and teacher.baseline == 143771.0
    assert "loading peak (RSS" in teacher.note and "1234 MiB" in teacher.note
    cpu = figures.memory(data, figures.Settings("d", 1, "cpu", "no", 256, 128, 1, 1, 1, 4, 1, False))
    (teacher,) = [row for row in cpu if timing.TEACHER in row.figure]
    assert teacher.baseline == figures.MEMORY_LIMIT_MB and teacher.target == "< 1" and "1234 MiB" in teacher.note
