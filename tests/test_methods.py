"""KD losses pinned against hand-computed values, and the Distiller contract's properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of
from torch import nn

from kdforge.core.errors import ConfigError
from kdforge.methods import METHODS, Step, kd_loss


class Fixed(nn.Module):
    """A 'network' that returns given logits, so losses can be computed by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    T = 2.0
    ps = [math.exp(v / T) for v in (1.0, 2.0, 0.0)]
    pt = [math.exp(v / T) for v in (2.0, 0.0, 1.0)]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    expected = T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(8, 10)
    assert kd_loss(z, z.clone(), 4.0).abs().item() < 1e-6
    assert kd_loss(z, torch.randn(8, 10), 4.0).item() > 0


def test_batchmean_and_elementmean_reductions():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    per_sample = kd_loss(s, t, 3.0, reduction="none")
    assert per_sample.shape == (4,)
    assert kd_loss(s, t, 3.0).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert kd_loss(s, t, 3.0, "elementmean").item() == pytest.approx(per_sample.mean().item() / 10, rel=1e-6)
    # the reference implementation: F.kl_div with batchmean, times T^2
    ref = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean") * 9
    assert kd_loss(s, t, 3.0).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_t_squared_keeps_gradient_scale(T):
    """With the T^2 factor the soft-target gradient is about (p_s - p_t)/T * T^2 -> ~(z_s - z_t)/C for large T."""
    torch.manual_seed(0)
    s = torch.randn(16, 10, requires_grad=True)
    t = torch.randn(16, 10)
    kd_loss(s, t, T).backward()
    # exact gradient of T^2 KL wrt z_s is T * (softmax(s/T) - softmax(t/T)) / B
    expected = T * (F.softmax(s.detach() / T, -1) - F.softmax(t / T, -1)) / 16
    assert torch.allclose(s.grad, expected, atol=1e-6)
    if T == 20.0:
        # the high-temperature limit: gradient ~ (centred logit difference) / (C B)
        approx = ((s.detach() - s.detach().mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))) / (10 * 16)
        assert torch.allclose(s.grad, approx, atol=2e-3)


