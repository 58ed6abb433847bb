"""The record that flows from the data layer to methods: small, typed, task-agnostic."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One batch.

    ``inputs`` holds the model inputs by name (``"image"`` for classification; paired modalities
    add more names), ``targets`` the labels (class indices, or floats for regression) and
    ``index`` the dataset index of every sample (CRD memory banks and the teacher bank key on it).
    ``extras`` carries anything task-specific (masks, negative indices, a domain flag).
    ``primary`` names the input the deployed network (the student) reads, ``Batch.image``:
    ``"image"`` unless a paired dataset serves the student another input (e.g. ``"audio"``).
    """

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    index: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    primary: str = "image"

    @property
    def image(self) -> torch.Tensor:
        """The student's input (``inputs[primary]``)."""
        return self.inputs[self.primary]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            inputs={k: move(v) for k, v in self.inputs.items()},
            targets=move(self.targets),
            index=move(self.index),
            extras={k: move(v) for k, v in self.extras.items()},
            primary=self.primary,
        )
