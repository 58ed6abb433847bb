"""CCL: compositional contrastive learning across modalities (Chen, Xian, Koepke, Shan & Akata,
CVPR 2021, arXiv 2104.10955; reference code ``yanbeic/CCL``).

Teachers on other modalities (image, audio) are not aligned with the student's (video): a sample's
teacher feature and student feature describe the same class but not the same content. For each
teacher m a learned **composition** closes that gap: from the teacher's feature ``f_m`` and the
student's ``f_v`` (each L2-normalised), ``r = W_m [n(f_m), n(f_v)] + b``; the composed feature
``f_mv = f_m + r`` has its own classifier ``z_mv = C_m f_mv``. A label-aware multi-positive
contrastive loss then pulls the student toward the composed and the teacher features of its class.

Features are the ``pool`` points (``student_layers`` / ``teacher_layers``); the student's is mapped
by a linear layer ``P_m`` to teacher m's feature size (the reference's networks share 512-d
features; ours differ), and ``f_v`` above is that projection.

``NCE(f1, f2, y)``: cosine matrix ``c_ij`` of the L2-normalised rows, ``P = softmax_j(c / tau)``;
per anchor i the mean over positives j (``y_j = y_i``, i included) of ``-log P_ij`` plus the mean
over negatives of ``-log(1 - P_ij)``; averaged over anchors. ``JSD(p, q) = 0.5 mean_b [KL(p||q) +
KL(q||p)]`` on softmax outputs.

    student:      CE(z_v) + w sum_m [NCE(v, mv) + NCE(mv, v) + NCE(v, m) + NCE(m, v)] + w sum_m JSD(z_v, z_mv)
    composition:  CE(z_mv) + NCE(v, mv) + NCE(mv, v) + NCE(mv, m) + NCE(m, mv) + JSD(z_v, z_mv)

Each side's loss reaches only its own parameters (the other side's tensors are detached), so one
backward pass of the sum gives every network the gradient of its own loss, as the reference's
separate optimisers do. The compositions have their own optimizer group (``composition``;
``composition_optimizer`` / ``composition_lr``, else the run's optimizer). Defaults: ``w`` =
``loss_weight`` 1.0 with one teacher (the reference uses 0.5 with two), tau 0.1 (the reference's
image teacher; 0.5 for its audio teacher: ``nce_temperature: [0.5]``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, OptimizerGroup, Output, Step
from kdforge.methods.features import input_shape_for, probe_feature_shapes, resolve_layers
from kdforge.models.taps import FeatureTap


class CCLParams(MethodParams):
    loss_weight: float | None = Field(None, ge=0, description="w; None: 1.0 with one teacher, 0.5 with more")
    nce_temperature: float | list[float] = Field(0.1, description="tau per teacher (one number: all of them)")
    ce_weight: float = Field(1.0, ge=0)
    student_layers: list[str] = Field(default_factory=lambda: ["pool"], min_length=1, max_length=1)
    teacher_layers: list[str] = Field(default_factory=lambda: ["pool"], min_length=1, max_length=1)
    composition_optimizer: Literal["sgd", "adam", "adamw"] | None = None
    composition_lr: float | None = Field(None, gt=0)


def label_aware_nce(anchor: Tensor, other: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """``NCE(anchor, other, y)`` of the module docstring (B x D each)."""
    cosine = F.normalize(anchor, dim=1) @ F.normalize(other, dim=1).t()
    log_p = F.log_softmax(cosine / temperature, dim=1)
    positive = (labels[:, None] == labels[None, :]).to(log_p.dtype)
    negative = 1.0 - positive
    log_not_p = torch.log1p(-log_p.exp().clamp(max=1.0 - 1e-6))
    pull = -(log_p * positive).sum(1) / positive.sum(1)
    push = -(log_not_p * negative).sum(1) / negative.sum(1).clamp_min(1.0)
    return (pull + push).mean()


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``0.5 * mean_b [KL(p||q) + KL(q||p)]`` of the softmax distributions."""
    log_p, log_q = F.log_softmax(logits_p, dim=1), F.log_softmax(logits_q, dim=1)
    kl_pq = (log_p.exp() * (log_p - log_q)).sum(1)
    kl_qp = (log_q.exp() * (log_q - log_p)).sum(1)
    return 0.5 * (kl_pq + kl_qp).mean()


