"""Dense (per-pixel) KD options of `kd`: pixel_weight foreground / background_weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of

from kdforge.data.tasks import task_for
from kdforge.data.types import DatasetInfo
from kdforge.methods import METHODS
from kdforge.methods.base import Step

SEG_INFO = DatasetInfo("seg", 3, 1, (1, 3), (0.5,), (0.5,), ["bg", "a", "b"], task="segmentation")
CLS_INFO = DatasetInfo("cls", 3, 1, (1, 3), (0.5,), (0.5,), ["bg", "a", "b"])


class _Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits


#: 1 image, 3 classes, 1 x 3 pixels: the teacher calls pixel 0 and 1 background, pixel 2 class 2
STUDENT = torch.tensor([[[[0.5, 1.0, 0.0]], [[0.0, 2.0, 1.0]], [[1.0, 0.0, 0.3]]]])
TEACHER = torch.tensor([[[[3.0, 2.0, 0.0]], [[0.0, 1.0, 0.5]], [[0.0, 0.0, 2.0]]]])
LABELS = torch.tensor([[[0, 1, 0]]])  # the label calls pixel 1 class 1


def _kd_loss(T: float, **params) -> float:
    method = METHODS.get("kd")(
        _Fixed(STUDENT), [_Fixed(TEACHER)], {"temperature": T, "kd_weight": 1.0, "ce_weight": 0.0, **params}
    )
    method.use_task(task_for(SEG_INFO))
    out = method(batch_of(torch.zeros(1, 1, 1, 3), y=LABELS), Step(0, 1, 0, 1))
    return float(out.losses["kd"].detach())


def _per_pixel_kl(T: float) -> torch.Tensor:
    pt = F.softmax(TEACHER[0, :, 0].T / T, -1)  # 3 pixels x 3 classes
    ps = F.log_softmax(STUDENT[0, :, 0].T / T, -1)
    return T**2 * (pt * (pt.log() - ps)).sum(-1)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_foreground_pixel_weight_is_the_weighted_mean_of_the_per_pixel_kl(T):
    kl = _per_pixel_kl(T)
    # pixel 0: background for label and teacher (weight 0.25); pixel 1: label foreground; pixel 2: teacher foreground
    expected = (0.25 * kl[0] + kl[1] + kl[2]) / 2.25
    assert _kd_loss(T, pixel_weight="foreground", background_weight=0.25) == pytest.approx(float(expected), rel=1e-5)
    assert _kd_loss(T) == pytest.approx(float(kl.mean()), rel=1e-5)  # the default stays the plain mean
    assert float(expected) != pytest.approx(float(kl.mean()), rel=1e-3)


def test_foreground_weight_one_is_uniform_and_zero_drops_the_background():
    kl = _per_pixel_kl(2.0)
    uniform = _kd_loss(2.0)
    assert _kd_loss(2.0, pixel_weight="foreground", background_weight=1.0) == pytest.approx(uniform, rel=1e-6)
    assert _kd_loss(2.0, pixel_weight="foreground", background_weight=0.0) == pytest.approx(
        float(kl[1:].mean()), rel=1e-5
    )


def test_pixel_weight_is_refused_off_dense_tasks_and_background_weight_alone():
    method = METHODS.get("kd")(_Fixed(torch.zeros(2, 3)), [_Fixed(torch.zeros(2, 3))], {"pixel_weight": "foreground"})
    with pytest.raises(ValueError, match="pixel_weight 'foreground'.*classification"):
        method.use_task(task_for(CLS_INFO))
    lonely = METHODS.get("kd")(_Fixed(STUDENT), [_Fixed(TEACHER)], {"background_weight": 0.5})
    with pytest.raises(ValueError, match="background_weight only acts with pixel_weight: foreground"):
        lonely.use_task(task_for(SEG_INFO))


def test_growing_ta_foreground_pixel_weight_weights_both_kl_terms():
    from kdforge.models import create

    torch.manual_seed(0)
    student = create("unet2d", num_classes=3, in_channels=1, base=2, depth=2)
    teacher = create("unet2d", num_classes=3, in_channels=1, base=4, depth=2).eval()
    params = {"temperature": 2.0, "kd_weight": 1.0, "ce_weight": 1.0, "pixel_weight": "foreground"}
    method = METHODS.get("growing_ta")(student, [teacher], {**params, "background_weight": 0.2})
    method.use_task(task_for(SEG_INFO))
    x = torch.randn(2, 1, 8, 8)
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    labels[0, 2:4, 2:5] = 1
    labels[1, 5:7, 1:3] = 2
    out = method(batch_of(x, y=labels), Step(0, 1, 0, 1))
    with torch.no_grad():
        z_s, z_a, z_t = (net(x).movedim(1, -1).reshape(-1, 3) for net in (student, method.ta, teacher))
    fg = (labels.reshape(-1) > 0) | (z_t.argmax(-1) > 0)
    w = torch.where(fg, 1.0, 0.2)

    def weighted(s, t):
        pt = F.softmax(t / 2.0, -1)
        kl = 4.0 * (pt * (pt.log() - F.log_softmax(s / 2.0, -1))).sum(-1)
        return float((w * kl).sum() / w.sum()), float(kl.mean())

    expected_kd, plain_kd = weighted(z_s, z_a)
    expected_ta, _ = weighted(z_a, z_t)
    assert float(out.losses["kd"].detach()) == pytest.approx(expected_kd, rel=1e-4)
    assert float(out.losses["ta_kd"].detach()) == pytest.approx(expected_ta, rel=1e-4)
    assert expected_kd != pytest.approx(plain_kd, rel=1e-3)
    with pytest.raises(ValueError, match="pixel_weight 'foreground'.*classification"):
        METHODS.get("growing_ta")(
            create("resnet8", num_classes=3), [create("resnet8", num_classes=3).eval()], params
        ).use_task(task_for(CLS_INFO))
