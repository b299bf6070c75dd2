"""`recon fit`: losses, configs and presets, an end-to-end CPU run, preprocessing routes, missing weights, NaN losses.

End-to-end runs use the `cpu` preset shrunk further with --set (TINY) and the
random-tiny guidance model, loaded once per test module (see `shared_models`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
import yaml
from PIL import Image

from recon.cameras import generate_rays
from recon.cli.main import main
from recon.config import preset_names, presets_folder, read_preset, to_plain
from recon.systems import losses
from recon.systems.fit import Trainer, resolve_config, scale_steps

TINY = [
    "field.encoding.n_levels=4",
    "field.encoding.log2_hashmap_size=12",
    "field.mlp_width=16",
    "renderer.samples_per_ray=12",
    "preprocess.size=32",
    "guidance.vae_grad_resolution=32",
    "stages.coarse.steps=3",
    "stages.coarse.resolution=16",
    "stages.coarse.batch_size=2",
    "stages.coarse.reference_resolution=16",
    "stages.coarse.active_levels=[0,2,4,2]",
    "stages.fine.steps=3",
    "stages.fine.resolution=16",
    "stages.fine.reference_resolution=24",
    "stages.fine.normal_points=64",
    "stages.fine.weights.normal_smooth_2d=8.0",
    "stages.fine.weights.normal_smooth_3d=8.0",
    "checkpoint_every=2",
    "preview_every=2",
    "preview_resolution=16",
    "export.mc_resolution=32",
    "export.texture_resolution=32",
    "export.target_faces=2000",
    "export.turntable_frames=3",
    "export.turntable_resolution=16",
]
"""The cpu preset shrunk to seconds: 3 + 3 steps at 16-24 px."""


def make_rgba(path: Path, size: int = 48) -> Path:
    """A coloured disc on a transparent background."""
    y, x = np.mgrid[:size, :size]
    inside = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size * 0.3) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, (x * 255 // size), 60
    rgba[..., 3] = inside * 255
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def make_rgb(path: Path, size: int = 64) -> Path:
    """A dark square on a flat light background, no alpha channel."""
    rgb = np.full((size, size, 3), 235, np.uint8)
    rgb[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = (150, 40, 30)
    Image.fromarray(rgb, "RGB").save(path)
    return path


@pytest.fixture(scope="module")
def shared_models():
    """Loads each guidance model once for the module (recon.fit loads per call otherwise)."""
    from recon.guidance import checkpoints

    loaded: dict = {}
    original = checkpoints.load_zero123

    def cached(spec, device="cpu", dtype=None, **kwargs):
        key = (str(spec), str(device), dtype, tuple(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = original(spec, device, dtype, **kwargs)
        return loaded[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoints, "load_zero123", cached)
    yield loaded
    mp.undo()


def fit_args(image: Path, out: Path, *extra: str) -> list[str]:
    """`recon fit` arguments for a TINY cpu run with random-tiny weights."""
    args = ["fit", str(image), "-o", str(out), "--preset", "cpu", "--model", "random-tiny", "--device", "cpu", "--quiet"]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


# ------------------------------------------------------------------ losses
def test_mask_losses_match_their_formulas():
    opacity = torch.tensor([0.2, 0.9, 0.5]).view(1, 1, 3, 1)
    mask = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1)
    assert losses.mask_loss(opacity, mask, "mse").item() == pytest.approx((0.04 + 0.01 + 0.25) / 3)
    bce = -(math.log(0.8) + math.log(0.9) + math.log(0.5)) / 3
    assert losses.mask_loss(opacity, mask, "bce").item() == pytest.approx(bce, rel=1e-5)
    with pytest.raises(ValueError):
        losses.mask_loss(opacity, mask, "l1")


def test_opacity_entropy_peaks_at_one_half_and_pushes_away_from_it():
    o = torch.tensor([0.3, 0.5, 0.999]).view(1, 1, 3, 1).requires_grad_(True)
    per_ray = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.3, 0.5, 0.999)]
    loss = losses.opacity_entropy(o)
    assert loss.item() == pytest.approx(sum(per_ray) / 3, rel=1e-5)
    loss.backward()
    assert o.grad[0, 0, 0, 0] > 0  # below 1/2: descent lowers the opacity
    assert o.grad[0, 0, 1, 0].abs() < 1e-6
    assert o.grad[0, 0, 2, 0] < 0


def test_sparsity_and_orientation_reduce_as_documented():
    o = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1)
    assert losses.sparsity(o).item() == pytest.approx((math.sqrt(0.01) + math.sqrt(1.01)) / 2)
    orient = torch.tensor([0.0, 0.5, 1.5, 2.0]).view(1, 2, 2, 1)
    assert losses.orientation(orient).item() == pytest.approx(1.0)


def test_normal_smoothness_2d_is_zero_for_a_flat_map_and_positive_for_an_edge():
    flat = torch.zeros(1, 4, 4, 3)
    flat[..., 2] = 1.0
    assert losses.normal_smoothness_2d(flat).item() == 0.0
    edge = flat.clone()
    edge[:, :, 2:] = torch.tensor([1.0, 0.0, 0.0])
    # 4 of 12 horizontal neighbour pairs differ by (1, 0, -1): squared sum 2 per pair, mean over 3 channels
    assert losses.normal_smoothness_2d(edge).item() == pytest.approx(4 * 2 / (12 * 3))


def test_normal_smoothness_3d_with_finite_differences_of_its_gradient():
    def radial(p):
        return p / p.norm(dim=-1, keepdim=True)

    points = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.4, 0.1]])
    gen = torch.Generator().manual_seed(0)
    constant = losses.normal_smoothness_3d(lambda p: torch.ones_like(p), points, 0.05, gen)
    assert constant.item() == 0.0
    scale = torch.tensor(1.0, requires_grad=True)
    value = losses.normal_smoothness_3d(lambda p: radial(p) * scale, points, 0.05, torch.Generator().manual_seed(1))
    assert value.item() > 0
    value.backward()
    h = 1e-3
    plus = losses.normal_smoothness_3d(lambda p: radial(p) * (1 + h), points, 0.05, torch.Generator().manual_seed(1))
    minus = losses.normal_smoothness_3d(lambda p: radial(p) * (1 - h), points, 0.05, torch.Generator().manual_seed(1))
    assert scale.grad.item() == pytest.approx((plus - minus).item() / (2 * h), rel=1e-3)
    assert losses.normal_smoothness_3d(radial, points[:0], 0.05).item() == 0.0


def test_surface_points_are_depth_along_rays_over_opacity():
    origins = torch.zeros(1, 1, 2, 3)
    directions = torch.tensor([[[[0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]]])
    depth = torch.tensor([[[[1.5], [0.1]]]])  # weighted depth sum(w t), opacity 0.5 -> t = 3
    opacity = torch.tensor([[[[0.5], [0.2]]]])
    points, weights = losses.surface_points(origins, directions, depth, opacity, count=10, threshold=0.4)
    assert torch.allclose(points, torch.tensor([[0.0, 0.0, -3.0]])) and weights.tolist() == [1.0]
    padded, weights = losses.surface_points(origins, directions, depth, opacity, count=10, threshold=0.4, fixed_shape=True)
    assert padded.shape == (10, 3) and weights.tolist() == [1.0] + [0.0] * 9
    assert torch.equal(padded[:1], points)


@pytest.mark.parametrize("opaque", [0, 7, 20, 500])
def test_surface_points_stride_over_the_opaque_rays_with_or_without_fixed_shapes(opaque):
    rays = 600
    gen = torch.Generator().manual_seed(opaque)
    origins, directions = torch.randn(rays, 3, generator=gen), torch.randn(rays, 3, generator=gen)
    opacity = torch.rand(rays, 1, generator=gen) * 0.4
    chosen = torch.randperm(rays, generator=gen)[:opaque]
    opacity[chosen] = 0.6 + 0.4 * torch.rand(opaque, 1, generator=gen)
    depth = torch.rand(rays, 1, generator=gen) * opacity
    count = 20
    points, weights = losses.surface_points(origins, directions, depth, opacity, count=count, fixed_shape=True)
    assert points.shape == (count, 3) and weights.shape == (count,)
    # the evenly strided opaque rays (all of them when there are at most `count`), then weight-0 fillers
    keep = torch.nonzero(opacity[:, 0] > 0.5).squeeze(-1)
    if keep.numel() > count:
        keep = keep[torch.linspace(0, keep.numel() - 1, count).long()]
    expected = origins[keep] + directions[keep] * (depth[keep] / opacity[keep])
    used = min(opaque, count)
    assert weights.tolist() == [1.0] * used + [0.0] * (count - used)
    assert torch.allclose(points[:used], expected, atol=1e-6)
    compact, compact_weights = losses.surface_points(origins, directions, depth, opacity, count=count, fixed_shape=False)
    assert torch.equal(compact, points[:used]) and compact_weights.tolist() == [1.0] * used


def test_normal_smoothness_3d_counts_only_weighted_points():
    def radial(p):
        return p / p.norm(dim=-1, keepdim=True)

    points = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.4, 0.1], [0.3, 0.3, 0.3]])
    alone = losses.normal_smoothness_3d(radial, points[:2], 0.05, torch.Generator().manual_seed(3))
    # the same draws for the first two points (jitter is drawn row by row), the third point weighted out
    weighted = losses.normal_smoothness_3d(radial, points, 0.05, torch.Generator().manual_seed(3), torch.tensor([1.0, 1.0, 0.0]))
    assert weighted.item() == pytest.approx(alone.item(), rel=1e-6)
    nothing = losses.normal_smoothness_3d(radial, points, 0.05, torch.Generator().manual_seed(3), torch.zeros(3))
    assert nothing.item() == 0.0


# ------------------------------------------------------------------ configs
def test_presets_have_descriptions_and_resolve():
    from recon.api import build_config

    assert {"default", "fast", "cpu"} <= set(preset_names())
    for name in ("default", "fast", "cpu"):
        text = (presets_folder() / f"{name}.yaml").read_text()
        assert yaml.safe_load(text)["description"].strip()
        assert "description" not in read_preset(name)
        cfg = build_config(name)
        assert resolve_config(yaml.safe_load(yaml.safe_dump(to_plain(cfg)))) == cfg
    default, fast, cpu = (build_config(n) for n in ("default", "fast", "cpu"))
    assert fast.total_steps < default.total_steps
    assert cpu.field.encoding.n_levels < default.field.encoding.n_levels
    assert cpu.stages["fine"].sizes(0)[0] < default.stages["fine"].sizes(0)[0]
    assert default.stages["fine"].sizes(0)[:2] == (128, 4) and default.stages["fine"].sizes(399)[:2] == (256, 2)
    assert default.guidance.model == "tiny"


def test_flags_override_set_and_set_overrides_preset():
    from recon.api import build_config
    from recon.errors import ReconError

    cfg = build_config("cpu", ["stages.fine.steps=7", "seed=3", "guidance.model=x"], model="random-tiny", seed=5, formats="glb,obj")
    assert cfg.stages["fine"].steps == 7 and cfg.seed == 5 and cfg.guidance.model == "random-tiny"
    assert cfg.export.formats == ["glb", "obj"]
    with pytest.raises(ReconError, match="stepz"):
        build_config("cpu", ["stages.fine.stepz=1"])
    with pytest.raises(ReconError, match="format"):
        build_config("cpu", formats="glb,fbx")


def test_scale_steps_scales_stages_and_schedules():
    from recon.api import build_config

    cfg = build_config("default")  # 200 + 400 steps, coarse levels [0, 8, 16, 150], guidance ramps end at 200
    scaled = scale_steps(cfg, 300)
    assert [s.steps for s in scaled.stages.values()] == [100, 200]
    assert scaled.stages["coarse"].active_levels == [0, 8, 16, 75]
    assert scaled.guidance.min_step_percent == [0, 0.4, 0.2, 100]
    assert scaled.stages["fine"].weights.normal_smooth_2d == [0, 0.0, 8.0, 50]
    assert scaled.stages["fine"].resolution == {0: 128, 100: 256}


def test_size_schedules_from_the_command_line_are_validated():
    from recon.api import build_config
    from recon.errors import ReconError

    cfg = build_config("cpu", ["stages.fine.resolution={0: 16, 30: 32}", "stages.fine.batch_size=[0, 4, 1, 60]"])
    assert cfg.stages["fine"].sizes(0)[:2] == (16, 4) and cfg.stages["fine"].sizes(59)[:2] == (32, 1)
    # a {step: value} schedule replaces the preset's instead of merging its steps in
    cfg = build_config("default", ["stages.fine.resolution={0: 64, 50: 96}"])
    assert cfg.stages["fine"].resolution == {0: 64, 50: 96}
    assert resolve_config(to_plain(cfg)).stages["fine"].resolution == {0: 64, 50: 96}
    # a preset may add a stage; it starts from the StageConfig defaults
    cfg = resolve_config({"stages": {"refine": {"steps": 5}}})
    assert list(cfg.stages) == ["coarse", "fine", "refine"] and cfg.stages["refine"].lr == 0.01
    with pytest.raises(ReconError, match="stages.fine"):
        build_config("cpu", ["stages.fine.resolution={0: 16, 30: 4}"])


# ------------------------------------------------------------------ end to end
def test_fit_end_to_end_writes_meshes_and_run_files(tmp_path, shared_models, capsys):
    image = make_rgba(tmp_path / "disc.png")
    out = tmp_path / "outputs"
    assert main(fit_args(image, out, "--format", "glb,obj")) == 0
    run = out / "disc"
    exports = run / "exports"

    scene = trimesh.load(exports / "mesh.glb")
    geometry = list(scene.geometry.values()) if isinstance(scene, trimesh.Scene) else [scene]
    assert len(geometry) == 1 and len(geometry[0].faces) > 0
    material = geometry[0].visual.material
    texture = getattr(material, "baseColorTexture", None)
    assert texture is not None and np.asarray(texture).shape[:2] == (32, 32)

    obj = trimesh.load(exports / "mesh.obj", force="mesh")
    assert len(obj.faces) > 0 and obj.visual.uv is not None
    assert obj.visual.material.image is not None
    assert (exports / "mesh.mtl").is_file() and (exports / "mesh_albedo.png").is_file()
    assert any(exports.glob("turntable.*"))
    assert (exports / "SMOKE_TEST_RANDOM_WEIGHTS.txt").is_file()

    cfg = resolve_config(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.guidance.model == "random-tiny" and cfg.stages["fine"].steps == 3 and cfg.export.formats == ["glb", "obj"]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["device"] == "cpu" and meta["random_weights"] is True
    assert {"coarse", "fine", "export", "turntable", "preprocess", "import libraries", "load models"} <= set(meta["timings_s"])
    assert "torch" in meta["versions"] and "peak_gpu_memory_gib" in meta
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "finished" and progress["step"] == progress["total"] == 6
    assert (run / "input.png").is_file() and (run / "input_rgba.png").is_file()
    assert sorted(p.name for p in (run / "previews").iterdir()) == ["step_000002.png", "step_000004.png", "step_000006.png"]
    assert not list(run.rglob(".tmp-*"))
    capsys.readouterr()

    # a finished run is skipped, not redone
    mtime = (exports / "mesh.glb").stat().st_mtime_ns
    assert main(fit_args(image, out)) == 0
    assert (exports / "mesh.glb").stat().st_mtime_ns == mtime


def test_turntable_rendered_alongside_the_export_gives_the_same_files(tmp_path, shared_models, monkeypatch):
    # On CUDA the turntable renders in a thread during the export; on the CPU they run in turn. Both ways, one
    # seed gives the same mesh and the same turntable frames.
    import recon.api
    from recon.exports import turntable

    monkeypatch.setattr(turntable, "ffmpeg_available", lambda: False)  # GIF frames: lossless to compare
    image = make_rgba(tmp_path / "disc.png")
    exports = {}
    for alongside in (False, True):
        monkeypatch.setattr(recon.api, "turntable_alongside_export", lambda device, on=alongside: on)
        out = tmp_path / f"alongside_{alongside}"
        assert main(fit_args(image, out, "--format", "obj")) == 0
        exports[alongside] = out / "disc" / "exports"
        timings = json.loads((out / "disc" / "meta.json").read_text())["timings_s"]
        assert timings["turntable"] >= 0.0 and timings["export"] > 0.0
    sequential, threaded = (Image.open(exports[key] / "turntable.gif") for key in (False, True))
    assert sequential.n_frames == threaded.n_frames == 3
    for frame in range(3):
        sequential.seek(frame)
        threaded.seek(frame)
        np.testing.assert_array_equal(np.asarray(sequential.convert("RGB")), np.asarray(threaded.convert("RGB")))
    assert (exports[False] / "mesh.obj").read_bytes() == (exports[True] / "mesh.obj").read_bytes()


def test_rgb_input_goes_through_background_removal(tmp_path):
    from recon.api import _create_run, build_config, cutout

    image = make_rgb(tmp_path / "photo.png")
    cfg = build_config("cpu", TINY, model="random-tiny")
    run = _create_run(image, cutout(image, cfg), tmp_path / "run", cfg, torch.device("cpu"))
    meta = json.loads(run.meta_path.read_text())
    assert meta["background_method"] in ("rembg", "grabcut")
    alpha = np.asarray(Image.open(run.root / "input_rgba.png"))[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255
    cfg_no_bg = build_config("cpu", TINY, model="random-tiny", remove_bg=False)
    run = _create_run(image, cutout(image, cfg_no_bg), tmp_path / "run2", cfg_no_bg, torch.device("cpu"))
    assert json.loads(run.meta_path.read_text())["background_method"] == "none"


def test_missing_weights_without_model_gives_the_message(tmp_path, capsys, monkeypatch):
    from recon.guidance import checkpoints

    # an installation without the shipped prior (the default --model tiny)
    monkeypatch.setattr(checkpoints, "shipped_prior_path", lambda: tmp_path / "no-prior")
    image = make_rgba(tmp_path / "disc.png")
    out = tmp_path / "outputs"
    code = main(["fit", str(image), "-o", str(out), "--preset", "cpu", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 3
    assert "--model random-tiny" in " ".join(err.split())
    assert not (out / "disc").exists()  # nothing half-made


def nan_loss_once_at(monkeypatch, step: int) -> None:
    """Makes the trainer's loss NaN at global ``step``, once (as a divergence would)."""
    original = Trainer.losses
    fired = []

    def losses(self, stage, local_step):
        loss, terms = original(self, stage, local_step)
        if self.step == step and not fired:
            fired.append(step)
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(Trainer, "losses", losses)


