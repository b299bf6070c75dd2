"""The whole export: density field -> solid grid -> closed, smoothed, decimated mesh -> UV atlas -> baked texture -> files."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from recon.cameras import Cameras
from recon.data.transforms_json import PosedImages
from recon.errors import ReconError
from recon.exports.bake import bake_colours, point_lookup
from recon.exports.carve import seen_free
from recon.exports.cleanup import clean_mesh, mesh_report
from recon.exports.config import ExportConfig
from recon.exports.isosurface import as_aabb, crop_to_surface, marching_cubes, resample_grid, sample_density_near_surface
from recon.exports.photo_bake import PhotoProjector, PhotoSettings, with_photos
from recon.exports.project import (
    ProjectionSettings,
    Projector,
    SolidProbe,
    normal_colours,
    sphere_viewpoints,
    surface_colours,
    vertex_surface,
)
from recon.exports.raster import look_at_box, project
from recon.exports.solidify import solid_grid
from recon.exports.uv import count_charts, unwrap_uv
from recon.exports.writers import write_glb, write_obj, write_ply
from recon.progress import info, warn

FieldFn = Callable[[torch.Tensor], torch.Tensor]

CARVE_MARGIN = 1.0
"""Free-space carving counts a grid point as seen free this many grid steps in front of the rendered surface."""
CARVE_REGROW = 2
"""...and grows the outside back by this many grid steps into the band in front of the surface it left out."""
REMESH_ABOVE = 1.5
"""With export.reduce=remesh, a solid's mesh of more than this many times target_faces is meshed again on a
coarser grid rather than decimated."""


def coarser_factor(faces: int, target_faces: int) -> float:
    """The grid resolution factor whose marching-cubes mesh has about 0.9 x ``target_faces`` faces, from a mesh
    of ``faces`` faces at the full resolution (faces ~ 1 / step^2), within [0.25, 0.95]."""
    return float(np.clip(np.sqrt(0.9 * target_faces / faces), 0.25, 0.95))


@dataclass
class ExportResult:
    """Files written ({format: path}), facts about the mesh and atlas for meta.json, and seconds per stage."""

    paths: dict[str, Path]
    report: dict = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)


class _Stages:
    """Times the export's stages and prints one line per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def done(self, name: str, message: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._start, 3)
        info(f"export: {message}, {now - self._start:.1f} s")
        self._start = now


def seen_points(grid_shape: tuple[int, int, int], aabb: np.ndarray, cameras: Cameras, candidates: np.ndarray, device: torch.device | str) -> np.ndarray:
    """(R, R, R) bool: which of the grid points ``candidates`` (R, R, R) bool lie inside some camera's view
    (in front of it and within its image); points not among the candidates are False."""
    seen = np.zeros(grid_shape, dtype=bool)
    index = np.argwhere(candidates)
    if len(index) == 0:
        return seen
    step = (aabb[1] - aabb[0]) / (np.array(grid_shape) - 1)
    points = torch.as_tensor(aabb[0] + index * step, dtype=torch.float32, device=device)
    hit = torch.zeros(len(points), dtype=torch.bool, device=device)
    for k in range(len(cameras)):
        camera = cameras[k].to(device)
        col, row, depth = project(camera, points)
        hit |= (depth > 0) & (col >= -0.5) & (col <= camera.width - 0.5) & (row >= -0.5) & (row <= camera.height - 0.5)
    seen[tuple(index.T)] = hit.cpu().numpy()
    return seen


