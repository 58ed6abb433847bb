"""GAN losses: the hinge loss, and CcGAN's vicinal sampling for continuous labels.

Hinge loss (Lim & Ye 2017; Miyato et al. 2018): the discriminator minimises
``mean(relu(1 - D(x_real))) + mean(relu(1 + D(x_fake)))``, the generator ``-mean(D(G(z)))``.

Vicinal discriminator losses (CcGAN, Ding et al., ICLR 2021). With continuous labels almost every
label value has one image or none, so the discriminator's loss at a target label ``y`` is an
average over the real images whose labels lie in a *vicinity* of ``y``:

* hard (HVDL): weight ``1{|y_i - y| <= kappa} / #{i : |y_i - y| <= kappa}`` for real image ``i``;
  fake images are generated at labels drawn uniformly from ``[y - kappa, y + kappa]``;
* soft (SVDL): weight ``exp(-nu (y_i - y)^2)`` normalised over ``i``; fake labels as above, each
  fake term weighted by ``exp(-nu (y' - y)^2)``.

Target labels are training labels plus Gaussian noise ``N(0, sigma^2)`` (CcGAN's way of reaching
label values absent from the training set). Labels are in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``-mean(D(G(z)))``."""
    return -fake_logits.mean()


def weighted_hinge_discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, fake_weights: torch.Tensor
) -> torch.Tensor:
    """The hinge loss with a weight per fake term (SVDL); the real terms are already drawn by weight."""
    return F.relu(1.0 - real_logits).mean() + (fake_weights * F.relu(1.0 + fake_logits)).mean()


def vicinity_weights(
    train_labels: torch.Tensor, targets: torch.Tensor, kind: str = "hard", kappa: float = 0.02, nu: float = 1000.0
) -> torch.Tensor:
    """T x N weights of the N training labels at each of T target labels; every row sums to 1
    (a hard row with no training label within ``kappa`` is all zeros)."""
    distance = (targets.reshape(-1, 1) - train_labels.reshape(1, -1)).abs()
    if kind == "hard":
        weights = (distance <= kappa + 1e-12).to(torch.float64)
    elif kind == "soft":
        weights = torch.exp(-nu * distance.double() ** 2)
    else:
        raise ValueError(f"vicinity kind must be 'hard' or 'soft', got {kind!r}")
    totals = weights.sum(dim=1, keepdim=True)
    return (weights / totals.clamp_min(1e-300)).to(torch.float32)


def default_sigma(train_labels: torch.Tensor) -> float:
    """Rule-of-thumb bandwidth of the label noise (Silverman): ``1.06 * std * n^(-1/5)``."""
    n = max(int(train_labels.numel()), 2)
    return float(1.06 * train_labels.float().std() * n ** (-1 / 5))


def default_kappa(train_labels: torch.Tensor, multiplier: float = 1.0) -> float:
    """CcGAN's hard vicinity radius: ``multiplier`` times the largest gap between neighbouring
    distinct labels (so every target has at least one real image within reach)."""
    distinct = torch.unique(train_labels.float())
    if distinct.numel() < 2:
        return 1.0
    return float(multiplier * (distinct[1:] - distinct[:-1]).max())


@dataclass
class VicinalBatch:
    """One discriminator step's labels: ``targets`` (conditioning label of both terms),
    ``real_index`` (which training image is the real term), ``fake_labels`` (labels the fakes
    are generated at) and ``fake_weights`` (all ones for hard vicinities)."""

    targets: torch.Tensor
    real_index: torch.Tensor
    fake_labels: torch.Tensor
    fake_weights: torch.Tensor


def sample_vicinal_batch(
    train_labels: torch.Tensor,
    batch_size: int,
    *,
    sigma: float,
    kappa: float,
    kind: str = "hard",
    nu: float = 1000.0,
    generator: torch.Generator | None = None,
) -> VicinalBatch:
    """Draw target labels (training labels + N(0, sigma^2), clipped to [0, 1]), a real image from
    each target's vicinity, and fake labels around each target."""
    n = train_labels.numel()
    picks = torch.randint(n, (batch_size,), generator=generator)
    noise = torch.randn(batch_size, generator=generator) * sigma
    targets = (train_labels[picks] + noise).clamp(0.0, 1.0)
    weights = vicinity_weights(train_labels, targets, kind, kappa, nu)
    empty = weights.sum(dim=1) <= 0
    if bool(empty.any()):  # no real image within kappa: condition on the drawn training label itself
        targets = torch.where(empty, train_labels[picks], targets)
        weights[empty] = vicinity_weights(train_labels, targets[empty], kind, kappa, nu)
    real_index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    offsets = (torch.rand(batch_size, generator=generator) * 2.0 - 1.0) * kappa
    fake_labels = (targets + offsets).clamp(0.0, 1.0)
    if kind == "soft":
        fake_weights = torch.exp(-nu * (fake_labels - targets) ** 2)
    else:
        fake_weights = torch.ones(batch_size)
    return VicinalBatch(targets, real_index, fake_labels, fake_weights)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N x D each):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (the formula of FID, Heusel et al. 2017;
    the square-root trace from the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)``)."""
    a = features_a.double()
    b = features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(a.shape[1], a.shape[1])
    cov_b = torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    distance = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * middle
    value = float(distance)
    return max(value, 0.0) if math.isfinite(value) else math.nan
