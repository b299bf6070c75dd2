"""Many images, one run folder each: sorted, stem-named, finished runs skipped, failures isolated.

The runner knows nothing about how one image is reconstructed: it calls
``fit_one(image, run_dir)`` for each, records what happened, and writes
``OUTPUT/batch_summary.json`` plus a table at the end. One bad image never
stops the rest (only Ctrl-C does).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recon import fileio
from recon.errors import ReconError
from recon.runs import RunDir

STATUSES = ("finished", "skipped", "failed")
LIVE_STATUSES = ("pending", "running", "interrupted")
"""Statuses of a summary written while a scaled-out batch runs (or after Ctrl-C stopped it)."""
SUMMARY_NAME = "batch_summary.json"


@dataclass
class ImageResult:
    """What happened to one input image."""

    image: Path
    """The input file."""
    run_dir: Path
    """Its run folder."""
    status: str = "failed"
    """finished, skipped (an earlier run had finished) or failed; while a scaled-out batch runs also
    pending, running, and interrupted after Ctrl-C."""
    seconds: float = 0.0
    """Wall-clock time spent on it in this invocation."""
    error: str | None = None
    """One-line reason when it failed."""
    exports: dict[str, str] = field(default_factory=dict)
    """Written files by format (glb, obj, turntable, ...)."""
    timings_s: dict[str, float] = field(default_factory=dict)
    """Seconds per phase (from the run's meta.json)."""
    attempts: int = 0
    """Times it was started in this invocation (2 after a crashed worker's retry)."""
    worker: str | None = None
    """The worker that ran it last (scaled-out batches: gpu0, cpu1, ray0, ...)."""
    started_at: float | None = None
    """Unix time (s) its last attempt started (scaled-out batches)."""

    def to_json(self) -> dict[str, Any]:
        """Plain values for batch_summary.json."""
        data = asdict(self)
        data["image"], data["run_dir"] = str(self.image), str(self.run_dir)
        return data


def run_names(images: Sequence[Path]) -> list[str]:
    """Run-folder names for ``images``: the file stem, made unique in input order.

    A repeated stem gets the extension appended (``cat-jpg``), then a number
    (``cat-2``), so names depend only on the (sorted) input list.
    """
    taken: set[str] = set()
    names = []
    for image in images:
        name = image.stem or image.name
        if name in taken:
            with_ext = f"{name}-{image.suffix.lstrip('.').lower()}" if image.suffix else name
            name = with_ext
            index = 2
            while name in taken:
                name = f"{with_ext}-{index}"
                index += 1
        taken.add(name)
        names.append(name)
    return names


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that completed training and export."""
    return RunDir.is_run(run_dir) and RunDir(run_dir).is_finished


def one_line(exc: BaseException) -> str:
    """The one-line reason recorded for a failed image: a ReconError's message, else ``Type: first line``."""
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(exc, ReconError) else f"{type(exc).__name__}: {message}"


def run_batch(
    images: Sequence[Path],
    output: Path,
    fit_one: Callable[[Path, Path], dict[str, Any]],
    overwrite: bool = False,
    write_summary: bool = True,
) -> list[ImageResult]:
    """Runs ``fit_one(image, run_dir)`` for each image (in the given order) under ``output``.

    ``fit_one`` returns ``{"exports": {...}, "timings_s": {...}}`` (either may
    be missing) or raises; any ``Exception`` marks that image failed and the
    batch goes on. Finished runs are skipped unless ``overwrite``. Writes
    ``output/batch_summary.json`` when ``write_summary``.
    """
    from rich.markup import escape

    from recon.progress import error, info

    output = Path(output)
    results: list[ImageResult] = []
    for index, (image, name) in enumerate(zip(images, run_names(images)), start=1):
        result = ImageResult(image=image, run_dir=output / name)
        info(f"[bold]\\[{index}/{len(images)}][/] {image} -> {result.run_dir}")
        start = time.perf_counter()
        if not overwrite and is_finished(result.run_dir):
            result.status = "skipped"
            info(f"{result.run_dir}: already finished; skipped (--overwrite to redo)")
        else:
            result.attempts, result.started_at = 1, round(time.time(), 3)
            try:
                outcome = fit_one(image, result.run_dir) or {}
                result.status = "finished"
                result.exports = {k: str(v) for k, v in (outcome.get("exports") or {}).items()}
                result.timings_s = dict(outcome.get("timings_s") or {})
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch
                result.error = one_line(exc)
                error(escape(result.error if str(image) in result.error else f"{image}: {result.error}"))
                if not isinstance(exc, ReconError):
                    info("[dim]" + traceback.format_exc().rstrip().replace("[", "\\[") + "[/]")
        result.seconds = round(time.perf_counter() - start, 3)
        results.append(result)
        if write_summary:
            save_summary(output, results)
    return results


def save_summary(output: Path, results: Sequence[ImageResult], workers: Sequence[dict[str, Any]] | None = None) -> Path:
    """Atomically writes ``output/batch_summary.json``: counts per status and one record per image.

    Counts always hold :data:`STATUSES`, and the :data:`LIVE_STATUSES` that occur;
    ``workers`` (scaled-out batches) lists each worker's label, device, pid and current image.
    """
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    counts.update({status: n for status in LIVE_STATUSES if (n := sum(r.status == status for r in results))})
    data: dict[str, Any] = {"counts": counts, "images": [r.to_json() for r in results]}
    if workers is not None:
        data["workers"] = list(workers)
    path = Path(output) / SUMMARY_NAME
    fileio.write_json(path, data)
    return path


def print_summary(results: Sequence[ImageResult]) -> None:
    """A table of image, status, time and error on the console (suppressed by --quiet, except failures)."""
    from rich.markup import escape
    from rich.table import Table

    from recon.progress import console, error

    table = Table(title="batch summary")
    for column in ("image", "run folder", "status", "time (s)", "error"):
        table.add_column(column)
    colours = {"finished": "green", "skipped": "cyan", "failed": "red", "pending": "dim", "running": "yellow", "interrupted": "yellow"}
    for r in results:
        table.add_row(escape(str(r.image)), escape(str(r.run_dir)), f"[{colours[r.status]}]{r.status}[/]", f"{r.seconds:.1f}", escape(r.error or ""))
    console.print(table)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        error(f"{len(failed)} of {len(results)} image(s) failed; see the table above or batch_summary.json")
