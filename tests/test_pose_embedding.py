"""The tiny prior's extra pose path (guidance.architectures.POSE_EMBEDDING): same interface as a real checkpoint."""

from __future__ import annotations

import pytest
import torch
from guidance_fixtures import tiny_images, tiny_model

from recon.cameras import relative_pose
from recon.guidance.architectures import (
    POSE_EMBEDDING,
    add_pose_embedding,
    architecture,
    has_pose_embedding,
)
from recon.guidance.cascade import generate_views_many
from recon.guidance.checkpoints import load_zero123, save_diffusers
from recon.guidance.model import Zero123Model


def with_pose_path(model: Zero123Model, gain: float = 0.0) -> Zero123Model:
    """``model`` with the pose embedding added (its output gain set to ``gain`` when non-zero)."""
    torch.manual_seed(1)
    unet = add_pose_embedding(model.unet)
    if gain:
        with torch.no_grad():
            unet.add_embedding.norm2.weight.fill_(gain)
    grown = Zero123Model(unet, model.vae, model.image_encoder, model.camera_projection, model.scheduler, model.pose_encoding)
    return grown.eval().requires_grad_(False)


def inputs(model: Zero123Model, batch: int = 3, tokens: int = 1):
    g = torch.Generator().manual_seed(0)
    images = tiny_images(batch)
    latent = model.cond_latent(images)
    noisy = torch.randn(latent.shape, generator=g)
    poses = torch.randn(batch, tokens, 4, generator=g)
    clip = model.clip_embed(images)[:, None].expand(-1, tokens, -1)
    return noisy, torch.tensor([10, 500, 900][:batch]), model.context(clip, poses), latent


def test_prior_architecture_has_the_pose_path_and_real_ones_do_not():
    assert {k: architecture("prior")["unet"][k] for k in POSE_EMBEDDING} == POSE_EMBEDDING
    assert "addition_embed_type" not in architecture("full")["unet"]
    assert not has_pose_embedding(tiny_model().unet)


def test_added_pose_path_starts_as_the_identity_and_can_learn():
    model = tiny_model()
    grown = with_pose_path(model)
    assert has_pose_embedding(grown.unet) and add_pose_embedding(grown.unet) is grown.unet
    noisy, t, context, latent = inputs(model)
    torch.testing.assert_close(grown.eps(noisy, t, context, latent), model.eps(noisy, t, context, latent), rtol=0, atol=0)
    gain = grown.unet.add_embedding.norm2.weight
    gain.requires_grad_(True)
    grown.eps(noisy, t, context, latent).square().mean().backward()
    assert gain.grad is not None and gain.grad.abs().sum() > 0


def test_pose_path_changes_the_prediction_with_the_pose_alone():
    model = tiny_model()
    grown = with_pose_path(model, gain=1.0)
    noisy, t, context, latent = inputs(grown)
    # The cross-attention alone sees one token as a constant offset; zero its output to isolate the pose path.
    for name, module in grown.unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    other = context.flip(0)
    assert (grown.eps(noisy, t, context, latent) - grown.eps(noisy, t, other, latent)).abs().max() > 1e-4
    for name, module in model.unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    torch.testing.assert_close(model.eps(noisy, t, context, latent), model.eps(noisy, t, other, latent), rtol=0, atol=0)


@pytest.mark.parametrize("pose_path", [False, True])
def test_diffusers_folder_round_trips_with_and_without_the_pose_path(tmp_path, pose_path):
    model = tiny_model()
    if pose_path:
        model = with_pose_path(model, gain=0.5)
    folder = save_diffusers(model, tmp_path / "weights")
    loaded = load_zero123(folder, "cpu", torch.float32)
    assert has_pose_embedding(loaded.unet) == pose_path
    noisy, t, context, latent = inputs(model, tokens=3)
    torch.testing.assert_close(loaded.eps(noisy, t, context, latent), model.eps(noisy, t, context, latent), rtol=0, atol=0)


def test_cfg_and_multi_token_sampling_run_with_the_pose_path():
    model = with_pose_path(tiny_model(), gain=1.0)
    images = tiny_images(2)
    targets = [(torch.tensor([10.0, 20.0]), torch.tensor([90.0, 180.0]), torch.tensor([3.8, 3.8]))] * 2
    views = generate_views_many(model, images, [(0.0, 0.0, 3.8), (5.0, 30.0, 3.8)], targets, 2, 3.0, [0, 1], 8)
    assert [v.shape for v in views] == [(2, 3, 64, 64)] * 2 and all(torch.isfinite(v).all() for v in views)
    rel = relative_pose(torch.tensor([10.0]), torch.tensor([90.0]), torch.tensor([3.8]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.8]))
    noisy, t, _, latent = inputs(model, batch=1)
    tokens = model.context(model.clip_embed(images[:1])[:, None].expand(-1, 4, -1), rel[:, None].expand(-1, 4, -1))
    assert model.eps_cfg(noisy, t, tokens, latent, 3.0).shape == noisy.shape
