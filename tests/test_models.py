import pytest
import timm
import torch

import kd  # noqa: F401  registers the models
from kd.models import TapError, list_taps

ALL_MODELS = timm.list_models("cifar_*")


def test_every_model_is_registered():
    assert set(ALL_MODELS) == {"cifar_resnet8", "cifar_resnet14", "cifar_resnet20", "cifar_resnet32",
                               "cifar_resnet56", "cifar_resnet110", "cifar_resnet8x4", "cifar_resnet14x4"}


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
    logits, features = model(x, taps=("layer2", "layer3"))
    torch.testing.assert_close(logits, model(x))
    shapes = list_taps(model)
    assert tuple(features["layer2"].shape[1:]) == shapes["layer2"]
    assert shapes["layer2"] == shapes[f"layer2.{len(model.layers[1]) - 1}"]  # stage = its last block
    assert shapes["layer3"][1:] == (8, 8) and shapes["stem"][1:] == (32, 32)


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