class Composition(nn.Module):
    """``f_mv = f_m + W [n(f_m), n(f_v)]`` and its classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.residual = nn.Linear(2 * dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, teacher: Tensor, student: Tensor) -> tuple[Tensor, Tensor]:
        joint = torch.cat([F.normalize(teacher, dim=1), F.normalize(student, dim=1)], dim=1)
        composed = teacher + self.residual(joint)
        return composed, self.classifier(composed)


@METHODS.register("ccl")  # type: ignore[arg-type]
class CompositionalContrastiveLearning(Distiller):
    """CCL (Chen et al. 2021): per-teacher compositions, label-aware contrastive loss, symmetric KL."""

    name = "ccl"
    Params = CCLParams
    teachers_required = (1, None)
    cross_modal = True
    # the contrastive softmax runs over the batch, but its means over positives and negatives keep the
    # loss's scale within x2 between batch sizes (tests/test_batch_scale.py): not batch_size_dependent

    def __init__(self, student: nn.Module, teachers=(), params=None, input_shape=None) -> None:
        super().__init__(student, teachers, params)
        p: CCLParams = self.params  # type: ignore[assignment]
        taus = p.nce_temperature if isinstance(p.nce_temperature, list) else [p.nce_temperature] * len(self.teachers)
        if len(taus) != len(self.teachers) or min(taus) <= 0:
            raise ConfigError(
                f"ccl: nce_temperature needs one positive value per teacher ({len(self.teachers)}), got {taus}"
            )
        self.taus = [float(t) for t in taus]
        self.student_layer = resolve_layers(self.student, list(p.student_layers))[0]
        self.student_tap = FeatureTap(self.student, [self.student_layer])
        shape = input_shape_for("ccl", self.student, input_shape)
        ((student_shape,),) = probe_feature_shapes(
            "ccl", shape, [(self.student, self.student_tap, [self.student_layer])]
        )
        student_dim = int(torch.Size(student_shape).numel())
        self.teacher_layers, self.teacher_taps = [], []
        projections, compositions = [], []
        for teacher in self.teachers:
            layer = resolve_layers(teacher, list(p.teacher_layers))[0]
            tap = FeatureTap(teacher, [layer], detach=True)
            own = getattr(teacher, "kdforge_input", None) not in (None, getattr(student, "kdforge_input", None))
            teacher_shape = (getattr(teacher, "kdforge_input_shape", None) if own else None) or shape
            ((feature_shape,),) = probe_feature_shapes("ccl", teacher_shape, [(teacher, tap, [layer])])
            dim = int(torch.Size(feature_shape).numel())
            self.teacher_layers.append(layer)
            self.teacher_taps.append(tap)
            projections.append(nn.Linear(student_dim, dim))
            compositions.append(Composition(dim, self._num_classes(teacher_shape, teacher)))
        self.projections = nn.ModuleList(projections)
        self.compositions = nn.ModuleList(compositions)

    @staticmethod
    def _num_classes(shape, teacher: nn.Module) -> int:
        param = next(teacher.parameters(), None)
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad():
            out = teacher(torch.zeros(2, *shape, device=param.device if param is not None else None))
        teacher.train(was_training)
        return int(out.shape[-1])

    @property
    def loss_weight(self) -> float:
        p: CCLParams = self.params  # type: ignore[assignment]
        return p.loss_weight if p.loss_weight is not None else (1.0 if len(self.teachers) == 1 else 0.5)

    def forward(self, batch: Batch, step: Step) -> Output:
        p: CCLParams = self.params  # type: ignore[assignment]
        logits, _ = self.student_tap(batch.image)
        student_feat = self.student_tap.features[self.student_layer].flatten(1)
        self.student_tap.clear()
        labels, w = batch.targets, self.loss_weight
        losses: dict[str, Tensor] = {"ce": p.ce_weight * F.cross_entropy(logits, labels)}
        student_side = logits.new_zeros(())
        composition_side = logits.new_zeros(())
        for i, teacher in enumerate(self.teachers):
            with torch.no_grad():
                self.teacher_taps[i](self.input_of(teacher, batch))
            teacher_feat = self.teacher_taps[i].features[self.teacher_layers[i]].flatten(1).float()
            self.teacher_taps[i].clear()
            v = self.projections[i](student_feat)
            composed, composed_logits = self.compositions[i](teacher_feat, v.detach())
            tau = self.taus[i]
            mv, v_, z_v, z_mv = composed.detach(), v.detach(), logits.detach(), composed_logits.detach()
            student_side = student_side + (
                label_aware_nce(v, mv, labels, tau)
                + label_aware_nce(mv, v, labels, tau)
                + label_aware_nce(v, teacher_feat, labels, tau)
                + label_aware_nce(teacher_feat, v, labels, tau)
                + symmetric_kl(logits, z_mv)
            )
            composition_side = composition_side + (
                F.cross_entropy(composed_logits, labels)
                + label_aware_nce(v_, composed, labels, tau)
                + label_aware_nce(composed, v_, labels, tau)
                + label_aware_nce(composed, teacher_feat, labels, tau)
                + label_aware_nce(teacher_feat, composed, labels, tau)
                + symmetric_kl(z_v, composed_logits)
            )
        losses["ccl_student"] = w * student_side
        losses["ccl_composition"] = composition_side
        return Output(logits, losses)

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """The student and its projections on the run's optimizer; the compositions on their own."""
        p: CCLParams = self.params  # type: ignore[assignment]
        composition = [q for q in self.compositions.parameters() if q.requires_grad]
        taken = {id(q) for q in composition}
        main = [q for q in self.parameters() if q.requires_grad and id(q) not in taken]
        settings: dict = {}
        if p.composition_optimizer is not None:
            settings["name"] = p.composition_optimizer
        if p.composition_lr is not None:
            settings["lr"] = p.composition_lr
        return [OptimizerGroup("main", main), OptimizerGroup("composition", composition, settings or None)]
