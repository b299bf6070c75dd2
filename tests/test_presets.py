"""Presets are overrides of FitConfig's defaults: every key exists, every preset resolves, none restates a default."""

from __future__ import annotations

from typing import Any

import pytest

from recon.config import preset_names, read_preset, resolve, to_plain
from recon.systems.fit import FitConfig


def leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every non-mapping value of a nested mapping."""
    if not isinstance(data, dict):
        return {prefix: data}
    found: dict[str, Any] = {}
    for key, value in data.items():
        found.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def lookup(plain: dict[str, Any], dotted: str) -> Any:
    node: Any = plain
    for key in dotted.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves_and_only_overrides(name):
    overrides = read_preset(name)
    resolved = to_plain(resolve(FitConfig, overrides))
    defaults = to_plain(resolve(FitConfig, None))
    for key in leaves(overrides):
        try:
            default = lookup(defaults, key)
        except KeyError:  # a stage added by a preset has no default to restate
            continue
        assert default != lookup(resolved, key), f"preset {name}: {key} restates the default {default!r}"


def test_the_default_preset_is_the_dataclass_defaults():
    assert read_preset("default") == {}
    assert to_plain(resolve(FitConfig, read_preset("default"))) == to_plain(FitConfig())
