"""Training methods. A new method is a new file here and one entry in DISTILLERS."""

from kd.distillers.attention import AttentionTransfer
from kd.distillers.base import Distiller, FrozenTeacher, Supervised
from kd.distillers.hidden import HiddenMSE, HiddenTrained
from kd.distillers.hybrid import Hybrid
from kd.distillers.logits import LogitsKD, kd_loss

DISTILLERS = {
    "logits": LogitsKD,
    "hidden": HiddenMSE,
    "hidden-trained": HiddenTrained,
    "hybrid": Hybrid,
    "at": AttentionTransfer,
}


def build_distiller(mode: str, student, teacher: FrozenTeacher, cfg, label_smoothing: float = 0.0) -> Distiller:
    return DISTILLERS[mode].from_config(student, teacher, cfg, label_smoothing=label_smoothing)


__all__ = ["DISTILLERS", "Distiller", "FrozenTeacher", "Supervised", "build_distiller", "kd_loss"]
