"""The CIFAR-100 model zoo of the CRD and DKD papers, registered in timm as ``cifar_rd_*``.

The architectures are those of RepDistiller (HobbitLong/RepDistiller, `models/`), which
mdistiller (megvii-research/mdistiller, `mdistiller/models/cifar/`) reuses: the "rd" in the
names. Parameter counts on 100 classes equal the reference code's (tests/test_models.py).
Weights are initialised as there too. For 32x32 inputs only.

Taps follow one rule across architectures: ``stem`` and ``layerN`` are the reference's feature
maps f0 and fN (what its feature distillers read; ``layerS.B`` are blocks inside a stage), and
the last tap is the map the head pools (``layer3`` for the ResNets, ``features`` where a norm
or a 1x1 conv comes after the last stage), the penultimate features that CRD embeds. See
docs/models.md for the differences from kd's own ``cifar_resnet*``.
"""

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from kd.models.resnet import CifarResNet, TapNet

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # the reference's normalisation (dataset/cifar100.py)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def conv_bn_relu(in_chs: int, out_chs: int, kernel: int, stride: int = 1, bias: bool = False) -> List[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]


def _head(model: TapNet, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
    model.num_classes, model.num_features, model.drop_rate = num_classes, num_features, drop_rate
    model.global_pool, model.fc = create_classifier(num_features, num_classes, pool_type=global_pool)
    model.head_hidden_size = num_features * model.global_pool.feat_mult()


def _block_steps(stages: nn.Sequential) -> List[Tuple[nn.Module, Tuple[str, ...]]]:
    """Each block a tap ``layerS.B``; a stage's tap ``layerS`` is its last block's output."""
    return [(block, (f"layer{s + 1}.{b}",) + ((f"layer{s + 1}",) if b == len(stage) - 1 else ()))
            for s, stage in enumerate(stages) for b, block in enumerate(stage)]


# -- Wide ResNet (Zagoruyko & Komodakis 2016) -------------------------------------------------
class PreActBlock(nn.Module):
    """BN-ReLU-conv twice. Where the width changes, the 1x1 projection shortcut takes the
    activated input; otherwise the identity takes the raw one (the reference's `equalInOut`)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False) if in_chs != out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(TapNet):
    """WRN-depth-k: a 3x3 conv to 16 channels, three stages of (depth - 4) / 6 pre-activation
    blocks of 16k, 32k, 64k channels, then BN-ReLU (tap ``features``) before the pool."""

    def __init__(self, depth: int = 16, widen_factor: int = 2, num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        stages, in_chs = [], 16
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [PreActBlock(in_chs if b == 0 else width, width, stride if b == 0 else 1) for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            in_chs = width
        self.layers = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(in_chs), nn.ReLU(inplace=True))
        self.feature_info = [dict(num_chs=16, reduction=1, module="stem", tap="stem")] + [
            dict(num_chs=w, reduction=2**i, module=f"layers.{i}", tap=f"layer{i + 1}") for i, w in enumerate(widths)
        ] + [dict(num_chs=in_chs, reduction=4, module="final.1", tap="features")]
        _head(self, in_chs, num_classes, global_pool, drop_rate)
        for module in self.modules():  # the reference's init: He normal (fan out), BN 1/0, Linear bias 0
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def _steps(self):
        return [(self.stem, ("stem",)), *_block_steps(self.layers), (self.final, ("features",))]


def _reference_init(model: nn.Module) -> None:
    """RepDistiller's VGG and MobileNetV2 init: conv normal(0, sqrt(2 / (k*k*C_out))), BN 1/0,
    Linear normal(0, 0.01), biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0, math.sqrt(2.0 / (module.kernel_size[0] * module.kernel_size[1] * module.out_channels)))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


