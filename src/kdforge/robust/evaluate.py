"""Clean and robust top-1 of a classifier over a data split.

``robust_evaluate(model, split, mean, std, attack="pgd", eps=8/255, steps=20)`` reads the split's
uint8 images as ``[0, 1]`` pixels, runs the network through ``PixelModel`` (which applies the
normalization the network was trained with), and reports::

    {"clean_top1": %, "robust_top1": %, "images": n, "attack": {...the settings...}}

Robust accuracy counts a sample as robust only if it is classified correctly both clean and under
attack (the clean input is a point of the ball), so only the clean-correct samples are attacked.
The network is evaluated in ``eval()`` mode and left in the mode it was in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from kdforge.data.splits import evaluation_subset
from kdforge.data.types import StreamData, TensorData
from kdforge.robust.attacks import Norm, PixelModel, fgsm, pgd

__all__ = ["attack_batch", "robust_evaluate"]


def attack_batch(
    pixel_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Literal["fgsm", "pgd"],
    eps: float,
    *,
    steps: int = 20,
    step_size: float | None = None,
    norm: Norm = "linf",
    restarts: int = 1,
    random_start: bool = True,
) -> torch.Tensor:
    """Adversarial versions of a pixel batch with the named attack."""
    if attack == "fgsm":
        return fgsm(pixel_model, x, y, eps, norm=norm)
    if attack == "pgd":
        return pgd(
            pixel_model,
            x,
            y,
            eps,
            steps=steps,
            step_size=step_size,
            norm=norm,
            random_start=random_start,
            restarts=restarts,
        )
    raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")


def robust_evaluate(
    model: nn.Module,
    split: TensorData | StreamData,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    *,
    attack: Literal["fgsm", "pgd"] = "pgd",
    eps: float = 8 / 255,
    steps: int = 20,
    step_size: float | None = None,
    norm: Norm = "linf",
    restarts: int = 1,
    random_start: bool = True,
    batch_size: int = 256,
    limit: int | None = None,
    device: torch.device | str | None = None,
    seed: int | None = 0,
) -> dict[str, Any]:
    """Clean and robust top-1 (%) on ``split``, or on a seeded class-balanced subset of ``limit``
    of its images (``kdforge.data.splits.evaluation_subset``; never simply the first ones).

    ``seed`` (when not None) seeds the random starts through a private generator state, so the
    result is reproducible and the caller's RNG is left alone.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pixel_model = PixelModel(model, mean, std).to(device)
    if limit is not None and limit < len(split):
        split = split.select(evaluation_subset(split.labels, int(limit)))
    count = len(split)
    was_training = model.training
    model.eval()
    clean_hits = robust_hits = 0
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                x = split.images[start:stop].to(device=device, dtype=torch.float32) / 255.0
                y = split.labels[start:stop].to(device)
                with torch.no_grad():
                    correct = pixel_model(x).argmax(-1) == y
                clean_hits += int(correct.sum())
                if eps == 0 or not bool(correct.any()):
                    robust_hits += int(correct.sum())
                    continue
                x_adv = attack_batch(
                    pixel_model,
                    x[correct],
                    y[correct],
                    attack,
                    eps,
                    steps=steps,
                    step_size=step_size,
                    norm=norm,
                    restarts=restarts,
                    random_start=random_start,
                )
                with torch.no_grad():
                    robust_hits += int((pixel_model(x_adv).argmax(-1) == y[correct]).sum())
    finally:
        model.train(was_training)
    settings = {"name": attack, "eps": eps, "norm": norm}
    if attack == "pgd":
        settings.update(
            steps=steps,
            step_size=2.5 * eps / max(steps, 1) if step_size is None else step_size,
            restarts=restarts,
            random_start=random_start,
        )
    return {
        "clean_top1": 100.0 * clean_hits / max(count, 1),
        "robust_top1": 100.0 * robust_hits / max(count, 1),
        "images": count,
        "attack": settings,
    }
