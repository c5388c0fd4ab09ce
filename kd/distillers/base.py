"""What every training method shares: the student it trains and a frozen teacher beside it."""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

LossTerms = Dict[str, torch.Tensor]


class FrozenTeacher:
    """The teacher, kept outside the trainable module tree on purpose: it is never wrapped in
    DDP, never in the optimizer or the checkpoint, never gets gradients, and stays in eval mode
    whatever `.train()` is called on the method around it."""

    def __init__(self, model: nn.Module):
        self.model = model.requires_grad_(False).eval()

    def to(self, *args, **kwargs) -> "FrozenTeacher":
        self.model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @torch.no_grad()
    def taps(self, images: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Feature maps; the teacher stops at the last one and runs nothing after it."""
        return self.model.forward_taps(images, names, stop_early=True)[1]

    @torch.no_grad()
    def logits_and_taps(self, images: torch.Tensor, names: Sequence[str]):
        return self.model.forward_taps(images, names)


class Distiller(nn.Module):
    """A training method: forward(images, labels) -> (student logits, {name: weighted loss}).
    The trainer sums the dict; it never knows which method runs. Learnable extras (an
    adapter) are submodules, so DDP, the optimizer and the checkpoint all see them.

    `search_space` is what `python -m kd.tune` searches for the method: {config field (a
    TrainConfig/DistillConfig name, i.e. a command-line flag): (kind, low, high[, {"log": True}])}
    with kind "float" or "int", or ("categorical", [choices]). A subclass inherits its parent's
    space unless it declares its own."""

    search_space: Dict[str, tuple] = {}

    def __init__(self, student: nn.Module, teacher: FrozenTeacher = None, label_smoothing: float = 0.0):
        super().__init__()
        self.student = student
        self.teacher = teacher  # a plain object, not a submodule (see FrozenTeacher)
        self.label_smoothing = label_smoothing

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def get_learnable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, LossTerms]:
        raise NotImplementedError


class Supervised(Distiller):
    """Plain training on the labels: train_teacher.py and train_student.py."""

    search_space = {"lr": ("float", 0.02, 0.5, {"log": True}), "weight_decay": ("float", 1e-4, 2e-3, {"log": True}),
                    "label_smoothing": ("float", 0.0, 0.2)}

    def forward(self, images, labels):
        logits = self.student(images)
        return logits, {"loss_ce": self.cross_entropy(logits, labels)}