def test_nan_loss_stops_with_a_message_and_exports_nothing(tmp_path, shared_models, capsys, monkeypatch):
    image = make_rgba(tmp_path / "disc.png")
    out = tmp_path / "outputs"
    nan_loss_once_at(monkeypatch, 2)
    code = main(fit_args(image, out, "--set", "nan_policy=stop"))
    err = " ".join(capsys.readouterr().err.split())
    assert code == 4 and "NaN" in err and "step 2" in err and "without exporting" in err
    run = out / "disc"
    assert not any((run / "exports").iterdir())
    assert json.loads((run / "progress.json").read_text())["status"] == "failed"


def test_nan_loss_rolls_back_to_the_last_checkpoint_and_finishes(tmp_path, shared_models, monkeypatch):
    from recon.api import fit

    image = make_rgba(tmp_path / "disc.png")
    nan_loss_once_at(monkeypatch, 3)
    overrides = [*TINY, "turntable=false", "preview_every=0"]
    results = fit(image, tmp_path / "out", "cpu", overrides, model="random-tiny", formats="ply", device="cpu", quiet=True)
    assert results[0].status == "finished" and "ply" in results[0].exports
    meta = json.loads((results[0].run_dir / "meta.json").read_text())
    assert meta["rollbacks"] == 1 and meta["final_step"] == 6
    assert all(math.isfinite(v) for v in meta["final_losses"].values())


