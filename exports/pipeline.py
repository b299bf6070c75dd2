"""The whole export: density field -> cleaned mesh -> UV atlas -> baked texture -> files."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from recon.exports.bake import bake_texture
from recon.exports.cleanup import clean_mesh
from recon.exports.config import ExportConfig
from recon.exports.isosurface import extract_mesh
from recon.exports.uv import unwrap_uv
from recon.exports.writers import write_glb, write_obj, write_ply

from recon.errors import ReconError
from recon.progress import info


@torch.no_grad()
def _vertex_colours(vertices: np.ndarray, albedo_fn: Callable[[torch.Tensor], torch.Tensor], chunk_size: int, device: torch.device | str) -> np.ndarray:
    """Albedo (V, 3) in [0, 1] at mesh vertices, evaluated in chunks."""
    colours = np.empty((len(vertices), 3), dtype=np.float64)
    for start in range(0, len(vertices), chunk_size):
        chunk = torch.as_tensor(vertices[start : start + chunk_size], dtype=torch.float32, device=device)
        colours[start : start + chunk_size] = albedo_fn(chunk).reshape(-1, 3).float().cpu().numpy()
    return np.nan_to_num(colours, nan=0.0).clip(0.0, 1.0)


def export_field(
    density_fn: Callable[[torch.Tensor], torch.Tensor],
    albedo_fn: Callable[[torch.Tensor], torch.Tensor],
    aabb: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    cfg: ExportConfig | None = None,
    stem: str = "mesh",
    device: torch.device | str = "cpu",
) -> dict[str, Path]:
    """Exports a radiance field as mesh files ``out_dir/<stem>.<format>`` for each format in ``cfg.formats``.

    ``density_fn(points (P, 3)) -> (P,)`` and ``albedo_fn(points) -> (P, 3)``
    in [0, 1] take world points on ``device``; ``aabb`` (2, 3) is the box
    searched for the surface. OBJ sidecars (``<stem>.mtl``,
    ``<stem>_albedo.png``) sit beside the .obj; ``cfg.up_axis`` says which
    world axis is up (:mod:`exports.frame`). Returns {format: path}.
    Progress goes to the console one line per stage.
    """
    cfg = cfg or ExportConfig()
    if cfg.up_axis == "auto":
        raise ReconError("export.up_axis=auto is decided by fit-views from its cameras; set +y or +z")
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}

    start = time.perf_counter()
    raw, level = extract_mesh(density_fn, aabb, cfg.mc_resolution, cfg.threshold, cfg.chunk_size, device)
    chosen = "automatic" if cfg.threshold is None else "set"
    info(f"export: marching cubes {cfg.mc_resolution}^3 at density {level:.4g} ({chosen}): {len(raw.faces)} faces, {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    mesh = clean_mesh(raw, cfg.min_component_ratio, cfg.target_faces)
    info(f"export: cleanup: {len(mesh.faces)} faces, {len(mesh.vertices)} vertices, {time.perf_counter() - start:.1f} s")

    if "glb" in cfg.formats or "obj" in cfg.formats:
        start = time.perf_counter()
        uv_mesh = unwrap_uv(mesh, cfg.texture_resolution, cfg.texture_padding, cfg.uv_timeout_s)
        info(f"export: UV atlas ({uv_mesh.method}): {len(uv_mesh.vertices)} vertices, {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        texture = bake_texture(uv_mesh, albedo_fn, cfg.texture_resolution, cfg.texture_padding, cfg.chunk_size, device)
        info(f"export: texture bake {cfg.texture_resolution}x{cfg.texture_resolution}: {time.perf_counter() - start:.1f} s")
        if "glb" in cfg.formats:
            paths["glb"] = write_glb(uv_mesh, texture, out_dir / f"{stem}.glb", cfg.up_axis)
        if "obj" in cfg.formats:
            paths["obj"] = write_obj(uv_mesh, texture, out_dir / f"{stem}.obj", cfg.up_axis)
    if "ply" in cfg.formats:
        colours = _vertex_colours(np.asarray(mesh.vertices), albedo_fn, cfg.chunk_size, device)
        paths["ply"] = write_ply(mesh.vertices, mesh.faces, colours, out_dir / f"{stem}.ply", mesh.vertex_normals, cfg.up_axis)
    for name, path in paths.items():
        info(f"export: wrote {name} {path}")
    return paths
