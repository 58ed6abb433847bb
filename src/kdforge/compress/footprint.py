"""The compression report: size, compute and CPU speed of a student against its teacher.

For each network: parameters (and non-zero parameters, which is what unstructured pruning
reduces), forward FLOPs and MACs for one sample (``kdforge.models.count_flops``: convolutions and
matrix products, 2 FLOPs per multiply-accumulate), the size of its float32 weights on disk (the
serialised state dict), and the median CPU latency at batch 1 and 64 (eval mode, no grad).
Against a teacher, as the seed papers report it (e.g. "2.08x compression, 3.5x computation"):

* ``compression_rate``  = teacher parameters / student parameters;
* ``computation_rate``  = teacher FLOPs / student FLOPs;
* ``sparse_compression_rate`` = teacher non-zero parameters / student non-zero parameters;
* ``speedup`` = teacher latency / student latency at each batch size.

``kdforge profile MODEL_OR_CHECKPOINT --teacher OTHER`` prints it (:mod:`kdforge.commands.profile`);
every run's ``summary.json`` has it under ``compression`` (against the run's first teacher, when
it has one; :mod:`kdforge.engine.trainer`).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdforge.models.profile import count_flops, count_parameters, measure_latency


def size_on_disk(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the weights file of the float network."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getbuffer().nbytes


def nonzero_parameters(model: nn.Module) -> int:
    return int(sum(int((p.detach() != 0).sum()) for p in model.parameters()))


def describe(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    repeats: int = 10,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Size, compute and latency of one network (measured on a CPU copy; ``batch_sizes=()`` skips latency)."""
    network = copy.deepcopy(model).cpu().eval()
    shape = tuple(int(v) for v in input_shape)
    flops = count_flops(network, shape)
    latency = {str(b): 1000.0 * measure_latency(network, shape, b, warmup, repeats, num_threads) for b in batch_sizes}
    return {
        "parameters": count_parameters(network),
        "nonzero_parameters": nonzero_parameters(network),
        "flops": flops,
        "macs": flops // 2,
        "size_bytes": size_on_disk(network),
        "latency_ms": latency,
        "threads": num_threads or torch.get_num_threads(),
    }


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def compare(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """Rates of a described student against a described teacher."""
    rates: dict[str, Any] = {
        "compression_rate": _ratio(teacher["parameters"], student["parameters"]),
        "computation_rate": _ratio(teacher["flops"], student["flops"]),
        "sparse_compression_rate": _ratio(teacher["nonzero_parameters"], student["nonzero_parameters"]),
        "size_rate": _ratio(teacher["size_bytes"], student["size_bytes"]),
        "speedup": {
            b: _ratio(teacher["latency_ms"][b], student["latency_ms"][b])
            for b in student.get("latency_ms", {})
            if b in teacher.get("latency_ms", {})
        },
    }
    rates["text"] = headline(rates)
    return rates


def headline(rates: dict[str, Any]) -> str:
    """``"2.08x compression, 3.50x computation"`` (the seed papers' phrasing)."""
    parts = []
    if rates.get("compression_rate"):
        parts.append(f"{rates['compression_rate']:.2f}x compression")
    if rates.get("computation_rate"):
        parts.append(f"{rates['computation_rate']:.2f}x computation")
    speed = rates.get("speedup") or {}
    shown = [f"{v:.2f}x at batch {b}" for b, v in speed.items() if v]
    if shown:
        parts.append("CPU speed-up " + ", ".join(shown))
    return ", ".join(parts)


def compression_report(
    student: nn.Module,
    input_shape: Sequence[int],
    teacher: nn.Module | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    repeats: int = 10,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """``{"input_shape", "student": {...}, "teacher": {...} | None, rates...}``."""
    report: dict[str, Any] = {
        "input_shape": list(input_shape),
        "student": describe(student, input_shape, batch_sizes, warmup, repeats, num_threads),
        "teacher": None,
    }
    if teacher is not None:
        report["teacher"] = describe(teacher, input_shape, batch_sizes, warmup, repeats, num_threads)
        report.update(compare(report["student"], report["teacher"]))
    return report


__all__ = ["compare", "compression_report", "describe", "headline", "nonzero_parameters", "size_on_disk"]
