"""Entry point of the ``recon`` console script.

Each command is a dataclass in its own module (``recon.cli.<module>``) whose
field docstrings are the ``--help`` text and whose ``run()`` does the work
and returns the exit code. Only the chosen command's module is imported, so
``recon --help`` stays instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
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

    return registry


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs one command and exits with its code."""
    import tyro

    from recon.errors import ReconError
    from recon.progress import error

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"recon {version('recon')}")
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
    try:  # parsing builds the command's config dataclasses, whose validation raises ReconError
        command = tyro.cli(command_class, args=rest, prog=prog, registry=_registry())
        return int(command.run() or 0)
    except ReconError as exc:
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        error("interrupted; the last checkpoint is kept (rerun with --resume)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
