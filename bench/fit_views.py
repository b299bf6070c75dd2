"""Benchmark of multi-view NeRF fitting: nerfacc occupancy-grid sampler vs the plain stratified sampler.

Synthesises a scene of ``--views`` views (default 100 at 256x256, ``--size 800``
for NeRF-synthetic size) of a primitive object with recon/data/primitives.py,
fits ``--steps`` steps with each sampler on the current device and reports
steps/s, rays/s, held-out PSNR/SSIM after those steps and peak GPU memory, as
a Markdown table on stdout and JSON (``--out``). Each fitted field is then
exported and the mesh compared with the true
surface (a fine marching-cubes mesh of the analytic robot, see true_surface): Chamfer distance, F-score at 1 % of the bounding-box diagonal, area
ratio, watertightness, Euler characteristic, and texture PSNR from held-out
views (bench/export.py's mesh_fidelity and textured_psnr), for the field's
bake and for the bake from the training photos. ``--before-exports DIR``
also exports with an old exports package for a before/after comparison on the
same field; make DIR from a commit without touching the checkout:

    mkdir -p .baseline12 && git archive 8470f0f exports | tar -x -C .baseline12
    mv .baseline12/exports .baseline12/exports_before
    sed -i 's/recon\\.exports\\./exports_before./g' .baseline12/exports_before/*.py

The first ``--warmup`` steps of each sampler are timed apart (they include
nerfacc's one-off CUDA compile, ~75 s on a fresh machine). Each sampler
stops early after ``--max-seconds`` of steady-state steps, so the whole run
stays bounded; the table says how many steps were done.

    python bench/fit_views.py --out bench_fit_views.json
    python bench/fit_views.py --size 800 --steps 1000
    python bench/fit_views.py --samplers stratified --before-exports .baseline12 --out fv.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from recon.cameras import Cameras
from recon.config import resolve
from recon.data.primitives import render_object, toy_robot
from recon.data.transforms_json import write_transforms
from recon.fileio import write_json
from recon.render.samplers import nerfacc_available
from recon.runs import RunDir
from recon.runtime import peak_memory_gib, resolve_device, seed_everything
from recon.systems.fit_views import (
    FitViewsConfig,
    FitViewsTrainer,
    evaluate,
    load_views,
    resolve_scene,
)


def synthesise(folder: Path, views: int, size: int, device: torch.device) -> Path:
    """Renders ``views`` views of the toy robot on a sphere (Fibonacci spiral) and writes transforms.json."""
    i = torch.arange(views, dtype=torch.float32) + 0.5
    elevation = torch.rad2deg(torch.asin(1 - 2 * i / views)) * 0.85
    azimuth = (i * 137.508) % 360
    cameras = Cameras.from_spherical(elevation, azimuth, torch.full((views,), 2.2), 40.0, size).to(device)
    obj = toy_robot()
    rgba = torch.cat([render_object(obj, cameras[k : k + 8], supersample=2)["rgba"].cpu() for k in range(0, views, 8)])
    return write_transforms(folder / "transforms.json", rgba, cameras.to("cpu"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sampler(sampler: str, transforms: Path, args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    """Fits with one sampler and returns its measurements."""
    cfg = resolve(
        FitViewsConfig,
        {"steps": args.steps, "rays_per_batch": args.rays, "renderer": {"sampler": sampler}, "holdout_fraction": 0.1, "max_eval_views": 10},
        overrides=tuple(args.overrides),
    )
    views = load_views(transforms, cfg)
    cfg = resolve_scene(cfg, views.train.cameras)
    seed_everything(cfg.seed)
    run = RunDir.create(work / sampler, {})
    trainer = FitViewsTrainer(run, cfg, views, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    warmup = min(args.warmup, args.steps)
    for step in range(warmup):
        trainer.train_step(step)
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    step = warmup
    while step < args.steps:
        loss = trainer.train_step(step)
        step += 1
        if step % 50 == 0:
            _sync(device)
            if time.perf_counter() - start > args.max_seconds:
                break
    _sync(device)
    steady_s = time.perf_counter() - start
    steady_steps = step - warmup
    trainer.renderer.eval()
    mesh_rows = export_metrics(trainer, args, work / f"{sampler}-export", device)
    eval_start = time.perf_counter()
    metrics, _, _ = evaluate(trainer.renderer, trainer.held_out, trainer.background)
    _sync(device)
    eval_s = time.perf_counter() - eval_start
    steps_per_s = steady_steps / steady_s if steady_s > 0 and steady_steps > 0 else float("nan")
    peak = peak_memory_gib(device)
    return {
        "sampler": sampler,
        "steps": step,
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 2),
        "steps_per_s": round(steps_per_s, 2),
        "rays_per_s": round(steps_per_s * args.rays),
        "final_loss": round(float(loss), 6) if step > warmup else None,
        "psnr": round(metrics["psnr"], 2),
        "ssim": round(metrics["ssim"], 4),
        "eval_views": metrics["views"],
        "eval_s": round(eval_s, 2),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        **mesh_rows,
    }


def welded_topology(mesh: trimesh.Trimesh) -> dict:
    """Watertightness, Euler characteristic and pieces of a mesh reloaded from a GLB (vertices split along UV
    seams are welded first), so meshes written by any version of the pipeline are judged alike."""
    welded = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    welded.merge_vertices(merge_tex=True, merge_norm=True)
    labels = trimesh.graph.connected_component_labels(welded.face_adjacency, node_count=len(welded.faces))
    return {"faces": len(welded.faces), "is_watertight": bool(welded.is_watertight),
            "euler_characteristic": int(welded.euler_number), "components": int(labels.max()) + 1 if len(labels) else 0}


def true_surface(obj, device: torch.device, count: int = 50_000) -> tuple[np.ndarray, float]:
    """``count`` points (count, 3) uniform on ``obj``'s outer surface and its area, from bench/export.py's
    :func:`true_mesh` (as the before/after figures of the README were measured)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from export import true_mesh

    mesh = true_mesh(obj, device)
    return np.asarray(trimesh.sample.sample_surface(mesh, count, seed=1)[0]), float(mesh.area)


