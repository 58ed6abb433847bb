import math

import pytest
from pydantic import ValidationError

from kdforge.core.schedules import Schedule, as_schedule, consistency_rampup
from kdforge.methods import Step


def test_constant_from_a_number():
    s = as_schedule(4)
    assert s(0.0) == s(0.7) == s(1.0) == 4.0


@pytest.mark.parametrize(
    "kind,mid",
    [("linear", 5.5), ("cosine", 5.5), ("exponential", math.sqrt(10))],
)
def test_endpoints_and_midpoint(kind, mid):
    s = Schedule(kind=kind, start=10, end=1)
    assert s(0.0) == pytest.approx(10)
    assert s(1.0) == pytest.approx(1)
    assert s(0.5) == pytest.approx(mid)


def test_cosine_is_slow_at_the_ends():
    s = Schedule(kind="cosine", start=1, end=0)
    assert s(0.1) > 0.9 and s(0.9) < 0.1


def test_step_holds_then_drops_in_equal_steps():
    s = Schedule(kind="step", start=10, end=1, steps=3)
    assert [s(p) for p in (0.0, 0.2, 0.3, 0.6, 0.8, 1.0)] == pytest.approx([10, 10, 7, 4, 1, 1])


def test_window_and_warmup():
    warmup = Schedule(kind="linear", start=0, end=1, finish=0.25)
    assert warmup(0.125) == pytest.approx(0.5)
    assert warmup(0.6) == 1
    delayed = Schedule(kind="linear", start=4, end=2, begin=0.5)
    assert delayed(0.3) == 4 and delayed(0.75) == pytest.approx(3)


def test_epoch_granularity_through_step():
    s = Schedule(kind="linear", start=10, end=1, by="epoch")
    assert Step(epoch=0, epochs=4, global_step=5, total_steps=40).value(s) == 10
    assert Step(epoch=3, epochs=4, global_step=39, total_steps=40).value(s) == 1
    per_step = Schedule(kind="linear", start=10, end=1)
    assert Step(epoch=0, epochs=4, global_step=39, total_steps=40).value(per_step) == 1


def test_invalid_schedules():
    with pytest.raises(ValidationError, match="needs 'end'"):
        Schedule(kind="linear", start=1)
    with pytest.raises(ValidationError, match="positive"):
        Schedule(kind="exponential", start=1, end=0)
    with pytest.raises(ValidationError):
        Schedule(kind="linear", start=1, end=0, begin=0.5, finish=0.5)


def test_consistency_rampup():
    assert consistency_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert consistency_rampup(80, 80) == 1.0 and consistency_rampup(200, 80) == 1.0
