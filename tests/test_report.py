"""kd.report on run folders written as JSON by hand: no training, fast and deterministic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd.lab import report
from kd.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
TRAIN = dict(model="cifar_resnet8", epochs=30, batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=1.0,
             label_smoothing=0.0, grad_accum=1, seed=0, val_size=5000, max_train_samples=None, max_eval_samples=None)
DISTILL = dict(mode="logits", temperature=4.0, alpha=0.9, student_layer="layer2", teacher_layer="layer2",
               hidden_factor=1.0, logits_factor=1.0, at_beta=1000.0)


def scores(accuracy, f1, precision, recall):
    return {"accuracy": accuracy, "f1_macro": f1, "precision_macro": precision, "recall_macro": recall,
            "precision_weighted": precision, "recall_weighted": recall, "f1_weighted": f1, "num_samples": 10000, "per_class": {}}


def write_run(folder: Path, test, val=None, seed=0, model="cifar_resnet8", role=None, distill=None, teacher=None):
    """A finished run folder as train_*.py / distill.py leave it (only the files the report reads)."""
    folder.mkdir(parents=True)
    config = {"train": {**TRAIN, "model": model, "seed": seed}, "distill": distill,
              "run": {"dataset": "uoft-cs/cifar10", "output_dir": str(folder), "mixed_precision": "bf16"},
              "method": distill["mode"] if distill else "supervised", "data": {"num_test": 10000}}
    config.update({"role": role} if role else {"teacher": teacher})
    metrics = {"test": scores(*test), "val": scores(*(val or test)), "kept_epoch": 27,
               "selected_by": "best validation f1_macro", "epochs": 30}
    (folder / "run_config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def runs_root(tmp_path) -> Path:
    """A teacher (one seed), a student over three seeds, logits KD at T=4 (two seeds) and T=2 (one)."""
    root = tmp_path / "runs"
    write_run(root / "teacher", (0.80, 0.79, 0.795, 0.80), model="cifar_resnet20", role="teacher")
    student = [(0.71, 0.70, 0.70, 0.70), (0.73, 0.72, 0.71, 0.72), (0.75, 0.74, 0.75, 0.74)]
    for seed, test in enumerate(student):
        write_run(root / f"student-s{seed}", test, val=(0.5, 0.5, 0.5, 0.5), seed=seed, role="student")
    for seed, f1 in enumerate((0.76, 0.78)):
        write_run(root / f"kd-t4-s{seed}", (f1, f1, f1, f1), seed=seed, distill=DISTILL, teacher=str(root / "teacher"))
    write_run(root / "kd-t2-s0", (0.73, 0.73, 0.73, 0.73), distill={**DISTILL, "temperature": 2.0}, teacher=str(root / "teacher"))
    return root


def rows_by_label(root: Path, split="test"):
    return {row.label: row for row in report.table_rows(report.load_runs([root]), split)}


def test_seeds_fold_into_mean_and_sample_std(runs_root):
    row = rows_by_label(runs_root)["student (cifar_resnet8)"]
    assert row.n == 3
    assert row.stats["accuracy"] == pytest.approx((0.73, 0.02))
    assert row.stats["f1_macro"] == pytest.approx((0.72, 0.02))
    # precision 0.70, 0.71, 0.75: squared deviations 4e-4 + 1e-4 + 9e-4 over n-1 = 2 -> sqrt(7e-4)
    assert row.stats["precision_macro"] == pytest.approx((0.72, 0.0264575), abs=1e-6)
    line = next(line for line in report.to_markdown(list(rows_by_label(runs_root).values())).splitlines()
                if line.startswith("| student"))
    assert line == "| student (cifar_resnet8) | 3 | 0.7300 ± 0.0200 | 0.7200 ± 0.0200 | 0.7200 ± 0.0265 | 0.7200 ± 0.0200 |"


def test_single_run_shows_value_without_std(runs_root):
    row = rows_by_label(runs_root)["teacher (cifar_resnet20)"]
    assert row.n == 1 and row.stats["f1_macro"] == (pytest.approx(0.79), None)
    assert "| teacher (cifar_resnet20) | 1 | 0.8000 | 0.7900 | 0.7950 | 0.8000 |" in report.to_markdown([row])


def test_different_temperatures_stay_separate_rows(runs_root):
    rows = rows_by_label(runs_root)
    assert rows["distill logits (cifar_resnet8) T=4"].n == 2
    assert rows["distill logits (cifar_resnet8) T=4"].stats["f1_macro"] == pytest.approx((0.77, 0.0141421), abs=1e-6)
    assert rows["distill logits (cifar_resnet8) T=2"].n == 1
    assert len(rows) == 4  # the seed alone never splits a row, nor does the output folder


def test_rows_sorted_by_f1_macro(runs_root):
    rows = report.table_rows(report.load_runs([runs_root]), "test")
    assert [row.label for row in rows] == ["teacher (cifar_resnet20)", "distill logits (cifar_resnet8) T=4",
                                           "distill logits (cifar_resnet8) T=2", "student (cifar_resnet8)"]
    f1 = [row.stats["f1_macro"][0] for row in rows]
    assert f1 == sorted(f1, reverse=True)


def test_val_split_reads_val_metrics(runs_root):
    assert rows_by_label(runs_root, "val")["student (cifar_resnet8)"].stats["f1_macro"] == pytest.approx((0.5, 0.0))


def test_same_run_given_twice_counts_once(runs_root):
    runs = report.load_runs([runs_root / "student-s0", runs_root, runs_root / "student-s0"])
    assert len(runs) == 7


def test_main_writes_markdown_as_printed_and_png(runs_root, tmp_path, capsys):
    output = tmp_path / "out" / "compare.md"
    chart = tmp_path / "out" / "bars.png"
    report.main([str(runs_root), "--output", str(output), "--chart", str(chart)])
    printed = capsys.readouterr().out
    assert output.read_text() == printed
    assert printed.startswith("test split, mean ± sample std over seeds")
    assert "kept weights, selected by: best validation f1_macro" in printed.splitlines()[0]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_chart_defaults_next_to_markdown(runs_root, tmp_path, capsys):
    report.main([str(runs_root / "teacher"), "--output", str(tmp_path / "report.md")])
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_val_split_is_a_usage_error(runs_root):
    metrics_path = runs_root / "teacher" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    del metrics["val"]
    metrics_path.write_text(json.dumps(metrics))
    with pytest.raises(UsageError, match="no val metrics"):
        report.table_rows(report.load_runs([runs_root / "teacher"]), "val")


def test_folder_without_runs_exits_2_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    (empty / "unfinished").mkdir(parents=True)
    (empty / "unfinished" / "run_config.json").write_text("{}")  # a run that never wrote metrics.json
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "kd.report", str(empty)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "holds no finished run" in lines[0], result.stderr
    assert "1 unfinished run" in lines[0]
    assert not (tmp_path / "report.md").exists()


def test_distillations_from_different_teachers_stay_separate(tmp_path):
    for name, architecture in (("big", "cifar_resnet56"), ("small", "cifar_resnet20")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architecture": architecture}))
        for seed in (0, 1):
            write_run(tmp_path / "runs" / f"{name}-s{seed}", (0.7, 0.7, 0.7, 0.7), seed=seed, distill=DISTILL,
                      teacher=str(tmp_path / name))
    rows = rows_by_label(tmp_path / "runs")
    assert sorted(rows) == ["distill logits (cifar_resnet8) teacher=cifar_resnet20",
                            "distill logits (cifar_resnet8) teacher=cifar_resnet56"]
    assert all(row.n == 2 for row in rows.values())
