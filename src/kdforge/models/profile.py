"""Size, compute and speed of a model: parameters, forward FLOPs/MACs, latency.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` for one forward pass of a
single sample (batch 1). It counts matrix products and convolutions (2 FLOPs per
multiply-accumulate) and ignores element-wise work (BN, ReLU, additions, pooling), which is
the convention behind the "MACs"/"FLOPs" columns of papers: ``macs = flops / 2``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdforge.core.errors import ConfigError


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ConfigError(
            f"input_shape must be the shape of one sample without the batch, e.g. (3, 32, 32); got {input_shape!r}"
        )
    return shape


class _EvalMode:
    """Put a model in eval mode for a block, then restore each module's own train flag."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        for module, flag in self.flags:
            module.training = flag


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs for one sample of `input_shape` (C, H, W); MACs are half of this."""
    shape = _sample_shape(input_shape)
    example = torch.zeros((1, *shape), device=_model_device(model))
    with _EvalMode(model), torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(example)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward multiply-accumulates for one sample: ``count_flops(...) // 2``."""
    return count_flops(model, input_shape) // 2


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    num_threads: int | None = None,
) -> float:
    """Median seconds per forward of a batch, in eval mode under `torch.inference_mode`.

    Runs on the model's device (CPU for the numbers kdforge reports); CUDA is synchronised
    around each timed call. `num_threads` sets torch's CPU threads for the measurement only
    (None keeps the current setting; 1 gives the steadiest numbers on a busy machine). The
    model's train/eval state is restored afterwards.
    """
    shape = _sample_shape(input_shape)
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("batch_size and repeats must be >= 1 and warmup >= 0")
    if num_threads is not None and num_threads < 1:
        raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
    device = _model_device(model)
    batch = torch.randn((batch_size, *shape), device=device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings = []
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with _EvalMode(model), torch.inference_mode():
            for _ in range(warmup):
                model(batch)
            synchronize()
            for _ in range(repeats):
                start = time.perf_counter()
                model(batch)
                synchronize()
                timings.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return statistics.median(timings)


def profile_model(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 3,
    repeats: int = 10,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Parameters, FLOPs/MACs and latency in one JSON-ready dict::

    {"parameters": int, "trainable_parameters": int,
     "input_shape": [C, H, W], "flops": int, "macs": int,
     "device": "cpu", "threads": int,
     "latency": [{"batch_size": b, "seconds": s, "samples_per_second": b / s}, ...]}
    """
    shape = _sample_shape(input_shape)
    flops = count_flops(model, shape)
    latency = []
    for batch_size in batch_sizes:
        seconds = measure_latency(model, shape, batch_size, warmup, repeats, num_threads)
        latency.append(
            {
                "batch_size": int(batch_size),
                "seconds": seconds,
                "samples_per_second": batch_size / seconds if seconds > 0 else float("inf"),
            }
        )
    return {
        "parameters": count_parameters(model),
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "input_shape": list(shape),
        "flops": flops,
        "macs": flops // 2,
        "device": str(_model_device(model)),
        "threads": num_threads or torch.get_num_threads(),
        "latency": latency,
    }


__all__ = ["count_flops", "count_macs", "count_parameters", "measure_latency", "profile_model"]
