"""Vanilla knowledge distillation (Hinton, Vinyals & Dean 2015), with schedules and selective KD.

Loss::

    L = w_ce(p) * CE(z_s, y) + w_kd(p) * T(p)^2 * KL(softmax(z_t / T(p)) || softmax(z_s / T(p)))

with the KL averaged over the batch ("batchmean"). Defaults are the CIFAR-100 benchmark's
(RepDistiller, mdistiller): T = 4, w_ce = 0.1, w_kd = 0.9, written as independent weights rather
than a convex mix. ``temperature``, ``kd_weight`` and ``ce_weight`` each accept a number or a
schedule (see ``kdforge.core.schedules``), which gives:

* dynamic temperature annealing from high to 1 (KDAS-ReID):
  ``temperature: {kind: exponential, start: 10, end: 1, by: epoch}``;
* alpha annealing (sensor-transition KD): ``kd_weight: {kind: linear, start: 0.95, end: 0.1}``
  with ``ce_weight`` following ``1 - alpha`` when ``ce_weight: complement``.

Segmentation (per-pixel / per-voxel KD): with logits B x K x H x W (x D) the same loss is taken at
every location, ``T^2 KL(softmax(z_t(v)/T) || softmax(z_s(v)/T))`` over the K classes, averaged over
all locations of the batch (``batchmean`` over B x locations rows); the supervised term is the
task's per-location cross-entropy, plus ``dice_weight`` times a soft Dice loss when set.
``pixel_weight: foreground`` replaces that plain mean by a weighted one,
``sum_v w(v) KL(v) / sum_v w(v)`` with ``w(v) = 1`` where the label or the teacher's argmax is a
foreground class (not class 0, the background) and ``background_weight`` (default 0.1) elsewhere:
in background-dominated images (90% of the pixels of ``seg_mnist``) the plain mean spends most of
the KD term on matching the teacher's near-uniform softened background distributions.

Selective KD (``select``): distil only the samples the teacher classifies correctly
(``correct``) or predicts with softmax confidence at least ``confidence_threshold``
(``confident``). The KL term is summed over the selected samples and divided by the whole batch
size, so the weight keeps its meaning; the others get the CE term only.

Cross-modal (paired data): each teacher reads its own input (the recipe's ``teachers[i].input``),
the student its own. Few labels: samples whose ``batch.extras["labelled"]`` is False (data option
``unlabelled_per_class``) get the KL term only; the CE term is the mean over the batch's labelled
samples (0 when it has none). Selection by ``correct`` cannot check an unlabelled sample and
distils all of them.

``modality_kd`` is the same loss with the defaults of sensor-modality transition KD (Van Molle
et al., Sensors 2021): ``(1 - alpha(e)) CE + alpha(e) T^2 KL`` with alpha annealed linearly per
step from 0.95 to 0.1 (``ce_weight: complement``) and T = 4.

Regression (a dataset whose task is ``regression``): the teacher's prediction replaces the soft
targets, and both terms are mean squared errors (teacher-target, or "teacher-student", regression
KD: Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation", NeurIPS
2017, regression branch; Saputra et al., "Distilling Knowledge From a Deep Pose Regressor Network",
ICCV 2019; Takamoto et al., "An Efficient Method of Training Small Models for Regression Problems
with Knowledge Distillation", MIPR 2020)::

    L = w_ce(p) * MSE(f_s(x), y) + w_kd(p) * MSE(f_s(x), f_t(x))

averaged over the batch and the target's components; ``ce_weight: complement`` gives the convex
mix ``(1 - alpha) MSE(f_s, y) + alpha MSE(f_s, f_t)``. ``temperature``, ``reduction``, ``select`` and
``confidence_threshold`` act on class probabilities and are refused there.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from kdforge.core.schedules import Schedule, as_schedule
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.losses import (
    KLReduction,
    check_dice_weight,
    class_last,
    foreground_weights,
    location_targets,
    soft_kl,
    weighted_location_mean,
)

#: KD parameters that act on class probabilities: meaningless for a regression teacher's outputs
CLASSIFICATION_ONLY = ("temperature", "reduction", "select", "confidence_threshold")


class KDParams(MethodParams):
    temperature: Schedule = Field(default_factory=lambda: as_schedule(4.0))
    kd_weight: Schedule = Field(default_factory=lambda: as_schedule(0.9))
    ce_weight: Schedule | Literal["complement"] = Field(default_factory=lambda: as_schedule(0.1))
    reduction: KLReduction = "batchmean"
    select: Literal["all", "correct", "confident"] = "all"
    confidence_threshold: float = Field(0.5, ge=0.0, le=1.0)
    #: segmentation only: weight of a soft Dice loss added to the supervised CE
    dice_weight: float = Field(0.0, ge=0.0)
    #: segmentation only: how the per-location KL is averaged (``uniform``: every pixel/voxel alike;
    #: ``foreground``: a weighted mean where locations that the label or the teacher calls background
    #: (class 0) count ``background_weight``, all others 1)
    pixel_weight: Literal["uniform", "foreground"] = "uniform"
    background_weight: float = Field(0.1, ge=0.0, le=1.0)

    @field_validator("temperature", "kd_weight", mode="before")
    @classmethod
    def _to_schedule(cls, value: object) -> object:
        return value if isinstance(value, (Schedule, dict)) else as_schedule(value)  # type: ignore[arg-type]

    @field_validator("ce_weight", mode="before")
    @classmethod
    def _ce_to_schedule(cls, value: object) -> object:
        if value == "complement" or isinstance(value, (Schedule, dict)):
            return value
        return as_schedule(value)  # type: ignore[arg-type]


def selection_mask(
    teacher_probs: torch.Tensor,
    targets: torch.Tensor,
    select: str,
    threshold: float,
    labelled: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask of the samples to distil, or None for all of them (unlabelled samples, where
    ``labelled`` is False, cannot be checked by ``correct`` and are all distilled)."""
    if select == "correct":
        correct = teacher_probs.argmax(-1) == targets
        return correct if labelled is None else correct | ~labelled
    if select == "confident":
        return teacher_probs.max(-1).values >= threshold
    return None


