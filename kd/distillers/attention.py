"""Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention",
arXiv:1612.03928): match the normalised spatial attention maps sum_c |F_c|^2 of the
student and the teacher at every stage. Channel counts may differ; spatial sizes must match,
which holds for any two CIFAR ResNets here."""

import torch
import torch.nn.functional as F

from kd.distillers.base import Distiller
from kd.errors import UsageError
from kd.models import list_taps

STAGES = ("layer1", "layer2", "layer3")


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Per image, the channel mean of the squared activations, flattened and L2-normalised."""
    # squared in fp32: fp16 overflows past 256**2 (activations above 256 are common in late
    # stages); the fp32 copy of the map lives only for this line
    return F.normalize(features.float().square().mean(1).flatten(1), dim=1)


def at_loss(student_maps, teacher_maps, beta: float) -> torch.Tensor:
    """beta/2 * sum over stages of the batch mean of ||a_s - a_t||^2 (the paper's p=2 form,
    with the squared distance averaged over positions as in its reference code)."""
    return beta / 2 * sum((attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(student_maps, teacher_maps))


class AttentionTransfer(Distiller):
    """loss = CE(student, labels) + at_beta/2 * sum_stages ||a_s - a_t||^2."""

    search_space = {"at_beta": ("float", 50.0, 5000.0, {"log": True})}
    search_grid = {"at_beta": (250.0, 1000.0, 4000.0)}

    def __init__(self, student, teacher, beta: float, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.beta = beta

    def forward(self, images, labels, index=None):
        logits, features = self.student(images, taps=STAGES)
        targets = self.teacher.taps(images, STAGES)  # the teacher's head is never run
        terms = {"loss_ce": self.cross_entropy(logits, labels)}
        terms["loss_at"] = at_loss([features[s] for s in STAGES], [targets[s] for s in STAGES], self.beta)
        return logits, terms

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        student_shapes, teacher_shapes = list_taps(student), list_taps(teacher.model)
        for stage in STAGES:
            if student_shapes[stage][1:] != teacher_shapes[stage][1:]:
                raise UsageError(f"--mode at needs equal spatial sizes at {stage}: student {student_shapes[stage]}, teacher {teacher_shapes[stage]}")
        return cls(student, teacher, cfg.at_beta, **kwargs)
