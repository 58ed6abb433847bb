"""CIFAR ShuffleNets in the form used by the KD benchmarks (RepDistiller).

ShuffleNetV1 (Zhang et al., CVPR 2018): a 1x1 conv stem with 24 channels (+BN+ReLU, no
downsampling) -> three stages of 4/8/4 shuffle units with 240/480/960 channels for 3 groups
-> global average pooling -> linear. A unit is grouped 1x1 (bottleneck = 1/4 of its output)
-BN-ReLU -> channel shuffle -> depthwise 3x3-BN-ReLU -> grouped 1x1-BN; it is added to the
input (stride 1) or concatenated with a 3x3 average-pooled input (stride 2, first unit of each
stage), then ReLU. The very first 1x1 is not grouped (its input has only 24 channels).

ShuffleNetV2 (Ma et al., ECCV 2018): the same 24-channel 1x1 stem -> three stages of one
down-sampling unit plus 3/7/3 basic units with 116/232/464 channels (1x) -> 1x1 conv to 1024
(+BN+ReLU) -> global average pooling -> linear. A basic unit splits the channels in two, runs
1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN on one half, concatenates, shuffles (2 groups), ReLU.
The half passed through is already non-negative, so applying the ReLU after the shuffle
computes exactly the reference function while making the pre-activation a single tensor.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.models.common import feature_point_table, init_weights, pooled_flatten
from kdforge.models.factory import MODELS

STEM_CHANNELS = 24

# ShuffleNetV1 stage widths per group count (Table 1 of the paper); groups 4 and 8 are left out
# because the CIFAR unit's bottleneck (a quarter of the output) is then not divisible by them.
SHUFFLENETV1_WIDTHS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960)}
SHUFFLENETV1_UNITS = (4, 8, 4)

# ShuffleNetV2 widths per size (Table 5 of the paper): three stages and the final 1x1 conv.
SHUFFLENETV2_WIDTHS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (224, 488, 976, 2048),
}
SHUFFLENETV2_BASIC_UNITS = (3, 7, 3)


class ChannelShuffle(nn.Module):
    """Interleave channels across `groups`: B x (g*c) x H x W -> view g x c -> transpose -> flatten."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        if self.groups == 1:
            return x
        batch, channels, height, width = x.shape
        x = x.view(batch, self.groups, channels // self.groups, height, width)
        return x.transpose(1, 2).reshape(batch, channels, height, width)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    relu: bool = True,
) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(out_channels),
    )
    if relu:
        layers["relu"] = nn.ReLU()
    return nn.Sequential(layers)


def shufflenet_stem(in_channels: int) -> nn.Sequential:
    return conv_bn(in_channels, STEM_CHANNELS, 1)


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 unit; stride 2 concatenates an average-pooled shortcut, stride 1 adds it."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first_unit: bool = False) -> None:
        super().__init__()
        self.concatenate = stride == 2
        branch_channels = out_channels - in_channels if self.concatenate else out_channels
        bottleneck = branch_channels // 4
        first_groups = 1 if first_unit else groups
        self.compress = conv_bn(in_channels, bottleneck, 1, groups=first_groups)
        self.shuffle = ChannelShuffle(first_groups)
        self.depthwise = conv_bn(bottleneck, bottleneck, 3, stride, groups=bottleneck)
        self.expand = conv_bn(bottleneck, branch_channels, 1, groups=groups, relu=False)
        self.shortcut: nn.Module = nn.AvgPool2d(3, stride=2, padding=1) if self.concatenate else nn.Identity()
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(self.depthwise(self.shuffle(self.compress(x))))
        residual = self.shortcut(x)
        out = torch.cat([out, residual], 1) if self.concatenate else out + residual
        return self.relu(self.preact(out))


