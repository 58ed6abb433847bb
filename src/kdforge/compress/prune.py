"""Pruning that yields genuinely smaller models: magnitude (unstructured) and filter (structured).

**Unstructured magnitude pruning** (``magnitude_prune``) zeroes the smallest weights of every
conv/linear layer (``prunable_layers``) to an exact sparsity, per layer or globally, with
``magnitude_mask`` from the shared core (``kdforge.compress.proximal``). ``keep_masks`` holds the
zeros at zero during fine-tuning (gradient hooks, so SGD momentum and weight decay cannot revive
them). The tensor stays dense: the gain is in compressed size, not in speed.

**Structured filter pruning** (``prune_filters``) removes whole output filters, ranked by their L1
or L2 norm (``magnitude_mask(..., structured=True)``), and *physically* deletes them together with
everything that depends on them: the matching BN channels, depthwise filters, and the input
channels of every consumer downstream. Channels that meet in an addition (residual streams) form
one *group* and are pruned together; their importance is the norm of the concatenated filters of
all the group's producers (L1: the sum of the filter norms; L2: the group-lasso norm).

The dependencies are found by tracing the model with ``torch.fx`` (``channel_groups``), so any
model built from convs, linears, BN, element-wise activations (ReLU, LMA, ...), pooling,
flatten-after-global-pooling and additions is handled: the zoo's ResNets, WRNs, VGGs,
MobileNetV2s, LeNets and MLPs. Channels that reach an operation we do not understand (a
concatenation, a channel shuffle, the network output or input) are left alone.

The pruned network keeps its class and its module names; only shapes change. Its model file
records the new shapes (``{"op": "resize", "modules": {...}}``, see ``kdforge.compress.arch``), so
``kdforge eval``, ``kdforge export`` and recipes (teacher or student checkpoints) rebuild it.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from kdforge.compress.lma import LMA
from kdforge.compress.proximal import magnitude_mask, prunable_layers, sparsity_of
from kdforge.core.errors import ConfigError
from kdforge.models.taps import FeatureTap
from kdforge.models.vgg import MaxPoolIfLarge

# ----------------------------------------------------------------------------- unstructured


def magnitude_prune(
    model: nn.Module, sparsity: float, scope: str = "layer", skip: Sequence[str] = ()
) -> dict[str, Tensor]:
    """Zero the smallest-magnitude weights of every conv/linear layer in place; returns the keep-masks.

    ``scope="layer"`` removes exactly ``round(sparsity * n)`` weights of each layer; ``"global"``
    ranks all layers' weights together and removes ``round(sparsity * total)``. Layers whose name
    starts with an entry of ``skip`` are left dense.
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"magnitude pruning: sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"magnitude pruning: scope must be 'layer' or 'global', got {scope!r}")
    layers = [(n, m) for n, m in prunable_layers(model) if not any(n.startswith(s) for s in skip)]
    if not layers:
        raise ConfigError(f"magnitude pruning: {type(model).__name__} has no conv or linear layer to prune")
    masks: dict[str, Tensor] = {}
    if scope == "layer":
        for name, module in layers:
            masks[name] = magnitude_mask(module.weight.detach(), sparsity)
    else:
        flat = torch.cat([m.weight.detach().reshape(-1) for _, m in layers])
        keep = magnitude_mask(flat, sparsity)
        offset = 0
        for name, module in layers:
            n = module.weight.numel()
            masks[name] = keep[offset : offset + n].view_as(module.weight)
            offset += n
    with torch.no_grad():
        for name, module in layers:
            module.weight.mul_(masks[name].to(module.weight.dtype))
    return masks


def zero_masks(model: nn.Module) -> dict[str, Tensor]:
    """Keep-masks that hold the current zeros of every conv/linear weight (``weight != 0``)."""
    return {name: module.weight.detach() != 0 for name, module in prunable_layers(model)}


