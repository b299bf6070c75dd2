"""Mesh files from a run folder: its newest checkpoint's field through the export pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from recon.exports.config import ExportConfig
from recon.exports.pipeline import export_mesh
from recon.runs import RunDir
from recon.systems.checkpoint import SceneTransform, load_field_from_run


def export_run(run: RunDir, cfg: ExportConfig, device: torch.device, out_dir: Path | None = None) -> dict[str, Path]:
    """Exports the run's field (newest checkpoint) with ``cfg`` into ``out_dir`` (default the run's exports/).

    The mesh comes out in the run's output frame: config.yaml ``scene`` maps it
    back from the field box (see :mod:`recon.runs`). Density thresholds are in
    the field's own units. Records the files, the checkpoint step and the mesh
    report (faces, is_watertight, euler_characteristic, charts, atlas_utilisation,
    seconds per stage) in meta.json.
    """
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
    result = export_mesh(density_fn, albedo_fn, aabb, target, cfg, device=device)
    run.update_meta(
        exports={
            "step": checkpoint.step,
            "stage": checkpoint.stage,
            "files": {k: str(v) for k, v in result.paths.items()},
            "mesh": result.report,
            "timings_s": result.timings_s,
        }
    )
    return result.paths
