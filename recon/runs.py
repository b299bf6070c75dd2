"""Run folders: everything needed to resume, inspect or re-export one optimisation.

Layout of a run folder (shared by ``recon fit`` and ``recon fit-views``)::

    RUN/
      config.yaml     resolved config, plain values (see "config.yaml keys" below)
      meta.json       versions, seed, device, command line, timings, peak memory, metrics
      progress.json   stage, step, total, eta_s, status (created|running|finished|failed|interrupted)
      checkpoints/    step_XXXXXX.pt (systems/checkpoint.py)
      previews/       PNGs written during training
      exports/        meshes and videos

config.yaml keys every trainer writes, so that ``recon export`` can rebuild
the field without knowing which trainer made the run:

* ``field``: the :class:`recon.field.FieldConfig` as plain values;
* ``export``: the :class:`exports.config.ExportConfig` defaults of the run;
* ``scene`` (optional): ``{"center": [x, y, z], "scale": s}``, the map from
  the output (user) frame to the field frame, ``field = (world - center) * scale``;
  absent means identity.
"""

from __future__ import annotations

import copy
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from recon import fileio
from recon.errors import InputError, ReconError

STATUSES = ("created", "running", "finished", "failed", "interrupted")
_VERSIONED = ("recon", "torch", "numpy", "nerfacc", "tinycudann", "diffusers", "transformers", "trimesh", "xatlas")


