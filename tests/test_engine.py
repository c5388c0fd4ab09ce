"""The training loop's arithmetic: learning-rate schedule, weight-decay groups, label smoothing,
the loader's memory format."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import kd  # noqa: F401
from kd.config import TrainConfig
from kd.data import DeviceLoader, Split
from kd.distillers import Supervised
from kd.train.engine import learning_rate, make_optimizer


def test_warmup_is_linear_from_the_first_step_then_cosine_to_zero():
    peak, total, warmup = 0.4, 20, 4
    assert [learning_rate(s, total, warmup, peak) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    for step in range(4, 20):  # cosine over the 16 steps after warm-up
        assert learning_rate(step, total, warmup, peak) == pytest.approx(0.2 * (1 + math.cos(math.pi * (step - 4) / 16)))
    assert learning_rate(12, total, warmup, peak) == pytest.approx(0.2)  # half way: half the peak
    assert learning_rate(20, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(0, 10, 0, 0.1) == pytest.approx(0.1)  # no warm-up: the peak at once


def test_step_decay_at_milestones_after_the_warmup():
    """The CRD/DKD papers' schedule (RepDistiller's adjust_learning_rate: lr * 0.1 ** (number of
    milestones below the 1-based epoch)): 0.05 up to epoch 150, 0.005 from epoch 151, ..."""
    steps_per_epoch, peak = 10, 0.05
    milestones = [150 * steps_per_epoch, 180 * steps_per_epoch, 210 * steps_per_epoch]

    def papers(epoch):  # 1-based, as the reference counts
        return peak * 0.1 ** sum(epoch > m for m in (150, 180, 210))

    for step in range(0, 240 * steps_per_epoch, 7):
        assert learning_rate(step, 2400, 0, peak, milestones, 0.1) == pytest.approx(papers(step // steps_per_epoch + 1), rel=1e-12)
    assert learning_rate(1500, 2400, 0, peak, milestones, 0.1) == pytest.approx(0.005)  # the first step of epoch 151
    assert [learning_rate(s, 40, 4, 0.4, [20], 0.5) for s in (0, 3, 4, 19, 20, 39)] == pytest.approx([0.1, 0.4, 0.4, 0.4, 0.2, 0.2])


def test_weight_decay_only_on_conv_and_linear_weights():
    model = timm.create_model("cifar_resnet8", num_classes=4)
    optimizer = make_optimizer(Supervised(model), TrainConfig(weight_decay=1e-3, momentum=0.8))
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 1e-3 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in decayed["params"]} == {n for n, p in model.named_parameters() if p.ndim > 1}
    plain_names = [names[id(p)] for p in plain["params"]]
    assert all(n.endswith(".bias") or ".bn" in n or "shortcut.1" in n or n.startswith("stem.1") for n in plain_names)
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert all(g["nesterov"] and g["momentum"] == 0.8 for g in optimizer.param_groups)


def test_label_smoothing_is_applied_to_the_cross_entropy():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=4).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    logits, terms = Supervised(model, label_smoothing=0.2)(images, labels)
    log_p = F.log_softmax(logits, 1)
    by_hand = (0.8 * -log_p.gather(1, labels[:, None]).squeeze(1) + 0.2 * -log_p.mean(1)).mean()
    assert terms["loss_ce"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert terms["loss_ce"].item() != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)


@pytest.mark.parametrize("channels_last", [True, False])
def test_loader_memory_format_follows_channels_last(channels_last):
    split = Split(torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 2)
    for train in (True, False):
        loader = DeviceLoader(split, 4, torch.device("cpu"), (0.5,) * 3, (0.25,) * 3, train=train, channels_last=channels_last)
        images = next(iter(loader))[0]
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert images.is_contiguous() == (not channels_last)


@pytest.mark.parametrize("tty", [False, True])
def test_the_loss_is_read_for_the_progress_bar_only_where_it_is_shown(tty, monkeypatch):
    """Reading a loss syncs the device with the host. A bar nobody sees (every process but the
    local main one, any run whose stderr is not a terminal) must not read it; the epoch's means,
    one reading per loss term at the end, are all that is read then."""
    from accelerate import Accelerator

    from kd.train import engine

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    method = Supervised(timm.create_model("cifar_resnet8", num_classes=2))
    cfg = TrainConfig(batch_size=2, epochs=1, lr=0.01)
    method, optimizer = accelerator.prepare(method, make_optimizer(method, cfg))
    split = Split(torch.randint(0, 255, (42, 3, 32, 32), dtype=torch.uint8), torch.arange(42) % 2)
    loader = DeviceLoader(split, 2, accelerator.device, (0.5,) * 3, (0.25,) * 3, train=True)  # 21 steps: the bar updates at 20 and 21
    monkeypatch.setattr(engine.sys.stderr, "isatty", lambda: tty)
    reads = []
    read = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda tensor: reads.append(tensor.numel()) or read(tensor))
    engine.train_one_epoch(accelerator, method, optimizer, loader, cfg, engine.TrainerState(), 21, 0)
    assert len(reads) == 1 + (2 if tty else 0), reads  # the mean of loss_ce, plus the bar's two updates where it is shown
