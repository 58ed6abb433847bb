"""Loss functions shared by several methods."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLReduction = Literal["batchmean", "elementmean", "none"]


def soft_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float,
    reduction: KLReduction = "batchmean",
    scale_by_t2: bool = True,
) -> torch.Tensor:
    """``T^2 * KL(target || softmax(student / T))``.

    ``target_probs`` are already softened probabilities. ``batchmean`` sums over classes and
    averages over samples (Hinton / RepDistiller); ``elementmean`` averages over samples *and*
    classes, as ``nn.KLDivLoss()``'s default does in the ARD and TAKD reference code (the KD weight
    is then effectively divided by the number of classes); ``none`` returns one value per sample.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    # xlogy gives 0 * log 0 = 0 for targets that are exactly zero
    per_sample = (torch.xlogy(target_probs, target_probs) - target_probs * log_student).sum(-1)
    scale = temperature**2 if scale_by_t2 else 1.0
    if reduction == "none":
        return per_sample * scale
    if reduction == "batchmean":
        return per_sample.mean() * scale
    return per_sample.mean() / student_logits.shape[-1] * scale


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: KLReduction = "batchmean",
) -> torch.Tensor:
    """Hinton's soft-target term ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))``."""
    return soft_kl(student_logits, F.softmax(teacher_logits / temperature, dim=-1), temperature, reduction)


def class_last(logits: torch.Tensor) -> torch.Tensor:
    """Logits with one row per prediction: B x K stays, dense B x K x <spatial> (segmentation) becomes
    (B * locations) x K, so the soft-target losses above (which work along the last axis) give a
    KL per pixel/voxel and ``batchmean`` averages it over every location of the batch."""
    if logits.dim() <= 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def location_targets(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Targets aligned with ``class_last(logits)``: B x <spatial> label maps flattened to one per row."""
    return targets if logits.dim() <= 2 else targets.reshape(-1)


def foreground_weights(
    teacher_classes: torch.Tensor,
    label_rows: torch.Tensor,
    background_weight: float,
    labelled_rows: torch.Tensor | None = None,
    background: int = 0,
) -> torch.Tensor:
    """Per-location weights for a dense KD term: 1 where the teacher's argmax class or the label is
    not ``background`` (labels count only where ``labelled_rows`` is True), ``background_weight``
    elsewhere. Inputs are one value per row of ``class_last(logits)``."""
    label_foreground = label_rows != background
    if labelled_rows is not None:
        label_foreground = label_foreground & labelled_rows
    foreground = (teacher_classes != background) | label_foreground
    return torch.where(foreground, 1.0, float(background_weight))


def weighted_location_mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``per_row`` averaged over rows: the plain mean, or ``sum(w * x) / sum(w)`` with ``weights``."""
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp_min(1e-12)


def check_dice_weight(method: str, dice_weight: float, task_name: str) -> None:
    """A one-line ValueError when a Dice term is asked of a task without label maps."""
    if dice_weight and task_name != "segmentation":
        raise ValueError(f"method '{method}': dice_weight applies to segmentation only, not {task_name}; remove it")