def test_steps_are_read_one_step_late_and_always_before_a_save(tmp_path, monkeypatch):
    """Each step's loss is read after the next step is queued (the device works while the host goes on), except
    where a preview or checkpoint follows: then at once, so nothing saved comes from an unread step."""
    from recon.systems.fit import QueuedStep

    trainer, _ = make_trainer(tmp_path, "stages.coarse.steps=5", "stages.fine.steps=3", "checkpoint_every=4", "preview_every=0")
    events = []
    queue, read = trainer.train_step, QueuedStep.read

    def logged_queue(*args):
        events.append(("queue", trainer.step))
        return queue(*args)

    def logged_read(self):
        events.append(("read", self.step))
        return read(self)

    monkeypatch.setattr(trainer, "train_step", logged_queue)
    monkeypatch.setattr(QueuedStep, "read", logged_read)
    monkeypatch.setattr(trainer, "save", lambda stage: events.append(("save", trainer.step)))
    trainer.fit()
    # a rollback target at 0; steps 0-4 coarse (saves at 4 and at the stage end, 5), 5-7 fine (its end: 8)
    assert events == [
        ("save", 0), ("queue", 0), ("queue", 1), ("read", 0), ("queue", 2), ("read", 1), ("queue", 3), ("read", 2), ("read", 3), ("save", 4),
        ("queue", 4), ("read", 4), ("save", 5),
        ("queue", 5), ("queue", 6), ("read", 5), ("queue", 7), ("read", 6), ("read", 7), ("save", 8),
    ]  # fmt: skip
    assert all(math.isfinite(v) for v in trainer.last_losses.values()) and math.isfinite(trainer.last_loss)