def labelled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor | None) -> torch.Tensor:
    """CE averaged over the labelled samples (all when ``labelled`` is None; 0 when none is)."""
    if labelled is None:
        return F.cross_entropy(logits, targets)
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    return (per_sample * labelled).sum() / labelled.sum().clamp_min(1)


class SoftTargetDistiller(Distiller):
    """Shared body of KD-style methods: subclasses provide the target distribution."""

    Params = KDParams

    def use_task(self, task) -> None:
        p: KDParams = self.params  # type: ignore[assignment]
        check_dice_weight(self.method_name(), p.dice_weight, task.name)
        if p.pixel_weight != "uniform" and task.name != "segmentation":
            raise ValueError(
                f"method '{self.method_name()}': pixel_weight '{p.pixel_weight}' weights the KL of a dense "
                f"(segmentation) task's pixels; the {task.name} task has one prediction per sample: remove it"
            )
        if "background_weight" in p.model_fields_set and p.pixel_weight == "uniform":
            raise ValueError(
                f"method '{self.method_name()}': background_weight only acts with pixel_weight: foreground; "
                "set that too or remove background_weight"
            )
        super().use_task(task)

    def target_probs(self, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft targets at ``temperature`` and the same targets at T = 1 (for selection)."""
        raise NotImplementedError

    def forward(self, batch: Batch, step: Step) -> Output:
        p: KDParams = self.params  # type: ignore[assignment]
        temperature = step.value(p.temperature)
        kd_weight = step.value(p.kd_weight)
        ce_weight = 1.0 - kd_weight if p.ce_weight == "complement" else step.value(p.ce_weight)

        logits = self.student(batch.image)
        targets, plain_probs = self.target_probs(batch, temperature)
        rows = class_last(logits)  # segmentation: one row per pixel/voxel, the KL averaged over them
        per_sample = soft_kl(rows, targets, temperature, reduction="none")
        if p.reduction == "elementmean":
            per_sample = per_sample / rows.shape[-1]
        metrics: dict[str, float | torch.Tensor] = {"temperature": temperature, "kd_weight": kd_weight}
        labelled = self.label_mask(batch)
        targets = location_targets(batch.targets, logits)
        mask = selection_mask(plain_probs, targets, p.select, p.confidence_threshold, labelled)
        if mask is not None:
            per_sample = per_sample * mask
            metrics["distilled_fraction"] = mask.float().mean()
        if p.pixel_weight == "foreground":  # dense tasks only (use_task refuses it elsewhere)
            rows_labelled = None if labelled is None else labelled.repeat_interleave(len(rows) // len(labelled))
            weights = foreground_weights(plain_probs.argmax(-1), targets, p.background_weight, rows_labelled)
            metrics["foreground_fraction"] = (weights == 1.0).float().mean()
        else:
            weights = None
        kd_term = weighted_location_mean(per_sample, weights)
        losses = {"kd": kd_weight * kd_term}
        if ce_weight:
            options = {"dice_weight": p.dice_weight} if p.dice_weight else {}
            labelled_ce = labelled is not None and self.task.name == "classification"
            supervised = (
                labelled_cross_entropy(logits, batch.targets, labelled)
                if labelled_ce
                else self.supervised_loss(logits, batch.targets, **options)
            )
            losses["ce"] = ce_weight * supervised
        return Output(logits, losses, metrics)


@METHODS.register("kd")
class KnowledgeDistillation(SoftTargetDistiller):
    """Hinton KD: ``w_ce CE + w_kd T^2 KL(p_t^T || p_s^T)``; T, weights as numbers or schedules."""

    name = "kd"
    teachers_required = (1, 1)
    #: retrieval: the soft targets are the teacher's identity logits (KDAS-ReID's dynamic temperature)
    #: segmentation: the KL is taken at every pixel/voxel; regression: MSE to the teacher's prediction
    tasks: ClassVar[tuple[str, ...]] = ("classification", "regression", "retrieval", "segmentation")
    replays_teacher_logits = True
    cross_modal = True
    uses_label_mask = True

    def use_task(self, task) -> None:
        if task.name == "regression":
            given = [name for name in CLASSIFICATION_ONLY if name in self.params.model_fields_set]
            if given:
                raise ValueError(
                    f"method 'kd': {', '.join(given)} act(s) on class probabilities and mean nothing for the "
                    f"{task.name} task; drop {'it' if len(given) == 1 else 'them'} (regression KD is "
                    "ce_weight * MSE(student, y) + kd_weight * MSE(student, teacher))"
                )
        super().use_task(task)

    def forward(self, batch: Batch, step: Step) -> Output:
        if self.task.name != "regression":  # classification, or retrieval's identity logits
            return super().forward(batch, step)
        p: KDParams = self.params  # type: ignore[assignment]
        kd_weight = step.value(p.kd_weight)
        ce_weight = 1.0 - kd_weight if p.ce_weight == "complement" else step.value(p.ce_weight)
        prediction = self.student(batch.image)
        (teacher,) = self.teacher_logits(batch)
        if teacher.shape != prediction.shape:
            raise ValueError(
                f"method 'kd': the teacher predicts {tuple(teacher.shape[1:])} values per sample but the student "
                f"{tuple(prediction.shape[1:])}; build both with the dataset's number of outputs"
            )
        losses = {"kd": kd_weight * F.mse_loss(prediction.float(), teacher.float())}
        if ce_weight:
            losses[self.task.loss_name] = ce_weight * self.supervised_loss(prediction, batch.targets)
        return Output(prediction, losses, {"kd_weight": kd_weight})

    def target_probs(self, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        (teacher_logits,) = self.teacher_logits(batch)
        teacher_logits = class_last(teacher_logits)
        soft = F.softmax(teacher_logits / temperature, dim=-1)
        plain = soft if temperature == 1.0 else F.softmax(teacher_logits, dim=-1)
        return soft, plain


class ModalityKDParams(KDParams):
    temperature: Schedule = Field(default_factory=lambda: as_schedule(4.0))
    kd_weight: Schedule = Field(default_factory=lambda: as_schedule({"kind": "linear", "start": 0.95, "end": 0.1}))
    ce_weight: Schedule | Literal["complement"] = "complement"


@METHODS.register("modality_kd")  # type: ignore[arg-type]
class ModalityKD(KnowledgeDistillation):
    """Sensor-modality transition KD (Van Molle et al. 2021): ``(1 - a(e)) CE + a(e) T^2 KL``, a 0.95 -> 0.1."""

    name = "modality_kd"
    Params = ModalityKDParams
    #: measured on class labels only (its alpha schedule and selection act on class probabilities)
    tasks = ("classification",)
