"""Logits distillation and adapted feature distillation together (the report's experiment 4)."""

from kd.distillers.hidden import HiddenTrained
from kd.distillers.logits import soft_label_terms


class Hybrid(HiddenTrained):
    """loss = logits_factor * [(1-alpha) CE + alpha T^2 KL] + hidden_factor * MSE(adapter(s), t).
    The teacher runs once, to its logits, and its feature map is taken on the way."""

    search_space = {"temperature": ("float", 1.0, 8.0, {"log": True}), "alpha": ("float", 0.1, 0.95),
                    "hidden_factor": ("float", 0.1, 100.0, {"log": True})}
    search_grid = {"hidden_factor": (0.3, 1.0, 3.0)}

    def __init__(self, *args, temperature: float, alpha: float, logits_factor: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.alpha = alpha
        self.logits_factor = logits_factor

    def forward(self, images, labels, index=None):
        logits, features = self.student(images, taps=(self.student_layer,))
        teacher_logits, teacher_features = self.teacher.logits_and_taps(images, [self.teacher_layer])
        ce = self.cross_entropy(logits, labels)
        terms = soft_label_terms(ce, logits, teacher_logits, self.temperature, self.alpha, self.logits_factor)
        terms["loss_hidden"] = self.feature_loss(features[self.student_layer], teacher_features[self.teacher_layer])
        return logits, terms

    @classmethod
    def from_config(cls, student, teacher, cfg, **kwargs):
        kwargs.update(temperature=cfg.temperature, alpha=cfg.alpha, logits_factor=cfg.logits_factor)
        return super().from_config(student, teacher, cfg, **kwargs)