def test_a_nan_step_right_before_a_checkpoint_is_rolled_back_not_saved(tmp_path, shared_models, monkeypatch):
    from recon.api import fit
    from recon.runs import RunDir
    from recon.systems.checkpoint import list_checkpoints, load_checkpoint

    image = make_rgba(tmp_path / "disc.png")
    nan_loss_once_at(monkeypatch, 1)  # read together with the save at step 2, before it
    overrides = [*TINY, "turntable=false", "preview_every=0", "checkpoint_every=2", "keep_checkpoints=10"]
    results = fit(image, tmp_path / "out", "cpu", overrides, model="random-tiny", formats="ply", device="cpu", quiet=True)
    assert results[0].status == "finished"
    meta = json.loads((results[0].run_dir / "meta.json").read_text())
    assert meta["rollbacks"] == 1 and meta["final_step"] == 6
    run = RunDir.open(results[0].run_dir)
    saved = list_checkpoints(run)
    assert [step for step, _ in saved] == [0, 2, 3, 4, 6]
    for _, path in saved:
        checkpoint = load_checkpoint(path)
        assert all(torch.isfinite(value).all() for value in checkpoint.modules["field"].values()), path
        assert all(torch.isfinite(state["exp_avg"]).all() for state in checkpoint.optimizers["adam"]["state"].values()), path


