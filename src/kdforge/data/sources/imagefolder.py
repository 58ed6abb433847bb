"""Images in class folders: ``ROOT/{train,test}/<class>/*.png|jpg|jpeg``, decoded with Pillow.

Classes are the sorted folder names under ``ROOT/train``; a test folder must name one of them.
Every image must have the same size (the first one found sets it). ``grayscale=None`` (default)
gives one channel when every image is stored as gray (Pillow modes 1, L, LA), else three (RGB,
alpha dropped); ``True``/``False`` force one or three. Images deeper than 8 bits are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdforge.core.errors import DataError
from kdforge.data.catalog import DATASETS
from kdforge.data.sources.common import build_splits, missing_files_error, resolve_root
from kdforge.data.types import DataSplits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
GRAY_MODES = {"1", "L", "LA"}
HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "F"}


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("imagefolder needs Pillow: pip install pillow") from None
    return Image


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(path for path in split_dir.iterdir() if path.is_dir())


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(path for path in class_dir.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def list_samples(split_dir: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """(file, class id) for every image under ``split_dir``, in class then file-name order."""
    samples = []
    for class_dir in _class_folders(split_dir):
        if class_dir.name not in class_names:
            raise DataError(
                f"imagefolder: class folder {class_dir} is not among the training classes ({', '.join(class_names)})"
            )
        label = class_names.index(class_dir.name)
        samples.extend((path, label) for path in _image_files(class_dir))
    if not samples:
        raise DataError(f"imagefolder: no .png/.jpg/.jpeg images under {split_dir}/<class>/")
    return samples


def _is_gray(paths: list[Path]) -> bool:
    """True when every file is stored as gray (reads headers only)."""
    image_module = _pillow()
    for path in paths:
        try:
            with image_module.open(path) as image:
                if image.mode not in GRAY_MODES:
                    return False
        except OSError as error:
            raise DataError(f"imagefolder: cannot decode {path}: {error}") from None
    return True


def _decode(path: Path, grayscale: bool) -> np.ndarray:
    image_module = _pillow()
    try:
        with image_module.open(path) as image:
            if image.mode in HIGH_DEPTH_MODES:
                raise DataError(f"imagefolder: {path} has {image.mode} pixels; store 8-bit images")
            pixels = np.asarray(image.convert("L" if grayscale else "RGB"))
    except OSError as error:
        raise DataError(f"imagefolder: cannot decode {path}: {error}") from None
    return pixels[None, :, :] if grayscale else pixels.transpose(2, 0, 1)


def load_images(
    samples: list[tuple[Path, int]], grayscale: bool, size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images (uint8 N x C x H x W) and labels; every image must be ``size`` (H, W)."""
    first = _decode(samples[0][0], grayscale)
    size = size or first.shape[1:]
    images = np.empty((len(samples), first.shape[0], *size), dtype=np.uint8)
    for position, (path, _) in enumerate(samples):
        pixels = first if position == 0 else _decode(path, grayscale)
        if pixels.shape[1:] != tuple(size):
            raise DataError(
                f"imagefolder: {path} is {pixels.shape[2]}x{pixels.shape[1]} (WxH) but the other images are "
                f"{size[1]}x{size[0]}; resize all images to one size"
            )
        images[position] = pixels
    return images, np.array([label for _, label in samples], dtype=np.int64)


@DATASETS.register("imagefolder")
def imagefolder(root=None, download: bool = False, grayscale: bool | None = None) -> DataSplits:
    """Images in ROOT/{train,test}/<class>/ folders (png/jpg), all one size."""
    root = resolve_root(root)
    split_dirs = {split: root / split for split in ("train", "test")}
    if not all(folder.is_dir() for folder in split_dirs.values()):
        raise missing_files_error(
            "imagefolder",
            [root],
            "train/<class>/*.png|jpg and test/<class>/*.png|jpg",
            "set data.root to the folder that holds train/ and test/",
        )
    class_names = [folder.name for folder in _class_folders(split_dirs["train"])]
    samples = {split: list_samples(folder, class_names) for split, folder in split_dirs.items()}
    if grayscale is None:
        grayscale = _is_gray([path for split in samples.values() for path, _ in split])
    train = load_images(samples["train"], grayscale, None)
    test = load_images(samples["test"], grayscale, train[0].shape[2:])
    return build_splits("imagefolder", train, test, class_names)
