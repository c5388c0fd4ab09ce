"""The distillation methods: their losses, the frozen teacher, and every mode end to end."""

import json
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
from kd.train.engine import make_optimizer

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
    return build_distiller(mode, timm.create_model(student, num_classes=10), frozen, cfg, train_labels=torch.arange(20) % 10), frozen


@pytest.mark.parametrize("mode", ["hidden-trained", "hybrid"])
def test_feature_modes_measure_taps_at_the_models_own_image_size(mode):
    """64x64 images (a Tiny ImageNet run): the taps are measured at the size the models record
    (the runner sets the student's, the export the teacher's), so an adapter between maps of
    different sizes resizes to the teacher's real 32x32, not to the 16x16 of a 32x32 input."""
    def at_64(name):
        model = timm.create_model(name, num_classes=10)
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 64, 64)}
        return model
    cfg = DistillConfig(mode=mode, student_layer="layer3", teacher_layer="layer2")
    method = build_distiller(mode, at_64("cifar_resnet8x4"), FrozenTeacher(at_64("cifar_resnet14x4")), cfg,
                             train_labels=torch.arange(20) % 10)
    method.train()
    _, terms = method(torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,)))
    assert all(torch.isfinite(value) for value in terms.values())


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


# which terms each weight scales, per mode (the logits term's alpha: test_logits_loss_weights...)
WEIGHTED = {
    "logits": {},
    "hidden": {"hidden_factor": ["loss_hidden"]},
    "hidden-trained": {"hidden_factor": ["loss_hidden"]},
    "hybrid": {"hidden_factor": ["loss_hidden"], "logits_factor": ["loss_ce", "loss_kd"]},
    "at": {"at_beta": ["loss_at"]},
    "dkd": {"dkd_alpha": ["loss_tckd"], "dkd_beta": ["loss_nckd"]},
    "dist": {"dist_beta": ["loss_inter"], "dist_gamma": ["loss_intra"]},
    "crd": {"crd_weight": ["loss_crd"]},
}


def test_every_registered_mode_builds_and_returns_weighted_terms():
    """Each weight scales its own terms, and only them (hidden_factor, logits_factor, at_beta, DKD's
    alpha and beta, DIST's beta and gamma, CRD's weight)."""
    assert set(WEIGHTED) == set(DISTILLERS)  # a new mode says which terms its weights scale
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))

    def terms(mode, **overrides):
        torch.manual_seed(0)  # the same student, teacher and adapter weights every time
        method, _ = _build(mode, **overrides)
        logits, values = method.eval()(images, labels, torch.arange(2))  # dataset indices, for CRD's banks
        assert logits.shape == (2, 10) and values and all(v.ndim == 0 and torch.isfinite(v) for v in values.values())
        return {k: v.item() for k, v in values.items()}

    for mode, weights in WEIGHTED.items():
        base = terms(mode)
        defaults = DISTILLERS[mode].pair_defaults(DistillConfig(mode=mode), "cifar_resnet14x4", "cifar_resnet8x4")  # _build's pair
        for weight, scaled in weights.items():
            tripled = terms(mode, **{weight: 3 * getattr(defaults, weight)})
            for name, value in base.items():
                assert tripled[name] == pytest.approx(3 * value if name in scaled else value, rel=1e-5), (mode, weight, name)


@pytest.fixture(scope="module")
def accumulated_runs(tiny_dataset, tiny_teacher, tmp_path_factory):
    """One run per mode on one process with two micro-batches per step (--grad-accum 2): the
    BatchNorm batches of two processes. Made on first use, kept for the module."""
    runs = {}

    def run(mode):
        if mode not in runs:
            out = tmp_path_factory.mktemp("accum") / mode
            runs[mode] = (out, run_script("distill.py", *_e2e_args(mode, tiny_dataset, tiny_teacher, out), "--grad-accum", "2"))
        return runs[mode]

    return run


def _e2e_args(mode, dataset, teacher, out):
    return ["--mode", mode, "--teacher", teacher, "--dataset", dataset, "--model", "cifar_resnet8", "--student-layer", "layer2",
            "--teacher-layer", "layer2", "--output-dir", out, *TINY_FLAGS, "--mixed-precision", "no",
            # DIST's 1 - Pearson over 4 classes is steep while the logits are small: at lr 0.05 it diverges on this tiny set
            *{"dist": ["--lr", "0.01"]}.get(mode, [])]


def _history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("mode", list(DISTILLERS))
def test_distill_end_to_end(mode, processes, tiny_dataset, tiny_teacher, accumulated_runs, tmp_path):
    """One process accumulating two micro-batches, and two processes, which must train exactly
    like it (the same images, order, augmentation and BatchNorm batches per step)."""
    before = load_file(tiny_teacher / "model.safetensors")
    if processes == 1:
        out, result = accumulated_runs(mode)
    else:
        out = tmp_path / mode
        result = run_script("distill.py", *_e2e_args(mode, tiny_dataset, tiny_teacher, out), processes=2)
        accumulated = _history(accumulated_runs(mode)[0])
        ours = _history(out)
        assert [(h["step"], h["lr"]) for h in ours] == [(h["step"], h["lr"]) for h in accumulated]
        for a, b in zip(ours, accumulated):
            for term in (k for k in a if k.startswith("loss")):
                assert a[term] == pytest.approx(b[term], rel=1e-3), (term, ours, accumulated)
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