def test_public_api_fits_images_one_at_a_time_with_shared_models(tmp_path, monkeypatch):
    import recon
    from recon.guidance import interface
    from recon.runtime import resolve_device

    built = []
    original = interface.make_guidance
    monkeypatch.setattr(interface, "make_guidance", lambda cfg, device, **kwargs: built.append(cfg.model) or original(cfg, device, **kwargs))
    models = recon.Models(resolve_device("cpu"))
    cfg = recon.build_config("cpu", [*TINY, "turntable=false", "preview_every=0"], model="random-tiny", formats="ply")
    for name in ("a", "b"):
        outcome = recon.fit_image(make_rgba(tmp_path / f"{name}.png"), tmp_path / name, cfg, models.device, models)
        assert outcome["exports"]["ply"].is_file()
    assert built == ["random-tiny"]


# ------------------------------------------------------------------ the trainer with a fake guidance
class FakeGuidance:
    """Stands in for guidance.interface.Zero123Guidance: a differentiable 'SDS' that pulls renders towards grey."""

    def __init__(self):
        self.calls = []

    def sds(self, images, elevation_deg, azimuth_deg, radius, step):
        from recon.guidance.sds import SDSOutput

        self.calls.append((tuple(images.shape), step))
        return SDSOutput(loss=((images - 0.5) ** 2).mean(), diagnostics={})


