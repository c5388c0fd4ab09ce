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