def test_at_loss_equals_hand_computed_value():
    from kd.distillers.attention import at_loss

    student = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # 1 image, 2 channels, 1x2 positions
    teacher = torch.tensor([[[[0.0, 1.0]], [[2.0, 2.0]], [[1.0, 1.0]]]])  # 3 channels
    a_s = [(1 + 9) / 2, (4 + 0) / 2]  # channel mean of the squares: [5, 2]
    a_t = [(0 + 4 + 1) / 3, (1 + 4 + 1) / 3]  # [5/3, 2]
    a_s = [v / math.hypot(*a_s) for v in a_s]
    a_t = [v / math.hypot(*a_t) for v in a_t]
    per_stage = sum((s - t) ** 2 for s, t in zip(a_s, a_t)) / 2  # mean over the 2 positions
    beta = 1000.0
    assert at_loss([student, student], [teacher, teacher], beta).item() == pytest.approx(beta / 2 * 2 * per_stage, rel=1e-6)


def test_attention_map_of_fp16_features_above_256_is_finite_and_exact():
    from kd.distillers.attention import attention_map

    features = torch.rand(2, 8, 4, 4) * 1000 + 300  # every square overflows fp16 (max 65504)
    half = attention_map(features.half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, attention_map(features.half().float()), rtol=0, atol=0)


def test_teacher_sees_images_normalised_with_its_own_statistics():
    """Batches are normalised with the student run's statistics; a teacher trained on other
    statistics (its exported pretrained_cfg mean/std) must get its own normalisation back."""
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=4).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.2, 0.5, 0.7), "std": (0.1, 0.3, 0.2)}
    student_mean, student_std = (0.45, 0.4, 0.35), (0.25, 0.2, 0.3)
    raw = torch.rand(4, 3, 32, 32)
    as_student = (raw - torch.tensor(student_mean).view(1, 3, 1, 1)) / torch.tensor(student_std).view(1, 3, 1, 1)
    as_teacher = (raw - torch.tensor((0.2, 0.5, 0.7)).view(1, 3, 1, 1)) / torch.tensor((0.1, 0.3, 0.2)).view(1, 3, 1, 1)
    teacher = FrozenTeacher(model).match_input(student_mean, student_std)
    with torch.no_grad():
        expected_logits, expected_taps = model.forward_taps(as_teacher, ["layer1"])
    torch.testing.assert_close(teacher.logits(as_student), expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher.taps(as_student, ["layer1"])["layer1"], expected_taps["layer1"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher.logits_and_taps(as_student, ["layer1"])[0], expected_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model(as_student), expected_logits, atol=1e-2)  # the statistics really differ
    same = FrozenTeacher(model).match_input((0.2, 0.5, 0.7), (0.1, 0.3, 0.2))
    assert torch.equal(same.logits(as_teacher), model(as_teacher))  # equal statistics: the batch goes in unchanged


def test_killed_distillation_resumes_as_if_uninterrupted_and_refuses_other_data_or_teacher(tiny_dataset, tiny_teacher, tmp_path):
    """hidden-trained carries an adapter and SGD momentum for it: both come back from the
    checkpoint, so the resumed run equals an uninterrupted one. A resume with another dataset
    or teacher would train something else under the same run: refused in one line."""
    from conftest import kill_after_epochs, write_tiny_cifar

    args = ["--mode", "hidden-trained", "--teacher", tiny_teacher, "--dataset", tiny_dataset, "--model", "cifar_resnet8",
            *TINY_FLAGS, "--epochs", "3", "--mixed-precision", "no"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_script("distill.py", *args, "--output-dir", whole)
    assert 1 <= kill_after_epochs("distill.py", killed, 1, *args) < 3
    state = (killed / "checkpoint" / "trainer_state.json").read_text()

    other_data = write_tiny_cifar(tmp_path / "other-data", seed=1)
    other_teacher = tmp_path / "other-teacher"
    other_teacher.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other_teacher / name).write_bytes((tiny_teacher / name).read_bytes())
    for flag, value in (("--dataset", other_data), ("--teacher", other_teacher)):
        changed = [value if previous == flag else a for previous, a in zip([None, *args], args)]
        result = run_script("distill.py", *changed, "--output-dir", killed, "--resume", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert lines[0].startswith(f"error: --resume: {flag[2:]} was ") and str(value) in lines[0]
    assert (killed / "checkpoint" / "trainer_state.json").read_text() == state  # refused before anything was written

    run_script("distill.py", *args, "--output-dir", killed, "--resume")
    assert read_json(killed / "metrics.json") == read_json(whole / "metrics.json")
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "history.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(killed) == losses(whole)
