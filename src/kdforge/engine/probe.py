"""Choose the memory layout of a run's networks by timing them, once, before training.

``channels_last`` (NHWC) is faster for most convolutional networks on recent CPUs and GPUs and
slower for some (it depends on the layer shapes and on the kernels of the device), so with
``train.channels_last: probe`` the trainer times, on the run's own device and batch:

* the student's training step (forward, cross-entropy, backward) on a copy of the student, in
  both layouts (the copy keeps the real student's weights, BatchNorm statistics and gradients
  untouched), and
* each teacher's inference-mode forward, in both layouts,

and keeps channels_last for a network only when it is at least ``margin`` (5%) faster. The
decision and the timings go into the run's ``summary.json`` (``memory_format``). Networks that
do not take 4-D images (MLPs, tabular data) are not probed. Timing noise can flip a close call
between two runs, so ``probe`` trades bitwise reproducibility across fresh runs for speed (a
resumed run reuses its first choice); the default ``auto`` decides by the network alone.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CL = torch.channels_last


def has_conv2d(model: nn.Module) -> bool:
    """True when ``model`` holds a 2-D convolution (the layers channels_last changes)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _student_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        output = model(images)
        logits = output if isinstance(output, torch.Tensor) else output[0]
        F.cross_entropy(logits, labels).backward()
        model.zero_grad(set_to_none=True)

    return step


def _forward(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode():
            model(images)

    return forward


def probe_channels_last(
    student: nn.Module,
    teachers: list[nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    repeats: int = 3,
    margin: float = 0.05,
) -> dict[str, Any]:
    """Time the student step and each teacher forward in both layouts; returns the decision.

    ``{"student": bool, "teachers": [bool, ...], "ms": {...}}``: True means channels_last.
    """
    decision: dict[str, Any] = {"student": False, "teachers": [False] * len(teachers), "ms": {}}
    if images.dim() != 4:
        decision["reason"] = "inputs are not 4-D images"
        return decision
    device = images.device
    contiguous = images.contiguous()
    nhwc = images.contiguous(memory_format=_CL)
    if has_conv2d(student):
        probe = copy.deepcopy(student).train()
        plain = _seconds(_student_step(probe, contiguous, labels), device, repeats)
        probe = probe.to(memory_format=_CL)  # type: ignore[call-overload]
        fast = _seconds(_student_step(probe, nhwc, labels), device, repeats)
        del probe
        decision["student"] = fast < (1 - margin) * plain
        decision["ms"]["student_step"] = {"contiguous": 1000 * plain, "channels_last": 1000 * fast}
    for i, teacher in enumerate(teachers):
        if not has_conv2d(teacher):
            continue
        plain = _seconds(_forward(teacher, contiguous), device, repeats)
        teacher.to(memory_format=_CL)  # type: ignore[call-overload]  # frozen: in place and back changes no value
        fast = _seconds(_forward(teacher, contiguous), device, repeats)
        keep = fast < (1 - margin) * plain
        if not keep:
            teacher.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        decision["teachers"][i] = keep
        decision["ms"][f"teacher{i}_forward"] = {"contiguous": 1000 * plain, "channels_last": 1000 * fast}
    return decision


__all__ = ["has_conv2d", "probe_channels_last"]
