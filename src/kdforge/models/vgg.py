"""CIFAR VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks" (ICLR 2015), as adapted
for CIFAR in the knowledge-distillation benchmarks (RepDistiller, Tian et al., ICLR 2020).

Five groups of 3x3 conv (+BN) + ReLU layers with 64, 128, 256, 512, 512 channels; 2x2 max
pooling after the first three groups (and after the fourth only for inputs of 64x64 and
more, so a 32x32 image reaches the last group at 4x4); then global average pooling and a
single linear classifier 512 -> C. Convolutions keep their bias even with BN, as in the
reference code, so parameter counts match the published ones (VGG13 9.46M, VGG8 3.96M for
100 classes). Convolutions per group: vgg8 1-1-1-1-1, vgg11 1-1-2-2-2, vgg13 2-2-2-2-2,
vgg16 2-2-3-3-3, vgg19 2-2-4-4-4.

Feature points follow RepDistiller's feature list: ``stem`` is the first group (64 channels),
``stage1`` .. ``stage4`` the other four groups, each taken after its last ReLU and before
pooling.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.core.errors import ConfigError
from kdforge.models.common import feature_point_table, init_weights, pooled_flatten
from kdforge.models.factory import MODELS

GROUP_WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_GROUP = {
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}


def conv_group(in_channels: int, out_channels: int, num_convs: int, batch_norm: bool) -> nn.Sequential:
    """``num_convs`` x (conv3x3 [+BN] + ReLU); the last ReLU is preceded by a ``preact`` identity."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index in range(1, num_convs + 1):
        layers[f"conv{index}"] = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if batch_norm:
            layers[f"bn{index}"] = nn.BatchNorm2d(out_channels)
        if index == num_convs:
            layers["preact"] = nn.Identity()
            layers["relu"] = nn.ReLU()
        else:
            layers[f"relu{index}"] = nn.ReLU()
        in_channels = out_channels
    return nn.Sequential(layers)


class MaxPoolIfLarge(nn.Module):
    """2x2 max pooling applied only when the feature map is at least `min_size` high.

    Reproduces the reference CIFAR VGG, which pools before the last group only for 64x64
    inputs: with ``min_size=8`` at that point, 32x32 inputs skip it and 64x64 ones pool.
    """

    def __init__(self, min_size: int = 8) -> None:
        super().__init__()
        self.min_size = min_size

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] >= self.min_size:
            return F.max_pool2d(x, 2, 2)
        return x

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}"


class CifarVGG(nn.Module):
    """VGG with five conv groups, adaptive average pooling and one linear layer."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if depth not in CONVS_PER_GROUP:
            raise ConfigError(f"vgg: depth must be one of {', '.join(map(str, CONVS_PER_GROUP))}, got {depth!r}")
        convs = CONVS_PER_GROUP[depth]
        self.depth = depth
        self.stem = conv_group(in_channels, GROUP_WIDTHS[0], convs[0], batch_norm)
        self.stem_pool = nn.MaxPool2d(2, 2)
        self.stage1 = conv_group(GROUP_WIDTHS[0], GROUP_WIDTHS[1], convs[1], batch_norm)
        self.stage1_pool = nn.MaxPool2d(2, 2)
        self.stage2 = conv_group(GROUP_WIDTHS[1], GROUP_WIDTHS[2], convs[2], batch_norm)
        self.stage2_pool = nn.MaxPool2d(2, 2)
        self.stage3 = conv_group(GROUP_WIDTHS[2], GROUP_WIDTHS[3], convs[3], batch_norm)
        self.stage3_pool = MaxPoolIfLarge(8)
        self.stage4 = conv_group(GROUP_WIDTHS[3], GROUP_WIDTHS[4], convs[4], batch_norm)
        self.pool = pooled_flatten()
        self.classifier = nn.Linear(GROUP_WIDTHS[4], num_classes)

        self.stage_channels = list(GROUP_WIDTHS[1:])
        self.feature_dim = GROUP_WIDTHS[4]
        self.feature_points = feature_point_table(
            stem="stem",
            stages=["stage1", "stage2", "stage3", "stage4"],
            preacts=[f"stage{i}.preact" for i in (1, 2, 3, 4)],
        )
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_pool(self.stem(x))
        x = self.stage1_pool(self.stage1(x))
        x = self.stage2_pool(self.stage2(x))
        x = self.stage3_pool(self.stage3(x))
        x = self.stage4(x)
        return self.classifier(self.pool(x))


@MODELS.register("vgg")
def vgg(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    depth: int = 13,
    batch_norm: bool = True,
) -> CifarVGG:
    """CIFAR VGG of depth 8, 11, 13, 16 or 19 with BN (RepDistiller layout)."""
    return CifarVGG(depth, num_classes, in_channels, batch_norm)


def _register_variant(depth: int) -> None:
    name = f"vgg{depth}"
    convs = "-".join(map(str, CONVS_PER_GROUP[depth]))

    def factory(
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: tuple[int, int] | None = None,
        batch_norm: bool = True,
    ) -> CifarVGG:
        return CifarVGG(depth, num_classes, in_channels, batch_norm)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CIFAR VGG{depth} with BN, {convs} convs per group, linear 512->C (RepDistiller)."
    MODELS.register(name)(factory)


for _depth in CONVS_PER_GROUP:
    _register_variant(_depth)
del _depth

__all__ = ["CifarVGG", "MaxPoolIfLarge", "conv_group", "vgg"]