def test_kd_method_total_loss_by_hand():
    student = Fixed([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    teacher = Fixed([[2.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    y = [0, 2]
    d = METHODS.get("kd")(student, [teacher], {"temperature": 4, "kd_weight": 0.9, "ce_weight": 0.1})
    out = d(batch_of(torch.zeros(2, 1), y), Step())
    s, t = student.logits.detach(), teacher.logits.detach()
    expected = 0.1 * F.cross_entropy(s, torch.tensor(y)).item() + 0.9 * kd_loss(s, t, 4.0).item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert set(out.losses) == {"kd", "ce"}


def test_teacher_is_frozen_and_gradient_reaches_only_the_student():
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    d = METHODS.get("kd")(student, [teacher])
    d.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    out = d(batch_of(torch.randn(6, 5), [0, 1, 2, 0, 1, 2]), Step())
    out.loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    assert d.extra_parameter_count() == 0


def test_teacher_bank_logits_replace_the_live_teacher():
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    d = METHODS.get("kd")(student, [teacher])
    b = batch_of(torch.randn(4, 5), [0, 1, 2, 0])
    live = d(b, Step()).loss
    with torch.no_grad():
        b.extras["teacher_logits"] = teacher(b.image).unsqueeze(0).half()
    replayed = d(b, Step()).loss
    assert replayed.item() == pytest.approx(live.item(), rel=1e-2)


def test_temperature_schedule_is_applied():
    d = METHODS.get("kd")(
        nn.Linear(4, 3), [nn.Linear(4, 3)], {"temperature": {"kind": "linear", "start": 10, "end": 1, "by": "epoch"}}
    )
    b = batch_of(torch.randn(4, 4), [0, 1, 2, 0])
    assert d(b, Step(epoch=0, epochs=10)).metrics["temperature"] == pytest.approx(10)
    assert d(b, Step(epoch=9, epochs=10)).metrics["temperature"] == pytest.approx(1)
    assert d(b, Step(epoch=3, epochs=10)).metrics["temperature"] == pytest.approx(7)


def test_alpha_annealing_with_complement_ce_weight():
    student = Fixed([[1.0, 0.0]])
    teacher = Fixed([[0.0, 1.0]])
    d = METHODS.get("kd")(
        student,
        [teacher],
        {"kd_weight": {"kind": "linear", "start": 1.0, "end": 0.0}, "ce_weight": "complement", "temperature": 1},
    )
    b = batch_of(torch.zeros(1, 1), [0])
    start = d(b, Step(global_step=0, total_steps=11))
    assert "ce" not in start.losses  # weight 0: no CE term
    end = d(b, Step(global_step=10, total_steps=11))
    assert end.losses["kd"].item() == pytest.approx(0.0)
    assert end.losses["ce"].item() == pytest.approx(F.cross_entropy(student.logits, torch.tensor([0])).item())


def test_selective_kd_distils_only_what_the_teacher_gets_right():
    student = Fixed([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    teacher = Fixed([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])  # right on sample 0 (y=0), wrong on sample 1 (y=2)
    b = batch_of(torch.zeros(2, 1), [0, 2])
    d = METHODS.get("kd")(student, [teacher], {"select": "correct", "ce_weight": 0.0, "kd_weight": 1.0})
    out = d(b, Step())
    per = kd_loss(student.logits.detach(), teacher.logits.detach(), 4.0, "none")
    assert out.losses["kd"].item() == pytest.approx(per[0].item() / 2, rel=1e-6)
    assert float(out.metrics["distilled_fraction"]) == pytest.approx(0.5)
    confident = METHODS.get("kd")(
        student, [Fixed([[3.0, 0.0, 0.0], [0.4, 0.3, 0.3]])], {"select": "confident", "confidence_threshold": 0.8}
    )
    assert float(confident(b, Step()).metrics["distilled_fraction"]) == pytest.approx(0.5)


def test_ensemble_mean_of_probabilities_by_hand():
    student = Fixed([[0.0, 0.0]])
    t1, t2 = Fixed([[2.0, 0.0]]), Fixed([[0.0, 2.0]])
    d = METHODS.get("ensemble_kd")(student, [t1, t2], {"temperature": 1, "ce_weight": 0, "kd_weight": 1})
    out = d(batch_of(torch.zeros(1, 1), [0]), Step())
    # mean of [e^2, 1]/(e^2+1) and its mirror is uniform: KL(uniform || uniform) = 0
    assert out.losses["kd"].item() == pytest.approx(0.0, abs=1e-7)
    logits_mode = METHODS.get("ensemble_kd")(
        student, [t1, Fixed([[0.0, 0.0]])], {"temperature": 1, "ce_weight": 0, "kd_weight": 1, "aggregate": "logits"}
    )
    target = F.softmax(torch.tensor([[1.0, 0.0]]), -1)
    expected = (target * (target.log() - math.log(0.5))).sum().item()
    assert logits_mode(batch_of(torch.zeros(1, 1), [0]), Step()).losses["kd"].item() == pytest.approx(
        expected, rel=1e-6
    )


def test_ensemble_fixed_learned_and_confidence_weights():
    student = Fixed([[0.0, 0.0]])
    t1, t2 = Fixed([[2.0, 0.0]]), Fixed([[0.0, 0.0]])
    b = batch_of(torch.zeros(1, 1), [0])
    fixed = METHODS.get("ensemble_kd")(
        student,
        [t1, t2],
        {"weighting": "fixed", "teacher_weights": [3, 1], "temperature": 1, "ce_weight": 0, "kd_weight": 1},
    )
    p1 = F.softmax(t1.logits.detach(), -1)
    target = 0.75 * p1 + 0.25 * torch.tensor([[0.5, 0.5]])
    expected = (target * (target.log() - math.log(0.5))).sum().item()
    assert fixed(b, Step()).losses["kd"].item() == pytest.approx(expected, rel=1e-6)

    learned = METHODS.get("ensemble_kd")(student, [t1, t2], {"weighting": "learned"})
    assert learned.extra_parameter_count() == 2
    learned(b, Step()).loss.backward()
    assert learned.teacher_weight_logits.grad is not None

    conf = METHODS.get("ensemble_kd")(student, [t1, t2], {"weighting": "confidence"})
    w = conf.teacher_weights(torch.stack([t1.logits.detach(), t2.logits.detach()]))
    assert w.shape == (2, 1) and w[0, 0] > w[1, 0]  # the confident teacher weighs more
    assert w.sum().item() == pytest.approx(1.0)


def test_method_errors_are_clear():
    with pytest.raises(ValueError, match="needs 1 teacher"):
        METHODS.get("kd")(nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match="teacher_weights"):
        METHODS.get("ensemble_kd")(nn.Linear(2, 2), [nn.Linear(2, 2)], {"weighting": "fixed"})
    with pytest.raises(ConfigError, match="did you mean 'kd'"):
        METHODS.get("kdd")
