"""dkd, dist, crd and --logit-standardization: each loss against the paper's equation worked
by hand, the frozen teacher, DDP against gradient accumulation, kill and resume, bad input."""

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import kd  # noqa: F401
from kd.config import DistillConfig, TrainConfig
from kd.distillers import FrozenTeacher, build_distiller, kd_loss
from kd.distillers.crd import OtherClassSampler, nce_loss, nce_scores
from kd.distillers.dist import dist_loss
from kd.distillers.dkd import dkd_loss
from kd.distillers.logits import standardize
from kd.train.engine import make_optimizer

from conftest import kill_after_epochs, read_json, run_script


def softmax(values, T=1.0):
    exps = [math.exp(v / T) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


# -- DKD ----------------------------------------------------------------------------------------
def test_dkd_terms_equal_hand_computed_values():
    s, t, target, T = [1.0, 2.0, 0.5, -1.0], [0.0, 3.0, 1.0, 0.5], 1, 2.0
    p_s, p_t = softmax(s, T), softmax(t, T)
    tckd = T**2 * kl([p_t[target], 1 - p_t[target]], [p_s[target], 1 - p_s[target]])
    others = [j for j in range(4) if j != target]  # NCKD: softmax over the non-target classes only
    nckd = T**2 * kl(softmax([t[j] for j in others], T), softmax([s[j] for j in others], T))
    got_tckd, got_nckd = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([target]), T)
    assert got_tckd.item() == pytest.approx(tckd, rel=1e-5) and got_nckd.item() == pytest.approx(nckd, rel=1e-5)
    # the paper's eq. (1): KD = TCKD + (1 - p_t^target) * NCKD
    assert kd_loss(torch.tensor([s]), torch.tensor([t]), T).item() == pytest.approx(tckd + (1 - p_t[target]) * nckd, rel=1e-5)
    print(f"DKD hand: TCKD={tckd:.6f} NCKD={nckd:.6f}")


def test_dkd_target_logit_is_masked_out_of_nckd():
    s, t, labels = torch.tensor([[1.0, 2.0, 0.5, -1.0]]), torch.tensor([[0.0, 3.0, 1.0, 0.5]]), torch.tensor([1])
    moved_s, moved_t = s.clone(), t.clone()
    moved_s[0, 1], moved_t[0, 1] = -7.0, 25.0  # only the target logits change
    tckd, nckd = dkd_loss(s, t, labels, 4.0)
    moved_tckd, moved_nckd = dkd_loss(moved_s, moved_t, labels, 4.0)
    assert moved_nckd.item() == pytest.approx(nckd.item(), rel=1e-5) and moved_tckd.item() != pytest.approx(tckd.item(), rel=1e-2)


def _method(mode, **overrides):
    torch.manual_seed(0)
    teacher = FrozenTeacher(timm.create_model("cifar_resnet8", num_classes=10))
    method = build_distiller(mode, timm.create_model("cifar_resnet8", num_classes=10), teacher, DistillConfig(mode=mode, **overrides), train_labels=torch.arange(64) % 10)
    return method, teacher


def test_dkd_weight_warms_up_linearly_over_a_twelfth_of_the_run_by_default():
    method, teacher = _method("dkd")
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.eval()
    tckd, nckd = dkd_loss(method.student(images), teacher.logits(images), labels, 4.0)
    for epoch, epochs, warmup, weight in [(0.0, 24, None, 0.0), (1.0, 24, None, 0.5), (3.0, 24, None, 1.0), (1.0, 24, 4.0, 0.25)]:
        method.warmup_epochs = warmup
        method.set_progress(epoch, epochs)
        _, terms = method(images, labels)
        assert terms["loss_tckd"].item() == pytest.approx(weight * 1.0 * tckd.item(), abs=1e-7)
        assert terms["loss_nckd"].item() == pytest.approx(weight * 2.0 * nckd.item(), abs=1e-7)  # beta 2: the authors' for thin ResNets


