"""Network sizes of the Zero-1-to-3 components, as plain config dicts, and a builder.

``"full"`` is the real Zero123 / Zero123-XL / Stable-Zero123 network (SD 1.x
UNet with 8 input channels, the SD VAE, CLIP ViT-L/14 vision tower, a
772 -> 768 camera projection). ``"tiny"`` has the same structure at a size
that runs in milliseconds on a CPU (tests, smoke runs). ``"prior"`` is the
shipped small prior (docs/TINY-PRIOR.md): 128 px images, a VAE with
downsampling factor 4 (32 x 32 x 4 latents), a ~4 M parameter UNet with
cross-attention at 16 x 16 and 8 x 8, a 4-layer ViT image encoder; about
6 M parameters in all (~12 MB in fp16).

The ``prior`` UNet also has a *pose embedding* that real Zero123 checkpoints
lack: diffusers' ``addition_embed_type="text"``, an attention pooling of the
cross-attention tokens (the projected [image embedding, pose]) added to the
timestep embedding, so the camera reaches every ResNet block at every
resolution instead of only the cross-attention layers (where one token is a
constant per-channel offset). It reads the same ``encoder_hidden_states``, so
``Zero123Model.eps``, the SDS, the cascade and the loaders call such a UNet
exactly as they call a real checkpoint's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

# 4 = the Zero-1-to-3 camera vector appended to the CLIP image embedding.
POSE_DIM = 4

POSE_EMBEDDING: dict[str, Any] = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4}
"""UNet config entries of the pose embedding (see the module docstring): the tokens, attention-pooled, added to
the timestep embedding. 4 heads of 32 channels for the ``prior``'s 128-d tokens."""

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "full": {
        "unet": {
            "sample_size": 32,
            "in_channels": 8,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 768,
            # diffusers' SD-1.x configs call the number of heads "attention_head_dim".
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "sample_size": 256,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "norm_num_groups": 32,
            "scaling_factor": 0.18215,
        },
        "image_encoder": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 224,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    },
    "tiny": {
        "unet": {
            "sample_size": 8,
            "in_channels": 8,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        "vae": {
            "sample_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (8, 16, 16, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "norm_num_groups": 8,
            "scaling_factor": 0.18215,
        },
        "image_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": 8,
            "image_size": 32,
            "projection_dim": 64,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    },
    "prior": {
        "unet": {
            "sample_size": 32,
            "in_channels": 8,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 128),
            # No attention at 32 x 32 (1024 tokens): cross-attention where it is cheap.
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 128,
            "attention_head_dim": 4,
            "norm_num_groups": 32,
            **POSE_EMBEDDING,
        },
        "vae": {
            "sample_size": 128,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "norm_num_groups": 32,
            # Replaced by 1 / std of the trained VAE's latents (guidance.training.train_vae).
            "scaling_factor": 0.18215,
        },
        "image_encoder": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "patch_size": 16,
            "image_size": 128,
            "projection_dim": 128,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    },
}


def architecture(name: str) -> dict[str, Any]:
    """A deep copy of the named config dict (``"full"``, ``"tiny"`` or ``"prior"``)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    return copy.deepcopy(ARCHITECTURES[name])


def import_model_libraries() -> None:
    """Imports the diffusers and transformers classes the models are built from.

    On a cold start this alone takes seconds (diffusers imports ``torch._dynamo`` and every one of its model
    classes), so callers time it apart from reading weights.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPVisionModelWithProjection  # noqa: F401


def build_components(arch: str | dict[str, Any]) -> dict[str, torch.nn.Module]:
    """Randomly initialised ``unet``, ``vae``, ``image_encoder`` and ``camera_projection`` for ``arch``.

    Uses the current torch RNG (wrap in ``torch.random.fork_rng`` + seed for
    reproducible weights) and the current default device (``torch.device("meta")``
    as a context builds shapes only).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = architecture(arch) if isinstance(arch, str) else arch
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    projection = torch.nn.Linear(cfg["image_encoder"]["projection_dim"] + POSE_DIM, cfg["unet"]["cross_attention_dim"])
    return {"unet": unet, "vae": vae, "image_encoder": image_encoder, "camera_projection": projection}


def match_architecture(unet_conv_in_channels: int, clip_hidden_size: int) -> str | None:
    """The name of the architecture whose first UNet width and CLIP width match, or ``None``."""
    for name, cfg in ARCHITECTURES.items():
        if cfg["unet"]["block_out_channels"][0] == unet_conv_in_channels and cfg["image_encoder"]["hidden_size"] == clip_hidden_size:
            return name
    return None


def has_pose_embedding(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` (a diffusers UNet2DConditionModel) has the :data:`POSE_EMBEDDING` path."""
    return getattr(unet.config, "addition_embed_type", None) == POSE_EMBEDDING["addition_embed_type"]


