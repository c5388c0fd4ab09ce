import re

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


@pytest.mark.parametrize("name", ALL_MODELS)
def test_timm_conventions(name):
    """What timm's own model tests check of every model: features_only, forward_features +
    forward_head == forward, reset_classifier, global_pool, drop_rate and the pretrained_cfg."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, 8, 8)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)

    wrapped = timm.create_model(name, features_only=True).eval()
    maps = wrapped(x)
    assert [m.shape[1] for m in maps] == wrapped.feature_info.channels()
    assert [32 // m.shape[-1] for m in maps] == wrapped.feature_info.reduction() == [1, 1, 2, 4]
    # the wrapper flattens the stem and stage Sequentials: stem.0 -> stem_0, layers.1.0 -> layers_1.0
    flat = {re.sub(r"^(stem|layers)\.(\d+)", r"\1_\2", k): v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    wrapped.load_state_dict(flat)
    _, taps = model.forward_taps(x, ["stem", "layer1", "layer2", "layer3"])
    for feature_map, tap in zip(wrapped(x), ("stem", "layer1", "layer2", "layer3")):
        torch.testing.assert_close(feature_map, taps[tap])  # the features are the named taps
    only_last = timm.create_model(name, features_only=True, out_indices=(3,))
    assert [m.shape[1] for m in only_last(x)] == [model.num_features]

    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, model.num_features, 8, 8)  # no pooling: the feature map

    max_pooled = timm.create_model(name, num_classes=0, global_pool="max").eval()
    max_pooled.load_state_dict(model.state_dict())
    torch.testing.assert_close(max_pooled(x), features.amax((2, 3)))
    dropped = timm.create_model(name, num_classes=0, drop_rate=0.5).train()
    assert (dropped.forward_head(features) == 0).float().mean() > 0.3  # dropout before the classifier
    torch.testing.assert_close(dropped.eval().forward_head(features), features.mean((2, 3)))  # no dropout in eval

    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and len(cfg["mean"]) == len(cfg["std"]) == 3
    assert tuple(model.pretrained_cfg["mean"]) == (0.4914, 0.4822, 0.4465) and all(0 < s < 1 for s in cfg["std"])
    state = model.state_dict()
    assert model.pretrained_cfg["first_conv"] + ".weight" in state
    assert timm.create_model(name).pretrained_cfg["classifier"] + ".weight" in timm.create_model(name).state_dict()
