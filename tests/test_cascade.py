"""Cascade-Zero123: Refiner tokens and poses, cached self-prompted views, the training-free blend."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from guidance_fixtures import tiny_images, tiny_model

from recon.guidance.cascade import (
    Conditions,
    angular_distance_deg,
    bank_poses,
    nearby_poses,
    proximity_weights,
    refiner_tokens,
    training_free_eps,
)
from recon.guidance.config import GuidanceConfig
from recon.guidance.interface import Zero123Guidance
from recon.preprocess import ReferenceView

S45 = math.sqrt(0.5)


def make_reference(size: int = 48) -> ReferenceView:
    rgb = tiny_images(1, size, seed=3)[0]
    return ReferenceView(torch.cat([rgb, torch.ones(1, size, size)]), Path("ref.png"), 0.0, 0.0, 3.8)


def cascade_config(**overrides) -> GuidanceConfig:
    """Cheap cascade settings: 2 DDIM steps, a 2 x 4 bank at elevations 0 and 30, azimuths every 90 deg."""
    settings = {
        "model": "random-tiny", "mode": "cascade", "nearby_steps": 2, "bank_elevations_deg": [0.0, 30.0], "bank_azimuth_step_deg": 90.0,
    }
    settings.update(overrides)
    return GuidanceConfig(**settings)


class CountingModel:
    """Counts eps_cfg calls on a model (the Base's sampling calls)."""

    def __init__(self, model, monkeypatch):
        self.calls = 0
        original = model.eps_cfg

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "eps_cfg", counted)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def conditions(el, az, r=3.8, dim=4):
    n = len(el)
    return Conditions(
        torch.arange(n * dim, dtype=torch.float32).view(n, dim), torch.tensor(el), torch.tensor(az), torch.full((n,), r)
    )


def test_nearby_and_bank_poses():
    el, az, r = nearby_poses(10.0, 20.0, 3.8, [[0, 45, 0], [0, -45, 0], [-30, 0, 0.5]])
    assert el.tolist() == [10.0, 10.0, 40.0]
    assert az.tolist() == [65.0, -25.0, 20.0]
    assert r.tolist() == pytest.approx([3.8, 3.8, 4.3])
    el, az, r = bank_poses([0.0, 30.0], 90.0, 10.0, 3.8)
    assert el.tolist() == [0, 0, 0, 0, 30, 30, 30, 30]
    assert az.tolist() == [10, 100, 190, 280] * 2


