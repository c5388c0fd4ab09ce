"""Feature-map distillation: MSE between a student and a teacher feature map (FitNets,
Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"), directly (`hidden`) or through a
learned adapter on the student side (`hidden-trained`)."""

import torch.nn as nn
import torch.nn.functional as F

from kd.distillers.base import Distiller
from kd.errors import UsageError
from kd.models import list_taps


def tap_shapes(model, layer: str, role: str):
    shapes = list_taps(model)
    if layer not in shapes:
        raise UsageError(f"unknown {role} layer {layer!r}; valid names: {', '.join(shapes)}")
    return shapes[layer]


class Adapter(nn.Module):
    """Maps a student feature map (C_s, H_s, W_s) to the teacher's (C_t, H_t, W_t): a 3x3 conv
    (the report's Conv2d(C, C, 3, padding=1) when the shapes match), then a bilinear resize
    when the spatial sizes differ."""

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        self.conv = nn.Conv2d(student_shape[0], teacher_shape[0], 3, padding=1)
        self.size = tuple(teacher_shape[1:]) if tuple(student_shape[1:]) != tuple(teacher_shape[1:]) else None

    def forward(self, x):
        x = self.conv(x)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False) if self.size else x


class HiddenMSE(Distiller):
    """loss = CE(student, labels) + hidden_factor * MSE(student_layer, teacher_layer)."""

    search_space = {"hidden_factor": ("float", 0.1, 100.0, {"log": True})}
    search_grid = {"hidden_factor": (0.3, 1.0, 3.0)}

    def __init__(self, student, teacher, student_layer: str, teacher_layer: str, hidden_factor: float, adapter=None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.hidden_factor = hidden_factor
        self.adapter = adapter if adapter is not None else nn.Identity()

    def feature_loss(self, student_map, teacher_map):
        return self.hidden_factor * F.mse_loss(self.adapter(student_map).float(), teacher_map.float())

    def forward(self, images, labels, index=None):
        logits, features = self.student(images, taps=(self.student_layer,))
        target = self.teacher.taps(images, [self.teacher_layer])[self.teacher_layer]
        terms = {"loss_ce": self.cross_entropy(logits, labels), "loss_hidden": self.feature_loss(features[self.student_layer], target)}
        return logits, terms

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        student_shape = tap_shapes(student, cfg.student_layer, "student")
        teacher_shape = tap_shapes(teacher.model, cfg.teacher_layer, "teacher")
        if student_shape != teacher_shape:
            raise UsageError(
                f"--mode hidden needs feature maps of one shape, but student {cfg.student_layer} is "
                f"{'x'.join(map(str, student_shape))} and teacher {cfg.teacher_layer} is "
                f"{'x'.join(map(str, teacher_shape))}; use --mode hidden-trained, which learns an adapter"
            )
        return cls(student, teacher, cfg.student_layer, cfg.teacher_layer, cfg.hidden_factor, **kwargs)


class HiddenTrained(HiddenMSE):
    """As `hidden`, through a learned Adapter on the student's feature map. The adapter trains
    with the student and is saved in the checkpoint, but is not part of the exported model."""

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        student_shape = tap_shapes(student, cfg.student_layer, "student")
        teacher_shape = tap_shapes(teacher.model, cfg.teacher_layer, "teacher")
        adapter = Adapter(student_shape, teacher_shape)
        return cls(student, teacher, cfg.student_layer, cfg.teacher_layer, cfg.hidden_factor, adapter=adapter, **kwargs)
