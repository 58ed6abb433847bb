"""Segmentation benchmarks built from real MNIST digits: ``seg_mnist`` (2-D) and ``seg3d_mnist`` (3-D).

``seg_mnist``: every sample is a ``canvas`` x ``canvas`` black image holding 1 to ``max_digits``
official MNIST digits (28x28) at random positions; its label map gives every pixel whose digit
intensity is at least ``threshold`` the class ``digit + 1``, every other pixel 0 (background), so
there are 11 classes. Digits are pasted one after another; a later digit occludes an earlier one
where it has any ink (pixel > 0): there the image takes the later digit's value and the label its
class (or background below the threshold), so a label never disagrees with the pixel it sits on.
Positions are drawn to keep bounding-box overlap small (IoU under 0.25; after 20 rejected tries
the last draw is kept).

``seg3d_mnist``: every sample is a ``depth`` x ``canvas`` x ``canvas`` volume holding 1 to
``max_digits`` objects; an object is a real MNIST digit resized to ``digit_size`` and swept through
``min_extent`` .. ``max_extent`` consecutive slices, its in-plane scale following an ellipsoid
profile (largest at the object's middle slice, ``sqrt(1 - u^2)`` with u in (-1, 1) along depth)
and twisting by up to ``twist`` degrees from its first to its last slice: a rounded 3-D solid
whose cross-sections are the digit, like an organ traced through CT slices. Labels per voxel as
in 2-D (``digit + 1`` where the resampled intensity is at least ``threshold``).

Digits of the training volumes/canvases come from the official MNIST training set, those of the
test split from the official test set. The layout (which digits, where, how large) is a fixed
function of ``layout_seed`` and the split, never of the run's seed, so every run sees the same
benchmark. ``labels`` (one per sample, used to stratify validation carves and subsets) hold the
first pasted digit's class; ``targets`` hold the label maps (int64 N x H x W or N x D x H x W).
Images are uint8 N x 1 x H x W (volumes N x 1 x D x H x W). No random crops or flips: they would
have to move the label maps too (``data.augment`` must stay false/true = normalisation only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.core.errors import ConfigError
from kdforge.data.catalog import DATASETS
from kdforge.data.hashing import derive_seed
from kdforge.data.sources.idx import mnist
from kdforge.data.types import DatasetInfo, DataSplits, TensorData

_STREAM = {"train": 21, "test": 22}
_STREAM_3D = {"train": 23, "test": 24}
CLASS_NAMES = ["background", *[str(d) for d in range(10)]]


def _whole(name: str, key: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name}: {key} must be a whole number {bound}, got {value!r}")
    return value


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    (ay, ax, ah, aw), (by, bx, bh, bw) = a, b
    dy = max(0, min(ay + ah, by + bh) - max(ay, by))
    dx = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    inter = dy * dx
    return inter / float(ah * aw + bh * bw - inter)


def _place(
    generator: torch.Generator, size: tuple[int, int], canvas: int, boxes: list[tuple[int, int, int, int]]
) -> tuple[int, int]:
    """A top-left corner for a ``size`` box on the canvas with small overlap to ``boxes``."""
    height, width = size
    y = x = 0
    for _ in range(20):
        y = int(torch.randint(0, canvas - height + 1, (1,), generator=generator))
        x = int(torch.randint(0, canvas - width + 1, (1,), generator=generator))
        if all(_box_iou((y, x, height, width), box) < 0.25 for box in boxes):
            break
    return y, x


def _paste(
    image: torch.Tensor, label: torch.Tensor, digit: torch.Tensor, cls: int, corner: tuple[int, ...], threshold: int
) -> None:
    """Paste uint8 ``digit`` (2-D or 3-D) at ``corner``; it occludes where it has ink."""
    region = tuple(slice(c, c + s) for c, s in zip(corner, digit.shape))
    ink = digit > 0
    image[region][ink] = digit[ink]
    label[region][ink] = torch.where(digit[ink] >= threshold, cls + 1, 0)


def compose_2d(
    digits: torch.Tensor, classes: torch.Tensor, count: int, canvas: int, max_digits: int, threshold: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` canvases from uint8 digits N x 28 x 28: (images count x 1 x C x C, label maps, first classes)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, canvas, canvas, dtype=torch.uint8)
    maps = torch.zeros(count, canvas, canvas, dtype=torch.int64)
    first = torch.zeros(count, dtype=torch.int64)
    for n in range(count):
        boxes: list[tuple[int, int, int, int]] = []
        number = int(torch.randint(1, max_digits + 1, (1,), generator=generator))
        for k in range(number):
            which = int(torch.randint(0, len(digits), (1,), generator=generator))
            digit, cls = digits[which], int(classes[which])
            y, x = _place(generator, tuple(digit.shape), canvas, boxes)  # type: ignore[arg-type]
            boxes.append((y, x, *digit.shape))
            _paste(images[n, 0], maps[n], digit, cls, (y, x), threshold)
            if k == 0:
                first[n] = cls
    return images, maps, first


def sweep_digit(digit: torch.Tensor, size: int, extent: int, twist_degrees: float, offset: float = 0.0) -> torch.Tensor:
    """uint8 extent x size x size: ``digit`` resized to ``size`` and swept through ``extent`` slices,
    scaled by an ellipsoid profile and rotated linearly from -twist/2 to +twist/2 along depth."""
    base = F.interpolate(digit[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    u = (torch.arange(extent, dtype=torch.float64) + 0.5) / extent * 2 - 1  # (-1, 1) through the object
    scale = torch.sqrt((1 - u**2).clamp(min=0.0)).clamp(min=0.15)
    angle = torch.deg2rad(twist_degrees * (u / 2 + offset))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # sampling by 1/scale magnifies by scale
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1).float()
    grid = F.affine_grid(theta, [extent, 1, size, size], align_corners=False)
    slices = F.grid_sample(base.expand(extent, 1, size, size), grid, align_corners=False, padding_mode="zeros")
    return slices[:, 0].round().clamp(0, 255).to(torch.uint8)


def compose_3d(
    digits: torch.Tensor,
    classes: torch.Tensor,
    count: int,
    shape: tuple[int, int],
    max_digits: int,
    threshold: int,
    seed: int,
    digit_size: int,
    extents: tuple[int, int],
    twist: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` volumes (count x 1 x D x C x C uint8, label maps count x D x C x C, first classes)."""
    depth, canvas = shape
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, depth, canvas, canvas, dtype=torch.uint8)
    maps = torch.zeros(count, depth, canvas, canvas, dtype=torch.int64)
    first = torch.zeros(count, dtype=torch.int64)
    for n in range(count):
        boxes: list[tuple[int, int, int, int]] = []
        number = int(torch.randint(1, max_digits + 1, (1,), generator=generator))
        for k in range(number):
            which = int(torch.randint(0, len(digits), (1,), generator=generator))
            extent = int(torch.randint(extents[0], extents[1] + 1, (1,), generator=generator))
            offset = float(torch.rand((), generator=generator)) - 0.5
            obj = sweep_digit(digits[which], digit_size, extent, twist, offset)
            cls = int(classes[which])
            z = int(torch.randint(0, depth - extent + 1, (1,), generator=generator))
            y, x = _place(generator, (digit_size, digit_size), canvas, boxes)
            boxes.append((y, x, digit_size, digit_size))
            _paste(images[n, 0], maps[n], obj, cls, (z, y, x), threshold)
            if k == 0:
                first[n] = cls
    return images, maps, first