def make_trainer(tmp_path, *overrides):
    from recon.api import build_config
    from recon.preprocess import ReferenceView
    from recon.runs import RunDir
    from recon.systems.fit import Trainer

    cfg = build_config("cpu", [*TINY, *overrides])
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    alpha = ((x**2 + y**2) < 0.3).float()
    rgba = torch.stack([0.8 * torch.ones_like(x), 0.3 + 0.2 * x, 0.2 * torch.ones_like(x), alpha])
    reference = ReferenceView(rgba=rgba, source=tmp_path / "synthetic.png")
    run = RunDir.create(tmp_path / "run", to_plain(cfg))
    guidance = FakeGuidance()
    return Trainer(cfg, guidance, reference, run, torch.device("cpu")), guidance


def test_reference_losses_fall_and_levels_open_coarse_to_fine(tmp_path):
    trainer, guidance = make_trainer(
        tmp_path, "stages.coarse.steps=16", "stages.fine.steps=2", "stages.coarse.active_levels=[0,1,4,12]", "preview_every=0"
    )
    coarse = trainer.cfg.stages["coarse"]
    first, _ = trainer.losses(coarse, 0)
    levels = []
    for step in range(16):
        trainer.train_step("coarse", coarse, step)
        levels.append(trainer.field.encoding.active_levels)
        trainer.step += 1
    last, terms = trainer.losses(coarse, 15)
    assert last.item() < 0.7 * first.item()
    assert levels[0] == 1 and levels[6] == 2 and levels[-1] == 4 and levels == sorted(levels)
    assert {"rgb", "mask", "sds", "opacity"} <= set(terms)
    assert guidance.calls[0] == ((2, 3, 16, 16), 0)  # coarse: 2 views of 16 px, the global step


