"""The Task and Evaluator contracts and their registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from kdforge.core.registry import Registry

#: task name -> Task subclass
TASKS: Registry = Registry("task", group="kdforge.tasks")

Reduce = Callable[[torch.Tensor], torch.Tensor]


class Evaluator:
    """Accumulates one split's predictions batch by batch, then reports its metrics.

    ``update`` is called with the network's output and the batch's targets (both on any device);
    ``finish`` returns ``{metric: value}``. ``reduce`` (a sum over ranks) is given when each rank
    saw its own shard of the split; evaluators that keep sums reduce them, others must not be
    sharded (their task sets ``Task.shardable = False``).
    """

    def update(self, prediction: torch.Tensor, targets: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, reduce: Reduce | None = None) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError


class Task:
    """One kind of prediction. Subclasses register with ``@TASKS.register(name)``.

    ``primary`` names the metric that selects a run's best epoch, ``higher_is_better`` its
    direction; ``loss_name`` is the name under which the supervised loss is logged ("ce", "mse").
    ``info`` is the dataset's ``DatasetInfo`` (``target_scale`` converts normalised regression
    targets back to their units for reporting).
    """

    name: ClassVar[str] = ""
    primary: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    loss_name: ClassVar[str] = "loss"
    #: whether a split may be evaluated in shards, one per rank, and the metrics summed
    shardable: ClassVar[bool] = True

    def __init__(self, info: Any = None) -> None:
        self.info = info

    def supervised_loss(self, prediction: torch.Tensor, targets: torch.Tensor, **options: Any) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def evaluator(self) -> Evaluator:
        raise NotImplementedError  # pragma: no cover - abstract

    def predict(self, model: Any, inputs: torch.Tensor) -> torch.Tensor:
        """What the evaluator scores: ``model(inputs)`` (retrieval ranks an embedding instead)."""
        return model(inputs)

    def is_better(self, new: float, old: float) -> bool:
        """Whether ``new`` beats ``old`` on the primary metric."""
        return new > old if self.higher_is_better else new < old

    def describe(self, metrics: dict[str, float]) -> str:
        """A short human-readable rendering of a split's metrics, e.g. ``top-1 93.20%``."""
        value = metrics.get(self.primary)
        return f"{self.primary} {value:.4g}" if value is not None else ""

    def check_targets(self, targets: torch.Tensor, count: int, where: str) -> None:
        """Raise a one-line DataError when a split's targets do not suit the task."""


def task_for(info: Any) -> Task:
    """The Task instance of a dataset (``info.task``, "classification" when absent)."""
    name = getattr(info, "task", None) or "classification"
    return TASKS.get(name)(info)
