"""Benchmark of the mesh export: seconds per stage, charts, atlas utilisation, watertightness, fidelity.

The field is analytic: the toy robot of recon/data/primitives.py as a density
(a sharp sigmoid of its signed distance) with its true albedo, so the
exported mesh can be measured against the true surface: Chamfer distance,
F-score at 1 % of the bounding-box diagonal, area ratio, and the PSNR of
renders of the exported textured GLB (exports/raster.py) against exact
albedo renders from held-out views. The defaults (a 256^3 grid) reduce to
50k faces and bake a 1024 px texture. ``--bakes normal,project,point`` runs
the new pipeline once per texture bake; ``--reference`` also runs each of them
with the reference paths of the fast ones (a normal-bake ray per texel, xatlas
on the whole mesh in one piece); ``--decimate`` also runs each with
``export.reduce=decimate`` (the full-resolution mesh decimated rather than the
solid meshed on a coarser grid); ``--legacy`` also runs the settings
that approximate the old pipeline (dense grid, no solid, no smoothing,
point-lookup bake, xatlas' default chart cost). Writes the front view of
each exported mesh and its texture atlas as PNGs beside ``--out``.

    python bench/export.py --legacy --out bench_export.json
    python bench/export.py --reference --out bench_export.json
    python bench/export.py --device cpu --mc-resolution 128 --target-faces 20000 --texture 512
    python bench/export.py --device cpu --set cpu_max_mc_resolution=0 --set cpu_max_texture_resolution=0  # GPU sizes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from recon.cameras import Cameras
from recon.config import resolve
from recon.data.primitives import PrimitiveObject, render_object, toy_robot
from recon.exports import ExportConfig
from recon.exports.pipeline import export_mesh
from recon.exports.raster import rasterize
from recon.fileio import write_json
from recon.runtime import resolve_device

LEGACY = {"density_stride": 1, "fill_interior": False, "smooth_iterations": 0, "bake": "point"}
REFERENCE = {"bake_rays": "texels", "uv_piece_faces": 0}
"""The reference paths of the fast ones: a normal-bake ray per texel, xatlas on the whole mesh in one piece."""


def mesh_fidelity(mesh: trimesh.Trimesh, truth_points: np.ndarray, truth_area: float, diagonal: float) -> dict:
    """Chamfer distance (mean of both directions), F-score at 1 % of ``diagonal`` and area ratio against the truth."""
    from scipy.spatial import cKDTree

    samples = np.asarray(trimesh.sample.sample_surface(mesh, len(truth_points), seed=0)[0])
    to_truth, _ = cKDTree(truth_points).query(samples)
    to_mesh, _ = cKDTree(samples).query(truth_points)
    tau = 0.01 * diagonal
    precision, recall = (to_truth < tau).mean(), (to_mesh < tau).mean()
    return {
        "chamfer": round(float(to_truth.mean() + to_mesh.mean()) / 2, 5),
        "fscore_1pct": round(float(2 * precision * recall / max(precision + recall, 1e-12)), 4),
        "area_ratio": round(float(mesh.area / truth_area), 3),
    }


def true_mesh(obj: PrimitiveObject, device: torch.device, resolution: int = 384) -> trimesh.Trimesh:
    """``obj``'s outer surface as a fine marching-cubes mesh of its sharp density, unsmoothed (its area is the
    true area the exports are compared with)."""
    from recon.exports.isosurface import marching_cubes, sample_density_near_surface
    from recon.exports.solidify import solid_grid

    box = np.full((2, 3), 1.05 * obj.bounding_radius()) * [[-1], [1]]
    grid, level, _ = sample_density_near_surface(robot_field(obj)[0], box, resolution, 100.0, device=device)
    return marching_cubes(solid_grid(grid, level, 0)[0], box, level)


def textured_psnr(mesh: trimesh.Trimesh, obj: PrimitiveObject, cameras: Cameras, shading: str = "albedo") -> tuple[float, np.ndarray]:
    """PSNR of renders of a textured mesh (nearest texel) against the true albedo (or, ``shading="lambert"``, the
    true colour under render_object's fixed light) where both cover; and view 0's image."""
    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), dtype=np.float64) / 255.0
    size = texture.shape[0]
    truth = render_object(obj, cameras, shading=shading)
    errors, first = [], None
    for k in range(len(cameras)):
        raster = rasterize(cameras[k], mesh.vertices, mesh.faces)
        face, bary = raster.face.numpy(), raster.barycentric.numpy().astype(np.float64)
        hit = face >= 0
        uv = np.einsum("pk,pkc->pc", bary[hit], mesh.visual.uv[mesh.faces[face[hit]]])
        cols = np.clip((uv[:, 0] * size).astype(int), 0, size - 1)
        rows = np.clip(((1.0 - uv[:, 1]) * size).astype(int), 0, size - 1)
        image = np.ones((*face.shape, 3))
        image[hit] = texture[rows, cols]
        both = hit & (truth["rgba"][k, ..., 3].numpy() > 0.999)
        reference = truth["albedo"][k] if shading == "albedo" else truth["rgba"][k, ..., :3]
        errors.append(((image - reference.numpy()) ** 2)[both])
        first = image if first is None else first
    return float(-10 * np.log10(np.concatenate(errors).mean())), first


def robot_field(obj: PrimitiveObject, softness: float = 0.004):
    """Density and albedo callables of ``obj`` (a sigmoid of its signed distance; peak 200).

    The albedo is constant along the surface normal (the material at the
    nearest surface point), as a fitted field's colour is: the primitives'
    3-D checkers would otherwise change colour just under the surface.
    """

    def density(points: torch.Tensor) -> torch.Tensor:
        return 200.0 * torch.sigmoid(-obj.sdf(points) / softness)

    def albedo(points: torch.Tensor) -> torch.Tensor:
        h = 1e-3
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * h
        gradient = torch.stack([obj.sdf(points + offsets[a]) - obj.sdf(points - offsets[a]) for a in range(3)], dim=-1) / (2 * h)
        normal = torch.nn.functional.normalize(gradient, dim=-1)
        return obj.albedo(points - (obj.sdf(points)[:, None] + 1e-4) * normal)

    return density, albedo


def main() -> None:
    """Parses the flags, runs the export (and the legacy one with --legacy), prints and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mc-resolution", type=int, default=256, help="marching-cubes grid points per axis")
    parser.add_argument("--bakes", default="normal", help="comma-separated texture bakes of the new pipeline (normal, project, point)")
    parser.add_argument("--target-faces", type=int, default=50_000)
    parser.add_argument("--texture", type=int, default=1024, help="texture side in pixels")
    parser.add_argument("--legacy", action="store_true", help="also run the old pipeline's settings")
    parser.add_argument("--decimate", action="store_true", help="also run with export.reduce=decimate (quadric decimation of the full-resolution mesh instead of marching cubes on a coarser grid)")
    parser.add_argument("--reference", action="store_true", help="also run the new pipeline with its reference paths (bake ray per texel, xatlas in one piece)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="an ExportConfig setting key=value on top of the flags (repeatable), e.g. cpu_max_mc_resolution=0")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results (PNGs beside it)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    obj = toy_robot()
    density, albedo = robot_field(obj)
    box = np.array([[-0.7] * 3, [0.7] * 3])
    diagonal = float(np.linalg.norm(box[1] - box[0]))
    truth_points = obj.sample_surface(50_000, seed=1)[0].numpy()
    cameras = Cameras.from_spherical(torch.tensor([10.0, 35.0, -20.0, 60.0]), torch.tensor([0.0, 100.0, 200.0, 300.0]), torch.full((4,), 3.0), 35.0, 256)
    flags = {"formats": ["glb"], "mc_resolution": args.mc_resolution, "target_faces": args.target_faces, "texture_resolution": args.texture, "threshold": 100.0}
    base = resolve(ExportConfig, flags, overrides=args.overrides)
    bakes = [b.strip() for b in args.bakes.split(",") if b.strip()]
    runs = {("new" if len(bakes) == 1 else f"new-{b}"): replace(base, bake=b) for b in bakes}
    if args.reference:
        runs.update({f"{name}-reference": replace(cfg, **REFERENCE) for name, cfg in list(runs.items())})
    if args.decimate:
        runs.update({f"{name}-decimate": replace(cfg, reduce="decimate") for name, cfg in list(runs.items())})
    if args.legacy:
        runs["legacy"] = replace(base, **LEGACY)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        truth_area = float(true_mesh(obj, device).area)
        for name, cfg in runs.items():
            start = time.perf_counter()
            result = export_mesh(density, albedo, box, Path(tmp) / name, cfg, device=device)
            total = time.perf_counter() - start
            glb = trimesh.load(result.paths["glb"], force="mesh")
            psnr, front = textured_psnr(glb, obj, cameras)
            rows[name] = {
                "total_s": round(total, 2),
                "stages_s": result.timings_s,
                **{k: result.report[k] for k in ("faces", "is_watertight", "euler_characteristic", "components", "charts", "atlas_utilisation", "cleanup_notes")},
                "grid_factor": result.report.get("grid_factor", 1.0),
                **mesh_fidelity(glb, truth_points, truth_area, diagonal),
                "texture_psnr": round(psnr, 2),
            }
            print(json.dumps({name: rows[name]}), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.round(front * 255).astype(np.uint8)).save(args.out.with_name(f"{args.out.stem}_{name}_front.png"))
                glb.visual.material.baseColorTexture.convert("RGB").save(args.out.with_name(f"{args.out.stem}_{name}_atlas.png"))
    header = {"device": str(device), "mc_resolution": args.mc_resolution, "target_faces": args.target_faces, "texture": args.texture, "set": args.overrides}
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    print("| run | total s | stages s | faces | watertight | Euler | charts | utilisation | Chamfer | F@1% | area ratio | PSNR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items())
        print(f"| {name} | {r['total_s']} | {stages} | {r['faces']} | {r['is_watertight']} | {r['euler_characteristic']} | {r['charts']} | "
              f"{r['atlas_utilisation']} | {r['chamfer']} | {r['fscore_1pct']} | {r['area_ratio']} | {r['texture_psnr']} |")
    if args.out:
        write_json(args.out, {"setup": header, "results": rows})


if __name__ == "__main__":
    main()
