"""FSP: flow-of-solution-procedure matrices (Yim, Joo, Bae & Kim, "A Gift from Knowledge
Distillation", CVPR 2017), the hint stage of a two-stage recipe.

For two feature maps F1 (C1 x h x w) and F2 (C2 x h' x w') of one network, the larger is
adaptive-average-pooled to the smaller spatial size and

    G_ij = (1 / (h w)) * sum_{u,v} F1_i(u, v) * F2_j(u, v)          (one C1 x C2 matrix per sample)

The taps are consecutive points of the network (default ``stem, stage1, stage2, stage3``: the
input and output of every residual stage) and the pairs are consecutive taps. The loss is

    L = weight * sum_pairs mean_{b,i,j} (G^s_ij - G^t_ij)^2  +  ce_weight * CE(z_s, y)

(a mean of squares per pair, as RepDistiller's ``distiller_zoo/FSP.py``; the paper writes a
squared L2 norm with per-pair weights lambda). Student and teacher must have **equal channel
counts** at every tap (resnet20 -> resnet8 share 16/32/64); otherwise construction raises a
ConfigError pointing at ``crosslayer``, which maps student features to the teacher's channels
with 1x1 conv adapters.

Two stages, as a pipeline of ordinary runs (``configs/recipes/fsp_two_stage.yaml``):

1. **hint stage**: this method with its default ``ce_weight: 0`` trains the student's body on
   the FSP loss alone. The classifier receives no gradient, and since the trainer zeroes
   gradients to ``None`` the optimizer leaves it untouched (no weight decay either), which
   matches RepDistiller's ``helper/pretrain.py`` (only the feature modules are optimised);
2. **main stage**: plain ``ce`` training of the student initialised from stage 1's
   ``checkpoints/model_last.pt`` (``student: {checkpoint: "{hint}/checkpoints/model_last.pt"}``).

RepDistiller runs stage 1 for 30 epochs of its 240 with unweighted FSP losses; ``ce_weight > 0``
gives a single-stage variant.

``fsp_matrix`` is shared with ``crosslayer`` (:mod:`kdforge.methods.common`);
``probe_feature_shapes`` with ``crosslayer`` and ``review_kd`` (:mod:`kdforge.methods.features`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.common import fsp_matrix
from kdforge.methods.features import (
    FeatureDistiller,
    HintStageParams,
    full_precision,
    guess_input_shape,
    probe_feature_shapes,
)


class FSPParams(HintStageParams):
    weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    student_layers: list[str] = Field(default_factory=lambda: ["stem", "stage1", "stage2", "stage3"], min_length=2)
    teacher_layers: list[str] | None = Field(None, min_length=2)


@METHODS.register("fsp")
class FSP(FeatureDistiller):
    """FSP matrices (Yim et al. 2017), hint stage: sum over consecutive tap pairs of mean((G_s - G_t)^2)."""

    name = "fsp"
    Params = FSPParams

    def __init__(self, student, teachers=(), params=None, input_shape: Sequence[int] | None = None) -> None:
        super().__init__(student, teachers, params)
        shape = tuple(input_shape) if input_shape is not None else guess_input_shape(self.student)
        if shape is None:
            return  # nothing to probe with; forward checks the channels instead
        try:
            student_shapes, teacher_shapes = probe_feature_shapes(
                "fsp",
                shape,
                [
                    (self.student, self.student_tap, self.student_layers),
                    (self.teachers[0], self.teacher_tap, self.teacher_layers),
                ],
            )
        except ConfigError:
            if input_shape is not None:
                raise
            return  # a guessed shape may be wrong; forward checks the channels instead
        self._check_channels([s[0] for s in student_shapes], [t[0] for t in teacher_shapes])

    def _check_channels(self, student: list[int], teacher: list[int]) -> None:
        for s_name, t_name, cs, ct in zip(self.student_layers, self.teacher_layers, student, teacher):
            if cs != ct:
                raise ConfigError(
                    f"fsp needs equal channel counts in student and teacher at every tap, but student "
                    f"layer '{s_name}' has {cs} channels and teacher layer '{t_name}' has {ct}; pick "
                    "layers with matching widths (e.g. resnet20 -> resnet8) or use method 'crosslayer', "
                    "which maps student features to the teacher's channels with 1x1 conv adapters"
                )

    def forward(self, batch: Batch, step: Step) -> Output:
        p: FSPParams = self.params  # type: ignore[assignment]
        second = self.second_stage(batch, step)
        if second is not None:
            return second
        logits, student_feats, teacher_feats = self.run(batch)
        self._check_channels([f.shape[1] for f in student_feats], [f.shape[1] for f in teacher_feats])
        with full_precision(logits):
            terms = [
                (fsp_matrix(s1, s2) - fsp_matrix(t1, t2)).pow(2).mean()
                for s1, s2, t1, t2 in zip(student_feats, student_feats[1:], teacher_feats, teacher_feats[1:])
            ]
            loss = p.weight * torch.stack(terms).sum()
        return Output(logits, {**self.ce_losses(logits, batch), "fsp": loss})


__all__ = ["FSP", "FSPParams"]
