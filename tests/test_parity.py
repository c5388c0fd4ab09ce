"""Every loss against its authors' code, restated here in float64 from their repositories:

- KD: megvii-research/mdistiller, mdistiller/distillers/KD.py (`kd_loss`);
- LS-KD and LS-DKD: sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py and DKD.py
  (`normalize`), with the weights and temperature of tools/train.py's `--logit-stand` branch;
- DKD: megvii-research/mdistiller, mdistiller/distillers/DKD.py (`dkd_loss`, `cat_mask`);
- DIST: hunto/DIST_KD, classification/lib/models/losses/dist_kd.py (`DIST`, `pearson_correlation`);
- CRD: HobbitLong/RepDistiller, crd/memory.py (`ContrastMemory.forward`: scores, Z fixed on the
  first batch, the momentum update of the banks) and crd/criterion.py (`ContrastLoss`);
- AT: szagoruyko/attention-transfer, utils.py (`at`, `at_loss`) and cifar.py (beta / 2 times the
  sum over groups).

kd's value and its gradient (with respect to the student's logits) must be within 1e-5 relative
of the float64 reference, over a grid: 10 and 100 classes, T from 1 to 8, batches of 1 to 256,
logit scales from 1 to 50, an over-confident student and a confidently wrong one, fp32 and bf16
inputs. Where a formula amplifies rounding, the bound is widened by 4 times the reference's own
fp32 error on the same inputs: a KL of near-equal distributions (T = 8 on logits of scale 1: each
log-ratio is ~0.03, the sum 10x smaller), DIST's Pearson terms of near-uniform probabilities,
CRD's exp(x / 0.07). The reference computes DKD's binary split from masked sums, which keeps its
precision in fp32, so the old `1 - p` with a clamped log (off by 9% and with no gradient for a
confidently wrong student) fails this bound by orders of magnitude."""

import itertools
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import kd  # noqa: F401  (registers the models)
from kd.config import DistillConfig
from kd.distillers import DISTILLERS, FrozenTeacher, build_distiller, kd_loss
from kd.distillers.attention import at_loss
from kd.distillers.crd import MOMENTUM, TEMPERATURE, nce_loss, nce_scores
from kd.distillers.dist import dist_loss
from kd.distillers.dkd import DKD, dkd_loss
from kd.distillers.logits import standardize


