"""Processing generated samples before a student sees them (cGAN-KD, Ding et al. 2023, arXiv 2104.03164).

1. **Subsampling** drops samples unlike the real data:

   * ``density_ratio`` -- a simplified cDR-RS. The paper fits a density-ratio model ``r(f, y)`` of
     real to generated samples in the feature space of a network trained on the real data (an MLP
     trained with a penalised least-squares objective), then rejection-samples with acceptance
     probability ``r / M``, ``M = max r`` over a burn-in. Here ``r`` comes from *probabilistic
     classification* instead: a small MLP on (standardised feature, label) learns to tell real from
     generated samples, and ``r = n_fake / n_real * p / (1 - p)`` (Sugiyama et al., "Density Ratio
     Estimation in Machine Learning", 2012, ch. 4); the burn-in is every generated sample of the
     class (of the whole set for continuous labels), so ``M`` is their largest ratio.
   * ``confidence`` -- a cheaper proxy, no model to fit: the teacher's softmax probability of the
     conditioning class takes the place of ``r`` in the same rejection step (classification only).

2. **Filtering** drops samples whose teacher loss against the conditioning label -- cross-entropy
   for classes, absolute error for a continuous label -- exceeds the ``quantile`` of the losses of
   the samples of the same class (of all samples for a continuous label). The paper uses 0.9 for
   classification and 0.7 for regression.

3. **Relabelling** replaces each kept sample's label by the teacher's: the arg-max class, or the
   predicted value (hard relabelling, the paper's); or, for classes, by the teacher's probabilities
   softened at a temperature ``T``, ``softmax(logits / T)`` (soft relabelling, an option beside the
   paper's: the student's cross-entropy then takes a soft label, as in KD's soft-target term).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def batched(
    function: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """``function`` applied to ``inputs`` in batches, results concatenated."""
    return torch.cat([function(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model`` (a classifier's or regressor's head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to take penultimate features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The input of the model's last linear layer (its penultimate features), N x D."""
    captured: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda m, args, out: captured.append(args[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i : i + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured).float()


def _design(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    label_part = F.one_hot(labels.long(), num_classes).float() if num_classes else labels.float().reshape(-1, 1)
    return torch.cat([features, label_part], dim=1)


def fit_density_ratio(
    real_features: torch.Tensor,
    real_labels: torch.Tensor,
    fake_features: torch.Tensor,
    fake_labels: torch.Tensor,
    num_classes: int | None,
    *,
    hidden: int = 64,
    epochs: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A density-ratio function ``r(features, labels)`` of real to generated samples, by
    probabilistic classification (full-batch Adam on a one-hidden-layer MLP, classes weighted to
    balance; the weight decay is the regulariser that keeps the ratio from
    overshooting where one side has few samples)."""
    generator = torch.Generator().manual_seed(seed)
    mean = real_features.mean(0, keepdim=True)
    std = real_features.std(0, keepdim=True).clamp_min(1e-6)
    inputs = torch.cat(
        [
            _design((real_features - mean) / std, real_labels, num_classes),
            _design((fake_features - mean) / std, fake_labels, num_classes),
        ]
    )
    target = torch.cat([torch.ones(len(real_features)), torch.zeros(len(fake_features))])
    weight = torch.cat(
        [
            torch.full((len(real_features),), 0.5 / len(real_features)),
            torch.full((len(fake_features),), 0.5 / len(fake_features)),
        ]
    )
    net = nn.Sequential(nn.Linear(inputs.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 1))
    with torch.no_grad():  # a seeded initialisation, independent of the global RNG
        for parameter in net.parameters():
            parameter.copy_((torch.rand(parameter.shape, generator=generator) * 2 - 1) / parameter.shape[-1] ** 0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        logits = net(inputs).squeeze(1)
        loss = (weight * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).sum()
        loss.backward()
        optimizer.step()
    net.eval()

    @torch.no_grad()
    def ratio(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # balanced classes: p / (1 - p) = exp(logit) estimates p_real / p_fake directly
        return torch.exp(net(_design((features - mean) / std, labels, num_classes)).squeeze(1).clamp(-30, 30))

    return ratio


def rejection_sample(
    scores: torch.Tensor, groups: torch.Tensor | None = None, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep sample ``i`` with probability ``scores[i] / M`` where ``M`` is the largest score of its
    group (every sample one group when ``groups`` is None); returns a boolean mask."""
    scores = scores.float().clamp_min(0)
    if groups is None:
        groups = torch.zeros(len(scores), dtype=torch.int64)
    bound = torch.zeros_like(scores)
    for group in torch.unique(groups):
        members = groups == group
        bound[members] = scores[members].max().clamp_min(1e-12)
    return torch.rand(len(scores), generator=generator) < scores / bound


def quantile_filter(losses: torch.Tensor, quantile: float, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the samples whose loss is at most the ``quantile`` of their group's losses (a mask)."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"filter quantile must be in (0, 1], got {quantile}")
    if groups is None:
        groups = torch.zeros(len(losses), dtype=torch.int64)
    keep = torch.zeros(len(losses), dtype=torch.bool)
    for group in torch.unique(groups):
        members = groups == group
        threshold = torch.quantile(losses[members].double(), quantile)
        keep[members] = losses[members].double() <= threshold
    return keep


def teacher_losses(outputs: torch.Tensor, conditioning: torch.Tensor, classification: bool) -> torch.Tensor:
    """Per-sample teacher loss against the conditioning label: cross-entropy or absolute error."""
    if classification:
        return F.cross_entropy(outputs.float(), conditioning.long(), reduction="none")
    return (outputs.float().reshape(len(conditioning), -1)[:, 0] - conditioning.float()).abs()


def teacher_labels(outputs: torch.Tensor, classification: bool) -> torch.Tensor:
    """The teacher's label of each sample: arg-max class (int64) or predicted value (float32)."""
    if classification:
        return outputs.argmax(dim=1)
    return outputs.float().reshape(len(outputs), -1)[:, 0]


def soft_labels(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's class probabilities softened at ``temperature``: ``softmax(logits / T)``, N x C float32."""
    if temperature <= 0:
        raise ValueError(f"relabel temperature must be positive, got {temperature}")
    return (logits.float() / temperature).softmax(dim=1)
