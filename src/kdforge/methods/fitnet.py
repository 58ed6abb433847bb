"""FitNets hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), single stage.

A trainable regressor r maps the student's *guided* layer to the teacher's *hint* layer:

    L = ce_weight * CE(z_s, y) + weight * sum_j MSE(r_j(F_s^j), F_t^j)

(MSE averaged over all elements). The paper trains in two stages (hint first, then KD); this is
RepDistiller's single-stage variant used in the CIFAR-100 benchmark (``distiller_zoo/FitNet.py``,
``--hint_layer 2 -a 0 -b 100``): hint = guided = output of ``stage2``, weight 100, CE weight 1.

The regressor is picked from the spatial sizes (student H x W vs teacher H' x W'), then BN and
ReLU (``regressor_relu: false`` for pre-activation hints), mapping student to teacher channels:

| sizes | regressor |
| --- | --- |
| equal | conv ``same_size_kernel`` x ``same_size_kernel``, padding k // 2 (default 1, as RepDistiller) |
| student 2x larger | conv 3x3, stride 2, padding 1 |
| student 2x smaller | transposed conv 4x4, stride 2, padding 1 |
| any other ratio | adaptive average pooling to H' x W', then conv 1x1 |
| vectors (B x D) | linear (BN1d) |

RepDistiller uses a 1x1 conv for equal sizes (our default) and has no general case;
``same_size_kernel: 3`` gives a 3x3 regressor (kdforge's default before 2026-12; 9x the parameters).

Shapes are found at construction by one no-grad forward of both networks in eval mode (BN
statistics untouched) on zeros of shape ``input_shape`` = (C, H, W). Pass ``input_shape`` to the
constructor (the trainer passes the dataset's); without it, the student's ``input_shape``
attribute is used if it has one, else (first conv's in_channels, 32, 32). A forward whose
features do not have the shapes the regressor was built for raises a ConfigError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.features import FeatureDistiller, FeatureParams, input_shape_for, probe_feature_shapes


class FitNetParams(FeatureParams):
    weight: float = Field(100.0, ge=0)
    student_layers: list[str] = Field(default_factory=lambda: ["stage2"], min_length=1)
    same_size_kernel: int = Field(1, ge=1)
    regressor_relu: bool = True


class HintRegressor(nn.Module):
    """Map student features of shape ``student_shape`` to ``teacher_shape`` (shapes without B)."""

    def __init__(
        self,
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        same_size_kernel: int = 1,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        if len(self.student_shape) == 1 and len(self.teacher_shape) == 1:
            self.kind = "linear"
            self.map: nn.Module = nn.Linear(self.student_shape[0], self.teacher_shape[0], bias=False)
            self.bn: nn.Module = nn.BatchNorm1d(self.teacher_shape[0])
        elif len(self.student_shape) == 3 and len(self.teacher_shape) == 3:
            (cs, hs, ws), (ct, ht, wt) = self.student_shape, self.teacher_shape
            if (hs, ws) == (ht, wt):
                k = same_size_kernel
                if k % 2 == 0:
                    raise ConfigError(f"fitnet: same_size_kernel must be odd to keep the size, got {k}")
                self.kind = f"conv{k}x{k}"
                self.map = nn.Conv2d(cs, ct, k, padding=k // 2, bias=False)
            elif (hs, ws) == (2 * ht, 2 * wt):
                self.kind = "conv3x3_stride2"
                self.map = nn.Conv2d(cs, ct, 3, stride=2, padding=1, bias=False)
            elif (2 * hs, 2 * ws) == (ht, wt):
                self.kind = "deconv4x4_stride2"
                self.map = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1, bias=False)
            else:
                self.kind = "pool_conv1x1"
                self.map = nn.Sequential(nn.AdaptiveAvgPool2d((ht, wt)), nn.Conv2d(cs, ct, 1, bias=False))
            self.bn = nn.BatchNorm2d(ct)
        else:
            raise ConfigError(
                f"fitnet: cannot regress student features of shape {self.student_shape} onto teacher "
                f"features of shape {self.teacher_shape}; pair two feature maps or two vectors"
            )
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.map(x)))


@METHODS.register("fitnet")
class FitNet(FeatureDistiller):
    """FitNets hint (Romero et al. 2015), single stage: CE + 100 * MSE(regressor(F_s), F_t) at stage2."""

    name = "fitnet"
    Params = FitNetParams
    tasks = ("classification", "regression")

    def __init__(self, student, teachers=(), params=None, input_shape: Sequence[int] | None = None) -> None:
        super().__init__(student, teachers, params)
        p: FitNetParams = self.params  # type: ignore[assignment]
        self.input_shape = input_shape_for("fitnet", self.student, input_shape)
        student_shapes, teacher_shapes = probe_feature_shapes(
            "fitnet",
            self.input_shape,
            [
                (self.student, self.student_tap, self.student_layers),
                (self.teachers[0], self.teacher_tap, self.teacher_layers),
            ],
        )
        self.regressors = nn.ModuleList(
            HintRegressor(s, t, p.same_size_kernel, p.regressor_relu) for s, t in zip(student_shapes, teacher_shapes)
        )

    def forward(self, batch: Batch, step: Step) -> Output:
        p: FitNetParams = self.params  # type: ignore[assignment]
        logits, student_feats, teacher_feats = self.run(batch)
        terms = []
        for regressor, s, t in zip(self.regressors, student_feats, teacher_feats):
            got = (tuple(s.shape[1:]), tuple(t.shape[1:]))
            if got != (regressor.student_shape, regressor.teacher_shape):
                raise ConfigError(
                    f"fitnet: the regressor was built for student/teacher features "
                    f"{regressor.student_shape} / {regressor.teacher_shape} (input_shape "
                    f"{self.input_shape}) but got {got[0]} / {got[1]}; pass input_shape=(C, H, W) "
                    "matching the data"
                )
            terms.append(F.mse_loss(regressor(s).float(), t.float()))
        hint = p.weight * torch.stack(terms).sum()
        return Output(logits, {**self.ce_losses(logits, batch), "hint": hint})
