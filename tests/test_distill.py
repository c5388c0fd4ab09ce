"""The distillation methods: their losses, the frozen teacher, and every mode end to end."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import kd  # noqa: F401
from kd.config import DistillConfig, TrainConfig
from kd.distillers import DISTILLERS, FrozenTeacher, build_distiller, kd_loss
from kd.distillers.logits import LogitsKD
from kd.engine import make_optimizer

from conftest import TINY_FLAGS, read_json, run_script


def test_kd_loss_equals_hand_computed_value():
    student = torch.tensor([[1.0, 2.0, 0.5]])
    teacher = torch.tensor([[0.0, 3.0, 1.0]])
    T = 2.0
    p_teacher = [math.exp(v / T) for v in (0.0, 3.0, 1.0)]
    p_teacher = [v / sum(p_teacher) for v in p_teacher]
    p_student = [math.exp(v / T) for v in (1.0, 2.0, 0.5)]
    p_student = [v / sum(p_student) for v in p_student]
    kl = sum(t * math.log(t / s) for t, s in zip(p_teacher, p_student))
    assert kd_loss(student, teacher, T).item() == pytest.approx(T**2 * kl, rel=1e-6)


def test_logits_loss_weights_and_alpha_zero_is_cross_entropy():
    torch.manual_seed(0)
    student_model = timm.create_model("cifar_resnet8", num_classes=10)
    teacher = FrozenTeacher(timm.create_model("cifar_resnet8", num_classes=10))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for alpha in (0.0, 0.7):
        method = LogitsKD(student_model, teacher, temperature=4.0, alpha=alpha).eval()
        logits, terms = method(images, labels)
        ce = F.cross_entropy(logits, labels).item()
        assert terms["loss_ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-6)
        expected_kd = alpha * kd_loss(logits, teacher.logits(images), 4.0).item()
        assert terms["loss_kd"].item() == pytest.approx(expected_kd, rel=1e-6, abs=1e-9)
        total = sum(terms.values()).item()
        if alpha == 0.0:  # alpha = 0: the summed loss is plain cross-entropy
            assert total == pytest.approx(ce, rel=1e-6)
        else:
            assert total != pytest.approx(ce, rel=1e-3)


def _build(mode, student="cifar_resnet8x4", teacher="cifar_resnet14x4", **overrides):
    cfg = DistillConfig(mode=mode, **overrides)
    frozen = FrozenTeacher(timm.create_model(teacher, num_classes=10))
    return build_distiller(mode, timm.create_model(student, num_classes=10), frozen, cfg, num_train=8), frozen


def test_hidden_never_runs_the_teacher_after_its_tap():
    method, teacher = _build("hidden")
    called = []
    for name in ("layers.2", "fc"):
        teacher.model.get_submodule(name).register_forward_hook(lambda *_, n=name: called.append(n))
    method.train()
    _, terms = method(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert set(terms) == {"loss_ce", "loss_hidden"} and called == []


@pytest.mark.parametrize("mode", ["hidden-trained", "hybrid"])
def test_adapter_learns_and_teacher_gets_nothing(mode):
    method, teacher = _build(mode)
    optimizer = make_optimizer(method, TrainConfig())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapter = list(method.adapter.parameters())
    assert adapter and all(id(p) in optimized for p in adapter)
    assert not optimized & {id(p) for p in teacher.model.parameters()}
    method.train()
    assert not teacher.model.training  # .train() on the method leaves the teacher in eval mode
    _, terms = method(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter)
    assert all(p.grad is None for p in teacher.model.parameters())
    assert not any(k.startswith("teacher") for k in method.state_dict())  # not in the checkpoint


def test_hidden_trained_adapts_any_pair_of_shapes():
    method, _ = _build("hidden-trained", student="cifar_resnet8", student_layer="layer1", teacher_layer="layer3")
    _, terms = method(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))  # 16x32x32 -> 256x8x8
    assert torch.isfinite(terms["loss_hidden"])


def test_every_registered_mode_builds_and_returns_weighted_terms():
    for mode in DISTILLERS:
        method, _ = _build(mode)
        logits, terms = method(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)), torch.arange(2))
        assert logits.shape == (2, 10) and terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("mode", list(DISTILLERS))
def test_distill_end_to_end(mode, processes, tiny_dataset, tiny_teacher, tmp_path):
    out = tmp_path / mode
    before = load_file(tiny_teacher / "model.safetensors")
    # DIST's 1 - Pearson over 4 classes is steep while the logits are small: at lr 0.05 it diverges on this tiny set
    mode_flags = {"dist": ["--lr", "0.01"]}.get(mode, [])
    result = run_script("distill.py", "--mode", mode, "--teacher", tiny_teacher, "--dataset", tiny_dataset, "--model", "cifar_resnet8",
                        "--student-layer", "layer2", "--teacher-layer", "layer2", "--output-dir", out, *TINY_FLAGS, *mode_flags, processes=processes)
    metrics = read_json(out / "metrics.json")
    assert metrics["test"]["num_samples"] == 64 and metrics["test"]["accuracy"] > 0.5  # 4 colours: chance is 0.25
    resolved = read_json(out / "run_config.json")
    assert resolved["method"] == mode and resolved["num_processes"] == processes and resolved["teacher"] == str(tiny_teacher)
    history = (out / "history.jsonl").read_text()
    expected_term = {"logits": "loss_kd", "hidden": "loss_hidden", "hidden-trained": "loss_hidden", "hybrid": "loss_kd", "at": "loss_at",
                     "dkd": "loss_nckd", "dist": "loss_inter", "crd": "loss_crd"}[mode]
    assert expected_term in history and expected_term in result.stdout
    exported = load_file(out / "model.safetensors")
    assert not any(k.startswith(("adapter", "embed", "bank")) for k in exported) and "fc.weight" in exported
    after = load_file(tiny_teacher / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher is untouched


def test_list_layers(tiny_teacher):
    result = run_script("distill.py", "--list-layers", "--teacher", tiny_teacher, "--model", "cifar_resnet8x4")
    assert "layer2     128x16x16" in result.stdout and "layer2     32x16x16" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--mode", "nope"], "invalid choice: 'nope'"),
    (["--mode", "hidden", "--student-layer", "layer9"], "unknown student layer 'layer9'; valid names: stem, layer1.0, layer1"),
    (["--mode", "hidden", "--model", "cifar_resnet8x4"], "student layer2 is 128x16x16 and teacher layer2 is 32x16x16; use --mode hidden-trained"),
    (["--mode", "logits", "--alpha", "1.5"], "--alpha must be in [0, 1]"),
])
def test_bad_distillation_input_gets_one_line(args, message, tiny_dataset, tiny_teacher, tmp_path):
    result = run_script("distill.py", "--teacher", tiny_teacher, "--dataset", tiny_dataset, "--output-dir", tmp_path / "x",
                        *TINY_FLAGS, *args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_teacher_with_other_number_of_classes(tiny_teacher, tmp_path):
    from conftest import write_tiny_cifar

    six = write_tiny_cifar(tmp_path / "six", n_train=48, n_test=12, class_names=["a", "b", "c", "d", "e", "f"])
    result = run_script("distill.py", "--teacher", tiny_teacher, "--dataset", six, "--output-dir", tmp_path / "x", *TINY_FLAGS, check=False)
    assert result.returncode == 2 and "predicts 4 classes but the dataset has 6" in result.stderr


def test_missing_teacher_says_train_one_first(tiny_dataset, tmp_path):
    result = run_script("distill.py", "--teacher", tmp_path / "none", "--dataset", tiny_dataset, "--output-dir", tmp_path / "x", check=False)
    assert result.returncode == 2 and "accelerate launch train_teacher.py" in result.stderr and "Traceback" not in result.stderr
