"""Run folders, checkpoints (round trip, atomicity, weights_only) and metrics."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import recon.systems.checkpoint as checkpoint_module
from recon.config import to_plain
from recon.encoding import HashGridConfig
from recon.errors import InputError, ReconError
from recon.field import FieldConfig, RadianceField
from recon.metrics import chamfer_distance, psnr, ssim
from recon.runs import RunDir, StepReporter
from recon.systems.checkpoint import (
    SceneTransform,
    list_checkpoints,
    load_field_from_run,
    load_latest,
    load_renderer_from_run,
    save_checkpoint,
)

TINY_FIELD = FieldConfig(
    encoding=HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4, backend="torch"), mlp_width=16, mlp_hidden_layers=1
)


def _trained_model(steps: int = 3) -> tuple[nn.Module, torch.optim.Adam]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(torch.randn(16, 3)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def test_run_folder_create_open_meta_progress(tmp_path):
    run = RunDir.create(tmp_path / "run", {"field": {"bound": 1.0}, "steps": 5}, seed=7, device="cpu", command=["recon", "x"])
    assert run.checkpoints.is_dir() and run.previews.is_dir() and run.exports.is_dir()
    meta = run.read_meta()
    assert meta["seed"] == 7 and meta["device"] == "cpu" and meta["command"] == ["recon", "x"]
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0] or meta["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    run.update_meta(timings_s={"a": 1.0}, metrics={"psnr": 20.0})
    run.update_meta(timings_s={"b": 2.0})
    meta = run.read_meta()
    assert meta["timings_s"] == {"a": 1.0, "b": 2.0} and meta["metrics"] == {"psnr": 20.0} and meta["seed"] == 7
    assert not run.is_finished and run.read_progress()["status"] == "created"
    run.write_progress("fit", 5, 5, 0.0, "finished")
    reopened = RunDir.open(tmp_path / "run")
    assert reopened.is_finished and reopened.read_config() == {"field": {"bound": 1.0}, "steps": 5}
    with pytest.raises(ValueError, match="status"):
        run.write_progress("fit", 1, 5, status="bogus")
    with pytest.raises(ReconError, match="already holds a run"):
        RunDir.create(tmp_path / "run", {})
    with pytest.raises(InputError, match="not a run folder"):
        RunDir.open(tmp_path)
    with pytest.raises(InputError, match="not found"):
        RunDir.open(tmp_path / "missing")
    assert not list(tmp_path.rglob(".tmp-*"))


def test_step_reporter_writes_progress(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    with StepReporter(run, "fit", total=10, start_step=2, write_every_s=0.0) as reporter:
        for step in range(3, 7):
            reporter.update(step, "loss 1")
    progress = run.read_progress()
    assert progress["stage"] == "fit" and progress["step"] == 6 and progress["total"] == 10
    assert progress["status"] == "running" and progress["eta_s"] is not None and progress["eta_s"] >= 0
    run.set_status("interrupted")
    assert run.read_progress()["status"] == "interrupted" and run.read_progress()["step"] == 6


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    model, optimizer = _trained_model()
    path = save_checkpoint(run, 3, "coarse", {"model": model}, {"adam": optimizer}, extra={"note": "x", "t": torch.arange(3)})
    assert path.name == "step_000003.pt"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adam_state = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()}
    expected_next = (random.random(), np.random.rand(), torch.rand(4))

    # Change everything, then restore.
    other, other_opt = _trained_model(steps=5)
    random.random(), np.random.rand(), torch.rand(10)
    ckpt = load_latest(run)
    assert ckpt.step == 3 and ckpt.stage == "coarse" and ckpt.extra["note"] == "x"
    assert torch.equal(ckpt.extra["t"], torch.arange(3))
    ckpt.restore({"model": other}, {"adam": other_opt})
    for key, value in other.state_dict().items():
        assert torch.equal(value, weights[key])
    for key, state in other_opt.state_dict()["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, adam_state[key][name])
    got_next = (random.random(), np.random.rand(), torch.rand(4))
    assert got_next[0] == expected_next[0] and got_next[1] == expected_next[1]
    assert torch.equal(got_next[2], expected_next[2])
    with pytest.raises(InputError, match="no state for module 'missing'"):
        ckpt.restore({"missing": other})


def test_checkpoint_is_loaded_with_weights_only(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    # A pickled custom object would execute code on load; weights_only refuses it.
    torch.save({"format": 1, "step": 1, "stage": "s", "modules": {}, "optimizers": {}, "rng": {}, "extra": {"obj": SceneTransform()}},
               run.checkpoints / "step_000001.pt")
    with pytest.raises(InputError, match="unreadable checkpoint"):
        load_latest(run)
    (run.checkpoints / "step_000001.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="step_000001.pt"):
        load_latest(run)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path / "run", {})
    model, optimizer = _trained_model()
    save_checkpoint(run, 10, "fit", {"model": model}, {"adam": optimizer})
    good = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def crashing_save(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as handle:  # half-written file, then the "crash"
            handle.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, 20, "fit", {"model": model}, {"adam": optimizer})
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert [step for step, _ in list_checkpoints(run)] == [10]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000010.pt"]
    # A process killed outright leaves its temporary file; readers ignore it.
    (run.checkpoints / ".tmp-step_000030-abc.pt").write_bytes(b"partial")
    ckpt = load_latest(run)
    assert ckpt.step == 10
    for key, value in ckpt.modules["model"].items():
        assert torch.equal(value, good[key])


def test_keep_last_k(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    model, optimizer = _trained_model(1)
    for step in (100, 200, 300, 1000):
        save_checkpoint(run, step, "fit", {"model": model}, {"adam": optimizer}, keep=2)
    assert [step for step, _ in list_checkpoints(run)] == [300, 1000]
    assert load_latest(run).step == 1000
    assert load_latest(RunDir.create(tmp_path / "empty", {})) is None


def test_load_field_from_run_rebuilds_the_field(tmp_path):
    torch.manual_seed(1)
    field = RadianceField(TINY_FIELD)
    with torch.no_grad():
        field.mlp[-1].bias.add_(0.3)
    field.set_active_levels(2)
    run = RunDir.create(tmp_path / "run", {"field": to_plain(TINY_FIELD), "steps": 1})
    save_checkpoint(run, 1, "coarse", {"field": field})
    loaded, ckpt = load_field_from_run(tmp_path / "run", "cpu")
    assert ckpt.step == 1 and not loaded.training
    points = torch.rand(64, 3) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.density(points), field.density(points))
        assert torch.equal(loaded.albedo(points), field.albedo(points))
    assert loaded.encoding.active_levels == 2

    bare = RunDir.create(tmp_path / "bare", {"steps": 1})
    with pytest.raises(InputError, match="no 'field' key"):
        load_field_from_run(bare)
    empty = RunDir.create(tmp_path / "empty", {"field": to_plain(TINY_FIELD)})
    with pytest.raises(InputError, match="no checkpoint"):
        load_field_from_run(empty)


def test_load_renderer_from_run_restores_the_renderer_config_and_its_occupancy_grid(tmp_path):
    from recon.render import RendererConfig, VolumeRenderer

    torch.manual_seed(2)
    renderer = VolumeRenderer(RadianceField(TINY_FIELD), RendererConfig(sampler="grid", grid_resolution=8)).train()
    renderer.update_occupancy(0)
    grid_state = {k: v for k, v in renderer.state_dict().items() if not k.startswith("field.")}
    config = {"field": to_plain(TINY_FIELD), "renderer": to_plain(RendererConfig(sampler="grid", grid_resolution=8))}
    run = RunDir.create(tmp_path / "run", config)
    save_checkpoint(run, 3, "fine", {"field": renderer.field, "renderer": grid_state})
    loaded, ckpt = load_renderer_from_run(tmp_path / "run", "cpu")
    assert ckpt.step == 3 and not loaded.training and loaded.cfg.sampler == "grid"
    assert torch.equal(loaded.occupancy.estimator.binaries, renderer.occupancy.estimator.binaries)
    assert loaded.occupancy.estimator.binaries.any() and not loaded.occupancy.estimator.binaries.all()
    points = torch.rand(64, 3) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.field.density(points), renderer.field.density(points))


def test_scene_transform_round_trip():
    transform = SceneTransform.from_config({"scene": {"center": [1.0, -2.0, 0.5], "scale": 0.25}})
    points = torch.randn(10, 3)
    assert torch.allclose(transform.to_world(transform.to_field(points)), points, atol=1e-6)
    assert torch.allclose(transform.to_field(torch.tensor([[1.0, -2.0, 0.5]])), torch.zeros(1, 3))
    assert SceneTransform.from_config({}) == SceneTransform()


def test_psnr_ssim_chamfer_values():
    target = torch.full((2, 16, 16, 3), 0.5)
    pred = target + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(pred, target) == pytest.approx(20.0, abs=1e-4)
    assert ssim(target, target) == pytest.approx(1.0, abs=1e-6)
    noisy = (target + 0.2 * torch.randn(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert ssim(noisy, target) < 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(pred, target[:1])

    a = torch.rand(200, 3, generator=torch.Generator().manual_seed(0))
    assert chamfer_distance(a, a) == 0.0
    assert chamfer_distance(a, a + torch.tensor([0.0, 0.0, 5.0])) > 4.0
    # Two single points 0.3 apart: both one-way distances are 0.3.
    assert chamfer_distance(np.zeros((1, 3)), np.array([[0.3, 0.0, 0.0]])) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="points_b"):
        chamfer_distance(a, np.zeros((0, 3)))


def test_meta_json_is_valid_json_after_updates(tmp_path):
    run = RunDir.create(tmp_path / "run", {})
    run.record_timings({"fit": 1.23456})
    assert json.loads(run.meta_path.read_text())["timings_s"]["fit"] == pytest.approx(1.235)
