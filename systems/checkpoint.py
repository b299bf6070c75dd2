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

``save_checkpoint(..., background=True)`` (the fit trainer) keeps the write off
the training loop: the state is copied to host memory at once (one copy per
tensor into reused buffers, pinned and asynchronous for CUDA tensors) and a
background thread writes, renames and prunes, one write at a time. Every reader
here (:func:`list_checkpoints`, :func:`read_checkpoint_file` and what uses them)
first waits for a write in flight into its folder, so it sees finished files
only; a failed write is raised as :class:`recon.errors.ReconError` by the next
save or wait and leaves the previous checkpoint intact. The thread is not a
daemon: a process that ends (an error, Ctrl-C, SIGTERM) finishes the write
first, and a process killed outright leaves only a ``.tmp-*`` file.
"""

from __future__ import annotations

import copy
import pickle
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recon.errors import InputError, ReconError, one_line
from recon.fileio import atomic_path
from recon.runs import RunDir
from recon.runtime import rng_state, set_rng_state

FORMAT = 1
_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_path(run: RunDir, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``checkpoints/step_XXXXXX.pt``."""
    return run.checkpoints / f"step_{step:06d}.pt"


def list_checkpoints(where: RunDir | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run (or in a folder) as (step, path), oldest first (temporary files are ignored).

    Waits for a background write into the folder first.
    """
    folder = where.checkpoints if isinstance(where, RunDir) else Path(where)
    _WRITER.wait(folder)
    return _scan(folder)


def _scan(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_checkpoint_file(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Atomically writes ``payload`` as ``folder/step_XXXXXX.pt`` and deletes all but the newest ``keep`` (0 keeps all).

    Synchronous; waits for a background write into ``folder`` first.
    """
    _WRITER.wait(Path(folder))
    return _write_file(Path(folder), step, payload, keep)


def _write_file(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    path = folder / f"step_{step:06d}.pt"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if keep > 0:
        for _, old in _scan(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


class CheckpointWriter:
    """Writes checkpoint files in one background thread, one at a time (``save_checkpoint(background=True)``).

    :meth:`submit` copies every tensor of the payload into a host buffer kept for
    the next save (CUDA tensors: pinned memory, asynchronous copies that the
    thread waits for), so training may change the live tensors as soon as it
    returns; the thread then writes, renames and prunes as
    :func:`write_checkpoint_file` does. ``submit`` and :meth:`wait` first wait
    for the write in flight and raise :class:`ReconError` if it failed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the fields below
        self._submitting = threading.Lock()  # one submit at a time (trainers in several threads), and the buffers
        self._thread: threading.Thread | None = None
        self._path: Path | None = None
        self._folder: Path | None = None  # resolved parent of _path
        self._error: BaseException | None = None
        self._buffers: dict[tuple[Any, ...], Tensor] = {}

    def submit(self, folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
        """Snapshots ``payload`` and starts writing it as ``folder/step_XXXXXX.pt``; returns that path (written later)."""
        path = Path(folder) / f"step_{step:06d}.pt"
        with self._submitting:
            self.wait()
            devices: set[torch.device] = set()
            snapshot = self._snapshot(payload, (), devices)
            copied = []
            for device in devices:  # the copies are queued on each device's current stream
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                copied.append(event)
            thread = threading.Thread(target=self._write, args=(Path(folder), step, snapshot, keep, copied), name=f"recon-checkpoint-{step}")
            with self._lock:
                self._thread, self._path, self._folder, self._error = thread, path, Path(folder).resolve(), None
            thread.start()
        return path

    def wait(self, folder: Path | None = None, release_buffers: bool = False) -> None:
        """Waits for the write in flight (with ``folder``: only for one into that folder).

        Raises :class:`ReconError` naming the checkpoint if that write failed.
        ``release_buffers`` then frees the host buffers kept between saves.
        """
        with self._lock:
            thread, path, into = self._thread, self._path, self._folder
        if thread is not None and (folder is None or into == Path(folder).resolve()):
            thread.join()
            with self._lock:
                error = self._error if self._thread is thread else None
                if self._thread is thread:
                    self._thread, self._path, self._folder, self._error = None, None, None, None
            if error is not None:
                raise ReconError(
                    f"{path}: writing the checkpoint failed ({type(error).__name__}: {one_line(error)}); "
                    "the previous checkpoint is kept"
                ) from error
        if release_buffers:
            with self._submitting:
                if self._thread is None:
                    self._buffers.clear()

    def _write(self, folder: Path, step: int, payload: dict[str, Any], keep: int, copied: list[Any]) -> None:
        try:
            for event in copied:
                event.synchronize()
            _write_file(folder, step, payload, keep)
        except BaseException as exc:  # noqa: BLE001 - raised in the training thread by the next save or wait
            with self._lock:
                self._error = exc

    def _snapshot(self, value: Any, key: tuple[Any, ...], devices: set[torch.device]) -> Any:
        """``value`` with every tensor replaced by its host copy; containers are copied, other values shared."""
        if isinstance(value, Tensor):
            return self._host_copy(value, key, devices)
        if isinstance(value, dict):
            out = copy.copy(value)  # keeps the type and attributes (a state dict's _metadata)
            for name in out:
                out[name] = self._snapshot(out[name], (*key, name), devices)
            return out
        if isinstance(value, list | tuple):
            items = [self._snapshot(item, (*key, index), devices) for index, item in enumerate(value)]
            if isinstance(value, list):
                return items
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    def _host_copy(self, tensor: Tensor, key: tuple[Any, ...], devices: set[torch.device]) -> Tensor:
        cuda = tensor.device.type == "cuda"
        key = (*key, cuda)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
            self._buffers[key] = buffer
        buffer.copy_(tensor.detach(), non_blocking=cuda)
        if cuda:
            devices.add(tensor.device)
        return buffer


_WRITER = CheckpointWriter()


def wait_for_checkpoints(where: RunDir | Path | None = None, release_buffers: bool = False) -> None:
    """Waits for the background checkpoint write in flight (with ``where``: only one into that run or folder).

    Raises :class:`ReconError` if it failed (the previous checkpoint is then
    the newest). ``release_buffers`` frees the host copies kept between saves
    (the end of a run).
    """
    folder = where.checkpoints if isinstance(where, RunDir) else where
    _WRITER.wait(None if folder is None else Path(folder), release_buffers)


def read_checkpoint_file(path: Path, map_location: str | torch.device | None = "cpu") -> Any:
    """Reads a checkpoint file with ``weights_only=True``; :class:`InputError` naming it if it is unreadable or unsafe.

    Waits for a background write into its folder first.
    """
    _WRITER.wait(Path(path).parent)
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
    background: bool = False,
) -> Path:
    """Atomically writes the checkpoint of ``step`` and deletes all but the newest ``keep``.

    ``modules`` maps a name to a module or a ready state dict (e.g. a renderer's
    state without its field's keys); ``extra`` holds plain values or tensors.
    RNG states of Python, NumPy and torch (all devices) are included.
    ``background``: snapshot the state now and write it in a background thread
    (see the module docstring); returns the path it will have.
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
    if background:
        return _WRITER.submit(run.checkpoints, step, payload, keep)
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


def load_renderer_from_run(run_dir: str | Path | RunDir, device: str | torch.device = "cpu") -> tuple[nn.Module, Checkpoint]:
    """The run's :class:`recon.render.VolumeRenderer` (config.yaml ``renderer``) over the field of
    :func:`load_field_from_run`, with that checkpoint's occupancy grid; eval mode, on ``device``."""
    from recon.config import from_plain
    from recon.render import RendererConfig, VolumeRenderer

    run = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    field, checkpoint = load_field_from_run(run, device)
    renderer = VolumeRenderer(field, from_plain(RendererConfig, run.read_config().get("renderer", {}))).to(device)
    state = renderer.state_dict()
    state.update(checkpoint.modules.get("renderer", {}))
    renderer.load_state_dict(state)
    return renderer.eval(), checkpoint


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