def import_before(folder: Path):
    """The ``export_field`` and ``ExportConfig`` of the old exports package copied into ``folder``/exports_before."""
    import importlib

    sys.path.insert(0, str(folder.resolve()))
    pipeline = importlib.import_module("exports_before.pipeline")
    config = importlib.import_module("exports_before.config")
    return pipeline.export_field, config.ExportConfig


def export_metrics(trainer: FitViewsTrainer, args: argparse.Namespace, folder: Path, device: torch.device) -> dict:
    """Exports the trained field and measures each mesh against the toy robot: Chamfer, F-score at 1 % of the
    diagonal, area ratio, topology, and the PSNR of renders of the textured mesh (nearest texel) against the true
    albedo and against the true Lambert-shaded colour the photos show, from four held-out views (bench/export.py).

    Exports: ``after`` (this checkout's pipeline, training cameras given, the field's bake), ``after_photos``
    (the same with the texture projected from the training photos), and with ``--before-exports`` ``before``
    (the old exports package, called as the old fit-views called it: density in field units, no cameras). With
    --out, each mesh's front render and texture atlas are written as PNGs beside it."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from export import mesh_fidelity, textured_psnr

    from recon.data.transforms_json import PosedImages
    from recon.exports.config import ExportConfig
    from recon.exports.pipeline import export_mesh

    field = trainer.renderer.field
    transform = trainer.cfg.scene
    center = torch.as_tensor(transform.center, dtype=torch.float32, device=device)
    scale = float(transform.scale)
    cameras = trainer.train.cameras.to("cpu")
    world_c2w = cameras.c2w.clone()
    world_c2w[:, :3, 3] = world_c2w[:, :3, 3] / scale + center.cpu()
    cameras = Cameras(world_c2w, cameras.fovy, cameras.height, cameras.width)
    photos = PosedImages(trainer.train.images, cameras, trainer.train.paths)
    obj = toy_robot()
    truth, truth_area = true_surface(obj, device)
    diagonal = float(np.linalg.norm(truth.max(0) - truth.min(0)))
    views = Cameras.from_spherical(torch.tensor([10.0, 35.0, -20.0, 60.0]), torch.tensor([0.0, 100.0, 200.0, 300.0]), torch.full((4,), 3.0), 35.0, 256)
    aabb = (field.aabb.float() / scale + center).cpu()

    def density_scene(p: torch.Tensor) -> torch.Tensor:  # the field's density is per field unit; per scene unit scale x larger
        return field.density((p - center) * scale) * scale

    def albedo(p: torch.Tensor) -> torch.Tensor:
        return field.albedo((p - center) * scale)

    def export(name: str) -> tuple[Path, dict]:
        if name == "before":
            export_field, BeforeConfig = import_before(args.before_exports)
            paths = export_field(lambda p: field.density((p - center) * scale), albedo, aabb, folder / name,
                                 BeforeConfig(formats=["glb"], mc_resolution=args.mc_resolution), device=device)
            return paths["glb"], {}
        cfg = ExportConfig(formats=["glb"], mc_resolution=args.mc_resolution)
        extra = {"photos": photos} if name == "after_photos" else {}
        result = export_mesh(density_scene, albedo, aabb, folder / name, cfg, device=device, cameras=cameras, **extra)
        report = {k: result.report.get(k) for k in ("charts", "atlas_utilisation", "cleanup_notes", "solid", "photo_coverage")}
        return result.paths["glb"], {**report, "stages_s": result.timings_s}

    names = [n for n in args.exports.split(",") if n and (n != "before" or args.before_exports)]
    results = {}
    for name in names:
        start = time.perf_counter()
        glb, report = export(name)
        seconds = time.perf_counter() - start
        mesh = trimesh.load(glb, force="mesh")
        albedo_psnr, front = textured_psnr(mesh, obj, views)
        shaded_psnr, _ = textured_psnr(mesh, obj, views, shading="lambert")
        results[f"export_{name}"] = {"seconds": round(seconds, 2), **mesh_fidelity(mesh, truth, truth_area, diagonal),
                                     **welded_topology(mesh), "texture_psnr_albedo": round(albedo_psnr, 2),
                                     "texture_psnr_shaded": round(shaded_psnr, 2), **report}
        print(json.dumps({name: results[f"export_{name}"]}), flush=True)
        if args.out:
            stem = args.out.with_name(f"{args.out.stem}_{folder.name}_{name}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(front * 255).astype(np.uint8)).save(f"{stem}_front.png")
            mesh.visual.material.baseColorTexture.convert("RGB").save(f"{stem}_atlas.png")
    return results


def markdown(rows: list[dict], header: dict) -> str:
    """The results as a Markdown table with a one-line description of the setup."""
    lines = [
        (
            f"fit-views benchmark: {header['views']} views at {header['size']}x{header['size']}, "
            f"{header['rays']} rays/step, device {header['device']}"
        ),
        "",
        "| sampler | steps | warm-up s | steps/s | rays/s | held-out PSNR | SSIM | eval s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['sampler']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['warmup_s']} | {r['steps_per_s']} | {r['rays_per_s']:,} | "
            f"{r['psnr']} | {r['ssim']} | {r['eval_s']} | {r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parses the flags, runs both samplers, prints the table and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--views", type=int, default=100, help="views synthesised (10%% held out)")
    parser.add_argument("--steps", type=int, default=1000, help="steps per sampler")
    parser.add_argument("--rays", type=int, default=4096, help="rays per step")
    parser.add_argument("--warmup", type=int, default=20, help="steps timed apart (compile, grid warm-up)")
    parser.add_argument("--max-seconds", type=float, default=100.0, help="stop a sampler after this many steady-state seconds")
    parser.add_argument("--samplers", default="nerfacc,stratified", help="comma-separated samplers to run")
    parser.add_argument("--mc-resolution", type=int, default=256, help="marching-cubes resolution of the exports")
    parser.add_argument("--before-exports", type=Path, default=None,
                        help="folder holding an old exports package as exports_before/ (see the module docstring): also export with it")
    parser.add_argument("--exports", default="before,after,after_photos", help="comma-separated exports to measure (see export_metrics)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="fit-views config override key.path=value (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    device = resolve_device(args.device)
    header = {"views": args.views, "size": args.size, "rays": args.rays, "device": str(device), "overrides": args.overrides}
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        transforms = synthesise(work / "scene", args.views, args.size, device)
        header["synthesis_s"] = round(time.perf_counter() - start, 2)
        for sampler in [s.strip() for s in args.samplers.split(",") if s.strip()]:
            if sampler == "nerfacc" and (device.type != "cuda" or not nerfacc_available()):
                rows.append({"sampler": sampler, "skipped": "needs CUDA and nerfacc"})
                continue
            rows.append(bench_sampler(sampler, transforms, args, device, work))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows, header))
    if args.out:
        write_json(args.out, {"setup": header, "results": rows})


if __name__ == "__main__":
    main()
