"""The model registry and `create`, the one way the rest of kdforge builds a network.

Every registered factory has the signature
``factory(num_classes=10, in_channels=3, input_size=None, **its_own_arguments) -> nn.Module``.
`input_size` is ``(H, W)`` or None; only models whose shape depends on it (the MLP) use it,
the convolutional models pool adaptively and accept any input of at least 8x8.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from kdforge.core.errors import ConfigError, closest
from kdforge.core.registry import Registry
from kdforge.models.heads import OUTPUTS, apply_output
from kdforge.models.specs import attach, spec_kind
from kdforge.models.specs import build as build_spec

MODELS: Registry[nn.Module] = Registry("model", group="kdforge.models")

COMMON_ARGUMENTS = ("num_classes", "in_channels", "input_size")


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return MODELS.names()


def accepted_arguments(name: str) -> list[str]:
    """Keyword arguments the factory of model `name` accepts (common ones first)."""
    signature = inspect.signature(MODELS.get(name))
    own = [
        parameter.name
        for parameter in signature.parameters.values()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        and parameter.name not in COMMON_ARGUMENTS
    ]
    return [*COMMON_ARGUMENTS, *own]


def normalize_input_size(input_size: Any, model: str = "model") -> tuple[int, int] | None:
    """Turn ``28``, ``[28, 28]`` or ``(28, 28)`` into ``(28, 28)``; None stays None."""
    if input_size is None:
        return None
    if isinstance(input_size, bool):
        raise ConfigError(f"{model}: input_size must be (H, W), got {input_size!r}")
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if (
        not isinstance(input_size, Sequence)
        or isinstance(input_size, str)
        or len(input_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        raise ConfigError(f"{model}: input_size must be (H, W) with positive integers, got {input_size!r}")
    return (int(input_size[0]), int(input_size[1]))


def _check_positive_int(model: str, argument: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{model}: {argument} must be a positive integer, got {value!r}")
    return value


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | Sequence[int] | int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model `name`.

    Unknown names and unknown keyword arguments raise `ConfigError` with a one-line hint.

    >>> model = create("resnet20", num_classes=100)
    >>> model.feature_points["stage3"]
    'stage3'

    `name` may also be a model spec (``package.module:callable``, ``path/to/file.py:callable``,
    ``hf:<hub id or folder>``; see `kdforge.models.specs`).

    Zoo models also take ``output`` ("linear", "sigmoid" or "relu"; `kdforge.models.heads`): an
    activation after the final linear layer, for regression targets in a known range.
    """
    if isinstance(name, str) and name not in MODELS and spec_kind(name) != "zoo":
        num_classes = _check_positive_int(name, "num_classes", num_classes)
        in_channels = _check_positive_int(name, "in_channels", in_channels)
        size = normalize_input_size(input_size, name)
        model = build_spec(name, num_classes, in_channels, size, kwargs)
        if size is not None:
            attach(model, kdforge_input_shape=(in_channels, *size))
        return model
    factory = MODELS.get(name)
    accepted = accepted_arguments(name)
    output = kwargs.pop("output", "linear") if "output" not in accepted else "linear"
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    unknown = [key for key in kwargs if key not in accepted]
    if unknown and not takes_any:
        bad = unknown[0]
        raise ConfigError(
            f"model '{name}' got unknown argument '{bad}'{closest(bad, [*accepted, 'output'])}; it accepts: "
            f"{', '.join(accepted)} (and output: {' | '.join(OUTPUTS)})"
        )
    num_classes = _check_positive_int(name, "num_classes", num_classes)
    in_channels = _check_positive_int(name, "in_channels", in_channels)
    size = normalize_input_size(input_size, name)
    model = factory(num_classes=num_classes, in_channels=in_channels, input_size=size, **kwargs)
    if output != "linear":  # (a factory with an `output` argument of its own keeps it)
        model = apply_output(model, output, name)
    if size is not None:  # the data's shape: feature methods built by hand probe with it
        attach(model, kdforge_input_shape=(in_channels, *size))
    return model
