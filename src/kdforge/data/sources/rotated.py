"""``rotated_mnist``: real MNIST digits rotated by a known angle, for image regression.

The idea is RC-49's (Ding et al., "CcGAN", ICLR 2021: objects rendered at known yaw angles), built
from data at hand: every official MNIST digit is rotated counter-clockwise about the image centre by
an angle drawn uniformly from [0, ``max_angle``) degrees, with bilinear resampling and a black
background. The angles are a fixed function of ``angle_seed`` and the split, not of the run's seed,
so every run sees the same benchmark (a fixed split); label-scarce variants come from
``data.train_subset``, which keeps the ten digits in balance.

Targets are ``angle / max_angle`` (in [0, 1)); ``DatasetInfo.target_scale`` = ``max_angle``, so MAE
and RMSE are reported in degrees. ``labels`` keep the digit (it stratifies splits and subsets and
lets a digit classifier serve as a feature extractor). With ``max_angle`` above 180 a 6 and a 9 can
look alike at different angles; the default 90 (RC-49's range) avoids that ambiguity.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from kdforge.core.errors import ConfigError
from kdforge.data.catalog import DATASETS
from kdforge.data.hashing import derive_seed
from kdforge.data.sources.idx import mnist
from kdforge.data.types import DataSplits, TensorData

_ANGLE_STREAM = {"train": 11, "test": 12}


def rotate_images(images: torch.Tensor, degrees: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """uint8 images N x C x H x W rotated counter-clockwise by ``degrees`` (N) about their centre."""
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].float()
        radians = degrees[start : start + chunk].double() * math.pi / 180.0
        cos, sin = torch.cos(radians), torch.sin(radians)
        # affine_grid maps output coordinates to input ones: rotating the content by +theta samples by -theta
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1
        )
        grid = F.affine_grid(theta.float(), list(block.shape), align_corners=False)
        rotated = F.grid_sample(block, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start : start + chunk] = rotated.round().clamp(0, 255).to(torch.uint8)
    return out


def _rotated(split: TensorData, max_angle: float, angle_seed: int, which: str) -> TensorData:
    generator = torch.Generator().manual_seed(derive_seed(angle_seed, _ANGLE_STREAM[which]))
    angles = torch.rand(len(split), generator=generator, dtype=torch.float64) * max_angle
    return TensorData(
        images=rotate_images(split.images, angles),
        labels=split.labels,
        name=split.name,
        indices=split.indices,
        targets=(angles / max_angle).to(torch.float32),
    )


@DATASETS.register("rotated_mnist")
def rotated_mnist(root=None, download: bool = False, max_angle: float = 90.0, angle_seed: int = 0) -> DataSplits:
    """MNIST digits rotated by a known angle in [0, max_angle) degrees; regress the angle (MAE in degrees)."""
    if isinstance(max_angle, bool) or not isinstance(max_angle, int | float) or not 0 < max_angle <= 360:
        raise ConfigError(f"rotated_mnist: max_angle must be a number of degrees in (0, 360], got {max_angle!r}")
    if isinstance(angle_seed, bool) or not isinstance(angle_seed, int):
        raise ConfigError(f"rotated_mnist: angle_seed must be a whole number, got {angle_seed!r}")
    base = mnist(root=root, download=download)
    assert isinstance(base.train, TensorData) and isinstance(base.test, TensorData)  # IDX files load in memory
    train = _rotated(base.train, float(max_angle), angle_seed, "train")
    test = _rotated(base.test, float(max_angle), angle_seed, "test")
    info = dataclasses.replace(
        base.info,
        name="rotated_mnist",
        num_classes=1,
        class_names=["angle"],
        task="regression",
        target_scale=float(max_angle),
        target_unit="°",
    )
    return DataSplits(train=train, val=None, test=test, info=info)
