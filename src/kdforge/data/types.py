"""The containers every dataset source returns: samples, labels and what describes them.

``TensorData`` holds a split in memory: uint8 images, or float32 features (tabular rows N x D, or
float images) that are never rounded to 8 bits. ``StreamData`` wraps a map-style
``torch.utils.data.Dataset`` whose items are read on demand (through a ``DataLoader`` with
workers), for data that does not fit in memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from kdforge.core.errors import DataError


@dataclass
class TensorData:
    """One split held in memory.

    ``images`` is a uint8 tensor N x C x H x W (pixels), or a float32 tensor N x D (tabular
    features) or N x C x H x W (float images); ``labels`` an int64 tensor N (the class, or for
    other tasks the group that stratified splits and balanced subsets keep in proportion).
    ``targets`` is what the network is trained to predict, any tensor whose first dimension is N
    (float values for regression, per-pixel labels for segmentation); it defaults to ``labels``.
    ``indices`` (int64 N)
    records where every sample sits in the *source* split it was carved from (the official train
    or test set), so a subset can be traced back; it defaults to ``0..N-1``. The loader does not use
    it for identity: ``Batch.index`` is the position in this TensorData (see ``BatchLoader``).

    Paired multimodal data: ``images`` is the *primary* input, served under the name
    ``input_name`` (``Batch.image``); ``extra_inputs`` holds the other inputs of the same samples by
    name (first dim N each; uint8 images or float32 tensors), served beside it in ``Batch.inputs``;
    ``extras`` holds per-sample tensors for the method, served in ``Batch.extras`` (e.g.
    ``"labelled"``, a bool mask of the samples whose label may be used). ``view(name)`` makes
    another input the primary one. All of them are kept through ``select``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str | None = None
    indices: torch.Tensor = field(default=None)  # type: ignore[assignment]
    targets: torch.Tensor = field(default=None)  # type: ignore[assignment]
    extra_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    input_name: str = "image"

    def __post_init__(self) -> None:
        pixels = self.images.dtype == torch.uint8 and self.images.dim() in (4, 5)  # 5: volumes N x C x D x H x W
        features = self.images.dtype == torch.float32 and self.images.dim() in (2, 4)
        if not (pixels or features):
            raise DataError(
                f"{self._label()}: samples must be uint8 images N x C x H x W (volumes N x C x D x H x W) or "
                f"float32 features N x D / N x C x H x W, got {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self._label()}: {self.images.shape[0]} images but labels have shape {tuple(self.labels.shape)}"
            )
        if self.indices is None:
            self.indices = torch.arange(len(self.labels), dtype=torch.int64)
        self.indices = torch.as_tensor(self.indices, dtype=torch.int64)
        if self.indices.shape != self.labels.shape:
            raise DataError(f"{self._label()}: indices and labels differ in length")
        for key, value in {**self.extra_inputs, **self.extras}.items():
            if value.shape[:1] != self.labels.shape:
                raise DataError(f"{self._label()}: '{key}' has {value.shape[0]} rows for {len(self.labels)} samples")
        if self.targets is None:
            self.targets = self.labels
        elif self.targets.shape[:1] != self.labels.shape:
            raise DataError(
                f"{self._label()}: {len(self.labels)} samples but targets have shape {tuple(self.targets.shape)}"
            )

    @property
    def input_names(self) -> list[str]:
        """Every input a sample carries: the primary one first."""
        return [self.input_name, *self.extra_inputs]

    def view(self, name: str) -> TensorData:
        """The same samples with input ``name`` as the primary one (``images``)."""
        if name == self.input_name:
            return self
        if name not in self.extra_inputs:
            raise DataError(f"{self._label()} has no input '{name}'; inputs: {', '.join(self.input_names)}")
        others = {self.input_name: self.images, **{k: v for k, v in self.extra_inputs.items() if k != name}}
        return dataclasses.replace(self, images=self.extra_inputs[name], extra_inputs=others, input_name=name)

    def _label(self) -> str:
        return self.name or "dataset split"

    @property
    def is_float(self) -> bool:
        """True for float32 features (standardised, never scaled by 1/255)."""
        return self.images.dtype == torch.float32

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, positions: torch.Tensor, name: str | None = None) -> TensorData:
        """The samples at ``positions`` (in that order), keeping their source indices."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        return TensorData(
            images=self.images[positions],
            labels=self.labels[positions],
            name=name or self.name,
            indices=self.indices[positions],
            targets=None if self.targets is self.labels else self.targets[positions],  # type: ignore[arg-type]
            extra_inputs={key: value[positions] for key, value in self.extra_inputs.items()},
            extras={key: value[positions] for key, value in self.extras.items()},
            input_name=self.input_name,
        )

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Samples per class (int64, length ``num_classes`` or ``max label + 1``)."""
        length = num_classes if num_classes is not None else int(self.labels.max()) + 1
        return torch.bincount(self.labels, minlength=length)

    @property
    def nbytes(self) -> int:
        """Bytes held by every tensor of the split (samples, labels, targets, indices, paired inputs)."""
        unique: dict[int, torch.Tensor] = {}  # targets are often the labels themselves
        for value in _tensors(self).values():
            for tensor in value.values() if isinstance(value, dict) else [value]:
                unique[id(tensor)] = tensor
        return sum(t.numel() * t.element_size() for t in unique.values())

    def to(self, device: torch.device | str) -> TensorData:
        """The same split with every tensor on ``device`` (a loader then gathers batches there)."""
        moved: dict[str, Any] = {}
        for key, value in _tensors(self).items():
            moved[key] = (
                value.to(device) if isinstance(value, torch.Tensor) else {k: t.to(device) for k, t in value.items()}
            )
        if self.targets is self.labels:
            moved["targets"] = None
        return dataclasses.replace(self, **moved)