class CifarShuffleNetV1(nn.Module):
    """ShuffleNetV1 for CIFAR (RepDistiller's ShuffleV1, 3 groups by default)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, groups: int = 3) -> None:
        super().__init__()
        if groups not in SHUFFLENETV1_WIDTHS:
            raise ConfigError(
                f"shufflenetv1: groups must be one of {', '.join(map(str, SHUFFLENETV1_WIDTHS))}, got {groups!r}"
            )
        widths = SHUFFLENETV1_WIDTHS[groups]
        self.groups = groups
        self.stem = shufflenet_stem(in_channels)
        channels = STEM_CHANNELS
        for stage_index, (width, units) in enumerate(zip(widths, SHUFFLENETV1_UNITS), start=1):
            blocks = []
            for unit in range(units):
                blocks.append(
                    ShuffleV1Unit(
                        channels,
                        width,
                        stride=2 if unit == 0 else 1,
                        groups=groups,
                        first_unit=stage_index == 1 and unit == 0,
                    )
                )
                channels = width
            self.add_module(f"stage{stage_index}", nn.Sequential(*blocks))
        self.pool = pooled_flatten()
        self.classifier = nn.Linear(channels, num_classes)

        self.stage_channels = list(widths)
        self.feature_dim = channels
        self.feature_points = feature_point_table(
            stem="stem",
            stages=["stage1", "stage2", "stage3"],
            preacts=[f"stage{i}.{units - 1}.preact" for i, units in enumerate(SHUFFLENETV1_UNITS, 1)],
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.classifier(self.pool(x))


class ShuffleV2DownUnit(nn.Module):
    """ShuffleNetV2 stride-2 unit: two branches on the full input, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, 3, stride=2, groups=in_channels, relu=False),
            conv_bn(in_channels, half, 1),
        )
        self.right = nn.Sequential(
            conv_bn(in_channels, half, 1),
            conv_bn(half, half, 3, stride=2, groups=half, relu=False),
            conv_bn(half, half, 1),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 stride-1 unit: keep half the channels, transform the other half, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.keep = channels // 2
        half = channels - self.keep
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            conv_bn(half, half, 3, groups=half, relu=False),
            conv_bn(half, half, 1, relu=False),
        )
        self.shuffle = ChannelShuffle(2)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        kept, transformed = x[:, : self.keep], x[:, self.keep :]
        out = self.shuffle(torch.cat([kept, self.branch(transformed)], 1))
        return self.relu(self.preact(out))


class CifarShuffleNetV2(nn.Module):
    """ShuffleNetV2 for CIFAR (RepDistiller's ShuffleV2, size 1.0 by default)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_multiplier: float = 1.0) -> None:
        super().__init__()
        size = width_multiplier if isinstance(width_multiplier, (int, float)) else None
        if isinstance(width_multiplier, bool) or size not in SHUFFLENETV2_WIDTHS:
            raise ConfigError(
                "shufflenetv2: width_multiplier must be one of "
                f"{', '.join(map(str, SHUFFLENETV2_WIDTHS))}, got {width_multiplier!r}"
            )
        *widths, head_channels = SHUFFLENETV2_WIDTHS[float(size)]
        self.width_multiplier = float(size)
        self.stem = shufflenet_stem(in_channels)
        channels = STEM_CHANNELS
        for stage_index, (width, units) in enumerate(zip(widths, SHUFFLENETV2_BASIC_UNITS), start=1):
            blocks: list[nn.Module] = [ShuffleV2DownUnit(channels, width)]
            blocks += [ShuffleV2Unit(width) for _ in range(units)]
            channels = width
            self.add_module(f"stage{stage_index}", nn.Sequential(*blocks))
        self.head = conv_bn(channels, head_channels, 1)
        self.pool = pooled_flatten()
        self.classifier = nn.Linear(head_channels, num_classes)

        self.stage_channels = list(widths)
        self.feature_dim = head_channels
        self.feature_points = feature_point_table(
            stem="stem",
            stages=["stage1", "stage2", "stage3"],
            preacts=[f"stage{i}.{units}.preact" for i, units in enumerate(SHUFFLENETV2_BASIC_UNITS, 1)],
            head="head",
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.classifier(self.pool(self.head(x)))


@MODELS.register("shufflenetv1")
def shufflenetv1(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    groups: int = 3,
) -> CifarShuffleNetV1:
    """CIFAR ShuffleNetV1, 3 groups, stages 240/480/960 (Zhang et al. 2018; RepDistiller)."""
    return CifarShuffleNetV1(num_classes, in_channels, groups)


@MODELS.register("shufflenetv2")
def shufflenetv2(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    width_multiplier: float = 1.0,
) -> CifarShuffleNetV2:
    """CIFAR ShuffleNetV2 1x, stages 116/232/464, head 1024 (Ma et al. 2018; RepDistiller)."""
    return CifarShuffleNetV2(num_classes, in_channels, width_multiplier)


__all__ = [
    "ChannelShuffle",
    "CifarShuffleNetV1",
    "CifarShuffleNetV2",
    "ShuffleV1Unit",
    "ShuffleV2DownUnit",
    "ShuffleV2Unit",
    "shufflenetv1",
    "shufflenetv2",
]
