"""ReviewKD: distilling knowledge via knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021).

Each teacher level supervises a *fusion* of the student's feature at that level with all its
deeper features. Student features are taken from several stages plus the pooled feature
(``stage1, stage2, stage3, pool`` for the CIFAR ResNets); the teacher's are the same stages
**before** their final ReLU (``stageK_preact``) and the pooled feature. Attention-based fusion
(ABF) modules run from the deepest level to the shallowest; level i's ABF:

    x  = BN(conv1x1(F_s^i))                                  (C_s^i -> mid channels)
    if a deeper level exists (its residual r, nearest-upsampled to x's size):
        (z0, z1) = sigmoid(conv1x1([x, r]))                  (2 mid -> 2 spatial maps, with bias)
        x = x * z0 + r * z1
    x resized (nearest) to the teacher's H x W if it differs; x is the residual passed down
    out_i = BN(conv3x3(x))                                   (mid -> C_t^i: the distilled map)

``mid = min(512, C_s of the deepest level)``; the two convolutions are Kaiming-uniform (a = 1)
initialised. The ABFs are extra trainable modules (not part of the deployed student).

Hierarchical context loss (HCL) per level, S = out_i and T = F_t^i (same shape):

    HCL(S, T) = [MSE(S, T) + sum_k w_k MSE(pool_{l_k}(S), pool_{l_k}(T))] / (1 + sum_k w_k)

over the pooling sizes l in ``pool_levels`` (default 4, 2, 1, adaptive average pooling) that are
smaller than the map (l < min(H, W)), with weights 1/2, 1/4, 1/8 given to the levels kept, in
order (so 1.875 is the divisor when H >= 8, and only the plain MSE remains at 1 x 1). Since
pooling is linear the pooled terms are computed from the pooled difference S - T.

    L = ce_weight * CE(z_s, y) + weight * w(e) * sum_levels HCL  [+ kl_weight * T^2 KL(p_t || p_s)]

``w(e) = min(e / warmup_epochs, 1)`` is a linear warm-up where e is the number of epochs done
after the current step, fractional within an epoch (as ``dkd``); the reference uses
``min(1, epoch / 20)`` with the 0-based epoch index, constant within an epoch (so 0 during the
first epoch): ours equals it at the start of every epoch and ramps linearly in between.

Defaults follow the reference code (``CIFAR-100/train.py``, ``model/reviewkd.py``): weight 1.0
(``--kd-loss-weight``; ``script/reviewKD.sh`` uses 0.6 for resnet56 -> resnet20, 1.0 for
resnet110 -> resnet32 and 5.0 for resnet32x4 -> resnet8x4 and the WRN-40-2 pairs), 20 warm-up
epochs of 240 (scale it with short runs: 20/240 of 15 epochs is 1.25), CE weight 1, the
optional KL term off.

Layers: by default the student's ``stageK`` feature points in order plus ``pool``, and for the
teacher the matching ``stageK_preact`` (or ``stageK`` when it has no pre-activation point) plus
``pool``. ``student_layers`` / ``teacher_layers`` override them (shallow to deep, paired in order;
the last one is the deepest and is not fused). Vector features (B x C, e.g. ``pool``) are treated
as C x 1 x 1 maps. ABFs are sized from one no-grad forward on zeros of ``input_shape`` = (C, H, W),
a constructor keyword the trainer passes from the dataset.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.common import warmup_factor
from kdforge.methods.features import full_precision, guess_input_shape, probe_feature_shapes, resolve_layers
from kdforge.methods.losses import kd_loss
from kdforge.models.taps import FeatureTap

_STAGE = re.compile(r"stage(\d+)$")


class ReviewKDParams(MethodParams):
    weight: float = Field(1.0, ge=0)
    warmup_epochs: float = Field(20.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    student_layers: list[str] | None = Field(None, min_length=2)
    teacher_layers: list[str] | None = Field(None, min_length=2)
    mid_channels: int | None = Field(None, ge=1, description="default min(512, deepest student width)")
    pool_levels: list[PositiveInt] = Field(default_factory=lambda: [4, 2, 1])
    kl_weight: float = Field(0.0, ge=0)
    temperature: float = Field(4.0, gt=0)


def _stage_points(model: nn.Module) -> list[str]:
    points = getattr(model, "feature_points", None) or {}
    stages = [(int(m.group(1)), key) for key in points if (m := _STAGE.match(key))]
    return [key for _, key in sorted(stages)]


def default_layers(student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
    """Student ``stage1..stageK, pool``; teacher ``stage1_preact..stageK_preact, pool``."""
    stages = _stage_points(student)
    s_points = getattr(student, "feature_points", None) or {}
    t_points = getattr(teacher, "feature_points", None) or {}
    if not stages or "pool" not in s_points or "pool" not in t_points:
        raise ConfigError(
            "review_kd: the networks have no 'stageK'/'pool' feature points; name the layers with "
            "student_layers and teacher_layers (shallow to deep)"
        )
    teacher_stages = _stage_points(teacher)
    if len(teacher_stages) != len(stages):
        raise ConfigError(
            f"review_kd: the student has {len(stages)} stages and the teacher {len(teacher_stages)}; "
            "pair them explicitly with student_layers and teacher_layers"
        )
    teacher = [f"{s}_preact" if f"{s}_preact" in t_points else s for s in teacher_stages]
    return [*stages, "pool"], [*teacher, "pool"]


def as_map(feature: Tensor) -> Tensor:
    """B x C vectors become B x C x 1 x 1 maps; maps pass through."""
    return feature.reshape(*feature.shape, 1, 1) if feature.dim() == 2 else feature


def _map_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 1:
        return (shape[0], 1, 1)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ConfigError(f"review_kd needs B x C x H x W maps or B x C vectors, got per-sample shape {shape}")


def pointwise_conv(x: Tensor, weight: Tensor) -> Tensor:
    """A 1x1 convolution without bias (weight: out x in x 1 x 1) as a batched matrix product.

    On CPU, oneDNN's 1x1 convolutions with few channels are several times slower than ``bmm``.
    """
    n, c, h, w = x.shape
    matrix = weight.reshape(weight.shape[0], c)
    return torch.bmm(matrix.expand(n, *matrix.shape), x.reshape(n, c, h * w)).view(n, -1, h, w)


class _NearestUpsample(torch.autograd.Function):
    """Nearest upsampling by integer factors: a broadcast forward and the native backward."""

    @staticmethod
    def forward(ctx, x: Tensor, fh: int, fw: int) -> Tensor:  # type: ignore[override]
        n, c, h, w = x.shape
        ctx.input_size = (n, c, h, w)
        return x.reshape(n, c, h, 1, w, 1).expand(n, c, h, fh, w, fw).reshape(n, c, h * fh, w * fw)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        n, c, h, w = ctx.input_size
        size = list(grad.shape[2:])
        return torch.ops.aten.upsample_nearest2d_backward(grad.contiguous(), size, [n, c, h, w], None, None), None, None


def nearest_resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """``F.interpolate(x, size, mode="nearest")``; integer upsampling factors take a faster path."""
    (h, w), size = x.shape[2:], tuple(size)
    if (h, w) == size:
        return x
    if size[0] % h == 0 and size[1] % w == 0:
        return _NearestUpsample.apply(x, size[0] // h, size[1] // w)
    return F.interpolate(x, size=size, mode="nearest")


def batch_norm(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(x)``, except that a training batch with one value per channel (one sample at 1 x 1,
    e.g. the pooled level on a last batch of one) is normalised with the running statistics
    instead of failing."""
    if bn.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