def _statistics(images: torch.Tensor) -> tuple[tuple[float], tuple[float]]:
    pixels = images.float() / 255.0
    return (float(pixels.mean()),), (float(pixels.std()),)


def _info(name: str, images: torch.Tensor) -> DatasetInfo:
    mean, std = _statistics(images)
    return DatasetInfo(
        name=name,
        num_classes=len(CLASS_NAMES),
        in_channels=1,
        image_size=(int(images.shape[-2]), int(images.shape[-1])),
        mean=mean,
        std=std,
        class_names=list(CLASS_NAMES),
        input_shape=tuple(int(s) for s in images.shape[1:]),
        task="segmentation",
    )


def _split(images: torch.Tensor, maps: torch.Tensor, first: torch.Tensor, name: str) -> TensorData:
    return TensorData(images=images, labels=first, name=name, targets=maps)


@DATASETS.register("seg_mnist")
def seg_mnist(
    root=None,
    download: bool = False,
    canvas: int = 64,
    max_digits: int = 3,
    train_size: int = 10000,
    test_size: int = 2000,
    threshold: int = 128,
    layout_seed: int = 0,
) -> DataSplits:
    """Segmentation, 2-D: 1-3 real MNIST digits on 64x64 canvases, 11 classes per pixel (0 = background)."""
    name = "seg_mnist"
    canvas = _whole(name, "canvas", canvas, 28)
    max_digits = _whole(name, "max_digits", max_digits, 1, 8)
    train_size = _whole(name, "train_size", train_size, 1)
    test_size = _whole(name, "test_size", test_size, 1)
    threshold = _whole(name, "threshold", threshold, 1, 255)
    layout_seed = _whole(name, "layout_seed", layout_seed, 0)
    base = mnist(root=root, download=download)
    splits = {}
    for which, source, size in (("train", base.train, train_size), ("test", base.test, test_size)):
        seed = derive_seed(layout_seed, _STREAM[which])
        digits = source.images[:, 0]
        images, maps, first = compose_2d(digits, source.labels, size, canvas, max_digits, threshold, seed)
        splits[which] = _split(images, maps, first, f"{name} {which}")
    info = _info(name, splits["train"].images)
    return DataSplits(train=splits["train"], val=None, test=splits["test"], info=info)


