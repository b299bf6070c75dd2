"""Typed configs: dataclass defaults, YAML presets as overrides, ``--set key.path=value``.

A preset (``configs/NAME.yaml`` in the package, or any YAML path) holds only
the values that differ from the dataclass defaults. The resolved config is
validated against the dataclass types by OmegaConf and saved as plain YAML.
"""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recon.errors import ReconError

T = TypeVar("T")


def presets_folder() -> Traversable:
    """The installed presets (package ``recon.configs``), or ``configs/`` of a source checkout run uninstalled."""
    try:
        return resources.files("recon.configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = presets_folder()
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(name_or_path: str | Path) -> dict[str, Any]:
    """The override dict of a shipped preset (by name) or of a YAML file (by path)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ReconError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ReconError(f"{path}: cannot read the config file as UTF-8 text ({exc})") from exc
    else:
        resource = presets_folder() / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ReconError(f"unknown preset {str(name_or_path)!r}; choose from {', '.join(preset_names())} or give a .yaml path")
        text = resource.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:  # syntax errors, and tags such as !!python/object that safe_load refuses
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ReconError(f"{name_or_path}: not a valid preset YAML file{at} ({problem}); presets hold plain values only") from exc
    if not isinstance(data, dict):
        raise ReconError(f"{name_or_path}: a preset must be a mapping of config keys")
    data.pop("description", None)
    return data


def _is_config_node(node: Any) -> bool:
    """Whether an OmegaConf node is a config section (a dataclass, or a mapping of dataclasses such as ``stages``)."""
    if not isinstance(node, DictConfig):
        return False
    if dataclasses.is_dataclass(OmegaConf.get_type(node)):
        return True
    values = list(node.values())
    return bool(values) and all(isinstance(v, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(v)) for v in values)


def _apply_layer(node: Any, data: dict[str, Any]) -> None:
    """Writes ``data`` into ``node``: sections merge key by key, every other value (schedules included) is replaced."""
    for key, value in data.items():
        key = str(key)
        child = node.get(key)
        if isinstance(value, dict) and _is_config_node(child):
            _apply_layer(child, value)
        elif key in node:
            OmegaConf.update(node, key, value, merge=False)
        else:
            node.merge_with({key: value})  # a new entry: a new stage gets the StageConfig defaults


def resolve(schema: type[T], *layers: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Writes dict ``layers`` then ``key.path=value`` overrides, in order, onto the defaults of ``schema``.

    Config sections (dataclasses, and mappings of them) merge key by key;
    every other value is replaced whole, so a schedule given as
    ``{step: value}`` or a list replaces the earlier one instead of merging
    its steps into it. Unknown keys and values of the wrong type raise
    :class:`ReconError` naming the key.
    """
    for item in overrides:
        if "=" not in item:
            raise ReconError(f"--set {item!r}: expected key.path=value")
    try:
        merged = OmegaConf.structured(schema)
        for layer in layers:
            if layer:
                _apply_layer(merged, layer)
        for item in overrides:
            _apply_layer(merged, OmegaConf.to_container(OmegaConf.from_dotlist([item])))
        check_values(OmegaConf.to_container(merged))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (OmegaConfBaseException, TypeError) as exc:
        key = getattr(exc, "full_key", None)
        where = f" at {key}" if key else ""
        raise ReconError(f"invalid config{where}: {str(exc).splitlines()[0]}") from exc


def check_values(value: Any, key: str = "") -> None:
    """Refuses values no config may hold, anywhere in a plain config: NaN or infinite numbers, a field of view
    (``*fovy*``) outside (0, 180) degrees, an empty colour list (``background``, ``*colour*``/``*color*``).

    Raises :class:`ReconError` naming the key, so a bad value stops a run before any work.
    """
    name = key.rsplit(".", 1)[-1]
    if isinstance(value, dict):
        for child_key, child in value.items():
            check_values(child, f"{key}.{child_key}" if key else str(child_key))
        return
    if isinstance(value, (list, tuple)):
        if not value and (name == "background" or "colour" in name or "color" in name):
            raise ReconError(f"invalid config at {key}: the colour list is empty")
        for index, child in enumerate(value):
            check_values(child, f"{key}[{index}]")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ReconError(f"invalid config at {key}: {value} is not a finite number")
    if "fovy" in name and isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 < value < 180:
        raise ReconError(f"invalid config at {key}: a field of view must be in (0, 180) degrees, got {value}")


def to_plain(config: Any) -> dict[str, Any]:
    """A dataclass config as plain dicts/lists/scalars (for YAML and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def from_plain(schema: type[T], data: dict[str, Any]) -> T:
    """Re-creates a config saved with :func:`to_plain` (type-checked)."""
    return resolve(schema, data)

