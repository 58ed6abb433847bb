"""Any classification set stored as one ``.npz`` with ``x_train y_train x_test y_test``.

Tabular data: 2-D arrays N x D (floats, negative values included, or integers) are D features
per sample, kept as float32 and standardised with per-feature statistics fitted on the training
split (never stored as 8 bits, never augmented).

Image layouts: N x H x W (one channel), N x H x W x C (channels-last) or N x C x H x W, with C in
{1, 3, 4}. When both the second and the last axis could be channels, pass ``layout="nhwc"`` or
``layout="nchw"``. Pixel values: integer arrays must lie in 0..255; float arrays with maximum <= 1
are scaled by 255 (and rounded), float arrays holding whole numbers in 0..255 are used as they are;
anything else is an error. ``class_names`` (optional array of strings) names the classes; otherwise
the classes are ``0..max label``.

Regression: ``task: regression`` reads ``y_train``/``y_test`` as float targets (N, or N x K for
vector targets); ``target_names`` (optional array of strings) names the K components;
``target_scale`` ("auto" or a number) and ``target_unit`` as for CSV
(``kdforge.data.sources.targets``).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from kdforge.core.errors import ConfigError, DataError
from kdforge.data.catalog import DATASETS
from kdforge.data.sources.common import build_splits
from kdforge.data.sources.targets import check_task, regression_splits
from kdforge.data.types import DataSplits

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
CHANNEL_COUNTS = (1, 3, 4)
LAYOUTS = ("nhwc", "nchw")


def _channel_layout(shape: tuple[int, ...], layout: str | None, where: str) -> str:
    """'nhwc' or 'nchw' for a 4-D image array, detected from which axis can hold channels."""
    if layout is not None:
        if layout not in LAYOUTS:
            raise ConfigError(f"npz layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
        return layout
    last, second = shape[3] in CHANNEL_COUNTS, shape[1] in CHANNEL_COUNTS
    if last and not second:
        return "nhwc"
    if second and not last:
        return "nchw"
    problem = "is ambiguous" if last else "has no channel axis (1, 3 or 4 on axis 1 or 3)"
    raise DataError(f"{where}: image shape {shape} {problem}; pass layout='nhwc' or layout='nchw'")


def to_nchw(images: np.ndarray, layout: str | None, where: str) -> np.ndarray:
    """Images in N x C x H x W from any supported layout."""
    if images.ndim == 3:
        return images[:, None, :, :]
    if images.ndim != 4:
        raise DataError(f"{where}: samples must be N x D features, N x H x W or 4-D images, got shape {images.shape}")
    if _channel_layout(images.shape, layout, where) == "nhwc":
        return images.transpose(0, 3, 1, 2)
    return images


def to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 pixels, converting only when the conversion is unambiguous (see the module docstring)."""
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_:
        return images.astype(np.uint8) * 255
    if np.issubdtype(images.dtype, np.integer):
        if images.size and (images.min() < 0 or images.max() > 255):
            raise DataError(f"{where}: integer pixels must lie in 0..255, found {images.min()}..{images.max()}")
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating):
        return _float_to_uint8(images, where)
    raise DataError(f"{where}: cannot use pixels of type {images.dtype}; store uint8 images")


def _float_to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    if images.size == 0:
        return images.astype(np.uint8)
    low, high = float(images.min()), float(images.max())
    if not np.isfinite(images).all() or low < 0:
        raise DataError(f"{where}: float pixels must be finite and non-negative, found {low}..{high}")
    if high <= 1.0:
        return np.rint(images * 255.0).astype(np.uint8)
    if high <= 255.0 and np.array_equal(images, np.rint(images)):
        return images.astype(np.uint8)
    raise DataError(
        f"{where}: float pixels in {low}..{high} are neither in [0, 1] nor whole numbers in 0..255; store uint8 images"
    )


def to_features(values: np.ndarray, where: str) -> np.ndarray:
    """float32 N x D features from a numeric 2-D array (finite values only)."""
    if values.dtype == np.bool_ or not (
        np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    ):
        raise DataError(f"{where}: features must be numbers, got {values.dtype}; encode text columns as numbers")
    features = values.astype(np.float32)
    if not np.isfinite(features).all():
        raise DataError(f"{where}: features hold NaN or infinite values (or numbers beyond float32); clean them first")
    return features


def _labels(array: np.ndarray, where: str) -> np.ndarray:
    integer = np.issubdtype(array.dtype, np.integer)
    whole = (
        np.issubdtype(array.dtype, np.floating)
        and bool(np.isfinite(array).all())
        and np.array_equal(array, np.rint(array))
    )
    if array.ndim != 1 or not (integer or whole):
        raise DataError(
            f"{where}: labels must be a vector of class indices (whole numbers), got {array.dtype} {array.shape}; "
            "store text names in class_names"
        )
    return array.astype(np.int64)


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(
            f"npz: file {path} not found; set data.options.path (or data.root) to a .npz holding "
            f"{', '.join(REQUIRED_KEYS)}"
        )
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array (np.save), not an archive of named arrays (np.savez)")
        with archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(
            f"npz: cannot read {path} ({type(error).__name__}: {error}); it must be an intact np.savez "
            "archive of numeric arrays: write it again with np.savez"
        ) from None


@DATASETS.register("npz")
def npz(
    root=None,
    download: bool = False,
    path=None,
    layout: str | None = None,
    task: str = "classification",
    target_scale: float | str = "auto",
    target_unit: str = "",
) -> DataSplits:
    """Images or N x D features and labels from one .npz (x_train y_train x_test y_test, class_names)."""
    regression = check_task("npz", task) == "regression"
    source = path if path is not None else root
    if source is None:
        raise ConfigError("npz needs the file: set data.options.path (or data.root) to the .npz")
    if not isinstance(source, str | Path):
        raise ConfigError(f"npz: data.options.path must be a file path (a string), got {source!r}")
    source = Path(source).expanduser()
    arrays = _open_npz(source)
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise DataError(f"npz: {source} lacks {', '.join(missing)} (found {', '.join(sorted(arrays))})")
    splits = {}
    for split in ("train", "test"):
        where = f"{source} x_{split}"
        values = arrays[f"x_{split}"]
        if values.ndim == 2:
            images = to_features(values, where)
        else:
            images = to_uint8(to_nchw(values, layout, where), where)
        labels = arrays[f"y_{split}"] if regression else _labels(arrays[f"y_{split}"], f"{source} y_{split}")
        if len(images) != len(labels):
            raise DataError(f"npz: {source} has {len(images)} {split} images but {len(labels)} labels")
        splits[split] = (images, labels)
    if splits["train"][0].ndim != splits["test"][0].ndim:
        raise DataError(
            f"npz: {source} x_train is {splits['train'][0].ndim}-D but x_test is {splits['test'][0].ndim}-D; "
            "store both splits alike"
        )
    if regression:
        names = arrays.get("target_names")
        target_names = [str(name) for name in names.tolist()] if names is not None else None
        return regression_splits("npz", splits["train"], splits["test"], target_names, target_scale, target_unit)
    if "class_names" in arrays:
        class_names = [str(name) for name in arrays["class_names"].tolist()]
    else:
        highest = max((int(labels.max()) for _, labels in splits.values() if len(labels)), default=0)
        class_names = [str(label) for label in range(highest + 1)]
    return build_splits("npz", splits["train"], splits["test"], class_names)
