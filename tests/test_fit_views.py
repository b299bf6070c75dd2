"""transforms.json reading/writing, the fit-views trainer (resume, held-out split) and the end-to-end CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recon.cameras import Cameras
from recon.cli.main import main
from recon.config import resolve
from recon.data.primitives import random_object, render_object
from recon.data.transforms_json import estimate_scene, read_transforms, write_transforms
from recon.errors import InputError
from recon.exports.frame import EXPORT_ROTATIONS
from recon.runs import RunDir
from recon.systems.checkpoint import load_latest
from recon.systems.fit_views import FitViewsConfig, FitViewsTrainer, load_views

# A field and renderer small enough for a CPU test.
TINY = [
    "field.encoding.n_levels=6",
    "field.encoding.log2_hashmap_size=13",
    "field.encoding.base_resolution=8",
    "field.encoding.per_level_scale=1.6",
    "field.encoding.backend=torch",
    "field.mlp_width=32",
    "field.mlp_hidden_layers=1",
    "renderer.sampler=stratified",
    "renderer.samples_per_ray=32",
    "rays_per_batch=512",
    "export.mc_resolution=64",
    "export.texture_resolution=128",
    "export.target_faces=5000",
]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _orbit_cameras(count: int, size: int, radius: float = 2.0, fovy_deg: float = 40.0) -> Cameras:
    """``count`` cameras spread over the sphere (Fibonacci spiral, elevation within +-58 deg)."""
    i = torch.arange(count, dtype=torch.float32) + 0.5
    elevation = torch.rad2deg(torch.asin(1 - 2 * i / count)) * 0.8
    azimuth = (i * 137.508) % 360
    return Cameras.from_spherical(elevation, azimuth, torch.full((count,), radius), fovy_deg, size)


def _scene(tmp_path, count: int = 24, size: int = 48, seed: int = 3, z_up: bool = False):
    """A rendered primitive object as transforms.json; ``z_up`` writes the same views in a Blender-style
    +Z-up world ((x, y, z) -> (x, -z, y)), as NeRF-synthetic scenes are."""
    obj = random_object(seed)
    cameras = _orbit_cameras(count, size)
    rgba = render_object(obj, cameras, supersample=2)["rgba"]
    written = cameras
    if z_up:
        to_z_up = torch.eye(4)
        to_z_up[:3, :3] = torch.from_numpy(EXPORT_ROTATIONS["+z"].T).float()
        written = Cameras(to_z_up @ cameras.c2w, cameras.fovy, cameras.height, cameras.width)
    path = write_transforms(tmp_path / "scene" / "transforms.json", rgba, written)
    return obj, cameras, rgba, path


def test_transforms_round_trip(tmp_path):
    cameras = _orbit_cameras(5, 40)
    cameras = Cameras(cameras.c2w, cameras.fovy, 32, 40)  # non-square: fovx != fovy
    images = torch.rand(5, 32, 40, 4, generator=torch.Generator().manual_seed(0))
    path = write_transforms(tmp_path / "transforms.json", images, cameras)
    data = json.loads(path.read_text())
    assert data["frames"][0]["file_path"] == "./images/r_0"
    expected_fovx = 2 * math.atan(math.tan(0.5 * float(cameras.fovy[0])) * 40 / 32)
    assert data["camera_angle_x"] == pytest.approx(expected_fovx)
    views = read_transforms(path)
    assert views.images.shape == (5, 32, 40, 4) and views.cameras.height == 32 and views.cameras.width == 40
    assert torch.allclose(views.cameras.c2w, cameras.c2w, atol=1e-6)
    assert torch.allclose(views.cameras.fovy, cameras.fovy, atol=1e-6)
    assert (views.images - images).abs().max() <= 0.5 / 255 + 1e-6
    # Folder + split (NeRF-synthetic layout) and instant-NGP focal lengths.
    data.pop("camera_angle_x")
    data["fl_x"] = 20.0 / math.tan(0.5 * expected_fovx)
    (tmp_path / "transforms_val.json").write_text(json.dumps(data))
    val = read_transforms(tmp_path, "val")
    assert torch.allclose(val.cameras.fovy, cameras.fovy, atol=1e-5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("frames"), "no 'frames'"),
        (lambda d: d.pop("camera_angle_x"), "missing 'camera_angle_x'"),
        (lambda d: d["frames"][1].pop("transform_matrix"), "frame 1 has no 'transform_matrix'"),
        (lambda d: d["frames"][0].pop("file_path"), "frame 0 has no 'file_path'"),
        (lambda d: d["frames"][0].update(file_path="./images/nope"), "image './images/nope' not found"),
        (lambda d: d["frames"][0].update(transform_matrix=[[1, 0], [0, 1]]), "4x4"),
    ],
)
def test_transforms_errors_name_the_file(tmp_path, edit, message):
    cameras = _orbit_cameras(2, 32)
    path = write_transforms(tmp_path / "transforms.json", torch.rand(2, 32, 32, 4), cameras)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message) as info:
        read_transforms(path)
    assert "transforms.json" in str(info.value)
    with pytest.raises(InputError, match="not found"):
        read_transforms(tmp_path / "missing.json")


def test_estimate_scene_finds_the_target():
    target = torch.tensor([0.5, -0.2, 1.0])
    base = _orbit_cameras(12, 32, radius=4.0, fovy_deg=40.0)
    c2w = base.c2w.clone()
    c2w[:, :3, 3] += target
    center, radius = estimate_scene(Cameras(c2w, base.fovy, 32, 32))
    assert torch.allclose(center, target, atol=1e-4)
    assert radius == pytest.approx(4.0 * math.tan(math.radians(20.0)), rel=1e-4)


def test_held_out_split(tmp_path):
    cameras = _orbit_cameras(10, 32)
    path = write_transforms(tmp_path / "transforms.json", torch.rand(10, 32, 32, 4), cameras)
    views = load_views(path, resolve(FitViewsConfig, {"holdout_fraction": 0.2}))
    assert len(views.train) == 8 and len(views.held_out) == 2
    assert not set(views.train.paths) & set(views.held_out.paths)
    assert load_views(path, resolve(FitViewsConfig, {"holdout_fraction": 0.0})).held_out is None
    write_transforms(tmp_path / "transforms_test.json", torch.rand(3, 32, 32, 4), cameras[:3], image_folder="test")
    views = load_views(path, resolve(FitViewsConfig, {"max_eval_views": 2}))
    assert len(views.train) == 10 and len(views.held_out) == 2
    assert all(p.parent.name == "test" for p in views.held_out.paths)


def test_resume_continues_bit_exactly(tmp_path, monkeypatch):
    _, _, _, path = _scene(tmp_path, count=6, size=32)
    common = ["fit-views", str(path), "--device", "cpu", "--no-export", "--quiet", "--steps", "6"]
    common += _sets(TINY + ["rays_per_batch=64", "eval_every=3", "checkpoint_every=3"])
    assert main([*common, "-o", str(tmp_path / "straight")]) == 0

    real_step = FitViewsTrainer.train_step

    def interrupted_step(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(FitViewsTrainer, "train_step", interrupted_step)
    assert main([*common, "-o", str(tmp_path / "split")]) == 130
    monkeypatch.setattr(FitViewsTrainer, "train_step", real_step)
    run = RunDir.open(tmp_path / "split")
    assert run.read_progress()["status"] == "interrupted" and load_latest(run).step == 3
    # Without --resume an existing run is refused.
    assert main([*common, "-o", str(tmp_path / "split")]) == 2
    assert main([*common, "-o", str(tmp_path / "split"), "--resume"]) == 0
    straight = load_latest(RunDir.open(tmp_path / "straight"))
    split = load_latest(run)
    assert straight.step == split.step == 6
    for key, value in straight.modules["field"].items():
        assert torch.equal(value, split.modules["field"][key]), key
    assert run.is_finished and (run.previews / "step_000003.png").is_file() and (run.root / "metrics.json").is_file()
    meta = run.read_meta()
    assert meta["metrics"]["step"] == 6 and "fit views" in meta["timings_s"]
    assert run.read_config()["scene"]["scale"] > 0
    # A finished run can be extended; its saved config (the tiny field) is reused without --set.
    extend = ["fit-views", str(path), "--device", "cpu", "--no-export", "--quiet", "--steps", "8", "--resume"]
    assert main([*extend, "-o", str(tmp_path / "split")]) == 0
    assert load_latest(run).step == 8 and run.read_config()["steps"] == 8


@pytest.mark.slow
def test_fit_views_end_to_end(tmp_path):
    """Fits 22 views of a primitive object; checks held-out PSNR and Chamfer distance of the exported mesh.

    Measured on the CPU: after 400 steps PSNR ~22.9 dB and Chamfer ~0.019;
    the unfitted field (step 0) gives ~13.5 dB and ~0.059. The object fits
    in a sphere of radius 0.55.
    """
    import trimesh

    from recon.metrics import chamfer_distance

    obj, _, _, path = _scene(tmp_path)
    truth, _ = obj.sample_surface(5000, seed=1)
    results = {}
    for name, steps in (("unfitted", 0), ("fitted", 400)):
        out = tmp_path / name
        args = ["fit-views", str(path), "-o", str(out), "--device", "cpu", "--steps", str(steps), "--quiet"]
        assert main([*args, *_sets(TINY + ["eval_every=0", "checkpoint_every=200"])]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        mesh = trimesh.load(out / "exports" / "mesh.glb", force="mesh")
        samples = torch.as_tensor(mesh.sample(5000, seed=0))
        results[name] = (metrics["psnr"], chamfer_distance(samples, truth))
    psnr_fit, chamfer_fit = results["fitted"]
    psnr_raw, chamfer_raw = results["unfitted"]
    assert psnr_fit > 19.0 and chamfer_fit < 0.035, results
    # The unfitted field's blob is closer since exports fill and carve (0.059 measured): fitting must halve it.
    assert psnr_raw < 19.0 and chamfer_raw > 2.0 * chamfer_fit, results
    run = RunDir.open(tmp_path / "fitted")
    assert run.is_finished and (run.exports / "mesh.obj").is_file()
    assert sorted(p.name for p in run.previews.iterdir()) == ["step_000400.png"]


@pytest.mark.slow
def test_z_up_capture_exports_upright(tmp_path):
    """The same views written in a +Z-up world: the exported mesh comes out +Y up, on the true surface."""
    import trimesh

    from recon.metrics import chamfer_distance

    obj, _, _, path = _scene(tmp_path, z_up=True)
    truth, _ = obj.sample_surface(5000, seed=1)  # recon's +Y-up frame = the files' frame
    out = tmp_path / "run"
    args = ["fit-views", str(path), "-o", str(out), "--device", "cpu", "--steps", "400", "--quiet"]
    assert main([*args, *_sets(TINY + ["eval_every=0", "checkpoint_every=400", "export.formats=[glb]"])]) == 0
    assert RunDir.open(out).read_config()["export"]["up_axis"] == "+z"
    mesh = trimesh.load(out / "exports" / "mesh.glb", force="mesh")
    assert chamfer_distance(torch.as_tensor(mesh.sample(5000, seed=0)), truth) < 0.035  # 0.017 measured; unfitted 0.059


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_views_nerfacc_sampler_on_cuda(tmp_path):
    """The occupancy-grid (nerfacc) path trains, checkpoints and resumes the grid state on the GPU."""
    pytest.importorskip("nerfacc")
    _, _, _, path = _scene(tmp_path, count=16, size=48)
    args = ["fit-views", str(path), "-o", str(tmp_path / "run"), "--device", "cuda", "--steps", "300", "--no-export", "--quiet"]
    overrides = [item for item in TINY if not item.startswith("renderer.") and "backend" not in item]
    assert main([*args, *_sets(overrides + ["renderer.sampler=nerfacc", "eval_every=0", "checkpoint_every=0"])]) == 0
    run = RunDir.open(tmp_path / "run")
    assert json.loads((run.root / "metrics.json").read_text())["psnr"] > 19.0
    checkpoint = load_latest(run)
    assert any(key.startswith("occupancy.") for key in checkpoint.modules["renderer"])


def test_export_up_axis_is_taken_from_the_cameras_unless_set():
    from dataclasses import replace

    from recon.cameras import orbit
    from recon.systems.fit_views import resolve_scene

    y_up = orbit(6, 25.0, 4.0, 40.0, 32)
    # The same rig in a Blender-style Z-up world (x, y, z) -> (x, -z, y).
    to_z_up = torch.eye(4)
    to_z_up[:3, :3] = torch.from_numpy(EXPORT_ROTATIONS["+z"].T).float()
    z_up = Cameras(to_z_up @ y_up.c2w, y_up.fovy, y_up.height, y_up.width)
    cfg = FitViewsConfig()
    assert cfg.export.up_axis == "auto"
    assert resolve_scene(cfg, y_up).export.up_axis == "+y"
    assert resolve_scene(cfg, z_up).export.up_axis == "+z"
    fixed = replace(cfg, export=replace(cfg.export, up_axis="+y"))
    assert resolve_scene(fixed, z_up).export.up_axis == "+y"


def test_recon_export_bakes_from_the_photos_of_the_runs_own_dataset_only(tmp_path, capsys):
    _, _, _, path = _scene(tmp_path, count=8, size=32)
    out = tmp_path / "run"
    args = ["fit-views", str(path), "-o", str(out), "--device", "cpu", "--steps", "0", "--no-export", "--quiet"]
    assert main([*args, *_sets(TINY + ["eval_every=0", "holdout_fraction=0.25"])]) == 0
    capsys.readouterr()

    assert main(["export", str(out), "--device", "cpu", "--photos", str(path.parent), "-o", str(tmp_path / "photos")]) == 0
    report = RunDir.open(out).read_meta()["exports"]["mesh"]
    assert report["photo_coverage"] > 0.5  # the unfitted blob is seen by most of the 6 training views

    assert main(["export", str(out), "--device", "cpu", "-o", str(tmp_path / "field")]) == 0
    assert "--photos DATASET" in capsys.readouterr().err
    assert "photo_coverage" not in RunDir.open(out).read_meta()["exports"]["mesh"]

    other = _scene(tmp_path / "other", count=12, size=32)[3]
    assert main(["export", str(out), "--device", "cpu", "--photos", str(other), "-o", str(tmp_path / "wrong")]) != 0
    err = capsys.readouterr().err
    assert f"{other}: its training views are not those run {out} was fitted to" in " ".join(err.split())
    assert "Traceback" not in err and not (tmp_path / "wrong").exists()
