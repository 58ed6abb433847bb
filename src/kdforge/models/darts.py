"""A small DARTS cell search space (Liu, Simonyan & Yang, "DARTS: Differentiable Architecture
Search", ICLR 2019, arXiv 1806.09055) and the network built from a searched genotype.

Written from the paper's description, scaled down for CPU search on small images:

* **Operations** (``PRIMITIVES``): ``none`` (zero), ``max_pool_3x3``, ``avg_pool_3x3``,
  ``skip_connect`` (identity; a factorised 2x reduction on stride-2 edges), ``sep_conv_3x3``,
  ``sep_conv_5x5`` (ReLU, depth-wise k x k, point-wise 1x1, BN: one separable block, where DARTS
  stacks two) and ``dil_conv_3x3`` (ReLU, depth-wise 3x3 with dilation 2, point-wise, BN).
* **Cell**: two inputs (the outputs of the two previous cells, each through ReLU-1x1 conv-BN),
  ``steps`` intermediate nodes, each the sum over its incoming edges from every earlier state;
  the output concatenates the intermediate nodes (``steps * C`` channels). A *reduction* cell
  uses stride 2 on the edges leaving its inputs; reduction cells sit at 1/3 and 2/3 of ``layers``.
* **Continuous relaxation** (``SearchNetwork``): each edge is a ``MixedOp``, the softmax over the
  edge's row of ``alphas_normal`` / ``alphas_reduce`` weighting the outputs of every operation.
* **Discretisation** (``derive_genotype``): per node, keep the ``top_k`` incoming edges with the
  largest non-``none`` weight, each with its argmax non-``none`` operation.

A genotype is a plain mapping, written as JSON by ``kdforge search``::

    {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1], ...],   # top_k (op, input) per node
     "normal_concat": [2, 3, 4], "reduce": [...], "reduce_concat": [2, 3, 4], "steps": 3}

Inputs 0 and 1 are the cell's two inputs, 2.. its intermediate nodes. ``darts_net`` builds the
discrete network (``genotype`` as that mapping or a path to its JSON file). Feature points:
``stem``, ``stage1``..``stageL`` (one per cell), ``pool`` and ``logits``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.core.errors import ConfigError, closest
from kdforge.models.common import pooled_flatten
from kdforge.models.factory import MODELS

PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
)


class Zero(nn.Module):
    """The ``none`` operation: zeros of the output's shape."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride] * 0.0


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing every other pixel: two 1x1 stride-2 convolutions, the
    second shifted by one pixel, concatenated (DARTS's skip on reduction edges)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv_a = nn.Conv2d(cin, cout // 2, 1, stride=2, bias=False)
        self.conv_b = nn.Conv2d(cin, cout - cout // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(shifted)], dim=1))


def _relu_conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


def _separable(c: int, kernel: int, stride: int, dilation: int) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(c, c, kernel, stride=stride, padding=padding, dilation=dilation, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False),
        nn.BatchNorm2d(c),
    )


OPS: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda c, stride: Zero(stride),
    "max_pool_3x3": lambda c, stride: nn.MaxPool2d(3, stride=stride, padding=1),
    "avg_pool_3x3": lambda c, stride: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "skip_connect": lambda c, stride: nn.Identity() if stride == 1 else FactorizedReduce(c, c),
    "sep_conv_3x3": lambda c, stride: _separable(c, 3, stride, 1),
    "sep_conv_5x5": lambda c, stride: _separable(c, 5, stride, 1),
    "dil_conv_3x3": lambda c, stride: _separable(c, 3, stride, 2),
}


def check_primitives(primitives: Sequence[str]) -> tuple[str, ...]:
    unknown = [p for p in primitives if p not in OPS]
    if unknown:
        raise ConfigError(
            f"unknown search operation '{unknown[0]}'{closest(unknown[0], list(OPS))}; available: {', '.join(OPS)}"
        )
    if len(set(primitives)) != len(primitives) or not [p for p in primitives if p != "none"]:
        raise ConfigError("search operations must be distinct and include at least one besides 'none'")
    return tuple(primitives)


class MixedOp(nn.Module):
    """One edge of the relaxed cell: ``sum_o w_o * o(x)`` over the candidate operations."""

    def __init__(self, c: int, stride: int, primitives: Sequence[str]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(OPS[name](c, stride) for name in primitives)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))  # type: ignore[return-value]


def _edges(steps: int) -> list[tuple[int, int]]:
    """(node, input) for every edge of a cell, node 0..steps-1, input 0..node+1, in order."""
    return [(node, source) for node in range(steps) for source in range(node + 2)]


