"""Scalar schedules: a value that depends on the optimisation step.

Three spellings, usable wherever a config field is documented as a schedule
(loss weights, render resolution, guidance scale, SDS timestep range):

* a constant: ``0.1``;
* a linear ramp ``[start_step, start_value, end_value, end_step]``: the
  start value up to ``start_step``, the end value from ``end_step`` on and a
  straight line in between (threestudio's spelling);
* piecewise constant ``{step: value}``: the value of the largest key that is
  ``<= step`` (the smallest key's value before it), e.g. ``{0: 64, 200: 128}``.
  Keys may be strings of integers, as YAML/JSON sometimes make them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from recon.errors import ReconError

ScheduleValue = float | int | Sequence[float] | Mapping[Any, float]
"""Any of the three spellings (for type hints of code that reads schedules)."""

Schedule: TypeAlias = Any
"""The type of a config field holding a schedule: a :data:`ScheduleValue`. OmegaConf cannot type a
union of a number, a list and a mapping, so such fields are checked by :func:`validate_schedule`."""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReconError(f"{what}: expected a number, got {value!r}")
    return float(value)


def validate_schedule(schedule: Any, name: str = "schedule") -> None:
    """Raises :class:`ReconError` naming ``name`` if ``schedule`` is not one of the three spellings."""
    if isinstance(schedule, Mapping):
        if not schedule:
            raise ReconError(f"{name}: a {{step: value}} schedule needs at least one entry")
        for key, value in schedule.items():
            try:
                int(key)
            except (TypeError, ValueError) as exc:
                raise ReconError(f"{name}: step keys must be integers, got {key!r}") from exc
            _number(value, name)
    elif isinstance(schedule, Sequence) and not isinstance(schedule, str):
        if len(schedule) != 4:
            raise ReconError(f"{name}: a ramp is [start_step, start_value, end_value, end_step], got {list(schedule)!r}")
        start_step, _, _, end_step = (_number(v, name) for v in schedule)
        if end_step < start_step:
            raise ReconError(f"{name}: end_step {end_step:g} is before start_step {start_step:g}")
    else:
        _number(schedule, name)


def value_at(schedule: ScheduleValue, step: int) -> float:
    """The value of ``schedule`` (any of the module's spellings) at optimisation ``step``."""
    validate_schedule(schedule)
    if isinstance(schedule, Mapping):
        points = sorted((int(k), float(v)) for k, v in schedule.items())
        value = points[0][1]
        for key, v in points:
            if key <= step:
                value = v
        return value
    if isinstance(schedule, Sequence) and not isinstance(schedule, str):
        start_step, start_value, end_value, end_step = (float(v) for v in schedule)
        if step <= start_step or end_step == start_step:
            return start_value if step < end_step else end_value
        if step >= end_step:
            return end_value
        fraction = (step - start_step) / (end_step - start_step)
        return start_value + fraction * (end_value - start_value)
    return float(schedule)
