"""Scalar schedules (constant, linear ramp, piecewise constant) and the guidance config that uses them."""

from __future__ import annotations

import pytest

from recon.config import resolve
from recon.errors import ReconError
from recon.guidance.config import GuidanceConfig
from recon.schedule import validate_schedule, value_at


def test_constant():
    assert value_at(0.1, 0) == 0.1
    assert value_at(3, 10_000) == 3.0


@pytest.mark.parametrize(
    ("step", "expected"),
    [(-5, 0.4), (0, 0.4), (50, 0.35), (100, 0.3), (199, 0.201), (200, 0.2), (10_000, 0.2)],
)
def test_ramp_from_zero(step, expected):
    assert value_at([0, 0.4, 0.2, 200], step) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"), [(0, 1.0), (100, 1.0), (150, 2.0), (200, 3.0), (201, 3.0)])
def test_ramp_with_late_start(step, expected):
    assert value_at([100, 1.0, 3.0, 200], step) == pytest.approx(expected)


def test_ramp_of_zero_length_is_a_step():
    assert value_at([100, 1.0, 3.0, 100], 99) == 1.0
    assert value_at([100, 1.0, 3.0, 100], 100) == 3.0


@pytest.mark.parametrize(("step", "expected"), [(0, 64), (199, 64), (200, 128), (299, 128), (300, 256), (10**6, 256)])
def test_piecewise_constant(step, expected):
    assert value_at({0: 64, 200: 128, 300: 256}, step) == expected


def test_piecewise_constant_string_keys_and_before_first_key():
    assert value_at({"300": 2.0, "100": 1.0}, 0) == 1.0
    assert value_at({"300": 2.0, "100": 1.0}, 300) == 2.0


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ([1, 2, 3], "start_step, start_value, end_value, end_step"),
        ([200, 1.0, 2.0, 100], "before start_step"),
        ("fast", "expected a number"),
        ({"x": 1.0}, "step keys must be integers"),
        ({}, "at least one entry"),
        ([0, "a", 1, 2], "expected a number"),
    ],
)
def test_invalid_schedules_name_the_field(schedule, message):
    with pytest.raises(ReconError, match=message) as info:
        validate_schedule(schedule, "loss.sds")
    assert "loss.sds" in str(info.value)


def test_guidance_config_schedules_through_omegaconf():
    cfg = resolve(GuidanceConfig, {"min_step_percent": [0, 0.5, 0.1, 100]}, overrides=["guidance_scale=[0,5.0,3.0,100]"])
    assert value_at(cfg.guidance_scale, 50) == pytest.approx(4.0)
    assert value_at(cfg.min_step_percent, 100) == pytest.approx(0.1)
    assert value_at(cfg.max_step_percent, 0) == pytest.approx(0.85)
    assert len(cfg.nearby_views) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "cascade2"),
        ("weighting", "sdi"),
        ("coarse_target", "random"),
        ("guidance_scale", [1, 2]),
        ("nearby_views", [[0.0, 45.0]]),
    ],
)
def test_guidance_config_rejects_bad_values(field, value):
    with pytest.raises(ReconError, match=field):
        GuidanceConfig(**{field: value})
