"""GLB / OBJ / PLY writers and the whole export_field pipeline, checked by reloading with trimesh."""

import json
import struct

import numpy as np
import pytest
import torch
import trimesh

from recon.errors import ReconError
from recon.exports import (
    ExportConfig,
    bake_texture,
    clean_mesh,
    export_field,
    extract_mesh,
    unwrap_uv,
    write_glb,
    write_obj,
    write_ply,
)

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def _ball(points, center, radius, peak=100.0):
    return peak * torch.sigmoid((radius - (points - torch.tensor(center)).norm(dim=-1)) / 0.01)


def asymmetric_density(points):
    """A body (r 0.45) with a nose towards +Z (front) and a smaller ear towards +Y (up)."""
    return _ball(points, (0, 0, 0), 0.45) + _ball(points, (0, 0, 0.45), 0.15) + _ball(points, (0, 0.45, 0), 0.1)


def front_red_back_blue(points):
    front = (points[:, 2] > 0).float()
    return torch.stack([front, torch.full_like(front, 0.2), 1.0 - front], dim=-1)


def check_asymmetric_pose(mesh):
    """Front (+Z) and up (+Y) of the reloaded object are where the world put them."""
    lo, hi = mesh.bounds
    assert hi[2] == pytest.approx(0.60, abs=0.04)  # nose tip
    assert hi[1] == pytest.approx(0.55, abs=0.04)  # ear tip
    assert lo[2] == pytest.approx(-0.45, abs=0.04) and lo[1] == pytest.approx(-0.45, abs=0.04)
    assert hi[0] == pytest.approx(0.45, abs=0.04) and lo[0] == pytest.approx(-0.45, abs=0.04)


def check_outward(mesh, normals=None):
    """Winding (signed volume, face normals) and the stored vertex ``normals`` point outward."""
    assert mesh.volume > 0
    centre = mesh.vertices.mean(axis=0)
    assert (np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center - centre) > 0).mean() > 0.95
    if normals is not None:
        assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-4)
        assert (np.einsum("ij,ij->i", normals, mesh.vertices - centre) > 0).mean() > 0.95


def obj_normals(path):
    """The vn rows of an OBJ written with one v/vt/vn index per corner."""
    return np.array([line.split()[1:] for line in path.read_text().splitlines() if line.startswith("vn ")], dtype=float)


def texture_colours_at_faces(mesh, image, selector):
    faces = np.nonzero(selector(mesh.triangles_center))[0]
    uv = mesh.visual.uv[mesh.faces[faces]].mean(axis=1)
    return trimesh.visual.color.uv_to_color(uv, image)[:, :3]


@pytest.fixture(scope="module")
def textured():
    raw, _ = extract_mesh(asymmetric_density, BOX, resolution=40, threshold=50.0)
    mesh = clean_mesh(raw, 0.05, target_faces=3000)
    atlas = unwrap_uv(mesh, texture_resolution=128, padding=2)
    texture = bake_texture(atlas, front_red_back_blue, resolution=128, padding=2)
    return atlas, texture


def glb_json(path):
    data = path.read_bytes()
    length = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20 : 20 + length])


def test_glb_round_trip(tmp_path, textured):
    atlas, texture = textured
    path = write_glb(atlas, texture, tmp_path / "thing.glb")
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.vertices) == len(atlas.vertices) and len(loaded.faces) == len(atlas.faces)
    image = loaded.visual.material.baseColorTexture
    assert image is not None and image.size == (128, 128)
    assert loaded.visual.uv.min() >= 0 and loaded.visual.uv.max() <= 1
    assert np.allclose(loaded.visual.uv, atlas.uv, atol=1e-6)
    check_asymmetric_pose(loaded)
    check_outward(loaded, loaded.vertex_normals)  # trimesh keeps the GLB's NORMAL attribute
    front = texture_colours_at_faces(loaded, image, lambda c: c[:, 2] > 0.3)
    assert (front[:, 0] > 200).mean() > 0.95 and (front[:, 2] < 50).mean() > 0.95
    gltf = glb_json(path)
    attributes = gltf["meshes"][0]["primitives"][0]["attributes"]
    assert {"POSITION", "NORMAL", "TEXCOORD_0"} <= set(attributes)
    pbr = gltf["materials"][0]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == 1.0 and "baseColorTexture" in pbr
    assert gltf["nodes"][0]["name"] == "thing"
    assert not list(tmp_path.glob(".tmp-*"))


def test_obj_round_trip_and_no_collisions(tmp_path, textured):
    atlas, texture = textured
    write_obj(atlas, texture, tmp_path / "a.obj")
    write_obj(atlas, 255 - texture, tmp_path / "b.obj")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mtl", "a.obj", "a_albedo.png", "b.mtl", "b.obj", "b_albedo.png"]
    text = (tmp_path / "a.obj").read_text()
    assert "mtllib a.mtl" in text and "\nvt " in text and "\nvn " in text
    assert "map_Kd a_albedo.png" in (tmp_path / "a.mtl").read_text()
    for name, channel in (("a", 0), ("b", 1)):
        loaded = trimesh.load(tmp_path / f"{name}.obj", force="mesh", process=False)
        assert len(loaded.vertices) == len(atlas.vertices)
        assert loaded.visual.uv.min() >= 0 and loaded.visual.uv.max() <= 1
        check_asymmetric_pose(loaded)
        check_outward(loaded, obj_normals(tmp_path / f"{name}.obj"))
        front = texture_colours_at_faces(loaded, loaded.visual.material.image, lambda c: c[:, 2] > 0.3)
        assert (front[:, channel] > 200).mean() > 0.95  # a: red front; b: inverted (cyan) front


def test_ply_vertex_colours(tmp_path):
    mesh = trimesh.creation.icosphere(2)
    colours = (mesh.vertices[:, 2:3] > 0) * np.array([1.0, 0.0, 0.0]) + (mesh.vertices[:, 2:3] <= 0) * np.array([0.0, 0.0, 1.0])
    path = write_ply(mesh.vertices, mesh.faces, colours, tmp_path / "m.ply")
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.vertices) == len(mesh.vertices)
    assert np.array_equal(loaded.visual.vertex_colors[:, :3], np.round(colours * 255).astype(np.uint8))
    assert loaded.volume > 0


def test_export_field_end_to_end(tmp_path):
    cfg = ExportConfig(formats=["glb", "obj", "ply"], mc_resolution=40, target_faces=2000, texture_resolution=128, texture_padding=2)
    paths = export_field(asymmetric_density, front_red_back_blue, BOX, tmp_path, cfg, stem="obj1")
    assert set(paths) == {"glb", "obj", "ply"}
    assert {p.name for p in tmp_path.iterdir()} == {"obj1.glb", "obj1.obj", "obj1.mtl", "obj1_albedo.png", "obj1.ply"}
    for fmt in ("glb", "obj"):
        loaded = trimesh.load(paths[fmt], force="mesh", process=False)
        assert len(loaded.faces) <= 2000
        check_asymmetric_pose(loaded)
        check_outward(loaded, loaded.vertex_normals if fmt == "glb" else obj_normals(paths["obj"]))
    ply = trimesh.load(paths["ply"], force="mesh", process=False)
    front = ply.vertices[:, 2] > 0.3
    assert (ply.visual.vertex_colors[front, 0] == 255).all() and (ply.visual.vertex_colors[front, 2] == 0).all()


def test_config_rejects_unknown_format():
    with pytest.raises(ReconError, match="unknown export format"):
        ExportConfig(formats=["fbx"])
