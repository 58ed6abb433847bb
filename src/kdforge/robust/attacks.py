"""White-box attacks in pixel units: FGSM and PGD (L-inf and L2), batched.

Every attack works on **pixel-space inputs** ``x`` in ``[0, 1]`` and a **pixel-space model**: a
callable that takes such inputs. kdforge's networks are trained on normalized batches
``(x - mean) / std``, so wrap them first::

    pixel_model = PixelModel(model, mean, std)     # normalizes inside
    x_adv = pgd(pixel_model, x, y, eps=8 / 255, steps=20)

so that ``eps`` and ``step_size`` are in pixel units whatever the dataset's statistics. The
adversarial example always stays in the ball ``||x_adv - x|| <= eps`` and in the valid range
``[0, 1]`` (clamping the box after the ball projection never leaves the ball: it only shrinks
coordinates).

What the attacks leave alone: the model's train/eval mode (an attack runs in whatever mode the
caller chose: ARD attacks in training mode, evaluation in eval mode), the ``requires_grad`` flags and
``.grad`` of its parameters (gradients are taken with ``torch.autograd.grad`` with respect to the
perturbation only). In training mode, batch-norm running statistics *are* updated by the attack's
forward passes, as in the reference implementations.

Defaults and sources:

* FGSM: Goodfellow, Shlens & Szegedy 2015 (one signed step of size eps); ``norm="l2"`` gives the
  fast gradient method (one normalized-gradient step of length eps).
* PGD: Madry et al. 2018; uniform random start in the ball; default step size ``2.5 * eps / steps``
  (their rule); restarts keep, per sample, the worst example found (a misclassified one beats a
  correctly classified one; otherwise the higher loss wins).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["linf", "l2"]
LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "PixelModel",
    "ascent_direction",
    "fgsm",
    "parse_fraction",
    "pgd",
    "project",
    "project_ball",
    "random_in_ball",
]


def parse_fraction(value: str | float | int) -> float:
    """``"8/255"`` -> 0.0313..., ``"0.3"`` -> 0.3, numbers unchanged (for CLI flags and recipes)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction such as 8/255, got {value!r}") from None


class PixelModel(nn.Module):
    """``model((x - mean) / std)``: a network trained on normalized batches, seen from pixel space.

    ``mean`` and ``std`` are the per-channel statistics of the normalization (``DatasetInfo.mean``
    and ``.std``); ``None`` means the model already takes ``[0, 1]`` pixels.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.model = model
        mean_t = torch.tensor(list(mean) if mean is not None else [0.0], dtype=torch.float32)
        std_t = torch.tensor(list(std) if std is not None else [1.0], dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def to_pixels(self, normalized: Tensor) -> Tensor:
        """The inverse map, clamped to [0, 1] (undoes float rounding of the normalization)."""
        return (normalized * self.std.to(normalized) + self.mean.to(normalized)).clamp(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))


# ----------------------------------------------------------------------------- geometry
def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of every sample, shaped B x 1 x ... for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project_ball(delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """The closest point of the ``eps``-ball (per sample) to ``delta``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        return delta * torch.clamp(eps / _per_sample_norm(delta).clamp_min(1e-12), max=1.0)
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")


def project(delta: Tensor, x: Tensor, eps: float, norm: Norm, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Project ``delta`` onto the ``eps``-ball, then clip ``x + delta`` to ``bounds``."""
    return (x + project_ball(delta, eps, norm)).clamp(*bounds) - x


def random_in_ball(x: Tensor, eps: float, norm: Norm) -> Tensor:
    """A uniform random point of the ``eps``-ball around zero, one per sample (``x``'s shape)."""
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    direction = torch.randn_like(x)
    direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
    dims = x[0].numel()
    radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / dims) * eps
    return direction * radius.view(-1, *([1] * (x.dim() - 1)))


def ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """The steepest-ascent unit step for the norm: ``sign(grad)`` (L-inf) or ``grad / ||grad||`` (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample_norm(grad).clamp_min(1e-12)


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def _check(x: Tensor, eps: float, norm: str) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if x.dim() < 2:
        raise ValueError(f"expected a batch of inputs (B x ...), got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- attacks
def _input_gradient(model: Callable[[Tensor], Tensor], x: Tensor, delta: Tensor, target: Tensor, loss_fn: LossFn):
    """Per-sample losses at ``x + delta`` and their gradient with respect to ``delta``."""
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = loss_fn(model(x + delta), target)
        (grad,) = torch.autograd.grad(losses.sum(), delta)
    return losses.detach(), grad.detach()


def fgsm(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: Norm = "linf",
    loss_fn: LossFn | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """One gradient step of length ``eps`` that increases ``loss_fn(model(x), y)`` (default CE).

    L-inf: ``x + eps * sign(grad)``; L2: ``x + eps * grad / ||grad||``; clipped to ``bounds``.
    Returns the adversarial inputs (detached).
    """
    _check(x, eps, norm)
    x = x.detach()
    _, grad = _input_gradient(model, x, torch.zeros_like(x), y, loss_fn or _cross_entropy)
    return (x + project(eps * ascent_direction(grad, norm), x, eps, norm, bounds)).detach()


def pgd(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    norm: Norm = "linf",
    random_start: bool = True,
    restarts: int = 1,
    loss_fn: LossFn | None = None,
    delta_init: Tensor | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Projected gradient ascent on ``loss_fn(model(x + delta), y)`` within the ``eps``-ball.

    ``step_size`` defaults to ``2.5 * eps / steps``. The start is uniform in the ball
    (``random_start``), zero, or ``delta_init`` (e.g. TRADES' small Gaussian). ``loss_fn(logits, y)``
    returns one loss per sample (default cross-entropy); ``y`` may be anything it accepts (labels,
    clean probabilities). With ``restarts > 1`` each sample keeps its worst example over the
    restarts: misclassified beats correctly classified (when ``y`` holds class labels), then the
    higher loss wins. Returns the adversarial inputs (detached).
    """
    _check(x, eps, norm)
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps} and {restarts}")
    loss_fn = loss_fn or _cross_entropy
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)
    x = x.detach()
    labels = y if (y.dtype == torch.long and y.shape == x.shape[:1]) else None
    best = best_loss = best_wrong = None
    for _ in range(restarts):
        if delta_init is not None:
            delta = delta_init.detach().clone()
        elif random_start and eps > 0:
            delta = random_in_ball(x, eps, norm)
        else:
            delta = torch.zeros_like(x)
        delta = project(delta, x, eps, norm, bounds)
        for _ in range(steps):
            _, grad = _input_gradient(model, x, delta, y, loss_fn)
            delta = project(delta + step_size * ascent_direction(grad, norm), x, eps, norm, bounds)
        if restarts == 1:
            return (x + delta).detach()
        with torch.no_grad():
            logits = model(x + delta)
            loss = loss_fn(logits, y)
            wrong = logits.argmax(-1) != labels if labels is not None else torch.zeros_like(loss, dtype=torch.bool)
        if best is None:
            best, best_loss, best_wrong = delta, loss, wrong
            continue
        better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best)
        best_loss = torch.where(better, loss, best_loss)
        best_wrong = best_wrong | wrong
    return (x + best).detach()
