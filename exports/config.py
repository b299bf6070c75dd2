"""Settings of the NeRF -> mesh export (isosurface, cleanup, UV atlas, texture bake, writers)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from recon.errors import ReconError
from recon.exports.frame import UP_AXES

FORMATS = ("glb", "obj", "ply")


def parse_formats(text: str) -> list[str]:
    """``"glb,obj"`` -> ``["glb", "obj"]``; :class:`ReconError` for an unknown or empty list."""
    formats = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise ReconError(f"--format {text!r}: choose one or more of {', '.join(FORMATS)}, comma-separated")
    return list(dict.fromkeys(formats))


@dataclass
class ExportConfig:
    """How a density/albedo field becomes mesh files."""

    formats: list[str] = field(default_factory=lambda: ["glb"])
    """Files to write: any of glb (textured, embedded), obj (+ .mtl + .png beside it), ply (vertex colours)."""
    mc_resolution: int = 256
    """Marching-cubes grid points per axis over the field's bounding box."""
    density_stride: int = 4
    """Evaluate the field on every n-th grid point first and at full resolution only near the surface
    (1 = every point; exports.isosurface.sample_density_near_surface)."""
    fill_interior: bool = True
    """Mesh a solid (exports.solidify.solid_grid): the largest occupied pieces, with everything empty space from
    outside cannot reach filled, so the mesh is one closed outer shell, no nested ones (False: the raw density)."""
    hole_voxels: int = 1
    """With fill_interior: holes in the shell up to about 2 x this many grid steps wide are closed."""
    threshold: float | None = None
    """Density level of the surface; None picks it from the density distribution (see exports.isosurface.auto_threshold)."""
    min_component_ratio: float = 0.05
    """Solid pieces smaller than this fraction of the largest one's volume (and mesh pieces with fewer faces than
    this fraction of the largest one's) are removed as floaters (0 keeps all)."""
    carve_unseen: bool = True
    """With cameras given (fit-views' training cameras), occupied grid points outside every camera's view are
    emptied before meshing: the field there was never constrained."""
    carve_free_space: bool = True
    """With fill_interior: the flood of empty space from outside passes only where some camera sees free space in
    front of the surface the field renders (exports.carve), so holes in a fitted field's shell do not let it into
    the unseen interior (deep tunnels: handles and inner surfaces)."""
    carve_views: int = 24
    """Free-space carving without cameras (single-image fits, recon export of such runs): this many viewpoints on a
    sphere around the box, 0 = no carving without cameras (fit-views uses its training cameras)."""
    carve_resolution: int = 128
    """Side of the depth maps rendered for free-space carving, in pixels."""
    photo_bake: bool = True
    """With the training photos (fit-views): texels that some photo sees take the photos' colour there
    (exports.photo_bake, view-angle weighted, depth-tested against the mesh); the rest get the field's bake."""
    smooth_iterations: int = 10
    """Taubin smoothing passes on the marching-cubes mesh before decimation (0 = none)."""
    target_faces: int = 50_000
    """Bring the mesh to at most this many faces before UV unwrapping (see reduce; 0 = keep all); bounds xatlas time."""
    reduce: Literal["remesh", "decimate"] = "remesh"
    """With fill_interior, how a solid's mesh of more than 1.5 x target_faces gets to the budget: remesh (marching
    cubes of the solid resampled on a coarser grid sized for the budget: regular triangles, which xatlas charts
    into a few large islands quickly) or decimate (quadric decimation of the full-resolution mesh, kept closed:
    sharper detail, but several times more UV charts and a slower unwrap; bench/export.py measures both)."""
    texture_resolution: int = 1024
    """Side of the square base-colour texture, in pixels."""
    cpu_max_mc_resolution: int = 128
    """On the CPU, mc_resolution is capped at this (0 = no cap): the field evaluations of a GPU-sized grid take
    minutes there; say --set export.cpu_max_mc_resolution=0 to keep the full grid."""
    cpu_max_texture_resolution: int = 512
    """On the CPU, texture_resolution is capped at this (0 = no cap): the bake evaluates the field per texel."""
    cpu_min_uv_piece_faces: int = 8000
    """On the CPU, uv_piece_faces (when not 0) is raised to at least this (0 = unchanged): a few cores chart only a
    few pieces at once, and at the CPU's 512 px texture the seams of smaller pieces cost ~0.4 dB texture PSNR on
    bench/export.py's robot."""
    texture_padding: int = 4
    """Gutter between UV charts (asked of xatlas; its atlas scaled to the texture keeps about 0.7-1x of it) and
    seam dilation of the baked texture, in pixels."""
    chart_max_cost: float = 2.0
    """xatlas chart growth cost limit (its default 2). Higher grows charts further, but on the toy robot 4 gave
    more charts, not fewer, and 2.4x the unwrap time (bench/export.py), so it is not raised by default."""
    bake: Literal["normal", "project", "point"] = "normal"
    """Texture colour: normal (the field volume-rendered along each texel's normal from just outside the mesh:
    the colour where the field's rays terminate), project (rendered from bake_views views onto the surface,
    visibility- and angle-weighted) or point (albedo looked up at each texel's point on the mesh)."""
    bake_rays: Literal["auto", "vertices", "texels"] = "auto"
    """Where the normal bake casts its rays: texels (a ray per texel, bake_samples density calls each: the
    reference), vertices (a ray per mesh vertex finds how far along the normal the field's surface lies; each
    texel takes the albedo at that offset interpolated across its triangle, bake_surface_points field calls:
    about 5x faster on the CPU, ~0.5 dB lower texture PSNR on bench/export.py's robot) or auto (vertices on the
    CPU, texels on a GPU, where the per-texel rays take about a second). With the photo bake, the texels no
    photo sees take per-texel rays whatever this says."""
    bake_surface_points: int = 2
    """With bake_rays=vertices: albedo calls per texel, at that many quantiles of the vertex rays' termination
    (averaged: 1 = the median termination only, fastest; 2 blends across a soft or grazing surface as the
    rendered colour does)."""
    bake_views: int = 32
    """Viewpoints around the object used by the projection bake."""
    bake_views_per_texel: int = 1
    """The projection bake renders each texel from this many of its best-facing visible views."""
    bake_samples: int = 16
    """Samples per short ray of the normal and projection bakes."""
    bake_band: float = 3.0
    """Half-length of the normal and projection bakes' rays about the mesh, in marching-cubes grid steps (the
    normal bake shortens a ray whose start would lie inside another part of the object)."""
    bake_view_resolution: int = 512
    """Side of the depth maps that decide visibility in the projection bake, in pixels."""
    chunk_size: int = 262_144
    """Points per call of the density/albedo functions (bounds memory)."""
    uv_piece_faces: int = 4000
    """xatlas charts the mesh in pieces of about this many faces (flat cuts; at most 16 pieces), in parallel
    threads, and packs all their charts into one atlas: on 50k faces several times faster than one piece, with
    about as many charts (0 = the whole mesh as one piece, the reference). Charting time grows faster than a
    piece's size: 4000 halved the largest piece's time against 8000 on a fitted field's 40k-face mesh (198
    charts instead of 301; 120 instead of 92 on bench/export.py's robot)."""
    uv_timeout_s: float = 600.0
    """Time limit of one xatlas unwrap in its subprocess; on timeout the fallback atlas is used."""
    turntable_frames: int = 60
    """Frames of the turntable video (one full turn)."""
    turntable_elevation_deg: float = 15.0
    """Camera elevation of the turntable, degrees above the horizon."""
    turntable_resolution: int = 256
    """Side of the square turntable frames, in pixels."""
    turntable_fps: int = 24
    """Frames per second of the turntable video."""
    up_axis: Literal["+y", "+z", "auto"] = "+y"
    """The scene's up axis in world coordinates: +y (recon's frame: single-image fits) or +z (Blender /
    NeRF-synthetic captures; rotated so the files are +Y up with the front at +Z, as glTF and Blender's
    importers expect); fit-views' 'auto' picks it from the cameras' up vectors."""
    note: str = ""
    """Text written into every mesh file (GLB asset.extras.recon_note, a comment in the OBJ and MTL), e.g. the
    random-weights warning of a smoke-test run; empty = none."""

    def for_device(self, device: str | object) -> ExportConfig:
        """This config as it runs on ``device``: bake_rays auto decided; on the CPU, the grid and texture capped
        and the UV pieces enlarged (see the cpu_max_* / cpu_min_* fields)."""
        cpu = str(device).split(":")[0] == "cpu"
        changes: dict = {"bake_rays": "vertices" if cpu else "texels"} if self.bake_rays == "auto" else {}
        if cpu:
            changes.update(
                (name, limit)
                for name, limit in (
                    ("mc_resolution", self.cpu_max_mc_resolution),
                    ("texture_resolution", self.cpu_max_texture_resolution),
                )
                if 0 < limit < getattr(self, name)
            )
            if 0 < self.uv_piece_faces < self.cpu_min_uv_piece_faces:
                changes["uv_piece_faces"] = self.cpu_min_uv_piece_faces
        return replace(self, **changes) if changes else self

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ReconError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        if self.mc_resolution < 8:
            raise ReconError(f"export.mc_resolution must be at least 8, got {self.mc_resolution}")
        if self.texture_resolution < 16:
            raise ReconError(f"export.texture_resolution must be at least 16, got {self.texture_resolution}")
        if not 0.0 <= self.min_component_ratio <= 1.0:
            raise ReconError(f"export.min_component_ratio must be in [0, 1], got {self.min_component_ratio}")
        if self.up_axis not in (*UP_AXES, "auto"):
            raise ReconError(f"export.up_axis {self.up_axis!r}: choose one of {', '.join(UP_AXES)} (or auto in fit-views)")
        if self.bake not in ("normal", "project", "point"):
            raise ReconError(f"export.bake {self.bake!r}: choose normal, project or point")
        if self.reduce not in ("remesh", "decimate"):
            raise ReconError(f"export.reduce {self.reduce!r}: choose remesh or decimate")
        if self.bake_rays not in ("auto", "vertices", "texels"):
            raise ReconError(f"export.bake_rays {self.bake_rays!r}: choose auto, vertices or texels")
        if self.bake_band <= 0:
            raise ReconError(f"export.bake_band must be > 0 grid steps, got {self.bake_band}")
        if min(self.density_stride, self.bake_views, self.bake_views_per_texel, self.bake_samples, self.bake_view_resolution) < 1:
            raise ReconError("export.density_stride and export.bake_views / views_per_texel / samples / view_resolution must be >= 1")
        if min(self.carve_views, self.carve_resolution - 1) < 0:
            raise ReconError("export.carve_views must be >= 0 and export.carve_resolution >= 1")
        if self.bake_surface_points < 1:
            raise ReconError(f"export.bake_surface_points must be >= 1, got {self.bake_surface_points}")
        if min(self.uv_piece_faces, self.cpu_min_uv_piece_faces) < 0:
            raise ReconError(f"export.uv_piece_faces and cpu_min_uv_piece_faces must be >= 0, got {self.uv_piece_faces}, {self.cpu_min_uv_piece_faces}")
        if self.target_faces < 0 or self.texture_padding < 0 or self.smooth_iterations < 0 or self.hole_voxels < 0:
            raise ReconError("export.target_faces, texture_padding, smooth_iterations and hole_voxels must be >= 0")
