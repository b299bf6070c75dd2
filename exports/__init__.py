"""NeRF -> Blender-ready mesh files: isosurface, cleanup, UV atlas, texture bake, writers, turntable.

Takes plain callables (``density_fn``, ``albedo_fn``) and a bounding box, so
it depends on recon's conventions only, never on guidance or systems.
"""

from recon.exports.bake import bake_texture, dilate, rasterize_uv
from recon.exports.cleanup import clean_mesh, decimate, remove_small_components
from recon.exports.config import FORMATS, ExportConfig
from recon.exports.frame import (
    EXPORT_ROTATIONS,
    UP_AXES,
    dominant_up_axis,
    to_export_frame,
)
from recon.exports.isosurface import (
    auto_threshold,
    extract_mesh,
    marching_cubes,
    sample_density_grid,
)
from recon.exports.pipeline import export_field
from recon.exports.turntable import render_turntable
from recon.exports.uv import UVMesh, per_triangle_atlas, unwrap_uv
from recon.exports.writers import obj_sidecars, write_glb, write_obj, write_ply

__all__ = [
    "EXPORT_ROTATIONS",
    "FORMATS",
    "UP_AXES",
    "ExportConfig",
    "UVMesh",
    "auto_threshold",
    "bake_texture",
    "clean_mesh",
    "decimate",
    "dilate",
    "dominant_up_axis",
    "export_field",
    "extract_mesh",
    "marching_cubes",
    "obj_sidecars",
    "per_triangle_atlas",
    "rasterize_uv",
    "remove_small_components",
    "render_turntable",
    "sample_density_grid",
    "to_export_frame",
    "unwrap_uv",
    "write_glb",
    "write_obj",
    "write_ply",
]
