"""Typed configs: defaults <- preset <- --set overrides, plain YAML round trip, clear errors."""

from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from recon.config import from_plain, read_preset, resolve, to_plain
from recon.errors import ReconError


@dataclass
class Inner:
    width: int = 64
    """MLP width."""
    schedule: list[float] = field(default_factory=lambda: [0.0, 1.0, 0.5, 100.0])
    """A ramp."""


@dataclass
class Outer:
    seed: int = 0
    """Seed."""
    name: str = "a"
    """Name."""
    threshold: float | None = None
    """None = automatic."""
    inner: Inner = field(default_factory=Inner)
    """Nested part."""


@dataclass
class Scheduled:
    weight: Any = field(default_factory=lambda: {0: 1.0, 100: 2.0})
    """A {step: value} schedule."""
    ramp: Any = field(default_factory=lambda: [0, 1.0, 2.0, 100])
    """A [start_step, v0, v1, end_step] schedule."""
    inner: Inner = field(default_factory=Inner)
    """Nested part."""


def test_a_step_schedule_replaces_an_earlier_schedule_instead_of_merging():
    # Over the defaults: dict over dict, dict over list.
    config = resolve(Scheduled, {"weight": {50: 3.0}, "ramp": {10: 4.0}})
    assert config.weight == {50: 3.0} and config.ramp == {10: 4.0}
    # A later layer over an earlier layer, and a list over a dict.
    assert resolve(Scheduled, {"weight": {0: 5.0, 10: 6.0}}, {"weight": {20: 7.0}}).weight == {20: 7.0}
    assert resolve(Scheduled, {"weight": {0: 5.0}}, {"weight": [0, 1.0, 0.0, 10]}).weight == [0, 1.0, 0.0, 10]
    # --set over a layer and over the defaults.
    config = resolve(Scheduled, {"weight": {0: 5.0, 10: 6.0}}, overrides=["weight={20: 7.0}", "ramp={30: 8.0}"])
    assert config.weight == {20: 7.0} and config.ramp == {30: 8.0}
    # Sections still merge key by key.
    config = resolve(Scheduled, {"inner": {"width": 8}}, overrides=["inner.schedule=[1, 2, 3, 4]"])
    assert config.inner.width == 8 and config.inner.schedule == [1.0, 2.0, 3.0, 4.0]


def test_layers_then_overrides_win():
    config = resolve(Outer, {"seed": 3, "inner": {"width": 32}}, {"name": "b"}, overrides=["inner.width=16", "threshold=2.5"])
    assert isinstance(config, Outer) and isinstance(config.inner, Inner)
    assert (config.seed, config.name, config.inner.width, config.threshold) == (3, "b", 16, 2.5)
    assert config.inner.schedule == [0.0, 1.0, 0.5, 100.0]


def test_plain_round_trip_through_yaml():
    config = resolve(Outer, overrides=["inner.schedule=[1,2,3,4]"])
    plain = yaml.safe_load(yaml.safe_dump(to_plain(config)))
    assert plain["inner"]["schedule"] == [1.0, 2.0, 3.0, 4.0]
    assert from_plain(Outer, plain) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["inner.nope=1"], "nope"), (["seed=abc"], "seed"), (["seed"], "key.path=value")],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ReconError, match=message):
        resolve(Outer, overrides=overrides)


def test_preset_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("description: test preset\nseed: 7\n")
    assert read_preset(path) == {"seed": 7}
    with pytest.raises(ReconError, match="not found"):
        read_preset(tmp_path / "missing.yaml")
    with pytest.raises(ReconError, match="unknown preset"):
        read_preset("no-such-preset")
