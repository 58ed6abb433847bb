"""Backward-compatible path of :mod:`kdforge.core.schedules` (documented before the core layer)."""

from kdforge.core.schedules import Schedule, ScheduleKind, ScheduleSpec, as_schedule, consistency_rampup

__all__ = ["Schedule", "ScheduleKind", "ScheduleSpec", "as_schedule", "consistency_rampup"]
