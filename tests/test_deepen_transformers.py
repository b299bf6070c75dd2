"""guidance.architectures.deepen_transformers: more transformer blocks per attention layer, the same predictions."""

from __future__ import annotations

import pytest
import torch
from guidance_fixtures import tiny_images, tiny_model

from recon.guidance.architectures import deepen_transformers
from recon.guidance.checkpoints import load_zero123, save_diffusers
from recon.guidance.model import Zero123Model


def _deepened(model: Zero123Model, layers: int) -> Zero123Model:
    torch.manual_seed(1)
    unet = deepen_transformers(model.unet, layers)
    return Zero123Model(unet, model.vae, model.image_encoder, model.camera_projection, model.scheduler, model.pose_encoding).eval()


def _inputs(model: Zero123Model):
    g = torch.Generator().manual_seed(0)
    images = tiny_images(3)
    latent = model.cond_latent(images)
    noisy = torch.randn(latent.shape, generator=g)
    poses = torch.randn(3, 2, 4, generator=g)
    clip = model.clip_embed(images)[:, None].expand(-1, 2, -1)
    return noisy, torch.tensor([10, 500, 900]), model.context(clip, poses), latent


def test_deepened_unet_predicts_what_the_original_does_and_its_new_blocks_learn(tmp_path):
    model = tiny_model()
    deep = _deepened(model, 2)
    attentions = [m for m in deep.unet.modules() if hasattr(m, "transformer_blocks")]
    assert attentions and all(len(m.transformer_blocks) == 2 for m in attentions)
    old = dict(model.unet.named_parameters())
    for name, param in deep.unet.named_parameters():
        if name in old:
            assert torch.equal(param, old[name])  # every trained weight kept
    noisy, t, context, latent = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(deep.eps(noisy, t, context, latent), model.eps(noisy, t, context, latent), rtol=1e-5, atol=1e-6)
    deep.unet.requires_grad_(True)
    deep.eps(noisy, t, context, latent).square().mean().backward()
    new_out = attentions[0].transformer_blocks[1].attn1.to_out[0].weight
    assert new_out.grad is not None and new_out.grad.abs().sum() > 0  # zero at the start, not stuck there
    # saved and loaded through the public loader as any weights folder
    folder = save_diffusers(deep, tmp_path / "deep", overwrite=True)
    loaded = load_zero123(folder, "cpu", torch.float32)
    assert loaded.unet.config.transformer_layers_per_block == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.eps(noisy, t, context, latent), model.eps(noisy, t, context, latent), rtol=1e-5, atol=1e-6)


def test_deepening_to_the_same_count_is_a_no_op_and_shallower_is_refused():
    model = tiny_model()
    assert deepen_transformers(model.unet, 1) is model.unet
    deep = deepen_transformers(model.unet, 3)
    with pytest.raises(ValueError, match="cannot deepen transformer layers 3 to 2"):
        deepen_transformers(deep, 2)
