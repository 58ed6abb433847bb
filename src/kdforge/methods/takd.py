"""One hop of Teacher-Assistant KD (Mirzadeh et al., AAAI 2020, arXiv 1902.03393).

TAKD bridges a large teacher-student gap with intermediate *teacher assistants*: teacher -> TA ->
student, each hop an ordinary KD run. A chain is therefore a pipeline recipe of ``takd`` runs whose
teacher is the previous stage's checkpoint (``configs/recipes/takd_cifar10.yaml``,
``configs/cifar100/takd_resnet110_resnet20_resnet8.yaml``). One hop's loss, as in the reference
``train.py``::

    L = (1 - weight) * CE(z_s, y) + weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

a convex mix (``weight`` is the paper's lambda). ``reduction`` defaults to ``elementmean``: the
reference computes the KL with ``nn.KLDivLoss()``'s default reduction, the mean over batch *and*
classes, and its lambda and T were tuned with that scale (so on CIFAR-100 the KD term weighs 100x
less than in a batchmean implementation). ``reduction: batchmean`` gives the textbook KL, i.e.
``kd`` with ``ce_weight: complement``. The reference tunes lambda and T per hop (NNI: lambda in
0.05..1.0, T in {1, 2, 5, 10, 15, 20}); the defaults here, 0.5 and 5, are mid-grid choices.

Segmentation: the KL is taken per pixel (voxel) over the classes and averaged over the locations
(``elementmean`` also divides by the classes), CE is per location, and ``dice_weight`` adds a soft
Dice loss; a chain of segmentation hops is ``configs/recipes/seg_mnist_takd.yaml``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.losses import check_dice_weight, class_last, kd_loss


class TAKDParams(MethodParams):
    #: lambda: the KD share of the convex mix ((1 - weight) goes to CE)
    weight: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(5.0, gt=0.0)
    #: elementmean = nn.KLDivLoss() default of the reference code; batchmean = textbook KL
    reduction: Literal["elementmean", "batchmean"] = "elementmean"
    #: segmentation only: weight of a soft Dice loss added to the supervised CE
    dice_weight: float = Field(0.0, ge=0.0)


@METHODS.register("takd")
class TeacherAssistantKD(Distiller):
    """TAKD hop (Mirzadeh et al. 2020): ``(1-w) CE + w T^2 KL_T(z_t || z_s)``, reference elementmean KL."""

    name = "takd"
    Params = TAKDParams
    teachers_required = (1, 1)
    replays_teacher_logits = True
    tasks = ("classification", "segmentation")

    def use_task(self, task) -> None:
        check_dice_weight(self.method_name(), self.params.dice_weight, task.name)  # type: ignore[attr-defined]
        super().use_task(task)

    def forward(self, batch: Batch, step: Step) -> Output:
        p: TAKDParams = self.params  # type: ignore[assignment]
        logits = self.student(batch.image)
        (teacher_logits,) = self.teacher_logits(batch)
        losses = {}
        if p.weight:  # segmentation: one KL per pixel/voxel (class_last), averaged over locations
            losses["kd"] = p.weight * kd_loss(
                class_last(logits), class_last(teacher_logits), p.temperature, p.reduction
            )
        if p.weight < 1.0:
            options = {"dice_weight": p.dice_weight} if p.dice_weight else {}
            losses["ce"] = (1.0 - p.weight) * self.supervised_loss(logits, batch.targets, **options)
        return Output(logits, losses, {"temperature": p.temperature})
