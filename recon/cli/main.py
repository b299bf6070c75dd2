"""Entry point of the ``recon`` console script (:func:`run`, which calls :func:`main`).

Each command is a dataclass in its own module (``recon.cli.<module>``) whose
field docstrings are the ``--help`` text and whose ``run()`` does the work
and returns the exit code. Only the chosen command's module is imported, so
``recon --help`` stays instant.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import tempfile
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tyro.constructors import ConstructorRegistry

# command name -> (module under recon.cli, class name, one-line summary)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fit": ("fit", "FitCommand", "One image (or several, or a folder) to a textured mesh."),
    "batch": ("fit", "BatchCommand", "Reconstruct every image in a folder; resumable, one failure never stops the rest."),
    "export": ("export", "ExportCommand", "Re-export a finished or interrupted run as GLB / OBJ+MTL+PNG / PLY."),
    "fit-views": ("fit_views", "FitViewsCommand", "Fit a NeRF to posed images (transforms.json) and export a mesh."),
    "novel-view": ("novel_view", "NovelViewCommand", "Generate new views of an object photo with Zero-1-to-3."),
    "data": ("data", "DataSynthCommand", "'recon data synth': render a synthetic multi-view training set."),
    "train-cascade": ("train", "TrainCascadeCommand", "Train Base/Refiner Zero-1-to-3 by self-distillation."),
    "eval-nvs": ("eval_nvs", "EvalNVSCommand", "Score novel views against ground-truth renders (PSNR, SSIM, consistency)."),
    "convert-weights": ("convert_weights", "ConvertWeightsCommand", "Convert Zero-1-to-3 weights (.ckpt, ...) to a safetensors diffusers folder."),
    "report": ("report", "ReportCommand", "Write OUTPUTS/report.html: every image's input, cut-out, turntable and 3D view."),
    "app": ("app", "AppCommand", "A local web app (Gradio, pip install '.[app]'): drop a photo, watch it become a mesh."),
}

# Commands with a second word (``recon data synth``).
SUBCOMMANDS: dict[str, set[str]] = {"data": {"synth"}}


def _usage() -> str:
    lines = ["usage: recon COMMAND [OPTIONS]  (recon COMMAND --help for its options)", "", "commands:"]
    for name, (_, _, summary) in COMMANDS.items():
        lines.append(f"  {name:<14} {summary}")
    return "\n".join(lines)


def _registry() -> ConstructorRegistry:
    """tyro parsing rules for config field types tyro has no flag for: ``list[list[float]]`` (e.g.
    ``nearby_views``) takes one comma-separated row per argument, ``--nearby-views 0,45,0 0,-45,0``."""
    from tyro.constructors import (
        ConstructorRegistry,
        PrimitiveConstructorSpec,
        PrimitiveTypeInfo,
    )

    registry = ConstructorRegistry()

    @registry.primitive_rule
    def float_rows(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
        """The spec of ``list[list[float]]``; None (other rules apply) for every other type."""
        if info.type != list[list[float]]:
            return None
        return PrimitiveConstructorSpec(
            nargs="*",
            metavar="X,Y,... [X,Y,... ...]",
            instance_from_str=lambda args: [[float(x) for x in arg.split(",")] for arg in args],
            is_instance=lambda value: isinstance(value, list) and all(isinstance(row, list) for row in value),
            str_from_instance=lambda rows: [",".join(f"{x:g}" for x in row) for row in rows],
        )

    @registry.primitive_rule
    def optional_scalar(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
        """``str | None`` (and int, float, Path) shown as ``--model STR``, not ``--model {None}|STR``; None is the
        default only (the field's docstring says what it means), never typed on the command line."""
        members = typing.get_args(info.type)
        if typing.get_origin(info.type) not in (typing.Union, types.UnionType) or len(members) != 2 or type(None) not in members:
            return None
        inner = next(m for m in members if m is not type(None))
        if inner not in (str, int, float, Path):
            return None
        return PrimitiveConstructorSpec(
            nargs=1,
            metavar=inner.__name__.upper().replace("POSIXPATH", "PATH"),
            instance_from_str=lambda args: inner(args[0]),
            is_instance=lambda value: value is None or isinstance(value, inner),
            str_from_instance=lambda value: ["None" if value is None else str(value)],
        )

    return registry


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs one command and exits with its code."""
    import tyro

    from recon.errors import sigterm_as_interrupt
    from recon.progress import quiet_while

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # no command: the usage on stderr and the usage-error code
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"recon {version('recon-zero123')}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"recon: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    prog = f"recon {name}"
    if name in SUBCOMMANDS:
        if not rest or rest[0] not in SUBCOMMANDS[name]:
            print(f"usage: recon {name} {{{','.join(sorted(SUBCOMMANDS[name]))}}} [OPTIONS]", file=sys.stderr)
            return 0 if rest and rest[0] in ("-h", "--help") else 2
        prog, rest = f"{prog} {rest[0]}", rest[1:]
    module_name, class_name, _ = COMMANDS[name]
    command_class = getattr(importlib.import_module(f"recon.cli.{module_name}"), class_name)
    with sigterm_as_interrupt(), quiet_while(False):  # --quiet lasts for this command only
        try:  # parsing builds the command's config dataclasses, whose validation raises ReconError
            # one flag per bool: --resume / --no-remove-bg (never --no-resume for a default-off flag, --no-no-cascade)
            command = tyro.cli(command_class, args=rest, prog=prog, registry=_registry(), config=(tyro.conf.FlagCreatePairsOff,))
            return int(command.run() or 0)
        except BaseException as exc:  # noqa: BLE001 - the one error boundary of the CLI
            return report_failure(exc)


def report_failure(exc: BaseException) -> int:
    """Prints one line for ``exc`` and returns the exit code; the CLI's one error boundary.

    Expected failures (:class:`ReconError`, files that cannot be read or
    written, out of memory, Ctrl-C / SIGTERM) print their message. Anything
    else prints its first line and where its full traceback was saved (the
    run's ``error.log`` when it failed inside a run, else :func:`crash_log_path`).
    ``SystemExit`` (``--help``, a bad flag) passes through.
    """
    from recon.errors import ReconError, Terminated, one_line, save_traceback
    from recon.progress import error

    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, ReconError):
        from rich.markup import escape

        error(escape(str(exc)))  # messages hold paths and pip extras such as ".[ray]", not markup
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        error(("terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted")
              + "; the last checkpoint is kept (rerun with --resume)")
        return 143 if isinstance(exc, Terminated) else 130
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)):
        error(f"out of memory ({one_line(exc)}); lower the resolutions or batch sizes (--set), or use --preset fast / cpu")
        return 5
    if isinstance(exc, OSError) and exc.filename is not None:
        error(f"{exc.filename}: {exc.strerror or one_line(exc)}")
        return 2
    log = getattr(exc, "recon_log", None) or save_traceback(exc, crash_log_path())
    error(f"unexpected {type(exc).__name__}: {one_line(exc)}; full traceback saved in {log} (please report it)")
    return 1


def crash_log_path() -> Path:
    """Where the traceback of an unexpected failure outside a run folder is saved: a new file in the temp folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "recon-errors" / f"{stamp}-{os.getpid()}.log"


def run() -> int:
    """The ``recon`` console script (and ``python -m recon.cli.main``): :func:`main`, then a quick exit.

    Once :func:`main` has returned its code, the process ends as soon as every other exit handler
    (``atexit``) has run and stdout and stderr are flushed, without the interpreter's teardown: with diffusers
    and transformers imported, freeing their objects one by one took 1.2-1.4 s at every exit (this CPU, an
    H100). Every file recon writes is closed before :func:`main` returns and non-daemon threads are joined
    before exit handlers run. When :func:`main` raises (``--help`` or a bad flag exit through ``SystemExit``) the
    interpreter exits as usual. For the console script only: called in-process, it would end that process
    with this code when it exits.
    """
    ending: list[int] = []
    atexit.register(_end_process, ending)  # registered before main(): runs after the handlers registered in it
    code = main()
    ending.append(code)
    return code


def _end_process(ending: list[int]) -> None:
    """Ends the process with ``ending[0]`` (flushing stdout and stderr first); nothing when ``ending`` is empty."""
    if not ending:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(ending[0])


if __name__ == "__main__":
    sys.exit(run())
