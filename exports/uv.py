"""UV atlas generation with xatlas, contained in a subprocess.

xatlas segfaults on some meshes (see shared/design/ENVIRONMENT.md), which
would kill the whole run in-process. So the unwrap runs in a child Python
(this file run as a script, which imports only numpy and xatlas' deps):
on a crash or timeout it is retried once on a lightly decimated mesh, and if
that fails too a simple per-triangle atlas is used, with a warning, so the
export still succeeds.

UV convention everywhere in exports/: (u, v) in [0, 1], v pointing up, as in
OBJ and trimesh; texel row = (1 - v) * height.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_PIECES = 16
"""Most pieces :func:`split_faces` cuts a mesh into for xatlas."""


@dataclass
class UVMesh:
    """A triangle mesh with one UV per vertex (vertices are split along UV seams).

    ``vertices`` (V, 3) world units; ``faces`` (F, 3) int64, counter-clockwise
    seen from outside; ``uv`` (V, 2) in [0, 1], v up; ``normals`` (V, 3)
    unit, outward; ``method`` says which unwrap produced the atlas
    ("xatlas", "xatlas-retry" or "per-triangle").
    """

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    normals: np.ndarray
    method: str


def split_faces(vertices: np.ndarray, faces: np.ndarray, piece_faces: int) -> list[np.ndarray]:
    """Indices of ``faces`` (F, 3) in pieces of about ``piece_faces`` faces (at most :data:`MAX_PIECES`): the
    face centroids split again and again at the median of their longest extent (flat cuts through the mesh).
    ``piece_faces`` 0 or a mesh that small: one piece. Deterministic."""
    count = min(MAX_PIECES, max(1, round(len(faces) / piece_faces))) if piece_faces > 0 else 1
    centroids = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)].mean(axis=1)

    def split(index: np.ndarray, pieces: int) -> list[np.ndarray]:
        if pieces <= 1:
            return [index]
        points = centroids[index]
        axis = int(np.argmax(points.max(axis=0) - points.min(axis=0)))
        order = index[np.argsort(points[:, axis], kind="stable")]
        half = len(order) * (pieces // 2) // pieces
        return split(order[:half], pieces // 2) + split(order[half:], pieces - pieces // 2)

    return split(np.arange(len(faces)), count)


def _child_main(argv: list[str]) -> int:
    """Child entry point: ``uv.py IN.npz OUT.npz ATTEMPT``; writes vmapping, faces, uv."""
    src, dst = argv[0], argv[1]
    import xatlas

    data = np.load(src)
    positions = np.ascontiguousarray(data["vertices"], dtype=np.float32)
    indices = np.ascontiguousarray(data["faces"], dtype=np.int64)
    resolution, padding = int(data["resolution"]), int(data["padding"])
    charts = xatlas.ChartOptions()
    # A higher cost limit grows charts further before a new one starts: few, large, paintable islands.
    charts.max_cost = float(data["max_cost"])
    # Each piece is a separate xatlas mesh: xatlas charts them in parallel threads (and charting time grows
    # faster than the face count), then packs all their charts into one atlas.
    atlas = xatlas.Atlas()
    pieces = split_faces(positions, indices, int(data["piece_faces"]))
    originals = []
    for piece in pieces:
        used, local = np.unique(indices[piece], return_inverse=True)
        atlas.add_mesh(positions[used], local.reshape(-1, 3).astype(np.uint32))
        originals.append(used)
    # xatlas searches for the texel density that fills a texture-sized atlas (packing only, the charts are made
    # once); its atlas comes out larger (its side up to ~1.45x measured), so it is scaled to the texture, and the
    # gutter shrinks with it: asked one texel wider, it ends up about 0.7-1x `padding` (packing again with a wider
    # gutter measured 2-3x slower, with a third of the atlas used, for many charts).
    pack = xatlas.PackOptions()
    pack.resolution = resolution
    pack.texels_per_unit = 0.0
    pack.padding = padding + 1
    pack.bilinear = True
    pack.rotate_charts = True
    atlas.generate(charts, pack)
    outputs = [atlas.get_mesh(i) for i in range(len(pieces))]
    vmapping = np.concatenate([originals[i][out[0].astype(np.int64)] for i, out in enumerate(outputs)])
    offsets = np.cumsum([0] + [len(out[0]) for out in outputs])
    faces = np.concatenate([out[1].astype(np.int64) + offsets[i] for i, out in enumerate(outputs)])
    uv = np.concatenate([out[2] for out in outputs]).astype(np.float64) * np.array([atlas.width, atlas.height]) / max(atlas.width, atlas.height)
    np.savez(dst, vmapping=vmapping.astype(np.int64), faces=faces, uv=uv)
    return 0


def child_command(src: Path, dst: Path, attempt: int) -> list[str]:
    """The command line of one xatlas child run (attempt 0, 1, ...): this file run as a script."""
    return [sys.executable, str(Path(__file__).resolve()), str(src), str(dst), str(attempt)]


def _run_xatlas(
    vertices: np.ndarray, faces: np.ndarray, resolution: int, padding: int, timeout_s: float, attempt: int, max_cost: float,
    piece_faces: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(vmapping, faces, uv) from a child xatlas run, or a string saying why it failed."""
    with tempfile.TemporaryDirectory(prefix="recon-xatlas-") as folder:
        src, dst = Path(folder) / "in.npz", Path(folder) / "out.npz"
        np.savez(src, vertices=vertices, faces=faces, resolution=resolution, padding=padding, max_cost=max_cost, piece_faces=piece_faces)
        command = child_command(src, dst, attempt)
        try:
            result = subprocess.run(command, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout_s:.0f} s"
        if result.returncode != 0 or not dst.exists():
            detail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            return f"child exited with code {result.returncode} {detail[0]}".strip()
        out = np.load(dst)
        return out["vmapping"], out["faces"], out["uv"]


