"""Data sets beyond CIFAR-10, each as a small look-alike in its own Hub layout: a teacher is trained
and a student distilled from it, through the real scripts. What is checked: the columns and the
evaluation split found, the start-up output's data line, the size the export records (and what
timm reads back from it), the model card, and distillation from a teacher of that size."""

import pytest

from conftest import read_json, run_script, write_lookalike

FLAGS = ["--epochs", "1", "--batch-size", "50", "--val-size", "0", "--report-to", "none", "--lr", "0.05", "--model", "cifar_resnet8"]


def teacher_then_student(dataset, tmp_path, *flags):
    """Train a teacher, distil a student from it; returns both runs' stdout."""
    teacher = run_script("train_teacher.py", "--dataset", dataset, "--output-dir", tmp_path / "teacher", *FLAGS, *flags)
    student = run_script("distill.py", "--dataset", dataset, "--teacher", tmp_path / "teacher", "--output-dir", tmp_path / "student",
                         "--mode", "logits", *FLAGS, *flags)
    return teacher.stdout, student.stdout


def exported_input(run_dir):
    import timm

    import kd  # noqa: F401  registers the architectures

    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True)
    return read_json(run_dir / "config.json")["pretrained_cfg"]["input_size"], timm.data.resolve_model_data_config(model)["input_size"]


def test_cifar100_layout_fine_labels(tmp_path):
    dataset = write_lookalike(tmp_path / "cifar100", {"train": 100, "test": 100}, image_column="img",
                              labels={"fine_label": 100, "coarse_label": 20}, num_classes=100)
    refused = run_script("train_teacher.py", "--dataset", dataset, "--output-dir", tmp_path / "refused", *FLAGS, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "2 class-label columns (fine_label, coarse_label); name one with --label-column" in refused.stderr
    teacher, student = teacher_then_student(dataset, tmp_path, "--label-column", "fine_label")
    for out in (teacher, student):
        assert "data: 100 train, 100 test from split 'test'; 100 classes from column 'fine_label', 3x32x32 images from 'img'" in out
    assert len(read_json(tmp_path / "student" / "config.json")["label_names"]) == 100
    assert read_json(tmp_path / "student" / "run_config.json")["data_layout"]["label_column"] == "fine_label"


def test_tiny_imagenet_layout_64px_valid_split_only(tmp_path):
    dataset = write_lookalike(tmp_path / "tiny-imagenet", {"train": 200, "valid": 200}, size=(64, 64), num_classes=200)
    teacher, student = teacher_then_student(dataset, tmp_path)
    # 400 images of 3x64x64 bytes: 4.9 MB; the crop padding an eighth of 64
    assert "data: 200 train, 200 test from split 'valid'; 200 classes from column 'label', 3x64x64 images from 'image', " \
           "4.9 MB uint8 on the device, crop padding 8 px" in teacher
    assert "3x64x64" in student  # distillation from a 64x64 teacher on the same data is not refused
    for run in ("teacher", "student"):
        recorded, resolved = exported_input(tmp_path / run)
        assert recorded == [3, 64, 64] and tuple(resolved) == (3, 64, 64)
    card = (tmp_path / "student" / "README.md").read_text()
    assert "Trained on 64x64 images" in card and "`pretrained_cfg.input_size` is `[3, 64, 64]`" in card
    assert "split: valid" in card  # the card's metadata names the split its test metrics are of


@pytest.fixture(scope="module")
def fashion_mnist(tmp_path_factory):
    """The Fashion-MNIST look-alike and a teacher trained on it (shared by the two tests below)."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    dataset = write_lookalike(folder / "data", {"train": 100, "test": 50}, size=(28, 28), mode="L")
    teacher = run_script("train_teacher.py", "--dataset", dataset, "--output-dir", folder / "teacher", *FLAGS)
    return dataset, folder / "teacher", teacher.stdout


def test_fashion_mnist_layout_28px_grayscale(fashion_mnist, tmp_path):
    dataset, teacher_dir, teacher = fashion_mnist
    run_script("distill.py", "--dataset", dataset, "--teacher", teacher_dir, "--output-dir", tmp_path / "student", "--mode", "logits", *FLAGS)
    assert "10 classes from column 'label', 3x28x28 images from 'image'" in teacher and "crop padding 4 px" in teacher
    recorded, resolved = exported_input(tmp_path / "student")
    assert recorded == [3, 28, 28] and tuple(resolved) == (3, 28, 28)
    mean = read_json(teacher_dir / "config.json")["pretrained_cfg"]["mean"]
    assert mean[0] == pytest.approx(mean[1]) == pytest.approx(mean[2])  # grayscale repeated into three equal channels


def test_teacher_of_another_size_is_refused_with_a_true_message(fashion_mnist, tmp_path):
    _, teacher_dir, _ = fashion_mnist
    large = write_lookalike(tmp_path / "large", {"train": 100, "test": 50}, size=(40, 40))
    result = run_script("distill.py", "--dataset", large, "--teacher", teacher_dir, "--output-dir", tmp_path / "student",
                        *FLAGS, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "was trained on 3x28x28 images but this run's are 3x40x40; pass --image-size 28" in result.stderr
    run_script("distill.py", "--dataset", large, "--teacher", teacher_dir, "--output-dir", tmp_path / "student",
               "--image-size", "28", *FLAGS)  # resized at decode to the teacher's size: accepted
    assert exported_input(tmp_path / "student")[0] == [3, 28, 28]
