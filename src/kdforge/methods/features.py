"""Shared pieces of the feature-based methods (``at``, ``fitnet``, ``rkd``, ``pkt``, ``sp``).

A `FeatureDistiller` taps named layers of the student (with their autograd graph) and of the
teacher (detached, computed under ``torch.no_grad()``), runs both networks on the batch and hands
the method paired lists of features. Layers are named as `kdforge.models.FeatureTap` names them:
logical points of kdforge models (``stage1``, ``stage2_preact``, ``pool``...) or module names of
any ``nn.Module`` (``"features.3"``). One more name is understood here:

* ``last_stage``: the highest ``stageK`` of ``model.feature_points`` (``stage3`` for the CIFAR
  ResNets and WRNs, ``stage4`` for VGG and MobileNetV2), so one recipe works across families.

``student_layers`` and ``teacher_layers`` are paired in order; ``teacher_layers`` defaults to the
student's names, and differs when the teacher's stages are named or numbered differently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.data.batch import Batch
from kdforge.methods.base import Distiller, MethodParams, Output, Step
from kdforge.methods.losses import kd_loss
from kdforge.models.taps import FeatureTap

LAST_STAGE = "last_stage"
_STAGE = re.compile(r"stage(\d+)$")


def resolve_layers(model: nn.Module, names: list[str]) -> list[str]:
    """Replace ``last_stage`` by the model's highest ``stageK`` feature point. A logical name on a
    network without ``feature_points`` (the user's own) is one error line saying how to name taps."""
    points = getattr(model, "feature_points", None) or {}
    modules = {n for n, _ in model.named_modules() if n}

    def unnamed(name: str) -> ConfigError:
        children = [n for n, _ in model.named_children()][:8]
        return ConfigError(
            f"{type(model).__name__} has no feature points, so '{name}' means nothing; name its layers with "
            "method.student_layers / teacher_layers (module names such as "
            f"{', '.join(repr(c) for c in children) or 'its submodules'}; kdforge.models.module_names(model) "
            "lists them) or give the model a feature_points dict"
        )

    resolved = []
    for name in names:
        if name == LAST_STAGE:
            stages = [(int(m.group(1)), key) for key in points if (m := _STAGE.match(key))]
            if not stages:
                raise unnamed(name)
            name = max(stages)[1]
        elif (
            not points
            and name not in modules
            and isinstance(name, str)
            and re.fullmatch(r"stem|pool|logits|stage\d+(_preact)?", name)
        ):
            raise unnamed(name)
        resolved.append(name)
    return resolved


def guess_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The shape a network was built for, else None. Only a fallback for methods built by hand: the
    trainer passes the data's real shape, and ``Distiller.from_data`` takes it from the data.

    In order: the model's ``input_shape`` attribute; the ``(C, H, W)`` that ``kdforge.models.create``
    built it for (``kdforge_input_shape``); for kdforge zoo networks built without a size (they
    pool adaptively, so only the channel count matters), (first conv's in_channels, 32, 32). Any
    other network (the user's own) has no guess: its input shape must come from the data.
    """
    for attribute in ("input_shape", "kdforge_input_shape"):
        shape = getattr(model, attribute, None)
        if shape is not None:
            return tuple(shape)
    if getattr(model, "feature_points", None) and not hasattr(model, "kdforge_source"):
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                return (module.in_channels, 32, 32)
    return None


def input_shape_for(method: str, model: nn.Module, given: Sequence[int] | None) -> tuple[int, ...]:
    """``given`` (what the trainer passes), else a guess from the model, else a clear error."""
    if given is not None:
        return tuple(given)
    guess = guess_input_shape(model)
    if guess is None:
        raise ConfigError(
            f"{method}: the input shape of {type(model).__name__} is unknown; pass input_shape=(C, H, W) or "
            f"build the method with METHODS.get('{method}').from_data(student, teachers, params, data=train_split)"
        )
    return guess


def probe_feature_shapes(
    method: str,
    input_shape: Sequence[int],
    taps: Sequence[tuple[nn.Module, FeatureTap, list[str]]],
) -> list[list[tuple[int, ...]]]:
    """Per-sample shapes of the tapped features, from one no-grad forward of every network.

    Each network runs in eval mode (BN statistics untouched) on zeros of shape ``(2, *input_shape)``
    and is put back in its previous mode. ``taps`` holds ``(model, tap, names)`` triples.
    """
    shapes = []
    for model, tap, names in taps:
        param = next(model.parameters(), None)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                tap(torch.zeros(2, *input_shape, device=param.device if param is not None else None))
            missing = [n for n in names if n not in tap.features]
            if missing:
                raise ConfigError(
                    f"{method}: layer(s) {missing} of {type(model).__name__} did not run in its "
                    "forward; choose layers that the forward pass calls"
                )
            shapes.append([tuple(tap.features[n].shape[1:]) for n in names])
        except ConfigError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"{method}: a forward on inputs of shape {tuple(input_shape)} failed ({exc}); "
                "pass input_shape=(C, H, W) matching the data"
            ) from None
        finally:
            model.train(was_training)
            tap.clear()
    return shapes


class FeatureParams(MethodParams):
    """Fields shared by the feature methods; each method sets its own defaults."""

    ce_weight: float = Field(1.0, ge=0)
    student_layers: list[str] = Field(default_factory=lambda: [LAST_STAGE], min_length=1)
    teacher_layers: list[str] | None = Field(None, min_length=1)


class HintStageParams(FeatureParams):
    """Two-stage methods (FSP, cross-layer): the hint stage, optionally followed in the same run by
    the second stage. With ``hint_epochs: N > 0`` epochs ``0..N-1`` train on the hint loss (plus
    ``ce_weight`` CE) and every later epoch on ``CE + kd_weight T^2 KL(mean teacher logits)``; with
    0 (default) the run is the hint stage alone and the second stage is a separate run (a pipeline)."""

    hint_epochs: int = Field(0, ge=0)
    kd_weight: float = Field(0.0, ge=0)
    temperature: float = Field(4.0, gt=0)


def pool_to_common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two B x C x H x W maps to the smaller spatial size."""
    if a.dim() != 4 or b.dim() != 4:
        raise ConfigError(
            f"this method needs B x C x H x W feature maps, got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}; tap convolutional layers (e.g. stage1..stage3)"
        )
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    if tuple(a.shape[2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def full_precision(tensor: Tensor) -> AbstractContextManager:
    """Switch autocast off (on ``tensor``'s device) so that losses on features run in float32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class FeatureDistiller(Distiller):
    """Base of the methods that compare intermediate features of one teacher and the student."""

    Params = FeatureParams
    teachers_required = (1, 1)

    def __init__(self, student: nn.Module, teachers=(), params=None) -> None:
        super().__init__(student, teachers, params)
        p: FeatureParams = self.params  # type: ignore[assignment]
        teacher = self.teachers[0]
        self.student_layers = resolve_layers(self.student, list(p.student_layers))
        if p.teacher_layers is None:  # the student's names: a user network's module names rarely fit the teacher
            modules = {n for n, _ in teacher.named_modules()}
            points = getattr(teacher, "feature_points", None) or {}
            absent = [n for n in p.student_layers if n != LAST_STAGE and n not in points and n not in modules]
            if absent:
                raise ConfigError(
                    f"teacher_layers defaults to student_layers, but {type(teacher).__name__} has no layer "
                    f"'{absent[0]}'; set method.teacher_layers"
                    + (f" (its feature points: {', '.join(points)})" if points else "")
                )
        self.teacher_layers = resolve_layers(teacher, list(p.teacher_layers or p.student_layers))
        if len(self.student_layers) != len(self.teacher_layers):
            raise ConfigError(
                f"student_layers has {len(self.student_layers)} names but teacher_layers has "
                f"{len(self.teacher_layers)}; they are paired in order"
            )
        self.student_tap = FeatureTap(self.student, self.student_layers)
        self.teacher_tap = FeatureTap(teacher, self.teacher_layers, detach=True)

    @staticmethod
    def _collect(tap: FeatureTap, names: list[str], role: str) -> list[Tensor]:
        missing = [n for n in names if n not in tap.features]
        if missing:
            raise ConfigError(
                f"{role} layer(s) {missing} of {type(tap.model).__name__} did not run in its "
                "forward; choose layers that the forward pass calls"
            )
        return [tap.features[n] for n in names]

    def run(self, batch: Batch) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Student logits, student features (with graph) and teacher features (no graph)."""
        logits, _ = self.student_tap(batch.image)
        student_feats = self._collect(self.student_tap, self.student_layers, "student")
        with torch.no_grad():
            self.teacher_tap(self.input_of(self.teachers[0], batch))
        teacher_feats = self._collect(self.teacher_tap, self.teacher_layers, "teacher")
        # release the stored tensors now: the loss keeps what backward needs
        self.student_tap.clear()
        self.teacher_tap.clear()
        return logits, student_feats, teacher_feats

    def second_stage(self, batch: Batch, step: Step) -> Output | None:
        """For ``HintStageParams`` methods: the second stage's output once ``hint_epochs`` have passed,
        else None (still in the hint stage, or no in-run second stage)."""
        p = self.params
        if not getattr(p, "hint_epochs", 0) or step.epoch < p.hint_epochs:  # type: ignore[attr-defined]
            return None
        logits, _ = self.student_tap(batch.image)
        self.student_tap.clear()
        losses = {"ce": F.cross_entropy(logits, batch.targets)}
        if p.kd_weight:  # type: ignore[attr-defined]
            teacher = torch.stack(self.teacher_logits(batch)).mean(0)
            self.teacher_tap.clear()
            losses["kd"] = p.kd_weight * kd_loss(logits, teacher, p.temperature)  # type: ignore[attr-defined]
        return Output(logits, losses)

    def ce_losses(self, logits: Tensor, batch: Batch) -> dict[str, Tensor]:
        """``ce_weight`` times the task's supervised loss, logged under its name: cross-entropy
        ("ce") for classification, MSE ("mse") for regression."""
        weight = self.params.ce_weight  # type: ignore[attr-defined]
        if not weight:
            return {}
        return {self.task.loss_name: weight * self.supervised_loss(logits, batch.targets)}


__all__ = [
    "LAST_STAGE",
    "FeatureDistiller",
    "FeatureParams",
    "HintStageParams",
    "full_precision",
    "pool_to_common_size",
    "resolve_layers",
]