@DATASETS.register("seg3d_mnist")
def seg3d_mnist(
    root=None,
    download: bool = False,
    depth: int = 16,
    canvas: int = 32,
    max_digits: int = 2,
    digit_size: int = 20,
    min_extent: int = 5,
    max_extent: int = 12,
    twist: float = 30.0,
    train_size: int = 2000,
    test_size: int = 400,
    threshold: int = 128,
    layout_seed: int = 0,
) -> DataSplits:
    """Segmentation, 3-D: 16x32x32 volumes of 1-2 real MNIST digits swept along depth, 11 classes per voxel."""
    name = "seg3d_mnist"
    depth = _whole(name, "depth", depth, 2)
    digit_size = _whole(name, "digit_size", digit_size, 8)
    canvas = _whole(name, "canvas", canvas, digit_size)
    max_digits = _whole(name, "max_digits", max_digits, 1, 8)
    min_extent = _whole(name, "min_extent", min_extent, 1, depth)
    max_extent = _whole(name, "max_extent", max_extent, min_extent, depth)
    train_size = _whole(name, "train_size", train_size, 1)
    test_size = _whole(name, "test_size", test_size, 1)
    threshold = _whole(name, "threshold", threshold, 1, 255)
    layout_seed = _whole(name, "layout_seed", layout_seed, 0)
    if isinstance(twist, bool) or not isinstance(twist, int | float) or not 0 <= twist <= 360:
        raise ConfigError(f"{name}: twist must be a number of degrees in [0, 360], got {twist!r}")
    base = mnist(root=root, download=download)
    splits = {}
    for which, source, size in (("train", base.train, train_size), ("test", base.test, test_size)):
        seed = derive_seed(layout_seed, _STREAM_3D[which])
        images, maps, first = compose_3d(
            source.images[:, 0],
            source.labels,
            size,
            (depth, canvas),
            max_digits,
            threshold,
            seed,
            digit_size,
            (min_extent, max_extent),
            float(twist),
        )
        splits[which] = _split(images, maps, first, f"{name} {which}")
    info = _info(name, splits["train"].images)
    return DataSplits(train=splits["train"], val=None, test=splits["test"], info=info)
