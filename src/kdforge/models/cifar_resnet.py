"""CIFAR ResNets: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), sec. 4.2.

Structure: 3x3 conv stem (+BN+ReLU, no downsampling) -> three stages of ``n = (depth - 2) / 6``
basic blocks at strides 1, 2, 2 -> global average pooling -> one linear classifier.
A basic block is conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU; the shortcut
is a 1x1 conv + BN whenever the shape changes, identity otherwise.

Widths follow the knowledge-distillation benchmarks (RepDistiller, Tian et al., ICLR 2020):
``resnetN`` has a 16-channel stem and stages of 16/32/64 channels; the "x4" models
(``resnet8x4``, ``resnet32x4``) have a 32-channel stem and stages of 64/128/256 channels.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.models.common import (
    check_multiplier,
    feature_point_table,
    init_weights,
    pooled_flatten,
    scale_width,
)
from kdforge.models.factory import MODELS


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ``preact`` (identity, hookable) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.preact(out + self.shortcut(x))
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with three stages of basic blocks (any input >= 8x8 works)."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_channels: int = 16,
        stage_widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"resnet: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110...), got {depth!r}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.stem = nn.Sequential(
            OrderedDict(
                conv=conv3x3(in_channels, stem_channels),
                bn=nn.BatchNorm2d(stem_channels),
                relu=nn.ReLU(),
            )
        )
        channels = stem_channels
        for index, (width, stride) in enumerate(zip(stage_widths, (1, 2, 2)), start=1):
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, stride if block_index == 0 else 1))
                channels = width
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
        self.pool = pooled_flatten()
        self.classifier = nn.Linear(channels, num_classes)

        last = blocks_per_stage - 1
        self.stage_channels = list(stage_widths)
        self.feature_dim = channels
        self.feature_points = feature_point_table(
            stem="stem",
            stages=["stage1", "stage2", "stage3"],
            preacts=[f"stage{i}.{last}.preact" for i in (1, 2, 3)],
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.classifier(self.pool(x))


@MODELS.register("resnet")
def resnet(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    depth: int = 20,
    width_multiplier: float = 1.0,
    stem_channels: int | None = None,
) -> CifarResNet:
    """CIFAR ResNet of any depth 6n+2 and width (stages 16/32/64 x width_multiplier).

    The stem has ``16 * width_multiplier`` channels capped at 32, which reproduces
    RepDistiller's x4 models: ``resnet(depth=32, width_multiplier=4)`` is ``resnet32x4``.
    Pass `stem_channels` to override.
    """
    multiplier = check_multiplier("resnet", "width_multiplier", width_multiplier)
    if stem_channels is None:
        stem_channels = min(scale_width(16, multiplier), 32)
    elif isinstance(stem_channels, bool) or not isinstance(stem_channels, int) or stem_channels < 1:
        raise ConfigError(f"resnet: stem_channels must be a positive integer, got {stem_channels!r}")
    widths = (scale_width(16, multiplier), scale_width(32, multiplier), scale_width(64, multiplier))
    return CifarResNet(depth, num_classes, in_channels, stem_channels, widths)


def _register_variant(name: str, depth: int, width_multiplier: int) -> None:
    width = "x4 (stem 32, stages 64/128/256)" if width_multiplier == 4 else "(stages 16/32/64)"

    def factory(num_classes: int = 10, in_channels: int = 3, input_size: tuple[int, int] | None = None) -> CifarResNet:
        return resnet(num_classes, in_channels, input_size, depth, width_multiplier)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth} {width}, basic blocks (He et al. 2016; RepDistiller)."
    MODELS.register(name)(factory)


for _name, _depth, _width in (
    ("resnet8", 8, 1),
    ("resnet14", 14, 1),
    ("resnet20", 20, 1),
    ("resnet32", 32, 1),
    ("resnet44", 44, 1),
    ("resnet56", 56, 1),
    ("resnet110", 110, 1),
    ("resnet8x4", 8, 4),
    ("resnet32x4", 32, 4),
):
    _register_variant(_name, _depth, _width)
del _name, _depth, _width

__all__ = ["BasicBlock", "CifarResNet", "resnet"]
