"""Soft-label distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network")."""

import torch
import torch.nn.functional as F

from kd.distillers.base import Distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T**2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean, in fp32.
    The T**2 keeps the gradient scale independent of T (Hinton et al., section 2)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def soft_label_terms(ce, student_logits, teacher_logits, temperature, alpha, factor=1.0):
    """The weighted terms of (1 - alpha) * CE + alpha * T^2 * KL, all scaled by `factor`."""
    return {
        "loss_ce": factor * (1 - alpha) * ce,
        "loss_kd": factor * alpha * kd_loss(student_logits, teacher_logits, temperature),
    }


class LogitsKD(Distiller):
    """loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T)."""

    search_space = {"temperature": ("float", 1.0, 8.0, {"log": True}), "alpha": ("float", 0.1, 0.95)}

    def __init__(self, student, teacher, temperature: float, alpha: float, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, images, labels):
        logits = self.student(images)
        ce = self.cross_entropy(logits, labels)
        return logits, soft_label_terms(ce, logits, self.teacher.logits(images), self.temperature, self.alpha)

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        return cls(student, teacher, cfg.temperature, cfg.alpha, **kwargs)