# -- the references, in the authors' terms (float64) ---------------------------------------------
def ref_kd(student, teacher, T):
    """mdistiller kd_loss: KL(softmax(t/T) || softmax(s/T)) summed over classes, batch mean, * T^2."""
    log_p_s = F.log_softmax(student / T, dim=1)
    p_t = F.softmax(teacher / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * T**2


def ref_normalize(logit):
    """logit-standardization-KD normalize: (z - mean) / (1e-7 + unbiased std), per sample."""
    return (logit - logit.mean(dim=-1, keepdim=True)) / (1e-7 + logit.std(dim=-1, keepdim=True))


def ref_dkd(student, teacher, target, alpha, beta, T):
    """mdistiller dkd_loss: the softmaxes summed into (target, rest) with masks, log of the student's;
    NCKD with the target logit lowered by 1000 after /T. Returns (alpha * TCKD, beta * NCKD)."""
    gt = torch.zeros_like(student).scatter_(1, target[:, None], 1).bool()
    p_s, p_t = F.softmax(student / T, dim=1), F.softmax(teacher / T, dim=1)
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], 1)  # noqa: E731
    b_s, b_t = cat(p_s), cat(p_t)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T**2 / target.shape[0]
    p_t2 = F.softmax(teacher / T - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(student / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * T**2 / target.shape[0]
    return alpha * tckd, beta * nckd


def ref_dist(student, teacher, T):
    """DIST_KD: y = softmax(z / T); inter = T^2 * (1 - mean Pearson over rows), intra the same
    over columns; Pearson as cosine similarity of centred vectors with eps 1e-8 in the denominator."""
    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    y_s, y_t = (student / T).softmax(dim=1), (teacher / T).softmax(dim=1)
    return T**2 * (1 - pearson(y_s, y_t).mean()), T**2 * (1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())


class RefContrastMemory:
    """RepDistiller ContrastMemory with ContrastLoss: v1 (student) is scored against the teacher's
    memory, v2 (teacher) against the student's; each Z is set from the first batch's scores
    (mean * N) and kept; after scoring, rows y of each memory become normalize(m * row + (1 - m) * v)."""

    def __init__(self, memory_student, memory_teacher, T=TEMPERATURE, momentum=MOMENTUM, dtype=torch.float64):
        self.memory_v1, self.memory_v2 = memory_student.to(dtype).clone(), memory_teacher.to(dtype).clone()
        self.T, self.momentum, self.z_v1, self.z_v2, self.dtype = T, momentum, -1.0, -1.0, dtype

    def contrast_loss(self, x):
        n_data, m, eps = self.memory_v1.shape[0], x.shape[1] - 1, 1e-7
        pn = 1 / float(n_data)
        log_d1 = torch.div(x[:, 0], x[:, 0] + m * pn + eps).log()
        log_d0 = torch.div(torch.full_like(x[:, 1:], m * pn), x[:, 1:] + m * pn + eps).log()
        return -(log_d1.sum(0) + log_d0.reshape(-1, 1).sum(0)) / x.shape[0]

    def step(self, v1, v2, y, idx):
        v1, v2 = v1.to(self.dtype), v2.to(self.dtype)
        batch, dim = v1.shape
        weight_v2 = self.memory_v2[idx.reshape(-1)].reshape(batch, -1, dim)
        out_v1 = torch.exp(torch.bmm(weight_v2, v1.reshape(batch, dim, 1)) / self.T).squeeze(2)
        weight_v1 = self.memory_v1[idx.reshape(-1)].reshape(batch, -1, dim)
        out_v2 = torch.exp(torch.bmm(weight_v1, v2.reshape(batch, dim, 1)) / self.T).squeeze(2)
        if self.z_v1 < 0:
            self.z_v1 = (out_v1.mean() * self.memory_v1.shape[0]).item()
        if self.z_v2 < 0:
            self.z_v2 = (out_v2.mean() * self.memory_v2.shape[0]).item()
        loss = self.contrast_loss(out_v1 / self.z_v1) + self.contrast_loss(out_v2 / self.z_v2)
        for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            rows = memory[y] * self.momentum + v * (1 - self.momentum)
            memory.index_copy_(0, y, rows / rows.pow(2).sum(1, keepdim=True).pow(0.5))
        return loss.squeeze()


# -- the grid -------------------------------------------------------------------------------------
CLASSES, TEMPERATURES, BATCHES, SCALES = (10, 100), (1.0, 2.0, 4.0, 8.0), (1, 7, 256), (1.0, 5.0, 50.0)
STUDENTS = ("random", "over-confident", "confidently wrong")


def logits_case(classes, batch, scale, student_kind, dtype, seed=0):
    """(student, teacher, labels): the teacher leans to the label; the student is random logits,
    or sure of the label (over-confident), or sure of another class (confidently wrong)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch,), generator=g)
    one_hot = F.one_hot(labels, classes).double()
    teacher = scale * (torch.randn(batch, classes, generator=g, dtype=torch.float64) + 2 * one_hot) / 2
    student = scale * torch.randn(batch, classes, generator=g, dtype=torch.float64) / 2
    if student_kind == "over-confident":
        student = student / 4 + scale * one_hot
    elif student_kind == "confidently wrong":
        student = student / 4 + scale * F.one_hot((labels + 1) % classes, classes).double()
    return student.to(dtype), teacher.to(dtype), labels


def grid(dtypes=(torch.float32, torch.bfloat16)):
    return list(itertools.product(CLASSES, BATCHES, SCALES, STUDENTS, dtypes))


def grid_id(case):
    classes, batch, scale, kind, dtype = case
    return f"C{classes}-B{batch}-x{scale:g}-{kind.replace(' ', '_')}-{str(dtype)[6:]}"


def value_and_grad(fn, student, teacher, *args):
    """fn's outputs (a tuple of terms) and the gradient of their sum w.r.t. the student's logits."""
    student = student.detach().clone().requires_grad_(True)
    terms = fn(student, teacher, *args)
    terms = terms if isinstance(terms, tuple) else (terms,)
    (grad,) = torch.autograd.grad(sum(terms), student)
    return [t.detach().double() for t in terms], grad.double()


def reference_error32(ref_fn, student, teacher, labels, T, reference, permutations=4):
    """The reference's own fp32 rounding error on these inputs, (per term, gradient): the largest of
    its errors against float64 over the classes in `permutations` orders (each order sums, and so
    rounds, differently; one order alone can be lucky). nan where the reference fails in fp32 (its
    log of an underflowed probability): then kd is held to the plain bound."""
    g = torch.Generator().manual_seed(3)
    terms_error, grad_error = [0.0] * len(reference[0]), 0.0
    for i in range(permutations):
        order = torch.arange(student.shape[1]) if i == 0 else torch.randperm(student.shape[1], generator=g)
        relabel = torch.argsort(order)[labels]  # a label's class, in the new order
        terms, grad = value_and_grad(ref_fn, student.float()[:, order], teacher.float()[:, order], relabel, T)
        terms_error = [max(e, abs(t.item() - r.item())) for e, t, r in zip(terms_error, terms, reference[0])]
        grad_error = max(grad_error, (grad - reference[1][:, order]).norm().item())
    return terms_error, grad_error


def check(ours_fn, ref_fn, student, teacher, labels, T, label=""):
    """kd's terms and gradient against the reference's in float64 on the same input values: within
    1e-5 relative, plus 4 times the reference's own fp32 error where that is not nan."""
    terms, grad = _kd_grad_of(ours_fn, student, teacher, labels, T)
    reference = value_and_grad(ref_fn, student.double(), teacher.double(), labels, T)
    terms_slack, grad_slack = reference_error32(ref_fn, student, teacher, labels, T, reference)
    slack = lambda error: 4 * error if math.isfinite(error) else 0.0  # noqa: E731
    for i, (got, want) in enumerate(zip(terms, reference[0])):
        bound = 1e-5 * abs(want.item()) + 1e-9 + slack(terms_slack[i])
        assert abs(got.item() - want.item()) <= bound, f"{label} term {i}: kd {got.item():.9g}, reference {want.item():.9g}, bound {bound:.3g}"
    bound = 1e-5 * reference[1].norm().item() + 1e-9 + slack(grad_slack)
    error = (grad - reference[1]).norm().item()
    assert error <= bound, f"{label} gradient: |kd - reference| = {error:.3g}, bound {bound:.3g}"


def _kd_grad_of(fn, student, teacher, *args):
    """kd's terms and gradient. kd takes the logits as they come (fp32 or bf16) and upcasts them
    first, so a bf16 student gives what its fp32 copy gives (asserted); the gradient is taken at that
    copy, so that it measures kd's arithmetic and not bf16's rounding of the gradient."""
    if student.dtype == torch.bfloat16:
        as_given = fn(student, teacher, *args)
        as_given = as_given if isinstance(as_given, tuple) else (as_given,)
        terms, grad = value_and_grad(fn, student.float(), teacher, *args)
        assert [t.item() for t in as_given] == [t.item() for t in terms]
        return terms, grad
    return value_and_grad(fn, student, teacher, *args)


@pytest.mark.parametrize("case", grid(), ids=grid_id)
def test_kd_matches_mdistiller(case):
    student, teacher, labels = logits_case(*case)
    for T in TEMPERATURES:
        check(lambda s, t, y, T: kd_loss(s, t, T), lambda s, t, y, T: ref_kd(s, t, T), student, teacher, labels, T, label=f"T={T}")


@pytest.mark.parametrize("case", grid(), ids=grid_id)
def test_logit_standardized_kd_matches_the_authors(case):
    student, teacher, labels = logits_case(*case)
    for T in TEMPERATURES:
        check(lambda s, t, y, T: kd_loss(standardize(s), standardize(t), T), lambda s, t, y, T: ref_kd(ref_normalize(s), ref_normalize(t), T),
              student, teacher, labels, T, label=f"T={T}")


@pytest.mark.parametrize("case", grid(), ids=grid_id)
def test_dkd_matches_mdistiller(case):
    student, teacher, labels = logits_case(*case)
    for T in TEMPERATURES:
        check(dkd_loss, lambda s, t, y, T: ref_dkd(s, t, y, 1.0, 1.0, T), student, teacher, labels, T, label=f"T={T}")


@pytest.mark.parametrize("case", grid(), ids=grid_id)
def test_logit_standardized_dkd_matches_the_authors(case):
    student, teacher, labels = logits_case(*case)
    for T in TEMPERATURES:
        check(lambda s, t, y, T: dkd_loss(standardize(s), standardize(t), y, T),
              lambda s, t, y, T: ref_dkd(ref_normalize(s), ref_normalize(t), y, 1.0, 1.0, T), student, teacher, labels, T, label=f"T={T}")


@pytest.mark.parametrize("case", grid(), ids=grid_id)
def test_dist_matches_dist_kd(case):
    student, teacher, labels = logits_case(*case)
    for T in TEMPERATURES:
        check(lambda s, t, y, T: dist_loss(s, t, T), lambda s, t, y, T: ref_dist(s, t, T), student, teacher, labels, T, label=f"T={T}")


def test_dkd_target_class_term_keeps_precision_for_a_confidently_wrong_student():
    """The issue's case: 10 classes, label 0, T = 1, a uniform teacher, a student with logit 30 on
    class 1. The reference (float64) gives TCKD 2.675 and -0.1 on the target logit; 1 - p with a
    clamped log gave 2.438 and 8e-14."""
    student = torch.zeros(1, 10)
    student[0, 1] = 30.0
    (tckd, _), grad = value_and_grad(lambda s, t: dkd_loss(s, t, torch.tensor([0]), 1.0), student, torch.zeros(1, 10))
    assert tckd.item() == pytest.approx(2.67492, abs=1e-4) and grad[0, 0].item() == pytest.approx(-0.1, rel=1e-5)


# -- with --logit-standardization, the methods take the authors' recipe ---------------------------
def _built(mode, **overrides):
    torch.manual_seed(0)
    teacher = FrozenTeacher(timm.create_model("cifar_resnet20", num_classes=10))
    student = timm.create_model("cifar_resnet8", num_classes=10)
    return build_distiller(mode, student, teacher, DistillConfig(mode=mode, **overrides), train_labels=torch.arange(64) % 10)


def test_logit_standardized_dkd_takes_the_authors_weights_and_temperature():
    """tools/train.py: DKD.ALPHA and DKD.BETA times --kd-weight (9), DKD.T = --base-temp (2), CE 1."""
    method = _built("dkd", logit_standardization=True, dkd_beta=8.0)
    assert (method.alpha, method.beta, method.temperature) == (9.0, 72.0, 2.0)
    method.set_progress(10.0, 10)
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    logits, terms = method.eval()(images, labels)
    teacher_logits = method.teacher.logits(images)
    tckd, nckd = ref_dkd(ref_normalize(logits.double()), ref_normalize(teacher_logits.double()), labels, 9.0, 72.0, 2.0)
    assert terms["loss_tckd"].item() == pytest.approx(tckd.item(), rel=1e-5)
    assert terms["loss_nckd"].item() == pytest.approx(nckd.item(), rel=1e-5)
    assert terms["loss_ce"].item() == pytest.approx(F.cross_entropy(logits.double(), labels).item(), rel=1e-5)


def test_dkd_beta_defaults_to_the_authors_value_for_the_pair():
    """mdistiller's configs: 2 for resnet56 -> resnet20 and resnet110 -> resnet32 (thin ResNets),
    8 for resnet32x4 -> resnet8x4; an explicit --dkd-beta always wins."""
    assert _built("dkd").beta == 2.0  # cifar_resnet20 -> cifar_resnet8, thin
    teacher = FrozenTeacher(timm.create_model("cifar_resnet14x4", num_classes=10))
    wide = build_distiller("dkd", timm.create_model("cifar_resnet8x4", num_classes=10), teacher, DistillConfig(mode="dkd"))
    assert wide.beta == 8.0
    assert _built("dkd", dkd_beta=4.0).beta == 4.0


@pytest.mark.parametrize("teacher,student,beta", [
    ("cifar_rd_resnet56", "cifar_rd_resnet20", 2.0), ("cifar_rd_resnet110", "cifar_rd_resnet32", 2.0),  # res56_res20, res110_res32
    ("cifar_rd_wrn_40_2", "cifar_rd_wrn_16_2", 6.0), ("cifar_rd_wrn_40_2", "cifar_rd_wrn_40_1", 6.0),  # wrn40_2_wrn_16_2/_40_1
    ("cifar_rd_vgg13", "cifar_rd_vgg8", 6.0), ("cifar_rd_vgg13", "cifar_rd_mobilenetv2", 6.0),  # vgg13_vgg8, vgg13_mv2
    ("cifar_rd_resnet32x4", "cifar_rd_resnet8x4", 8.0), ("cifar_rd_resnet32x4", "cifar_rd_shufflenetv2", 8.0),  # their default
    ("cifar_rd_wrn_40_2", "cifar_rd_vgg8", 8.0),  # a pair they never ran: their default
])
def test_dkd_beta_follows_mdistillers_config_for_every_zoo_pair(teacher, student, beta):
    """megvii-research/mdistiller, configs/cifar100/dkd/*.yaml: BETA 2, 6, or the default 8."""
    assert DKD.pair_defaults(DistillConfig(mode="dkd"), teacher, student).dkd_beta == beta


# -- CRD ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,negatives", [(1, 16), (8, 100), (32, 400)])
def test_crd_nce_and_banks_match_repdistiller_over_two_steps(batch, negatives):
    """Two training steps of kd's CRD against ContrastMemory + ContrastLoss started from the same
    banks, with the same embeddings and the same candidate rows: the loss of each step (Z set by the
    first and kept for the second) and both banks after each step."""
    num_train = 512
    torch.manual_seed(1)
    teacher = FrozenTeacher(timm.create_model("cifar_resnet8", num_classes=10))
    labels_all = torch.arange(num_train) % 10
    method = build_distiller("crd", timm.create_model("cifar_resnet8", num_classes=10), teacher,
                             DistillConfig(mode="crd", crd_negatives=negatives), train_labels=labels_all).train()
    reference = RefContrastMemory(method.bank_student, method.bank_teacher)
    reference32 = RefContrastMemory(method.bank_student, method.bank_teacher, dtype=torch.float32)
    for step in range(2):
        index = torch.randperm(num_train)[:batch]
        images, labels = torch.randn(batch, 3, 32, 32), labels_all[index]
        candidates = torch.cat([index[:, None], method.negatives(index, labels, method.epoch, negatives)], 1)
        with torch.no_grad():  # the embeddings kd scores (train-mode BatchNorm: the same batch gives the same features)
            embed_s = F.normalize(method.embed_student(method.student.forward_features(images).mean((2, 3))), dim=1)
            embed_t = F.normalize(method.embed_teacher(teacher.model.forward_features(images).mean((2, 3))), dim=1)
        _, terms = method(images, labels, index)
        want = reference.step(embed_s, embed_t, index, candidates).item()
        want32 = reference32.step(embed_s, embed_t, index, candidates).item()
        got = terms["loss_crd"].item() / method.weight
        assert abs(got - want) <= 1e-5 * abs(want) + 4 * abs(want32 - want), f"step {step}: kd {got:.9g}, RepDistiller {want:.9g} (fp32 {want32:.9g})"
        for name, ref_bank in (("bank_student", reference.memory_v1), ("bank_teacher", reference.memory_v2)):
            assert torch.allclose(getattr(method, name).double(), ref_bank, atol=1e-6), f"step {step}: {name}"
    assert method.nce_z.tolist() == pytest.approx([reference.z_v1, reference.z_v2], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,negatives,aligned", [(1, 16, False), (64, 4096, False), (64, 4096, True)])
def test_crd_nce_loss_matches_contrast_loss(batch, negatives, aligned, dtype):
    """The NCE of given unit embeddings and a bank, with Z given, in fp32 or from bf16 embeddings,
    against ContrastLoss on the same values in float64; aligned: every embedding is its positive's
    bank row, the largest scores exp(1 / 0.07)."""
    num_data, dim = 8192, 128
    g = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(num_data, dim, generator=g), dim=1)
    candidates = torch.randint(0, num_data, (batch, 1 + negatives), generator=g)
    embedding = bank[candidates[:, 0]] if aligned else F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    embedding = embedding.to(dtype)
    z = 3.0e4
    got = nce_loss(nce_scores(embedding, bank, candidates, TEMPERATURE), torch.tensor(z), num_data).item()
    results = {}
    for ref_dtype in (torch.float64, torch.float32):
        reference = RefContrastMemory(bank, bank, dtype=ref_dtype)
        scores = torch.exp(torch.bmm(reference.memory_v2[candidates.reshape(-1)].reshape(batch, -1, dim),
                                     embedding.to(ref_dtype).reshape(batch, dim, 1)) / TEMPERATURE).squeeze(2)
        results[ref_dtype] = reference.contrast_loss(scores / z).item()
    want, want32 = results[torch.float64], results[torch.float32]
    assert abs(got - want) <= 1e-5 * abs(want) + 4 * abs(want32 - want), f"kd {got:.9g}, ContrastLoss {want:.9g} (fp32 {want32:.9g})"


# -- AT -------------------------------------------------------------------------------------------
def ref_at_loss(student_groups, teacher_groups, beta):
    """attention-transfer: at(x) = normalize(x.pow(2).mean(1).view(B, -1)); at_loss = (at(x) - at(y))
    .pow(2).mean(); the loss adds beta / 2 * sum of at_loss over the groups."""
    at = lambda x: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))  # noqa: E731
    return beta / 2 * sum((at(x) - at(y)).pow(2).mean() for x, y in zip(student_groups, teacher_groups))