# -- DIST ---------------------------------------------------------------------------------------
def test_dist_terms_equal_hand_computed_values():
    s, t, T = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.5, 1.0]], [[0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [2.0, -1.0, 0.0]], 2.0
    p_s, p_t = [softmax(row, T) for row in s], [softmax(row, T) for row in t]
    inter = 1 - sum(pearson(a, b) for a, b in zip(p_s, p_t)) / 3  # per sample, across the classes
    columns = lambda p: [[row[j] for row in p] for j in range(3)]  # noqa: E731
    intra = 1 - sum(pearson(a, b) for a, b in zip(columns(p_s), columns(p_t))) / 3  # per class, across the batch
    got_inter, got_intra = dist_loss(torch.tensor(s), torch.tensor(t), T)
    assert got_inter.item() == pytest.approx(T**2 * inter, rel=1e-5) and got_intra.item() == pytest.approx(T**2 * intra, rel=1e-5)
    print(f"DIST hand: inter={T**2 * inter:.6f} intra={T**2 * intra:.6f}")


def test_dist_closed_forms():
    z = torch.tensor([[2.0, -1.0], [0.5, 1.5], [-0.3, 0.9]])
    inter, intra = dist_loss(z, z, 4.0)
    assert inter.item() == pytest.approx(0, abs=1e-4) and intra.item() == pytest.approx(0, abs=1e-4)  # T^2 = 16 times float rounding
    # two classes, the teacher's swapped: each row and each column is p against 1 - p, correlation -1
    inter, intra = dist_loss(z, z.flip(1), 4.0)
    assert inter.item() == pytest.approx(16 * 2, rel=1e-5) and intra.item() == pytest.approx(16 * 2, rel=1e-5)


# -- logit standardisation ----------------------------------------------------------------------
def test_standardize_is_a_z_score_and_shift_and_scale_invariant():
    assert standardize(torch.tensor([[1.0, 2.0, 3.0]]))[0].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # unbiased std 1
    s, t = torch.tensor([[1.0, 2.0, 0.5, -1.0]]), torch.tensor([[0.0, 3.0, 1.0, 0.5]])
    for a, b in [(3.0, 5.0), (0.2, -4.0)]:
        assert standardize(a * s + b)[0].tolist() == pytest.approx(standardize(s)[0].tolist(), abs=1e-5)
        assert kd_loss(standardize(a * s + b), standardize(t), 2.0).item() == pytest.approx(kd_loss(standardize(s), standardize(t), 2.0).item(), rel=1e-4)
    assert kd_loss(3 * s + 5, t, 2.0).item() != pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-2)  # without it: not invariant


def test_logits_mode_with_standardization_uses_the_papers_cifar_weights():
    method, teacher = _method("logits", logit_standardization=True)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, terms = method.eval()(images, labels)
    assert terms["loss_ce"].item() == pytest.approx(0.1 * F.cross_entropy(logits, labels).item(), rel=1e-5)
    expected = 9 * kd_loss(standardize(logits), standardize(teacher.logits(images)), 2.0).item()
    assert terms["loss_kd"].item() == pytest.approx(expected, rel=1e-5)


# -- CRD ----------------------------------------------------------------------------------------
def test_crd_nce_equals_hand_computed_value():
    bank = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]  # N = 4 unit rows
    embedding = [[0.6, 0.8], [0.0, 1.0]]
    candidates = [[0, 1, 2], [1, 3, 0]]  # column 0: the positive; then K = 2 negatives
    T, N, K = 0.5, 4, 2
    scores = [[math.exp(sum(e * m for e, m in zip(embedding[i], bank[c])) / T) for c in row] for i, row in enumerate(candidates)]
    Z = N * sum(map(sum, scores)) / 6  # the normaliser: N times the mean score of the batch
    loss = 0.0
    for row in scores:
        p = [v / Z for v in row]
        loss -= math.log(p[0] / (p[0] + K / N + 1e-7)) + sum(math.log((K / N) / (q + K / N + 1e-7)) for q in p[1:])
    loss /= 2
    got = nce_loss(nce_scores(torch.tensor(embedding), torch.tensor(bank), torch.tensor(candidates), T), torch.tensor(Z), N)
    assert got.item() == pytest.approx(loss, rel=1e-5)
    print(f"CRD hand: NCE={loss:.6f}")


