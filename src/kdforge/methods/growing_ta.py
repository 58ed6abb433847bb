"""Growing teacher assistant, an INTERPRETATION of GTAN (Xu et al., Phys. Med. Biol. 66(23):235005, 2021).

Only GTAN's abstract could be read (no full text, no public code): a *growing* teacher-assistant
network lets
a small student "gradually learn the knowledge without extra computational cost" across a large
teacher-student gap. Everything below (what grows, how, when, the losses) is this module's reading,
each part a parameter; it is not the paper's algorithm.

One run trains a teacher assistant (TA) and the student together, beside a frozen teacher (the TA
starts from scratch, or with ``ta_init="teacher"`` from the teacher's weights, masked to the start
width, so it is a damaged teacher that recovers instead of a random network):

    L_TA      = ta_ce_weight CE(z_TA, y) + ta_kd_weight T^2 KL(softmax(z_t/T) || softmax(z_TA/T))
    L_student = ce_weight    CE(z_s, y)  + kd_weight    T^2 KL(softmax(z_TA/T) || softmax(z_s/T))

with the TA's logits detached in ``L_student`` (the student never trains the TA). The deployed
network is the student; the TA is evaluated as the member ``assistant``.

**Growth.** The TA has the teacher's architecture at full width (a re-initialised copy of the
teacher, or ``ta: {name, kwargs}``), but a forward hook on every BatchNorm2d multiplies its output
by a 0/1 channel mask whose first ``n(C) = ceil(f C)`` entries are 1, the same prefix for every
tensor of C channels, so residual additions stay consistent (supported families: ``resnet``,
``wrn`` and ``vgg`` with BN). ``f`` starts at ``start_fraction`` (default: the smallest ratio of the
student's to the TA's stage widths, else 0.25) and rises in equal steps to 1 at the epochs of
``grow_epochs``. A growth step is function-preserving (Net2Net-style): the filters (conv rows and
bias) and BatchNorm statistics/affine of every newly active channel copy those of a randomly drawn
already-active channel of the same width (one draw per width, shared by all layers of that width,
so a residual stream's writers agree), plus Gaussian noise of ``noise`` times the layer's weight
std on the conv rows; every conv column and classifier column that reads a new channel is zeroed.
The TA's output is therefore unchanged at the moment of growth, in eval and in train mode.

**Segmentation.** On segmentation data the CE terms are per-pixel (per-voxel) CE plus
``dice_weight`` x soft Dice, and each KL is taken per location and averaged over locations
(``pixel_weight: foreground``: a weighted mean, weight 1 where the label or the teacher's argmax is
not background, ``background_weight`` elsewhere, for both KL terms, as in ``kd``). The
assistant may be a U-Net (``unet2d``/``unet3d``): its conv-BN pairs are grown as above and, since
decoder convolutions read concatenations [upsampled, skip], the reading columns of new channels are
zeroed per input segment (``input_segments``).

Masks and the count of growths applied are buffers: parameter shapes never change (the optimizer
needs no rebuild), and a resumed run loads the grown state. ``on_epoch_start`` grows only while
fewer growths have been applied than the schedule prescribes for that epoch, so it is idempotent and
never regrows after a resume. The channels to copy and the noise come from a ``torch.Generator``
seeded by ``(seed, growth index)``. Inactive weights still receive weight decay (their gradient
is zero) and the optimizer's momentum for them is not reset at growth; both are small.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.losses import (
    check_dice_weight,
    class_last,
    foreground_weights,
    kd_loss,
    location_targets,
    weighted_location_mean,
)
from kdforge.models import create
from kdforge.models.branches import fresh_copy
from kdforge.models.cifar_resnet import CifarResNet
from kdforge.models.unet import UNet
from kdforge.models.vgg import CifarVGG
from kdforge.models.wide_resnet import WideResNet

SUPPORTED = (CifarResNet, WideResNet, CifarVGG, UNet)


class AssistantModel(MethodParams):
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class GrowingTAParams(MethodParams):
    #: the TA's architecture; None = the teacher's
    ta: AssistantModel | None = None
    #: the TA's starting weights: "scratch" (re-initialised) or "teacher" (a copy of the teacher's,
    #: then masked to ``start_fraction``; needs ``ta`` unset)
    ta_init: Literal["scratch", "teacher"] = "scratch"
    #: epochs at which the TA grows, or a number of equal growth steps spread over training
    grow_epochs: int | list[int] = 3
    #: starting active width fraction; None = student/TA stage-width ratio (0.25 if unknown)
    start_fraction: float | None = Field(None, gt=0.0, le=1.0)
    #: std of the noise added to copied filters, relative to the layer's weight std
    noise: float = Field(0.01, ge=0.0)
    seed: int = 0
    temperature: float = Field(4.0, gt=0.0)
    kd_weight: float = Field(0.9, ge=0.0)
    ce_weight: float = Field(0.1, ge=0.0)
    #: the TA's weights; None = the student's
    ta_kd_weight: float | None = Field(None, ge=0.0)
    ta_ce_weight: float | None = Field(None, ge=0.0)
    reduction: Literal["batchmean", "elementmean"] = "batchmean"
    #: segmentation only: weight of a soft Dice loss added to the CE of the student and the TA
    dice_weight: float = Field(0.0, ge=0.0)
    #: segmentation only: ``foreground`` averages both KL terms over pixels with weight 1 where the
    #: label or the teacher's argmax is not background (class 0), ``background_weight`` elsewhere
    pixel_weight: Literal["uniform", "foreground"] = "uniform"
    background_weight: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _student_learns(self) -> GrowingTAParams:
        if self.ce_weight + self.kd_weight == 0:
            raise ValueError("ce_weight and kd_weight are both 0: the student would not train")
        return self

    @model_validator(mode="after")
    def _teacher_init_needs_teacher_architecture(self) -> GrowingTAParams:
        if self.ta_init == "teacher" and self.ta is not None:
            raise ValueError(
                "ta_init 'teacher' copies the teacher's weights, so the assistant must have the teacher's "
                "architecture: remove method.ta or set ta_init: scratch"
            )
        return self

    @field_validator("grow_epochs")
    @classmethod
    def _check_epochs(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("grow_epochs must be a number of steps >= 0 or a list of epochs")
            return value
        if any(e < 1 for e in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"grow_epochs must be increasing epochs >= 1, got {value}")
        return value


def active_count(channels: int, fraction: float) -> int:
    """Channels active out of ``channels`` at width ``fraction`` (at least 1)."""
    return min(channels, max(1, math.ceil(fraction * channels - 1e-9)))


def _mask_output(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    mask = module.growth_mask.to(output.dtype)  # type: ignore[union-attr]
    return output * mask.view(1, -1, *([1] * (output.dim() - 2)))


def growth_epochs(grow_epochs: int | Sequence[int], epochs: int) -> list[int]:
    """Epochs at which the TA grows: the list as given, or ``n`` steps at ``floor(g E / (n + 1))``."""
    if isinstance(grow_epochs, int):
        return [max(1, (g * epochs) // (grow_epochs + 1)) for g in range(1, grow_epochs + 1)]
    return list(grow_epochs)


class ChannelGrower:
    """Masks a BatchNorm CNN's channels by prefix and grows them function-preservingly."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, SUPPORTED) or (isinstance(model, CifarVGG) and not _has_bn(model)):
            raise ConfigError(
                f"growing_ta: cannot grow a {type(model).__name__}; the assistant must be a resnet, "
                "wrn or vgg (with batch_norm) network, or a unet2d/unet3d: set method.ta to one of those"
            )
        self.model = model
        self.bns: list[nn.BatchNorm2d]  # BatchNorm3d and Conv3d for volumes: the same attributes
        self.convs: list[nn.Conv2d]
        self.readers: list[nn.Module]
        if isinstance(model, UNet):  # concatenating skips: the U-Net names each conv's BN and input segments
            self.bns = [cast(nn.BatchNorm2d, bn) for _, bn in model.conv_bn_pairs]
            self.convs = [cast(nn.Conv2d, conv) for conv, _ in model.conv_bn_pairs]
            self.readers = [m for m in model.modules() if hasattr(m, "input_segments")][1:]  # not the image's
        else:
            self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
            if any(c.groups != 1 for c in convs):
                raise ConfigError(
                    "growing_ta: grouped convolutions cannot be grown; use a resnet, wrn or vgg assistant"
                )
            self.convs = convs
            self.readers = convs[1:] + [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.widths = sorted({bn.num_features for bn in self.bns})
        for bn in self.bns:
            bn.register_buffer("growth_mask", torch.ones(bn.num_features))
            bn.register_forward_hook(_mask_output)

    def set_fraction(self, fraction: float) -> None:
        for bn in self.bns:
            mask = torch.zeros_like(bn.growth_mask)
            mask[: active_count(bn.num_features, fraction)] = 1.0
            bn.growth_mask.copy_(mask)

    def active_fraction(self) -> float:
        active = sum(float(bn.growth_mask.sum()) for bn in self.bns)
        return active / sum(bn.num_features for bn in self.bns)

    @torch.no_grad()
    def grow(self, old: float, new: float, noise: float, generator: torch.Generator) -> None:
        """Activate the channels between widths ``old`` and ``new`` without changing the function."""
        plan: dict[int, tuple[int, int, Tensor]] = {}
        for width in self.widths:
            start, stop = active_count(width, old), active_count(width, new)
            if stop > start:
                plan[width] = (start, stop, torch.randint(0, start, (stop - start,), generator=generator))
        for conv in self.convs:  # writers: incoming filters of the new channels
            if conv.out_channels not in plan:
                continue
            start, stop, source = plan[conv.out_channels]
            weight = conv.weight
            rows = weight[source.to(weight.device)]
            active = weight[:start]
            scale = noise * float(active.std()) if active.numel() > 1 else 0.0
            jitter = torch.randn(rows.shape, generator=generator).to(rows) * scale
            weight[start:stop] = rows + jitter
            if conv.bias is not None:
                conv.bias[start:stop] = conv.bias[source.to(conv.bias.device)]
        for bn in self.bns:
            if bn.num_features not in plan:
                continue
            start, stop, source = plan[bn.num_features]
            for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                if tensor is not None:
                    tensor[start:stop] = tensor[source.to(tensor.device)]
        for reader in self.readers:  # readers of the new channels start at zero
            width = reader.in_features if isinstance(reader, nn.Linear) else reader.in_channels
            offset = 0
            for segment in getattr(reader, "input_segments", [width]):  # a U-Net conv reads [upsampled, skip]
                if segment in plan:
                    start, stop, _ = plan[segment]
                    reader.weight[:, offset + start : offset + stop] = 0.0
                offset += segment
        self.set_fraction(new)


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d) for m in model.modules())


