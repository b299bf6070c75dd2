"""``recon export RUN_DIR``: files that reload with their texture, in the run's output frame; flag errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from recon.cli.export import parse_threshold
from recon.cli.main import main
from recon.config import to_plain
from recon.encoding import HashGridConfig
from recon.errors import ReconError
from recon.exports.config import parse_formats
from recon.field import FieldConfig, RadianceField
from recon.runs import RunDir
from recon.systems.checkpoint import save_checkpoint

FIELD = FieldConfig(
    encoding=HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, backend="torch"),
    mlp_width=16,
    mlp_hidden_layers=1,
    blob_radius=0.5,
)
CENTER = [0.3, -0.1, 0.2]
SCALE = 2.0


@pytest.fixture
def run(tmp_path) -> RunDir:
    """An interrupted run whose field is the initial density blob (a ball of radius < 0.5 field units)."""
    torch.manual_seed(0)
    field = RadianceField(FIELD)
    config = {"field": to_plain(FIELD), "scene": {"center": CENTER, "scale": SCALE}, "export": {"formats": ["ply"], "target_faces": 2000}}
    created = RunDir.create(tmp_path / "run", config)
    save_checkpoint(created, 5, "fit", {"field": field})
    created.write_progress("fit", 5, 100, 12.0, "interrupted")
    return created


def _check_ball(mesh: trimesh.Trimesh) -> None:
    """The blob, mapped back by the run's scene transform: centred on CENTER, radius < 0.5 / SCALE."""
    centre = (mesh.bounds[0] + mesh.bounds[1]) / 2
    assert np.allclose(centre, CENTER, atol=0.03)
    half = (mesh.bounds[1] - mesh.bounds[0]) / 2
    assert (half > 0.05).all() and (half < 0.5 / SCALE).all()


def test_export_writes_textured_glb_and_obj(run):
    code = main(["export", str(run.root), "--format", "glb,obj", "--mc-resolution", "32", "--texture-resolution", "64", "--quiet"])
    assert code == 0
    glb = trimesh.load(run.exports / "mesh.glb", force="mesh")
    assert isinstance(glb.visual, trimesh.visual.TextureVisuals)
    texture = glb.visual.material.baseColorTexture
    assert texture is not None and texture.size == (64, 64)
    assert glb.visual.uv is not None and len(glb.visual.uv) == len(glb.vertices)
    _check_ball(glb)
    obj = trimesh.load(run.exports / "mesh.obj", force="mesh")
    assert isinstance(obj.visual, trimesh.visual.TextureVisuals) and obj.visual.material.image.size == (64, 64)
    _check_ball(obj)
    meta = run.read_meta()
    assert meta["exports"]["step"] == 5 and set(meta["exports"]["files"]) == {"glb", "obj"}
    assert not run.is_finished  # exporting does not change the run's training status


def test_export_defaults_come_from_the_run_and_output_override(run, tmp_path):
    out = tmp_path / "elsewhere"
    assert main(["export", str(run.root), "-o", str(out), "--mc-resolution", "24", "--threshold", "1.0", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mesh.ply"]  # the run's export.formats
    assert not any(run.exports.iterdir())
    _check_ball(trimesh.load(out / "mesh.ply", force="mesh"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "glb,fbx"], "--format 'glb,fbx'"),
        (["--format", ","], "choose one or more"),
        (["--threshold", "abc"], "expected a number or 'auto'"),
        (["--texture-resolution", "4"], "texture_resolution must be at least 16"),
    ],
)
def test_export_flag_errors(run, capsys, args, message):
    assert main(["export", str(run.root), *args]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_export_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_parse_helpers():
    assert parse_formats(" GLB, obj ,glb") == ["glb", "obj"]
    assert parse_threshold("auto") is None and parse_threshold("2.5") == 2.5
    with pytest.raises(ReconError, match="must be > 0"):
        parse_threshold("-1")
