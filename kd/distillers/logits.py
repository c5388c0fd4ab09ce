"""Soft-label distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"),
optionally on z-scored logits (Sun et al. 2024, "Logit Standardization in Knowledge Distillation")."""

import torch
import torch.nn.functional as F

from kd.distillers.base import Distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T**2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean, in fp32.
    The T**2 keeps the gradient scale independent of T (Hinton et al., section 2)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Each sample's logits z-scored over the classes, in fp32: (z - mean) / std (Sun et al. 2024,
    eq. 5; unbiased std and eps 1e-7 as in their code). The softmax that follows no longer
    depends on the logits' shift or scale, so the student need not match the teacher's range."""
    logits = logits.float()
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-7)


def soft_label_terms(ce, student_logits, teacher_logits, temperature, alpha, factor=1.0):
    """The weighted terms of (1 - alpha) * CE + alpha * T^2 * KL, all scaled by `factor`."""
    return {
        "loss_ce": factor * (1 - alpha) * ce,
        "loss_kd": factor * alpha * kd_loss(student_logits, teacher_logits, temperature),
    }


class LogitsKD(Distiller):
    """loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T).
    With --logit-standardization: ls_ce_weight * CE + ls_kd_weight * T^2 * KL on z-scored
    logits at T = ls_temperature (the paper's CIFAR recipe: 0.1, 9 and 2)."""

    standardizable = True
    standardized_by = {"temperature": ("ls_temperature",), "alpha": ("ls_ce_weight", "ls_kd_weight")}
    search_space = {"temperature": ("float", 1.0, 8.0, {"log": True}), "alpha": ("float", 0.1, 0.95)}
    search_grid = {"temperature": (2.0, 4.0, 8.0)}

    def __init__(self, student, teacher, temperature: float, alpha: float, standardized_weights=None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.temperature = temperature
        self.alpha = alpha
        self.standardized_weights = standardized_weights  # (ce, kd) weights; None: no z-score

    def forward(self, images, labels, index=None):
        logits = self.student(images)
        ce = self.cross_entropy(logits, labels)
        teacher_logits = self.teacher.logits(images)
        if self.standardized_weights is None:
            return logits, soft_label_terms(ce, logits, teacher_logits, self.temperature, self.alpha)
        ce_weight, kd_weight = self.standardized_weights
        kd = kd_loss(standardize(logits), standardize(teacher_logits), self.temperature)
        return logits, {"loss_ce": ce_weight * ce, "loss_kd": kd_weight * kd}

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        if cfg.logit_standardization:
            return cls(student, teacher, cfg.ls_temperature, cfg.alpha, (cfg.ls_ce_weight, cfg.ls_kd_weight), **kwargs)
        return cls(student, teacher, cfg.temperature, cfg.alpha, **kwargs)
