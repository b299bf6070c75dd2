"""Errors that the CLI reports as one line and an exit code, without a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path


class ReconError(Exception):
    """A problem the user can fix (bad input, missing weights, bad flag); ``exit_code`` goes to the shell."""

    exit_code = 2


class InputError(ReconError):
    """An input file that cannot be used; the message names the file and the problem."""


class WeightsNotFoundError(ReconError):
    """Model weights were not found; the message lists where they were looked for and how to provide them."""

    exit_code = 3


class TrainingDivergedError(ReconError):
    """The optimisation produced NaN/inf and could not recover."""

    exit_code = 4


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, schedulers, Ray) raised as an interrupt, so a run ends like Ctrl-C: status ``interrupted``."""


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread.

    Outside the main thread (where Python cannot set signal handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def save_traceback(exc: BaseException, path: str | os.PathLike[str]) -> Path:
    """Writes ``exc``'s full traceback to ``path`` (atomically), notes the path on ``exc.recon_log`` and returns it."""
    from recon.fileio import write_text

    path = Path(path)
    write_text(path, "".join(traceback.format_exception(exc)))
    with contextlib.suppress(AttributeError):
        exc.recon_log = path  # type: ignore[attr-defined] - read by the CLI's error boundary
    return path
