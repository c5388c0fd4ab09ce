"""DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher", NeurIPS,
arXiv:2205.10536): match relations instead of exact probabilities, with 1 - Pearson
correlation, which ignores the shift and scale a weaker student cannot reproduce.

Naming follows the paper and its code (hunto/DIST_KD): the inter-class relation compares each
sample's probabilities across the classes (rows); the intra-class relation compares each
class's probabilities across the batch (columns).

Under DDP the intra-class (column) term uses each process's own batch, not a gathered one:
like BatchNorm, N processes then compute exactly what one process accumulating N
micro-batches computes, and no collective is added to every step. The price: the columns
are over the per-process batch, so keep it at the size the paper used (64-128 on CIFAR)."""

import torch

from kd.distillers.base import Distiller
from kd.distillers.logits import standardize


def pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - Pearson correlation of each row of a with the same row of b, averaged over rows."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """(inter-class, intra-class) distances of softmax(z / T), each scaled by T^2, in fp32."""
    p_s = (student_logits.float() / temperature).softmax(1)
    p_t = (teacher_logits.float() / temperature).softmax(1)
    return temperature**2 * pearson_distance(p_s, p_t), temperature**2 * pearson_distance(p_s.T, p_t.T)


class DIST(Distiller):
    """loss = CE + beta * inter-class + gamma * intra-class (paper's CIFAR code: 2, 2, T = 4)."""

    standardizable = True
    standardized_by = {"temperature": ("ls_temperature",)}
    search_space = {"temperature": ("float", 1.0, 8.0, {"log": True}), "dist_beta": ("float", 0.5, 8.0, {"log": True}),
                    "dist_gamma": ("float", 0.5, 8.0, {"log": True})}
    search_grid = {"temperature": (1.0, 2.0, 4.0)}  # the paper: 1 on ImageNet, 4 on CIFAR

    def __init__(self, student, teacher, temperature: float, beta: float, gamma: float, standardized=False, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.temperature, self.beta, self.gamma = temperature, beta, gamma
        self.standardized = standardized

    def forward(self, images, labels, index=None):
        logits = self.student(images)
        teacher_logits = self.teacher.logits(images)
        s, t = (standardize(logits), standardize(teacher_logits)) if self.standardized else (logits, teacher_logits)
        inter, intra = dist_loss(s, t, self.temperature)
        return logits, {"loss_ce": self.cross_entropy(logits, labels), "loss_inter": self.beta * inter, "loss_intra": self.gamma * intra}

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        temperature = cfg.ls_temperature if cfg.logit_standardization else cfg.temperature
        return cls(student, teacher, temperature, cfg.dist_beta, cfg.dist_gamma, cfg.logit_standardization, **kwargs)
