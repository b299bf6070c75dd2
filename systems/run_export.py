"""Mesh files from a run folder: its newest checkpoint's field through the export pipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from recon.cameras import Cameras
from recon.data.transforms_json import PosedImages
from recon.exports.config import ExportConfig
from recon.exports.pipeline import export_mesh
from recon.runs import RunDir
from recon.systems.checkpoint import SceneTransform, load_field_from_run

_FILES = {"glb": ("mesh.glb",), "obj": ("mesh.obj", "mesh.mtl", "mesh_albedo.png"), "ply": ("mesh.ply",)}
"""Files export_mesh writes per format with its default stem "mesh" (OBJ sidecars: exports.writers.obj_sidecars)."""


def camera_record(cameras: Cameras, transform: SceneTransform) -> dict[str, Any]:
    """A JSON-ready record (meta.json ``train_cameras``) of field-frame ``cameras`` in the run's output frame."""
    c2w = cameras.c2w.detach().cpu().double().clone()
    c2w[:, :3, 3] = transform.to_world(c2w[:, :3, 3])
    return {
        "c2w": [[round(float(x), 6) for x in matrix[:3].reshape(-1)] for matrix in c2w],
        "fovy": [round(float(f), 6) for f in cameras.fovy.detach().cpu()],
        "height": cameras.height,
        "width": cameras.width,
    }


def cameras_from_record(record: dict[str, Any]) -> Cameras:
    """The output-frame :class:`Cameras` of a :func:`camera_record`."""
    rows = torch.tensor(record["c2w"], dtype=torch.float32).reshape(-1, 3, 4)
    c2w = torch.cat([rows, torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(len(rows), 1, 4)], dim=1)
    return Cameras(c2w, torch.tensor(record["fovy"], dtype=torch.float32), int(record["height"]), int(record["width"]))


def export_run(
    run: RunDir, cfg: ExportConfig, device: torch.device, out_dir: Path | None = None, photos: PosedImages | None = None
) -> dict[str, Path]:
    """Exports the run's field (newest checkpoint) with ``cfg`` into ``out_dir`` (default the run's exports/).

    The mesh comes out in the run's output frame: config.yaml ``scene`` maps it
    back from the field box (see :mod:`recon.runs`). The field's density is
    per field unit; the export composites per output-frame unit, so it is
    multiplied by the scene scale, and ``cfg.threshold`` (like the reported
    ``level``) stays in the field's own units. The training cameras recorded
    in meta.json ``train_cameras`` (fit-views) carve what they never saw and
    are the projection bake's views; ``photos`` (fit-views' training images,
    in the output frame) texture the surface they see (``cfg.photo_bake``). Records the files, the checkpoint step
    and the mesh report (faces, is_watertight, euler_characteristic, charts,
    atlas_utilisation, seconds per stage) in meta.json.
    """
    field, checkpoint = load_field_from_run(run, device)
    transform = SceneTransform.from_config(run.read_config())
    aabb = transform.to_world(field.aabb.float())
    record = run.read_meta().get("train_cameras")
    cameras = cameras_from_record(record) if record else None
    if cfg.threshold is not None:
        cfg = replace(cfg, threshold=cfg.threshold * transform.scale)

    @torch.no_grad()
    def density_fn(points: torch.Tensor) -> torch.Tensor:
        return field.density(transform.to_field(points)) * transform.scale

    @torch.no_grad()
    def albedo_fn(points: torch.Tensor) -> torch.Tensor:
        return field.albedo(transform.to_field(points))

    target = run.exports if out_dir is None else out_dir
    if out_dir is None:  # listed in the run's manifest before they exist
        run.register(*(target / name for fmt in cfg.formats for name in _FILES[fmt]))
    result = export_mesh(density_fn, albedo_fn, aabb, target, cfg, device=device, cameras=cameras, photos=photos)
    report = dict(result.report, level=result.report["level"] / transform.scale)
    run.set_meta(  # the newest export's record, whole: nothing left from an earlier one
        exports={
            "step": checkpoint.step,
            "stage": checkpoint.stage,
            "files": {k: str(v) for k, v in result.paths.items()},
            "mesh": report,
            "timings_s": result.timings_s,
        }
    )
    return result.paths
