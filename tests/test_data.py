import pytest
import torch

import kd.data
from kd.data import DeviceLoader, augment, load_cifar, random_crop_flip, stratified_split
from kd.errors import UsageError

from conftest import CLASS_NAMES, write_tiny_cifar


def test_loads_hub_schema_parquet(tiny_dataset):
    data = load_cifar(str(tiny_dataset), val_size=32)
    assert data.class_names == CLASS_NAMES and data.num_classes == 4
    assert (len(data.train), len(data.val), len(data.test)) == (160, 32, 64)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    assert len(data.mean) == 3 and all(0 < s < 1 for s in data.std)
    # the red class really is red: decoding kept channel order (RGB, channels first)
    red = data.test.images[data.test.labels == 0].float().mean((0, 2, 3))
    assert red[0] > red[1] + 50 and red[0] > red[2] + 50


def test_image_column_may_be_called_image(tmp_path):
    folder = write_tiny_cifar(tmp_path / "ds", n_train=40, n_test=8, image_column="image")
    assert len(load_cifar(str(folder), val_size=0).train) == 40


def test_limits_and_no_validation_split(tiny_dataset):
    data = load_cifar(str(tiny_dataset), val_size=0, max_train_samples=50, max_eval_samples=10)
    assert data.val is None and len(data.train) == 50 and len(data.test) == 10


def test_stratified_split_is_proportional_disjoint_and_fixed():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    train, val = stratified_split(labels, 100)
    assert torch.bincount(labels[val]).tolist() == [60, 30, 10]
    assert len(set(train.tolist()) | set(val.tolist())) == 1000 and not set(train.tolist()) & set(val.tolist())
    assert torch.equal(val, stratified_split(labels, 100)[1])  # the same split every time


def test_decode_happens_once(tiny_dataset, monkeypatch):
    load_cifar(str(tiny_dataset), val_size=0)  # fills the cache if this test runs first

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(kd.data, "_decode", no_decoding)
    again = load_cifar(str(tiny_dataset), val_size=0)
    assert len(again.train) == 192


def test_augment_crops_inside_the_padded_image_and_flips_half():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(1)
    dy, dx, flip = random_crop_flip(400, generator)
    out = augment(images, dy, dx, flip)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert 0 <= dy.min() and dy.max() <= 8 and 0 <= dx.min() and dx.max() <= 8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(400):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], crop.flip(2) if flip[i] else crop)
    assert 0.4 < flip.float().mean() < 0.6
    assert (dy != 4).any() and (dx != 4).any()  # it does move the images


def test_loader_shards_the_global_batch_like_one_process(tiny_dataset):
    data = load_cifar(str(tiny_dataset), val_size=0)
    common = dict(device=torch.device("cpu"), mean=data.mean, std=data.std, train=True, seed=3)
    single = list(DeviceLoader(data.train, 32, **common))
    halves = [list(DeviceLoader(data.train, 32, process_index=r, num_processes=2, **common)) for r in range(2)]
    assert len(single) == 6
    for step, (images, labels, index) in enumerate(single):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), images)
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), labels)


def test_evaluation_counts_every_image_once_over_processes(tiny_dataset):
    data = load_cifar(str(tiny_dataset), val_size=0, max_eval_samples=61)
    seen = []
    for rank in range(3):
        loader = DeviceLoader(data.test, 16, torch.device("cpu"), data.mean, data.std, train=False, process_index=rank, num_processes=3)
        seen += [i for _, _, index in loader for i in index.tolist() if i >= 0]
    assert sorted(seen) == list(range(61))


def test_missing_dataset_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_cifar(str(tmp_path / "nope"))


def test_dataset_without_label_column(tmp_path):
    folder = write_tiny_cifar(tmp_path / "ds", n_train=8, n_test=4, label_column="target")
    with pytest.raises(UsageError, match="no 'label' column"):
        load_cifar(str(folder), val_size=0)
