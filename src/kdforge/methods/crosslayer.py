"""Cross-layer Gramian KD (Chou, Chiu & Liao, APSIPA Trans. SIP 10, e18, 2021; APSIPA ASC 2020),
stage 1 (the hint stage). **RECONSTRUCTED**: only the abstracts of the two papers could be read
(no full text, no public code), so the exact layer pairs, matrix normalisation, adapter form and loss weights are choices made
here from the abstract and standard practice (FSP), and every one of them is configurable.

What the abstracts state: a *cross-layer Gramian matrix* carries the teacher's knowledge,
dimension mismatches are handled by 1x1 convolutions and two-stage KD, and stage 2 uses a KL
term "in an offline deep-mutual-learning environment" against an offline ensemble of pre-trained
teachers.

Reconstruction. For layers a and b of one network (pooled to a common spatial size, the larger
one adaptive-average-pooled):

    G_ab = (1 / (h w)) * sum_{u,v} F_a(u, v) F_b(u, v)^T        (C_a x C_b per sample; FSP's matrix)

The pairs (a, b) are taken from *different depths*; the default is every pair of consecutive
taps plus one cross pair spanning the network (first tap, last tap): with the default taps
``stem, stage1, stage2, stage3`` that is (stem, stage1), (stage1, stage2), (stage2, stage3) and
(stem, stage3). The student's features first pass through trainable 1x1 conv adapters
``P_a: C_a^s -> C_a^t`` (no bias; identity-initialised when the widths already match, else
He-normal with linear gain), so its matrices have the teacher's shapes:

    L = weight * sum_pairs mean_{b,i,j} (G^s_ab(P) - G^t_ab)^2  +  ce_weight * CE(z_s, y)

(the squared Frobenius norm averaged over its entries and the batch, as FSP does). Because the
adapters are linear and pooling commutes with 1x1 convolutions, ``G^s_ab(P) = P_a G^s_ab P_b^T``
exactly; the matrices are computed that way (cheap: C x C products instead of convolutions).
``ce_weight`` defaults to 0: stage 1 trains only the student body and the adapters.

Stage 2 is not this method: it is ``ensemble_kd`` with ``aggregate: logits`` and
``weighting: mean`` over 2-3 teachers trained with different seeds, T = 4, kd weight 0.9 and CE
weight 1 (``CE + 0.9 T^2 KL(z_ens || z_s)``), on the student initialised from stage 1's
``checkpoints/model_last.pt`` (adapters are not part of the saved model, as wanted). See
``configs/recipes/crosslayer_two_stage.yaml``.
"""  # noqa: E501

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

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


