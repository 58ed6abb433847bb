"""Pruning + KD + adversarial training as one objective, solved by proximal gradient (``robust_prune``).

Lee & Lee, "Robust CNN Compression Framework for Security-Sensitive Embedded Systems", Applied
Sciences 11(3):1093, 2021. Only the abstract was read (no full text, no public code); the objective
and schedule below are our **reconstruction** from it and standard practice (Madry PGD, Hinton KD,
proximal operators), every part of it an option::

    min_W  E[(1 - lambda) CE(S_W(x_adv), y) + lambda T^2 KL_T(Teacher(x_adv) || S_W(x_adv))] + R(W)
    x_adv = PGD_eps(x; CE(S_W(.), y))       (Madry inner maximisation on the student, every step)

Each training step is an SGD/momentum step on the smooth part, then (``after_optimizer_step``) the
proximal operator of ``eta * R`` on the weights of every Conv2d/Linear layer (not biases, not BN),
with ``eta`` the learning rate just used (``kdforge.compress.proximal``):

* ``prox: l1`` -- ``R = rho ||W||_1``: soft-thresholding by ``eta * rho``;
* ``prox: group`` -- ``R = rho sum_g sqrt(|g|) ||W_g||_2`` over output filters: group
  soft-thresholding by ``eta * rho * sqrt(|g|)`` (whole filters reach zero);
* ``prox: project`` -- the indicator of "at most (1 - s) n non-zeros": projection onto the target
  ``sparsity`` s (top-k magnitudes; whole filters with ``structured: true``).

``rho`` (or the target sparsity) rises linearly from 0 over the first ``ramp`` fraction of the run.
The last ``finetune_epochs`` epochs fix the mask (the non-zeros at that point, or, when ``sparsity``
is given with ``l1``/``group``, the top magnitudes at exactly that sparsity) and re-zero the pruned
weights after every step while training on the same loss. ``adversarial: false`` and no teacher give
plain magnitude pruning / sparse training of a naturally trained network (the benchmark's baseline).

Reported: ``sparsity`` (fraction of zero prunable weights), ``compression_rate`` (dense parameters /
non-zero parameters) and ``computation_rate`` (dense FLOPs / FLOPs of the non-zero weights, each
zero weight of a layer saving 2 FLOPs per output position) as per-step metrics (the epoch averages
land in metrics.jsonl) and exactly at the end of the run in ``summary.json`` (``method_summary``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdforge.compress.proximal import (
    group_soft_threshold,
    magnitude_mask,
    project_to_sparsity,
    prunable_layers,
    soft_threshold,
    sparsity_of,
)
from kdforge.data.batch import Batch
from kdforge.methods.adversarial import AttackParams, Normalization, PixelSpaceDistiller
from kdforge.methods.base import METHODS, Output, Step
from kdforge.methods.common import batch_accuracy
from kdforge.methods.losses import soft_kl
from kdforge.models.profile import count_flops, count_parameters


class RobustPruneParams(AttackParams):
    adversarial: bool = True
    # distillation (reconstructed): lambda and T are our choices (the paper's values were not reachable)
    kd_weight: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)
    reduction: Literal["batchmean", "elementmean"] = "batchmean"
    teacher_input: Literal["adversarial", "clean"] = "adversarial"
    # pruning
    prox: Literal["l1", "group", "project"] = "l1"
    rho: float = Field(1e-3, ge=0)
    sparsity: float | None = Field(None, ge=0, le=1)
    structured: bool = False
    filter_norm: Literal[1, 2] = 1
    ramp: float = Field(1 / 3, gt=0, le=1)
    finetune_epochs: int = Field(0, ge=0)
    exclude: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _target(self) -> RobustPruneParams:
        if self.prox == "project" and self.sparsity is None:
            raise ValueError("robust_prune: prox 'project' needs a target 'sparsity' (e.g. 0.75)")
        return self


def layer_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Output positions per sample of every prunable layer (H_out * W_out for a conv, 1 for a
    linear on flat features): one zero weight saves 2 FLOPs at each of them."""
    positions: dict[str, int] = {}
    handles = []
    for name, module in prunable_layers(model):

        def hook(mod: nn.Module, inputs: Any, output: Tensor, name: str = name) -> None:
            features = output.shape[1] if isinstance(mod, nn.Conv2d) else output.shape[-1]
            positions[name] = positions.get(name, 0) + output.numel() // max(features, 1)

        handles.append(module.register_forward_hook(hook))
    try:
        count_flops(model, input_shape)  # one eval-mode forward of a single sample
    finally:
        for handle in handles:
            handle.remove()
    return positions


