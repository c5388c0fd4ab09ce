"""Training methods. A new method is a new file here and one entry in DISTILLERS."""

from kd.distillers.attention import AttentionTransfer
from kd.distillers.base import Distiller, FrozenTeacher, Supervised
from kd.distillers.crd import CRD
from kd.distillers.dist import DIST
from kd.distillers.dkd import DKD
from kd.distillers.hidden import HiddenMSE, HiddenTrained
from kd.distillers.hybrid import Hybrid
from kd.distillers.logits import LogitsKD, kd_loss
from kd.errors import UsageError

DISTILLERS = {
    "logits": LogitsKD,
    "hidden": HiddenMSE,
    "hidden-trained": HiddenTrained,
    "hybrid": Hybrid,
    "at": AttentionTransfer,
    "dkd": DKD,
    "dist": DIST,
    "crd": CRD,
}


def build_distiller(mode: str, student, teacher: FrozenTeacher, cfg, label_smoothing: float = 0.0, train_labels=None) -> Distiller:
    """`train_labels`: the training set's labels (a tensor in dataset order), for methods that keep
    per-image state or draw by class (crd)."""
    if cfg.logit_standardization and not DISTILLERS[mode].standardizable:
        standardizable = ", ".join(m for m, c in DISTILLERS.items() if c.standardizable)
        raise UsageError(f"--logit-standardization needs a mode with a logits term ({standardizable}), not --mode {mode}")
    return DISTILLERS[mode].from_config(student, teacher, cfg, label_smoothing=label_smoothing, train_labels=train_labels)


__all__ = ["DISTILLERS", "Distiller", "FrozenTeacher", "Supervised", "build_distiller", "kd_loss"]
