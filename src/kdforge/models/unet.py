"""Small U-Nets for dense prediction: ``unet2d`` (images) and ``unet3d`` (volumes).

After Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (MICCAI 2015) and Çiçek et al., "3D U-Net" (MICCAI 2016), scaled down: every
stage is two 3x3(x3) convolutions with BatchNorm and ReLU, ``depth`` encoder stages with
``base * 2^i`` channels separated by 2x max pooling, a bottleneck stage of ``base * 2^depth``
channels, and ``depth`` decoder stages that each upsample (nearest, 2x), reduce the channels with a
1x1 convolution (+BN+ReLU), concatenate the encoder stage of the same resolution and apply two
3x3 convolutions; a 1x1 convolution gives ``num_classes`` logits per pixel (voxel), so the output
is B x K x H x W (B x K x D x H x W). Inputs need sides divisible by ``2^depth``.

``base`` (the first stage's channels) sets the width: parameters grow about as ``base^2``
(counts for 1 input channel, 11 classes, depth 3):

| base | unet2d | unet3d |
| ---: | ---: | ---: |
| 32 | 1.80M | 5.30M |
| 16 | 450k | 1.33M |
| 14 | 345k | 1.02M |
| 8 | 113k | 332k |
| 4 | 28.5k | 83.3k |
| 2 | 7.3k | 21.0k |

Feature points: ``enc1`` .. ``enc<depth>`` (encoder stage outputs, full to 1/2^(depth-1)
resolution), ``bottleneck``, ``dec1`` .. ``dec<depth>`` (decoder stage outputs, coarsest first,
so ``dec<depth>`` is at full resolution), ``logits``; ``stage1`` .. are aliases of the encoder
stages, the bottleneck and the decoder stages in forward order (``stage_channels`` lists their
channels). Every convolution that a BatchNorm follows is recorded in ``conv_bn_pairs`` and every
convolution's input as ``input_segments`` (the channel counts it concatenates), which is what
``growing_ta`` needs to widen a U-Net without changing its function.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.models.factory import MODELS

_LAYERS = {2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d), 3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)}


class UNet(nn.Module):
    """A ``dims``-D U-Net with ``depth`` down/up steps and ``base`` channels in its first stage."""

    def __init__(self, dims: int, num_classes: int = 2, in_channels: int = 1, base: int = 16, depth: int = 3) -> None:
        super().__init__()
        conv, norm, pool = _LAYERS[dims]
        self.dims = dims
        self.depth = depth
        self.conv_bn_pairs: list[tuple[nn.Module, nn.Module]] = []
        widths = [base * 2**i for i in range(depth + 1)]

        def block(inputs: list[int], out: int) -> nn.Sequential:
            first = conv(sum(inputs), out, 3, padding=1, bias=False)
            second = conv(out, out, 3, padding=1, bias=False)
            bn1, bn2 = norm(out), norm(out)
            first.input_segments = list(inputs)  # type: ignore[assignment]
            second.input_segments = [out]  # type: ignore[assignment]
            self.conv_bn_pairs.extend([(first, bn1), (second, bn2)])
            return nn.Sequential(
                OrderedDict(conv1=first, bn1=bn1, relu1=nn.ReLU(), conv2=second, bn2=bn2, relu2=nn.ReLU())
            )

        previous = in_channels
        for i in range(depth):
            self.add_module(f"enc{i + 1}", block([previous], widths[i]))
            previous = widths[i]
        self.pool = pool(2)
        self.bottleneck = block([previous], widths[depth])
        previous = widths[depth]
        for i in range(depth):
            out = widths[depth - 1 - i]
            reduce = conv(previous, out, 1, bias=False)
            reduce.input_segments = [previous]  # type: ignore[assignment]
            reduce_bn = norm(out)
            self.conv_bn_pairs.append((reduce, reduce_bn))
            self.add_module(
                f"up{i + 1}",
                nn.Sequential(
                    OrderedDict(
                        upsample=nn.Upsample(scale_factor=2, mode="nearest"), conv=reduce, bn=reduce_bn, relu=nn.ReLU()
                    )
                ),
            )
            self.add_module(f"dec{i + 1}", block([out, out], out))
            previous = out
        self.classifier = conv(previous, num_classes, 1)
        self.classifier.input_segments = [previous]  # type: ignore[assignment]
        stages = [f"enc{i + 1}" for i in range(depth)] + ["bottleneck"] + [f"dec{i + 1}" for i in range(depth)]
        self.feature_points = {name: name for name in stages}
        self.feature_points.update({f"stage{i + 1}": name for i, name in enumerate(stages)})
        self.feature_points["logits"] = "classifier"
        self.stage_channels = widths + widths[-2::-1]
        self.feature_dim = previous
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.dims + 2:
            kind = "B x C x H x W images" if self.dims == 2 else "B x C x D x H x W volumes"
            raise ConfigError(
                f"unet{self.dims}d takes {kind}, got shape {tuple(x.shape)}; use "
                f"{'unet3d' if x.dim() == 5 else 'unet2d'} for this data"
            )
        step = 2**self.depth
        if any(side % step for side in x.shape[2:]):
            raise ConfigError(
                f"unet{self.dims}d with depth {self.depth} needs sides divisible by {step}, got {tuple(x.shape[2:])}"
            )
        skips = []
        for i in range(self.depth):
            x = getattr(self, f"enc{i + 1}")(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for i in range(self.depth):
            x = getattr(self, f"up{i + 1}")(x)
            x = getattr(self, f"dec{i + 1}")(torch.cat([x, skips[-1 - i]], 1))
        return self.classifier(x)


def _check(name: str, base: int, depth: int) -> tuple[int, int]:
    for key, value in (("base", base), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: {key} must be a positive whole number, got {value!r}")
    return base, depth


@MODELS.register("unet2d")
def unet2d(
    num_classes: int = 2,
    in_channels: int = 1,
    input_size: tuple[int, int] | None = None,
    base: int = 16,
    depth: int = 3,
) -> UNet:
    """2-D U-Net, B x K x H x W logits; base 32/16/8/4/2, depth 3: 1.80M/450k/113k/28.5k/7.3k params"""
    base, depth = _check("unet2d", base, depth)
    return UNet(2, num_classes, in_channels, base, depth)


@MODELS.register("unet3d")
def unet3d(
    num_classes: int = 2,
    in_channels: int = 1,
    input_size: tuple[int, int] | None = None,
    base: int = 16,
    depth: int = 3,
) -> UNet:
    """3-D U-Net, B x K x D x H x W logits; base 32/16/8/4/2, depth 3: 5.30M/1.33M/332k/83k/21k params"""
    base, depth = _check("unet3d", base, depth)
    return UNet(3, num_classes, in_channels, base, depth)


__all__ = ["UNet", "unet2d", "unet3d"]
