"""Choose the memory layout and the compilation of a run's networks by timing them, once, before training.

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

``train.compile: auto`` (the default) compiles the student with ``torch.compile`` when the run is
long enough for the compilation to pay for itself (:func:`compile_decision`): it estimates the
run's eager training time from the student's FLOPs, the batch size and the number of steps (a
deterministic estimate, so fresh runs of a recipe decide alike), and compiles when a conservative
1.3x speed-up over that time would save more than twice the expected compilation time (60 s on a
CPU, where we measured 40-125 s for a CIFAR ResNet step and a 1.45x faster step afterwards; 30 s
on a GPU). On a CPU it also needs a C++ compiler (inductor generates C++); on MPS it is not used.
"""

from __future__ import annotations

import copy
import shutil
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


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _student_step(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss: Loss | None = None
) -> Callable[[], None]:
    loss = loss or F.cross_entropy

    def step() -> None:
        output = model(images)
        logits = output if isinstance(output, torch.Tensor) else output[0]
        loss(logits, labels).backward()
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
    loss: Loss | None = None,
) -> dict[str, Any]:
    """Time the student step and each teacher forward in both layouts; returns the decision.
    ``loss(prediction, targets)`` is the task's supervised loss (cross-entropy by default).

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
        probe = copy.deepcopy(student).train().to(device)
        plain = _seconds(_student_step(probe, contiguous, labels, loss), device, repeats)
        probe = probe.to(memory_format=_CL)  # type: ignore[call-overload]
        fast = _seconds(_student_step(probe, nhwc, labels, loss), device, repeats)
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


#: expected torch.compile warm-up (seconds) by device type; the CPU figure is from these 2-core
#: machines (40 s quiet, 125 s under load, for a CIFAR ResNet training step)
COMPILE_WARMUP_SECONDS = {"cpu": 60.0, "cuda": 30.0}
#: the step speed-up assumed when deciding (we measured 1.45x for a CIFAR ResNet step on a CPU)
ASSUMED_COMPILE_SPEEDUP = 1.3
#: training throughput assumed to estimate a step's eager time from its FLOPs (optimistic, so the
#: estimate errs towards a shorter run and fewer compilations), and a GPU's per-step launch cost
ASSUMED_FLOPS_PER_SECOND = {"cpu": 1.0e11, "cuda": 1.0e13}
GPU_STEP_OVERHEAD_SECONDS = 0.005


def cpp_compiler_available() -> bool:
    """Whether inductor can build CPU kernels here (it needs a C++ compiler on the PATH)."""
    return any(shutil.which(name) for name in ("c++", "g++", "clang++", "cl"))


def estimated_step_seconds(flops_per_sample: int, batch_size: int, device_type: str) -> float:
    """A training step's eager time estimated from the student's forward FLOPs (forward + backward
    ~ 3 forwards). Deterministic, so a recipe makes the same choice on every fresh run."""
    seconds = 3.0 * flops_per_sample * batch_size / ASSUMED_FLOPS_PER_SECOND.get(device_type, 1.0e11)
    return seconds + (GPU_STEP_OVERHEAD_SECONDS if device_type == "cuda" else 0.0)


def compile_decision(
    setting: bool | str, *, total_steps: int, device_type: str, step_seconds: Callable[[], float] | None = None
) -> dict[str, Any]:
    """Whether to compile the student: ``{"compiled": bool, "reason": str, ...}``.

    ``setting`` is ``train.compile`` (true, false or "auto"); ``step_seconds`` estimates one eager
    training step on the run's device (:func:`estimated_step_seconds`), called only when ``auto``
    needs it. ``auto`` compiles when a 1.3x faster step would save more than twice the expected
    compilation time over the run.
    """
    if setting is True or setting is False:
        return {"compiled": bool(setting), "reason": f"train.compile: {str(setting).lower()}"}
    if device_type == "mps":
        return {"compiled": False, "reason": "auto: not on MPS"}
    if device_type == "cpu" and not cpp_compiler_available():
        return {"compiled": False, "reason": "auto: no C++ compiler on the PATH (inductor needs one on a CPU)"}
    if step_seconds is None:
        return {"compiled": False, "reason": "auto: no step estimate"}
    seconds = float(step_seconds())
    eager = seconds * total_steps
    warmup = COMPILE_WARMUP_SECONDS.get(device_type, 60.0)
    saving = eager * (1 - 1 / ASSUMED_COMPILE_SPEEDUP)
    compiled = saving > 2 * warmup
    return {
        "compiled": compiled,
        "reason": (
            f"auto: about {eager:.0f} s of eager training estimated; a {ASSUMED_COMPILE_SPEEDUP}x faster step "
            f"would save {saving:.0f} s, {'more' if compiled else 'less'} than twice the ~{warmup:.0f} s compilation"
        ),
        "estimated_step_ms": 1000 * seconds,
    }


__all__ = ["compile_decision", "cpp_compiler_available", "estimated_step_seconds", "has_conv2d", "probe_channels_last"]
