"""Small networks for small inputs (8x8 digits, 28x28 MNIST-like): an MLP and a LeNet.

``mlp``: flatten -> hidden Linear-ReLU layers (``hidden=(64,)``) -> linear classifier. Its input
size is fixed at construction, so it needs ``input_size=(H, W)``. It also takes a batch of flat
rows B x (C*H*W): tabular data with D features is built as ``in_channels=D, input_size=(1, 1)``
and fed as B x D.

``lenet``: a LeNet-5-like network after LeCun et al., "Gradient-based learning applied to
document recognition" (1998), not LeNet-5 itself (the factory's docstring lists the
differences): two blocks of conv5x5 (padding 2) -> 2x2 max pooling -> ReLU with 6w and 16w
channels, adaptive average pooling to 4x4, then Linear-ReLU-Linear-ReLU-Linear with 120w and
84w hidden units. Padding and adaptive pooling make it work for any input of at least 4x4.
(Pooling before the ReLU computes the same as the classic order, because max pooling and ReLU
commute, and makes the pre-activation the same shape as the stage output.)

Feature points: the MLP has ``stem`` (the flattened input), ``stageK`` per hidden layer, and
``pool`` (the last hidden activation, i.e. the classifier's input). The LeNet has ``stage1``,
``stage2`` and ``pool`` (the flattened 4x4 map) but no ``stem``: its first block already is a
stage. Both have ``stageK_preact`` and ``logits``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.models.common import check_multiplier, feature_point_table, scale_width
from kdforge.models.factory import MODELS, normalize_input_size


def _hidden_sizes(hidden: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if (
        isinstance(hidden, (str, bytes))
        or not isinstance(hidden, Sequence)
        or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)
    ):
        raise ConfigError(f"mlp: hidden must be a list of positive integers, got {hidden!r}")
    return tuple(hidden)


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden size -> Linear."""

    def __init__(
        self,
        input_size: tuple[int, int],
        num_classes: int = 10,
        in_channels: int = 1,
        hidden: int | Sequence[int] = (64,),
    ) -> None:
        super().__init__()
        sizes = _hidden_sizes(hidden)
        self.input_shape = (in_channels, *input_size)
        features = math.prod(self.input_shape)
        self.flatten = nn.Flatten(1)
        for index, width in enumerate(sizes, start=1):
            layer = nn.Sequential(OrderedDict(linear=nn.Linear(features, width), preact=nn.Identity(), relu=nn.ReLU()))
            self.add_module(f"stage{index}", layer)
            features = width
        self.num_stages = len(sizes)
        self.pool = nn.Identity()
        self.classifier = nn.Linear(features, num_classes)

        self.stage_channels = list(sizes)
        self.feature_dim = features
        self.feature_points = feature_point_table(
            stem="flatten",
            stages=[f"stage{i}" for i in range(1, len(sizes) + 1)],
            preacts=[f"stage{i}.preact" for i in range(1, len(sizes) + 1)],
        )

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape and tuple(x.shape[1:]) != (math.prod(self.input_shape),):
            raise ConfigError(
                f"mlp was built for inputs of shape {self.input_shape} but got "
                f"{tuple(x.shape[1:])}; set input_size and in_channels to match the data"
            )
        x = self.flatten(x)
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        return self.classifier(self.pool(x))


class LeNet(nn.Module):
    """Two conv5x5-maxpool-ReLU blocks, adaptive pooling to 4x4, three linear layers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        width = check_multiplier("lenet", "width", width)
        channels = (scale_width(6, width), scale_width(16, width))
        hidden = (scale_width(120, width), scale_width(84, width))
        previous = in_channels
        for index, out_channels in enumerate(channels, start=1):
            block = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(previous, out_channels, 5, padding=2),
                    maxpool=nn.MaxPool2d(2, 2, ceil_mode=True),
                    preact=nn.Identity(),
                    relu=nn.ReLU(),
                )
            )
            self.add_module(f"stage{index}", block)
            previous = out_channels
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(1))
        features = channels[1] * 16
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(features, hidden[0]),
                relu1=nn.ReLU(),
                fc2=nn.Linear(hidden[0], hidden[1]),
                relu2=nn.ReLU(),
                fc3=nn.Linear(hidden[1], num_classes),
            )
        )
        self.stage_channels = list(channels)
        self.feature_dim = features
        self.feature_points = feature_point_table(
            stem=None,
            stages=["stage1", "stage2"],
            preacts=["stage1.preact", "stage2.preact"],
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage2(self.stage1(x))
        return self.classifier(self.pool(x))


@MODELS.register("mlp")
def mlp(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    hidden: int | Sequence[int] = (64,),
) -> MLP:
    """Multi-layer perceptron: flatten -> Linear-ReLU per hidden size -> Linear; needs input_size."""
    size = normalize_input_size(input_size, "mlp")
    if size is None:
        raise ConfigError(
            "model 'mlp' needs input_size=(H, W) to size its first layer, e.g. (28, 28) for MNIST "
            "or (8, 8) for sklearn digits"
        )
    return MLP(size, num_classes, in_channels, hidden)


@MODELS.register("lenet")
def lenet(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    width: float = 1.0,
) -> LeNet:
    """LeNet-5-like CNN (not LeNet-5): 2 x (conv5x5 pad 2, maxpool, ReLU), 6/16w channels, 4x4 avg-pool, 3 linears.

    It keeps LeNet-5's layer sizes (6 and 16 5x5 filters, 120 and 84 hidden units) but not its
    details: padded convolutions, max pooling and ReLU instead of trainable subsampling and
    tanh/sigmoid, full instead of partial C3 connections, adaptive average pooling to 4x4 before
    a linear C5 (LeNet-5 convolves a 5x5 map), and a linear output instead of RBF units.
    """
    return LeNet(num_classes, in_channels, width)


__all__ = ["LeNet", "MLP", "lenet", "mlp"]
