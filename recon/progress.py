"""One console for the whole program: progress bars with rate and ETA, a time line per phase."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

NON_TERMINAL_WIDTH = 4096
"""Line width when stderr is not a terminal (a log file, CI, a Ray worker): wide enough that nothing wraps or is cut."""


def _console() -> Console:
    """A stderr console; off a terminal, lines never wrap mid-sentence and tables keep every column whole."""
    made = Console(stderr=True, highlight=False, soft_wrap=True)
    if not made.is_terminal:
        made.width = NON_TERMINAL_WIDTH
    return made


console = _console()
_always = _console()


def set_quiet(quiet: bool) -> None:
    """Silences (or restores) everything printed through :data:`console`."""
    console.quiet = quiet


@contextlib.contextmanager
def quiet_while(quiet: bool) -> Iterator[None]:
    """:func:`set_quiet` for the duration of a block, then the previous state again (for library calls)."""
    previous = console.quiet
    console.quiet = quiet
    try:
        yield
    finally:
        console.quiet = previous


def info(message: str) -> None:
    """Prints one status line to stderr (suppressed by ``--quiet``)."""
    console.print(message)


def warn(message: str) -> None:
    """Prints a warning line to stderr; shown even with ``--quiet``."""
    _always.print(f"[yellow]warning:[/] {message}")


def error(message: str) -> None:
    """Prints an error line to stderr; shown even with ``--quiet``."""
    _always.print(f"[red]error:[/] {message}", soft_wrap=True)


def progress_bar(transient: bool = False) -> Progress:
    """A rich progress display with description, bar, n/total, it/s, elapsed and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=transient,
        disable=console.quiet,
    )


def format_rate(steps: int, seconds: float) -> str:
    """``"12.3 it/s"`` or ``"4.5 s/it"``, whichever reads better."""
    if steps <= 0 or seconds <= 0:
        return ""
    rate = steps / seconds
    return f"{rate:.1f} it/s" if rate >= 1 else f"{1 / rate:.1f} s/it"


@dataclass
class PhaseTimer:
    """Wall-clock seconds per named phase, printed as a time line when each phase ends."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the ``with`` body under ``name`` (accumulating if the name repeats)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            info(f"[dim]{name:<18}[/] {elapsed:8.1f} s")
