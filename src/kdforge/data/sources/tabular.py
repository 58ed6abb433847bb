"""Tabular data: scikit-learn's bundled sets (no download) and CSV files.

Every sample is a row of D numbers, kept as float32 (never 8-bit), standardised with per-feature
mean and std fitted on the training split, and never augmented; models see a B x D batch (the
``mlp`` takes it as D features).

Bundled sets (scikit-learn ships the files; they load offline): ``wine`` (178 samples, 13
features, 3 classes), ``breast_cancer`` (569 samples, 30 features, 2 classes) and ``iris`` (150
samples, 4 features, 3 classes). Their test split is fixed: a quarter of the samples, class-
stratified with seed 0; ``TensorData.indices`` are positions in scikit-learn's array. One bundled
*regression* set: ``diabetes`` (442 patients, 10 standardised features, target: a quantitative
measure of disease progression one year after baseline, 25..346; Efron et al., "Least Angle
Regression", Annals of Statistics 2004), its test quarter stratified by target decile.

``csv``: one header row, then one sample per row. ``label`` names the label column (default: the
last one); every other column must hold numbers. Labels may be integers (class indices) or text
(classes are the sorted distinct names). ``path`` is one file, split into train and test
(``test_fraction``, default 0.25, class-stratified and seeded); or ``data.root`` is a folder with
``train.csv`` and ``test.csv``.

Regression from CSV: ``task: regression`` reads the ``label`` column(s) as float targets;
``label`` may then be a list of columns (a vector target, N x K). ``target_scale`` ("auto": the
training targets' root mean square, or a number) and ``target_unit`` say how targets are
normalised for training and in which unit errors are reported (``kdforge.data.sources.targets``).
"""

from __future__ import annotations

import csv as csv_module
from pathlib import Path

import numpy as np
import torch

from kdforge.core.errors import ConfigError, DataError
from kdforge.data.catalog import DATASETS
from kdforge.data.sources.common import MissingDataError, build_splits, resolve_root
from kdforge.data.sources.targets import check_task, float_targets, regression_splits, strata
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


def regression_holdout(
    name: str,
    features: np.ndarray,
    targets: np.ndarray,
    target_names: list[str] | None,
    fraction: float,
    seed: int,
    scale: object = "auto",
    unit: str = "",
) -> DataSplits:
    """Train/test DataSplits of one regression table: ``fraction`` held out, stratified by target decile."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"{name}: test_fraction must be in (0, 1), got {fraction}")
    values = float_targets(targets, f"{name} targets")
    groups = torch.as_tensor(strata(values, values))
    train, test = stratified_holdout(groups, max(1, round(fraction * len(values))), seed)
    rows = features.astype(np.float32)
    return regression_splits(
        name,
        (rows[train.numpy()], values[train.numpy()]),
        (rows[test.numpy()], values[test.numpy()]),
        target_names,
        scale,
        unit,
        source_indices=(train, test),
    )


@DATASETS.register("diabetes")
def diabetes(root=None, download: bool = False) -> DataSplits:
    """scikit-learn's diabetes table (regression): 442 samples, 10 features, disease progression (bundled)."""
    import sklearn.datasets

    bunch = sklearn.datasets.load_diabetes()
    return regression_holdout("diabetes", bunch.data, bunch.target, ["progression"], TEST_FRACTION, SPLIT_SEED)


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
    features, labels, columns = read_table(path, [label] if label is not None else None)
    return features, [row[0] for row in labels], columns[0]


def read_table(path: Path, label: list[str] | None) -> tuple[np.ndarray, list[list[str]], list[str]]:
    """(float64 features N x D, raw strings of the label columns per row, label column names) of one
    CSV file; ``label`` None means the last column."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv_module.reader(handle))
    except (OSError, UnicodeDecodeError, csv_module.Error) as error:
        raise DataError(f"csv: cannot read {path} ({type(error).__name__}: {error})") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise DataError(f"csv: {path} needs a header row and at least one data row")
    header = [cell.strip() for cell in rows[0]]
    columns = label if label is not None else [header[-1]]
    for column in columns:
        if column not in header:
            raise ConfigError(
                f"csv: {path} has no column '{column}' (columns: {', '.join(header)}); set data.options.label"
            )
    targets = [header.index(column) for column in columns]
    if len(header) <= len(set(targets)):
        raise DataError(f"csv: {path} has only the label column; it needs at least one feature column")
    features = np.empty((len(rows) - 1, len(header) - len(set(targets))), dtype=np.float64)
    labels = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"csv: {path} line {line} has {len(row)} fields but the header has {len(header)}")
        cells = [cell for position, cell in enumerate(row) if position not in targets]
        try:
            features[line - 2] = [float(cell) for cell in cells]
        except ValueError:
            bad = next(cell for cell in cells if not _is_number(cell))
            raise DataError(
                f"csv: {path} line {line} holds '{bad}' in a feature column; features must be numbers "
                "(encode text columns as numbers)"
            ) from None
        labels.append([row[target].strip() for target in targets])
    if not np.isfinite(features).all():
        raise DataError(f"csv: {path} holds NaN or infinite feature values; clean them first")
    return features, labels, columns


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
    label: str | list[str] | None = None,
    test_fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
    task: str = "classification",
    target_scale: float | str = "auto",
    target_unit: str = "",
) -> DataSplits:
    """Rows of numeric features and a label column from CSV: one file (split here) or train.csv + test.csv."""
    if path is not None and not isinstance(path, str | Path):
        raise ConfigError(f"csv: data.options.path must be a file path (a string), got {path!r}")
    if check_task("csv", task) == "regression":
        return _csv_regression(root, path, label, float(test_fraction), int(seed), target_scale, target_unit)
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


def _csv_regression(root, path, label, test_fraction: float, seed: int, scale: object, unit: str) -> DataSplits:
    """``csv`` with ``task: regression``: the label column(s) are float targets."""
    columns = [label] if isinstance(label, str) else label
    if columns is not None and (
        not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns)
    ):
        raise ConfigError(f"csv: data.options.label must be a column name or a list of them, got {label!r}")

    def targets(file: Path, text: list[list[str]]) -> np.ndarray:
        try:
            values = np.array([[float(cell) for cell in row] for row in text], dtype=np.float64)
        except ValueError:
            raise DataError(
                f"csv: {file} holds a non-number in a target column; regression targets are numbers"
            ) from None
        return values[:, 0] if values.shape[1] == 1 and (columns is None or isinstance(label, str)) else values

    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise MissingDataError("csv", f"file {file} not found", "set data.options.path to a .csv file")
        features, text, names = read_table(file, columns)
        return regression_holdout("csv", features, targets(file, text), names, test_fraction, seed, scale, unit)
    folder = resolve_root(root)
    files = [folder / "train.csv", folder / "test.csv"]
    if not all(file.is_file() for file in files):
        raise MissingDataError(
            "csv",
            f"dataset files not found (searched {folder}; expected train.csv, test.csv)",
            "set data.root to the folder holding them, or data.options.path to one .csv",
        )
    (train_x, train_t, names), (test_x, test_t, _) = (read_table(file, columns) for file in files)
    if train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"csv: train.csv has {train_x.shape[1]} features but test.csv has {test_x.shape[1]}")
    return regression_splits(
        "csv",
        (train_x.astype(np.float32), targets(files[0], train_t)),
        (test_x.astype(np.float32), targets(files[1], test_t)),
        names,
        scale,
        unit,
    )
