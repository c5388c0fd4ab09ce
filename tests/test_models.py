import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import kd  # noqa: F401  registers the models
from kd.config import DistillConfig
from kd.distillers import DISTILLERS, FrozenTeacher, build_distiller
from kd.models import CifarResNet, TapError, list_taps

from conftest import REPO, run_script

ALL_MODELS = timm.list_models("cifar_*")
ZOO_MODELS = timm.list_models("cifar_rd_*")
# the papers' tables on 100 classes (CRD: Tian et al. 2020, Table 1; DKD: Zhao et al. 2022), in
# millions, and the exact count of the reference code (HobbitLong/RepDistiller models/, run
# with num_classes=100 on 2026-12-04)
PAPER_PARAMS = {
    "cifar_rd_resnet8x4": (1.23, 1233540), "cifar_rd_resnet32x4": (7.43, 7433860), "cifar_rd_resnet56": (0.86, 861620),
    "cifar_rd_resnet110": (1.74, 1736564), "cifar_rd_resnet20": (0.28, 278324), "cifar_rd_resnet32": (0.47, 472756),
    "cifar_rd_wrn_40_2": (2.26, 2255156), "cifar_rd_wrn_16_2": (0.70, 703284), "cifar_rd_wrn_40_1": (0.57, 569780),
    "cifar_rd_vgg13": (9.46, 9462180), "cifar_rd_vgg8": (3.96, 3965028), "cifar_rd_mobilenetv2": (0.81, 812836),
    "cifar_rd_shufflenetv2": (1.36, 1355528),
}
# the reference's feature maps f0, f1, ... (its `is_feat=True` list, before pooling) as (C, H, W)
# on 32x32 inputs, which the taps stem, layer1, ... are
REFERENCE_FEATURES = {
    "cifar_rd_resnet8x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "cifar_rd_resnet32x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)],
    "cifar_rd_wrn_40_2": [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)],
    "cifar_rd_vgg13": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)],
    "cifar_rd_mobilenetv2": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
    "cifar_rd_shufflenetv2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)],
}


def test_every_model_is_registered():
    assert set(ALL_MODELS) - set(ZOO_MODELS) == {"cifar_resnet8", "cifar_resnet14", "cifar_resnet20", "cifar_resnet32",
                                                 "cifar_resnet56", "cifar_resnet110", "cifar_resnet8x4", "cifar_resnet14x4"}
    assert set(ZOO_MODELS) == set(PAPER_PARAMS)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_parameter_counts_are_the_papers(name):
    """On 100 classes (the zoo's default): the reference code's exact count, and the table's to
    its last digit (the tables print VGG8's 3.965M as 3.96, resnet110's 1.737M as 1.74)."""
    table, exact = PAPER_PARAMS[name]
    model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert model.num_classes == 100 and count == exact and abs(count / 1e6 - table) < 0.01


@pytest.mark.parametrize("name", sorted(REFERENCE_FEATURES))
def test_zoo_taps_are_the_reference_features(name):
    shapes = list_taps(timm.create_model(name))
    names = ["stem"] + [f"layer{i}" for i in range(1, len(REFERENCE_FEATURES[name]))]
    assert [shapes[n] for n in names] == REFERENCE_FEATURES[name]


