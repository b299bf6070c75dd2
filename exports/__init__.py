"""NeRF -> Blender-ready mesh files: isosurface, cleanup, UV atlas, texture bake, writers, turntable.

Takes plain callables (``density_fn``, ``albedo_fn``) and a bounding box, so
it depends on recon's conventions only, never on guidance or systems.
"""

import importlib
from typing import Any

# Imported on first use (PEP 562), so that reading ExportConfig (every fit does, at start-up) does not import
# trimesh and scipy: importing this package eagerly took 1.05 s of a fast `recon fit` on the GPU machine (cProfile).
_HOMES = {
    "EXPORT_ROTATIONS": "frame",
    "FORMATS": "config",
    "UP_AXES": "frame",
    "ExportConfig": "config",
    "UVMesh": "uv",
    "auto_threshold": "isosurface",
    "bake_texture": "bake",
    "clean_mesh": "cleanup",
    "decimate": "cleanup",
    "dilate": "bake",
    "dominant_up_axis": "frame",
    "export_field": "pipeline",
    "extract_mesh": "isosurface",
    "marching_cubes": "isosurface",
    "obj_sidecars": "writers",
    "per_triangle_atlas": "uv",
    "rasterize_uv": "bake",
    "remove_small_components": "cleanup",
    "render_turntable": "turntable",
    "sample_density_grid": "isosurface",
    "to_export_frame": "frame",
    "unwrap_uv": "uv",
    "write_glb": "writers",
    "write_obj": "writers",
    "write_ply": "writers",
}


def __getattr__(name: str) -> Any:
    """The public name ``name`` from the submodule that defines it, imported now."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = list(_HOMES)