def keep_masks(model: nn.Module, masks: dict[str, Tensor]) -> list[Any]:
    """Hold masked weights at zero while training: gradients are masked, so optimizers (SGD with
    momentum and weight decay, Adam, AdamW) never move a zero, and in training mode each forward
    re-applies the mask (a safety net after a manual edit). Returns the hook handles."""
    modules = dict(model.named_modules())
    handles = []
    for name, mask in masks.items():
        module = modules[name]
        weight = module.weight
        with torch.no_grad():
            weight.mul_(mask.to(weight.dtype))
        module.register_buffer("weight_keep_mask", mask.clone(), persistent=False)

        def mask_grad(grad: Tensor, module: nn.Module = module) -> Tensor:
            return grad * module.weight_keep_mask.to(grad.dtype)

        def reapply(module: nn.Module, args: Any) -> None:
            if module.training:
                with torch.no_grad():
                    module.weight.mul_(module.weight_keep_mask.to(module.weight.dtype))

        handles.append(weight.register_hook(mask_grad))
        handles.append(module.register_forward_pre_hook(reapply))
    return handles


# ----------------------------------------------------------------------------- channel groups

#: modules that act on every channel alike (or channel by channel): the channel space passes through
CHANNELWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, LMA,
)  # fmt: skip
_UNARY_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.neg, torch.abs, torch.nn.functional.relu,
    torch.nn.functional.relu6, torch.nn.functional.leaky_relu, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.nn.functional.hardswish, torch.nn.functional.sigmoid,
    torch.nn.functional.dropout, torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d, operator.neg,
}  # fmt: skip
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "neg", "abs", "contiguous", "clone", "float", "to", "detach"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "sub", "mul", "div"}
_FLATTEN = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


def _channelwise_extra() -> tuple[type, ...]:
    return (MaxPoolIfLarge,)  # pooling that only sometimes happens


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


@dataclass
class ChannelGroup:
    """Channels that must be pruned together (one index space shared by all the members)."""

    size: int
    producers: list[str] = field(default_factory=list)  # conv/linear whose outputs are these channels
    depthwise: list[str] = field(default_factory=list)  # depthwise convs mapping the space to itself
    norms: list[str] = field(default_factory=list)  # BatchNorms over the space
    consumers: list[str] = field(default_factory=list)  # conv/linear that read the space as input
    frozen: str | None = None  # why the group cannot be pruned (None: it can)

    @property
    def prunable(self) -> bool:
        return self.frozen is None and bool(self.producers) and self.size > 1

    @property
    def coupled(self) -> bool:
        """Several producers meet here (an addition: a residual stream)."""
        return len(self.producers) > 1


