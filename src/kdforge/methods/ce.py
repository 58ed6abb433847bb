"""The student alone: cross-entropy on the labels (also how teachers are trained)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step


class CrossEntropyParams(MethodParams):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@METHODS.register("ce")
class CrossEntropy(Distiller):
    """Plain supervised training: ``L = CE(z_s, y)`` (optionally label-smoothed). No teacher."""

    name = "ce"
    Params = CrossEntropyParams
    teachers_required = (0, 0)

    def forward(self, batch: Batch, step: Step) -> Output:
        logits = self.student(batch.image)
        loss = F.cross_entropy(logits, batch.targets, label_smoothing=self.params.label_smoothing)
        return Output(logits, {"ce": loss})
