"""scripts/plain_loop.py, the loop written apart from kd that the leaderboard trains beside the
student baseline: its macro F1 against scikit-learn's, and a run on the tiny dataset with the
files the leaderboard reads."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from sklearn.metrics import f1_score

from conftest import REPO

SCRIPT = REPO / "scripts" / "plain_loop.py"


def load_script():
    spec = importlib.util.spec_from_file_location("plain_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scores_match_scikit_learn_with_a_class_never_predicted():
    plain_loop = load_script()
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=generator)
    predicted = torch.where(torch.rand(200, generator=generator) < 0.6, labels, torch.randint(0, 4, (200,), generator=generator))
    predicted[predicted == 4] = 0  # class 4 is present but never predicted: its F1 is 0
    scores = plain_loop.scores(predicted, labels, classes=5)
    assert scores["accuracy"] == pytest.approx((predicted == labels).float().mean().item())
    assert scores["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro", labels=range(5), zero_division=0))


def test_its_schedule_and_validation_split_are_kd_s():
    """The equal budget: the same lr at every step, and a held-out part of the same size per class
    (so the same steps per epoch), though each is written apart."""
    from kd.data import stratified_split
    from kd.train.engine import learning_rate

    plain_loop = load_script()
    total, warmup = 10 * 175, round(0.5 * 175)
    assert [plain_loop.schedule(step, total, warmup, 0.4) for step in range(total)] == pytest.approx(
        [learning_rate(step, total, warmup, 0.4) for step in range(total)], rel=1e-12, abs=1e-15)
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 13 + [3] * 1)  # uneven classes: shares with remainders
    for size in (0, 5, 11, 23):
        _, plain_val = plain_loop.hold_out(labels, size)
        _, kd_val = stratified_split(labels, size)
        assert torch.bincount(labels[plain_val], minlength=4).tolist() == torch.bincount(labels[kd_val], minlength=4).tolist()


def test_a_run_writes_its_scores_settings_and_epochs(tiny_dataset, tmp_path):
    out = tmp_path / "plain"
    command = [sys.executable, str(SCRIPT), str(tiny_dataset), "--epochs", "2", "--batch-size", "32", "--val-size", "32",
               "--lr", "0.2", "--warmup-epochs", "0.5", "--seed", "3", "--output-dir", str(out), "--overwrite"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"] == {"dataset": str(tiny_dataset), "model": "cifar_resnet8", "epochs": 2, "lr": 0.2, "batch_size": 32,
                                   "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 0.5, "val_size": 32, "seed": 3, "precision": "fp32"}
    assert metrics["test"]["accuracy"] > 0.5 and 0 < metrics["test"]["f1_macro"] <= 1  # 4 classes, each its own colour
    assert f"test accuracy {metrics['test']['accuracy']:.4f} test F1 macro {metrics['test']['f1_macro']:.4f}" in result.stdout
    epochs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in epochs] == [1, 2] and all(record["epoch_time_s"] > 0 for record in epochs)
    best = max(epochs, key=lambda record: record["val_f1_macro"])  # the first best, as kd keeps
    assert metrics["kept_epoch"] == best["epoch"] and metrics["val"]["f1_macro"] == best["val_f1_macro"]
    assert not (out / "metrics.json.partial").exists()


def test_fp16_on_the_cpu_is_one_line(tiny_dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tiny_dataset), "--precision", "fp16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == "plain_loop.py: --precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU"
