"""Contrastive representation distillation (Tian, Krishnan & Isola 2020, "Contrastive
Representation Distillation", ICLR, arXiv:1910.10699): an image's student embedding must pick
the teacher's memory of the same image out of K others (and vice versa), scored by NCE.
Unlike the reference code, Z is re-estimated on every batch (no state to resume), the banks
take every process's embeddings once per optimizer step, and negatives come from a hash."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.state import GradientState
from accelerate.utils import gather

from kd.distillers.base import Distiller
from kd.errors import UsageError

EMBED_DIM, TEMPERATURE, MOMENTUM = 128, 0.07, 0.5  # the paper's feat_dim, nce_t and nce_m


def nce_loss(embedding: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """NCE loss for (B, D) unit embeddings against bank rows `candidates` (B, 1 + K): column 0
    the positive, the rest noise drawn uniformly from the N bank rows (P_noise = 1/N)."""
    num_data, num_noise = bank.shape[0], candidates.shape[1] - 1
    scores = torch.exp(torch.take_along_dim(embedding.float() @ bank.T, candidates, 1) / temperature)  # (B, 1 + K)
    p = scores / (scores.mean().detach() * num_data)  # exp(v.m/T) / Z, Z ~ N * E[exp(v.m/T)]
    noise = num_noise / num_data  # K * P_noise
    positive = torch.log(p[:, 0] / (p[:, 0] + noise + 1e-7))
    negative = torch.log(noise / (p[:, 1:] + noise + 1e-7)).sum(1)
    return -(positive + negative).mean()


def draw_negatives(index: torch.Tensor, epoch: int, num_negatives: int, num_data: int) -> torch.Tensor:
    """(B, K) bank rows per image from an integer hash of (epoch, image index, k), below 2**31."""
    x = ((epoch * num_data + index)[:, None] * num_negatives + torch.arange(num_negatives, device=index.device)) % 2**31
    for _ in range(3):  # LCG step + xorshift; products stay below 2**62
        x = (x * 1103515245 + 12345) % 2**31
        x = x ^ (x >> 15)
    return x % num_data


class CRD(Distiller):
    """loss = CE + weight * [NCE(student vs teacher bank) + NCE(teacher vs student bank)]."""

    search_space = {"crd_weight": ("float", 0.1, 4.0, {"log": True})}
    search_grid = {"crd_weight": (0.4, 0.8, 1.6)}

    def __init__(self, student, teacher, num_train: int, num_negatives: int, weight: float, **kwargs):
        super().__init__(student, teacher, num_train=num_train, **kwargs)
        self.num_negatives, self.weight, self.epoch = num_negatives, weight, 0
        self.stage = student.tap_names()[-1]  # the last stage: pooled, the pre-logits features
        self.embed_student = nn.Linear(student.num_features, EMBED_DIM)
        self.embed_teacher = nn.Linear(teacher.model.num_features, EMBED_DIM)
        bound = 1 / math.sqrt(EMBED_DIM / 3)  # the reference's init: rows of norm ~1
        for name in ("bank_student", "bank_teacher"):  # persistent: in the checkpoint, not in the export
            self.register_buffer(name, torch.rand(num_train, EMBED_DIM) * 2 * bound - bound)
        # every process holds the same banks (gathered updates): DDP need not broadcast them each step
        self._ddp_params_and_buffers_to_ignore = ["bank_student", "bank_teacher"]
        self.pending = []

    def set_progress(self, epoch: float, epochs: int) -> None:
        self.epoch = int(epoch)

    def forward(self, images, labels, index=None):
        logits, features = self.student(images, taps=(self.stage,))
        teacher_features = self.teacher.taps(images, [self.teacher.model.tap_names()[-1]])
        embed_s = F.normalize(self.embed_student(features[self.stage].mean((2, 3))).float(), dim=1)
        embed_t = F.normalize(self.embed_teacher(next(iter(teacher_features.values())).mean((2, 3))).float(), dim=1)
        candidates = torch.cat([index[:, None], draw_negatives(index, self.epoch, self.num_negatives, len(self.bank_student))], 1)
        with torch.autocast(images.device.type, enabled=False):  # exp(score / 0.07) in fp32
            crd = nce_loss(embed_s, self.bank_teacher, candidates, TEMPERATURE) + nce_loss(embed_t, self.bank_student, candidates, TEMPERATURE)
        if self.training:
            self.remember(index, embed_s, embed_t)
        return logits, {"loss_ce": self.cross_entropy(logits, labels), "loss_crd": self.weight * crd}

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
    def from_config(cls, student, teacher, cfg, num_train=None, **kwargs):
        if not num_train:
            raise UsageError("--mode crd needs the training-set size for its memory banks")
        negatives = cfg.crd_negatives if cfg.crd_negatives is not None else min(16384, num_train)  # the paper's K, or all images
        if not 0 < negatives <= num_train:
            raise UsageError(f"--crd-negatives must be in [1, {num_train}] (the training images), got {negatives}")
        return cls(student, teacher, num_train, negatives, cfg.crd_weight, **kwargs)