# -- VGG with BatchNorm, fully connected layers removed ----------------------------------------
class VGG(TapNet):
    """Five stages of 3x3 conv-BN-ReLU (with conv biases, as the reference), a 2x2 max pool
    before stages 1-3 (the reference pools before stage 4 only on 64x64 inputs), global average
    pool, one linear layer. Taps: ``stem`` (stage 0), ``layer1``-``layer4``."""

    def __init__(self, stages: Sequence[Sequence[int]] = ((64,), (128,), (256,), (512,), (512,)), num_classes: int = 100,
                 in_chans: int = 3, drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        built, in_chs = [], in_chans
        for index, widths in enumerate(stages):
            layers = [nn.MaxPool2d(2)] if index in (1, 2, 3) else []
            for width in widths:
                layers += conv_bn_relu(in_chs, width, 3, bias=True)
                in_chs = width
            built.append(nn.Sequential(*layers))
        self.stem, self.layers = built[0], nn.Sequential(*built[1:])
        reductions = (1, 2, 4, 8, 8)
        self.feature_info = [dict(num_chs=stages[0][-1], reduction=1, module=f"stem.{len(self.stem) - 1}", tap="stem")] + [
            dict(num_chs=stages[i + 1][-1], reduction=reductions[i + 1], module=f"layers.{i}", tap=f"layer{i + 1}") for i in range(4)
        ]
        _head(self, in_chs, num_classes, global_pool, drop_rate)
        _reference_init(self)

    def _steps(self):
        return [(self.stem, ("stem",)), *[(stage, (f"layer{i + 1}",)) for i, stage in enumerate(self.layers)]]


# -- MobileNetV2 (Sandler et al. 2018), the papers' half-width student --------------------------
class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut where shapes match."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int):
        super().__init__()
        mid = in_chs * expand
        self.conv = nn.Sequential(*conv_bn_relu(in_chs, mid, 1),
                                  nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                                  nn.Conv2d(mid, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))
        self.residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion, channels, blocks, stride) of each group, at width 1 (the reference's T is 6)
MOBILENETV2_GROUPS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(TapNet):
    """A stride-2 3x3 stem, seven groups of inverted residuals (taps ``block0``-``block6``; the
    reference's f1-f4 are groups 1, 2, 4 and 6: ``layer1``-``layer4``), a 1x1 conv to 1280
    channels (``features``, 2x2 on 32x32 inputs)."""

    def __init__(self, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        in_chs = int(32 * width_mult)
        self.stem = nn.Sequential(*conv_bn_relu(in_chans, in_chs, 3, stride=2))
        groups, reduction = [], 2
        self.feature_info = [dict(num_chs=in_chs, reduction=2, module="stem.2", tap="stem")]
        for index, (expand, channels, count, stride) in enumerate(MOBILENETV2_GROUPS):
            out_chs, reduction = int(channels * width_mult), reduction * stride
            blocks = [InvertedResidual(in_chs if b == 0 else out_chs, out_chs, stride if b == 0 else 1, expand) for b in range(count)]
            groups.append(nn.Sequential(*blocks))
            if index in self.STAGE_OF:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"blocks.{index}", tap=self.STAGE_OF[index]))
            in_chs = out_chs
        self.blocks = nn.Sequential(*groups)
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.final = nn.Sequential(*conv_bn_relu(in_chs, last, 1))
        self.feature_info.append(dict(num_chs=last, reduction=reduction, module="final.2", tap="features"))
        _head(self, last, num_classes, global_pool, drop_rate)
        _reference_init(self)

    STAGE_OF = {1: "layer1", 2: "layer2", 4: "layer3", 6: "layer4"}  # group index -> the reference's f1-f4

    def _steps(self):
        groups = [(group, (f"block{i}",) + ((self.STAGE_OF[i],) if i in self.STAGE_OF else ())) for i, group in enumerate(self.blocks)]
        return [(self.stem, ("stem",)), *groups, (self.final, ("features",))]


# -- ShuffleNetV2 (Ma et al. 2018) ----------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Half the channels pass; the other half go 1x1, 3x3 depthwise, 1x1; then a shuffle."""

    def __init__(self, chs: int):
        super().__init__()
        half = chs // 2
        self.branch = nn.Sequential(*conv_bn_relu(half, half, 1), nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
                                    nn.BatchNorm2d(half), *conv_bn_relu(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, changed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(changed)], 1))


