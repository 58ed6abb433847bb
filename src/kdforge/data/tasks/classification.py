"""Classification: one class index per sample; top-1, top-5 (%) and mean cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdforge.core.errors import DataError
from kdforge.data.tasks.base import TASKS, Evaluator, Reduce, Task


class ClassificationEvaluator(Evaluator):
    def __init__(self) -> None:
        self.totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, count

    def update(self, prediction: torch.Tensor, targets: torch.Tensor) -> None:
        logits = prediction.float()
        k = min(5, logits.shape[-1])
        hits = logits.topk(k, dim=-1).indices == targets.unsqueeze(1)
        self.totals += torch.tensor(
            [
                float(F.cross_entropy(logits, targets, reduction="sum")),
                float(hits[:, 0].sum()),
                float(hits.any(1).sum()),
                float(targets.shape[0]),
            ],
            dtype=torch.float64,
        )

    def finish(self, reduce: Reduce | None = None) -> dict[str, float]:
        totals = reduce(self.totals) if reduce is not None else self.totals
        count = max(float(totals[3]), 1.0)
        return {
            "top1": 100.0 * float(totals[1]) / count,
            "top5": 100.0 * float(totals[2]) / count,
            "loss": float(totals[0]) / count,
        }


@TASKS.register("classification")
class Classification(Task):
    """Class indices 0..K-1; the network outputs K logits."""

    name = "classification"
    primary = "top1"
    higher_is_better = True
    loss_name = "ce"

    def supervised_loss(self, prediction: torch.Tensor, targets: torch.Tensor, **options: Any) -> torch.Tensor:
        return F.cross_entropy(prediction, targets, label_smoothing=float(options.get("label_smoothing", 0.0)))

    def evaluator(self) -> Evaluator:
        return ClassificationEvaluator()

    def describe(self, metrics: dict[str, float]) -> str:
        return f"top-1 {metrics['top1']:.2f}%" if "top1" in metrics else ""

    def check_targets(self, targets: torch.Tensor, count: int, where: str) -> None:
        if targets.dtype != torch.int64 or targets.shape != (count,):
            raise DataError(
                f"{where}: classification targets must be int64 class indices of shape ({count},), got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )
