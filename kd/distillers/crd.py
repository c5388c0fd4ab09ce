"""Contrastive representation distillation (Tian, Krishnan & Isola 2020, "Contrastive
Representation Distillation", ICLR, arXiv:1910.10699): an image's student embedding must pick
the teacher's memory of the same image out of K others (and vice versa), scored by NCE.

The objective is the reference's (HobbitLong/RepDistiller, `crd/memory.py`, `crd/criterion.py`
and `CIFAR100InstanceSample` in `dataset/cifar100.py` with its default `--mode exact`): the
positive is the image's own bank row; the K negatives are images of the other classes (never
the image itself, never its class); Z, the NCE normaliser, is fixed from the first training
batch and kept (in the checkpoint). Where it differs, on purpose: negatives are drawn with
replacement from a hash of (epoch, image index, k), identical on every process and after a
resume, where the reference's data loader draws them without replacement from numpy's global
generator (the same expected loss; docs/methods.md, "Defaults and deliberate differences", shows the measured spread); the banks take
every process's embeddings once per optimizer step; under DDP, Z comes from the main process's
first micro-batch."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.state import GradientState
from accelerate.utils import broadcast, gather

from kd.distillers.base import Distiller
from kd.errors import UsageError

EMBED_DIM, TEMPERATURE, MOMENTUM = 128, 0.07, 0.5  # the paper's feat_dim, nce_t and nce_m


def nce_scores(embedding: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(v . m / T) for (B, D) unit embeddings against bank rows `candidates` (B, 1 + K), in fp32.
    One (B, N) product, then a gather: cheaper than gathering B * (1 + K) rows of D."""
    return torch.exp(torch.take_along_dim(embedding.float() @ bank.T, candidates, 1) / temperature)


def nce_loss(scores: torch.Tensor, z: torch.Tensor, num_data: int) -> torch.Tensor:
    """The NCE loss of `nce_scores` (column 0 the positive, the rest noise with P_noise = 1/N over
    the N bank rows), each score divided by the normaliser Z, batch mean."""
    num_noise = scores.shape[1] - 1
    p = scores / z
    noise = num_noise / num_data  # K * P_noise
    positive = torch.log(p[:, 0] / (p[:, 0] + noise + 1e-7))
    negative = torch.log(noise / (p[:, 1:] + noise + 1e-7)).sum(1)
    return -(positive + negative).mean()


MASK31 = 2**31 - 1


def _hash_(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of int64 values below 2**31, to values below 2**31, in place: B * K = 4M
    values a step, where each new int64 tensor of that size costs ~3x its arithmetic (page faults)."""
    for _ in range(3):  # LCG step + xorshift; products stay below 2**62
        x.mul_(1103515245).add_(12345).bitwise_and_(MASK31)
        x.bitwise_xor_(x >> 15)
    return x


class OtherClassSampler(nn.Module):
    """Draws each image's negatives uniformly from the images of the other classes (RepDistiller's
    `exact` mode), by index arithmetic on the training set sorted by class: a draw u in
    [0, N - n_c) for an image of class c skips class c's block of the sorted order."""

    def __init__(self, train_labels: torch.Tensor):
        super().__init__()
        count = torch.bincount(train_labels)  # images per class
        # derived from the labels: not in the checkpoint, and the same on every process
        self.register_buffer("order", torch.argsort(train_labels, stable=True), persistent=False)  # image indices, class by class
        self.register_buffer("count", count, persistent=False)
        self.register_buffer("start", torch.cumsum(count, 0) - count, persistent=False)  # where each class's block begins

    def forward(self, index: torch.Tensor, labels: torch.Tensor, epoch: int, num_negatives: int) -> torch.Tensor:
        """(B, K) image indices, a function of (epoch, image index, k) only."""
        num_data = len(self.order)
        keys = (epoch * num_data + index)[:, None] * num_negatives + torch.arange(num_negatives, device=index.device)
        count = self.count[labels][:, None]
        position = _hash_(keys.bitwise_and_(MASK31)).mul_(num_data - count).bitwise_right_shift_(31)  # uniform in [0, N - n_c)
        position.add_((position >= self.start[labels][:, None]) * count)  # past the own class's block
        return self.order[position]