def per_triangle_atlas(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, texture_resolution: int, padding: int) -> UVMesh:
    """A fallback atlas: every triangle gets its own half of a square grid cell.

    Triangles are not connected in UV space, so texture resolution per
    triangle is low and seams are everywhere, but it never fails. Each half
    cell is inset by up to ``padding`` texels (at least ~1 texel) so neighbours
    never share a texel.
    """
    count = len(faces)
    cells = max(1, math.ceil(math.sqrt(count / 2.0)))
    size = 1.0 / cells
    inset = min(max(padding, 1.0) / texture_resolution, 0.2 * size)
    index = np.arange(count)
    cell = index // 2
    origin = np.stack([(cell % cells) * size, (cell // cells) * size], axis=1)
    lower = np.array([[inset, inset], [size - 2 * inset, inset], [inset, size - 2 * inset]])
    upper = np.array([[size - inset, size - inset], [2 * inset, size - inset], [size - inset, 2 * inset]])
    local = np.where((index % 2 == 0)[:, None, None], lower[None], upper[None])
    uv = (origin[:, None, :] + local).reshape(-1, 2)
    corners = faces.reshape(-1)
    return UVMesh(
        vertices=vertices[corners],
        faces=np.arange(3 * count, dtype=np.int64).reshape(count, 3),
        uv=np.clip(uv, 0.0, 1.0),
        normals=normals[corners],
        method="per-triangle",
    )


def unwrap_uv(
    mesh, texture_resolution: int = 1024, padding: int = 4, timeout_s: float = 600.0, max_cost: float = 2.0, piece_faces: int = 0
) -> UVMesh:
    """UV-unwraps a ``trimesh.Trimesh`` with xatlas in a subprocess; never crashes the caller.

    ``max_cost``: xatlas' chart growth cost limit (its default 2).
    ``piece_faces`` > 0: the mesh is cut into pieces of about that many faces
    (:func:`split_faces`), charted by xatlas in parallel threads and packed
    into one atlas (0 = one piece, the reference: several times slower on
    50k faces). xatlas packs the charts at the texel density that fills the
    texture (its search: packing only); the atlas is scaled to the texture.

    Attempt 1: xatlas on the mesh. Attempt 2 (after a crash/timeout): xatlas
    on the mesh decimated to 90 % of its faces, which breaks the exact
    regularity that trips xatlas. Then: :func:`per_triangle_atlas` with a warning.
    """
    import trimesh

    from recon.exports.cleanup import decimate
    from recon.progress import warn

    candidates = [("xatlas", mesh)]
    for attempt in range(2):
        method, current = candidates[attempt]
        vertices = np.asarray(current.vertices, dtype=np.float64)
        faces = np.asarray(current.faces, dtype=np.int64)
        result = _run_xatlas(vertices, faces, texture_resolution, padding, timeout_s, attempt, max_cost, piece_faces)
        if not isinstance(result, str):
            vmapping, new_faces, uv = result
            normals = np.asarray(current.vertex_normals, dtype=np.float64)
            return UVMesh(vertices[vmapping], new_faces, np.clip(uv, 0.0, 1.0), normals[vmapping], method)
        warn(f"xatlas UV unwrap failed ({result}) on {len(faces)} faces")
        if attempt == 0:
            lighter = decimate(mesh, max(4, int(0.9 * len(mesh.faces))))
            candidates.append(("xatlas-retry", trimesh.Trimesh(lighter.vertices, lighter.faces, process=False)))
    warn("falling back to a per-triangle UV atlas (lower texture quality)")
    return per_triangle_atlas(
        np.asarray(mesh.vertices, dtype=np.float64),
        np.asarray(mesh.faces, dtype=np.int64),
        np.asarray(mesh.vertex_normals, dtype=np.float64),
        texture_resolution,
        padding,
    )


def count_charts(mesh: UVMesh) -> int:
    """Number of UV islands: groups of faces connected through shared (UV-split) vertices."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(mesh.faces) == 0:
        return 0
    corners = mesh.faces
    rows = np.concatenate([corners[:, 0], corners[:, 1]])
    cols = np.concatenate([corners[:, 1], corners[:, 2]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(mesh.vertices),) * 2)
    _, labels = connected_components(graph, directed=False)
    return len(np.unique(labels[corners[:, 0]]))


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
