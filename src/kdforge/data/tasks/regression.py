"""Regression: a float target per sample (N, or N x K for vectors); MAE, RMSE and MSE.

Targets are usually normalised for training (e.g. an angle divided by its range);
``DatasetInfo.target_scale`` multiplies MAE and RMSE back into the target's units, so a rotated
digit's error is reported in degrees. ``loss`` stays in training units (the MSE the network sees).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdforge.core.errors import DataError
from kdforge.data.tasks.base import TASKS, Evaluator, Reduce, Task


def as_prediction(prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The network's output shaped like ``targets`` (N x 1 -> N for scalar targets)."""
    prediction = prediction.float()
    if targets.dim() == 1 and prediction.dim() == 2 and prediction.shape[1] == 1:
        prediction = prediction[:, 0]
    if prediction.shape != targets.shape:
        raise DataError(
            f"regression output has shape {tuple(prediction.shape)} but targets have {tuple(targets.shape)}; "
            "build the network with as many outputs as the target has values"
        )
    return prediction


class RegressionEvaluator(Evaluator):
    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.totals = torch.zeros(4, dtype=torch.float64)  # |error| sum, error^2 sum, values, samples

    def update(self, prediction: torch.Tensor, targets: torch.Tensor) -> None:
        error = as_prediction(prediction, targets.float()) - targets.float()
        self.totals += torch.tensor(
            [float(error.abs().sum()), float(error.square().sum()), float(error.numel()), float(targets.shape[0])],
            dtype=torch.float64,
        )

    def finish(self, reduce: Reduce | None = None) -> dict[str, float]:
        totals = reduce(self.totals) if reduce is not None else self.totals
        values = max(float(totals[2]), 1.0)
        mse = float(totals[1]) / values
        return {"mae": self.scale * float(totals[0]) / values, "rmse": self.scale * mse**0.5, "loss": mse}


@TASKS.register("regression")
class Regression(Task):
    """Float targets; the network outputs one value per target component."""

    name = "regression"
    primary = "mae"
    higher_is_better = False
    loss_name = "mse"

    def supervised_loss(self, prediction: torch.Tensor, targets: torch.Tensor, **options: Any) -> torch.Tensor:
        targets = targets.float()
        return F.mse_loss(as_prediction(prediction, targets), targets)

    def evaluator(self) -> Evaluator:
        return RegressionEvaluator(float(getattr(self.info, "target_scale", 1.0) or 1.0))

    def describe(self, metrics: dict[str, float]) -> str:
        unit = getattr(self.info, "target_unit", "") or ""
        return f"MAE {metrics['mae']:.3f}{unit}" if "mae" in metrics else ""

    def check_targets(self, targets: torch.Tensor, count: int, where: str) -> None:
        if not targets.is_floating_point() or targets.dim() not in (1, 2) or targets.shape[0] != count:
            raise DataError(
                f"{where}: regression targets must be floats of shape ({count},) or ({count}, K), got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )
