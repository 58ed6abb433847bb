"""Pieces shared by the model families: the pooled head, weight init and feature-point tables.

Conventions every kdforge model follows (see docs/models.md):

* ``forward(x) -> logits``; intermediate features are read with `kdforge.models.FeatureTap`.
* ``model.feature_points``: logical name -> module name. ``stem``, ``stage1`` .. ``stageN``
  (post-activation stage outputs), ``stage1_preact`` .. ``stageN_preact`` (the same tensors
  before their last ReLU), ``pool`` (the B x D classifier input) and ``logits``.
* Some families add extra points: ``head`` (the last 1x1 conv of MobileNetV2/ShuffleNetV2),
  ``stageK_residual`` (WRN's raw residual stream).
* ``model.stage_channels``: channels of ``stage1`` .. ``stageN``; ``model.feature_dim``: D.
* ReLUs are never in-place, so a hooked tensor is never overwritten afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kdforge.core.errors import ConfigError


def pooled_flatten() -> nn.Sequential:
    """Global average pooling then flatten: B x C x H x W -> B x C (hooking it yields B x C)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def feature_point_table(
    stem: str | None,
    stages: Sequence[str],
    preacts: Sequence[str],
    pool: str = "pool",
    logits: str = "classifier",
    **extra: str,
) -> dict[str, str]:
    """Build ``feature_points`` in the standard order: stem, stages, preacts, extras, pool, logits."""
    if len(stages) != len(preacts):
        raise ValueError("every stage needs a pre-activation point")
    table: dict[str, str] = {}
    if stem is not None:
        table["stem"] = stem
    for index, module in enumerate(stages, start=1):
        table[f"stage{index}"] = module
    for index, module in enumerate(preacts, start=1):
        table[f"stage{index}_preact"] = module
    table.update(extra)
    table["pool"] = pool
    table["logits"] = logits
    return table


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """He (fan-out) init for convolutions, BN to identity, optionally N(0, std) linears.

    This is the initialisation of the CIFAR KD code bases (RepDistiller): convolutions
    ``kaiming_normal_(mode="fan_out")``; VGG and MobileNetV2 also draw linear weights
    from N(0, 0.01) with zero bias. Linears keep PyTorch's default when `linear_std` is None.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def scale_width(channels: int, multiplier: float) -> int:
    """Channels times a width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * multiplier)))


def check_multiplier(model: str, argument: str, value: object) -> float:
    """A positive number (int or float) or a ConfigError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{model}: {argument} must be a positive number, got {value!r}")
    return float(value)
