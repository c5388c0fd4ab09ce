"""Decoupled knowledge distillation (Zhao et al. 2022, "Decoupled Knowledge Distillation",
CVPR, arXiv:2203.08679): the KD loss split into a target-class term (TCKD) and a term over
the non-target classes (NCKD), weighted apart so that NCKD is not damped by the teacher's
confidence in the target."""

import dataclasses
import re

import torch
import torch.nn.functional as F

from kd.distillers.base import Distiller
from kd.distillers.logits import standardize

MASK = 1000.0  # subtracted from the target logit (after /T) to drop it from a softmax, as the reference code does


TINY = 1e-30  # below this a class mass is taken from log space (fp32 underflows near 1e-38)


def _log_binary(z: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 2): log p_target and log(1 - p_target) of softmax(z). As the reference: the log of the
    target's probability and of the masked sum of the others', accurate in fp32 down to a mass of
    ~1e-30; below that (a confident student at large logits) from log space instead, z_target -
    logsumexp(z) and logsumexp(non-target z) - logsumexp(z), where the reference's log(0) would
    give -inf, and `1 - p` or a clamped log would give no gradient."""
    p = z.softmax(1)
    target_mass = p.gather(1, target).squeeze(1)
    rest_mass = (p * (mask == 0)).sum(1)
    every = z.logsumexp(1)
    log_target = torch.where(target_mass > TINY, target_mass.clamp_min(TINY).log(), z.gather(1, target).squeeze(1) - every)
    log_rest = torch.where(rest_mass > TINY, rest_mass.clamp_min(TINY).log(), (z - mask).logsumexp(1) - every)
    return torch.stack([log_target, log_rest], 1)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(TCKD, NCKD), each T^2 * KL(teacher || student), batch mean, in fp32.
    TCKD: KL between the binary distributions (p_target, 1 - p_target), see _log_binary.
    NCKD: KL between the softmaxes over the non-target classes only.
    The target is picked with gather/scatter, never a boolean mask index: on CUDA that is a host
    synchronisation in the middle of the step."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = labels[:, None]
    mask = torch.zeros_like(s).scatter_(1, target, MASK)  # MASK at the target, 0 elsewhere
    tckd = F.kl_div(_log_binary(s, mask, target), _log_binary(t, mask, target), reduction="batchmean", log_target=True)
    nckd = F.kl_div(F.log_softmax(s - mask, 1), F.log_softmax(t - mask, 1), reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2


def authors_beta(teacher: str, student: str) -> float:
    """The NCKD weight of the authors' CIFAR-100 config for the pair (megvii-research/mdistiller,
    configs/cifar100/dkd/*.yaml): 2 for resnet56 -> resnet20 and resnet110 -> resnet32 (the thin
    16/32/64-channel ResNets: kd's `cifar_resnetN` and the zoo's `cifar_rd_resnetN`); 6 for
    wrn_40_2 -> wrn_16_2 / wrn_40_1 and vgg13 -> vgg8 / MobileNetV2; 8, their default, for every
    other pair (resnet32x4 -> resnet8x4, -> ShuffleNet, and pairs they never ran)."""
    teacher, student = teacher or "", student or ""
    thin = re.compile(r"cifar_(rd_)?resnet\d+")
    if thin.fullmatch(teacher) and thin.fullmatch(student):
        return 2.0
    if (teacher == "cifar_rd_wrn_40_2" and student in ("cifar_rd_wrn_16_2", "cifar_rd_wrn_40_1")
            or teacher == "cifar_rd_vgg13" and student in ("cifar_rd_vgg8", "cifar_rd_mobilenetv2")):
        return 6.0
    return 8.0


class DKD(Distiller):
    """loss = CE + w(progress) * (alpha * TCKD + beta * NCKD), where w rises linearly from 0 to 1
    over the first `warmup_epochs` (the paper: 20 of 240 epochs; default here: 1/12 of the run).
    With --logit-standardization, as the authors' tools/train.py (sunshangquan/logit-standardization-KD)
    does for DKD: alpha and beta are multiplied by --ls-kd-weight (their --kd-weight, 9) and T is
    --ls-temperature (their --base-temp, 2); the CE weight stays 1."""

    standardizable = True
    standardized_by = {"temperature": ("ls_temperature",)}
    search_space = {"temperature": ("float", 1.0, 8.0, {"log": True}), "dkd_alpha": ("float", 0.25, 4.0, {"log": True}),
                    "dkd_beta": ("float", 1.0, 16.0, {"log": True})}
    search_grid = {"dkd_beta": (1.0, 2.0, 4.0, 8.0)}  # the authors' 2 and 8, and either side of 2

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
    def pair_defaults(cls, cfg, teacher: str, student: str):
        return cfg if cfg.dkd_beta is not None else dataclasses.replace(cfg, dkd_beta=authors_beta(teacher, student))

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        cfg = cls.pair_defaults(cfg, teacher.model.pretrained_cfg.get("architecture"), student.pretrained_cfg.get("architecture"))
        alpha, beta = cfg.dkd_alpha, cfg.dkd_beta
        if cfg.logit_standardization:
            alpha, beta = alpha * cfg.ls_kd_weight, beta * cfg.ls_kd_weight
        temperature = cfg.ls_temperature if cfg.logit_standardization else cfg.temperature
        return cls(student, teacher, temperature, alpha, beta, cfg.kd_warmup_epochs, cfg.logit_standardization, **kwargs)
