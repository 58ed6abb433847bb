"""The proximal operators and magnitude masks of kdforge.compress.proximal, against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from kdforge.compress.proximal import (
    group_soft_threshold,
    magnitude_mask,
    project_to_sparsity,
    prunable_layers,
    soft_threshold,
    sparsity_of,
)


def test_soft_threshold_exact():
    w = torch.tensor([[-2.0, -0.5, 0.0], [0.3, 0.5, 1.25]])
    out = soft_threshold(w, 0.5)
    expected = torch.tensor([[-1.5, 0.0, 0.0], [0.0, 0.0, 0.75]])
    assert torch.equal(out, expected)
    assert torch.equal(w, torch.tensor([[-2.0, -0.5, 0.0], [0.3, 0.5, 1.25]]))  # input untouched
    assert torch.equal(soft_threshold(w, 0.0), w)
    with pytest.raises(ValueError):
        soft_threshold(w, -0.1)


def test_soft_threshold_is_the_l1_prox():
    """prox minimizes 0.5 ||u - w||^2 + lam ||u||_1: no perturbation of the answer does better."""
    torch.manual_seed(0)
    w, lam = torch.randn(20), 0.3
    u = soft_threshold(w, lam)
    objective = lambda v: 0.5 * (v - w).pow(2).sum() + lam * v.abs().sum()  # noqa: E731
    for _ in range(50):
        assert objective(u) <= objective(u + 1e-3 * torch.randn(20)) + 1e-9


def test_group_soft_threshold_exact():
    # rows (output filters) with L2 norms 5, 1 and 0
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]])
    out = group_soft_threshold(w, 2.0)
    # row 0 scaled by 1 - 2/5 = 0.6; row 1 by max(1 - 2/1, 0) = 0; the zero row stays zero
    expected = torch.tensor([[1.8, 2.4], [0.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_group_soft_threshold_on_conv_filters_and_other_dims():
    w = torch.zeros(2, 1, 2, 2)
    w[0] = 1.0  # norm 2
    w[1] = 0.25  # norm 0.5
    out = group_soft_threshold(w, 1.0, dim=0)
    assert torch.allclose(out[0], torch.full((1, 2, 2), 0.5))  # scaled by 1 - 1/2
    assert torch.equal(out[1], torch.zeros(1, 2, 2))
    # groups along dim 1 (columns): column norms 3 and 4 -> scales 1 - 1/3 and 1 - 1/4
    m = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert torch.allclose(group_soft_threshold(m, 1.0, dim=1), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    # per-group thresholds (sqrt(|g|) weighting)
    lam = torch.tensor([1.0, 0.0])
    assert torch.allclose(
        group_soft_threshold(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), lam), torch.tensor([[2.4, 3.2], [1.0, 0.0]])
    )


def test_magnitude_mask_unstructured_exact_count_and_ties():
    w = torch.tensor([0.5, -0.1, 0.3, -0.1, 0.9, 0.0])
    mask = magnitude_mask(w, 0.5)  # round(3.0) = 3 removed: 0.0, then the tied -0.1s
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert mask.tolist() == [True, False, True, False, True, False]
    # ties broken toward the lower index: remove 2 of four equal values -> indices 0 and 1
    assert magnitude_mask(torch.ones(4), 0.5).tolist() == [False, False, True, True]
    # round() as Python's: 0.5 of 5 -> 2, 0.7 of 5 -> 4 (3.5 rounds to even)
    v = torch.arange(1.0, 6.0)
    assert int((~magnitude_mask(v, 0.5)).sum()) == 2
    assert int((~magnitude_mask(v, 0.7)).sum()) == 4
    assert bool(magnitude_mask(v, 0.0).all()) and not bool(magnitude_mask(v, 1.0).any())
    with pytest.raises(ValueError):
        magnitude_mask(v, 1.5)


def test_magnitude_mask_structured_l1_and_l2():
    # filter L1 norms: 3, 2.9, 0.5; L2 norms: 3, 2.05, 0.5
    w = torch.tensor([[3.0, 0.0], [1.45, 1.45], [0.25, 0.25]]).view(3, 2, 1, 1)
    l1 = magnitude_mask(w, 1 / 3, structured=True, norm=1)
    assert l1.shape == w.shape
    assert l1[:, 0, 0, 0].tolist() == [True, True, False]
    both = magnitude_mask(w, 2 / 3, structured=True, norm=1)  # removes filters 2 and 1 (2.9 < 3)
    assert both[:, :, 0, 0].tolist() == [[True, True], [False, False], [False, False]]
    w2 = torch.tensor([[2.0, 0.0], [1.2, 1.2]])  # L1: 2 vs 2.4; L2: 2 vs 1.697
    assert magnitude_mask(w2, 0.5, structured=True, norm=1).tolist() == [[False, False], [True, True]]
    assert magnitude_mask(w2, 0.5, structured=True, norm=2).tolist() == [[True, True], [False, False]]
    # equal filters: the lower index goes first
    assert magnitude_mask(torch.ones(3, 2), 1 / 3, structured=True)[:, 0].tolist() == [False, True, True]


def test_project_to_sparsity():
    w = torch.tensor([[0.5, -2.0], [0.1, -0.3]])
    assert torch.equal(project_to_sparsity(w, 0.5), torch.tensor([[0.5, -2.0], [0.0, 0.0]]))
    assert torch.equal(project_to_sparsity(w, 0.5, structured=True), torch.tensor([[0.5, -2.0], [0.0, 0.0]]))
    assert torch.equal(project_to_sparsity(w, 0.25), torch.tensor([[0.5, -2.0], [0.0, -0.3]]))
    # it is the Euclidean projection: no other tensor with 2 zeros is closer
    best = (project_to_sparsity(w, 0.5) - w).norm()
    assert math.isclose(float(best), math.hypot(0.1, 0.3), rel_tol=1e-6)


def test_prunable_layers_and_sparsity_of():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 4))
    names = [name for name, _ in prunable_layers(model)]
    assert names == ["0", "3"]
    with torch.no_grad():
        model[0].weight.zero_()  # 18 zeros
        model[3].weight.copy_(torch.tensor([[0.0, 1.0]] * 4))  # 4 zeros of 8
        model[1].weight.zero_()  # BN is not prunable: not counted
    stats = sparsity_of(model)
    assert stats["zeros"] == 22 and stats["total"] == 26
    assert math.isclose(stats["overall"], 22 / 26)
    assert stats["layers"] == {"0": 1.0, "3": 0.5}
