"""Segmentation: a class per pixel (2-D) or voxel (3-D); dice, IoU and pixel accuracy.

Targets are int64 N x H x W (or N x D x H x W); the network outputs logits N x K x H x W (or
N x K x D x H x W). Class 0 is the background. The supervised loss is the per-location
cross-entropy averaged over locations (locations whose target is ``ignore_index`` are skipped),
optionally plus ``dice_weight`` times a soft Dice loss on the foreground classes (the combination
used for medical volumes, e.g. the nnU-Net and V-Net line of work).

Metrics come from one K x K confusion matrix (rows: target, columns: prediction), summed over
batches and, when a split is sharded, over ranks. For class c with TP, FP, FN counts::

    dice_c = 2 TP / (2 TP + FP + FN)        iou_c = TP / (TP + FP + FN)

A class absent from both the targets and the predictions of the whole split has no score and is
left out of the means. ``dice`` is the mean dice over the foreground classes 1..K-1 (the number
medical segmentation papers report as DSC), ``miou`` the mean IoU over all K classes (background
included, as in PASCAL VOC), ``pixel_acc`` the fraction of locations labelled correctly; all three
in %. Per-class values are ``dice_c<k>`` and ``iou_c<k>``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdforge.core.errors import DataError
from kdforge.data.tasks.base import TASKS, Evaluator, Reduce, Task

IGNORE_INDEX = -100


def check_prediction(prediction: torch.Tensor, targets: torch.Tensor) -> None:
    """A one-line DataError unless ``prediction`` is N x K x <spatial> for targets N x <spatial>."""
    if prediction.dim() != targets.dim() + 1 or prediction.shape[:1] + prediction.shape[2:] != targets.shape:
        raise DataError(
            f"segmentation output has shape {tuple(prediction.shape)} but targets have {tuple(targets.shape)}; "
            "the network must output N x classes x <target shape> logits (a U-Net: student.name unet2d or unet3d)"
        )


def confusion_matrix(
    prediction: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """K x K int64 counts, rows = target class, columns = predicted class (argmax over dim 1)."""
    predicted = prediction.argmax(1).reshape(-1)
    truth = targets.reshape(-1)
    keep = (truth >= 0) & (truth < num_classes) & (truth != ignore_index)
    flat = truth[keep] * num_classes + predicted[keep]
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, float]:
    """Per-class dice/IoU, their means (foreground dice, all-class IoU) and pixel accuracy, in %."""
    confusion = confusion.to(torch.float64)
    tp = confusion.diagonal()
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    present = (tp + fp + fn) > 0
    dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
    iou = torch.where(present, tp / (tp + fp + fn).clamp(min=1), torch.nan)
    result: dict[str, float] = {}
    foreground = dice[1:][present[1:]]
    result["dice"] = 100.0 * float(foreground.mean()) if foreground.numel() else 0.0
    result["miou"] = 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0
    total = float(confusion.sum())
    result["pixel_acc"] = 100.0 * float(tp.sum()) / total if total else 0.0
    for k in range(len(tp)):
        if bool(present[k]):
            result[f"dice_c{k}"] = 100.0 * float(dice[k])
            result[f"iou_c{k}"] = 100.0 * float(iou[k])
    return result


def soft_dice_loss(prediction: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``1 - mean_c 2 sum(p_c g_c) / (sum p_c + sum g_c)`` over the foreground classes present in the
    batch's targets or predictions, from softmax probabilities (smoothing 1 in both terms)."""
    num_classes = prediction.shape[1]
    probs = F.softmax(prediction.float(), dim=1)
    valid = targets != ignore_index
    onehot = F.one_hot(targets.clamp(0, num_classes - 1), num_classes).movedim(-1, 1).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    probs, onehot = probs * mask, onehot * mask
    dims = (0, *range(2, prediction.dim()))
    intersection = (probs * onehot).sum(dims)
    sizes = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + 1.0) / (sizes + 1.0)
    return 1.0 - dice[1:].mean() if num_classes > 1 else 1.0 - dice.mean()


class SegmentationEvaluator(Evaluator):
    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index
        self.confusion: torch.Tensor | None = None
        self.loss = torch.zeros(2, dtype=torch.float64)  # CE sum over locations, locations

    def update(self, prediction: torch.Tensor, targets: torch.Tensor) -> None:
        check_prediction(prediction, targets)
        logits = prediction.float()
        counts = confusion_matrix(logits, targets, logits.shape[1], self.ignore_index)
        self.confusion = counts if self.confusion is None else self.confusion + counts
        valid = int(((targets != self.ignore_index) & (targets >= 0)).sum())
        ce = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")
        self.loss += torch.tensor([float(ce), float(valid)], dtype=torch.float64)

    def finish(self, reduce: Reduce | None = None) -> dict[str, float]:
        if self.confusion is None:
            return {"dice": 0.0, "miou": 0.0, "pixel_acc": 0.0, "loss": 0.0}
        classes = self.confusion.shape[0]
        packed = torch.cat([self.confusion.to(torch.float64).reshape(-1), self.loss])
        if reduce is not None:
            packed = reduce(packed)
        confusion = packed[: classes * classes].reshape(classes, classes)
        result = scores_from_confusion(confusion)
        result["loss"] = float(packed[-2]) / max(float(packed[-1]), 1.0)
        return result


@TASKS.register("segmentation")
class Segmentation(Task):
    """Per-pixel (per-voxel) class indices 0..K-1, 0 = background; the network outputs K logits per location."""

    name = "segmentation"
    primary = "dice"
    higher_is_better = True
    loss_name = "ce"

    def supervised_loss(self, prediction: torch.Tensor, targets: torch.Tensor, **options: Any) -> torch.Tensor:
        """Per-location CE (mean over non-ignored locations) + ``dice_weight`` x soft Dice.

        Options: ``ignore_index`` (default -100: every location counts), ``dice_weight`` (default 0).
        """
        check_prediction(prediction, targets)
        ignore_index = int(options.get("ignore_index", IGNORE_INDEX))
        loss = F.cross_entropy(prediction, targets, ignore_index=ignore_index)
        dice_weight = float(options.get("dice_weight", 0.0))
        if dice_weight:
            loss = loss + dice_weight * soft_dice_loss(prediction, targets, ignore_index)
        return loss

    def evaluator(self) -> Evaluator:
        return SegmentationEvaluator()

    def describe(self, metrics: dict[str, float]) -> str:
        if "dice" not in metrics:
            return ""
        return f"dice {metrics['dice']:.2f}% mIoU {metrics.get('miou', 0.0):.2f}%"

    def check_targets(self, targets: torch.Tensor, count: int, where: str) -> None:
        if targets.dtype != torch.int64 or targets.dim() not in (3, 4) or targets.shape[0] != count:
            raise DataError(
                f"{where}: segmentation targets must be int64 class maps N x H x W (or N x D x H x W) with "
                f"N = {count}, got {targets.dtype} {tuple(targets.shape)}"
            )
