"""Exponential moving average of a network's weights (the generator used for sampling).

After each generator step every floating-point parameter and buffer of the copy becomes
``d * ema + (1 - d) * current`` (BatchNorm running statistics included, so the copy can be used in
eval mode); integer buffers (BatchNorm's step counter) are copied. The rate warms up as in
TensorFlow's ``ExponentialMovingAverage(num_updates=...)``: ``d = min(decay, (1 + n) / (10 + n))``
after ``n`` earlier updates, so a short run's average is not stuck near the initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``EMA(model, decay)``; call ``update(model)`` after every optimizer step; ``.model`` is the average."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.updates: torch.Tensor
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def rate(self) -> float:
        """The decay of the next update."""
        count = int(self.updates)
        return min(self.decay, (1.0 + count) / (10.0 + count))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.rate()
        self.updates.add_(1)
        current = model.state_dict()
        for name, value in self.model.state_dict().items():
            source = current[name].detach()
            if value.is_floating_point():
                value.mul_(decay).add_(source.to(value.dtype), alpha=1.0 - decay)
            else:
                value.copy_(source)
