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


def share_the_cores() -> None:
    """Under pytest-xdist (setup.cfg runs a worker per core) each worker, and every script it
    starts, gets its share of the cores: torch's default of a thread per core in each of them
    would oversubscribe the machine. Runs before any test module imports torch."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


share_the_cores()


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
    # fp32 unless precision is the test's subject: bf16 is emulated, ~10x slower, on CPUs without
    # AVX512-BF16/AMX (the variable is accelerate's own; the policy treats it as the user's choice)
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
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


def script_command(script: str, *args, processes: int = 1, env=None, launcher: bool = False):
    """(command, environment) that run one of the repo's scripts as a user would: `python
    script` or, for several processes (or with `launcher`), `accelerate launch --quiet` on CPU
    (gloo), --multi_gpu for several processes."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    if processes == 1 and not launcher:
        command = [sys.executable, str(REPO / script), *map(str, args)]
    else:
        environment["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *(["--multi_gpu"] if processes > 1 else []),
                   "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), str(REPO / script), *map(str, args)]
    return command, environment


def run_script(script: str, *args, processes: int = 1, check: bool = True, env=None, timeout: int = 600,
               launcher: bool = False) -> subprocess.CompletedProcess:
    command, environment = script_command(script, *args, processes=processes, env=env, launcher=launcher)
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")
    return result


def kill_after_epochs(script: str, out: Path, epochs: int, *args, processes: int = 1, timeout: int = 300) -> int:
    """Start a run writing to `out`, kill -9 it (the launcher and every worker) as soon as its
    history holds `epochs` epochs; returns the number of epochs it had finished."""
    import signal
    import time

    import psutil  # an accelerate dependency

    command, environment = script_command(script, "--output-dir", out, *args, processes=processes)
    process = subprocess.Popen(command, env=environment, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = Path(out) / "history.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not (history.exists() and len(history.read_text().splitlines()) >= epochs):
        time.sleep(0.02)
    # torchrun starts each worker in its own session: kill every descendant by its id
    for child in psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()
    return len(history.read_text().splitlines()) if history.exists() else 0


def console_scripts() -> dict:
    """{installed name: "module:function"} from setup.cfg's [options.entry_points]."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def console_script(name: str) -> str:
    """The installed wrapper of a console script, next to this Python (the project's venv)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed next to {sys.executable}; run pip install -e ."
    return str(path)


def run_console_script(name: str, *args, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an installed console script by its name, with this checkout's code."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([console_script(name), *map(str, args)], capture_output=True, text=True, env=environment, cwd=REPO,
                          timeout=timeout)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dataset, tmp_path_factory) -> Path:
    """A small teacher trained once on the tiny data, for the distillation tests."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_script("train_teacher.py", "--dataset", tiny_dataset, "--model", "cifar_resnet8", "--output-dir", out, *TINY_FLAGS)
    return out


def write_lookalike(folder: Path, splits: dict, size=(32, 32), mode: str = "RGB", image_column: str = "image", labels: dict = None,
                    num_classes: int = 10, seed: int = 0, broken: dict = None) -> Path:
    """A small dataset in another set's own layout: `splits` {name: rows}; `labels` {column: "classlabel" |
    "int" (class c is 5c) | "string" ("kind-00c") | "float" | (num_classes for a ClassLabel of its own)}; images of `size` (W, H), or a list of
    sizes drawn in turn, in PIL `mode` (RGB, L, RGBA), tinted by the first label column's class; `broken`
    {split: row} replaces that row's bytes by ones no image reader accepts."""
    import datasets
    from PIL import Image

    labels = labels or {"label": "classlabel"}
    rng = np.random.default_rng(seed)
    sizes = size if isinstance(size, list) else [size]
    features = {image_column: datasets.Image()}
    for column, kind in labels.items():
        classes = kind if isinstance(kind, int) else num_classes
        features[column] = {"int": datasets.Value("int64"), "string": datasets.Value("string"), "float": datasets.Value("float32")}.get(
            kind, datasets.ClassLabel(names=[f"class_{i:03d}" for i in range(classes)]))
    for split, n in splits.items():
        columns = {column: [] for column in features}
        for row in range(n):
            label = row % num_classes
            width, height = sizes[row % len(sizes)]
            tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
            pixels = (tint + rng.normal(0, 30, (height, width, 3))).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels).convert(mode)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = b"not an image at all" if (broken or {}).get(split) == row else buffer.getvalue()
            columns[image_column].append({"bytes": data, "path": None})
            for column, kind in labels.items():
                value = label % kind if isinstance(kind, int) else label
                columns[column].append({"int": value * 5, "string": f"kind-{value:03d}", "float": value / 2}.get(kind, value))
        table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        out = folder / "data" / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(out))
    # the split names as the Hub's dataset card declares them (from file names alone `datasets` reads valid as validation)
    files = "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in splits)
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}---\n")
    return folder
