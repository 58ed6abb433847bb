"""Groups of networks for online distillation: peers, and branches that share a trunk.

Online methods (DML, ONE, CL-ILR, OKDDip, FFSD) train several networks at once and deploy one.
Two builders cover them for any network whose ``forward`` is the composition of its top-level
children in registration order (every zoo model, and most user ``nn.Sequential``-style models):

* ``fresh_copy(model)``: an independently initialised copy (a DML peer, an FFSD student);
* ``BranchedNetwork(model, split_at, branches)``: the children up to and including ``split_at``
  form a shared trunk, the later ones are copied into ``branches`` heads (branch 0 keeps the
  original modules, the others are re-initialised). ``branch_network(i)`` is an ordinary network
  of the original class whose modules are the trunk's and branch ``i``'s (shared, not copied), so
  it evaluates, saves and reloads like the zoo model it came from.

``check_sequential`` verifies the composition rule on a probe input and says what to do when a
model does not follow it.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdforge.core.errors import ConfigError


def fresh_copy(model: nn.Module, seed: int | None = None) -> nn.Module:
    """A deep copy of ``model`` with every parameter re-drawn (BN reset to identity).

    Convolutions get He (fan-out) normal weights as in the zoo; every other module with a
    ``reset_parameters`` uses it. ``seed`` makes the draw reproducible without touching the
    global generator's sequence beyond this call.
    """
    clone = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    try:
        reinitialise(clone)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    return clone


def reinitialise(module: nn.Module) -> None:
    """Re-draw a module's parameters in place (He fan-out for convs, defaults elsewhere)."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d | nn.Conv1d | nn.Conv3d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.GroupNorm | nn.LayerNorm):
            sub.reset_parameters()
        elif hasattr(sub, "reset_parameters"):
            sub.reset_parameters()  # type: ignore[operator]


def top_level(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_children())


def check_sequential(model: nn.Module, input_shape: Sequence[int], what: str = "model") -> None:
    """Raise a ConfigError unless ``model(x)`` equals its top-level children applied in order."""
    children = top_level(model)
    if not children:
        raise ConfigError(f"{what} {type(model).__name__} has no child modules to split into trunk and branches")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, *input_shape)
            expected = model(x)
            y = x
            for _, child in children:
                y = child(y)
    except Exception as exc:  # noqa: BLE001 - any failure means the rule does not hold
        raise ConfigError(
            f"{what} {type(model).__name__}: running its top-level modules in order failed ({exc}); "
            "online methods with shared trunks need a forward that is the sequence of its children"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(expected, Tensor) or expected.shape != y.shape or not torch.allclose(expected, y, atol=1e-5):
        raise ConfigError(
            f"{what} {type(model).__name__}: its forward is not the sequence of its top-level modules "
            f"({', '.join(n for n, _ in children)}); wrap it as nn.Sequential(trunk, head) to use it here"
        )


def split_index(model: nn.Module, split_at: str) -> int:
    """Position of the top-level child named ``split_at`` (a feature point name is accepted)."""
    names = [name for name, _ in top_level(model)]
    target = split_at
    points = getattr(model, "feature_points", {}) or {}
    if split_at not in names and split_at in points:
        target = points[split_at].split(".")[0]
    if target not in names:
        raise ConfigError(
            f"split point '{split_at}' is not a top-level module of {type(model).__name__}; choose one of {names[:-1]}"
        )
    index = names.index(target)
    if index >= len(names) - 1:
        raise ConfigError(f"split point '{split_at}' leaves nothing for the branches; choose one of {names[:-1]}")
    return index


def assemble(template: nn.Module, modules: Sequence[tuple[str, nn.Module]]) -> nn.Module:
    """A network of ``template``'s class whose top-level modules are ``modules`` (shared objects).

    The result has ``template``'s state-dict keys, so its model file loads into the zoo model.
    """
    shell = copy.copy(template)  # shallow: attributes shared, then its own module table
    shell._modules = OrderedDict(modules)  # type: ignore[assignment]
    shell._parameters = OrderedDict()  # type: ignore[assignment]
    shell._buffers = OrderedDict()  # type: ignore[assignment]
    for name, value in list(vars(shell).items()):  # hooks registered on the template stay there
        if name.endswith("_hooks") or name.endswith("_hooks_with_kwargs") or name.endswith("_hooks_always_called"):
            setattr(shell, name, type(value)())
    return shell


class BranchedNetwork(nn.Module):
    """A shared trunk and ``branches`` heads cut from one network at ``split_at``.

    ``forward_all(x)`` returns ``(trunk_output, features, logits)`` with one pooled feature (the
    input of each head's last module, the classifier) and one logits tensor per branch.
    """

    def __init__(
        self,
        model: nn.Module,
        split_at: str,
        branches: int,
        input_shape: Sequence[int] | None = None,
        check: bool = True,
    ) -> None:
        super().__init__()
        if branches < 1:
            raise ConfigError(f"branches must be at least 1, got {branches}")
        if check and input_shape is not None:
            check_sequential(model, input_shape)
        children = top_level(model)
        cut = split_index(model, split_at) + 1
        self.split_at = split_at
        self.trunk_names = [name for name, _ in children[:cut]]
        self.head_names = [name for name, _ in children[cut:]]
        self.trunk = nn.ModuleDict(children[:cut])
        head = nn.ModuleDict(children[cut:])
        self.heads = nn.ModuleList([head] + [fresh_copy(head) for _ in range(branches - 1)])
        # deployable views, kept out of the module tree (their parameters are the ones above)
        object.__setattr__(self, "_template", model)
        object.__setattr__(self, "_views", {})

    @property
    def num_branches(self) -> int:
        return len(self.heads)

    def run_trunk(self, x: Tensor) -> Tensor:
        for name in self.trunk_names:
            x = self.trunk[name](x)
        return x

    def run_head(self, index: int, shared: Tensor) -> tuple[Tensor, Tensor]:
        """(feature before the last module, logits) of branch ``index`` on the trunk output."""
        head = self.heads[index]
        x = shared
        for name in self.head_names[:-1]:
            x = head[name](x)
        return x, head[self.head_names[-1]](x)

    def forward_all(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        shared = self.run_trunk(x)
        features, logits = [], []
        for index in range(self.num_branches):
            feature, out = self.run_head(index, shared)
            features.append(feature)
            logits.append(out)
        return shared, features, logits

    def forward(self, x: Tensor) -> Tensor:
        return self.run_head(0, self.run_trunk(x))[1]

    def branch_network(self, index: int) -> nn.Module:
        """Trunk + branch ``index`` as a network of the original class (shared parameters)."""
        if not 0 <= index < self.num_branches:
            raise IndexError(f"branch {index} of {self.num_branches}")
        views: dict[int, nn.Module] = self._views  # type: ignore[assignment]
        if index not in views:
            head = self.heads[index]
            modules = [(n, self.trunk[n]) for n in self.trunk_names] + [(n, head[n]) for n in self.head_names]
            views[index] = assemble(self._template, modules)  # type: ignore[arg-type]
        return views[index]


class ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (CL-ILR backprop rescaling)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    if not math.isfinite(scale):
        raise ValueError(f"gradient scale must be finite, got {scale}")
    return ScaleGradient.apply(x, scale)


__all__ = [
    "BranchedNetwork",
    "assemble",
    "check_sequential",
    "fresh_copy",
    "reinitialise",
    "scale_gradient",
    "split_index",
]