def _tensors(data: TensorData) -> dict[str, Any]:
    """The fields of ``data`` that hold tensors, or dicts of tensors (paired inputs)."""
    found: dict[str, Any] = {}
    for item in dataclasses.fields(data):
        value = getattr(data, item.name)
        if isinstance(value, torch.Tensor) or (
            isinstance(value, dict) and value and all(isinstance(t, torch.Tensor) for t in value.values())
        ):
            found[item.name] = value
    return found


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the augmentation need to know about a dataset.

    ``mean``/``std`` are per-channel statistics of pixel values scaled to [0, 1] (uint8 images),
    or, for float data, per-channel (per-feature for tabular rows) statistics of the raw values.
    ``input_shape`` is one sample's shape as the loader serves it ((D,) for tabular rows, (C, H, W)
    for images); models are built with ``in_channels`` and ``image_size``, which for D features are
    D and (1, 1). ``kind`` is "image" (uint8 pixels), "float" (float32 features in memory) or
    "stream" (items read from a Dataset). ``fit_stats`` marks statistics fitted on the training
    split (refitted when a validation split or subset is carved out). ``task`` names the entry of
    ``kdforge.data.tasks.TASKS`` that scores predictions ("classification", "regression", ...);
    for regression ``num_classes`` is the number of predicted values, ``target_scale`` converts
    normalised targets back to their units for reporting and ``target_unit`` names that unit. Paired multimodal data:
    ``input_name`` names the input this describes (the primary one), ``extra_inputs`` describes
    each other input by name (its own shape and normalisation statistics).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    input_shape: tuple[int, ...] | None = None
    kind: str = "image"
    fit_stats: bool = False
    task: str = "classification"
    target_scale: float = 1.0
    target_unit: str = ""
    input_name: str = "image"
    extra_inputs: dict[str, DatasetInfo] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        """Every input of the dataset: the primary one first."""
        return [self.input_name, *self.extra_inputs]

    def for_input(self, name: str) -> DatasetInfo:
        """The description of input ``name`` (itself for the primary one)."""
        if name == self.input_name:
            return self
        if name not in self.extra_inputs:
            raise DataError(f"dataset '{self.name}' has no input '{name}'; inputs: {', '.join(self.input_names)}")
        return self.extra_inputs[name]

    def view(self, name: str) -> DatasetInfo:
        """This dataset described with input ``name`` as the primary one."""
        if name == self.input_name:
            return self
        chosen = self.for_input(name)
        others = {self.input_name: dataclasses.replace(self, extra_inputs={})}
        others.update({k: v for k, v in self.extra_inputs.items() if k != name})
        return dataclasses.replace(chosen, input_name=name, extra_inputs=others)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape as served: ``input_shape``, else (C, H, W)."""
        return tuple(self.input_shape) if self.input_shape else (self.in_channels, *self.image_size)


@dataclass
class DataSplits:
    """The splits of one dataset: ``val`` is None unless a validation fraction was requested."""

    train: TensorData | StreamData
    val: TensorData | StreamData | None
    test: TensorData | StreamData
    info: DatasetInfo

    def view(self, name: str) -> DataSplits:
        """Every split (and the description) with input ``name`` as the primary one."""
        if name == self.info.input_name:
            return self
        splits = [self.train, self.val, self.test]
        if any(isinstance(split, StreamData) for split in splits):
            raise DataError(f"{self.info.name} is streamed from a Dataset and has only one input")
        train, val, test = (split.view(name) if split is not None else None for split in splits)  # type: ignore[union-attr]
        return DataSplits(train=train, val=val, test=test, info=self.info.view(name))  # type: ignore[arg-type]

    def summary(self) -> str:
        """One line: name, split sizes, classes and sample shape."""
        val = f", val {len(self.val)}" if self.val is not None else ""
        shape = "x".join(str(size) for size in self.info.sample_shape)
        features = " features" if len(self.info.sample_shape) == 1 else ""
        if self.info.task == "regression":
            unit = f" ({self.info.target_unit})" if self.info.target_unit else ""
            return (
                f"{self.info.name}: train {len(self.train)}{val}, test {len(self.test)}; regression of "
                f"{self.info.num_classes} value(s){unit}, {shape}{features}"
            )
        streamed = " (streamed)" if isinstance(self.train, StreamData) else ""
        return (
            f"{self.info.name}: train {len(self.train)}{val}, test {len(self.test)}; "
            f"{self.info.num_classes} classes, {shape}{features}{streamed}"
        )


@dataclass
class StreamData:
    """One split of a map-style ``torch.utils.data.Dataset``, read item by item when iterated.

    ``dataset[i]`` returns ``(x, y)``; ``labels`` (int64 N) holds every ``y`` (read once, or taken
    from the dataset's ``targets``), ``indices`` the dataset positions of this split's samples
    (a subset or validation carve selects them). ``Batch.index`` is the position in this split.
    """

    dataset: Any
    labels: torch.Tensor
    name: str | None = None
    indices: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.indices is None:
            self.indices = torch.arange(len(self.labels), dtype=torch.int64)
        self.indices = torch.as_tensor(self.indices, dtype=torch.int64)
        if self.indices.shape != self.labels.shape:
            raise DataError(f"{self.name or 'dataset split'}: indices and labels differ in length")

    is_float = False

    @property
    def images(self) -> torch.Tensor:
        raise DataError(
            f"{self.name or 'this split'} is streamed from a Dataset and is not held in memory; this step "
            "needs in-memory data (a built-in dataset, npz or csv)"
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, positions: torch.Tensor, name: str | None = None) -> StreamData:
        """The samples at ``positions`` (in that order), keeping their dataset indices."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        return StreamData(self.dataset, self.labels[positions], name or self.name, self.indices[positions])

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Samples per class (int64, length ``num_classes`` or ``max label + 1``)."""
        length = num_classes if num_classes is not None else int(self.labels.max()) + 1
        return torch.bincount(self.labels, minlength=length)
