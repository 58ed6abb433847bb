"""The in-memory containers every dataset source returns: images, labels and what describes them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdforge.core.errors import DataError


@dataclass
class TensorData:
    """One split held in memory.

    ``images`` is a uint8 tensor N x C x H x W, ``labels`` an int64 tensor N. ``indices`` (int64 N)
    records where every sample sits in the *source* split it was carved from (the official train
    or test set), so a subset can be traced back; it defaults to ``0..N-1``. The loader does not use
    it for identity: ``Batch.index`` is the position in this TensorData (see ``BatchLoader``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str | None = None
    indices: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self._label()}: images must be a uint8 tensor N x C x H x W, "
                f"got {self.images.dtype} with shape {tuple(self.images.shape)}"
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

    def _label(self) -> str:
        return self.name or "dataset split"

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
        )

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Samples per class (int64, length ``num_classes`` or ``max label + 1``)."""
        length = num_classes if num_classes is not None else int(self.labels.max()) + 1
        return torch.bincount(self.labels, minlength=length)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the augmentation need to know about a dataset.

    ``mean``/``std`` are per-channel statistics of pixel values scaled to [0, 1].
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]


@dataclass
class DataSplits:
    """The splits of one dataset: ``val`` is None unless a validation fraction was requested."""

    train: TensorData
    val: TensorData | None
    test: TensorData
    info: DatasetInfo

    def summary(self) -> str:
        """One line: name, split sizes, classes and image shape."""
        val = f", val {len(self.val)}" if self.val is not None else ""
        height, width = self.info.image_size
        return (
            f"{self.info.name}: train {len(self.train)}{val}, test {len(self.test)}; "
            f"{self.info.num_classes} classes, {self.info.in_channels}x{height}x{width}"
        )
