"""CIFAR MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(CVPR 2018), in the CIFAR form of the KD benchmarks (Jin et al. 2019 "Route Constrained
Optimization", used by RepDistiller as ``mobile_half``).

Structure: conv3x3 stride 2 (+BN+ReLU) stem with 32w channels -> 17 inverted residual blocks
(expand 1x1-BN-ReLU, depthwise 3x3-BN-ReLU, project 1x1-BN, identity residual when the shape
is kept) in the standard (t, c, n, s) table -> conv1x1-BN-ReLU head with 1280 channels (1280w
when w > 1) -> global average pooling -> linear. Every block expands, including the first
(t = 1), and channel counts are ``int(c * w)``, as in the reference code. ReLU (not ReLU6).

Feature points: ``stem`` is the first conv; the 7 block groups are gathered into 4 stages the
way RepDistiller reads its features: stage1 = groups 1-2 (24w ch), stage2 = group 3 (32w),
stage3 = groups 4-5 (96w), stage4 = groups 6-7 (320w). Blocks end with a linear bottleneck (no
ReLU), so ``stageK_preact`` is the same tensor as ``stageK``. ``head`` is the 1x1 conv output.
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
)
from kdforge.models.factory import MODELS

# (expansion t or None for "the model's expand_ratio", output channels c, repeats n, stride s)
BLOCK_GROUPS = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# which block groups (0-based) make up each feature stage
STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, with a residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = conv_bn_relu(in_channels, hidden, 1)
        self.depthwise = conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(hidden, out_channels, 1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (stride-2 stem, final map 2x2); any input >= 8x8 works."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_multiplier: float = 1.0,
        expand_ratio: int = 6,
    ) -> None:
        super().__init__()
        width = check_multiplier("mobilenetv2", "width_multiplier", width_multiplier)
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, int) or expand_ratio < 1:
            raise ConfigError(f"mobilenetv2: expand_ratio must be a positive integer, got {expand_ratio!r}")
        if int(16 * width) < 1:
            raise ConfigError(f"mobilenetv2: width_multiplier {width_multiplier} leaves no channels")
        self.width_multiplier, self.expand_ratio = width, expand_ratio

        channels = int(32 * width)
        self.stem = conv_bn_relu(in_channels, channels, 3, stride=2)
        groups: list[list[InvertedResidual]] = []
        for ratio, base_channels, repeats, stride in BLOCK_GROUPS:
            out_channels = int(base_channels * width)
            blocks = []
            for index in range(repeats):
                blocks.append(
                    InvertedResidual(channels, out_channels, stride if index == 0 else 1, ratio or expand_ratio)
                )
                channels = out_channels
            groups.append(blocks)
        stage_channels = []
        for stage_index, members in enumerate(STAGE_GROUPS, start=1):
            blocks = [block for group in members for block in groups[group]]
            self.add_module(f"stage{stage_index}", nn.Sequential(*blocks))
            stage_channels.append(blocks[-1].project.bn.num_features)
        head_channels = int(1280 * width) if width > 1.0 else 1280
        self.head = conv_bn_relu(channels, head_channels, 1)
        self.pool = pooled_flatten()
        self.classifier = nn.Linear(head_channels, num_classes)

        self.stage_channels = stage_channels
        self.feature_dim = head_channels
        stages = ["stage1", "stage2", "stage3", "stage4"]
        self.feature_points = feature_point_table(stem="stem", stages=stages, preacts=stages, head="head")
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.classifier(self.pool(self.head(x)))


@MODELS.register("mobilenetv2")
def mobilenetv2(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    width_multiplier: float = 1.0,
    expand_ratio: int = 6,
) -> CifarMobileNetV2:
    """CIFAR MobileNetV2 (Sandler et al. 2018), width_multiplier 1.0 by default."""
    return CifarMobileNetV2(num_classes, in_channels, width_multiplier, expand_ratio)


@MODELS.register("mobilenetv2_half")
def mobilenetv2_half(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    expand_ratio: int = 6,
) -> CifarMobileNetV2:
    """CIFAR MobileNetV2 at width 0.5: the KD benchmarks' student (RepDistiller mobile_half)."""
    return CifarMobileNetV2(num_classes, in_channels, 0.5, expand_ratio)


__all__ = ["CifarMobileNetV2", "InvertedResidual", "mobilenetv2", "mobilenetv2_half"]
