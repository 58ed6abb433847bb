"""Read intermediate features of any `nn.Module` with forward hooks.

>>> model = create("resnet20")
>>> with FeatureTap(model, ["stage3", "pool"]) as tap:
...     logits = model(images)
...     tap.features["stage3"].shape     # B x 64 x 8 x 8
...     tap.features["pool"].shape       # B x 64

Names are module names (as in ``model.named_modules()``, e.g. ``"layer1.0.conv2"``) or
logical names from ``model.feature_points`` (kdforge models define ``stem``, ``stageK``,
``stageK_preact``, ``pool``, ``logits``). A forward pre-hook on the model starts a fresh
``features`` dict at every forward, so features never leak from one batch into the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdforge.core.errors import ConfigError, closest
from kdforge.models.precision import to_float32


def module_names(model: nn.Module) -> list[str]:
    """Names of every submodule of `model` that a FeatureTap can hook, in registration order."""
    return [name for name, _ in model.named_modules() if name]


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _detach(v) for k, v in value.items()}
    return value


def resolve_feature_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Map each requested name to a module name, raising a one-line ConfigError for unknown ones."""
    points: Mapping[str, str] = getattr(model, "feature_points", None) or {}
    modules = dict(model.named_modules())
    resolved: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"feature names must be strings, got {name!r}")
        target = points.get(name, name)
        if not target or target not in modules:
            model_name = type(model).__name__
            if name in points:
                raise ConfigError(
                    f"feature point '{name}' of {model_name} names module '{target}', which does "
                    f"not exist; use kdforge.models.module_names(model) to list the modules"
                )
            choices = [*points, *(n for n in modules if n)]
            logical = f"; feature points: {', '.join(points)}" if points else ""
            raise ConfigError(
                f"{model_name} has no module or feature point '{name}'{closest(name, choices)}; "
                f"use kdforge.models.module_names(model) to list them{logical}"
            )
        resolved[name] = target
    return resolved


class FeatureTap:
    """Forward hooks that collect the outputs of named modules into ``tap.features``.

    Args:
        model: any ``nn.Module``.
        names: one name or several; module names or keys of ``model.feature_points``.
        detach: store detached tensors (for teachers or logging); by default the stored
            tensors keep their autograd graph so losses on them train the model.

    ``tap.features`` maps each requested name (as given) to the output of its module in the
    latest forward of ``model``, in the order the modules ran; it is a fresh dict at every
    forward. A module called several times in one forward keeps its last output. A deep
    copy of the tapped model does not feed this tap. Use as a context manager, or call
    ``remove()``: hooks go away and stored tensors are released.
    """

    def __init__(self, model: nn.Module, names: str | Iterable[str], detach: bool = False) -> None:
        if isinstance(names, str):
            names = [names]
        names = list(dict.fromkeys(names))
        if not names:
            raise ConfigError("FeatureTap needs at least one feature name")
        self.model = model
        self.detach = detach
        self.module_for: dict[str, str] = resolve_feature_names(model, names)
        self.features: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []

        keys_by_module: dict[str, list[str]] = {}
        for name, module_name in self.module_for.items():
            keys_by_module.setdefault(module_name, []).append(name)
        modules = dict(model.named_modules())
        self._handles.append(model.register_forward_pre_hook(self._make_pre_hook()))
        for module_name, keys in keys_by_module.items():
            target = modules[module_name]
            self._handles.append(target.register_forward_hook(self._make_hook(target, tuple(keys))))

    @property
    def names(self) -> list[str]:
        """The requested names, in order."""
        return list(self.module_for)

    @property
    def active(self) -> bool:
        """True until `remove()` is called."""
        return bool(self._handles)

    # Hooks are plain closures (a deep copy of the model shares them instead of copying this
    # tap) and check the module they fire for, so the forwards of a copy (an EMA teacher made
    # from a tapped student, say) leave this tap alone.
    def _make_pre_hook(self):
        def start_forward(module: nn.Module, args: Any) -> None:
            if module is self.model:
                self.features = {}

        return start_forward

    def _make_hook(self, target: nn.Module, keys: tuple[str, ...]):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if module is not target:
                return
            # detached (teacher) features in float32 even from a bfloat16 forward (models/precision.py)
            value = to_float32(_detach(output)) if self.detach else output
            for key in keys:
                self.features[key] = value

        return hook

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """Run the model; return ``(output, features)``."""
        if not self.active:
            raise RuntimeError("this FeatureTap was removed; create a new one")
        output = self.model(*args, **kwargs)
        return output, self.features

    def clear(self) -> None:
        """Drop the stored features (the hooks stay)."""
        self.features = {}

    def remove(self) -> None:
        """Remove every hook and release the stored tensors. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.features = {}

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"FeatureTap({type(self.model).__name__}, {self.names}, detach={self.detach}, {state})"


__all__ = ["FeatureTap", "module_names", "resolve_feature_names"]
