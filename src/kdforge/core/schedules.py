"""Values that change with training progress: temperatures, loss weights, ramps.

A schedule is a pure function of progress ``p`` in [0, 1]; recipes write one as a plain number
(constant) or as a mapping such as ``{kind: linear, start: 10, end: 1}``. Progress is measured in
optimizer steps by default (``by: step``) or in whole epochs (``by: epoch``, so the value only
changes at epoch boundaries, as in papers that write ``T(e)``).

``begin`` and ``finish`` restrict the change to a window of progress: before ``begin`` the value is
``start``, after ``finish`` it is ``end``. A linear warm-up over the first 20 of 240 epochs is
``{kind: linear, start: 0, end: 1, finish: 0.0833}``.

Recipes built from these:

* dynamic temperature annealing (KDAS-ReID): ``temperature: {kind: exponential, start: 10, end: 1}``;
* alpha annealing (sensor-transition KD): ``kd_weight: {kind: cosine, start: 0.95, end: 0.1}``.
"""

from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import ConfigDict, Field, model_validator

from kdforge.core.validation import StrictScalars

ScheduleKind = Literal["constant", "linear", "cosine", "exponential", "step"]


class Schedule(StrictScalars):
    """A value as a function of training progress (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: ScheduleKind = "constant"
    start: float
    end: float | None = None
    begin: float = Field(0.0, ge=0.0, le=1.0)
    finish: float = Field(1.0, ge=0.0, le=1.0)
    steps: int = Field(3, ge=1, description="number of equal drops for kind=step")
    by: Literal["step", "epoch"] = "step"

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if self.kind != "constant" and self.end is None:
            raise ValueError(f"a '{self.kind}' schedule needs 'end' as well as 'start'")
        if self.finish <= self.begin and self.kind != "constant":
            raise ValueError("'finish' must be greater than 'begin'")
        if self.kind == "exponential" and (self.start <= 0 or (self.end or 0) <= 0):
            raise ValueError("an exponential schedule needs positive 'start' and 'end'")
        return self

    def __call__(self, progress: float) -> float:
        if self.kind == "constant" or self.end is None:
            return self.start
        # fraction of the change done, after clamping progress to the [begin, finish] window
        f = min(max((progress - self.begin) / (self.finish - self.begin), 0.0), 1.0)
        a, b = self.start, self.end
        if self.kind == "linear":
            return a + (b - a) * f
        if self.kind == "cosine":
            return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * f))
        if self.kind == "exponential":
            return a * (b / a) ** f
        # step: `steps` equal drops; the first segment holds start, the last holds end
        level = min(math.floor(f * (self.steps + 1)), self.steps)
        return a + (b - a) * level / self.steps


ScheduleSpec = Union[float, Schedule]  # noqa: UP007


def as_schedule(spec: ScheduleSpec | dict) -> Schedule:
    """Accept a number, a mapping or a Schedule and return a Schedule."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, dict):
        return Schedule(**spec)
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise ValueError("expected a number or a schedule mapping such as {kind: linear, start: 4, end: 1}")
    try:
        number = float(spec)
    except ValueError:
        raise ValueError("expected a number or a schedule mapping such as {kind: linear, start: 4, end: 1}") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number (not nan or inf)")
    return Schedule(kind="constant", start=number)


def consistency_rampup(progress: float, length: float) -> float:
    """The sigmoid-shaped ramp ``exp(-5 (1 - min(p, L)/L)^2)`` of mean-teacher style methods
    (Laine & Aila 2017; ONE, CL-ILR, OKDDip and FFSD use it): 0.007 at p = 0, 1 from p = L on, 1
    everywhere when L = 0. ``p`` is clamped below at 0. The one implementation in kdforge."""
    if length <= 0:
        return 1.0
    x = 1.0 - min(max(progress, 0.0), length) / length
    return math.exp(-5.0 * x * x)
