"""A small CNN for log-mel spectrograms (1 x mels x frames), for spoken-digit style tasks.

``audio_cnn``: three blocks of conv3x3 -> BatchNorm -> ReLU -> 2x2 max pooling with 16w, 32w and
64w channels (w = ``width``), then global average *and* max pooling over the remaining
time-frequency map (concatenated, as the PANNs CNN14 audio tagging network pools, Kong et al.
2020), dropout and a linear classifier. It works for any spectrogram of at least 8 x 8.

Feature points: ``stage1..stage3`` (block outputs), ``stage1_preact..stage3_preact`` (before the
ReLU), ``pool`` (the 128w-d pooled vector, the classifier's input) and ``logits``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from kdforge.models.common import check_multiplier, feature_point_table, init_weights, scale_width
from kdforge.models.factory import MODELS


class AvgMaxPool(nn.Module):
    """Global average and max pooling over H x W, concatenated: B x 2C."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class AudioCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks, average+max pooling, dropout, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        width = check_multiplier("audio_cnn", "width", width)
        channels = [scale_width(c, width) for c in (16, 32, 64)]
        previous = in_channels
        for index, out_channels in enumerate(channels, start=1):
            block = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(previous, out_channels, 3, padding=1, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                    preact=nn.Identity(),
                    relu=nn.ReLU(),
                    maxpool=nn.MaxPool2d(2, 2, ceil_mode=True),
                )
            )
            self.add_module(f"stage{index}", block)
            previous = out_channels
        self.pool = AvgMaxPool()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * channels[-1], num_classes)
        self.stage_channels = channels
        self.feature_dim = 2 * channels[-1]
        self.feature_points = feature_point_table(
            stem=None,
            stages=["stage1", "stage2", "stage3"],
            preacts=["stage1.preact", "stage2.preact", "stage3.preact"],
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))  # type: ignore[operator]
        return self.classifier(self.dropout(self.pool(x)))


@MODELS.register("audio_cnn")
def audio_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: tuple[int, int] | None = None,
    width: float = 1.0,
    dropout: float = 0.2,
) -> AudioCNN:
    """Spectrogram CNN: 3 x (conv3x3-BN-ReLU-maxpool), 16/32/64w channels, avg+max pooling, dropout, linear."""
    return AudioCNN(num_classes, in_channels, width, dropout)


__all__ = ["AudioCNN", "audio_cnn"]
