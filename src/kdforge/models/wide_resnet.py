"""Wide ResNets: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016).

WRN-d-k: a 3x3 conv stem with 16 channels -> three stages of ``n = (d - 4) / 6``
pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 + shortcut) with
16k/32k/64k channels at strides 1, 2, 2 -> BN-ReLU -> global average pooling -> linear.
The shortcut is a 1x1 conv on the activated input when the shape changes, the raw input
otherwise. Parameter counts match the KD benchmarks (RepDistiller): WRN-40-2 2.26M,
WRN-16-2 0.70M for 100 classes.

Layout note: in a pre-activation network a stage's "activated output" is the BN-ReLU that
the next stage's first block applies to it. That first block always changes shape, so it
uses only the activated tensor (conv path and projection shortcut); this module therefore
places that BN-ReLU at the end of the stage that produces the tensor (for the last stage it
is the network's final BN-ReLU). The function and the parameter count are those of the
paper; the gain is that ``stageK`` is the stage's post-activation output and
``stageK.preact`` the BN output just before that ReLU (RepDistiller's pre-activation
features). ``stageK_residual`` is the raw residual stream leaving the stage's last block,
which is what RepDistiller returns as WRN features with ``is_feat=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.models.common import feature_point_table, init_weights, pooled_flatten
from kdforge.models.factory import MODELS


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation wide block. With ``input_activated`` it skips its own leading BN-ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dropout: float,
        input_activated: bool = False,
    ) -> None:
        super().__init__()
        self.input_activated = input_activated
        if not input_activated:
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.projects = stride != 1 or in_channels != out_channels
        if self.projects:
            self.shortcut: nn.Module = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = x if self.input_activated else self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        out = self.conv2(self.dropout(out))
        residual = self.shortcut(activated) if self.projects else x
        return out + residual


class WideStage(nn.Module):
    """A stage of pre-activation blocks followed by the BN-ReLU that activates its output."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        stride: int,
        dropout: float,
        input_activated: bool,
    ) -> None:
        super().__init__()
        blocks = [PreActBlock(in_channels, out_channels, stride, dropout, input_activated)]
        blocks += [PreActBlock(out_channels, out_channels, 1, dropout) for _ in range(num_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(out_channels)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.preact(self.bn(self.blocks(x))))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs (any input >= 8x8 works)."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"wrn: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40...), got {depth!r}")
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ConfigError(f"wrn: widen_factor must be a positive integer, got {widen_factor!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"wrn: dropout must be in [0, 1), got {dropout!r}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor = depth, widen_factor

        self.stem = conv3x3(in_channels, 16)
        self.stage1 = WideStage(16, widths[0], blocks_per_stage, 1, dropout, input_activated=False)
        self.stage2 = WideStage(widths[0], widths[1], blocks_per_stage, 2, dropout, True)
        self.stage3 = WideStage(widths[1], widths[2], blocks_per_stage, 2, dropout, True)
        self.pool = pooled_flatten()
        self.classifier = nn.Linear(widths[2], num_classes)

        self.stage_channels = widths
        self.feature_dim = widths[2]
        self.feature_points = feature_point_table(
            stem="stem",
            stages=["stage1", "stage2", "stage3"],
            preacts=["stage1.preact", "stage2.preact", "stage3.preact"],
            stage1_residual="stage1.blocks",
            stage2_residual="stage2.blocks",
            stage3_residual="stage3.blocks",
        )
        init_weights(self)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.classifier(self.pool(x))


@MODELS.register("wrn")
def wrn(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    depth: int = 16,
    widen_factor: int = 1,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet WRN-depth-widen_factor (Zagoruyko & Komodakis 2016), pre-activation blocks."""
    return WideResNet(depth, widen_factor, num_classes, in_channels, dropout)


def _register_variant(name: str, depth: int, widen_factor: int) -> None:
    def factory(
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: tuple[int, int] | None = None,
        dropout: float = 0.0,
    ) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, in_channels, dropout)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"Wide ResNet WRN-{depth}-{widen_factor} (Zagoruyko & Komodakis 2016; RepDistiller)."
    MODELS.register(name)(factory)


for _name, _depth, _widen in (
    ("wrn_16_1", 16, 1),
    ("wrn_16_2", 16, 2),
    ("wrn_40_1", 40, 1),
    ("wrn_40_2", 40, 2),
):
    _register_variant(_name, _depth, _widen)
del _name, _depth, _widen

__all__ = ["PreActBlock", "WideResNet", "WideStage", "wrn"]
