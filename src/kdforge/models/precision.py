"""A frozen network's forward in bfloat16 (``train.teacher_precision: bf16``).

A teacher that does not learn only has to produce soft targets and features. On hardware with
native bfloat16 arithmetic (CPUs with AVX512-BF16 or AMX, recent GPUs) its forward under
``torch.autocast(dtype=torch.bfloat16)`` costs about half of the float32 one (resnet32x4 at batch
64 on our AVX512-BF16 CPU: 622 ms against 1,224 ms, one thread). The price is precision:
bfloat16 keeps 8 significant bits, so the teacher's logits move by about 0.5% of their range; the
soft targets at a KD temperature move less. It is an opt-in choice, recorded in the run's summary.

:func:`run_in_bfloat16` makes a module's forward run under autocast and hand back float32
tensors; features tapped inside it (:class:`~kdforge.models.taps.FeatureTap` with ``detach``) are
stored in float32 too, so every loss keeps computing in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_CONTEXT = "_kdforge_bf16_context"


def to_float32(value: Any) -> Any:
    """``value`` with every floating tensor below float32 (bf16, fp16) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuples keep their type
        return type(value)(*(to_float32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    return value


def _enter(module: nn.Module, args: Any) -> None:
    context = torch.autocast(device_type=module._kdforge_bf16_device, dtype=torch.bfloat16)  # type: ignore[arg-type]
    context.__enter__()
    setattr(module, _CONTEXT, context)


def _leave(module: nn.Module, args: Any, output: Any) -> Any:
    context = getattr(module, _CONTEXT, None)
    if context is not None:
        context.__exit__(None, None, None)
        setattr(module, _CONTEXT, None)
    return to_float32(output)


def run_in_bfloat16(module: nn.Module, device_type: str) -> nn.Module:
    """Make ``module``'s forward run in bfloat16 autocast on ``device_type`` and return float32.

    Done with a forward pre-hook and an always-called forward hook on the module itself, so the
    module keeps its type, names and state dict (feature taps by name still find their layers)
    and an exception inside the forward still leaves autocast.
    """
    if getattr(module, "_kdforge_bf16_device", None) is not None:
        return module
    module._kdforge_bf16_device = device_type  # type: ignore[assignment]
    module.register_forward_pre_hook(_enter)
    module.register_forward_hook(_leave, always_call=True)
    return module


__all__ = ["run_in_bfloat16", "to_float32"]
