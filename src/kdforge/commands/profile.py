"""``kdforge profile``: the compression report (:mod:`kdforge.compress.footprint`) of a zoo name or
a model file, against an optional teacher, and its human-readable table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdforge.compress.arch import input_shape_of, load_model_file
from kdforge.compress.footprint import compression_report
from kdforge.core.checkpoint import read_model_file
from kdforge.core.errors import KDForgeError
from kdforge.models import create


def _is_file(spec: str) -> bool:
    path = Path(spec)
    return path.is_file() or path.suffix in (".pt", ".pth")


def _network(spec: str, classes: int, shape: tuple[int, int, int] | None) -> tuple[nn.Module, tuple, str, int]:
    """A zoo name, a model spec or a model file -> (model, input shape, display name, classes)."""
    path = Path(spec)
    if _is_file(spec):
        model, record = load_model_file(path)
        saved = record.get("model") or {}
        return model, shape or input_shape_of(record), f"{saved.get('name')} ({path.name})", saved.get("num_classes")
    shape = shape or (3, 32, 32)
    return create(spec, num_classes=classes, in_channels=shape[0], input_size=shape[1:]), shape, spec, classes


def profile_networks(
    model: str,
    teacher: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    classes: int | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    num_threads: int | None = None,
) -> tuple[dict[str, Any], tuple[str, str]]:
    """``kdforge profile``: the report of a zoo name, model spec or model file, against an optional
    teacher. A zoo-name model profiled against a teacher's model file takes the teacher's input
    shape and classes unless given; inputs the two cannot share are one error line."""
    teacher_record = None
    if teacher and _is_file(teacher) and not _is_file(model):
        teacher_record = read_model_file(teacher)
        input_shape = input_shape or input_shape_of(teacher_record)
        classes = classes or (teacher_record.get("model") or {}).get("num_classes")
    student, shape, student_name, classes = _network(model, classes or 100, input_shape)
    teacher_model, teacher_name = None, "teacher"
    if teacher:
        if _is_file(teacher):
            saved = read_model_file(teacher) if teacher_record is None else teacher_record
            theirs, ours = "x".join(map(str, input_shape_of(saved))), "x".join(map(str, shape))
            if theirs.split("x")[0] != ours.split("x")[0]:
                raise KDForgeError(
                    f"teacher '{teacher}' takes {theirs} input but {student_name} is profiled at {ours}; "
                    f"compare networks of the same data (--input {theirs})"
                )
        teacher_model, _, teacher_name, _ = _network(teacher, classes, tuple(shape))
    try:
        report = compression_report(student, shape, teacher_model, batch_sizes, num_threads=num_threads)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        size = "x".join(map(str, shape))
        raise KDForgeError(
            f"profiling on {size} inputs failed ({first}); pass --input CxHxW matching the networks"
        ) from None
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
