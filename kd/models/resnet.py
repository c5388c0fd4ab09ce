"""CIFAR ResNets registered in timm, with intermediate feature maps ("taps") by name.

After ``import kd``, ``timm.create_model("cifar_resnet14x4", num_classes=10)`` builds one
and ``timm.list_models("cifar_*")`` lists them all, the papers' zoo (kd.models.zoo, ``cifar_rd_*``)
among them.

Taps are the outputs of the stem, of every residual block (``layer2.0``) and of every
stage (``layer2``, the same tensor as its last block). ``model(x, taps=("layer2",))``
returns ``(logits, {"layer2": tensor})`` so that, under DDP, features come out of the
wrapped model's forward; ``model.forward_taps(x, taps, stop_early=True)`` runs only as
far as the last tap asked for, which is how a frozen teacher skips its unused layers.
Every model's last tap is the map its head pools (CRD embeds it). `TapNet` holds all of
this for any architecture that lists its modules in forward order (`_steps`).
"""

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["CifarResNet", "TapError", "TapNet", "list_taps"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class TapError(ValueError):
    """A tap name that the model does not have."""


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            # projection shortcut (He et al. option B): a 1x1 conv where the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class TapNet(nn.Module):
    """A classifier whose feature maps ("taps") can be read by name: subclasses list their
    modules in forward order with the tap names of each one's output (`_steps`) and hold a
    timm classifier head (`global_pool`, `fc`, `drop_rate`, `num_features`)."""

    num_features: int
    drop_rate: float = 0.0

    def _steps(self) -> List[Tuple[nn.Module, Tuple[str, ...]]]:
        """(module, the tap names of its output), in forward order; the last module's output
        is what the head pools."""
        raise NotImplementedError

    def tap_names(self) -> List[str]:
        return [name for _, names in self._steps() for name in names]

    def _check_taps(self, taps: Iterable[str]) -> List[str]:
        taps = list(taps)
        valid = self.tap_names()
        unknown = [t for t in taps if t not in valid]
        if unknown:
            raise TapError(f"unknown layer {unknown[0]!r}; valid layer names: {', '.join(valid)}")
        return taps

    def forward_taps(
        self, x: torch.Tensor, taps: Sequence[str], stop_early: bool = False
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """Run the model, keeping the named taps. With ``stop_early`` the layers after the
        last requested tap are not run and the logits are None."""
        wanted = set(self._check_taps(taps))
        features: Dict[str, torch.Tensor] = {}
        for module, names in self._steps():
            x = module(x)
            for name in names:
                if name in wanted:
                    features[name] = x
            if stop_early and len(features) == len(wanted):
                return None, features
        return self.forward_head(x), features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for module, _ in self._steps():
            x = module(x)
        return x

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ()):
        if taps:
            return self.forward_taps(x, taps)
        return self.forward_head(self.forward_features(x))

    # -- timm conventions -----------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)


class CifarResNet(TapNet):
    """ResNet for 32x32 inputs: a 3x3 stride-1 stem and three stages of BasicBlocks.
    `stem_width` (default: the first stage's width) and `zero_init_last` (kd's models: True)
    are what the papers' ResNets (kd.models.zoo) set otherwise."""

    def __init__(
        self,
        layers: Sequence[int] = (1, 1, 1),
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        stem_width: Optional[int] = None,
        zero_init_last: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        stem_width = stem_width or widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        # `module` names the module whose output each feature is, as timm's features_only
        # wrapper finds it (after flattening the stem and `layers` Sequentials)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module="stem.2")]
        stages, in_chs, reduction = [], stem_width, 1
        for index, (depth, width) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(in_chs if b == 0 else width, width, stride if b == 0 else 1) for b in range(depth)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"layers.{index}"))
            in_chs = width
        self.layers = nn.Sequential(*stages)  # state_dict keys as a ModuleList: layers.S.B...
        self.num_features = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            # zero-init the last BN of each residual branch: every block starts as identity
            if zero_init_last and isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def _steps(self) -> List[Tuple[nn.Module, Tuple[str, ...]]]:
        steps = [(self.stem, ("stem",))]
        for s, stage in enumerate(self.layers):
            for b, block in enumerate(stage):
                # a stage's tap is the same tensor as its last block's
                steps.append((block, (f"layer{s + 1}.{b}",) + ((f"layer{s + 1}",) if b == len(stage) - 1 else ())))
        return steps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


@torch.no_grad()
def list_taps(model: TapNet, input_size: Optional[Sequence[int]] = None) -> Dict[str, Tuple[int, ...]]:
    """Each tap's name and (C, H, W) shape, measured with one forward pass on zeros of
    `input_size`, by default the size the model records (`pretrained_cfg["input_size"]`: what it
    was exported with, or what the runner sets from the data), else 32x32."""
    if input_size is None:
        input_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 32, 32)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        _, features = model.forward_taps(x, model.tap_names())
    finally:
        model.train(was_training)
    return {name: tuple(f.shape[1:]) for name, f in features.items()}


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "stem.0",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


# Architecture data, apart from the builders (timm's convention). x4 = widths 64/128/256.
ARCHS = {
    "cifar_resnet8": dict(layers=(1, 1, 1), widths=(16, 32, 64)),
    "cifar_resnet14": dict(layers=(2, 2, 2), widths=(16, 32, 64)),
    "cifar_resnet20": dict(layers=(3, 3, 3), widths=(16, 32, 64)),
    "cifar_resnet32": dict(layers=(5, 5, 5), widths=(16, 32, 64)),
    "cifar_resnet56": dict(layers=(9, 9, 9), widths=(16, 32, 64)),
    "cifar_resnet110": dict(layers=(18, 18, 18), widths=(16, 32, 64)),
    "cifar_resnet8x4": dict(layers=(1, 1, 1), widths=(64, 128, 256)),
    "cifar_resnet14x4": dict(layers=(2, 2, 2), widths=(64, 128, 256)),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in ARCHS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    model_args = {**ARCHS[variant], **kwargs}
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **model_args
    )


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet8", pretrained, **kwargs)


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet14", pretrained, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet20", pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet32", pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet56", pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet110", pretrained, **kwargs)


@register_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The report's student: ~1.23M parameters."""
    return _create("cifar_resnet8x4", pretrained, **kwargs)


@register_model
def cifar_resnet14x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """The report's teacher: ~2.78M parameters."""
    return _create("cifar_resnet14x4", pretrained, **kwargs)