@pytest.mark.parametrize("batch,scale,dtype", list(itertools.product((1, 7, 64), (1.0, 5.0, 50.0), (torch.float32, torch.bfloat16))))
def test_at_matches_attention_transfer(batch, scale, dtype):
    """Three groups of feature maps (different channel counts on the two sides, as for a wider
    teacher), values and the gradient w.r.t. the student's maps, against the float64 reference."""
    g = torch.Generator().manual_seed(4)
    shapes = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    student = [(scale * torch.randn(batch, *shape, generator=g)).to(dtype) for shape in shapes]
    teacher = [(scale * torch.randn(batch, 2 * shape[0], *shape[1:], generator=g)).to(dtype) for shape in shapes]
    leaves = [x.float().requires_grad_(True) for x in student]  # the fp32 values of the maps kd is given
    ours = at_loss(leaves, teacher, 1000.0)
    ours_grads = torch.autograd.grad(ours, leaves)
    reference_leaves = [x.double().requires_grad_(True) for x in student]
    reference = ref_at_loss(reference_leaves, [t.double() for t in teacher], 1000.0)
    reference_grads = torch.autograd.grad(reference, reference_leaves)
    assert at_loss(student, teacher, 1000.0).item() == ours.item()  # bf16 maps are upcast first
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(ours_grads, reference_grads):
        assert (got.double() - want).norm().item() <= 1e-5 * want.norm().item() + 1e-12


