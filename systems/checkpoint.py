"""Checkpoints of a run: model and optimiser state, RNG state, step and stage.

One module for the checkpoints of every trainer (the fit trainers and the
cascade trainer). A checkpoint is ``RUN/checkpoints/step_XXXXXX.pt``, written with ``torch.save``
to a temporary name and renamed, so a crash during a save leaves the previous
checkpoint intact and nothing under a finished-looking name. It holds only
tensors and plain values and is read back with ``torch.load(weights_only=True)``::

    {"format": 1, "step": int, "stage": str,
     "modules": {name: state_dict}, "optimizers": {name: state_dict},
     "rng": recon.runtime.rng_state(), "extra": {...}}

Convention shared by the trainers: ``modules["field"]`` is the
:class:`recon.field.RadianceField` state and the run's config.yaml ``field``
key its :class:`recon.field.FieldConfig` (see :mod:`recon.runs`), which is
all :func:`load_field_from_run` needs.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recon.errors import InputError
from recon.fileio import atomic_path
from recon.runs import RunDir
from recon.runtime import rng_state, set_rng_state

FORMAT = 1
_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_path(run: RunDir, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``checkpoints/step_XXXXXX.pt``."""
    return run.checkpoints / f"step_{step:06d}.pt"


def list_checkpoints(where: RunDir | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run (or in a folder) as (step, path), oldest first (temporary files are ignored)."""
    folder = where.checkpoints if isinstance(where, RunDir) else Path(where)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_checkpoint_file(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Atomically writes ``payload`` as ``folder/step_XXXXXX.pt`` and deletes all but the newest ``keep`` (0 keeps all)."""
    path = Path(folder) / f"step_{step:06d}.pt"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if keep > 0:
        for _, old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def read_checkpoint_file(path: Path, map_location: str | torch.device | None = "cpu") -> Any:
    """Reads a checkpoint file with ``weights_only=True``; :class:`InputError` naming it if it is unreadable or unsafe."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: unreadable checkpoint (holds objects other than tensors and plain values; refused)") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def _state(item: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    return item.state_dict() if isinstance(item, nn.Module) else dict(item)


def save_checkpoint(
    run: RunDir,
    step: int,
    stage: str,
    modules: Mapping[str, nn.Module | Mapping[str, Tensor]],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Atomically writes the checkpoint of ``step`` and deletes all but the newest ``keep``.

    ``modules`` maps a name to a module or a ready state dict (e.g. a renderer's
    state without its field's keys); ``extra`` holds plain values or tensors.
    RNG states of Python, NumPy and torch (all devices) are included.
    """
    payload = {
        "format": FORMAT,
        "step": int(step),
        "stage": str(stage),
        "modules": {name: _state(item) for name, item in modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in (optimizers or {}).items()},
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    run.register(checkpoint_path(run, step))  # listed in the run's manifest before it exists
    return write_checkpoint_file(run.checkpoints, step, payload, keep)


@dataclass
class Checkpoint:
    """A loaded checkpoint (see the module docstring for the fields)."""

    path: Path
    step: int
    stage: str
    modules: dict[str, dict[str, Tensor]]
    optimizers: dict[str, dict[str, Any]]
    rng: dict[str, Any]
    extra: dict[str, Any]

    def restore(
        self,
        modules: Mapping[str, nn.Module] | None = None,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        rng: bool = True,
        strict: bool = True,
    ) -> None:
        """Loads the saved states into ``modules`` and ``optimizers`` (by name) and restores the RNGs.

        Raises :class:`InputError` naming the checkpoint when a name is missing.
        """
        for name, module in (modules or {}).items():
            if name not in self.modules:
                raise InputError(f"{self.path}: no state for module {name!r} (has {', '.join(self.modules)})")
            module.load_state_dict(self.modules[name], strict=strict)
        for name, optimizer in (optimizers or {}).items():
            if name not in self.optimizers:
                raise InputError(f"{self.path}: no state for optimiser {name!r}")
            optimizer.load_state_dict(self.optimizers[name])
        if rng:
            set_rng_state(self.rng)


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> Checkpoint:
    """Reads one checkpoint file with ``weights_only=True``; :class:`InputError` if it is unreadable."""
    path = Path(path)
    data = read_checkpoint_file(path, map_location)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: not a recon checkpoint (format {data.get('format') if isinstance(data, dict) else '?'})")
    try:
        return Checkpoint(
            path=path,
            step=int(data["step"]),
            stage=str(data["stage"]),
            modules=data["modules"],
            optimizers=data["optimizers"],
            rng=data["rng"],
            extra=data["extra"],
        )
    except (KeyError, TypeError, ValueError) as exc:  # a damaged file that still unpickles
        raise InputError(f"{path}: damaged recon checkpoint (bad or missing {exc})") from exc


def load_latest(run: RunDir, map_location: str | torch.device | None = "cpu") -> Checkpoint | None:
    """The newest readable checkpoint of ``run``, or None if it has none.

    An unreadable newest checkpoint (truncated by a crash or a full disk) is
    skipped with a warning for the one before it; :class:`InputError` when none is readable.
    """
    found = list_checkpoints(run)
    for index in range(len(found) - 1, -1, -1):
        try:
            return load_checkpoint(found[index][1], map_location)
        except InputError as exc:
            if index == 0:
                raise
            from recon.progress import warn

            warn(f"{exc}; using the previous checkpoint {found[index - 1][1].name} instead")
    return None


def load_field_from_run(run_dir: str | Path | RunDir, device: str | torch.device = "cpu") -> tuple[nn.Module, Checkpoint]:
    """Rebuilds the run's :class:`recon.field.RadianceField` from config.yaml ``field`` and the newest checkpoint.

    Works for finished and interrupted runs. Returns the field (eval mode, on
    ``device``) and the checkpoint it came from. Raises :class:`InputError` if
    the run has no checkpoint or its config has no ``field`` key.
    """
    from recon.config import from_plain
    from recon.field import FieldConfig, RadianceField

    run = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    config = run.read_config()
    if "field" not in config:
        raise InputError(f"{run.config_path}: no 'field' key; cannot rebuild the radiance field")
    checkpoint = load_latest(run, map_location="cpu")
    if checkpoint is None:
        raise InputError(f"{run.root}: no checkpoint yet in {run.checkpoints}; nothing to export")
    if "field" not in checkpoint.modules:
        raise InputError(f"{checkpoint.path}: holds no 'field' state")
    field = RadianceField(from_plain(FieldConfig, config["field"]))
    field.load_state_dict(checkpoint.modules["field"])
    return field.to(device).eval(), checkpoint


@dataclass(frozen=True)
class SceneTransform:
    """Map from a run's output (user) frame to its field frame: ``field = (world - center) * scale``."""

    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> SceneTransform:
        """The ``scene`` key of a run's config (identity when absent)."""
        scene = config.get("scene") or {}
        center = scene.get("center") or (0.0, 0.0, 0.0)
        return SceneTransform(tuple(float(c) for c in center), float(scene.get("scale") or 1.0))  # type: ignore[arg-type]

    def to_field(self, points: Tensor) -> Tensor:
        """(P, 3) output-frame points -> field-frame points."""
        return (points - points.new_tensor(self.center)) * self.scale

    def to_world(self, points: Tensor) -> Tensor:
        """(P, 3) field-frame points -> output-frame points."""
        return points / self.scale + points.new_tensor(self.center)