class CRD(Distiller):
    """loss = CE + weight * [NCE(student vs teacher bank) + NCE(teacher vs student bank)]."""

    search_space = {"crd_weight": ("float", 0.1, 4.0, {"log": True})}
    search_grid = {"crd_weight": (0.4, 0.8, 1.6)}

    def __init__(self, student, teacher, train_labels: torch.Tensor, num_negatives: int, weight: float, **kwargs):
        super().__init__(student, teacher, train_labels=train_labels, **kwargs)
        self.num_negatives, self.weight, self.epoch = num_negatives, weight, 0
        self.stage = student.tap_names()[-1]  # the last stage: pooled, the pre-logits features
        self.embed_student = nn.Linear(student.num_features, EMBED_DIM)
        self.embed_teacher = nn.Linear(teacher.model.num_features, EMBED_DIM)
        self.negatives = OtherClassSampler(train_labels)
        bound = 1 / math.sqrt(EMBED_DIM / 3)  # the reference's init: rows of norm ~1
        for name in ("bank_student", "bank_teacher"):  # persistent: in the checkpoint, not in the export
            self.register_buffer(name, torch.rand(len(train_labels), EMBED_DIM) * 2 * bound - bound)
        # Z of (student vs teacher bank, teacher vs student bank); < 0: not set yet (the reference's -1)
        self.register_buffer("nce_z", torch.full((2,), -1.0))
        self.z_fixed = False
        # every process holds the same banks (gathered updates) and Z (broadcast): DDP need not broadcast them each step
        self._ddp_params_and_buffers_to_ignore = ["bank_student", "bank_teacher", "nce_z", "negatives.order", "negatives.count", "negatives.start"]
        self.pending = []

    def set_progress(self, epoch: float, epochs: int) -> None:
        self.epoch = int(epoch)

    def forward(self, images, labels, index=None):
        logits, features = self.student(images, taps=(self.stage,))
        teacher_features = self.teacher.taps(images, [self.teacher.model.tap_names()[-1]])
        embed_s = F.normalize(self.embed_student(features[self.stage].mean((2, 3))).float(), dim=1)
        embed_t = F.normalize(self.embed_teacher(next(iter(teacher_features.values())).mean((2, 3))).float(), dim=1)
        candidates = torch.cat([index[:, None], self.negatives(index, labels, self.epoch, self.num_negatives)], 1)
        num_data = len(self.bank_student)
        with torch.autocast(images.device.type, enabled=False):  # exp(score / 0.07) in fp32
            scores = (nce_scores(embed_s, self.bank_teacher, candidates, TEMPERATURE), nce_scores(embed_t, self.bank_student, candidates, TEMPERATURE))
            z = self.normalizers(scores, num_data)
            crd = nce_loss(scores[0], z[0], num_data) + nce_loss(scores[1], z[1], num_data)
        if self.training:
            self.remember(index, embed_s, embed_t)
        return logits, {"loss_ce": self.cross_entropy(logits, labels), "loss_crd": self.weight * crd}

    @torch.no_grad()
    def normalizers(self, scores, num_data: int) -> torch.Tensor:
        """Z = N * mean score, as the reference sets it on its first batch and keeps. Set here on
        the first training micro-batch of the main process and broadcast, so every process (and a
        single process accumulating the same micro-batches) holds the same Z; a forward before
        training (an evaluation) estimates it from its own batch and keeps nothing."""
        if not self.z_fixed:  # read once (a host sync), then known: set here, or loaded by a resume
            self.z_fixed = bool((self.nce_z > 0).all())
        if self.z_fixed:
            return self.nce_z
        z = torch.stack([part.mean() * num_data for part in scores])
        if not self.training:
            return z
        self.nce_z.copy_(broadcast(z, from_process=0) if torch.distributed.is_available() and torch.distributed.is_initialized() else z)
        self.z_fixed = True
        return self.nce_z
    @torch.no_grad()
    def remember(self, index, embed_s, embed_t) -> None:
        """Queue this micro-batch's embeddings; on the micro-step that ends an optimizer step
        (accelerate's sync_gradients), gather every process's queue and update both banks."""
        self.pending.append((index, embed_s.detach(), embed_t.detach()))
        if not GradientState().sync_gradients:
            return
        index, embed_s, embed_t = (gather(torch.cat(parts)) for parts in zip(*self.pending))
        self.pending = []
        for name, new in (("bank_student", embed_s), ("bank_teacher", embed_t)):
            bank = getattr(self, name)  # replaced, not written in place: this step's backward still needs it
            setattr(self, name, bank.index_copy(0, index, F.normalize(MOMENTUM * bank[index] + (1 - MOMENTUM) * new, dim=1)))

    @classmethod
    def from_config(cls, student, teacher, cfg, train_labels=None, **kwargs):
        if train_labels is None or len(train_labels) == 0:
            raise UsageError("--mode crd needs the training set's labels for its memory banks")
        num_train = len(train_labels)
        if len(train_labels.unique()) < 2:
            raise UsageError("--mode crd draws its negatives from the other classes: the training set needs at least two classes")
        negatives = cfg.crd_negatives if cfg.crd_negatives is not None else min(16384, num_train)  # the paper's K, or all images
        if not 0 < negatives <= num_train:
            raise UsageError(f"--crd-negatives must be in [1, {num_train}] (the training images), got {negatives}")
        return cls(student, teacher, train_labels.cpu(), negatives, cfg.crd_weight, **kwargs)