class ABF(nn.Module):
    """Attention-based fusion of one level with the residual of the deeper level."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(
        self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return (distilled map, residual for the next level, attention maps or None).

        Same values as ``reference_forward`` (the plain form), computed with less memory traffic:
        1x1 convolutions as batched matrix products, the attention conv split into its x and
        residual halves (the residual half at the residual's own resolution: nearest upsampling
        commutes with per-pixel linear maps), and no concatenation.
        """
        x = batch_norm(self.reduce[1], pointwise_conv(x, self.reduce[0].weight))
        attention = None
        if self.attention is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the deeper level's residual")
            c, size = x.shape[1], tuple(x.shape[2:])
            weight = self.attention.weight
            logits = pointwise_conv(x, weight[:, :c]) + nearest_resize(pointwise_conv(residual, weight[:, c:]), size)
            attention = torch.sigmoid(logits + self.attention.bias.view(1, 2, 1, 1))
            x = torch.addcmul(nearest_resize(residual, size) * attention[:, 1:2], x, attention[:, 0:1])
        x = nearest_resize(x, out_size)
        return batch_norm(self.output[1], self.output[0](x)), x, attention

    def reference_forward(
        self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The plain form (upsample, concatenate, 1x1 conv, sigmoid, fuse), kept for the tests."""
        x = self.reduce(x)
        attention = None
        if self.attention is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            attention = torch.sigmoid(self.attention(torch.cat([x, residual], dim=1)))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.output(x), x, attention


def hcl_loss(student: Tensor, teacher: Tensor, pool_levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """Hierarchical context loss of one level (see the module docstring)."""
    diff = student.float() - teacher.float()
    loss = diff.pow(2).mean()
    weight, total = 1.0, 1.0
    size = min(diff.shape[2], diff.shape[3])
    for level in pool_levels:
        if level >= size:
            continue
        weight /= 2.0
        loss = loss + weight * F.adaptive_avg_pool2d(diff, level).pow(2).mean()
        total += weight
    return loss / total


@METHODS.register("review_kd")
class ReviewKD(Distiller):
    """ReviewKD (Chen et al. 2021): ABF-fused student levels vs teacher pre-ReLU levels, HCL, warm-up."""

    name = "review_kd"
    Params = ReviewKDParams
    teachers_required = (1, 1)

    def __init__(self, student, teachers=(), params=None, input_shape: Sequence[int] | None = None) -> None:
        super().__init__(student, teachers, params)
        p: ReviewKDParams = self.params  # type: ignore[assignment]
        teacher = self.teachers[0]
        if p.student_layers is None and p.teacher_layers is None:
            s_names, t_names = default_layers(self.student, teacher)
        elif p.student_layers is None or p.teacher_layers is None:
            raise ConfigError("review_kd: give both student_layers and teacher_layers, or neither")
        else:
            s_names, t_names = list(p.student_layers), list(p.teacher_layers)
        self.student_layers = resolve_layers(self.student, s_names)
        self.teacher_layers = resolve_layers(teacher, t_names)
        if len(self.student_layers) != len(self.teacher_layers):
            raise ConfigError(
                f"review_kd: student_layers has {len(self.student_layers)} names but teacher_layers has "
                f"{len(self.teacher_layers)}; they are paired in order"
            )
        self.student_tap = FeatureTap(self.student, self.student_layers)
        self.teacher_tap = FeatureTap(teacher, self.teacher_layers, detach=True)

        shape = tuple(input_shape) if input_shape is not None else guess_input_shape(self.student)
        if shape is None:
            raise ConfigError(
                f"review_kd: cannot guess the input shape of {type(self.student).__name__}; pass input_shape=(C, H, W)"
            )
        self.input_shape = shape
        s_shapes, t_shapes = probe_feature_shapes(
            "review_kd",
            shape,
            [(self.student, self.student_tap, self.student_layers), (teacher, self.teacher_tap, self.teacher_layers)],
        )
        self.student_shapes = [_map_shape(s) for s in s_shapes]
        self.teacher_shapes = [_map_shape(t) for t in t_shapes]
        mid = p.mid_channels or min(512, self.student_shapes[-1][0])
        last = len(self.student_shapes) - 1
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i < last)
            for i, (s, t) in enumerate(zip(self.student_shapes, self.teacher_shapes))
        )

    def fuse(self, student_feats: Sequence[Tensor]) -> list[Tensor]:
        """The ABF outputs, shallow to deep (one per level, each shaped like the teacher's map)."""
        outputs: list[Tensor] = [None] * len(student_feats)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(student_feats))):
            out_size = self.teacher_shapes[i][1:]
            outputs[i], residual, _ = self.abfs[i](as_map(student_feats[i]), residual, out_size)
        return outputs

    def _check(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
        for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            got = (tuple(as_map(s).shape[1:]), tuple(as_map(t).shape[1:]))
            if got != (self.student_shapes[i], self.teacher_shapes[i]):
                raise ConfigError(
                    f"review_kd: the ABFs were built for student/teacher features {self.student_shapes[i]} / "
                    f"{self.teacher_shapes[i]} at level '{self.student_layers[i]}' (input_shape "
                    f"{self.input_shape}) but got {got[0]} / {got[1]}; pass input_shape=(C, H, W) matching the data"
                )

    def forward(self, batch: Batch, step: Step) -> Output:
        p: ReviewKDParams = self.params  # type: ignore[assignment]
        logits, s_feats = self.student_tap(batch.image)
        student_feats = [s_feats[n] for n in self.student_layers]
        with torch.no_grad():
            teacher_logits, t_feats = self.teacher_tap(batch.image)
        teacher_feats = [t_feats[n] for n in self.teacher_layers]
        self.student_tap.clear()
        self.teacher_tap.clear()
        self._check(student_feats, teacher_feats)

        fused = self.fuse(student_feats)
        warmup = warmup_factor(step, p.warmup_epochs)
        losses: dict[str, Tensor] = {}
        with full_precision(logits):
            hcl = torch.stack([hcl_loss(s, as_map(t), p.pool_levels) for s, t in zip(fused, teacher_feats)]).sum()
            losses["review"] = (p.weight * warmup) * hcl
            if p.kl_weight:
                losses["kl"] = p.kl_weight * kd_loss(logits.float(), teacher_logits.float(), p.temperature)
        if p.ce_weight:
            losses["ce"] = p.ce_weight * F.cross_entropy(logits, batch.targets)
        return Output(logits, losses, {"review_warmup": warmup})


__all__ = ["ABF", "ReviewKD", "ReviewKDParams", "default_layers", "hcl_loss"]
