"""Output heads for regression: every zoo network built with ``num_classes=K`` ends in a linear
layer with K outputs, which *is* its regression head (K predicted values, unbounded). ``output``
optionally squashes those values into a known range:

* ``linear`` (default): the raw values, for any target;
* ``sigmoid``: values in (0, 1), for targets normalised to [0, 1] (``rotated_mnist`` divides the
  angle by its range);
* ``relu``: values >= 0, as the regression networks of cGAN-KD's public code (Ding et al. 2023,
  ``SteeringAngle/models``) end, for non-negative normalised targets.

``kdforge.models.create(name, ..., output="sigmoid")`` (recipe: ``student.kwargs.output``) swaps
the network's last linear layer for a subclass that applies the activation. Parameter names and
initial values are unchanged, so the saved kwargs rebuild the same network from a model file, and
ONNX/TorchScript exports include the activation. For classification keep ``linear``: a squashed
logit is no logit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdforge.core.errors import ConfigError

OUTPUTS = ("linear", "sigmoid", "relu")


class ActivatedLinear(nn.Linear):
    """A linear layer followed by a fixed activation (``sigmoid`` or ``relu``); same parameters."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "sigmoid") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return torch.sigmoid(y) if self.activation == "sigmoid" else torch.relu(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, attribute, layer) of the layer that produces the network's output: the module at
    ``feature_points['logits']`` when it is linear, else the last linear layer inside it (or inside
    the whole network when it has no such point)."""
    modules = dict(model.named_modules())
    point = (getattr(model, "feature_points", None) or {}).get("logits")
    root = modules.get(point, model) if isinstance(point, str) else model
    prefix = point if isinstance(point, str) and root is not model else ""
    if isinstance(root, nn.Linear):
        name = prefix
    else:
        found = [n for n, m in root.named_modules() if isinstance(m, nn.Linear)]
        if not found:
            return None
        name = f"{prefix}.{found[-1]}" if prefix else found[-1]
    parent_name, _, attribute = name.rpartition(".")
    return modules[parent_name] if parent_name else model, attribute, modules[name]  # type: ignore[return-value]


def apply_output(model: nn.Module, output: str, name: str = "model") -> nn.Module:
    """``model`` with its last linear layer followed by ``output`` (see the module docstring)."""
    if output not in OUTPUTS:
        raise ConfigError(f"{name}: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if output == "linear":
        return model
    located = _last_linear(model)
    if located is None:
        raise ConfigError(f"{name}: output '{output}' needs a final linear layer, and {type(model).__name__} has none")
    parent, attribute, layer = located
    bounded = ActivatedLinear(layer.in_features, layer.out_features, layer.bias is not None, output)
    bounded.load_state_dict(layer.state_dict())
    bounded.to(device=layer.weight.device, dtype=layer.weight.dtype)
    setattr(parent, attribute, bounded)
    return model


__all__ = ["OUTPUTS", "ActivatedLinear", "apply_output"]
