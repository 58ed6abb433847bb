"""Any map-style ``torch.utils.data.Dataset`` as a kdforge dataset, named by an import spec.

``data.name`` is ``"package.module:function"`` or ``"path/to/file.py:function"`` (a file is tried
against the working directory, then against the recipe's folder). The contract:

* ``function(split="train", **options)`` and ``function(split="test", **options)`` each return a
  map-style Dataset (``__len__`` and ``__getitem__``) whose items are ``(x, y)``: ``x`` a tensor or
  numpy array (``C x H x W`` images, ``H x W`` one-channel images, or ``D`` features), ``y`` a class
  index ``0..K-1``. A function without a ``split`` parameter is called once, ``function(**options)``,
  and returns a dict ``{"train": ..., "test": ...}`` (optionally ``"val"``).
* ``options`` are ``data.options`` without kdforge's own keys (below); a function that takes
  ``root`` also gets ``data.root``.
* kdforge's keys in ``data.options``: ``num_classes`` and ``class_names`` (default: the
  Dataset's ``classes`` attribute, else the largest label + 1), ``mean`` and ``std`` (one value per
  channel, or per feature; default: none, i.e. uint8 items are scaled to [0, 1] and float items
  are used as they are), ``input_shape`` (checked against the first item).
* Labels come from the Dataset's ``targets`` (or ``labels``) attribute when it has one, else every
  item is read once (with ``data.num_workers`` workers) when the dataset is loaded.

Items are read on demand by a ``DataLoader`` (``kdforge.data.loader.StreamLoader``): nothing is
held in memory. uint8 items are pixels (the recipe's crop/flip augmentation applies to them);
anything else is float32.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from kdforge.core.errors import ConfigError, DataError
from kdforge.core.plugins import import_user_module
from kdforge.data.loader import read_item
from kdforge.data.sources.common import info_for
from kdforge.data.types import DataSplits, StreamData

KDFORGE_OPTIONS = ("num_classes", "class_names", "mean", "std", "input_shape")
SPLITS = ("train", "test")


def is_import_spec(name: str) -> bool:
    """True for ``module:callable`` / ``file.py:callable`` names (not for registered datasets)."""
    if not isinstance(name, str) or ":" not in name:
        return False
    target, _, attribute = name.rpartition(":")
    return bool(target.strip()) and attribute.replace(".", "_").isidentifier()


def resolve_callable(spec: str, base: str | Path | None = None) -> Callable[..., Any]:
    """The object ``spec`` names (``module:attr`` or ``file.py:attr``), which must be callable."""
    target, _, attribute = spec.rpartition(":")
    try:
        module = import_user_module(target, base)
    except ConfigError as error:
        raise ConfigError(f"data.name '{spec}': {str(error).removeprefix('imports: ')}") from None
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            public = [name for name in dir(module) if not name.startswith("_")]
            raise ConfigError(
                f"data.name '{spec}': {target} has no '{attribute}' (it defines {', '.join(public[:12]) or 'nothing'})"
            )
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError(f"data.name '{spec}': '{attribute}' is a {type(found).__name__}, not a callable")
    return found


def _call(spec: str, function: Callable[..., Any], **arguments: Any) -> Any:
    try:
        return function(**arguments)
    except (ConfigError, DataError):
        raise
    except TypeError as error:
        raise ConfigError(
            f"data.name '{spec}' cannot be called with {', '.join(sorted(arguments)) or 'no arguments'}: {error}; "
            "match data.options to its parameters"
        ) from None
    except Exception as error:  # the user's code: one line, not its traceback
        raise DataError(f"data.name '{spec}' failed: {type(error).__name__}: {error}") from None


def _accepts(function: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _datasets(spec: str, function: Callable[..., Any], options: dict[str, Any], root: Any) -> dict[str, Any]:
    arguments = dict(options)
    if root is not None and _accepts(function, "root"):
        arguments["root"] = str(root)
    try:
        takes_split = "split" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        takes_split = False
    if takes_split:
        return {split: _call(spec, function, split=split, **arguments) for split in SPLITS}
    result = _call(spec, function, **arguments)
    if not isinstance(result, dict) or not all(split in result for split in SPLITS):
        raise DataError(
            f"data.name '{spec}' returned a {type(result).__name__}; a function without a 'split' parameter must "
            "return {'train': Dataset, 'test': Dataset} (optionally 'val'), or take split='train'|'test'"
        )
    unknown = [key for key in result if key not in (*SPLITS, "val")]
    if unknown:
        raise DataError(f"data.name '{spec}' returned split '{unknown[0]}'; the splits are train, test and val")
    return result


def _check_dataset(spec: str, split: str, dataset: Any) -> None:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise DataError(
            f"data.name '{spec}': the {split} split is an IterableDataset; return a map-style Dataset "
            "(__len__ and __getitem__) so samples can be shuffled, subset and indexed"
        )
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataError(
            f"data.name '{spec}': the {split} split is a {type(dataset).__name__}; return a map-style "
            "torch.utils.data.Dataset (__len__ and __getitem__) of (x, y) items"
        )
    if len(dataset) == 0:
        raise DataError(f"data.name '{spec}': the {split} split is empty")


class _LabelReader(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, what: str) -> None:
        self.dataset, self.what = dataset, what

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> int | str:
        try:
            return read_item(self.dataset, position, self.what)[1]
        except DataError as error:  # raised in the main process, as one line
            return str(error)


def dataset_labels(dataset: Any, what: str, num_workers: int = 0) -> torch.Tensor:
    """Every item's label: the ``targets``/``labels`` attribute when present, else one read pass."""
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is None or callable(values):
            continue
        array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
        if array.ndim != 1 or len(array) != len(dataset) or not np.issubdtype(array.dtype, np.integer):
            raise DataError(
                f"{what}: its '{attribute}' attribute must hold one class index (int) per item, got "
                f"{array.dtype} {array.shape} for {len(dataset)} items"
            )
        return torch.as_tensor(array, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(
        _LabelReader(dataset, what), batch_size=256, num_workers=num_workers, collate_fn=list
    )
    labels = []
    for batch in loader:
        for label in batch:
            if isinstance(label, str):
                raise DataError(label)
            labels.append(label)
    return torch.tensor(labels, dtype=torch.int64)


def _numbers(spec: str, key: str, value: Any, count: int) -> tuple[float, ...]:
    values = [value] if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(f"data.options.{key} for '{spec}' must be a number or a list of numbers, got {value!r}")
    if len(values) not in (1, count):
        raise ConfigError(f"data.options.{key} for '{spec}' has {len(values)} values; give 1 or {count}")
    if key == "std" and min(values) <= 0:
        raise ConfigError(f"data.options.std for '{spec}' must be positive, got {value!r}")
    return tuple(float(v) for v in values) * (count if len(values) == 1 else 1)


def _class_names(spec: str, own: dict[str, Any], dataset: Any, labels: list[torch.Tensor]) -> list[str]:
    if "class_names" in own:
        names = own["class_names"]
        if not isinstance(names, list) or not names:
            raise ConfigError(f"data.options.class_names for '{spec}' must be a list of names, got {names!r}")
        return [str(name) for name in names]
    if "num_classes" in own:
        count = own["num_classes"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ConfigError(f"data.options.num_classes for '{spec}' must be an integer >= 2, got {count!r}")
        return [str(label) for label in range(count)]
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, list | tuple) and classes:
        return [str(name) for name in classes]
    highest = max(int(split.max()) for split in labels)
    return [str(label) for label in range(highest + 1)]


def load_custom(
    spec: str, options: dict[str, Any], root: Any = None, num_workers: int = 0, base: str | Path | None = None
) -> DataSplits:
    """The DataSplits of the Dataset(s) that ``spec`` builds (see the module docstring)."""
    function = resolve_callable(spec, base)
    own = {key: options[key] for key in KDFORGE_OPTIONS if key in options}
    passed = {key: value for key, value in options.items() if key not in KDFORGE_OPTIONS}
    datasets = _datasets(spec, function, passed, root)
    for split, dataset in datasets.items():
        _check_dataset(spec, split, dataset)
    labels = {split: dataset_labels(dataset, f"{spec} {split}", num_workers) for split, dataset in datasets.items()}
    for split, values in labels.items():
        if int(values.min()) < 0:
            raise DataError(f"{spec}: {split} labels must be class indices >= 0, found {int(values.min())}")
    class_names = _class_names(spec, own, datasets["train"], list(labels.values()))
    for split, values in labels.items():
        if int(values.max()) >= len(class_names):
            raise DataError(
                f"{spec}: {split} labels reach {int(values.max())} but there are {len(class_names)} classes; "
                "set data.options.num_classes (or class_names) to cover every label"
            )
    first, _ = read_item(datasets["train"], 0, f"{spec} train")
    shapes = {split: tuple(read_item(dataset, 0, f"{spec} {split}")[0].shape) for split, dataset in datasets.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{spec}: the splits' items differ in shape ({shapes}); every split must share one shape")
    shape = tuple(first.shape)
    if "input_shape" in own and tuple(own["input_shape"]) != shape:
        raise ConfigError(f"data.options.input_shape for '{spec}' is {tuple(own['input_shape'])} but items are {shape}")
    channels = shape[0] if len(shape) in (1, 3) else 1
    mean = _numbers(spec, "mean", own.get("mean", 0.0), channels)
    std = _numbers(spec, "std", own.get("std", 1.0), channels)
    info = info_for(spec, shape, class_names, mean, std, kind="stream")
    streams = {split: StreamData(dataset, labels[split], name=f"{spec}/{split}") for split, dataset in datasets.items()}
    return DataSplits(train=streams["train"], val=streams.get("val"), test=streams["test"], info=info)