def add_pose_embedding(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``unet`` with the :data:`POSE_EMBEDDING` path added, predicting exactly what ``unet`` predicts.

    Every existing weight is kept; the new ``add_embedding`` is randomly
    initialised (current torch RNG) except its output LayerNorm's gain, which
    starts at zero, so the added embedding is 0 until training moves the gain
    (its gradient is the normalised pooled token, non-zero whenever the tokens
    vary). Returns ``unet`` itself when it already has the path.
    """
    if has_pose_embedding(unet):
        return unet
    grown = _rebuilt(unet, {**_public_config(unet), **POSE_EMBEDDING}, lambda key: key.startswith("add_embedding."), "add a pose embedding")
    with torch.no_grad():
        grown.add_embedding.norm2.weight.zero_()
    return grown


def deepen_transformers(unet: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A copy of ``unet`` with ``layers`` transformer blocks in each of its attention layers, predicting exactly
    what ``unet`` predicts (more capacity for training to use, every trained weight kept).

    The blocks added after the existing ones start as the identity: each is
    residual around its self-attention, cross-attention and feed-forward parts,
    and their output projections start at zero (the rest randomly initialised,
    current torch RNG), so training moves those first. Returns ``unet`` itself
    when it already has ``layers`` (raises ValueError when it has more, or when
    its layers differ per block).
    """
    config = _public_config(unet)
    current = config.get("transformer_layers_per_block", 1)
    counts = set(current) if isinstance(current, (list, tuple)) else {current}
    if counts == {layers}:
        return unet
    if len(counts) != 1 or layers < max(counts):
        raise ValueError(f"cannot deepen transformer layers {current} to {layers}: only a single count can grow")
    old = max(counts)
    added = tuple(f".transformer_blocks.{i}." for i in range(old, layers))
    grown = _rebuilt(unet, {**config, "transformer_layers_per_block": layers}, lambda key: any(a in key for a in added), "deepen the transformers")
    with torch.no_grad():
        for name, module in grown.named_modules():
            index = name.rsplit(".transformer_blocks.", 1)[-1] if ".transformer_blocks." in name else ""
            if index.isdigit() and int(index) >= old:
                feed_forward_out = [m for m in module.ff.net if isinstance(m, torch.nn.Linear)][-1]
                for out in (module.attn1.to_out[0], module.attn2.to_out[0], feed_forward_out):
                    out.weight.zero_()
                    if out.bias is not None:
                        out.bias.zero_()
    return grown


def _public_config(unet: torch.nn.Module) -> dict[str, Any]:
    """A diffusers UNet's constructor arguments. Private keys (e.g. _use_default_values, which lists
    addition_embed_type) would override entries a caller changes."""
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


def _rebuilt(unet: torch.nn.Module, config: dict[str, Any], is_new: Callable[[str], bool], what: str) -> torch.nn.Module:
    """A ``UNet2DConditionModel(**config)`` holding every weight of ``unet``, on its device and in its dtype. The
    weights it has and ``unet`` lacks are its own initialisation (current torch RNG); each of their names must
    satisfy ``is_new``, else ValueError("cannot ``what``: ...")."""
    from diffusers import UNet2DConditionModel

    grown = UNet2DConditionModel(**config)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or not all(is_new(key) for key in missing):
        raise ValueError(f"cannot {what}: unexpected {unexpected[:3]}, missing {[key for key in missing if not is_new(key)][:3]}")
    param = next(unet.parameters())
    return grown.to(device=param.device, dtype=param.dtype)