def _stage_ratio(student: nn.Module, assistant: nn.Module) -> float | None:
    small, large = getattr(student, "stage_channels", None), getattr(assistant, "stage_channels", None)
    if not small or not large or len(small) != len(large):
        return None
    return min(1.0, min(s / t for s, t in zip(small, large)))


@METHODS.register("growing_ta")
class GrowingTeacherAssistant(Distiller):
    """Growing TA (INTERPRETATION of GTAN, Xu et al. 2021): a channel-grown assistant trained with the student."""

    name = "growing_ta"
    Params = GrowingTAParams
    teachers_required = (1, 1)
    replays_teacher_logits = True
    tasks = ("classification", "segmentation")

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module] = (),
        params: MethodParams | dict | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teachers, params)
        p: GrowingTAParams = self.params  # type: ignore[assignment]
        self.ta = self._build_assistant(self.teachers[0], p.ta, input_shape, p.ta_init)
        self.grower = ChannelGrower(self.ta)
        ratio = _stage_ratio(student, self.ta)
        self.start_fraction = p.start_fraction or (ratio if ratio is not None else 0.25)
        self.register_buffer("growths", torch.zeros((), dtype=torch.long))
        self.grower.set_fraction(self.start_fraction)

    @staticmethod
    def _build_assistant(
        teacher: nn.Module, spec: AssistantModel | None, input_shape, init: str = "scratch"
    ) -> nn.Module:
        if spec is None:
            assistant = copy.deepcopy(teacher) if init == "teacher" else fresh_copy(teacher)
        else:
            convs = [m for m in teacher.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
            linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
            dense = isinstance(teacher, UNet)  # per-pixel logits come from its last (1x1) conv
            if not (linears or dense) or (input_shape is None and not convs):
                raise ConfigError("growing_ta: cannot read the teacher's classes and input channels; pass input_shape")
            classes = convs[-1].out_channels if dense else linears[-1].out_features
            in_channels = input_shape[0] if input_shape is not None else convs[0].in_channels
            size = tuple(input_shape[-2:]) if input_shape is not None else None
            assistant = create(spec.name, num_classes=classes, in_channels=in_channels, input_size=size, **spec.kwargs)
        assistant.requires_grad_(True)
        assistant.train()
        return assistant

    # ----------------------------------------------------------------- growth
    def schedule(self, epochs: int) -> list[int]:
        return growth_epochs(self.params.grow_epochs, epochs)  # type: ignore[attr-defined]

    def fraction_after(self, growths: int, steps: int) -> float:
        if steps == 0:
            return self.start_fraction
        return self.start_fraction + (1.0 - self.start_fraction) * min(growths, steps) / steps

    def on_epoch_start(self, step: Step) -> None:
        p: GrowingTAParams = self.params  # type: ignore[assignment]
        epochs = self.schedule(step.epochs)
        target = sum(1 for e in epochs if e <= step.epoch)
        while int(self.growths) < target:
            index = int(self.growths)
            generator = torch.Generator().manual_seed(p.seed * 1_000_003 + index)
            old, new = self.fraction_after(index, len(epochs)), self.fraction_after(index + 1, len(epochs))
            self.grower.grow(old, new, p.noise, generator)
            self.growths += 1

    # ----------------------------------------------------------------- training
    def forward(self, batch: Batch, step: Step) -> Output:
        p: GrowingTAParams = self.params  # type: ignore[assignment]
        ta_kd = p.kd_weight if p.ta_kd_weight is None else p.ta_kd_weight
        ta_ce = p.ce_weight if p.ta_ce_weight is None else p.ta_ce_weight
        (teacher_logits,) = self.teacher_logits(batch)
        ta_logits = self.ta(batch.image)
        logits = self.student(batch.image)
        options = {"dice_weight": p.dice_weight} if p.dice_weight else {}
        rows, ta_rows, teacher_rows = class_last(logits), class_last(ta_logits), class_last(teacher_logits)
        weights = None
        if p.pixel_weight == "foreground":  # segmentation only (use_task refuses it elsewhere)
            labels = location_targets(batch.targets, logits)
            weights = foreground_weights(teacher_rows.argmax(-1), labels, p.background_weight)
        terms = {  # segmentation: the KL per pixel/voxel (class_last rows), averaged over locations
            "ta_ce": (ta_ce, lambda: self.supervised_loss(ta_logits, batch.targets, **options)),
            "ta_kd": (ta_kd, lambda: self._pixel_kl(ta_rows, teacher_rows, batch, weights)),
            "ce": (p.ce_weight, lambda: self.supervised_loss(logits, batch.targets, **options)),
            "kd": (p.kd_weight, lambda: self._pixel_kl(rows, ta_rows.detach(), batch, weights)),
        }
        losses = {name: weight * term() for name, (weight, term) in terms.items() if weight}
        steps = len(self.schedule(step.epochs))
        metrics = {"ta_active_fraction": self.fraction_after(int(self.growths), steps)}
        return Output(logits, losses, metrics)

    def _pixel_kl(self, rows, target_rows, batch: Batch, weights: torch.Tensor | None) -> torch.Tensor:
        """``T^2 KL`` per row (pixel/voxel, or sample), averaged plainly or with ``weights``."""
        p: GrowingTAParams = self.params  # type: ignore[assignment]
        if weights is None:
            return kd_loss(rows, target_rows, p.temperature, p.reduction)
        per_row = kd_loss(rows, target_rows, p.temperature, "none")
        if p.reduction == "elementmean":
            per_row = per_row / rows.shape[-1]
        return weighted_location_mean(per_row, weights)

    def use_task(self, task) -> None:
        p: GrowingTAParams = self.params  # type: ignore[assignment]
        check_dice_weight("growing_ta", p.dice_weight, task.name)
        if p.pixel_weight != "uniform" and task.name != "segmentation":
            raise ValueError(
                f"method 'growing_ta': pixel_weight '{p.pixel_weight}' weights the KL of a dense (segmentation) "
                f"task's pixels; the {task.name} task has one prediction per sample: remove it"
            )
        if "background_weight" in p.model_fields_set and p.pixel_weight == "uniform":
            raise ValueError(
                "method 'growing_ta': background_weight only acts with pixel_weight: foreground; "
                "set that too or remove background_weight"
            )
        super().use_task(task)

    def evaluation_models(self) -> dict[str, nn.Module]:
        return {"assistant": self.ta}