def test_the_papers_resnet8x4_is_not_kds():
    """kd's cifar_resnet8x4 (the seed report's student) has a 64-channel stem and zero-initialised
    last BNs; the papers' a 32-channel stem and every BN gamma 1. The rest is the same."""
    ours, papers = timm.create_model("cifar_resnet8x4", num_classes=100), timm.create_model("cifar_rd_resnet8x4")
    assert list_taps(ours)["stem"] == (64, 32, 32) and list_taps(papers)["stem"] == (32, 32, 32)
    assert sum(p.numel() for p in ours.parameters()) == 1250724
    assert (ours.layers[0][0].bn2.weight == 0).all() and (papers.layers[0][0].bn2.weight == 1).all()
    assert list_taps(ours)["layer3"] == list_taps(papers)["layer3"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and len(model.pretrained_cfg["mean"]) == 3


@pytest.mark.parametrize("name", ALL_MODELS)
def test_taps_agree_with_forward(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    last = model.tap_names()[-1]
    logits, features = model(x, taps=("layer2", "layer3", last))
    torch.testing.assert_close(logits, model(x))
    shapes = list_taps(model)
    assert tuple(features["layer2"].shape[1:]) == shapes["layer2"]
    # the last tap is what the head pools (CRD embeds it): the features, num_features channels
    torch.testing.assert_close(features[last], model.forward_features(x))
    assert shapes[last] == (model.num_features, *model.pretrained_cfg["pool_size"])
    torch.testing.assert_close(model.forward_head(features[last], pre_logits=True), features[last].mean((2, 3)))
    if isinstance(model, CifarResNet):
        assert shapes["layer2"] == shapes[f"layer2.{len(model.layers[1]) - 1}"]  # stage = its last block
        assert shapes["layer3"][1:] == (8, 8) and shapes["stem"][1:] == (32, 32)
    # stage taps halve the size (or keep it): AT and hidden pairs match by these names
    sizes = [shapes[n][1] for n in ("stem", "layer1", "layer2", "layer3")]
    assert all(a in (b, 2 * b) for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("name,expected", [("cifar_resnet14x4", 2.78e6), ("cifar_resnet8x4", 1.23e6)])
def test_report_pair_parameter_counts(name, expected):
    count = sum(p.numel() for p in timm.create_model(name).parameters())
    assert abs(count - expected) / expected < 0.05


def test_report_pair_layer2_is_128x16x16():
    for name in ("cifar_resnet14x4", "cifar_resnet8x4"):
        assert list_taps(timm.create_model(name))["layer2"] == (128, 16, 16)


def test_stop_early_runs_nothing_after_the_tap():
    model = timm.create_model("cifar_resnet14x4").eval()
    calls = []
    model.layers[2].register_forward_hook(lambda *_: calls.append("layer3"))
    model.fc.register_forward_hook(lambda *_: calls.append("fc"))
    logits, features = model.forward_taps(torch.randn(1, 3, 32, 32), ["layer2"], stop_early=True)
    assert logits is None and set(features) == {"layer2"} and calls == []


def test_unknown_tap_lists_valid_names():
    with pytest.raises(TapError, match="valid layer names: stem, layer1.0"):
        timm.create_model("cifar_resnet8").forward_taps(torch.zeros(1, 3, 32, 32), ["layer9"])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_timm_conventions(name):
    """What timm's own model tests check of every model: features_only, forward_features +
    forward_head == forward, reset_classifier, global_pool, drop_rate and the pretrained_cfg."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    pool_size = tuple(model.pretrained_cfg["pool_size"])
    assert features.shape == (2, model.num_features, *pool_size)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)

    wrapped = timm.create_model(name, features_only=True).eval()
    maps = wrapped(x)
    assert [m.shape[1] for m in maps] == wrapped.feature_info.channels()
    assert [32 // m.shape[-1] for m in maps] == wrapped.feature_info.reduction()
    if isinstance(model, CifarResNet):
        assert wrapped.feature_info.reduction() == [1, 1, 2, 4]
    # the wrapper flattens the top-level Sequentials: stem.0 -> stem_0, layers.1.0 -> layers_1.0
    sequentials = "|".join(n for n, m in model.named_children() if isinstance(m, torch.nn.Sequential))
    flat = {re.sub(rf"^({sequentials})\.(\d+)", r"\1_\2", k): v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    wrapped.load_state_dict(flat)
    tap_of = [info.get("tap") for info in model.feature_info] if "tap" in model.feature_info[0] else ["stem", "layer1", "layer2", "layer3"]
    _, taps = model.forward_taps(x, tap_of)
    for feature_map, tap in zip(wrapped(x), tap_of):
        torch.testing.assert_close(feature_map, taps[tap])  # the features are the named taps
    only_last = timm.create_model(name, features_only=True, out_indices=(len(model.feature_info) - 1,))
    assert [m.shape[1] for m in only_last(x)] == [model.num_features]

    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, model.num_features, *pool_size)  # no pooling: the feature map

    max_pooled = timm.create_model(name, num_classes=0, global_pool="max").eval()
    max_pooled.load_state_dict(model.state_dict())
    torch.testing.assert_close(max_pooled(x), features.amax((2, 3)))
    dropped = timm.create_model(name, num_classes=0, drop_rate=0.5).train()
    assert (dropped.forward_head(features) == 0).float().mean() > 0.3  # dropout before the classifier
    torch.testing.assert_close(dropped.eval().forward_head(features), features.mean((2, 3)))  # no dropout in eval

    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and len(cfg["mean"]) == len(cfg["std"]) == 3
    cifar_mean = (0.5071, 0.4867, 0.4408) if name in ZOO_MODELS else (0.4914, 0.4822, 0.4465)  # CIFAR-100's, CIFAR-10's
    assert tuple(model.pretrained_cfg["mean"]) == cifar_mean and all(0 < s < 1 for s in cfg["std"])
    state = model.state_dict()
    assert model.pretrained_cfg["first_conv"] + ".weight" in state
    assert timm.create_model(name).pretrained_cfg["classifier"] + ".weight" in timm.create_model(name).state_dict()


# the smallest zoo model of each architecture class: the taps API is the class's
ONE_PER_CLASS = ["cifar_rd_resnet20", "cifar_rd_wrn_16_2", "cifar_rd_vgg8", "cifar_rd_mobilenetv2", "cifar_rd_shufflenetv2"]


def test_one_per_class_covers_every_zoo_class():
    assert {type(timm.create_model(n)) for n in ZOO_MODELS} == {type(timm.create_model(n)) for n in ONE_PER_CLASS}


@pytest.mark.parametrize("mode", sorted(DISTILLERS))
@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_every_method_trains_every_zoo_architecture(name, mode):
    """Each method with the zoo model as student and as teacher (its own architecture, so that
    every method's shape rules hold) takes a training step: finite loss terms, a gradient that
    reaches the student's first layer."""
    torch.manual_seed(0)
    teacher = FrozenTeacher(timm.create_model(name, num_classes=5))
    method = build_distiller(mode, timm.create_model(name, num_classes=5), teacher, DistillConfig(mode=mode, crd_negatives=4),
                             train_labels=torch.arange(8) % 5).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, terms = method(images, labels, torch.arange(4))
    assert logits.shape == (4, 5) and len(terms) >= 2 and all(torch.isfinite(t) for t in terms.values())
    sum(terms.values()).backward()
    assert method.student.fc.weight.grad is not None and torch.isfinite(method.student.fc.weight.grad).all()
    assert all(p.grad is not None for p in method.student.stem.parameters())  # the gradient reaches the input end


@pytest.mark.parametrize("mode", ["hidden-trained", "crd", "dkd"])
def test_cross_architecture_pairs(mode):
    """The papers' cross-architecture rows: a VGG13 teacher for MobileNetV2 and a ResNet32x4 for
    ShuffleNetV2; feature methods go through an adapter or an embedding."""
    for teacher_name, student_name in (("cifar_rd_vgg13", "cifar_rd_mobilenetv2"), ("cifar_rd_resnet32x4", "cifar_rd_shufflenetv2")):
        teacher = FrozenTeacher(timm.create_model(teacher_name))
        method = build_distiller(mode, timm.create_model(student_name), teacher, DistillConfig(mode=mode, crd_negatives=4),
                                 train_labels=torch.arange(8) % 4).train()
        logits, terms = method(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), torch.arange(2))
        assert logits.shape == (2, 100) and all(torch.isfinite(t) for t in terms.values())


def write_cifar100_lookalike(folder: Path, label_columns=("fine_label", "coarse_label"), classes: int = 100, n_train: int = 64,
                             n_test: int = 32) -> Path:
    """CIFAR-100's Hub layout in small: 32x32 PNGs in `img`, 100 fine classes (a colour each,
    plus noise) and 20 coarse ones (fine // 5), in plain_text/{split}-00000-of-00001.parquet."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    counts = {"coarse_label": classes // 5}
    labels = {c: datasets.ClassLabel(names=[f"{c}_{i}" for i in range(counts.get(c, classes))]) for c in label_columns}
    features = datasets.Features({"img": datasets.Image(), **labels})
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % classes)
        images = []
        for label in fine:
            pixels = np.array([label * 250 / classes, 255 - label * 250 / classes, (label * 37) % 256]) + rng.normal(0, 20, (32, 32, 3))
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        columns = {"img": images, **{c: (fine // 5 if c == "coarse_label" else fine).tolist() for c in label_columns}}
        out = folder / "plain_text" / f"{split}-00000-of-00001.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(out))
    return folder


QUICK = ["--epochs", "2", "--lr-milestones", "1", "--batch-size", "16", "--report-to", "none", "--max-eval-samples", "16"]


def test_distill_end_to_end_with_a_zoo_pair(tmp_path):
    """train_teacher.py then distill.py on a cheap zoo pair (the papers' resnet20 -> MobileNetV2;
    CRD: the last taps of two architectures, embedded) with the papers' step schedule."""
    data = write_cifar100_lookalike(tmp_path / "data", label_columns=("label",), classes=10)
    teacher = tmp_path / "teacher"
    run_script("train_teacher.py", "--dataset", data, "--model", "cifar_rd_resnet20", "--val-size", "0", "--output-dir", teacher, *QUICK)
    student = tmp_path / "student"
    result = run_script("distill.py", "--dataset", data, "--teacher", teacher, "--mode", "crd", "--model", "cifar_rd_mobilenetv2",
                        "--val-size", "0", "--lr", "0.05", "--output-dir", student, *QUICK)
    history = [json.loads(line) for line in (student / "history.jsonl").read_text().splitlines()]
    assert [round(h["lr"], 6) for h in history] == [0.05, 0.005]  # x0.1 after epoch 1
    assert all(np.isfinite(h["loss_crd"]) for h in history)
    assert 0 <= json.loads((student / "metrics.json").read_text())["test"]["accuracy"] <= 1 and str(student) in result.stdout
    config = json.loads((student / "config.json").read_text())
    assert config["architecture"] == "cifar_rd_mobilenetv2" and config["num_classes"] == 10


def test_cifar100_presets_on_a_lookalike(tmp_path):
    """The benchmark's two presets, as the docs run them, on CIFAR-100's layout (two label
    columns: the presets pick fine_label); cheaper models and 2 epochs from the command line."""
    data = write_cifar100_lookalike(tmp_path / "data")
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    run_script("train_teacher.py", "--config", REPO / "presets" / "cifar100-teacher.yaml", "--dataset", data,
               "--model", "cifar_rd_resnet20", "--output-dir", teacher, *QUICK)
    run_script("distill.py", "--config", REPO / "presets" / "cifar100-student.yaml", "--mode", "dkd", "--dataset", data,
               "--teacher", teacher, "--output-dir", student, *QUICK)
    resolved = json.loads((student / "run_config.json").read_text())
    train, distill = resolved["train"], resolved["distill"]
    assert (train["model"], train["lr"], train["weight_decay"], train["val_size"]) == ("cifar_rd_resnet8x4", 0.05, 5e-4, 0)
    assert (distill["dkd_alpha"], distill["dkd_beta"], distill["temperature"]) == (1.0, 8.0, 4.0)  # the papers' DKD for the pair
    metrics = json.loads((student / "metrics.json").read_text())
    assert len(json.loads((teacher / "config.json").read_text())["label_names"]) == 100 and "test" in metrics


def test_cifar100_presets_hold_the_papers_recipe():
    """The papers' schedule, all 50,000 training images, resnet32x4 -> resnet8x4 (the papers'),
    and only options the scripts know."""
    import yaml

    from kd.cli import distill_parser, train_parser

    for parser, preset, model in ((train_parser("teacher"), "cifar100-teacher.yaml", "cifar_rd_resnet32x4"),
                                  (distill_parser(), "cifar100-student.yaml", "cifar_rd_resnet8x4")):
        values = yaml.safe_load((REPO / "presets" / preset).read_text())
        recipe = {"model": model, "epochs": 240, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                  "warmup_epochs": 0, "lr_milestones": [150, 180, 210], "lr_decay": 0.1, "val_size": 0,
                  "dataset": "uoft-cs/cifar100", "label_column": "fine_label"}
        assert {key: values.get(key) for key in recipe} == recipe
        assert set(values) <= {action.dest for action in parser._actions}
