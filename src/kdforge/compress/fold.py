"""Fold BatchNorm into the convolution before it, for networks that never train again.

A frozen teacher runs its BatchNorm layers in eval mode: each one is a fixed per-channel affine map
``y = gamma * (x - mean) / sqrt(var + eps) + beta``. When ``x`` is the output of a convolution
that feeds nothing else, the map can be merged into the convolution's weights and bias
(``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output
channel) and the BatchNorm replaced by ``nn.Identity``: the network computes the same function
(up to float rounding) with one memory pass less per layer.

Which convolution feeds which BatchNorm is read from a ``torch.fx`` trace of the network, so any
model whose forward can be traced is handled; a model that cannot be traced is left as it is and
the reason is returned. A pair is skipped when it cannot be folded safely: the BatchNorm tracks no
running statistics (it would normalise with batch statistics), the convolution's output is also
used elsewhere, a parameter still trains, or either module carries forward hooks (a feature tap
reads its output, which folding would change or bypass).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_NORMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


@dataclass
class FoldReport:
    """What `fold_batchnorm` did to one network."""

    folded: list[str] = field(default_factory=list)  # names of the BatchNorms merged into their convolutions
    skipped: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> why it stayed
    error: str | None = None  # why nothing was folded (the trace failed), else None

    def as_dict(self) -> dict[str, object]:
        return {"folded": len(self.folded), "skipped": dict(self.skipped), "error": self.error}


class _Tracer(fx.Tracer):
    """Traces into containers only: a module without submodules holds no convolution/BatchNorm
    pair, so it is a leaf (its forward may branch on shapes, which fx cannot trace)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return next(m.children(), None) is None or super().is_leaf_module(m, module_qualified_name)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@torch.no_grad()
def merge_conv_bn(conv: nn.Module, norm: nn.Module) -> None:
    """Merge eval-mode BatchNorm ``norm`` into convolution ``conv`` in place (``conv`` gets a bias)."""
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None
    assert isinstance(conv, nn.modules.conv._ConvNd) and norm.running_mean is not None
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    weight = conv.weight
    shape = [-1] + [1] * (weight.dim() - 1)
    new_weight = weight.double() * scale.reshape(shape)
    old_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = old_bias * scale + shift
    weight.copy_(new_weight.to(weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=False)
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def fold_batchnorm(model: nn.Module) -> FoldReport:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    Meant for frozen networks (teachers): the model must not train afterwards. Returns a
    `FoldReport`; the model's output is unchanged up to float rounding.
    """
    report = FoldReport()
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # user models with data-dependent control flow cannot be traced
        report.error = f"{type(model).__name__} could not be traced ({type(exc).__name__}); left unfolded"
        return report
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(node.target, str):
            continue
        norm = modules.get(node.target)
        if norm is None or type(norm) not in _NORMS:
            continue
        source = node.args[0] if node.args else None
        conv = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if conv is None or _CONVS.get(type(conv)) != _NORMS[type(norm)]:
            continue  # not a convolution's output: nothing to fold into
        assert isinstance(source, fx.Node) and isinstance(norm, nn.modules.batchnorm._BatchNorm)
        why = None
        if norm.training or not norm.track_running_stats or norm.running_var is None:
            why = "uses batch statistics"
        elif len(source.users) != 1:
            why = "its convolution's output is used elsewhere"
        elif any(p.requires_grad for p in (*conv.parameters(), *norm.parameters())):
            why = "trainable"
        elif _has_hooks(conv) or _has_hooks(norm):
            why = "a feature tap reads it"
        elif calls[str(source.target)] != 1 or calls[node.target] != 1:
            why = "called more than once"
        if why:
            report.skipped[node.target] = why
        else:
            pairs.append((str(source.target), str(node.target)))
    for conv_name, norm_name in pairs:
        merge_conv_bn(modules[conv_name], modules[norm_name])
        _set_submodule(model, norm_name, nn.Identity())
        report.folded.append(norm_name)
    return report


def fold_frozen_teachers(teachers: list[nn.Module], trained: Iterable[nn.Parameter] = ()) -> dict[str, object]:
    """Fold the BatchNorms of frozen teachers (all parameters without gradients, eval mode).

    A teacher that shares a parameter with ``trained`` (the networks that keep training) or has
    a trainable parameter is left alone (``trained``: the parameters of everything that keeps
    training). Returns a summary for the run's record.
    """
    shared = {id(p) for p in trained}
    reports: list[dict[str, object]] = []
    for teacher in teachers:
        params = list(teacher.parameters())
        if teacher.training or any(p.requires_grad or id(p) in shared for p in params):
            reports.append({"folded": 0, "skipped": {}, "error": "not frozen; left unfolded"})
            continue
        reports.append(fold_batchnorm(teacher).as_dict())
    return {"folded": sum(int(r["folded"]) for r in reports), "teachers": reports}  # type: ignore[call-overload]


__all__ = ["FoldReport", "fold_batchnorm", "fold_frozen_teachers", "merge_conv_bn"]
