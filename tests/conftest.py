"""Shared fixtures: a tiny CIFAR-like dataset in the Hub's parquet schema, the real CIFAR-10
folder when present, and helpers that run the real scripts as subprocesses."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["red", "green", "blue", "dark"]
REAL_CIFAR10 = Path(os.environ.get("KD_TEST_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))


def write_tiny_cifar(folder: Path, n_train: int = 192, n_test: int = 64, image_column: str = "img", seed: int = 0,
                     class_names=CLASS_NAMES, label_column: str = "label") -> Path:
    """A learnable dataset: each class has its own colour, plus noise; PNG images in parquet
    files named like the Hub's (plain_text/{split}-00000-of-00001.parquet)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [40, 40, 40], [200, 200, 40], [40, 200, 200]])
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(class_names))})
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % len(class_names)
        rng.shuffle(labels)
        images = []
        for label in labels:
            pixels = colours[label] + rng.normal(0, 40, (32, 32, 3))
            pixels[rng.integers(0, 24):, rng.integers(0, 24):] //= 2  # some structure for crops to move
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        table = datasets.Dataset.from_dict({image_column: images, label_column: labels.tolist()}, features=features)
        out = folder / "plain_text" / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(out))
    return folder


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """Decode cache in a temp folder; no tracker reaches the network; nothing prompts."""
    os.environ["KD_CACHE_DIR"] = str(tmp_path_factory.mktemp("kd-cache"))
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_cifar(tmp_path_factory.mktemp("tiny-cifar"))


@pytest.fixture(scope="session")
def real_cifar10() -> Path:
    if not (REAL_CIFAR10 / "plain_text").is_dir():
        if os.environ.get("KD_REQUIRE_REALDATA"):
            pytest.fail(f"real CIFAR-10 not found at {REAL_CIFAR10} but KD_REQUIRE_REALDATA is set")
        pytest.skip(f"real CIFAR-10 not found at {REAL_CIFAR10} (set KD_TEST_CIFAR10)")
    return REAL_CIFAR10


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TINY_FLAGS = ["--epochs", "2", "--batch-size", "32", "--val-size", "32", "--report-to", "none", "--lr", "0.05"]


def run_script(script: str, *args, processes: int = 1, check: bool = True, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would: `python script` or, for several
    processes, `accelerate launch --multi_gpu` on CPU (gloo)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    if processes == 1:
        command = [sys.executable, str(REPO / script), *map(str, args)]
    else:
        environment["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), str(REPO / script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")
    return result


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dataset, tmp_path_factory) -> Path:
    """A small teacher trained once on the tiny data, for the distillation tests."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_script("train_teacher.py", "--dataset", tiny_dataset, "--model", "cifar_resnet8", "--output-dir", out, *TINY_FLAGS)
    return out


def run_killed(script: str, args, history_lines: int, timeout: int = 300) -> int:
    """Start `script args` (one process) and SIGKILL it once its history.jsonl holds at least
    `history_lines` epochs; returns the number of epochs it had completed."""
    import signal
    import time

    out = Path(args[list(map(str, args)).index("--output-dir") + 1])
    process = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], env={**os.environ, "PYTHONPATH": str(REPO)},
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = out / "history.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and not (history.exists() and len(history.read_text().splitlines()) >= history_lines):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(history.read_text().splitlines()) if history.exists() else 0
