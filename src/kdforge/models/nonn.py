"""The NoNN system (Bhardwaj et al., "Memory- and Communication-Aware Model Compression for
Distributed Deep Learning Inference on IoT", 2019) as one zoo model, ``nonn``.

N disjoint students, each a zoo network whose classifier is removed, so that its forward returns
its pooled feature vector (``D`` values); one linear ``head`` classifies the concatenation of the
N vectors. Each student is meant to run on its own device and only the pooled vectors travel.

A student whose vector is missing (its device failed or answered late) is *filled* before the
head: with zeros (``fill="zeros"``), or with the mean of the vectors of its neighbouring students
(``fill="neighbors"``, the averaging redundancy of Jeong, Park and Yang 2021; neighbours are the
students i-1 and i+1 in the partition's order; zeros when both are missing too).

``groups`` (the teacher filters each student mimics) and ``partition`` (how they were found and
their statistics) are kept as construction arguments so that a model file carries them; the
``nonn`` method fills them in at the start of training and ``saved_kwargs`` reports them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.models.factory import MODELS, create

FILL_MODES = ("zeros", "neighbors")


def neighbors(index: int, count: int) -> list[int]:
    """Students next to ``index`` in the partition's order."""
    return [j for j in (index - 1, index + 1) if 0 <= j < count]


def fill_missing(features: Sequence[Tensor | None], fill: str = "zeros") -> list[Tensor]:
    """Replace each ``None`` by zeros or by the mean of its present neighbours (from the
    original vectors, never from other filled ones). At least one vector must be present to know
    the shape; with none present, pass ``like`` through :func:`fill_all`."""
    if fill not in FILL_MODES:
        raise ConfigError(f"fill must be one of {', '.join(FILL_MODES)}, got {fill!r}")
    present = [f for f in features if f is not None]
    if not present:
        raise ValueError("every student is missing; nothing tells the feature shape")
    template = present[0]
    out = []
    for i, feature in enumerate(features):
        if feature is not None:
            out.append(feature)
            continue
        around = [features[j] for j in neighbors(i, len(features)) if features[j] is not None]
        if fill == "neighbors" and around:
            out.append(torch.stack(around).mean(0))  # type: ignore[arg-type]
        else:
            out.append(torch.zeros_like(template))
    return out


class NoNNSystem(nn.Module):
    """N students (pooled-feature extractors) and a linear head on their concatenated features."""

    def __init__(
        self,
        students: Sequence[nn.Module],
        feature_dim: int,
        num_classes: int,
        *,
        groups: list[list[int]] | None = None,
        fill: str = "zeros",
        partition: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if fill not in FILL_MODES:
            raise ConfigError(f"nonn: fill must be one of {', '.join(FILL_MODES)}, got {fill!r}")
        self.students = nn.ModuleList(students)
        self.student_dim = feature_dim
        self.feature_dim = feature_dim * len(students)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.groups = groups
        self.partition = partition
        self.fill = fill
        self.failed: frozenset[int] = frozenset()

    @property
    def num_students(self) -> int:
        return len(self.students)

    def set_partition(self, groups: list[list[int]], partition: dict[str, Any] | None = None) -> None:
        if len(groups) != self.num_students:
            raise ConfigError(f"a partition of {len(groups)} groups does not fit {self.num_students} students")
        self.groups = [list(map(int, g)) for g in groups]
        self.partition = partition

    @property
    def saved_kwargs(self) -> dict[str, Any]:
        """Construction arguments completed after construction (the trainer writes them into the
        model file, so the file rebuilds this system with its partition)."""
        out: dict[str, Any] = {"fill": self.fill}
        if self.groups is not None:
            out["groups"] = self.groups
        if self.partition is not None:
            out["partition"] = self.partition
        return out

    def student_features(self, x: Tensor, skip: Iterable[int] = ()) -> list[Tensor | None]:
        """Each student's pooled vector (``None`` for the students in ``skip``)."""
        skip = set(skip)
        return [None if i in skip else student(x) for i, student in enumerate(self.students)]

    def combine(self, features: Sequence[Tensor | None], fill: str | None = None) -> Tensor:
        """The head's logits on the vectors, missing ones filled (zeros when all are missing)."""
        if all(f is None for f in features):
            raise ValueError("every student is missing; give at least one feature vector")
        filled = fill_missing(features, fill or self.fill)
        return self.head(torch.cat(filled, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        if len(self.failed) >= self.num_students:
            batch = x.shape[0]
            zeros = torch.zeros(batch, self.feature_dim, device=x.device, dtype=x.dtype)
            return self.head(zeros)
        return self.combine(self.student_features(x, skip=self.failed))

    @contextmanager
    def failing(self, devices: Iterable[int], fill: str | None = None) -> Iterator[NoNNSystem]:
        """Within the block, ``forward`` treats ``devices`` as failed (and fills with ``fill``)."""
        before, before_fill = self.failed, self.fill
        self.failed = frozenset(int(d) for d in devices)
        if fill is not None:
            if fill not in FILL_MODES:
                raise ConfigError(f"fill must be one of {', '.join(FILL_MODES)}, got {fill!r}")
            self.fill = fill
        try:
            yield self
        finally:
            self.failed, self.fill = before, before_fill


def make_student(
    name: str, num_classes: int, in_channels: int, input_size: tuple[int, int] | None, **kwargs: Any
) -> tuple[nn.Module, int]:
    """A zoo network with its classifier replaced by ``Identity`` and its feature size."""
    if name == "nonn":
        raise ConfigError("nonn: a student cannot itself be a NoNN system; name a zoo network")
    model = create(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)
    if not hasattr(model, "classifier") or not isinstance(getattr(model, "feature_dim", None), int):
        raise ConfigError(
            f"nonn: student '{name}' has no 'classifier' module and 'feature_dim'; "
            "use a kdforge zoo network (resnet8, wrn_16_1, lenet, ...)"
        )
    model.classifier = nn.Identity()
    return model, int(model.feature_dim)


@MODELS.register("nonn")
def nonn(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    student: str = "resnet8",
    student_kwargs: dict[str, Any] | None = None,
    num_students: int | None = None,
    groups: list[list[int]] | None = None,
    fill: str = "zeros",
    partition: dict[str, Any] | None = None,
) -> NoNNSystem:
    """NoNN system: N disjoint students (zoo `student`, classifier removed) + a linear head on their pooled features."""
    if groups is not None:
        if not isinstance(groups, list) or not all(isinstance(g, list) and g for g in groups):
            raise ConfigError("nonn: groups must be a list of non-empty lists of teacher filter indices")
        if num_students is not None and num_students != len(groups):
            raise ConfigError(f"nonn: num_students={num_students} but groups has {len(groups)} groups")
        num_students = len(groups)
    if isinstance(num_students, bool) or not isinstance(num_students, int) or num_students < 1:
        raise ConfigError(f"nonn: give num_students (a positive integer) or groups, got {num_students!r}")
    members, dims = [], set()
    for _ in range(num_students):
        model, dim = make_student(student, num_classes, in_channels, input_size, **(student_kwargs or {}))
        members.append(model)
        dims.add(dim)
    return NoNNSystem(members, dims.pop(), num_classes, groups=groups, fill=fill, partition=partition)


__all__ = ["FILL_MODES", "NoNNSystem", "fill_missing", "make_student", "neighbors", "nonn"]
