"""Decoupled knowledge distillation (Zhao et al. 2022, "Decoupled Knowledge Distillation",
CVPR, arXiv:2203.08679): the KD loss split into a target-class term (TCKD) and a term over
the non-target classes (NCKD), weighted apart so that NCKD is not damped by the teacher's
confidence in the target."""

import torch
import torch.nn.functional as F

from kd.distillers.base import Distiller
from kd.distillers.logits import standardize

MASK = 1000.0  # subtracted from the target logit (after /T) to drop it from the NCKD softmax, as the reference code does


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(TCKD, NCKD), each T^2 * KL(teacher || student), batch mean, in fp32.
    TCKD: KL between the binary distributions (p_target, 1 - p_target).
    NCKD: KL between the softmaxes over the non-target classes only."""
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    p_s, p_t = s.softmax(1), t.softmax(1)
    binary_s = torch.stack([p_s[target], 1 - p_s[target]], 1)
    binary_t = torch.stack([p_t[target], 1 - p_t[target]], 1)
    tckd = F.kl_div(binary_s.clamp_min(1e-12).log(), binary_t, reduction="batchmean")
    nckd = F.kl_div(F.log_softmax(s - MASK * target, 1), F.log_softmax(t - MASK * target, 1), reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2


class DKD(Distiller):
    """loss = CE + w(progress) * (alpha * TCKD + beta * NCKD), where w rises linearly from 0 to 1
    over the first `warmup_epochs` (the paper: 20 of 240 epochs; default here: 1/12 of the run)."""

    standardizable = True
    standardized_by = {"temperature": ("ls_temperature",)}
    search_space = {"temperature": ("float", 1.0, 8.0, {"log": True}), "dkd_alpha": ("float", 0.25, 4.0, {"log": True}),
                    "dkd_beta": ("float", 1.0, 16.0, {"log": True})}
    search_grid = {"dkd_beta": (1.0, 2.0, 4.0)}  # the paper's 8 diverges at lr 0.4 (README, Results)

    def __init__(self, student, teacher, temperature: float, alpha: float, beta: float, warmup_epochs=None, standardized=False, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.warmup_epochs = warmup_epochs  # None: epochs / 12, known once the loop reports progress
        self.standardized = standardized
        self.kd_weight = 1.0  # full weight until the loop reports progress (a lone forward, the benchmark)

    def set_progress(self, epoch: float, epochs: int) -> None:
        warmup = self.warmup_epochs if self.warmup_epochs is not None else epochs / 12
        self.kd_weight = min(1.0, epoch / warmup) if warmup > 0 else 1.0

    def forward(self, images, labels, index=None):
        logits = self.student(images)
        teacher_logits = self.teacher.logits(images)
        s, t = (standardize(logits), standardize(teacher_logits)) if self.standardized else (logits, teacher_logits)
        tckd, nckd = dkd_loss(s, t, labels, self.temperature)
        return logits, {"loss_ce": self.cross_entropy(logits, labels), "loss_tckd": self.kd_weight * self.alpha * tckd,
                        "loss_nckd": self.kd_weight * self.beta * nckd}

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        temperature = cfg.ls_temperature if cfg.logit_standardization else cfg.temperature
        return cls(student, teacher, temperature, cfg.dkd_alpha, cfg.dkd_beta, cfg.kd_warmup_epochs, cfg.logit_standardization, **kwargs)