def export_mesh(
    density_fn: FieldFn,
    albedo_fn: FieldFn,
    aabb: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    cfg: ExportConfig | None = None,
    stem: str = "mesh",
    device: torch.device | str = "cpu",
    view_origins: np.ndarray | None = None,
    cameras: Cameras | None = None,
    photos: PosedImages | None = None,
) -> ExportResult:
    """Exports a radiance field as mesh files ``out_dir/<stem>.<format>`` for each format in ``cfg.formats``.

    ``density_fn(points (P, 3)) -> (P,)`` (per world unit, as the renderer
    composites it) and ``albedo_fn(points) -> (P, 3)`` in [0, 1] take world
    points on ``device``; ``aabb`` (2, 3) is the box searched for the surface.
    ``cameras``: the views the field was fitted to, in the same world frame
    (fit-views' training cameras); with ``cfg.carve_unseen`` what none of them
    sees is not meshed, and their centres are the projection bake's views.
    ``photos``: the posed training images in the same world frame; with
    ``cfg.photo_bake`` the texture is taken from them where they see the
    surface (:mod:`exports.photo_bake`), the field's bake elsewhere.
    ``view_origins`` (K, 3): camera centres for the projection bake (default
    the cameras' centres, else ``cfg.bake_views`` points on a sphere around the
    box). Every format gets the same mesh and colours. OBJ sidecars
    (``<stem>.mtl``, ``<stem>_albedo.png``) sit beside the .obj;
    ``cfg.up_axis`` says which world axis is up (:mod:`exports.frame`).
    Progress goes to the console one line per stage. The report says whether
    the mesh is closed (``is_watertight``) and lists cleanup steps undone
    because they would have opened it (``cleanup_notes``).
    """
    requested = cfg or ExportConfig()
    cfg = requested.for_device(device)
    if (cfg.mc_resolution, cfg.texture_resolution) != (requested.mc_resolution, requested.texture_resolution):
        info(
            f"export on the CPU: grid {cfg.mc_resolution}^3 (asked {requested.mc_resolution}), texture "
            f"{cfg.texture_resolution} px (asked {requested.texture_resolution}); "
            "--set export.cpu_max_mc_resolution=0 / cpu_max_texture_resolution=0 keeps the full size"
        )
    if cfg.up_axis == "auto":
        raise ReconError("export.up_axis=auto is decided by fit-views from its cameras; set +y or +z")
    box = as_aabb(aabb)
    out_dir = Path(out_dir)
    stages = _Stages()
    grid, level, evaluated = sample_density_near_surface(
        density_fn, box, cfg.mc_resolution, cfg.threshold, cfg.density_stride, cfg.chunk_size, device
    )
    chosen = "automatic" if cfg.threshold is None else "set"
    stages.done("density", f"density grid {cfg.mc_resolution}^3 ({100 * evaluated:.0f}% evaluated), level {level:.4g} ({chosen})")
    solid_note, solid = "raw density", None
    grid, grid_box = crop_to_surface(grid, box, level, cfg.hole_voxels + 2)
    if cfg.fill_interior:
        seen = None
        if cameras is not None and cfg.carve_unseen:
            seen = seen_points(grid.shape, grid_box, cameras, grid >= level, device)
        carve = None
        if cfg.carve_free_space and (cameras is not None or cfg.carve_views > 0):
            views = cameras if cameras is not None else look_at_box(box, sphere_viewpoints(box, cfg.carve_views), cfg.carve_resolution)
            margin = CARVE_MARGIN * float(np.min((grid_box[1] - grid_box[0]) / (np.array(grid.shape) - 1)))

            def carve(cleaned: np.ndarray) -> np.ndarray:
                return seen_free(cleaned, grid_box, level, views, margin, cfg.carve_resolution, device)
        grid, stats = solid_grid(grid, level, cfg.hole_voxels, cfg.min_component_ratio, seen, carve, CARVE_REGROW)
        solid = asdict(stats)
        solid_note = f"solid: {stats.filled} interior points filled, {stats.floaters} floater and {stats.unseen} unseen points dropped"
    raw = marching_cubes(grid, grid_box, level)
    stages.done("marching_cubes", f"marching cubes: {len(raw.faces)} faces ({solid_note})")
    notes: list[str] = []
    factor = 1.0
    if cfg.fill_interior and cfg.reduce == "remesh" and 0 < cfg.target_faces and len(raw.faces) > REMESH_ABOVE * cfg.target_faces:
        # Marching cubes of the solid resampled on a coarser grid: closed by construction, regular triangles
        # (xatlas makes a few large charts of them), no decimation to undo.
        factor = coarser_factor(len(raw.faces), cfg.target_faces)
        raw = marching_cubes(resample_grid(grid, factor, device), grid_box, level)
    mesh = clean_mesh(raw, cfg.min_component_ratio, cfg.target_faces, cfg.smooth_iterations, notes)
    if cfg.fill_interior and 0 < cfg.target_faces and len(mesh.faces) > 1.1 * cfg.target_faces:
        # Decimation could not keep the solid's mesh closed: mesh the solid resampled on a coarser grid (closed by
        # construction) sized for about 0.9 x target_faces, rather than hand xatlas a huge mesh.
        factor *= coarser_factor(len(raw.faces), cfg.target_faces)
        notes.append(f"re-meshed the solid at {factor:.2f} x the grid resolution ({len(mesh.faces)} faces after cleanup)")
        mesh = clean_mesh(marching_cubes(resample_grid(grid, factor, device), grid_box, level), cfg.min_component_ratio, cfg.target_faces, cfg.smooth_iterations, notes)
    report = mesh_report(mesh)
    report.update(cleanup_notes=notes, solid=solid, grid_factor=round(factor, 4))
    closed = "closed" if report["is_watertight"] else "NOT closed (watertight False)"
    coarser = f" (meshed at {factor:.2f} x the grid resolution)" if factor < 1.0 else ""
    stages.done("cleanup", f"cleanup: {report['faces']} faces{coarser}, {closed}, Euler characteristic {report['euler_characteristic']}")

    voxel = float(np.mean((box[1] - box[0]) / (cfg.mc_resolution - 1)))
    band = cfg.bake_band * voxel
    if cfg.bake == "project":
        if view_origins is None:
            view_origins = sphere_viewpoints(box, cfg.bake_views) if cameras is None else cameras.centers.cpu().numpy()
        origins = np.asarray(view_origins, dtype=np.float64)
        settings = ProjectionSettings(cfg.bake_views_per_texel, cfg.bake_samples, cfg.bake_view_resolution, band)
        projector = Projector(np.asarray(mesh.vertices), np.asarray(mesh.faces), box, origins, settings, device)
        stages.done("visibility", f"visibility: {len(origins)} depth maps of {cfg.bake_view_resolution}x{cfg.bake_view_resolution}")

        def colour_fn(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
            return surface_colours(points, normals, projector, density_fn, albedo_fn, cfg.chunk_size)[0]
    elif cfg.bake == "normal":
        probe = SolidProbe(grid, grid_box, level, device)

        def colour_fn(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
            return normal_colours(points, normals, density_fn, albedo_fn, band, cfg.bake_samples, probe, cfg.chunk_size, device)[0]
    else:
        colour_fn = point_lookup(albedo_fn, cfg.chunk_size, device)
    use_photos = photos is not None and cfg.photo_bake and len(photos) > 0
    if use_photos and bool((photos.images[..., 3] >= 1.0).all()):
        # without alpha nothing tells the object from its background: rims would take the background's colour
        warn("photo bake skipped: the training photos have no alpha (no transparent background); texture baked from the field")
        use_photos = False
    coverage: list[float] = []
    if use_photos:
        settings = PhotoSettings(depth_tolerance=2.0 * voxel)
        photo_projector = PhotoProjector(np.asarray(mesh.vertices), np.asarray(mesh.faces), photos.images, photos.cameras, settings, device)
        colour_fn = with_photos(photo_projector, colour_fn, coverage)
        stages.done("photos", f"photo bake: {len(photos)} photos depth-tested against the mesh")

    paths: dict[str, Path] = {}
    if "glb" in cfg.formats or "obj" in cfg.formats:
        uv_mesh = unwrap_uv(mesh, cfg.texture_resolution, cfg.texture_padding, cfg.uv_timeout_s, cfg.chart_max_cost, cfg.uv_piece_faces)
        report.update(uv_method=uv_mesh.method, charts=count_charts(uv_mesh))
        stages.done("uv", f"UV atlas ({uv_mesh.method}): {report['charts']} charts, {len(uv_mesh.vertices)} vertices")
        surface = None
        if cfg.bake == "normal" and cfg.bake_rays == "vertices" and not use_photos:
            surface = vertex_surface(uv_mesh, density_fn, albedo_fn, band, cfg.bake_samples, probe, cfg.chunk_size, device, cfg.bake_surface_points)
        texture, utilisation = bake_colours(uv_mesh, colour_fn, cfg.texture_resolution, cfg.texture_padding, surface)
        report["atlas_utilisation"] = round(utilisation, 4)
        stages.done("bake", f"texture bake ({cfg.bake}) {cfg.texture_resolution}x{cfg.texture_resolution}: {100 * utilisation:.0f}% of texels used")
        if "glb" in cfg.formats:
            paths["glb"] = write_glb(uv_mesh, texture, out_dir / f"{stem}.glb", cfg.up_axis, cfg.note)
        if "obj" in cfg.formats:
            paths["obj"] = write_obj(uv_mesh, texture, out_dir / f"{stem}.obj", cfg.up_axis, cfg.note)
    if "ply" in cfg.formats:
        vertices, normals = np.asarray(mesh.vertices), np.asarray(mesh.vertex_normals)
        paths["ply"] = write_ply(vertices, mesh.faces, colour_fn(vertices, normals), out_dir / f"{stem}.ply", normals, cfg.up_axis)
    stages.done("write", f"wrote {', '.join(str(p) for p in paths.values())}")
    if coverage:  # of the first bake that used the photos: the texture's texels, else the PLY's vertices
        report["photo_coverage"] = round(coverage[0], 4)
    report["level"] = float(level)
    return ExportResult(paths, report, stages.seconds)


def export_field(
    density_fn: FieldFn,
    albedo_fn: FieldFn,
    aabb: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    cfg: ExportConfig | None = None,
    stem: str = "mesh",
    device: torch.device | str = "cpu",
    view_origins: np.ndarray | None = None,
    cameras: Cameras | None = None,
) -> dict[str, Path]:
    """:func:`export_mesh`, returning only the files written ({format: path})."""
    return export_mesh(density_fn, albedo_fn, aabb, out_dir, cfg, stem, device, view_origins, cameras).paths
