"""``recon export RUN_DIR``: mesh files from a finished or interrupted run (its newest checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import torch
import tyro

from exports.config import FORMATS, ExportConfig
from recon.errors import ReconError
from recon.runs import RunDir


def export_run(run: RunDir, cfg: ExportConfig, device: torch.device, out_dir: Path | None = None) -> dict[str, Path]:
    """Exports the run's field (newest checkpoint) with ``cfg`` into ``out_dir`` (default the run's exports/).

    The mesh comes out in the run's output frame: config.yaml ``scene`` maps it
    back from the field box (see :mod:`recon.runs`). Density thresholds are in
    the field's own units. Records the files and the checkpoint step in meta.json.
    """
    from exports.pipeline import export_field
    from systems.checkpoint import SceneTransform, load_field_from_run

    field, checkpoint = load_field_from_run(run, device)
    transform = SceneTransform.from_config(run.read_config())
    aabb = transform.to_world(field.aabb.float())

    @torch.no_grad()
    def density_fn(points: torch.Tensor) -> torch.Tensor:
        return field.density(transform.to_field(points))

    @torch.no_grad()
    def albedo_fn(points: torch.Tensor) -> torch.Tensor:
        return field.albedo(transform.to_field(points))

    target = run.exports if out_dir is None else out_dir
    paths = export_field(density_fn, albedo_fn, aabb, target, cfg, device=device)
    run.update_meta(exports={"step": checkpoint.step, "stage": checkpoint.stage, "files": {k: str(v) for k, v in paths.items()}})
    return paths


def parse_formats(text: str) -> list[str]:
    """``"glb,obj"`` -> ``["glb", "obj"]``; :class:`ReconError` for an unknown or empty list."""
    formats = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise ReconError(f"--format {text!r}: choose one or more of {', '.join(FORMATS)}, comma-separated")
    return list(dict.fromkeys(formats))


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
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    output: Annotated[Path | None, tyro.conf.arg(aliases=("-o",))] = None
    """Folder for the files (default: RUN_DIR/exports)."""
    quiet: bool = False
    """Print only warnings and errors."""

    def config(self, run: RunDir) -> ExportConfig:
        """The run's export config with this command's flags applied."""
        from recon.config import from_plain

        saved = run.read_config().get("export")
        cfg = from_plain(ExportConfig, saved) if isinstance(saved, dict) else ExportConfig()
        changes: dict = {}
        if self.format is not None:
            changes["formats"] = parse_formats(self.format)
        if self.texture_resolution is not None:
            changes["texture_resolution"] = self.texture_resolution
        if self.mc_resolution is not None:
            changes["mc_resolution"] = self.mc_resolution
        if self.threshold is not None:
            changes["threshold"] = parse_threshold(self.threshold)
        if self.target_faces is not None:
            changes["target_faces"] = self.target_faces
        return replace(cfg, **changes)

    def run(self) -> int:
        """Exports and prints the written files; returns the exit code."""
        from recon.progress import PhaseTimer, info, set_quiet
        from recon.runtime import resolve_device

        set_quiet(self.quiet)
        run = RunDir.open(self.run_dir)
        cfg = self.config(run)
        device = resolve_device(self.device)
        if not run.is_finished:
            info(f"{run.root}: training did not finish; exporting its newest checkpoint")
        timer = PhaseTimer()
        with timer.phase("export"):
            paths = export_run(run, cfg, device, self.output)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
