"""Tabular data: scikit-learn's bundled sets (no download) and CSV files.

Every sample is a row of D numbers, kept as float32 (never 8-bit), standardised with per-feature
mean and std fitted on the training split, and never augmented; models see a B x D batch (the
``mlp`` takes it as D features).

Bundled sets (scikit-learn ships the files; they load offline): ``wine`` (178 samples, 13
features, 3 classes), ``breast_cancer`` (569 samples, 30 features, 2 classes) and ``iris`` (150
samples, 4 features, 3 classes). Their test split is fixed: a quarter of the samples, class-
stratified with seed 0; ``TensorData.indices`` are positions in scikit-learn's array.

``csv``: one header row, then one sample per row. ``label`` names the label column (default: the
last one); every other column must hold numbers. Labels may be integers (class indices) or text
(classes are the sorted distinct names). ``path`` is one file, split into train and test
(``test_fraction``, default 0.25, class-stratified and seeded); or ``data.root`` is a folder with
``train.csv`` and ``test.csv``.
"""

from __future__ import annotations

import csv as csv_module
from pathlib import Path

import numpy as np
import torch

from kdforge.core.errors import ConfigError, DataError
from kdforge.data.catalog import DATASETS
from kdforge.data.sources.common import MissingDataError, build_splits, resolve_root
from kdforge.data.splits import stratified_holdout
from kdforge.data.types import DataSplits

TEST_FRACTION = 0.25
SPLIT_SEED = 0


def holdout_splits(
    name: str, features: np.ndarray, labels: np.ndarray, class_names: list[str], fraction: float, seed: int
) -> DataSplits:
    """Train/test DataSplits of one table: ``fraction`` of the rows held out, class-stratified."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"{name}: test_fraction must be in (0, 1), got {fraction}")
    target = torch.as_tensor(labels, dtype=torch.int64)
    train, test = stratified_holdout(target, max(1, round(fraction * len(target))), seed)
    values = features.astype(np.float32)
    return build_splits(
        name,
        (values[train.numpy()], target[train]),
        (values[test.numpy()], target[test]),
        class_names,
        source_indices=(train, test),
    )


def _sklearn(name: str, loader: str) -> DataSplits:
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, loader)()
    names = [str(label) for label in bunch.target_names]
    return holdout_splits(name, bunch.data, bunch.target, names, TEST_FRACTION, SPLIT_SEED)


@DATASETS.register("wine")
def wine(root=None, download: bool = False) -> DataSplits:
    """scikit-learn's wine recognition table: 178 samples, 13 features, 3 classes (bundled)."""
    return _sklearn("wine", "load_wine")


@DATASETS.register("breast_cancer")
def breast_cancer(root=None, download: bool = False) -> DataSplits:
    """scikit-learn's Wisconsin breast cancer table: 569 samples, 30 features, 2 classes (bundled)."""
    return _sklearn("breast_cancer", "load_breast_cancer")


@DATASETS.register("iris")
def iris(root=None, download: bool = False) -> DataSplits:
    """scikit-learn's iris table: 150 samples, 4 features, 3 classes (bundled)."""
    return _sklearn("iris", "load_iris")


def read_csv(path: Path, label: str | None) -> tuple[np.ndarray, list[str], str]:
    """(float64 features N x D, raw label strings, label column name) of one CSV file."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv_module.reader(handle))
    except (OSError, UnicodeDecodeError, csv_module.Error) as error:
        raise DataError(f"csv: cannot read {path} ({type(error).__name__}: {error})") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise DataError(f"csv: {path} needs a header row and at least one data row")
    header = [cell.strip() for cell in rows[0]]
    column = label if label is not None else header[-1]
    if column not in header:
        raise ConfigError(
            f"csv: {path} has no column '{column}' (columns: {', '.join(header)}); set data.options.label"
        )
    target = header.index(column)
    if len(header) < 2:
        raise DataError(f"csv: {path} has only the label column; it needs at least one feature column")
    features = np.empty((len(rows) - 1, len(header) - 1), dtype=np.float64)
    labels = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"csv: {path} line {line} has {len(row)} fields but the header has {len(header)}")
        cells = [cell for position, cell in enumerate(row) if position != target]
        try:
            features[line - 2] = [float(cell) for cell in cells]
        except ValueError:
            bad = next(cell for cell in cells if not _is_number(cell))
            raise DataError(
                f"csv: {path} line {line} holds '{bad}' in a feature column; features must be numbers "
                "(encode text columns as numbers)"
            ) from None
        labels.append(row[target].strip())
    if not np.isfinite(features).all():
        raise DataError(f"csv: {path} holds NaN or infinite feature values; clean them first")
    return features, labels, column


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def encode_labels(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer labels as they are (classes 0..max), otherwise text labels as sorted class names."""
    if all(_is_integer(label) for label in labels):
        values = np.array([int(label) for label in labels], dtype=np.int64)
        return values, [str(c) for c in range(int(values.max()) + 1)] if len(values) else []
    names = sorted(set(labels))
    lookup = {name: position for position, name in enumerate(names)}
    return np.array([lookup[label] for label in labels], dtype=np.int64), names


def _is_integer(text: str) -> bool:
    return text.lstrip("-").isdigit()


@DATASETS.register("csv")
def csv(
    root=None,
    download: bool = False,
    path=None,
    label: str | None = None,
    test_fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
) -> DataSplits:
    """Rows of numeric features and a label column from CSV: one file (split here) or train.csv + test.csv."""
    if path is not None and not isinstance(path, str | Path):
        raise ConfigError(f"csv: data.options.path must be a file path (a string), got {path!r}")
    if label is not None and not isinstance(label, str):
        raise ConfigError(f"csv: data.options.label must be a column name (a string), got {label!r}")
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise MissingDataError("csv", f"file {file} not found", "set data.options.path to a .csv file")
        features, labels, _ = read_csv(file, label)
        values, names = encode_labels(labels)
        return holdout_splits("csv", features, values, names, float(test_fraction), int(seed))
    folder = resolve_root(root)
    files = [folder / "train.csv", folder / "test.csv"]
    if not all(file.is_file() for file in files):
        raise MissingDataError(
            "csv",
            f"dataset files not found (searched {folder}; expected train.csv, test.csv)",
            "set data.root to the folder holding them, or data.options.path to one .csv",
        )
    (train_x, train_y, column), (test_x, test_y, _) = (read_csv(file, label) for file in files)
    if train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"csv: train.csv has {train_x.shape[1]} features but test.csv has {test_x.shape[1]}")
    values, names = encode_labels(train_y + test_y)
    split = len(train_y)
    return build_splits(
        "csv",
        (train_x.astype(np.float32), values[:split]),
        (test_x.astype(np.float32), values[split:]),
        names,
    )