def compression_report(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    positions: dict[str, int] | None = None,
    dense_flops: int | None = None,
) -> dict[str, Any]:
    """Sparsity, parameter and FLOP counts of ``model`` against its dense self::

        {"sparsity", "layers", "dense_parameters", "nonzero_parameters", "compression_rate",
         "dense_flops", "sparse_flops", "computation_rate"}

    FLOPs (batch 1) need ``input_shape`` (or precomputed ``positions`` and ``dense_flops``).
    """
    stats = sparsity_of(model)
    dense = count_parameters(model)
    nonzero = dense - stats["zeros"]
    report: dict[str, Any] = {
        "sparsity": stats["overall"],
        "layers": stats["layers"],
        "dense_parameters": dense,
        "nonzero_parameters": nonzero,
        "compression_rate": dense / max(nonzero, 1),
    }
    if positions is None and input_shape is not None:
        positions = layer_positions(model, input_shape)
    if positions is not None:
        if dense_flops is None:
            dense_flops = count_flops(model, input_shape) if input_shape is not None else None
        if dense_flops is None:
            raise ValueError("compression_report needs dense_flops with precomputed positions")
        saved = sum(
            2 * positions.get(name, 0) * int((module.weight == 0).sum()) for name, module in prunable_layers(model)
        )
        report.update(
            dense_flops=int(dense_flops),
            sparse_flops=int(dense_flops - saved),
            computation_rate=dense_flops / max(dense_flops - saved, 1),
        )
    return report