def test_out_of_memory_names_the_knobs(tmp_path, monkeypatch):
    from recon.errors import ReconError

    trainer, _ = make_trainer(tmp_path)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer, "losses", oom)
    with pytest.raises(ReconError, match=r"out of GPU memory in stage 'fine'.*stages\.fine\.batch_size=1.*--preset fast"):
        trainer.train_step("fine", trainer.cfg.stages["fine"], 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_with_mixed_precision(tmp_path, shared_models):
    image = make_rgba(tmp_path / "disc.png")
    out = tmp_path / "outputs"
    args = fit_args(image, out, "--format", "glb", "--set", "mixed_precision=true")
    args[args.index("--device") + 1] = "cuda"
    assert main(args) == 0
    meta = json.loads((out / "disc" / "meta.json").read_text())
    assert meta["device"].startswith("cuda") and meta["peak_gpu_memory_gib"] > 0
    assert (out / "disc" / "exports" / "mesh.glb").is_file()


def test_a_fit_that_fails_mid_stage_leaves_no_checkpoint_write_in_flight(tmp_path, monkeypatch):
    """Checkpoints are written in the background; an error that stops the fit waits for the write in flight (so
    the caller may at once replace the run folder) and is the error the caller sees."""
    from recon.systems import checkpoint

    trainer, _ = make_trainer(tmp_path, "stages.coarse.steps=4", "stages.fine.steps=2", "checkpoint_every=2", "preview_every=0")
    original = trainer.train_step

    def fail_after_the_save(stage_name, stage, local_step):
        if trainer.step == 3:
            raise RuntimeError("simulated failure after the save of step 2")
        return original(stage_name, stage, local_step)

    monkeypatch.setattr(trainer, "train_step", fail_after_the_save)
    slow_write = checkpoint._write_file

    def slow(*args, **kwargs):
        import time

        time.sleep(0.3)
        return slow_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_write_file", slow)
    with pytest.raises(RuntimeError, match="simulated failure"):
        trainer.fit()
    assert checkpoint._WRITER._thread is None  # waited for
    assert (trainer.run.checkpoints / "step_000002.pt").is_file()


def test_normals_for_the_first_views_only(tmp_path):
    # stages.*.normal_views: the field computes normals for the first views' rays only; their maps are the same
    trainer, _ = make_trainer(tmp_path, "renderer.sampler=stratified")
    trainer.renderer.eval()  # no jitter: both renders take the same samples
    cameras, _, _ = trainer.sampler.sample(3, 12, torch.Generator().manual_seed(0))
    reference, views = trainer.reference_rays(16), generate_rays(cameras)
    _, every = trainer.render_views(reference, views, True)
    ref, first = trainer.render_views(reference, views, True, normal_views=1)
    assert first["normal"].shape == every["normal"].shape == (3, 12, 12, 3) and ref["rgb"].shape == (1, 16, 16, 3)
    assert every["normal"][1:].abs().sum() > 0 and (first["normal"][1:] == 0).all() and (first["orientation"][1:] == 0).all()
    for key in ("normal", "orientation"):
        torch.testing.assert_close(first[key][:1], every[key][:1])
    torch.testing.assert_close(first["rgb"], every["rgb"])
    fine = trainer.cfg.stages["fine"]
    fine.batch_size, fine.normal_views = 3, 2
    fine.weights.normal_smooth_2d = fine.weights.orientation = 1.0
    terms = trainer.losses(fine, 0)[1]  # the losses take the 2 views with normals
    assert torch.isfinite(terms["normal_smooth_2d"]) and terms["normal_smooth_2d"] > 0 and terms["orientation"] >= 0