def package_versions() -> dict[str, str]:
    """Installed versions of recon and the libraries that change its results (absent ones are skipped)."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import torch

    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in; nested dicts merge key by key, other values replace."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass(frozen=True)
class RunDir:
    """A run folder on disk; create one with :meth:`create`, reopen it with :meth:`open`."""

    root: Path

    @property
    def config_path(self) -> Path:
        """``config.yaml``: the resolved config as plain values."""
        return self.root / "config.yaml"

    @property
    def meta_path(self) -> Path:
        """``meta.json``: versions, seed, device, command line, timings, peak memory, metrics."""
        return self.root / "meta.json"

    @property
    def progress_path(self) -> Path:
        """``progress.json``: stage, step, total, eta_s, status."""
        return self.root / "progress.json"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: step_XXXXXX.pt files."""
        return self.root / "checkpoints"

    @property
    def previews(self) -> Path:
        """``previews/``: PNGs written during training."""
        return self.root / "previews"

    @property
    def exports(self) -> Path:
        """``exports/``: meshes and videos."""
        return self.root / "exports"

    @staticmethod
    def is_run(root: str | Path) -> bool:
        """Whether ``root`` holds a run (a ``config.yaml`` written by :meth:`create`)."""
        return (Path(root) / "config.yaml").is_file()

    @classmethod
    def create(
        cls,
        root: str | Path,
        config: dict[str, Any],
        *,
        seed: int | None = None,
        device: str | None = None,
        command: list[str] | None = None,
        extra_meta: dict[str, Any] | None = None,
    ) -> RunDir:
        """Makes a new run folder with its config, meta and progress files.

        ``config`` is the resolved config as plain values (``recon.config.to_plain``).
        Raises :class:`ReconError` if ``root`` already holds a run (reopen it with
        :meth:`open` to resume) or is a file.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ReconError(f"{root}: exists and is not a folder")
        if cls.is_run(root):
            raise ReconError(f"{root}: already holds a run; resume it (--resume) or choose another output folder")
        run = cls(root)
        for folder in (run.checkpoints, run.previews, run.exports):
            folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": list(sys.argv if command is None else command),
            "seed": seed,
            "device": device,
            "versions": package_versions(),
            "platform": platform.platform(),
            "timings_s": {},
        }
        fileio.write_json(run.meta_path, _deep_merge(meta, extra_meta or {}))
        fileio.write_json(run.progress_path, {"stage": None, "step": 0, "total": None, "eta_s": None, "status": "created"})
        # config.yaml last: its presence is what marks the folder as a run.
        fileio.write_yaml(run.config_path, config)
        return run

    @classmethod
    def open(cls, root: str | Path) -> RunDir:
        """An existing run folder; :class:`InputError` if ``root`` holds no run."""
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: run folder not found")
        if not cls.is_run(root):
            raise InputError(f"{root}: not a run folder (no config.yaml)")
        run = cls(root)
        for folder in (run.checkpoints, run.previews, run.exports):
            folder.mkdir(parents=True, exist_ok=True)
        return run

    def read_config(self) -> dict[str, Any]:
        """The run's config.yaml as plain values."""
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{self.config_path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(data, dict):
            raise InputError(f"{self.config_path}: expected a mapping of config keys")
        return data

    def write_config(self, config: dict[str, Any]) -> None:
        """Replaces config.yaml (plain values)."""
        fileio.write_yaml(self.config_path, config)

    def read_meta(self) -> dict[str, Any]:
        """meta.json, or an empty dict if it is missing."""
        return fileio.read_json(self.meta_path) if self.meta_path.is_file() else {}

    def update_meta(self, **keys: Any) -> dict[str, Any]:
        """Merges ``keys`` into meta.json (nested dicts key by key) and rewrites it atomically; returns the result."""
        meta = _deep_merge(self.read_meta(), keys)
        fileio.write_json(self.meta_path, meta)
        return meta

    def record_timings(self, seconds: dict[str, float]) -> None:
        """Adds per-phase wall-clock seconds (e.g. ``PhaseTimer.seconds``) under ``timings_s``."""
        self.update_meta(timings_s={name: round(float(value), 3) for name, value in seconds.items()})

    def read_progress(self) -> dict[str, Any]:
        """progress.json, or a ``created`` record if it is missing."""
        if not self.progress_path.is_file():
            return {"stage": None, "step": 0, "total": None, "eta_s": None, "status": "created"}
        return fileio.read_json(self.progress_path)

    def write_progress(
        self, stage: str | None, step: int, total: int | None, eta_s: float | None = None, status: str = "running", **extra: Any
    ) -> None:
        """Rewrites progress.json; ``status`` is one of :data:`STATUSES`."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        record = {"stage": stage, "step": int(step), "total": total, "eta_s": None if eta_s is None else round(float(eta_s), 1)}
        record.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra)
        fileio.write_json(self.progress_path, record)

    def set_status(self, status: str) -> None:
        """Changes only the status in progress.json (e.g. ``interrupted`` on Ctrl-C)."""
        progress = self.read_progress()
        self.write_progress(
            progress.get("stage"), progress.get("step", 0), progress.get("total"), progress.get("eta_s"), status
        )

    @property
    def is_finished(self) -> bool:
        """Whether the run's training completed (progress.json status ``finished``)."""
        return self.read_progress().get("status") == "finished"


@dataclass
class StepReporter:
    """Drives a progress bar (it/s + ETA) and the run's progress.json for one training stage.

    ``progress.json`` is rewritten at most every ``write_every_s`` seconds and
    on the last step, so reporting stays cheap at thousands of steps per second.
    The rate and ETA count only steps taken in this process (a resumed run
    does not inherit a stale rate).
    """

    run: RunDir
    stage: str
    total: int
    start_step: int = 0
    write_every_s: float = 2.0
    _bar: Any = field(default=None, init=False, repr=False)
    _task: Any = field(default=None, init=False, repr=False)
    _t0: float = field(default=0.0, init=False, repr=False)
    _last_write: float = field(default=-1e9, init=False, repr=False)

    def __enter__(self) -> StepReporter:  # noqa: PYI034 - typing.Self needs Python 3.11
        from recon.progress import progress_bar

        self._bar = progress_bar()
        self._bar.__enter__()
        self._task = self._bar.add_task(self.stage, total=self.total, completed=self.start_step, rate="", status="")
        self._t0 = time.perf_counter()
        self.run.write_progress(self.stage, self.start_step, self.total, None, "running")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.__exit__(*exc_info)

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the current rate, or None before the first step of this process."""
        done = step - self.start_step
        elapsed = time.perf_counter() - self._t0
        if done <= 0 or elapsed <= 0:
            return None
        return (self.total - step) * elapsed / done

    def update(self, step: int, status: str = "") -> None:
        """Reports that ``step`` steps are complete; ``status`` is a short text such as ``loss 0.012``."""
        from recon.progress import format_rate

        elapsed = time.perf_counter() - self._t0
        self._bar.update(self._task, completed=step, rate=format_rate(step - self.start_step, elapsed), status=status)
        now = time.perf_counter()
        if now - self._last_write >= self.write_every_s or step >= self.total:
            self._last_write = now
            self.run.write_progress(self.stage, step, self.total, self.eta_s(step), "running")
