"""Mesh file writers: GLB (PBR base-colour texture), OBJ + MTL + PNG, PLY (vertex colours).

All positions and normals go through :func:`exports.frame.to_export_frame`;
every file is written atomically (recon.fileio.atomic_path). Sidecar names
derive from the output stem (``chair.obj`` -> ``chair.mtl``,
``chair_albedo.png``, material ``chair_material``), so several exports can
share one folder.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from recon.exports.frame import to_export_frame
from recon.exports.uv import UVMesh
from recon.fileio import atomic_path, write_bytes, write_text


def _unit(normals: np.ndarray) -> np.ndarray:
    return normals / np.linalg.norm(normals, axis=1, keepdims=True).clip(1e-12)


def _texture_image(texture: np.ndarray) -> Image.Image:
    texture = np.asarray(texture)
    if texture.dtype != np.uint8:
        texture = np.round(np.clip(texture, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(texture[..., :3], mode="RGB")


def write_glb(mesh: UVMesh, texture: np.ndarray, path: str | Path, up_axis: str = "+y", note: str = "") -> Path:
    """Writes a binary glTF with vertex normals, UVs and a PBR material (base-colour texture, metallic 0, roughness 1).

    ``texture`` (H, W, 3) uint8 or float in [0, 1], row 0 at v = 1. The node
    and mesh are named after the file stem. ``up_axis``: the scene's up in
    world coordinates (:func:`exports.frame.to_export_frame`). ``note`` (e.g.
    a random-weights warning) goes into ``asset.extras.recon_note``. Returns ``path``.
    """
    path = Path(path)
    vertices, normals = to_export_frame(mesh.vertices, mesh.normals, up_axis)
    material = trimesh.visual.material.PBRMaterial(
        name=f"{path.stem}_material",
        baseColorTexture=_texture_image(texture),
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0,
        roughnessFactor=1.0,
        doubleSided=False,
    )
    tri = trimesh.Trimesh(
        vertices=vertices,
        faces=mesh.faces,
        vertex_normals=_unit(normals),
        visual=trimesh.visual.TextureVisuals(uv=mesh.uv, material=material),
        process=False,
    )
    scene = trimesh.Scene(geometry={path.stem: tri})

    def label(tree: dict) -> None:
        if note:
            tree.setdefault("asset", {}).setdefault("extras", {})["recon_note"] = note

    data = trimesh.exchange.gltf.export_glb(scene, include_normals=True, tree_postprocessor=label)
    write_bytes(path, data)
    return path


def obj_sidecars(path: str | Path) -> tuple[Path, Path, str]:
    """(mtl path, texture path, material name) that :func:`write_obj` uses for ``path``."""
    path = Path(path)
    return path.with_suffix(".mtl"), path.with_name(f"{path.stem}_albedo.png"), f"{path.stem}_material"


def _comment(note: str) -> str:
    """``note`` as OBJ/MTL comment lines (empty for no note)."""
    return "".join(f"# {line}\n" for line in note.splitlines())


def _rows(array: np.ndarray, fmt: str) -> str:
    buffer = io.StringIO()
    np.savetxt(buffer, array, fmt=fmt)
    return buffer.getvalue()


def write_obj(mesh: UVMesh, texture: np.ndarray, path: str | Path, up_axis: str = "+y", note: str = "") -> Path:
    """Writes ``path`` (.obj with v, vt, vn, f v/vt/vn) plus its .mtl and ``<stem>_albedo.png`` beside it.

    The MTL and PNG are referenced by bare file names (relative paths). The
    texture and MTL are written first, so an existing .obj always has them.
    ``up_axis`` and ``note`` (a comment line in the .obj and .mtl) as in :func:`write_glb`. Returns the .obj path.
    """
    path = Path(path)
    mtl_path, png_path, material = obj_sidecars(path)
    with atomic_path(png_path) as tmp:
        _texture_image(texture).save(tmp, format="PNG")
    write_text(
        mtl_path,
        f"# recon material for {path.name}\n{_comment(note)}"
        f"newmtl {material}\n"
        "Ka 1.000000 1.000000 1.000000\nKd 1.000000 1.000000 1.000000\nKs 0.000000 0.000000 0.000000\n"
        "Ns 0.000000\nd 1.000000\nillum 1\nPr 1.000000\nPm 0.000000\n"
        f"map_Kd {png_path.name}\n",
    )
    vertices, normals = to_export_frame(mesh.vertices, mesh.normals, up_axis)
    index = mesh.faces + 1
    corners = np.repeat(index, 3, axis=1)
    text = (
        f"# recon export\n{_comment(note)}mtllib {mtl_path.name}\no {path.stem}\n"
        + _rows(vertices, "v %.6f %.6f %.6f")
        + _rows(mesh.uv, "vt %.6f %.6f")
        + _rows(_unit(normals), "vn %.6f %.6f %.6f")
        + f"usemtl {material}\ns 1\n"
        + _rows(corners, "f %d/%d/%d %d/%d/%d %d/%d/%d")
    )
    write_text(path, text)
    return path


def write_ply(
    vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, path: str | Path, normals: np.ndarray | None = None,
    up_axis: str = "+y",
) -> Path:
    """Writes a binary PLY with per-vertex RGBA colours (``colors`` (V, 3) float in [0, 1] or uint8) and normals;
    ``up_axis`` as in :func:`write_glb`."""
    path = Path(path)
    colors = np.asarray(colors)
    if colors.dtype != np.uint8:
        colors = np.round(np.clip(colors, 0.0, 1.0) * 255.0).astype(np.uint8)
    rgba = np.concatenate([colors[:, :3], np.full((len(colors), 1), 255, dtype=np.uint8)], axis=1)
    tri = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=rgba, process=False)
    if normals is None:
        normals = tri.vertex_normals
    exported, exported_normals = to_export_frame(tri.vertices, normals, up_axis)
    tri = trimesh.Trimesh(vertices=exported, faces=faces, vertex_normals=_unit(exported_normals), vertex_colors=rgba, process=False)
    data = trimesh.exchange.ply.export_ply(tri, encoding="binary", vertex_normal=True)
    write_bytes(path, data)
    return path
