"""``kdforge profile``: the compression report (:mod:`kdforge.compress.footprint`) of a zoo name or
a model file, against an optional teacher, and its human-readable table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.compress.arch import input_shape_of, load_model_file
from kdforge.compress.footprint import compression_report
from kdforge.models import create


def _network(spec: str, classes: int, shape: tuple[int, int, int] | None) -> tuple[nn.Module, tuple, str, int]:
    """A zoo name or a model file -> (model, input shape, display name, classes)."""
    path = Path(spec)
    if path.is_file() or path.suffix in (".pt", ".pth"):
        model, record = load_model_file(path)
        saved = record.get("model") or {}
        return model, shape or input_shape_of(record), f"{saved.get('name')} ({path.name})", saved.get("num_classes")
    shape = shape or (3, 32, 32)
    return create(spec, num_classes=classes, in_channels=shape[0], input_size=shape[1:]), shape, spec, classes


def profile_networks(
    model: str,
    teacher: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    classes: int = 100,
    batch_sizes: Sequence[int] = (1, 64),
    num_threads: int | None = None,
) -> tuple[dict[str, Any], tuple[str, str]]:
    """``kdforge profile``: the report of a zoo name or model file, against an optional teacher."""
    student, shape, student_name, classes = _network(model, classes, input_shape)
    teacher_model, teacher_name = None, "teacher"
    if teacher:
        teacher_model, _, teacher_name, _ = _network(teacher, classes, tuple(shape))
    report = compression_report(student, shape, teacher_model, batch_sizes, num_threads=num_threads)
    report["classes"] = classes
    return report, (student_name, teacher_name)


def format_report(report: dict[str, Any], student_name: str = "student", teacher_name: str = "teacher") -> str:
    """Human-readable lines for ``kdforge profile``."""
    lines = []
    rows = [(student_name, report["student"])]
    if report.get("teacher"):
        rows.append((teacher_name, report["teacher"]))
    batches = list(report["student"]["latency_ms"])
    header = ["network", "params", "non-zero", "FLOPs", "MACs", "size"] + [f"CPU ms b{b}" for b in batches]
    table = [header]
    for name, d in rows:
        table.append(
            [
                name,
                f"{d['parameters']:,}",
                f"{d['nonzero_parameters']:,}",
                f"{d['flops'] / 1e6:,.1f}M",
                f"{d['macs'] / 1e6:,.1f}M",
                f"{d['size_bytes'] / 1e6:.2f} MB",
            ]
            + [f"{d['latency_ms'][b]:.2f}" for b in batches]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if report.get("text"):
        lines.append(f"{student_name} vs {teacher_name}: {report['text']}")
    return "\n".join(lines)


__all__ = ["format_report", "profile_networks"]
