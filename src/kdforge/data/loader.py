"""``BatchLoader``: batches straight from an in-memory tensor, no worker processes; ``StreamLoader``:
the same batches read from a Dataset by a ``DataLoader`` with workers (``make_loader`` picks).

Every batch is one index gather from ``TensorData.images`` followed by one batched augmentation
call. ``Batch.index`` is the sample's position in the TensorData the loader was built on (0..N-1):
stable for the whole run, dense (a memory bank of N rows fits), and the key of the augmentation's
randomness. ``TensorData.indices[batch.index]`` maps it back to the official split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.data

from kdforge.core.errors import ConfigError, DataError
from kdforge.data.augment import Augmentation
from kdforge.data.batch import Batch
from kdforge.data.hashing import derive_seed
from kdforge.data.sampler import pk_batches
from kdforge.data.types import StreamData, TensorData

_SHUFFLE_STREAM = 3
_PK_STREAM = 31


class BatchLoader:
    """Iterates over ``data`` in batches of ``Batch(inputs={"image": float32}, targets, index)``.

    Order: a permutation seeded by (``seed``, epoch) with ``torch.Generator`` (identity when
    ``shuffle=False``), the same on every rank. With ``world_size > 1`` the order is padded by
    repeating its start until divisible by ``world_size`` (as ``DistributedSampler`` does), and
    rank r takes positions r, r + world_size, ...; ranks are disjoint apart from that padding.
    Call ``set_epoch`` before each epoch. Without an augmentation, images are only scaled to [0, 1].
    ``device`` moves each batch there (uint8 is moved, then augmented on the device).

    Paired data (``TensorData.extra_inputs``): every other input is served beside the primary one
    in ``Batch.inputs`` under its name, transformed by ``input_augmentations[name]`` (an
    ``Augmentation`` or anything with its call signature; without one, uint8 is scaled to [0, 1]
    and float kept), and ``TensorData.extras`` go to ``Batch.extras``. ``Batch.primary`` is the
    data's ``input_name``.
    """

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        augmentation: Augmentation | None = None,
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        input_augmentations: dict[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.augmentation = augmentation
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else None
        self.input_augmentations = dict(input_augmentations or {})
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds the order and the augmentation."""
        self.epoch = int(epoch)

    @property
    def samples_per_rank(self) -> int:
        return math.ceil(len(self.data) / self.world_size)

    @property
    def partial_batch_size(self) -> int:
        """Size of each epoch's smaller last batch on this rank (0 when every batch is full)."""
        return 0 if self.drop_last else self.samples_per_rank % self.batch_size

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """This rank's sample positions for the current epoch, in visiting order."""
        count = len(self.data)
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _SHUFFLE_STREAM))
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        padding = self.samples_per_rank * self.world_size - count
        if padding:
            order = torch.cat([order, order.repeat(math.ceil(padding / count))[:padding]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        order = self.epoch_order()
        for batch_number in range(len(self)):
            yield self.make_batch(order[batch_number * self.batch_size : (batch_number + 1) * self.batch_size])

    def make_batch(self, positions: torch.Tensor) -> Batch:
        """The batch of the samples at ``positions``: gathered, moved, augmented."""
        images = self.data.images[positions]
        targets = self.data.targets[positions]
        index = positions
        if self.device is not None:
            images, targets, index = (t.to(self.device, non_blocking=True) for t in (images, targets, index))
        data = self.data
        inputs = {data.input_name: self._transform(images, index)}
        for name, values in data.extra_inputs.items():
            gathered = values[positions].to(self.device, non_blocking=True) if self.device else values[positions]
            inputs[name] = self._transform(gathered, index, self.input_augmentations.get(name))
        extras = {
            name: (values[positions].to(self.device) if self.device else values[positions])
            for name, values in data.extras.items()
        }
        return Batch(inputs=inputs, targets=targets, index=index, extras=extras, primary=data.input_name)

    def _transform(self, images: torch.Tensor, index: torch.Tensor, augmentation: Any = "primary") -> torch.Tensor:
        augmentation = self.augmentation if isinstance(augmentation, str) else augmentation
        if augmentation is None:
            return images.to(torch.float32) if images.is_floating_point() else images.to(torch.float32) / 255.0
        return augmentation(images, index, self.seed, self.epoch, train=self.train)


class _Bad:
    """What a worker returns instead of a batch it could not build (the main process raises it)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _sample_tensor(value: Any, what: str, position: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise DataError(
        f"{what}: item {position} holds a {type(value).__name__} as x; return a torch.Tensor or numpy array "
        "(C x H x W for images, D for features)"
    )


def _label_value(value: Any, what: str, position: int) -> int:
    if isinstance(value, torch.Tensor | np.ndarray | np.generic) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{what}: item {position} has label {value!r}; labels must be class indices 0..K-1 (int)")
    return int(value)


def read_item(dataset: Any, position: int, what: str) -> tuple[torch.Tensor, int]:
    """``dataset[position]`` as (x tensor, int label), with a one-line error for any other shape
    (and for an exception raised by the Dataset itself)."""
    try:
        item = dataset[position]
    except Exception as error:  # the user's code: one line naming the item, not a worker traceback
        raise DataError(f"{what}: reading item {position} failed: {type(error).__name__}: {error}") from None
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DataError(f"{what}: item {position} is a {type(item).__name__}; a Dataset must return (x, y) pairs")
    return _sample_tensor(item[0], what, position), _label_value(item[1], what, position)


class _Positions(torch.utils.data.Dataset):
    """Split position -> (x, y, position), reading ``dataset[indices[position]]``."""

    def __init__(self, data: StreamData) -> None:
        self.dataset = data.dataset
        self.indices = data.indices.tolist()
        self.name = data.name or "dataset"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int] | _Bad:
        try:
            x, y = read_item(self.dataset, self.indices[position], self.name)
        except DataError as error:  # raised in the main process, as one line
            return _Bad(str(error))
        return x, y, position


def _collate(
    items: list[tuple[torch.Tensor, int, int] | _Bad],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | _Bad:
    good: list[tuple[torch.Tensor, int, int]] = []
    for item in items:
        if isinstance(item, _Bad):
            return item
        good.append(item)
    shapes = {tuple(x.shape) for x, _, _ in good}
    dtypes = {x.dtype for x, _, _ in good}
    if len(shapes) > 1 or len(dtypes) > 1:
        return _Bad(
            f"dataset: items of one batch differ in shape or type ({sorted(shapes)[:2]}, {sorted(map(str, dtypes))}); "
            "return one shape and type for every item"
        )
    inputs = torch.stack([x for x, _, _ in good])
    if inputs.dtype != torch.uint8:
        inputs = inputs.to(torch.float32)
    if inputs.dim() == 3:  # H x W items are one-channel images
        inputs = inputs.unsqueeze(1)
    targets = torch.tensor([y for _, y, _ in good], dtype=torch.int64)
    return inputs, targets, torch.tensor([p for _, _, p in good], dtype=torch.int64)


class _EpochBatches:
    """The batch sampler of a StreamLoader: the loader's current epoch order, cut into its batches."""

    def __init__(self, loader: StreamLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[int]]:
        order, size = self.loader.epoch_order(), self.loader.batch_size
        for number in range(len(self.loader)):
            yield order[number * size : (number + 1) * size].tolist()

    def __len__(self) -> int:
        return len(self.loader)


class StreamLoader(BatchLoader):
    """``BatchLoader`` over a ``StreamData``: the same order, ranks, batches and ``Batch.index``,
    but every batch is read by a ``torch.utils.data.DataLoader`` (``num_workers`` processes,
    pinned memory when the device is a GPU). uint8 items are pixels (augmented and normalised as
    in memory), anything else becomes float32 and is standardised with the dataset's mean/std.
    """

    def __init__(self, data: StreamData, batch_size: int, *, num_workers: int = 0, **options: Any) -> None:
        super().__init__(data, batch_size, **options)  # type: ignore[arg-type]
        self.stream = data
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[Batch]:
        # a DataLoader per epoch: persistent workers were measured to stall 5 s each when the loader
        # is garbage-collected (their shutdown waits for the join timeout); forking new ones is cheap
        loader = torch.utils.data.DataLoader(
            _Positions(self.stream),
            batch_sampler=_EpochBatches(self),
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device is not None and self.device.type == "cuda",
        )
        for built in loader:
            if isinstance(built, _Bad):
                raise DataError(built.message)
            inputs, targets, index = built
            if self.device is not None:
                inputs, targets, index = (t.to(self.device, non_blocking=True) for t in (inputs, targets, index))
            yield Batch(inputs={"image": self._transform(inputs, index)}, targets=targets, index=index)

    def make_batch(self, positions: torch.Tensor) -> Batch:
        built = _collate(
            [(*read_item(self.stream.dataset, int(self.stream.indices[p]), "dataset"), int(p)) for p in positions]
        )
        if isinstance(built, _Bad):
            raise DataError(built.message)
        inputs, targets, index = built
        return Batch(inputs={"image": self._transform(inputs, index)}, targets=targets, index=index)


def make_loader(
    data: TensorData | StreamData,
    batch_size: int,
    *,
    num_workers: int = 0,
    sampler: dict[str, Any] | None = None,
    **options: Any,
) -> BatchLoader:
    """The loader for ``data``: in-memory batches for a TensorData, a DataLoader for a StreamData;
    ``sampler`` ``{name: pk, p, k}`` makes P-identities x K-samples batches (``kdforge.data.sampler``)."""
    if sampler is not None:
        return pk_loader(data, batch_size, sampler, **options)
    if isinstance(data, StreamData):
        return StreamLoader(data, batch_size, num_workers=num_workers, **options)
    return BatchLoader(data, batch_size, **options)


class PKBatchLoader(BatchLoader):
    """A ``BatchLoader`` whose batches are P identities x K samples (``kdforge.data.sampler``)."""

    def __init__(self, data: TensorData, p: int, k: int, **options: Any) -> None:
        options.pop("shuffle", None)
        options.pop("drop_last", None)
        super().__init__(data, p * k, shuffle=True, drop_last=True, **options)
        self.p, self.k = p, k
        self.total_batches = len(data) // (p * k)

    def __len__(self) -> int:
        return self.total_batches // self.world_size

    @property
    def partial_batch_size(self) -> int:
        return 0

    def epoch_order(self) -> torch.Tensor:
        seed = derive_seed(self.seed, self.epoch, _PK_STREAM)
        batches = pk_batches(self.data.labels, self.p, self.k, len(self) * self.world_size, seed)
        return batches[self.rank :: self.world_size].flatten()


def pk_loader(data: Any, batch_size: int, sampler: dict[str, Any], **options: Any) -> PKBatchLoader:
    """The P x K loader for a ``data.sampler`` mapping (``{name: pk, p, k}``), checked."""
    if not isinstance(data, TensorData):
        raise ConfigError(
            "data.sampler 'pk' needs an in-memory dataset; a streamed (custom) Dataset has no labels index"
        )
    k = sampler.get("k")
    p = sampler.get("p")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"data.sampler.k must be a positive whole number of samples per identity, got {k!r}")
    if p is None:
        if batch_size % k:
            raise ConfigError(f"data.sampler.k={k} does not divide train.batch_size={batch_size}; pick k dividing it")
        p = batch_size // k
    elif p * k != batch_size:
        raise ConfigError(
            f"data.sampler p*k = {p}*{k} = {p * k} differs from train.batch_size={batch_size}; make them equal"
        )
    if p < 2:
        raise ConfigError(f"data.sampler: p={p}; a batch needs at least 2 identities (negatives for every anchor)")
    identities = int(data.labels.unique().numel())
    if identities < p:
        raise ConfigError(
            f"data.sampler: p={p} identities per batch but the training split has only {identities}; "
            f"lower train.batch_size (p = batch_size / k) or raise k"
        )
    loader = PKBatchLoader(data, p, k, **options)
    if len(loader) == 0:
        raise ConfigError(
            f"data.sampler: {len(data)} training samples make no batch of p*k = {p * k} on each rank; lower p or k"
        )
    return loader
