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
        self.scale = self.shift = None  # batch normalisation -> the teacher's (see match_input)

    def match_input(self, mean: Sequence[float], std: Sequence[float]) -> "FrozenTeacher":
        """Batches come normalised with the student run's (mean, std); the teacher was trained
        on its own (its pretrained_cfg, exported with it). Per channel,
        x_t = (x * std + mean - mean_t) / std_t = x * scale + shift."""
        mean_t, std_t = (torch.tensor(self.model.pretrained_cfg[k], dtype=torch.float64) for k in ("mean", "std"))
        mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        if torch.equal(mean, mean_t) and torch.equal(std, std_t):
            self.scale = self.shift = None  # the same statistics: the batch goes in as it is
        else:
            device = next(self.model.parameters()).device
            self.scale = (std / std_t).float().view(1, -1, 1, 1).to(device)
            self.shift = ((mean - mean_t) / std_t).float().view(1, -1, 1, 1).to(device)
        return self

    def to(self, *args, **kwargs) -> "FrozenTeacher":
        self.model.to(*args, **kwargs)
        if self.scale is not None:
            device = next(self.model.parameters()).device
            self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.scale is None else images * self.scale + self.shift

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self._input(images))

    @torch.no_grad()
    def taps(self, images: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Feature maps; the teacher stops at the last one and runs nothing after it."""
        return self.model.forward_taps(self._input(images), names, stop_early=True)[1]

    @torch.no_grad()
    def logits_and_taps(self, images: torch.Tensor, names: Sequence[str]):
        return self.model.forward_taps(self._input(images), names)


class Distiller(nn.Module):
    """A training method: forward(images, labels, index) -> (student logits, {name: weighted
    loss}); `index` holds the images' dataset indices, for methods that keep per-image state.
    The trainer sums the dict; it never knows which method runs. Learnable extras (an
    adapter) are submodules, so DDP, the optimizer and the checkpoint all see them.

    `search_space` is what `python -m kd.tune` searches for the method: {config field (a
    TrainConfig/DistillConfig name, i.e. a command-line flag): (kind, low, high[, {"log": True}])}
    with kind "float" or "int", or ("categorical", [choices]). A subclass inherits its parent's
    space unless it declares its own. `search_grid` is a few points of that space, {name:
    (values...)}, every combination tried in order: what the leaderboard tunes on when its budget
    is a few trials (`--trials grid`), where a few TPE draws would be a few random points."""

    search_space: Dict[str, tuple] = {}
    search_grid: Dict[str, tuple] = {}

    standardizable = False  # has a temperature-softmax logits term that --logit-standardization z-scores
    standardized_by: Dict[str, Tuple[str, ...]] = {}  # with it, the settings used in place of these (which then do nothing)

    def __init__(self, student: nn.Module, teacher: FrozenTeacher = None, label_smoothing: float = 0.0, train_labels: torch.Tensor = None):
        super().__init__()
        self.student = student
        self.teacher = teacher  # a plain object, not a submodule (see FrozenTeacher)
        self.label_smoothing = label_smoothing
        # train_labels (the training set's labels, in dataset order) is for the methods that keep
        # per-image state or draw by class, which take it in from_config (crd); the base keeps nothing

    @classmethod
    def pair_defaults(cls, cfg, teacher: str, student: str):
        """`cfg` (a DistillConfig) with the defaults that depend on the teacher and student
        architectures filled in; distill.py records the result in run_config.json."""
        return cfg

    def set_progress(self, epoch: float, epochs: int) -> None:
        """Called by the loop before every micro-step: `epoch` is the (fractional) number of
        epochs done out of `epochs`. Methods with schedules (DKD's warm-up) override it."""

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def get_learnable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor = None) -> Tuple[torch.Tensor, LossTerms]:
        raise NotImplementedError


class Supervised(Distiller):
    """Plain training on the labels: train_teacher.py and train_student.py."""

    search_space = {"lr": ("float", 0.05, 1.0, {"log": True}), "weight_decay": ("float", 1e-4, 2e-3, {"log": True}),
                    "label_smoothing": ("float", 0.0, 0.2)}
    search_grid = {"weight_decay": (2.5e-4, 5e-4, 1e-3)}  # the lr was chosen on validation with the preset

    def forward(self, images, labels, index=None):
        logits = self.student(images)
        return logits, {"loss_ce": self.cross_entropy(logits, labels)}
