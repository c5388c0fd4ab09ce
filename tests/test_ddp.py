"""Two gloo processes on CPU against one process at the same global batch, on one machine or as
two machines, and checkpoints resumed on another process count."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port, kill_after_epochs, read_json, run_script

# fp32: the comparisons below are exact up to the order of float sums
FLAGS = ["--model", "cifar_resnet8", "--epochs", "3", "--batch-size", "32", "--val-size", "32", "--max-eval-samples", "61",
         "--report-to", "none", "--lr", "0.05", "--seed", "3", "--mixed-precision", "no"]


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", folder / "p2", *FLAGS, processes=2)
    # one process, two micro-batches of 16 per step: the BatchNorm batches of two processes
    run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", folder / "p1-accum2", *FLAGS, "--grad-accum", "2")
    return folder


EVALUATE = """
import json, sys, torch, timm, kd
from accelerate import Accelerator
from kd.data import DeviceLoader, load_cifar
from kd.train.engine import evaluate
run = sys.argv[1]
accelerator = Accelerator(cpu=True, mixed_precision="no")
model = timm.create_model("local-dir:" + run, pretrained=True)
data = load_cifar(sys.argv[2], val_size=32, max_eval_samples=61)
loader = DeviceLoader(data.test, 32, accelerator.device, model.pretrained_cfg["mean"], model.pretrained_cfg["std"], train=False)
print(json.dumps(evaluate(accelerator, model, loader, data.class_names)))
"""


def test_two_processes_count_every_test_image_once_and_match_one_process(runs, tiny_dataset):
    metrics = read_json(runs / "p2" / "metrics.json")["test"]
    assert read_json(runs / "p2" / "run_config.json")["num_processes"] == 2
    assert metrics["num_samples"] == 61 and sum(c["support"] for c in metrics["per_class"].values()) == 61
    result = subprocess.run([sys.executable, "-c", EVALUATE, str(runs / "p2"), str(tiny_dataset)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == metrics


def history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_process_with_the_same_batchnorm_batches(runs):
    """Two processes see the same images, order and augmentation per global batch as one;
    BatchNorm normalises each process's 16 images on its own. One process accumulating two
    micro-batches of 16 does exactly that, so its losses match up to the order of float sums
    (measured: within 1.2e-4 relative; 1e-3 allowed). A process on the wrong shard or with an
    unsynchronised gradient would be far off by epoch 3."""
    two, accumulated = history(runs / "p2"), history(runs / "p1-accum2")
    assert [h["step"] for h in two] == [h["step"] for h in accumulated] == [5, 10, 15]
    for a, b in zip(accumulated, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3) and b["lr"] == a["lr"]
    print("epoch losses, 2 processes:", [round(h["loss"], 4) for h in two], "1 process x 2 micro-batches:", [round(h["loss"], 4) for h in accumulated])


def assert_same_training(run, reference):
    """The same steps and learning rates, and losses equal up to the order of float sums
    (measured within 1.2e-4 relative between 2 processes and 1 x 2 micro-batches)."""
    ours, theirs = history(run), history(reference)
    assert [(h["epoch"], h["step"], h["lr"]) for h in ours] == [(h["epoch"], h["step"], h["lr"]) for h in theirs]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (ours, theirs)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_killed_run_resumes_on_another_process_count(before, after, runs, tiny_dataset, tmp_path):
    """A checkpoint carries no trace of the process count: killed with 2 processes and resumed
    on 1 (x 2 micro-batches, the same BatchNorm batches), or the reverse, the run ends as an
    uninterrupted one."""
    accum = lambda processes: ["--grad-accum", "2"] if processes == 1 else []  # noqa: E731
    out = tmp_path / "run"
    done = kill_after_epochs("train_student.py", out, 1, "--dataset", tiny_dataset, *FLAGS, *accum(before), processes=before)
    assert 1 <= done < 3 and not (out / "metrics.json").exists(), "the run was not killed mid-training"
    resumed = run_script("train_student.py", "--dataset", tiny_dataset, "--output-dir", out, *FLAGS, *accum(after), "--resume",
                         processes=after)
    assert "epoch 1:" not in resumed.stdout and "epoch 3:" in resumed.stdout  # continued, not restarted
    assert read_json(out / "run_config.json")["num_processes"] == after
    assert_same_training(out, runs / "p2")


def test_two_machines_on_one_machine_train_like_two_processes(runs, tiny_dataset, tmp_path):
    """accelerate_configs/multi_node.yaml as two machines (machine_rank 0 and 1, one CPU process
    each) on this machine: the same result as 2 processes on one machine."""
    port, out = free_port(), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "multi_node.yaml"),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "--mixed_precision", "no", str(REPO / "train_student.py"),
         "--dataset", str(tiny_dataset), "--output-dir", str(out), *FLAGS],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    results = [machine.communicate(timeout=600) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert read_json(out / "run_config.json")["num_processes"] == 2
    assert_same_training(out, runs / "p2")