class ShuffleDownBlock(nn.Module):
    """Stride 2, on two branches (3x3 depthwise then 1x1; 1x1, 3x3 depthwise, 1x1) of half the
    output channels each, concatenated and shuffled."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        mid = out_chs // 2
        self.left = nn.Sequential(nn.Conv2d(in_chs, in_chs, 3, 2, 1, groups=in_chs, bias=False), nn.BatchNorm2d(in_chs),
                                  *conv_bn_relu(in_chs, mid, 1))
        self.right = nn.Sequential(*conv_bn_relu(in_chs, mid, 1), nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                   *conv_bn_relu(mid, mid, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(TapNet):
    """A 1x1 stem to 24 channels at 32x32 (the reference drops ImageNet's stride-2 conv and max
    pool), three stages (a down block, then shuffle blocks), a 1x1 conv (``features``)."""

    def __init__(self, widths: Sequence[int] = (116, 232, 464, 1024), blocks: Sequence[int] = (3, 7, 3), num_classes: int = 100,
                 in_chans: int = 3, drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(in_chans, 24, 1))
        stages, in_chs = [], 24
        for width, count in zip(widths[:3], blocks):
            stages.append(nn.Sequential(ShuffleDownBlock(in_chs, width), *[ShuffleBlock(width) for _ in range(count)]))
            in_chs = width
        self.layers = nn.Sequential(*stages)
        self.final = nn.Sequential(*conv_bn_relu(in_chs, widths[3], 1))
        self.feature_info = [dict(num_chs=24, reduction=1, module="stem.2", tap="stem")] + [
            dict(num_chs=w, reduction=2 ** (i + 1), module=f"layers.{i}", tap=f"layer{i + 1}") for i, w in enumerate(widths[:3])
        ] + [dict(num_chs=widths[3], reduction=8, module="final.2", tap="features")]
        _head(self, widths[3], num_classes, global_pool, drop_rate)  # PyTorch's default init, as the reference

    def _steps(self):
        return [(self.stem, ("stem",)), *_block_steps(self.layers), (self.final, ("features",))]


# -- registry -------------------------------------------------------------------------------------
def _cfg(pool_size: int, first_conv: str = "stem.0") -> dict:
    return {"num_classes": 100, "input_size": (3, 32, 32), "pool_size": (pool_size, pool_size), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": CIFAR100_MEAN, "std": CIFAR100_STD, "first_conv": first_conv,
            "classifier": "fc", "license": "apache-2.0"}


THIN, X4 = dict(widths=(16, 32, 64), stem_width=16), dict(widths=(64, 128, 256), stem_width=32)  # the x4 stem: 32, not 64
# name: (class, architecture arguments, pretrained cfg). Counts on 100 classes are the papers'.
ZOO = {
    "cifar_rd_resnet20": (CifarResNet, dict(layers=(3, 3, 3), **THIN), _cfg(8)),  # 0.28M
    "cifar_rd_resnet32": (CifarResNet, dict(layers=(5, 5, 5), **THIN), _cfg(8)),  # 0.47M
    "cifar_rd_resnet56": (CifarResNet, dict(layers=(9, 9, 9), **THIN), _cfg(8)),  # 0.86M
    "cifar_rd_resnet110": (CifarResNet, dict(layers=(18, 18, 18), **THIN), _cfg(8)),  # 1.74M
    "cifar_rd_resnet8x4": (CifarResNet, dict(layers=(1, 1, 1), **X4), _cfg(8)),  # 1.23M
    "cifar_rd_resnet32x4": (CifarResNet, dict(layers=(5, 5, 5), **X4), _cfg(8)),  # 7.43M
    "cifar_rd_wrn_16_2": (WideResNet, dict(depth=16, widen_factor=2), _cfg(8, "stem")),  # 0.70M
    "cifar_rd_wrn_40_1": (WideResNet, dict(depth=40, widen_factor=1), _cfg(8, "stem")),  # 0.57M
    "cifar_rd_wrn_40_2": (WideResNet, dict(depth=40, widen_factor=2), _cfg(8, "stem")),  # 2.26M
    "cifar_rd_vgg8": (VGG, dict(stages=((64,), (128,), (256,), (512,), (512,))), _cfg(4)),  # 3.96M
    "cifar_rd_vgg13": (VGG, dict(stages=((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))), _cfg(4)),  # 9.46M
    "cifar_rd_mobilenetv2": (MobileNetV2, dict(width_mult=0.5), _cfg(2)),  # 0.81M
    "cifar_rd_shufflenetv2": (ShuffleNetV2, dict(), _cfg(4)),  # 1.36M
}

FEATURE_MAPS = {CifarResNet: 4, WideResNet: 5, VGG: 5, MobileNetV2: 6, ShuffleNetV2: 5}  # len(feature_info): features_only returns all

default_cfgs = generate_default_cfgs({name: cfg for name, (_, _, cfg) in ZOO.items()})


def _create(variant: str, pretrained: bool = False, **kwargs) -> TapNet:
    cls, arch, _ = ZOO[variant]
    model_args = {**arch, **kwargs}
    if cls is CifarResNet:
        model_args.setdefault("zero_init_last", False)  # the reference's BN init: every gamma 1
    out_indices = tuple(range(FEATURE_MAPS[cls]))
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **model_args)



@register_model
def cifar_rd_resnet20(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_resnet20", pretrained, **kwargs)


@register_model
def cifar_rd_resnet32(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_resnet32", pretrained, **kwargs)


@register_model
def cifar_rd_resnet56(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_resnet56", pretrained, **kwargs)


@register_model
def cifar_rd_resnet110(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_resnet110", pretrained, **kwargs)


@register_model
def cifar_rd_resnet8x4(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_resnet8x4", pretrained, **kwargs)


@register_model
def cifar_rd_resnet32x4(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_resnet32x4", pretrained, **kwargs)


@register_model
def cifar_rd_wrn_16_2(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_wrn_16_2", pretrained, **kwargs)


@register_model
def cifar_rd_wrn_40_1(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_wrn_40_1", pretrained, **kwargs)


@register_model
def cifar_rd_wrn_40_2(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_wrn_40_2", pretrained, **kwargs)


@register_model
def cifar_rd_vgg8(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_vgg8", pretrained, **kwargs)


@register_model
def cifar_rd_vgg13(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_vgg13", pretrained, **kwargs)


@register_model
def cifar_rd_mobilenetv2(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_mobilenetv2", pretrained, **kwargs)


@register_model
def cifar_rd_shufflenetv2(pretrained: bool = False, **kwargs) -> TapNet:
    return _create("cifar_rd_shufflenetv2", pretrained, **kwargs)
