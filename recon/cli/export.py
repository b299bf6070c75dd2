"""``recon export RUN_DIR``: mesh files from a finished or interrupted run (its newest checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from recon.errors import ReconError
from recon.runs import RunDir


def parse_threshold(text: str) -> float | None:
    """``"auto"`` -> None (automatic level), else a positive float density."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise ReconError(f"--threshold {text!r}: expected a number or 'auto'") from exc
    if not value > 0:
        raise ReconError(f"--threshold {text!r}: must be > 0")
    return value


@dataclass
class ExportCommand:
    """Export a run (finished or interrupted, from its newest checkpoint) as GLB / OBJ+MTL+PNG / PLY."""

    run_dir: tyro.conf.Positional[Path]
    """Run folder (holds config.yaml and checkpoints/)."""
    format: str | None = None
    """Comma-separated formats: glb, obj, ply (default: the run's export.formats)."""
    texture_resolution: int | None = None
    """Side of the square texture in pixels (default: the run's setting)."""
    mc_resolution: int | None = None
    """Marching-cubes grid points per axis (default: the run's setting)."""
    threshold: str | None = None
    """Surface density level, a number or 'auto' (default: the run's setting)."""
    target_faces: int | None = None
    """Decimate to at most this many faces, 0 = no decimation (default: the run's setting)."""
    photos: Path | None = None
    """A recon fit-views run's dataset (transforms.json or its folder): texture from its training photos where
    they see the surface, as fit-views bakes it (default: baked from the field)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    output: Annotated[Path | None, tyro.conf.arg(aliases=("-o",))] = None
    """Folder for the files (default: RUN_DIR/exports)."""
    quiet: bool = False
    """Print only warnings and errors."""

    def run(self) -> int:
        """Exports and prints the written files; returns the exit code."""
        from recon.api import export
        from recon.progress import info, set_quiet

        set_quiet(self.quiet)
        run = RunDir.open(self.run_dir)
        if not run.is_finished:
            info(f"{run.root}: training did not finish; exporting its newest checkpoint")
        if self.photos is None and "train_cameras" in run.read_meta():
            info(f"{run.root}: texture baked from the field; --photos DATASET bakes it from the training photos as fit-views did")
        settings = {
            name: value
            for name, value in (
                ("texture_resolution", self.texture_resolution),
                ("mc_resolution", self.mc_resolution),
                ("target_faces", self.target_faces),
            )
            if value is not None
        }
        if self.threshold is not None:
            settings["threshold"] = parse_threshold(self.threshold)
        paths = export(run.root, formats=self.format, device=self.device, output=self.output, photos=self.photos, **settings)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