class _Spaces:
    """Union-find over channel spaces; a frozen flag travels with the union."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, size: int, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        if frozen:
            self.frozen[len(self.parent) - 1] = frozen
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def freeze(self, a: int, why: str) -> None:
        self.frozen.setdefault(self.find(a), why)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        self.parent[rb] = ra
        if self.size[ra] != self.size[rb]:
            self.frozen.setdefault(ra, "channel counts disagree")
        why = self.frozen.pop(rb, None)
        if why:
            self.frozen.setdefault(ra, why)
        return ra


class _LeafTracer(fx.Tracer):
    """Trace through containers and blocks; modules without children (and torch.nn ones) are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or next(iter(m.children()), None) is None


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def trace(model: nn.Module, input_shape: Sequence[int]) -> fx.GraphModule:
    """``torch.fx`` graph of ``model`` with every node's output shape (for a batch of 2, eval mode)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is one message
        raise ConfigError(
            f"structured pruning could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc})"
        ) from None
    module = fx.GraphModule(model, graph)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            ShapeProp(module).propagate(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
    return module


def channel_groups(model: nn.Module, input_shape: Sequence[int]) -> list[ChannelGroup]:
    """The channel groups of ``model`` (prunable or not), in order of first appearance."""
    return _ChannelAnalysis(model, input_shape).groups()


def _channels(node: Any) -> int | None:
    shape = _shape(node)
    return shape[1] if shape is not None and len(shape) >= 2 else None


class _ChannelAnalysis:
    """One walk over the traced graph of a network: every tensor gets a channel space (union-find);
    modules record which spaces they read (``in``) and write (``out``); an operation whose channel
    layout is not understood freezes the spaces it touches, with the reason."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.graph_module = trace(model, input_shape)
        self.modules = dict(model.named_modules())
        self.spaces = _Spaces()
        self.space_of: dict[fx.Node, int] = {}
        self.roles: dict[str, dict[str, Any]] = {}  # module name -> {"kind", "in", "out"}
        self.channelwise = CHANNELWISE + _channelwise_extra()

    def groups(self) -> list[ChannelGroup]:
        for node in self.graph_module.graph.nodes:
            self._visit(node)
        return self._collect()

    # ------------------------------------------------------------------ spaces
    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
        return [n for n in found if n in self.space_of]

    def _fresh(self, node: fx.Node, frozen: str | None = None) -> None:
        size = _channels(node)
        if size is not None:
            self.space_of[node] = self.spaces.new(size, frozen)

    def _opaque(self, node: fx.Node, why: str) -> None:
        for source in self._inputs(node):
            self.spaces.freeze(self.space_of[source], why)
        self._fresh(node, why)

    def _passthrough(self, node: fx.Node, source: Any) -> None:
        if isinstance(source, fx.Node) and source in self.space_of and _channels(node) == _channels(source):
            self.space_of[node] = self.space_of[source]
        else:
            self._opaque(node, f"'{node.name}' changes the channel layout")

    def _module_space(self, name: str, key: str, space: int) -> int:
        """A module called several times must see the same space each time."""
        role = self.roles.setdefault(name, {})
        if key in role:
            return self.spaces.union(role[key], space)
        role[key] = space
        return space

    # ------------------------------------------------------------------ nodes
    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._fresh(node, "network input")
        elif node.op == "output":
            for source in self._inputs(node):
                self.spaces.freeze(self.space_of[source], "network output")
        elif node.op == "get_attr":
            self._fresh(node, f"tensor attribute '{node.target}'")
        elif node.op == "call_module":
            self._visit_module(node)
        elif node.op in ("call_function", "call_method"):
            self._visit_function(node)

    def _visit_module(self, node: fx.Node) -> None:
        module = self.modules[node.target]
        name = node.target
        source = node.args[0] if node.args else None
        shape_in = _shape(source)
        if source not in self.space_of or shape_in is None:
            self._opaque(node, f"module '{name}' has an unsupported input")
        elif isinstance(module, nn.Conv2d):
            if module.groups == 1:
                self._dense(node, name, "conv", source, module.out_channels)
            elif _is_depthwise(module):
                self._same_space(node, name, "depthwise", source)
            else:
                self._opaque(node, f"grouped convolution '{name}'")
        elif isinstance(module, nn.Linear):
            if len(shape_in) != 2:
                self._opaque(node, f"linear '{name}' on a {len(shape_in)}-d input")
            else:
                self._dense(node, name, "linear", source, module.out_features)
        elif isinstance(module, _BatchNorm):
            self._same_space(node, name, "norm", source)
        elif isinstance(module, nn.Flatten):
            if module.start_dim == 1 and math.prod(shape_in[2:]) == 1:
                self._passthrough(node, source)
            else:
                self._opaque(node, f"flatten '{name}' of a spatial map")
        elif isinstance(module, self.channelwise) and len(node.args) == 1:
            self._passthrough(node, source)
        else:
            self._opaque(node, f"module '{name}' ({type(module).__name__})")

    def _dense(self, node: fx.Node, name: str, kind: str, source: fx.Node, out_size: int) -> None:
        """A conv or linear: reads the input's space, writes its own (the same one at every call)."""
        self.roles.setdefault(name, {})["kind"] = kind
        self._module_space(name, "in", self.space_of[source])
        out = self.roles[name].get("out")
        self.space_of[node] = out if out is not None else self.spaces.new(out_size)
        self._module_space(name, "out", self.space_of[node])

    def _same_space(self, node: fx.Node, name: str, kind: str, source: fx.Node) -> None:
        """A depthwise conv or a BatchNorm: its output stays in its input's space."""
        self.roles.setdefault(name, {})["kind"] = kind
        self.space_of[node] = self._module_space(name, "in", self.space_of[source])

    def _visit_function(self, node: fx.Node) -> None:
        target = node.target
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a in self.space_of]
        if _shape(node) is None and (not tensors or target is getattr or target in ("size", "dim")):
            return  # shape arithmetic and the like
        method = node.op == "call_method"
        if target in _BINARY or (method and target in _BINARY_METHODS):
            self._binary(node, tensors)
        elif target in _UNARY_FUNCTIONS or (method and target in _UNARY_METHODS):
            self._passthrough(node, node.args[0] if node.args else None)
        elif target in _FLATTEN or (method and target in _FLATTEN_METHODS):
            self._flatten(node)
        else:
            self._opaque(node, f"'{node.name}' ({getattr(target, '__name__', target)})")

    def _binary(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        """An elementwise operation joins the spaces of its same-width operands (a residual addition)."""
        size = _channels(node)
        matching = [a for a in tensors if _channels(a) == size]
        others = [a for a in tensors if _channels(a) not in (size, 1)]
        if not matching or others or len(_shape(node) or ()) < 2:
            self._opaque(node, f"'{node.name}'")
            return
        space = self.space_of[matching[0]]
        for extra in matching[1:]:
            space = self.spaces.union(space, self.space_of[extra])
        self.space_of[node] = space

    def _flatten(self, node: fx.Node) -> None:
        """Flattening keeps the channels only when there is nothing spatial left (N x C x 1 x 1 -> N x C)."""
        source = node.args[0] if node.args else None
        shape_in, shape_out = _shape(source), _shape(node)
        ok = shape_in is not None and shape_out is not None and len(shape_out) == 2
        ok = ok and math.prod(shape_in[2:]) == 1 and shape_out[1] == shape_in[1]
        if ok:
            self._passthrough(node, source)
        else:
            self._opaque(node, f"reshape '{node.name}'")

    # ------------------------------------------------------------------ groups
    def _collect(self) -> list[ChannelGroup]:
        """One ChannelGroup per space left after the unions, with its members and frozen reason."""
        groups: dict[int, ChannelGroup] = {}

        def group(space: int) -> ChannelGroup:
            root = self.spaces.find(space)
            if root not in groups:
                groups[root] = ChannelGroup(self.spaces.size[root])
            return groups[root]

        for name, role in self.roles.items():
            kind = role.get("kind")
            if kind in ("conv", "linear"):
                group(role["in"]).consumers.append(name)
                group(role["out"]).producers.append(name)
            elif kind == "depthwise":
                group(role["in"]).depthwise.append(name)
            elif kind == "norm":
                group(role["in"]).norms.append(name)
        for root, found in groups.items():
            found.frozen = self.spaces.frozen.get(root)
        return list(groups.values())


# ----------------------------------------------------------------------------- structured pruning


@dataclass
class PrunePlan:
    """Which channels of which groups to keep: ``keep[i]`` indexes ``groups[i]`` (None: untouched)."""

    groups: list[ChannelGroup]
    keep: list[Tensor | None]

    def pruned(self) -> list[tuple[ChannelGroup, Tensor]]:
        return [(g, k) for g, k in zip(self.groups, self.keep) if k is not None and len(k) < g.size]


def _filters(module: nn.Module) -> Tensor:
    weight = module.weight.detach()
    return weight.reshape(weight.shape[0], -1)


def plan_filter_pruning(
    model: nn.Module,
    input_shape: Sequence[int],
    amount: float,
    norm: int = 1,
    residual: bool = True,
    skip: Sequence[str] = (),
) -> PrunePlan:
    """Rank each prunable group's channels by the norm of their filters and keep the largest.

    ``amount`` is the fraction of each group's channels removed (``round(amount * size)``, at
    least one channel kept). ``residual=False`` leaves the groups fed by several producers
    (residual streams) whole; ``skip`` leaves groups with a producer whose name starts with one
    of its entries.
    """
    if not 0.0 <= float(amount) < 1.0:
        raise ConfigError(f"filter pruning: amount must be in [0, 1), got {amount}")
    if norm not in (1, 2):
        raise ConfigError(f"filter pruning: norm must be 1 or 2, got {norm}")
    modules = dict(model.named_modules())
    groups = channel_groups(model, input_shape)
    keep: list[Tensor | None] = []
    for found in groups:
        eligible = found.prunable and (residual or not found.coupled)
        eligible = eligible and not any(p.startswith(s) for p in found.producers for s in skip)
        if not eligible:
            keep.append(None)
            continue
        filters = torch.cat([_filters(modules[p]).float() for p in found.producers], dim=1)
        removed = min(round(float(amount) * found.size), found.size - 1)
        mask = magnitude_mask(filters, removed / found.size, structured=True, norm=norm)
        keep.append(mask[:, 0].nonzero().flatten().cpu())
    return PrunePlan(groups, keep)


def zero_channels(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Zero (in place) every parameter that produces a pruned channel: the producers' filters and
    biases, depthwise filters, BN scales and shifts. The network then computes exactly what the
    physically pruned one does (with ReLU-like activations, which map 0 to 0)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for found, kept in plan.pruned():
            dropped = torch.ones(found.size, dtype=torch.bool)
            dropped[kept] = False
            for name in [*found.producers, *found.depthwise, *found.norms]:
                module = modules[name]
                for attribute in ("weight", "bias"):
                    tensor = getattr(module, attribute, None)
                    if tensor is not None:
                        tensor[dropped.to(tensor.device)] = 0
    return model


def _select(tensor: Tensor | None, index: Tensor, dim: int) -> Tensor | None:
    return None if tensor is None else tensor.detach().index_select(dim, index.to(tensor.device)).clone()


def _set_parameter(module: nn.Module, attribute: str, value: Tensor | None) -> None:
    old = getattr(module, attribute)
    if value is None or old is None:
        return
    setattr(module, attribute, nn.Parameter(value, requires_grad=old.requires_grad))


def remove_channels(model: nn.Module, plan: PrunePlan) -> dict[str, dict[str, int]]:
    """Physically remove the pruned channels of ``plan`` from ``model`` (in place).

    Returns the new shapes of every module that changed, ``{name: {"in_channels": .., ...}}``:
    the ``modules`` of a model file's ``resize`` step.
    """
    modules = dict(model.named_modules())
    touched: set[str] = set()
    for found, kept in plan.pruned():
        for name in found.producers:
            module = modules[name]
            _set_parameter(module, "weight", _select(module.weight, kept, 0))
            _set_parameter(module, "bias", _select(module.bias, kept, 0))
            if isinstance(module, nn.Conv2d):
                module.out_channels = len(kept)
            else:
                module.out_features = len(kept)
            touched.add(name)
        for name in found.consumers:
            module = modules[name]
            _set_parameter(module, "weight", _select(module.weight, kept, 1))
            if isinstance(module, nn.Conv2d):
                module.in_channels = len(kept)
            else:
                module.in_features = len(kept)
            touched.add(name)
        for name in found.depthwise:
            module = modules[name]
            _set_parameter(module, "weight", _select(module.weight, kept, 0))
            _set_parameter(module, "bias", _select(module.bias, kept, 0))
            module.in_channels = module.out_channels = module.groups = len(kept)
            touched.add(name)
        for name in found.norms:
            module = modules[name]
            _set_parameter(module, "weight", _select(module.weight, kept, 0))
            _set_parameter(module, "bias", _select(module.bias, kept, 0))
            for buffer in ("running_mean", "running_var"):
                if getattr(module, buffer, None) is not None:
                    setattr(module, buffer, _select(getattr(module, buffer), kept, 0))
            module.num_features = len(kept)
            touched.add(name)
    return {name: module_shape(modules[name]) for name in sorted(touched)}


def module_shape(module: nn.Module) -> dict[str, int]:
    """The size arguments of a conv, linear or BN module (what ``resize_module`` restores)."""
    if isinstance(module, nn.Conv2d):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels, "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, _BatchNorm):
        return {"num_features": module.num_features}
    raise ConfigError(f"cannot describe the shape of a {type(module).__name__}")


def resize_module(module: nn.Module, shape: dict[str, int], name: str = "module") -> None:
    """Give a conv, linear or BN module new sizes, with uninitialised tensors (weights load next)."""

    def fresh(tensor: Tensor | None, *size: int) -> Tensor | None:
        return None if tensor is None else torch.empty(size, dtype=tensor.dtype, device=tensor.device)

    if isinstance(module, nn.Conv2d) and {"in_channels", "out_channels", "groups"} <= set(shape):
        module.in_channels, module.out_channels = shape["in_channels"], shape["out_channels"]
        module.groups = shape["groups"]
        _set_parameter(
            module,
            "weight",
            fresh(module.weight, module.out_channels, module.in_channels // module.groups, *module.kernel_size),
        )
        _set_parameter(module, "bias", fresh(module.bias, module.out_channels))
    elif isinstance(module, nn.Linear) and {"in_features", "out_features"} <= set(shape):
        module.in_features, module.out_features = shape["in_features"], shape["out_features"]
        _set_parameter(module, "weight", fresh(module.weight, module.out_features, module.in_features))
        _set_parameter(module, "bias", fresh(module.bias, module.out_features))
    elif isinstance(module, _BatchNorm) and "num_features" in shape:
        module.num_features = n = shape["num_features"]
        _set_parameter(module, "weight", fresh(module.weight, n))
        _set_parameter(module, "bias", fresh(module.bias, n))
        for buffer in ("running_mean", "running_var"):
            if getattr(module, buffer, None) is not None:
                setattr(module, buffer, fresh(getattr(module, buffer), n))
    else:
        raise ConfigError(f"cannot resize '{name}' ({type(module).__name__}) to {shape}")


def refresh_metadata(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Update a zoo model's ``stage_channels`` and ``feature_dim`` after its widths changed."""
    points = getattr(model, "feature_points", None) or {}
    stages = [p for p in points if p.startswith("stage") and p[5:].isdigit()]
    names = [*stages, *(["pool"] if "pool" in points else [])]
    if not names:
        return
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad(), FeatureTap(model, names) as tap:
            model(torch.zeros(1, *input_shape, device=device))
            features = dict(tap.features)
    except Exception:  # noqa: BLE001 - metadata is a convenience; never fail a pruning over it
        return
    finally:
        model.train(was_training)
    if stages and hasattr(model, "stage_channels"):
        model.stage_channels = [int(features[s].shape[1]) for s in stages]
    if "pool" in features and hasattr(model, "feature_dim"):
        model.feature_dim = int(features["pool"].shape[1])


def prune_filters(
    model: nn.Module,
    input_shape: Sequence[int],
    amount: float,
    norm: int = 1,
    residual: bool = True,
    skip: Sequence[str] = (),
) -> dict[str, dict[str, int]]:
    """Structured pruning in place: plan (filter norms), remove the channels, refresh metadata.

    Returns the changed module shapes (the model file's ``resize`` step). ``input_shape`` is one
    sample's (C, H, W) shape, used to trace the model.
    """
    plan = plan_filter_pruning(model, input_shape, amount, norm, residual, skip)
    if amount > 0 and not plan.pruned():
        raise ConfigError(
            f"filter pruning found no prunable channel group in {type(model).__name__} "
            "(every group reaches the output, an unsupported operation, or is skipped)"
        )
    shapes = remove_channels(model, plan)
    refresh_metadata(model, input_shape)
    return shapes


def plan_zero_filters(model: nn.Module, input_shape: Sequence[int], residual: bool = True) -> PrunePlan:
    """Plan removing the channels whose producer filters (and biases) are all exactly zero, e.g.
    after group soft-thresholding (``proximal.group_soft_threshold``) drove whole filters to zero.

    The channel's BN shift can still make it a non-zero constant; removing it then changes the
    network slightly (fine-tune afterwards). At least one channel of each group is kept.
    """
    modules = dict(model.named_modules())
    groups = channel_groups(model, input_shape)
    keep: list[Tensor | None] = []
    for found in groups:
        if not found.prunable or (found.coupled and not residual):
            keep.append(None)
            continue
        alive = torch.zeros(found.size, dtype=torch.bool)
        for name in found.producers:
            module = modules[name]
            alive |= (_filters(module) != 0).any(1).cpu()
            if getattr(module, "bias", None) is not None:
                alive |= (module.bias.detach() != 0).cpu()
        if not alive.any():
            alive[0] = True
        keep.append(alive.nonzero().flatten())
    return PrunePlan(groups, keep)


def remove_zero_filters(
    model: nn.Module, input_shape: Sequence[int], residual: bool = True
) -> dict[str, dict[str, int]]:
    """Physically remove all-zero filters (see ``plan_zero_filters``); returns the changed shapes."""
    shapes = remove_channels(model, plan_zero_filters(model, input_shape, residual))
    refresh_metadata(model, input_shape)
    return shapes


def masked_copy(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A deep copy of ``model`` with the plan's channels zeroed (the reference for a pruned model)."""
    return zero_channels(copy.deepcopy(model), plan)


__all__ = [
    "CHANNELWISE",
    "ChannelGroup",
    "PrunePlan",
    "channel_groups",
    "keep_masks",
    "magnitude_prune",
    "masked_copy",
    "module_shape",
    "plan_filter_pruning",
    "plan_zero_filters",
    "prune_filters",
    "refresh_metadata",
    "remove_channels",
    "remove_zero_filters",
    "resize_module",
    "sparsity_of",
    "trace",
    "zero_channels",
    "zero_masks",
]