def test_refiner_tokens_have_the_right_relative_poses():
    inputs = conditions([0.0], [0.0])
    nearby = conditions([0.0, 0.0, 30.0], [45.0, -45.0, 0.0])
    bank = conditions([0.0, 0.0, 0.0, 0.0, 30.0], [0.0, 90.0, 180.0, 270.0, 90.0])
    target = (torch.tensor([0.0, 25.0]), torch.tensor([90.0, 100.0]), torch.tensor([3.8, 4.8]))
    embeds, poses = refiner_tokens(target, inputs, nearby, bank, "zero123")
    assert embeds.shape == (2, 5, 4) and poses.shape == (2, 5, 4)
    # target 0: (0, 90, 3.8)
    expected = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0],  # input (0, 0) -> 90 deg turn
            [0.0, 0.0, 1.0, 0.0],  # nearest bank view is exactly the target
            [0.0, S45, S45, 0.0],  # nearby +45 -> 45 deg to go
            [0.0, S45, -S45, 0.0],  # nearby -45 -> 135 deg to go
            [math.radians(30.0), 1.0, 0.0, 0.0],  # from 30 deg above: polar grows by 30 deg
        ]
    )
    torch.testing.assert_close(poses[0], expected, atol=1e-6, rtol=0)
    # target 1: (25, 100, 4.8): nearest bank view is (30, 90) (index 4)
    torch.testing.assert_close(embeds[1, 1], bank.clip[4])
    torch.testing.assert_close(
        poses[1, 1],
        torch.tensor([math.radians(5.0), math.sin(math.radians(10)), math.cos(math.radians(10)), 1.0]),
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(embeds[:, 0], inputs.clip.expand(2, -1))
    torch.testing.assert_close(embeds[:, 2:], nearby.clip[None].expand(2, -1, -1))
    embeds, poses = refiner_tokens(target, inputs, nearby, None, "zero123")
    assert embeds.shape == (2, 4, 4)
    torch.testing.assert_close(poses[0], expected[[0, 2, 3, 4]], atol=1e-6, rtol=0)
    # Stable-Zero123: 4th element = the condition's absolute polar angle
    _, poses = refiner_tokens(target, inputs, nearby, None, "stable-zero123")
    assert poses[0, :, 3].tolist() == pytest.approx([math.pi / 2, math.pi / 2, math.pi / 2, math.radians(60.0)])


@pytest.mark.parametrize(("coarse", "tokens"), [("bank", 5), ("none", 4)])
def test_guidance_refiner_context(model, coarse, tokens):
    g = Zero123Guidance(cascade_config(coarse_target=coarse), model)
    g.prepare(make_reference())
    assert len(g.nearby_views) == 3 and (g.bank_views is None) == (coarse == "none")
    target = (torch.tensor([30.0, 0.0]), torch.tensor([0.0, 45.0]), torch.tensor([3.8, 3.8]))
    context = g.context(target)
    assert context.shape == (2, tokens, model.context_dim)
    with torch.no_grad():
        # token 0 = input image with T(input -> target); last = the 30-deg-higher nearby view
        ref = torch.nn.functional.interpolate(make_reference().rgb_over()[None], size=(64, 64), mode="bilinear", antialias=True)
        first = model.context(model.clip_embed(ref), torch.tensor([[-math.pi / 6, 0.0, 1.0, 0.0]]))
        last = model.context(model.clip_embed(g.nearby_views.images[2:3]), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(context[0, 0], first[0, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(context[0, -1], last[0, 0], rtol=1e-4, atol=1e-5)
    if coarse == "bank":
        # target (30, 0) is on the bank grid: the coarse token is that bank view with the identity pose
        index = 4  # elevation 30, azimuth 0
        assert g.bank_views.elevation_deg[index] == 30.0 and g.bank_views.azimuth_deg[index] == 0.0
        with torch.no_grad():
            coarse_token = model.context(
                model.clip_embed(g.bank_views.images[index : index + 1]), torch.tensor([[0.0, 0.0, 1.0, 0.0]])
            )
        torch.testing.assert_close(context[0, 1], coarse_token[0, 0], rtol=1e-4, atol=1e-5)


def test_views_are_generated_once_and_cached(model, tmp_path, monkeypatch):
    counter = CountingModel(model, monkeypatch)
    g = Zero123Guidance(cascade_config(), model)
    info = g.prepare(make_reference(), tmp_path)
    # 3 nearby views in one batch + 8 bank views in one batch, 2 DDIM steps each
    assert counter.calls == 4
    assert info["nearby_generated"] == 1.0 and info["bank_generated"] == 1.0
    for i in range(3):
        assert (tmp_path / f"nearby_{i:02d}.png").is_file()
    assert len(list(tmp_path.glob("bank_*.png"))) == 8
    record = json.loads((tmp_path / "nearby.json").read_text())
    assert [v["azimuth_deg"] for v in record["views"]] == [45.0, -45.0, 0.0]
    assert [v["elevation_deg"] for v in record["views"]] == [0.0, 0.0, 30.0]
    first = g.nearby_views.images.clone()

    again = Zero123Guidance(cascade_config(), model)
    info = again.prepare(make_reference(), tmp_path)
    assert counter.calls == 4
    assert info["nearby_generated"] == 0.0 and info["bank_generated"] == 0.0
    torch.testing.assert_close(again.nearby_views.images, first, rtol=0, atol=0)

    # Different settings (seed) or a missing PNG -> generated again.
    Zero123Guidance(cascade_config(seed=5), model).prepare(make_reference(), tmp_path)
    assert counter.calls == 8
    (tmp_path / "nearby_01.png").unlink()
    info = Zero123Guidance(cascade_config(seed=5), model).prepare(make_reference(), tmp_path)
    assert info["nearby_generated"] == 1.0 and info["bank_generated"] == 0.0


def test_generation_is_deterministic(model):
    a = Zero123Guidance(cascade_config(coarse_target="none"), model)
    a.prepare(make_reference())
    b = Zero123Guidance(cascade_config(coarse_target="none", generation_batch=2), model)
    b.prepare(make_reference())
    torch.testing.assert_close(a.nearby_views.images, b.nearby_views.images, rtol=0, atol=1.5 / 255)
    c = Zero123Guidance(cascade_config(coarse_target="none", seed=1), model)
    c.prepare(make_reference())
    assert not torch.equal(a.nearby_views.images, c.nearby_views.images)


def test_cascade_sds_gradient_and_determinism(model):
    g = Zero123Guidance(cascade_config(coarse_target="none"), model)
    g.prepare(make_reference())
    images = tiny_images(2, 64).requires_grad_(True)
    target = (torch.tensor([10.0, 40.0]), torch.tensor([120.0, -60.0]), torch.tensor([3.8, 3.8]))
    out = g.sds(images, *target, step=0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    again = g.sds(images, *target, step=0, generator=torch.Generator().manual_seed(0))
    assert again.loss.item() == out.loss.item()


def test_proximity_weights_sum_to_one_and_favour_the_nearest():
    cond_el, cond_az = torch.tensor([0.0, 0.0, 0.0, 30.0]), torch.tensor([0.0, 45.0, -45.0, 0.0])
    target_el, target_az = torch.tensor([0.0, 0.0, 25.0, 0.0]), torch.tensor([0.0, 60.0, 5.0, -170.0])
    w = proximity_weights(target_el, target_az, cond_el, cond_az, 30.0)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4))
    assert w.argmax(dim=1).tolist() == [0, 1, 3, 2]
    assert torch.all(w > 0)  # every condition (the input included) keeps some weight
    assert angular_distance_deg(
        torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(90.0)
    ).item() == pytest.approx(90.0, abs=1e-3)
    sharper = proximity_weights(target_el, target_az, cond_el, cond_az, 5.0)
    assert torch.all(sharper.max(dim=1).values > w.max(dim=1).values)


def test_training_free_eps_matches_reference_computation(model):
    images = tiny_images(3, 64, seed=1)
    with torch.no_grad():
        conds = Conditions(
            model.clip_embed(images),
            torch.tensor([0.0, 0.0, 30.0]),
            torch.tensor([0.0, 45.0, 0.0]),
            torch.full((3,), 3.8),
            model.cond_latent(images),
        )
        noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([200, 600])
        target = (torch.tensor([0.0, 20.0]), torch.tensor([60.0, 10.0]), torch.tensor([3.8, 3.8]))
        eps = training_free_eps(model, noisy, t, target, conds, 3.0, 30.0)
        w = proximity_weights(target[0], target[1], conds.elevation_deg, conds.azimuth_deg, 30.0)
        expected = []
        for b in range(2):
            from recon.cameras import relative_pose

            parts, uncond = [], None
            for c in range(3):
                pose = relative_pose(
                    target[0][b], target[1][b], target[2][b], conds.elevation_deg[c], conds.azimuth_deg[c], conds.radius[c]
                )
                ctx = model.context(conds.clip[c : c + 1], pose[None])
                parts.append(model.eps(noisy[b : b + 1], t[b : b + 1], ctx, conds.latents[c : c + 1]))
                uncond = model.eps(noisy[b : b + 1], t[b : b + 1], torch.zeros_like(ctx), torch.zeros_like(conds.latents[:1]))
            cond = sum(w[b, c] * parts[c] for c in range(3))
            expected.append(uncond + 3.0 * (cond - uncond))
        torch.testing.assert_close(eps, torch.cat(expected), rtol=1e-4, atol=1e-5)
        # All weight on the input (target at the input camera, sharp temperature) = plain Zero123 CFG.
        at_input = (torch.zeros(2), torch.zeros(2), torch.full((2,), 3.8))
        sharp = training_free_eps(model, noisy, t, at_input, conds, 3.0, 0.01)
        ctx = model.context(conds.clip[:1].expand(2, -1), torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(2, -1))
        plain = model.eps_cfg(noisy, t, ctx, conds.latents[:1].expand(2, -1, -1, -1), 3.0)
        torch.testing.assert_close(sharp, plain, rtol=1e-4, atol=1e-5)


def test_training_free_guidance_runs(model):
    g = Zero123Guidance(cascade_config(mode="cascade-training-free"), model)
    g.prepare(make_reference())
    assert g.bank_views is None and len(g.nearby_views) == 3
    images = tiny_images(1, 64).requires_grad_(True)
    out = g.sds(images, 10.0, 80.0, 3.8, step=0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_make_guidance_loads_once_and_shares_the_refiner(monkeypatch):
    import recon.guidance.checkpoints
    from recon.guidance.interface import load_models, make_guidance

    loaded = []
    original = recon.guidance.checkpoints.load_zero123

    def counting(spec, *args, **kwargs):
        loaded.append(spec)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(recon.guidance.checkpoints, "load_zero123", counting)
    base, refiner = load_models(cascade_config(), "cpu")
    assert loaded == ["random-tiny"] and refiner is base
    assert base.dtype == torch.float32  # dtype auto on the CPU
    g = make_guidance(cascade_config(), "cpu", base=base)
    assert loaded == ["random-tiny"] and g.model is base and g.base is base
    _, refiner = load_models(GuidanceConfig(model="random-tiny"), "cpu")
    assert refiner is None and loaded == ["random-tiny", "random-tiny"]