# -- every method has its reference -----------------------------------------------------------------
REFERENCED = {  # method: the tests above that check it against its authors' code, or why none is needed
    "logits": "test_kd_matches_mdistiller, test_logit_standardized_kd_matches_the_authors",
    "dkd": "test_dkd_matches_mdistiller, test_logit_standardized_dkd_matches_the_authors",
    "dist": "test_dist_matches_dist_kd",
    "crd": "test_crd_nce_and_banks_match_repdistiller_over_two_steps, test_crd_nce_loss_matches_contrast_loss",
    "at": "test_at_matches_attention_transfer",
    "hidden": "FitNets' hint loss is torch's own F.mse_loss (RepDistiller's HintLoss: nn.MSELoss), called as such",
    "hidden-trained": "hidden's loss through the report's adapter conv (the seed report's experiment 3; no paper code)",
    "hybrid": "the logits loss plus hidden-trained's, both above (the seed report's experiment 4)",
}


def test_every_registered_method_is_checked_against_its_reference():
    """A new method lands with its parity test: registering it without an entry here fails."""
    assert set(REFERENCED) == set(DISTILLERS), f"methods without a reference check: {sorted(set(DISTILLERS) - set(REFERENCED))}"
    for method, checked_by in REFERENCED.items():
        named = [name.strip() for name in checked_by.split(",") if name.strip().startswith("test_")]
        assert all(name in globals() for name in named), (method, named)
