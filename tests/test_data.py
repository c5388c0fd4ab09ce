import re

import numpy as np
import psutil
import pytest
import torch

import kd.data.images
from kd.data import DeviceLoader, Layout, Split, augment, check_fits, default_crop_padding, load_cifar, random_crop_flip, stratified_split
from kd.errors import UsageError

from conftest import CLASS_NAMES, write_lookalike, write_tiny_cifar


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

    monkeypatch.setattr(kd.data.images, "decode", no_decoding)
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


def test_same_named_folders_and_a_folder_rewritten_in_place_read_their_own_rows(tmp_path):
    """datasets (5.2) caches a folder whose card declares its splits under the folder's name and
    card, not its files: each version of a folder gets its own cache, and its own decoded copy."""
    splits = {"train": 20, "test": 10}

    def images(folder):
        return load_cifar(str(folder), val_size=0).train.images

    truth = {seed: images(write_lookalike(tmp_path / f"only-{seed}", splits, seed=seed)) for seed in (0, 1, 2)}
    assert not torch.equal(truth[0], truth[1]) and not torch.equal(truth[0], truth[2])
    first = write_lookalike(tmp_path / "a" / "same", splits, seed=0)
    assert torch.equal(images(first), truth[0])
    assert torch.equal(images(write_lookalike(tmp_path / "b" / "same", splits, seed=1)), truth[1])
    write_lookalike(first, splits, seed=2)  # the first folder, its files rewritten
    assert torch.equal(images(first), truth[2])


def test_a_single_class_label_column_of_any_name_is_the_label(tmp_path):
    folder = write_tiny_cifar(tmp_path / "ds", n_train=8, n_test=4, label_column="target")
    data = load_cifar(str(folder), val_size=0)
    assert data.label_column == "target" and data.class_names == CLASS_NAMES


def test_cifar100_layout_lists_its_two_label_columns_and_takes_the_named_one(tmp_path):
    folder = write_lookalike(tmp_path / "c100", {"train": 200, "test": 100}, image_column="img",
                             labels={"fine_label": 100, "coarse_label": 20}, num_classes=100)
    with pytest.raises(UsageError) as caught:
        load_cifar(str(folder), val_size=0)
    message = str(caught.value)
    assert "2 class-label columns (fine_label, coarse_label)" in message and "--label-column" in message and "\n" not in message
    fine = load_cifar(str(folder), val_size=0, layout=Layout(label_column="fine_label"))
    coarse = load_cifar(str(folder), val_size=0, layout=Layout(label_column="coarse_label"))
    assert (fine.num_classes, coarse.num_classes) == (100, 20)
    assert torch.equal(coarse.train.labels, fine.train.labels % 20)  # the look-alike's coarse class is fine % 20


@pytest.mark.parametrize("kind", ["int", "string"])
def test_plain_integer_and_string_labels_become_sorted_classes(tmp_path, kind):
    folder = write_lookalike(tmp_path / kind, {"train": 40, "test": 20}, labels={"label": kind}, num_classes=10)
    data = load_cifar(str(folder), val_size=0)
    # integers sort as numbers (5 before 10), strings as strings
    expected = [str(5 * c) for c in range(10)] if kind == "int" else [f"kind-{c:03d}" for c in range(10)]
    assert data.class_names == expected
    assert data.train.labels.tolist() == [row % 10 for row in range(40)]


def test_a_label_column_that_holds_no_class_labels_says_what_it_holds(tmp_path):
    folder = write_lookalike(tmp_path / "float", {"train": 8, "test": 4}, labels={"label": "float"})
    with pytest.raises(UsageError, match=r"column 'label' of dataset .* holds float32 values, not class labels"):
        load_cifar(str(folder), val_size=0)


def test_evaluation_split_is_test_else_validation_else_valid_or_the_named_one(tmp_path):
    tiny = write_lookalike(tmp_path / "tiny", {"train": 20, "valid": 10})
    assert load_cifar(str(tiny), val_size=0).test_split == "valid"
    other = write_lookalike(tmp_path / "other", {"train": 20, "test": 10, "holdout": 6})
    assert load_cifar(str(other), val_size=0).test_split == "test"
    chosen = load_cifar(str(other), val_size=0, layout=Layout(test_split="holdout"))
    assert chosen.test_split == "holdout" and len(chosen.test) == 6
    with pytest.raises(UsageError, match=r"--test-split 'nope'.*it has train, test, holdout"):
        load_cifar(str(other), val_size=0, layout=Layout(test_split="nope"))


def test_images_of_several_sizes_are_named_or_resized_when_asked(tmp_path):
    folder = write_lookalike(tmp_path / "mixed", {"train": 12, "test": 4}, size=[(32, 32), (32, 32), (40, 30)])
    with pytest.raises(UsageError) as caught:
        load_cifar(str(folder), val_size=0)
    assert "train split's images have 2 sizes: 32x32 (8 images), 40x30 (4 images)" in str(caught.value)
    assert "--image-size" in str(caught.value)
    data = load_cifar(str(folder), val_size=0, layout=Layout(image_size=24))
    assert data.image_shape == (3, 24, 24) and data.test.images.shape[1:] == (3, 24, 24)


