"""Score distillation: the closed-form gradient, NaN handling, annealing, pixels gradient, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from guidance_fixtures import tiny_images, tiny_model
from script_loading import load_script

from recon.cameras import relative_pose
from recon.guidance.config import GuidanceConfig
from recon.guidance.interface import Zero123Guidance
from recon.guidance.sds import (
    sample_timesteps,
    score_distillation,
    sds_gradient,
    timestep_range,
    timestep_weight,
)
from recon.preprocess import ReferenceView
from recon.schedule import value_at


def make_reference(elevation: float = 0.0, azimuth: float = 0.0, radius: float = 3.8, size: int = 48) -> ReferenceView:
    rgb = tiny_images(1, size, seed=7)[0]
    alpha = torch.zeros(1, size, size)
    alpha[:, size // 6 : -size // 6, size // 6 : -size // 6] = 1.0
    return ReferenceView(torch.cat([rgb, alpha]), Path("ref.png"), elevation, azimuth, radius)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def guidance(model):
    g = Zero123Guidance(GuidanceConfig(model="random-tiny", mode="zero123"), model)
    g.prepare(make_reference())
    return g


ALPHAS = torch.linspace(0.999, 0.01, 1000)


def test_latent_gradient_is_the_closed_form():
    torch.manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, requires_grad=True)
    t = torch.tensor([10, 500, 990])
    noise = torch.randn(3, 4, 8, 8)
    seen = {}

    def eps_fn(noisy, timesteps):
        seen["noisy"], seen["t"] = noisy, timesteps
        return torch.tanh(noisy) * 0.7

    out = score_distillation(latents, eps_fn, ALPHAS, 0, 999, t=t, noise=noise)
    out.loss.backward()
    a = ALPHAS[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    expected = (1 - a) * (torch.tanh(noisy) * 0.7 - noise)
    torch.testing.assert_close(seen["noisy"], noisy)
    assert seen["t"].tolist() == [10, 500, 990]
    # loss = 0.5 ||z - sg(z - grad)||^2 / B  ->  d loss / d z = grad / B
    torch.testing.assert_close(latents.grad * 3, expected)
    assert out.loss.item() == pytest.approx(0.5 * expected.pow(2).sum().item() / 3, rel=1e-5)
    assert out.diagnostics["sds_t_mean"] == pytest.approx(500.0)
    assert out.diagnostics["sds_grad_norm"] == pytest.approx(expected.flatten(1).norm(dim=1).mean().item(), rel=1e-5)


def test_uniform_weighting_and_clipping():
    t = torch.tensor([100, 800])
    assert timestep_weight(ALPHAS, t, "uniform").tolist() == [1.0, 1.0]
    torch.testing.assert_close(timestep_weight(ALPHAS, t, "sds"), 1 - ALPHAS[t])
    grad, bad = sds_gradient(torch.full((2, 4, 2, 2), 5.0), torch.zeros(2, 4, 2, 2), torch.ones(2), clip=0.5)
    assert grad.abs().max().item() == pytest.approx(0.5) and int(bad) == 0


def test_nan_eps_gives_zero_gradient_and_a_count():
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)

    def eps_fn(noisy, t):
        eps = torch.ones_like(noisy)
        eps[0, 1, 2, 3] = float("nan")
        return eps

    out = score_distillation(latents, eps_fn, ALPHAS, 0, 999, t=torch.tensor([500, 500]), noise=torch.zeros(2, 4, 8, 8))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.diagnostics["sds_nonfinite"] == 1.0
    assert torch.all(latents.grad[0] == 0)
    assert torch.all(latents.grad[1] != 0)


def test_nan_from_the_model_zeroes_the_pixel_gradient(guidance, monkeypatch):
    monkeypatch.setattr(guidance.model, "eps_cfg", lambda noisy, *args: torch.full_like(noisy, float("inf")))
    images = tiny_images(2, 64).requires_grad_(True)
    out = guidance.sds(images, torch.tensor([0.0, 10.0]), torch.tensor([30.0, 60.0]), 3.8, step=0)
    out.loss.backward()
    assert out.diagnostics["sds_nonfinite"] == 2.0
    assert torch.all(images.grad == 0)


def test_timestep_range_anneals(guidance):
    assert timestep_range(1000, 0.4, 0.85) == (400, 850)
    assert timestep_range(1000, 0.98, 0.2) == (980, 980)  # max never below min
    images = tiny_images(1, 64)
    seen = {}
    for step in (0, 200):
        d = guidance.sds(images, 0.0, 90.0, 3.8, step=step).diagnostics
        seen[step] = (d["sds_min_step"], d["sds_max_step"])
        assert d["sds_min_step"] <= d["sds_t_mean"] <= d["sds_max_step"]
    assert seen == {0: (400, 850), 200: (200, 500)}
    cfg = guidance.cfg
    ranges = [timestep_range(1000, value_at(cfg.min_step_percent, s), value_at(cfg.max_step_percent, s)) for s in (100, 1000)]
    assert ranges == [(300, 675), (200, 500)]
    t = sample_timesteps(4000, 200, 500, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.min().item() == 200 and t.max().item() == 500


def test_model_gradient_matches_reference_computation(guidance, model):
    """Latent gradient of the interface == w(t) (eps_cfg(z_t | input token, input latent) - eps)."""
    elevation, azimuth, radius = torch.tensor([20.0, -5.0]), torch.tensor([45.0, 170.0]), torch.tensor([3.8, 4.0])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    t, noise = torch.tensor([300, 700]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eps_fn = guidance.eps_function((elevation, azimuth, radius), 3.0)
    out = score_distillation(latents, eps_fn, model.scheduler.alphas_cumprod, 0, 999, t=t, noise=noise)
    out.loss.backward()

    ref = make_reference()
    image = torch.nn.functional.interpolate(ref.rgb_over()[None], size=(64, 64), mode="bilinear", antialias=True)
    with torch.no_grad():
        pose = relative_pose(elevation, azimuth, radius, 0.0, 0.0, 3.8)
        context = model.context(model.clip_embed(image).expand(2, -1), pose)
        a = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
        eps_hat = model.eps_cfg(noisy, t, context, model.cond_latent(image).expand(2, -1, -1, -1), 3.0)
    torch.testing.assert_close(latents.grad * 2, (1 - a) * (eps_hat - noise), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("resolution", [256, 32])
def test_gradient_reaches_pixels_through_the_vae(model, resolution):
    g = Zero123Guidance(GuidanceConfig(model="random-tiny", vae_grad_resolution=resolution, cfg_chunk=1), model)
    g.prepare(make_reference())
    images = tiny_images(2, 96).requires_grad_(True)
    out = g.sds(images, torch.tensor([10.0, 30.0]), torch.tensor([90.0, -120.0]), torch.tensor([3.8, 3.8]), step=0)
    out.loss.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() > 0


def test_same_seed_same_loss(guidance):
    images = tiny_images(2, 64)
    args = (torch.tensor([0.0, 20.0]), torch.tensor([90.0, 200.0]), 3.8)
    torch.manual_seed(3)
    first = guidance.sds(images, *args, step=50).loss.item()
    torch.manual_seed(3)
    second = guidance.sds(images, *args, step=50).loss.item()
    third = guidance.sds(images, *args, step=50, generator=torch.Generator().manual_seed(3)).loss.item()
    fourth = guidance.sds(images, *args, step=50, generator=torch.Generator().manual_seed(3)).loss.item()
    other = guidance.sds(images, *args, step=50, generator=torch.Generator().manual_seed(4)).loss.item()
    assert first == second
    assert third == fourth
    assert other != third


def test_cfg_chunk_does_not_change_the_result(model):
    # chunks also split the VAE encode (gradient-checkpointed): same loss, same gradient to the renders
    losses, grads = [], []
    for chunk in (0, 2):
        images = tiny_images(3, 64).requires_grad_()
        g = Zero123Guidance(GuidanceConfig(model="random-tiny", cfg_chunk=chunk), model)
        g.prepare(make_reference())
        out = g.sds(
            images, torch.zeros(3), torch.tensor([0.0, 90.0, 180.0]), 3.8, step=0, generator=torch.Generator().manual_seed(0)
        )
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(images.grad)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    scale = grads[0].abs().max()
    assert scale > 0
    torch.testing.assert_close(grads[1] / scale, grads[0] / scale, rtol=0, atol=1e-4)


def test_sds_before_prepare_is_an_error(model):
    g = Zero123Guidance(GuidanceConfig(model="random-tiny"), model)
    with pytest.raises(RuntimeError, match="prepare"):
        g.sds(tiny_images(1, 64), 0.0, 0.0, 3.8, step=0)


def test_bench_script_runs_on_tiny_weights(tmp_path):
    """bench/guidance.py end to end on the CPU with the tiny network (the lead runs it full-size on CUDA)."""
    bench = load_script("bench/guidance.py")
    out = tmp_path / "bench.json"
    argv = [
        "--out",
        str(out),
        "--spec",
        "random-tiny",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--batches",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--nearby-steps",
        "1",
        "--resolution",
        "64",
    ]
    results = bench.main(argv)
    saved = __import__("json").loads(out.read_text())
    rows = [(r["encoder"], r["mode"], r["cuda_graphs"], r["batch"], r["tokens"]) for r in saved["sds"]]
    modes = [("zero123", False, 2, 1), ("zero123", True, 2, 1), ("cascade", False, 2, 5), ("cascade", True, 2, 5)]
    assert rows == [("reference", *row) for row in modes] + [("fast", *row) for row in modes if row[1]]
    for runner in ("reference, eager", "reference, graphs", "fast, graphs"):
        assert saved["prepare"][runner]["nearby_views"] == 3 and saved["prepare"][runner]["bank_views"] == 36
    assert all(r["ms_per_step"] > 0 for r in results["sds"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_cuda_gradient_reaches_pixels():
    from recon.guidance.checkpoints import load_zero123

    model = load_zero123("random-tiny", "cuda", torch.float16)
    g = Zero123Guidance(GuidanceConfig(model="random-tiny", mode="cascade", nearby_steps=2, bank_elevations_deg=[0.0]), model)
    g.prepare(make_reference())
    images = torch.rand(4, 3, 128, 128, device="cuda", requires_grad=True)
    out = g.sds(images, torch.zeros(4), torch.tensor([0.0, 90.0, 180.0, 270.0]), 3.8, step=0)
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert out.diagnostics["sds_nonfinite"] == 0.0


def test_vae_grad_resolution_bench_compares_like_with_like(tmp_path):
    """bench/vae_grad_resolution.py on tiny random weights: at the model's own size the reduced gradient is the full one."""
    bench = load_script("bench/vae_grad_resolution.py")
    common = ["--model", "random-tiny", "--device", "cpu", "--render-size", "16", "--trials", "2", "--draws", "2"]
    same = bench.main([*common, "--resolution", "64", "--out", str(tmp_path / "same.json")])
    assert same["encoded"] == {"reduced": 64, "full": 64}
    assert same["mean"]["cosine"] == pytest.approx(1.0) and same["mean"]["norm_ratio"] == pytest.approx(1.0)
    assert same["mean"]["noise_cosine"] < 0.999  # other draws: another gradient
    reduced = bench.main([*common, "--resolution", "32"])
    assert reduced["encoded"] == {"reduced": 32, "full": 64} and len(reduced["trials"]) == 2
    assert all(-1.0 <= t["cosine"] < 0.999 and t["norm_ratio"] > 0 for t in reduced["trials"])


def test_fast_vae_encoder_only_where_the_encoder_replays_graphs(model, monkeypatch):
    from recon.guidance.model import Zero123Model

    calls = []
    monkeypatch.setattr(Zero123Model, "use_fast_encoder", lambda self: calls.append(self))
    for overrides, expected in (({}, 1), ({"cuda_graphs": False}, 0), ({"cfg_chunk": 1}, 0), ({"fast_vae_encoder": False}, 0)):
        calls.clear()
        Zero123Guidance(GuidanceConfig(model="random-tiny", **overrides), model)
        assert len(calls) == expected, overrides