class _CellBase(nn.Module):
    def __init__(self, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        self.pre0 = FactorizedReduce(c_pp, c) if reduction_prev else _relu_conv_bn(c_pp, c)
        self.pre1 = _relu_conv_bn(c_p, c)


class SearchCell(_CellBase):
    """A cell whose every edge is a MixedOp; ``forward`` takes the softmaxed edge weights."""

    def __init__(self, steps: int, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool, primitives):
        super().__init__(c_pp, c_p, c, reduction, reduction_prev)
        self.steps = steps
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if reduction and source < 2 else 1, primitives) for _, source in _edges(steps)
        )
        self.out_channels = steps * c

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        edge = 0
        for node in range(self.steps):
            total = 0
            for source in range(node + 2):
                total = total + self.edges[edge](states[source], weights[edge])
                edge += 1
            states.append(total)  # type: ignore[arg-type]
        return torch.cat(states[2:], dim=1)


class GenotypeCell(_CellBase):
    """A discrete cell: each node sums its chosen (operation, input) pairs."""

    def __init__(
        self, ops: Sequence[Sequence[Any]], concat: Sequence[int], steps: int, c_pp, c_p, c, reduction, reduction_prev
    ):
        super().__init__(c_pp, c_p, c, reduction, reduction_prev)
        if len(ops) % steps:
            raise ConfigError(f"genotype: {len(ops)} (op, input) pairs do not split evenly over {steps} nodes")
        self.steps = steps
        self.per_node = len(ops) // steps
        self.sources = [int(source) for _, source in ops]
        for position, (name, source) in enumerate(ops):
            node = position // self.per_node
            if name not in OPS or name == "none":
                raise ConfigError(f"genotype: unknown operation '{name}'{closest(str(name), list(OPS))}")
            if not 0 <= int(source) < node + 2:
                raise ConfigError(f"genotype: node {node + 2} takes input {source}; inputs must be 0..{node + 1}")
        self.ops = nn.ModuleList(OPS[name](c, 2 if reduction and int(source) < 2 else 1) for name, source in ops)
        self.concat = [int(i) for i in concat]
        if not self.concat or any(not 0 <= i < steps + 2 for i in self.concat):
            raise ConfigError(f"genotype: concat {list(concat)} must name states 0..{steps + 1}")
        self.out_channels = len(self.concat) * c

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for node in range(self.steps):
            first = node * self.per_node
            total = 0
            for position in range(first, first + self.per_node):
                total = total + self.ops[position](states[self.sources[position]])
            states.append(total)  # type: ignore[arg-type]
        return torch.cat([states[i] for i in self.concat], dim=1)


