"""The channels-last GroupNorm (+ SiLU) kernels compute what F.group_norm (+ F.silu) computes, values and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from triton_setup import DEVICE  # before any kernel: without CUDA, Triton's interpreter runs them

pytest.importorskip("triton")

from guidance_fixtures import tiny_images, tiny_model

from recon.guidance import groupnorm
from recon.guidance.groupnorm import ChannelsLastGroupNorm, channels_last_encoder, group_statistics


def _norm(channels: int, groups: int, silu: bool, seed: int = 0) -> tuple[torch.nn.GroupNorm, ChannelsLastGroupNorm]:
    torch.manual_seed(seed)
    reference = torch.nn.GroupNorm(groups, channels).to(DEVICE)
    torch.nn.init.normal_(reference.weight)
    torch.nn.init.normal_(reference.bias)
    reference.requires_grad_(False)
    return reference, ChannelsLastGroupNorm.replacing(reference, silu=silu)


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3.0
    return x.to(DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()


def _assert_same_encoding(images: torch.Tensor, encode, reference_encode) -> None:
    """``encode`` gives ``reference_encode``'s latents of ``images`` and the same gradient back to them."""
    results = []
    for run in (reference_encode, encode):
        pixels = images.clone().requires_grad_()
        latents = run(pixels)
        latents.pow(2).sum().backward()
        results.append((latents.detach(), pixels.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("shape", "groups", "silu"),
    [
        ((2, 64, 9, 7), 32, True),  # 63 pixels: one partial chunk
        ((1, 96, 23, 17), 32, False),  # 3 channels per group, channels not a power of two, 2 chunks
        ((3, 160, 16, 20), 8, True),  # 20 channels per group straddling the 128-channel blocks
    ],
)
def test_values_and_input_gradient_match_the_reference(shape, groups, silu):
    reference, fused = _norm(shape[1], groups, silu)
    x = _input(shape)
    x_ref = x.detach().clone().requires_grad_()
    y = fused(x)
    y_ref = reference(x_ref)
    y_ref = F.silu(y_ref) if silu else y_ref
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=2e-5, rtol=1e-4)


def test_statistics_stay_exact_when_the_mean_dwarfs_the_spread():
    # mean 1000, standard deviation 0.01: sums of squares without the per-chunk shift lose every digit in float32
    x = torch.randn(2, 32, 24, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.01 + 1000.0
    mean, rstd = group_statistics(x.float().to(DEVICE).contiguous(memory_format=torch.channels_last), 4, 1e-6)
    grouped = x.view(2, 4, -1)
    torch.testing.assert_close(mean.double().cpu(), grouped.mean(-1), atol=1e-4, rtol=0)
    expected = (grouped.var(-1, unbiased=False) + 1e-6).rsqrt()
    torch.testing.assert_close(rstd.double().cpu(), expected, rtol=2e-3, atol=0)


def test_reference_path_when_the_kernels_do_not_apply(monkeypatch):
    reference, fused = _norm(32, 8, silu=True)
    calls = []
    monkeypatch.setattr(groupnorm._GroupNormActivation, "apply", lambda *a: calls.append(a))
    contiguous = torch.randn(2, 32, 5, 5, device=DEVICE)  # NCHW, not channels-last
    torch.testing.assert_close(fused(contiguous), F.silu(reference(contiguous)))
    sequence = torch.randn(2, 32, 25, device=DEVICE)  # the attention blocks' (B, C, L) input
    torch.testing.assert_close(fused(sequence), F.silu(reference(sequence)))
    fused.weight.requires_grad_(True)  # trainable weights: the kernels give no weight gradient
    x = _input((2, 32, 5, 5))
    fused(x).sum().backward()
    assert fused.weight.grad is not None and calls == []


def test_replacing_keeps_the_parameters_and_state_dict():
    reference, fused = _norm(64, 32, silu=True)
    assert fused.weight is reference.weight and fused.bias is reference.bias
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert "silu" in repr(fused)


def test_channels_last_vae_encoder_matches_the_reference_encoder(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # both layouts in full float32 convolutions
    model = tiny_model()
    vae = copy.deepcopy(model.vae).to(DEVICE)
    replaced = channels_last_encoder(vae)
    blocks = [m for m in vae.encoder.modules() if hasattr(m, "norm1")]
    assert replaced == 2 * len(blocks) + 1 and all(isinstance(b.nonlinearity, torch.nn.Identity) for b in blocks)
    assert model.vae.encoder.conv_in.weight.is_contiguous()  # the original model is untouched
    assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert channels_last_encoder(vae) == 0  # a second call finds nothing left to replace
    reference = model.vae.to(DEVICE)
    images = (tiny_images(2) * 2 - 1).to(DEVICE)
    _assert_same_encoding(images, lambda x: vae.encode(x).latent_dist.mode(), lambda x: reference.encode(x).latent_dist.mode())


def test_fast_encoder_changes_nothing_off_cuda():
    model = tiny_model()
    processors = {name: type(p) for name, p in model.vae.attn_processors.items()}
    model.use_fast_encoder()
    assert {name: type(p) for name, p in model.vae.attn_processors.items()} == processors
    assert not any(isinstance(m, ChannelsLastGroupNorm) for m in model.vae.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_encoder_on_cuda_encodes_like_the_reference(monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    reference = tiny_model().to("cuda")
    fast = copy.deepcopy(reference)
    fast.use_fast_encoder()
    assert all(isinstance(p, AttnProcessor) for p in fast.vae.attn_processors.values())
    assert any(isinstance(m, ChannelsLastGroupNorm) for m in fast.vae.encoder.modules())
    _assert_same_encoding(tiny_images(3).to("cuda"), fast.encode, reference.encode)
