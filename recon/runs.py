"""Run folders: everything needed to resume, inspect or re-export one optimisation.

Layout of a run folder (shared by ``recon fit`` and ``recon fit-views``)::

    RUN/
      .recon-run      marker: {"run_id": ...}, written first; proves recon made the folder
      .recon-manifest.json  run id; every file the run wrote ("name/": a whole folder), listed before it is
                      written; the folders it created
      config.yaml     resolved config, plain values (see "config.yaml keys" below)
      meta.json       versions, seed, device, command line, timings, peak memory, metrics
      progress.json   stage, step, total, eta_s, status (created|running|finished|failed|interrupted)
      checkpoints/    step_XXXXXX.pt (systems/checkpoint.py)
      previews/       PNGs written during training
      exports/        meshes and videos
      guidance/       the guidance's cache of generated views (a whole folder of the run)

Ownership: recon writes only into a new or empty folder (or a run it made),
and ``--overwrite`` deletes only what the manifest lists, in a folder whose
marker and manifest carry the same run id; anything else (a user's notes, a
foreign ``config.yaml``) is never touched. Every file a run writes is named
through :meth:`RunDir.file` (or :meth:`RunDir.register`), which lists it in
the manifest before it exists, so even a killed run leaves nothing unlisted.

config.yaml keys every trainer writes, so that ``recon export`` can rebuild
the field without knowing which trainer made the run:

* ``field``: the :class:`recon.field.FieldConfig` as plain values;
* ``export``: the :class:`exports.config.ExportConfig` defaults of the run;
* ``scene`` (optional): ``{"center": [x, y, z], "scale": s}``, the map from
  the output (user) frame to the field frame, ``field = (world - center) * scale``;
  absent means identity.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from recon import fileio
from recon.errors import InputError, ReconError

STATUSES = ("created", "running", "finished", "failed", "interrupted")
MARKER = ".recon-run"
MANIFEST = ".recon-manifest.json"
RUN_FOLDERS = ("checkpoints", "previews", "exports")
_PROCESS = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
"""Identifies this process in meta.json ``processes`` (one entry per process that worked on a run)."""
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

    @property
    def marker_path(self) -> Path:
        """``.recon-run``: the run id, written before anything else."""
        return self.root / MARKER

    @property
    def manifest_path(self) -> Path:
        """``.recon-manifest.json``: the run id and every file the run wrote."""
        return self.root / MANIFEST

    @staticmethod
    def is_run(root: str | Path) -> bool:
        """Whether ``root`` looks like a run (holds a ``config.yaml``); :meth:`is_owned` says whether recon made it."""
        return (Path(root) / "config.yaml").is_file()

    @staticmethod
    def is_owned(root: str | Path) -> bool:
        """Whether ``root`` is provably a folder recon made: its marker and manifest name the same run id."""
        return _read_manifest(Path(root)) is not None

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
        """Makes a new run folder with its marker, manifest, config, meta and progress files.

        ``config`` is the resolved config as plain values (``recon.config.to_plain``).
        Raises :class:`ReconError` if ``root`` already holds a run (reopen it with
        :meth:`open` to resume) or is a file. Use :meth:`claim` first to check that
        the folder is new, empty or one recon made.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"{root}: exists and is not a folder; give a folder path")
        if cls.is_run(root) or cls.is_owned(root):
            raise ReconError(f"{root}: already holds a run; resume it (--resume) or choose another output folder")
        run = cls(root)
        root.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex
        # The marker first: from here on the folder is provably ours.
        fileio.write_json(run.marker_path, {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        files = [MARKER, MANIFEST, "meta.json", "progress.json", "config.yaml"]
        folders = [name for name in RUN_FOLDERS if not (root / name).exists()]
        fileio.write_json(run.manifest_path, {"run_id": run_id, "files": files, "folders": folders})
        for folder in (run.checkpoints, run.previews, run.exports):
            folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "run_id": run_id,
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
        if cls.is_owned(root):
            for folder in (run.checkpoints, run.previews, run.exports):
                folder.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def claim(cls, root: str | Path, *, resume: bool = False, overwrite: bool = False) -> bool:
        """Checks that a command may write a run into ``root``; True when it resumes the run there.

        A new or empty folder is free; a run recon made is resumed with ``resume``
        or cleared with ``overwrite`` (:meth:`remove_owned`); anything else (a file,
        a folder with other files, a ``config.yaml`` recon did not write) raises
        :class:`ReconError` naming the folder, and nothing is written or deleted.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"{root}: exists and is not a folder; give the output as a folder path")
        owned = cls.is_owned(root)
        if cls.is_run(root) and not owned:
            raise ReconError(
                f"{root}: holds a config.yaml that recon did not write (no {MARKER} marker); recon never writes into "
                "or deletes a folder it did not make: choose another output folder"
            )
        if owned and overwrite:
            cls(root).remove_owned()
            return False
        if owned and cls.is_run(root):
            if resume:
                return True
            state = "a finished run" if cls(root).is_finished else "an unfinished run"
            raise ReconError(f"{root}: holds {state}; continue it with --resume or start over with --overwrite")
        if root.is_dir() and any(root.iterdir()):
            raise ReconError(
                f"{root}: exists, is not empty and is not a run folder recon made; recon writes only into new or "
                "empty folders (your files are left alone): choose another output folder"
            )
        return False

    def _manifest(self) -> dict[str, Any] | None:
        return _read_manifest(self.root)

    def register(self, *paths: str | Path) -> None:
        """Lists ``paths`` (inside the run folder; a name ending in ``/`` is a whole folder) in the manifest, before they
        are written. A no-op for a run folder without a manifest (made by an older recon)."""
        manifest = self._manifest()
        if manifest is None:
            return
        listed = set(manifest["files"])
        added = []
        for path in paths:
            name = self.relative(path)
            if str(path).endswith("/"):
                name += "/"
                folder = self.root / name
                if folder.exists() and name not in listed:
                    raise ReconError(f"{folder}: exists but recon did not make it; move it out of the run folder")
            if name not in listed:
                listed.add(name)
                added.append(name)
        if added:
            manifest["files"] = [*manifest["files"], *added]
            fileio.write_json(self.manifest_path, manifest)

    def file(self, relative: str) -> Path:
        """The path of a file the run is about to write (``"previews/step_000010.png"``), listed in the manifest."""
        self.register(relative)
        return self.root / relative

    def relative(self, path: str | Path) -> str:
        """``path`` as a name relative to the run folder; :class:`ReconError` if it lies outside it."""
        path = Path(path)
        relative = path.relative_to(self.root) if path.is_absolute() or path.parts[: len(self.root.parts)] == self.root.parts else path
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ReconError(f"{path}: not inside the run folder {self.root}")
        return relative.as_posix()

    def remove_owned(self) -> list[Path]:
        """Deletes what the run wrote (the files and folders its manifest lists) and returns the files kept.

        Raises :class:`ReconError` naming the folder, before deleting anything,
        when the folder is a symbolic link, is not provably a run recon made, or
        its ``checkpoints/`` holds files the run did not write (a later run would
        resume from them). Other files (a user's notes) stay where they are.
        """
        root = self.root
        if root.is_symlink():
            raise ReconError(
                f"{root}: is a symbolic link; --overwrite never deletes through a link: remove the link yourself "
                "or choose another output folder"
            )
        manifest = self._manifest()
        if manifest is None:
            raise ReconError(
                f"{root}: not a run folder recon made (no {MARKER} marker and manifest with one run id); --overwrite "
                "deletes only those: move your files away or choose another output folder"
            )
        base = root.resolve()
        files, trees = [], []
        for name in manifest["files"]:
            path = root / name.rstrip("/")
            if not _lexically_inside(base, path):
                continue
            if name.endswith("/"):
                if path.is_dir() and not path.is_symlink():
                    trees.append(path)
            elif path.is_file() or path.is_symlink():
                files.append(path)
            if not name.endswith("/") and path.parent.is_dir():
                files += [p for p in path.parent.glob(f".tmp-{path.stem}-*{path.suffix}") if p.is_file()]
        listed = {p.resolve() for p in files}
        checkpoints = self.checkpoints
        if checkpoints.is_dir() and not checkpoints.is_symlink():
            foreign = sorted(p.name for p in checkpoints.rglob("*") if p.is_file() and p.resolve() not in listed)
            if foreign:
                raise ReconError(
                    f"{checkpoints}: holds files recon did not write ({', '.join(foreign[:3])}); move them away, "
                    "then rerun with --overwrite"
                )
        last = {self.manifest_path.resolve(), self.marker_path.resolve()}
        for path in files:
            if path.resolve() not in last:
                path.unlink(missing_ok=True)
        for tree in trees:
            shutil.rmtree(tree)
        self.manifest_path.unlink(missing_ok=True)
        self.marker_path.unlink(missing_ok=True)  # last: until now a rerun could finish the job
        for name in manifest["folders"]:
            folder = root / name
            if not _lexically_inside(base, folder):
                continue
            with contextlib.suppress(OSError):
                if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                    folder.rmdir()
        kept = sorted(p for p in root.rglob("*") if p.is_file())
        if kept:
            from recon.progress import info

            info(f"{root}: removed the previous run; kept {len(kept)} file(s) recon did not write")
        return kept

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

    def set_meta(self, **keys: Any) -> dict[str, Any]:
        """Sets top-level ``keys`` of meta.json, each replaced whole (a nested dict is not merged: no stale
        entries survive), and rewrites it atomically; returns the result."""
        meta = {**self.read_meta(), **copy.deepcopy(keys)}
        fileio.write_json(self.meta_path, meta)
        return meta

    def record_timings(self, seconds: dict[str, float]) -> None:
        """Records this process's per-phase wall-clock seconds (e.g. ``PhaseTimer.seconds``, cumulative).

        Each process that works on the run (a resumed run has several) keeps
        its own entry under ``processes``; ``timings_s`` is the sum over them.
        """
        meta = self.read_meta()
        processes = [dict(p) for p in meta.get("processes", []) if isinstance(p, dict)]
        mine = next((p for p in processes if p.get("id") == _PROCESS), None)
        if mine is None:
            mine = {"id": _PROCESS, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(sys.argv), "timings_s": {}}
            processes.append(mine)
        mine["timings_s"] = {**mine.get("timings_s", {}), **{k: round(float(v), 3) for k, v in seconds.items()}}
        totals: dict[str, float] = {}
        for process in processes:
            for name, value in process.get("timings_s", {}).items():
                totals[name] = round(totals.get(name, 0.0) + float(value), 3)
        meta["processes"] = processes
        meta["timings_s"] = totals
        fileio.write_json(self.meta_path, meta)

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


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of ``root`` when its marker and manifest are readable and carry the same run id, else None."""
    try:
        marker = fileio.read_json(root / MARKER)
        manifest = fileio.read_json(root / MANIFEST)
    except (OSError, ValueError):
        return None
    if not (isinstance(marker, dict) and isinstance(manifest, dict)):
        return None
    run_id, files = manifest.get("run_id"), manifest.get("files")
    if not isinstance(run_id, str) or not run_id or marker.get("run_id") != run_id or not isinstance(files, list):
        return None
    folders = manifest.get("folders", [])
    return {"run_id": run_id, "files": [str(f) for f in files], "folders": [str(f) for f in folders] if isinstance(folders, list) else []}


def _lexically_inside(base: Path, path: Path) -> bool:
    """Whether ``path`` (its folder resolved, its own name not followed) lies inside the resolved folder ``base``."""
    try:
        return (path.parent.resolve() / path.name).is_relative_to(base) and ".." not in Path(path.name).parts
    except OSError:
        return False


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