def test_resize_takes_the_centre_of_the_shorter_side():
    from PIL import Image

    from kd.data.images import resize_square

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    pixels[:, 6:34] = 255  # all white but for 6 black columns on each side
    out = np.asarray(resize_square(Image.fromarray(pixels), 10))
    # 20x10 after scaling, then its centre 10 columns: the source's columns 10 to 30, all white (a left
    # crop, or a squeeze to 10x10, would take in black columns)
    assert out.shape == (10, 10, 3) and out.min() == 255


def test_a_corrupt_image_is_named_by_split_and_row(tmp_path):
    folder = write_lookalike(tmp_path / "broken", {"train": 12, "test": 4}, broken={"train": 7})
    with pytest.raises(UsageError, match=r"the train split's image at row 7 cannot be decoded \(UnidentifiedImageError"):
        load_cifar(str(folder), val_size=0)


def test_alpha_channel_dropped_with_a_note_and_grayscale_repeated(tmp_path):
    rgba = load_cifar(str(write_lookalike(tmp_path / "rgba", {"train": 10, "test": 3}, mode="RGBA")), val_size=0)
    assert rgba.image_shape == (3, 32, 32)
    assert rgba.notes == ["10 of 10 train images have an alpha channel (RGBA); it is dropped, keeping the colour under transparent pixels",
                          "3 of 3 test images have an alpha channel (RGBA); it is dropped, keeping the colour under transparent pixels"]
    gray = load_cifar(str(write_lookalike(tmp_path / "gray", {"train": 10, "test": 3}, size=(28, 28), mode="L")), val_size=0)
    assert gray.image_shape == (3, 28, 28) and gray.notes == []
    assert torch.equal(gray.train.images[:, 0], gray.train.images[:, 2])


def test_a_set_too_large_for_memory_is_refused_before_decoding(tiny_dataset, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a set that cannot fit")

    monkeypatch.setattr(kd.data.images, "decode", no_decoding)
    with pytest.raises(UsageError) as caught:  # 256 images of 3 x 10^5 x 10^5 bytes: 7.7 PB
        load_cifar(str(tiny_dataset), val_size=0, layout=Layout(image_size=100_000))
    message = str(caught.value)
    assert message.startswith("the decoded images would take 7.7 TB (192 train, 64 eval images of 3x100000x100000 uint8)")
    side = int(re.search(r"pass --image-size (\d+) or less", message).group(1))
    assert 3 * side ** 2 * 256 <= psutil.virtual_memory().available < 3 * (side + 1) ** 2 * 256 * 1.01  # the largest that fits, as free now
    assert "--max-train-samples" not in message  # the 64 evaluation images alone do not fit: fewer training ones would not help


def test_check_fits_counts_one_copy_per_cpu_process_and_names_both_fixes():
    per_image = 3 * 1000 * 1000
    budget = psutil.virtual_memory().available
    images = budget // per_image // 2 + 1  # fits once, not twice
    check_fits({"train": images - 10, "eval": 10}, (3, 1000, 1000), None, copies=1)
    with pytest.raises(UsageError, match=r", 2 copies\) but the host's available memory is .* or --max-train-samples \d+ or less"):
        check_fits({"train": images - 10, "eval": 10}, (3, 1000, 1000), None, copies=2)


def test_max_train_samples_decodes_only_the_rows_it_uses(tmp_path, capsys):
    folder = write_tiny_cifar(tmp_path / "ds", n_train=100, n_test=20, seed=5)
    data = load_cifar(str(folder), val_size=10, max_train_samples=30, max_eval_samples=8)
    assert "decoding 38 train images" in capsys.readouterr().out  # 30 train + 8 validation, not 100
    whole = load_cifar(str(folder), val_size=10)  # the same images as taken from the whole decoded split
    assert torch.equal(data.train.images, whole.train.images[:30]) and torch.equal(data.val.images, whole.val.images[:8])


def test_crop_padding_scales_with_the_image():
    assert [default_crop_padding((3, s, s)) for s in (28, 32, 64, 224)] == [4, 4, 8, 28]
    split = Split(torch.zeros(8, 3, 64, 64, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    loader = DeviceLoader(split, 8, torch.device("cpu"), (0.5,) * 3, (0.25,) * 3, train=True)
    assert loader.crop_padding == 8
    images = torch.ones(8, 3, 64, 64, dtype=torch.uint8)
    dy, dx, flip = random_crop_flip(8, torch.Generator().manual_seed(0), 8)
    # an all-ones image shows its zero padding wherever the crop moved it: up to 8 rows of zeros
    zero_rows = [(augment(images, dy, dx, flip, 8)[i, 0].sum(1) == 0).sum().item() for i in range(8)]
    assert zero_rows == [abs(int(d) - 8) for d in dy]
