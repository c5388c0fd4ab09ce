"""The training scripts run end to end as a user runs them, on tiny data."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY_FLAGS, read_json, run_script

RUN_FILES = {"config.json", "model.safetensors", "metrics.json", "run_config.json", "history.jsonl", "checkpoint"}
METRIC_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted", "f1_weighted", "per_class"}


@pytest.mark.parametrize("script,model", [("train_teacher.py", "cifar_resnet8"), ("train_student.py", "cifar_resnet14")])
def test_script_writes_a_complete_run_folder(script, model, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = run_script(script, "--dataset", tiny_dataset, "--model", model, "--output-dir", out, *TINY_FLAGS)
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    metrics = read_json(out / "metrics.json")
    assert METRIC_KEYS <= set(metrics["test"]) and METRIC_KEYS <= set(metrics["val"])
    assert set(metrics["test"]["per_class"]) == {"red", "green", "blue", "dark"}
    assert metrics["test"]["num_samples"] == 64 and metrics["val"]["num_samples"] == 32
    assert metrics["selected_by"] == "best validation f1_macro"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    best = max(history, key=lambda h: (h["val_f1_macro"], -h["epoch"]))  # the first epoch with the best score
    assert metrics["kept_epoch"] == best["epoch"] and metrics["val"]["f1_macro"] == pytest.approx(best["val_f1_macro"], abs=1e-12)
    assert [h["epoch"] for h in history] == [1, 2] and {"loss_ce", "lr", "images_per_s", "val_f1_macro"} <= set(history[0])
    assert all(h["epoch_time_s"] > h["train_time_s"] > 0 for h in history)  # the epoch's wall time holds its training and validation
    assert (out / "confusion_matrix.png").is_file() and sum(map(sum, metrics["test"]["confusion_matrix"])) == 64
    resolved = read_json(out / "run_config.json")
    assert resolved["train"]["model"] == model and resolved["train"]["lr"] == 0.05 and resolved["train"]["seed"] == 0
    assert resolved["git_commit"] is not None and "torch" in resolved["versions"]
    assert "epoch 2:" in result.stdout and "test (epoch" in result.stdout


def test_exported_model_reloads_with_identical_logits(tiny_teacher, tiny_dataset, tmp_path):
    """A fresh Python process rebuilds the export through timm and gives the same logits as
    the weights the run kept."""
    code = f"""
import sys, torch, timm, kd
from safetensors.torch import load_file
from kd.data import load_cifar, DeviceLoader
model = timm.create_model("local-dir:{tiny_teacher}", pretrained=True).eval()
assert model.pretrained_cfg["label_names"] == ["red", "green", "blue", "dark"], model.pretrained_cfg
kept = timm.create_model("cifar_resnet8", num_classes=4).eval()
kept.load_state_dict(load_file("{tiny_teacher}/checkpoint/kept_student.safetensors"))
data = load_cifar("{tiny_dataset}", val_size=0)
images = DeviceLoader(data.test, 64, torch.device("cpu"), model.pretrained_cfg["mean"], model.pretrained_cfg["std"], train=False)
batch = next(iter(images))[0]
with torch.no_grad():
    assert torch.equal(model(batch), kept(batch))
    print("accuracy", (model(batch).argmax(1) == next(iter(images))[1]).float().mean().item())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = read_json(tiny_teacher / "metrics.json")["test"]["accuracy"]
    assert float(result.stdout.split()[-1]) == pytest.approx(reported, abs=1e-6)
