"""The student alone: the task's supervised loss on the labels (cross-entropy for classification,
MSE for regression); also how teachers are trained."""

from __future__ import annotations

from pydantic import Field

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step


class CrossEntropyParams(MethodParams):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@METHODS.register("ce")
class CrossEntropy(Distiller):
    """Plain supervised training: ``L = CE(z_s, y)`` (optionally label-smoothed) for classification,
    the task's own loss otherwise (``L = MSE(f_s(x), y)`` for regression). No teacher."""

    name = "ce"
    Params = CrossEntropyParams
    teachers_required = (0, 0)
    tasks = ("classification", "regression", "retrieval")

    def use_task(self, task) -> None:
        if task.name != "classification" and getattr(self.params, "label_smoothing", 0.0):
            raise ValueError(f"method 'ce': label_smoothing applies to classification only, not {task.name}")
        super().use_task(task)

    def forward(self, batch: Batch, step: Step) -> Output:
        logits = self.student(batch.image)
        loss = self.supervised_loss(logits, batch.targets, label_smoothing=self.params.label_smoothing)
        return Output(logits, {self.task.loss_name: loss})
