"""evaluation_subset: partial evaluations must not depend on the order a split is stored in."""

import pytest
import torch

from kdforge.core.errors import ConfigError
from kdforge.data.splits import evaluation_subset


def test_class_sorted_split_gives_every_class():
    labels = torch.arange(10).repeat_interleave(100)  # stored in class order, like the shared CIFAR-10 test set
    chosen = evaluation_subset(labels, 200)
    assert len(chosen) == 200 and len(set(chosen.tolist())) == 200
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [20] * 10
    assert torch.equal(chosen, torch.sort(chosen).values)
    assert torch.equal(chosen, evaluation_subset(labels, 200))  # the same every time
    assert not torch.equal(chosen, evaluation_subset(labels, 200, seed=1))


def test_none_or_oversized_limit_is_the_whole_split_and_bad_limit_is_refused():
    labels = torch.tensor([0, 1, 1, 2])
    assert evaluation_subset(labels, None).tolist() == [0, 1, 2, 3]
    assert evaluation_subset(labels, 10).tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="at least 1"):
        evaluation_subset(labels, 0)


def test_robust_evaluate_limit_is_class_balanced():
    from kdforge.data.types import TensorData
    from kdforge.robust import robust_evaluate

    class Constant(torch.nn.Module):  # always predicts class 0
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(x.shape[0], 4) + self.w
            out[:, 0] = 1.0
            return out

    labels = torch.arange(4).repeat_interleave(25)
    images = torch.zeros(100, 1, 2, 2, dtype=torch.uint8)
    split = TensorData(images, labels)
    result = robust_evaluate(Constant(), split, (0.0,), (1.0,), attack="fgsm", eps=0.0, limit=40)
    # the first 40 images are all class 0 or 1; a balanced subset has 10 of each class
    assert result["images"] == 40 and result["clean_top1"] == pytest.approx(25.0)