@METHODS.register("robust_prune")
class RobustPrune(PixelSpaceDistiller):
    """Pruning + KD + adversarial training by proximal gradient (Lee & Lee 2021, reconstructed)."""

    name = "robust_prune"
    Params = RobustPruneParams
    teachers_required = (0, 1)

    def __init__(
        self,
        student,
        teachers=(),
        params=None,
        normalization: Normalization | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        super().__init__(student, teachers, params, normalization)
        p: RobustPruneParams = self.params  # type: ignore[assignment]
        layers = dict(prunable_layers(self.student))
        unknown = [name for name in p.exclude if name not in layers]
        if unknown:
            raise ValueError(
                f"robust_prune: exclude names '{unknown[0]}', which is not a Conv2d/Linear layer of the "
                f"student; choose from {', '.join(layers)}"
            )
        self.layers = [(name, module) for name, module in layers.items() if name not in p.exclude]
        self.masks: dict[str, Tensor] | None = None
        self.positions: dict[str, int] | None = None
        self.dense_flops: int | None = None
        if input_shape is not None:
            self.positions = layer_positions(self.student, tuple(input_shape))
            self.dense_flops = count_flops(self.student, tuple(input_shape))
        self.dense_parameters = count_parameters(self.student)

    # ------------------------------------------------------------------ pruning
    def _strength(self, step: Step) -> float:
        """The fraction of rho (or of the target sparsity) in force: a linear ramp from 0."""
        return min(step.progress / self.params.ramp, 1.0)  # type: ignore[attr-defined]

    @torch.no_grad()
    def apply_prox(self, step: Step) -> None:
        """One proximal step on every pruned layer (``eta = step.lr``)."""
        p: RobustPruneParams = self.params  # type: ignore[assignment]
        ramp = self._strength(step)
        for _, module in self.layers:
            w = module.weight
            if p.prox == "l1":
                w.copy_(soft_threshold(w, step.lr * p.rho * ramp))
            elif p.prox == "group":
                group_size = w[0].numel()
                w.copy_(group_soft_threshold(w, step.lr * p.rho * ramp * math.sqrt(group_size), dim=0))
            else:
                w.copy_(project_to_sparsity(w, p.sparsity * ramp, p.structured, p.filter_norm))  # type: ignore[operator]

    @torch.no_grad()
    def fix_mask(self) -> None:
        """Freeze the sparsity pattern for the fine-tune (and zero the pruned weights)."""
        p: RobustPruneParams = self.params  # type: ignore[assignment]
        structured = p.prox == "group" or p.structured
        self.masks = {}
        for name, module in self.layers:
            w = module.weight
            if p.sparsity is not None:
                mask = magnitude_mask(w, p.sparsity, structured, p.filter_norm)
            else:
                mask = w != 0
            self.masks[name] = mask
            w.mul_(mask)

    def in_finetune(self, step: Step) -> bool:
        return self.params.finetune_epochs > 0 and step.epoch >= step.epochs - self.params.finetune_epochs  # type: ignore[attr-defined]

    def on_epoch_start(self, step: Step) -> None:
        if self.in_finetune(step) and self.masks is None:
            self.fix_mask()

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        if self.masks is not None:
            for name, module in self.layers:
                module.weight.mul_(self.masks[name])
        else:
            self.apply_prox(step)

    # ------------------------------------------------------------------ reporting
    def _rates(self) -> dict[str, float]:
        zeros = {name: int((m.weight == 0).sum()) for name, m in prunable_layers(self.student)}
        total = sum(m.weight.numel() for _, m in prunable_layers(self.student))
        metrics = {
            "sparsity": sum(zeros.values()) / max(total, 1),
            "compression_rate": self.dense_parameters / max(self.dense_parameters - sum(zeros.values()), 1),
        }
        if self.positions is not None and self.dense_flops is not None:
            saved = sum(2 * self.positions.get(name, 0) * z for name, z in zeros.items())
            metrics["computation_rate"] = self.dense_flops / max(self.dense_flops - saved, 1)
        return metrics

    def summary_metrics(self) -> dict[str, Any]:
        report = (
            compression_report(self.student, positions=self.positions, dense_flops=self.dense_flops)
            if self.positions is not None
            else compression_report(self.student)
        )
        return {"pruning": report}

    # ------------------------------------------------------------------ loss
    def forward(self, batch: Batch, step: Step) -> Output:
        p: RobustPruneParams = self.params  # type: ignore[assignment]
        y = batch.targets
        if p.adversarial:
            x_adv = self.attack(self.to_pixels(batch.image), y, eval_mode=p.attack_mode == "eval", step=step)
            student_input = self.from_pixels(x_adv)
        else:
            student_input = batch.image
        logits = self.student(student_input)
        distil = bool(len(self.teachers)) and p.kd_weight > 0
        ce_weight = 1.0 - p.kd_weight if distil else 1.0
        losses = {("adv_ce" if p.adversarial else "ce"): ce_weight * F.cross_entropy(logits, y)}
        if distil:
            teacher_input = student_input if p.teacher_input == "adversarial" else batch.image
            with torch.inference_mode():
                teacher_logits = self.teachers[0](teacher_input)
            T = p.temperature
            target = F.softmax(teacher_logits.float().clone() / T, dim=-1)
            losses["kd"] = p.kd_weight * soft_kl(logits, target, T, reduction=p.reduction)
        metrics: dict[str, float | Tensor] = {
            **self._rates(),
            "prune_strength": 0.0 if self.masks is not None else self._strength(step),
        }
        if p.adversarial:
            metrics["adv_top1"] = batch_accuracy(logits, y)
        return Output(logits, losses, metrics)
