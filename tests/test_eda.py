"""`python -m kd.eda` on a tiny dataset with unequal classes, checked against counts and pixel
statistics computed here straight from the parquet files."""

import io
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from conftest import CLASS_NAMES, REPO, read_json, write_tiny_cifar


def truth(folder, split):
    table = pq.read_table(folder / "plain_text" / f"{split}-00000-of-00001.parquet").to_pydict()
    counts = Counter(CLASS_NAMES[label] for label in table["label"])
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(image["bytes"]))) for image in table["img"]]) / 255.0
    return counts, pixels.reshape(-1, 3).mean(0)


def test_eda_prints_real_counts_and_writes_grid(tmp_path):
    dataset = write_tiny_cifar(tmp_path / "data", n_train=190, n_test=61)  # 190 = 4*47 + 2: classes differ
    out = tmp_path / "eda"
    result = subprocess.run([sys.executable, "-m", "kd.eda", "--dataset", str(dataset), "--output-dir", str(out), "--per-class", "3"],
                            capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    (train_counts, train_mean), (test_counts, _) = truth(dataset, "train"), truth(dataset, "test")
    assert sorted(set(train_counts.values())) == [47, 48]  # the dataset really is unbalanced
    assert "split sizes: train 190, test 61" in result.stdout
    for name in CLASS_NAMES:
        assert re.search(rf"^{name}\s+{train_counts[name]}\s+{test_counts[name]}$", result.stdout, re.M), name
    printed_mean = re.search(r"train channel mean: (.*)", result.stdout).group(1).split()
    np.testing.assert_allclose([float(v) for v in printed_mean], train_mean, atol=6e-5)  # printed to 4 decimals

    summary = read_json(out / "eda.json")
    assert summary["class_counts"]["test"] == dict(test_counts) and summary["split_sizes"] == {"train": 190, "test": 61}
    with Image.open(out / "samples.png") as grid:
        assert grid.format == "PNG" and grid.size[1] > 4 * 32  # four rows of 32-pixel images


def test_eda_rejects_missing_dataset(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kd.eda", "--dataset", str(tmp_path / "none")], capture_output=True, text=True,
                            cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "does not exist" in result.stderr


def test_sample_grid_puts_each_class_on_its_row():
    import torch

    from kd.data import Split
    from kd.eda import sample_grid

    labels = torch.tensor([2, 0, 2, 1, 2, 0])
    values = (labels * 10 + torch.arange(6)).to(torch.uint8)  # image i is filled with 10*label + i
    images = values[:, None, None, None].expand(6, 3, 4, 5).contiguous()
    grid = sample_grid(Split(images, labels), num_classes=3, per_class=2)
    assert grid.shape == (3 * 4, 2 * 5, 3)
    cell = lambda row, col: grid[row * 4:(row + 1) * 4, col * 5:(col + 1) * 5].unique().tolist()  # noqa: E731
    assert [cell(0, 0), cell(0, 1)] == [[1], [5]]  # class 0: images 1 and 5, in order
    assert [cell(1, 0), cell(1, 1)] == [[13], [255]]  # class 1 has one image; the rest is blank
    assert [cell(2, 0), cell(2, 1)] == [[20], [22]]  # class 2: its first two of three


def test_eda_names_a_corrupt_image_by_split_and_row(tmp_path):
    from conftest import write_lookalike

    dataset = write_lookalike(tmp_path / "broken-eda", {"train": 12, "test": 4}, broken={"test": 2})  # a name of its own: see write_lookalike
    result = subprocess.run([sys.executable, "-m", "kd.eda", "--dataset", str(dataset), "--output-dir", str(tmp_path / "eda")],
                            capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "error: the test split's image at row 2 cannot be decoded (UnidentifiedImageError" in result.stderr