def _reduction_layers(layers: int) -> set[int]:
    return {layers // 3, 2 * layers // 3} if layers >= 3 else {layers - 1} if layers == 2 else set()


class _Network(nn.Module):
    """Stem (3x3 conv + BN) -> cells -> global pooling -> classifier; cells built by ``make_cell``."""

    def _build(self, num_classes: int, in_channels: int, channels: int, layers: int, stem_multiplier: int, make_cell):
        if layers < 1 or channels < 1:
            raise ConfigError(f"a DARTS network needs layers >= 1 and channels >= 1, got {layers} and {channels}")
        stem = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem))
        c_pp, c_p, c = stem, stem, channels
        reduction_prev = False
        reductions = _reduction_layers(layers)
        self.cells = nn.ModuleList()
        for index in range(layers):
            reduction = index in reductions
            if reduction:
                c *= 2
            cell = make_cell(c_pp, c_p, c, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.out_channels
        self.pool = pooled_flatten()
        self.classifier = nn.Linear(c_p, num_classes)
        self.feature_dim = c_p
        self.stage_channels = [cell.out_channels for cell in self.cells]
        self.feature_points = {
            "stem": "stem",
            **{f"stage{i + 1}": f"cells.{i}" for i in range(layers)},
            "pool": "pool",
            "logits": "classifier",
        }


class SearchNetwork(_Network):
    """The relaxed supernet: weights are the cells' parameters, the architecture is ``alphas_normal``
    and ``alphas_reduce`` (edges x operations, initialised at 1e-3 * N(0, 1) as in DARTS)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: int = 8,
        layers: int = 3,
        steps: int = 3,
        primitives: Sequence[str] = PRIMITIVES,
        stem_multiplier: int = 2,
    ) -> None:
        super().__init__()
        self.primitives = check_primitives(primitives)
        self.steps = steps
        self._build(
            num_classes,
            in_channels,
            channels,
            layers,
            stem_multiplier,
            lambda c_pp, c_p, c, red, red_prev: SearchCell(steps, c_pp, c_p, c, red, red_prev, self.primitives),
        )
        edges = len(_edges(steps))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(edges, len(self.primitives)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(self.primitives)))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def edge_weights(self) -> tuple[Tensor, Tensor]:
        """Softmax over operations, per edge, for normal and reduction cells."""
        return F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        normal, reduce = self.edge_weights()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, reduce if cell.reduction else normal)
        return self.classifier(self.pool(s1))

    def derive(self, top_k: int = 2) -> dict[str, Any]:
        """The discrete genotype of the current architecture weights (see ``derive_genotype``)."""
        normal, reduce = self.edge_weights()
        return derive_genotype(normal.detach(), reduce.detach(), self.steps, self.primitives, top_k)


def derive_genotype(
    normal: Tensor, reduce: Tensor, steps: int, primitives: Sequence[str], top_k: int = 2
) -> dict[str, Any]:
    """Per node, the ``top_k`` incoming edges with the largest non-``none`` weight, each with its
    argmax non-``none`` operation (DARTS's discretisation). ``normal``/``reduce``: edges x ops."""
    usable = [i for i, name in enumerate(primitives) if name != "none"]

    def parse(weights: Tensor) -> list[list[Any]]:
        chosen: list[list[Any]] = []
        edge = 0
        for node in range(steps):
            inputs = node + 2
            rows = weights[edge : edge + inputs][:, usable]
            best_value, best_op = rows.max(1)
            keep = min(top_k, inputs)
            order = sorted(range(inputs), key=lambda j: (-float(best_value[j]), j))[:keep]
            for source in sorted(order):
                chosen.append([primitives[usable[int(best_op[source])]], source])
            edge += inputs
        return chosen

    concat = list(range(2, steps + 2))
    return {
        "normal": parse(normal),
        "normal_concat": list(concat),
        "reduce": parse(reduce),
        "reduce_concat": list(concat),
        "steps": steps,
    }


def load_genotype(genotype: Any) -> dict[str, Any]:
    """A genotype mapping, or the JSON file at the path ``genotype`` names, checked for its keys."""
    if isinstance(genotype, str | Path):
        path = Path(genotype)
        if not path.is_file():
            raise ConfigError(f"darts_net: genotype file '{path}' does not exist; run `kdforge search` to write one")
        try:
            genotype = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"darts_net: genotype file '{path}' is not JSON ({error})") from None
    if not isinstance(genotype, dict):
        raise ConfigError(
            f"darts_net: genotype must be a mapping or a path to a JSON file, got {type(genotype).__name__}"
        )
    missing = [k for k in ("normal", "normal_concat", "reduce", "reduce_concat", "steps") if k not in genotype]
    if missing:
        raise ConfigError(f"darts_net: the genotype lacks '{missing[0]}'; write it with `kdforge search`")
    return genotype


class GenotypeNetwork(_Network):
    """The discrete network of a genotype (``darts_net``)."""

    def __init__(
        self,
        genotype: Any,
        num_classes: int = 10,
        in_channels: int = 3,
        channels: int = 8,
        layers: int = 3,
        stem_multiplier: int = 2,
    ) -> None:
        super().__init__()
        self.genotype = load_genotype(genotype)
        g, steps = self.genotype, int(self.genotype["steps"])

        def make(c_pp, c_p, c, reduction, reduction_prev):
            ops, concat = (g["reduce"], g["reduce_concat"]) if reduction else (g["normal"], g["normal_concat"])
            return GenotypeCell(ops, concat, steps, c_pp, c_p, c, reduction, reduction_prev)

        self._build(num_classes, in_channels, channels, layers, stem_multiplier, make)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.pool(s1))


@MODELS.register("darts_net")
def darts_net(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    genotype: Any = None,
    channels: int = 8,
    layers: int = 3,
    stem_multiplier: int = 2,
) -> GenotypeNetwork:
    """A DARTS network from a searched genotype (mapping or JSON path; see `kdforge search`)."""
    if genotype is None:
        raise ConfigError(
            "darts_net needs kwargs.genotype: a genotype mapping or the genotype.json `kdforge search` wrote"
        )
    return GenotypeNetwork(genotype, num_classes, in_channels, channels, layers, stem_multiplier)


__all__ = ["OPS", "PRIMITIVES", "GenotypeNetwork", "MixedOp", "SearchNetwork", "darts_net", "derive_genotype"]