def test_crd_negatives_depend_on_the_image_and_epoch_only():
    labels = torch.arange(64) % 4
    sampler = OtherClassSampler(labels)
    both = sampler(torch.tensor([3, 5]), labels[[3, 5]], epoch=2, num_negatives=50)
    alone = sampler(torch.tensor([5]), labels[[5]], epoch=2, num_negatives=50)
    assert torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[1])  # however the batch is split
    assert not torch.equal(alone, sampler(torch.tensor([5]), labels[[5]], epoch=3, num_negatives=50))


def test_crd_negatives_are_the_other_classes_images_uniformly_never_the_anchor():
    """RepDistiller's `exact` mode: an image's negatives are drawn from the images of the other
    classes only. Over 2000 draws for each of 3 images (classes 0, 1 and 9 of an unbalanced set),
    no draw is of the anchor's class (so never the anchor), every other-class image is drawn, and
    the counts are uniform (chi-square below its 0.999 quantile)."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([30, 5, 20, 10, 8, 12, 7, 3, 40, 25])])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    sampler = OtherClassSampler(labels)
    for anchor in (int((labels == c).nonzero()[0]) for c in (0, 1, 9)):
        drawn = sampler(torch.tensor([anchor]), labels[[anchor]], epoch=0, num_negatives=2000)[0]
        assert not (labels[drawn] == labels[anchor]).any() and anchor not in drawn.tolist()
        pool = (labels != labels[anchor]).nonzero().flatten()
        counts = torch.bincount(drawn, minlength=len(labels))[pool].double()
        assert (counts > 0).all()
        expected = 2000 / len(pool)
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < len(pool) - 1 + 3.1 * math.sqrt(2 * (len(pool) - 1)), chi2  # ~ the 0.999 quantile (normal approximation)


def test_crd_updates_the_batch_rows_of_both_banks_with_momentum():
    method, teacher = _method("crd")
    images, labels, index = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.tensor([1, 7, 8, 30])
    before = {name: getattr(method, name).clone() for name in ("bank_student", "bank_teacher")}
    method.train()(images, labels, index)
    with torch.no_grad():
        embedded = {"bank_student": method.embed_student(method.student.forward_features(images).mean((2, 3))),
                    "bank_teacher": method.embed_teacher(teacher.model.forward_features(images).mean((2, 3)))}
    for name, new in embedded.items():
        expected = F.normalize(0.5 * before[name][index] + 0.5 * F.normalize(new, dim=1), dim=1)
        assert torch.allclose(getattr(method, name)[index], expected, atol=1e-6)
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(getattr(method, name)[untouched], before[name][untouched])


# -- every new method: the teacher is frozen, extra parameters learn -----------------------------
@pytest.mark.parametrize("mode,overrides", [("dkd", {}), ("dist", {}), ("crd", {}), ("dist", {"logit_standardization": True})])
def test_teacher_gets_no_gradient_and_stays_identical(mode, overrides):
    method, teacher = _method(mode, **overrides)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    optimizer = make_optimizer(method, TrainConfig(lr=0.1))
    method.train()
    method.set_progress(5.0, 10)  # past the DKD warm-up
    _, terms = method(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8))
    sum(terms.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.model.parameters()) and not teacher.model.training
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    heads = [p for name, p in method.named_parameters() if name.startswith("embed")]
    assert bool(heads) == (mode == "crd") and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in heads) and not any(k.startswith("teacher") for k in method.state_dict())


# -- end to end -----------------------------------------------------------------------------------
FLAGS = ["--model", "cifar_resnet8", "--epochs", "2", "--batch-size", "32", "--val-size", "32", "--max-eval-samples", "32",
         "--report-to", "none", "--lr", "0.05", "--seed", "3", "--mixed-precision", "no"]


def _losses(run):
    return [{k: v for k, v in r.items() if k.startswith("loss")} for r in map(json.loads, (run / "history.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("mode_args, tolerance", [(["--mode", "dkd", "--logit-standardization"], 1e-3), (["--mode", "dist"], 5e-3),
                                                  (["--mode", "crd", "--crd-negatives", "100"], 1e-3)], ids=["dkd-ls", "dist", "crd"])
def test_two_processes_equal_one_process_accumulating_two_micro_batches(mode_args, tolerance, tiny_dataset, tiny_teacher, tmp_path):
    """As tests/test_ddp.py: each process's 16 images are one micro-batch of the single process.
    DIST's batch-wise term stays per process, CRD's NCE normaliser Z is set from the main
    process's first micro-batch (the single process's first) and broadcast, and CRD's
    banks take the gathered embeddings once per optimizer step, so all agree to float rounding
    (measured: dkd 3e-6, dist 1.1e-4, crd 5.7e-5 relative on an AMD EPYC; on an Intel Xeon
    without AVX512-BF16 dkd 3.8e-6, crd 5.7e-5, but dist 2.1e-3: its fp32 kernels round
    differently and DIST's batch Pearson terms carry that over two epochs, hence 5e-3 for dist;
    bank rows, unit vectors, 2.9e-4 absolute, where a bank missing the other process's half
    would be off by ~1)."""
    common = ["--teacher", tiny_teacher, "--dataset", tiny_dataset, *FLAGS, *mode_args, "--lr", "0.01"]  # a calm trajectory: rounding is not amplified
    run_script("distill.py", *common, "--output-dir", tmp_path / "p2", processes=2)
    run_script("distill.py", *common, "--output-dir", tmp_path / "p1", "--grad-accum", "2")
    two, one = _losses(tmp_path / "p2"), _losses(tmp_path / "p1")
    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-8) for a, b in zip(one, two) for k in a)
    print(f"{mode_args[1]}: max relative loss difference {worst:.2e}")
    assert len(two) == len(one) == 2 and all(a.keys() == b.keys() for a, b in zip(one, two)) and worst < tolerance
    if "crd" in mode_args:
        banks = [load_file(tmp_path / run / "checkpoint" / "model.safetensors") for run in ("p1", "p2")]
        for name in ("bank_student", "bank_teacher"):
            print(f"{name}: max abs difference {(banks[0][name] - banks[1][name]).abs().max():.2e}")
            assert torch.allclose(banks[0][name], banks[1][name], atol=1e-3)


def test_crd_kill_then_resume_equals_an_uninterrupted_run(tiny_dataset, tiny_teacher, tmp_path):
    args = ["--mode", "crd", "--crd-negatives", "100", "--teacher", tiny_teacher, "--dataset", tiny_dataset, *FLAGS, "--epochs", "4"]
    run_script("distill.py", *args, "--output-dir", tmp_path / "whole")
    done = kill_after_epochs("distill.py", tmp_path / "killed", 2, *args)
    assert 2 <= done < 4, "the run was not killed mid-training"
    resumed = run_script("distill.py", *args, "--output-dir", tmp_path / "killed", "--resume")
    assert "epoch 1:" not in resumed.stdout and "epoch 4:" in resumed.stdout
    assert read_json(tmp_path / "killed" / "metrics.json") == read_json(tmp_path / "whole" / "metrics.json")
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")
    banks = [load_file(tmp_path / run / "checkpoint" / "model.safetensors") for run in ("killed", "whole")]
    assert all(torch.equal(banks[0][name], banks[1][name]) for name in ("bank_student", "bank_teacher"))
    exported = load_file(tmp_path / "whole" / "model.safetensors")
    assert not any(k.startswith(("bank", "embed")) for k in exported)


@pytest.mark.parametrize("args,message", [
    (["--mode", "at", "--logit-standardization"], "--logit-standardization needs a mode with a logits term (logits, dkd, dist), not --mode at"),
    (["--mode", "crd", "--crd-negatives", "1000"], "--crd-negatives must be in [1, 160] (the training images), got 1000"),
    (["--mode", "dkd", "--dkd-beta", "-1"], "--dkd-beta must be >= 0, got -1.0"),
])
def test_bad_method_input_gets_one_line(args, message, tiny_dataset, tiny_teacher, tmp_path):
    result = run_script("distill.py", "--teacher", tiny_teacher, "--dataset", tiny_dataset, "--output-dir", tmp_path / "x", *FLAGS, *args, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0] == f"error: {message}" and "Traceback" not in result.stderr, result.stderr[-2000:]