class CrossLayerParams(HintStageParams):
    weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    student_layers: list[str] = Field(default_factory=lambda: ["stem", "stage1", "stage2", "stage3"], min_length=2)
    teacher_layers: list[str] | None = Field(None, min_length=2)
    #: pairs of names from ``student_layers`` (the teacher uses the paired ``teacher_layers``);
    #: default: consecutive taps plus (first, last)
    pairs: list[tuple[str, str]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check_pairs(self) -> CrossLayerParams:
        for a, b in self.pairs or []:
            for name in (a, b):
                if name not in self.student_layers:
                    raise ValueError(
                        f"pair ({a}, {b}) names '{name}', which is not in student_layers {self.student_layers}"
                    )
            if a == b:
                raise ValueError(f"pair ({a}, {b}) must join two different layers")
        return self


def default_pairs(count: int) -> list[tuple[int, int]]:
    """Consecutive taps, plus (first, last) when that is not already consecutive."""
    pairs = [(i, i + 1) for i in range(count - 1)]
    if count >= 3:
        pairs.append((0, count - 1))
    return pairs


def adapter(student_channels: int, teacher_channels: int) -> nn.Conv2d:
    """1x1 conv without bias; identity when the widths match, else He-normal (linear gain)."""
    conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    with torch.no_grad():
        if student_channels == teacher_channels:
            conv.weight.copy_(torch.eye(student_channels).view_as(conv.weight))
        else:
            conv.weight.normal_(0.0, 1.0 / math.sqrt(student_channels))
    return conv


def adapted_gram(first: Tensor, second: Tensor, p_first: Tensor, p_second: Tensor) -> Tensor:
    """``P_a G(F_a, F_b) P_b^T``: the Gram matrix of the adapted features (P as C_t x C_s matrices)."""
    return p_first.float() @ fsp_matrix(first, second) @ p_second.float().t()


@METHODS.register("crosslayer")
class CrossLayer(FeatureDistiller):
    """Cross-layer Gramian KD, stage 1 (Chou et al. 2021, reconstructed): adapted FSP matrices across depths."""

    name = "crosslayer"
    Params = CrossLayerParams
    #: the Gram matrices use the first teacher; an in-run second stage (``hint_epochs``) distils
    #: from the mean logits of all of them (the paper's offline ensemble)
    teachers_required = (1, None)

    def __init__(self, student, teachers=(), params=None, input_shape: Sequence[int] | None = None) -> None:
        super().__init__(student, teachers, params)
        p: CrossLayerParams = self.params  # type: ignore[assignment]
        names = list(p.student_layers)
        if len(set(names)) != len(names):
            raise ConfigError(f"crosslayer: student_layers {names} has a name twice")
        self.pair_index = (
            [(names.index(a), names.index(b)) for a, b in p.pairs] if p.pairs else default_pairs(len(names))
        )
        unused = [n for i, n in enumerate(names) if not any(i in pair for pair in self.pair_index)]
        if unused:
            raise ConfigError(f"crosslayer: student layer(s) {unused} are in no pair; remove them or pair them")
        shape = tuple(input_shape) if input_shape is not None else guess_input_shape(self.student)
        if shape is None:
            raise ConfigError(
                f"crosslayer: cannot guess the input shape of {type(self.student).__name__}; pass input_shape=(C, H, W)"
            )
        self.input_shape = shape
        student_shapes, teacher_shapes = probe_feature_shapes(
            "crosslayer",
            shape,
            [
                (self.student, self.student_tap, self.student_layers),
                (self.teachers[0], self.teacher_tap, self.teacher_layers),
            ],
        )
        for name, s in zip(self.student_layers + self.teacher_layers, student_shapes + teacher_shapes):
            if len(s) != 3:
                raise ConfigError(
                    f"crosslayer needs C x H x W feature maps, but layer '{name}' gives shape {s}; "
                    "tap convolutional layers (stem, stage1..stage3)"
                )
        self.adapters = nn.ModuleList(adapter(s[0], t[0]) for s, t in zip(student_shapes, teacher_shapes))

    def forward(self, batch: Batch, step: Step) -> Output:
        p: CrossLayerParams = self.params  # type: ignore[assignment]
        second = self.second_stage(batch, step)
        if second is not None:
            return second
        logits, student_feats, teacher_feats = self.run(batch)
        for name, feat, conv, t_feat in zip(self.student_layers, student_feats, self.adapters, teacher_feats):
            if feat.dim() != 4 or feat.shape[1] != conv.in_channels or t_feat.shape[1] != conv.out_channels:
                raise ConfigError(
                    f"crosslayer: the adapter of layer '{name}' maps {conv.in_channels} -> "
                    f"{conv.out_channels} channels but the features have shapes {tuple(feat.shape)} "
                    f"(student) and {tuple(t_feat.shape)} (teacher); pass input_shape=(C, H, W) matching the data"
                )
        weights = [conv.weight.flatten(1) for conv in self.adapters]
        with full_precision(logits):
            terms = [
                (
                    adapted_gram(student_feats[i], student_feats[j], weights[i], weights[j])
                    - fsp_matrix(teacher_feats[i], teacher_feats[j])
                )
                .pow(2)
                .mean()
                for i, j in self.pair_index
            ]
            loss = p.weight * torch.stack(terms).sum()
        return Output(logits, {**self.ce_losses(logits, batch), "crosslayer": loss})


__all__ = ["CrossLayer", "CrossLayerParams", "adapted_gram", "adapter", "default_pairs"]
