"""Helpers that build tiny random Zero-1-to-3 models and write them in the real on-disk layouts.

Import from tests: ``from guidance_fixtures import tiny_model, tiny_images, ...``
(or ``from guidance_fixtures import ...`` with tests/ on the path).

* :func:`tiny_model` - a seeded random "tiny" Zero123Model, fp32 on the CPU (~0.9 M parameters).
* :func:`tiny_images` - smooth test images (B, 3, S, S) in [0, 1].
* :func:`save_tiny_diffusers` - the diffusers layouts (``cc_projection`` / ``clip_camera_projection``).
* :func:`ldm_state_dict` / :func:`save_ldm_checkpoint` - the original latent-diffusion layout
  (``model.diffusion_model.*``, ``model_ema.*``, ``first_stage_model.*``,
  ``cond_stage_model.model.visual.*`` in OpenAI CLIP naming, ``cc_projection.*``),
  built by inverting diffusers' converters key by key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from recon.guidance.checkpoints import ema_key, load_zero123, save_diffusers
from recon.guidance.model import Zero123Model

TINY_SIZE = 64  # image side the tiny VAE is built for (latent 8x8)


def tiny_model(seed: int = 0, pose_encoding: str = "zero123") -> Zero123Model:
    """A seeded random tiny Zero123Model, fp32 on the CPU, eval mode, parameters frozen."""
    return load_zero123("random-tiny", "cpu", torch.float32, pose_encoding=pose_encoding, seed=seed)


def tiny_images(batch: int = 1, size: int = TINY_SIZE, seed: int = 0) -> Tensor:
    """(batch, 3, size, size) smooth random images in [0, 1] (low-frequency noise, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def save_tiny_diffusers(model: Zero123Model, folder: Path, projection_folder: str = "cc_projection", safe: bool = True) -> Path:
    """Writes ``model`` as a diffusers folder (``safe=False`` writes .bin files, as older hub repos do)."""
    return save_diffusers(model, folder, projection_folder=projection_folder, safe_serialization=safe)


# ----------------------------------------------------------- ldm layout (inverse)
_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _resnet_param(rest: str) -> str:
    for new, old in _RESNET_TO_LDM:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    raise KeyError(rest)


def unet_to_ldm(unet) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel state dict -> latent-diffusion ``diffusion_model`` keys (no prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    per_block = unet.config.layers_per_block
    attention_blocks = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    out: dict[str, Tensor] = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if key in top:
            new = top[key]
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(b + 1) * (per_block + 1)}.0.op." + ".".join(parts[5:])
            else:
                index = 1 + b * (per_block + 1) + int(parts[3])
                rest = ".".join(parts[4:])
                new = f"input_blocks.{index}.0.{_resnet_param(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            if parts[1] == "resnets":
                new = f"middle_block.{2 * int(parts[2])}.{_resnet_param(rest)}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                slot = 2 if b in attention_blocks else 1
                new = f"output_blocks.{b * (per_block + 1) + per_block}.{slot}.conv." + ".".join(parts[5:])
            else:
                index = b * (per_block + 1) + int(parts[3])
                rest = ".".join(parts[4:])
                new = f"output_blocks.{index}.0.{_resnet_param(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        else:
            raise KeyError(key)
        out[new] = value.clone()
    return out


_VAE_ATTN_TO_LDM = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_to_ldm(vae) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> latent-diffusion ``first_stage_model`` keys (no prefix).

    Attention projections become 1x1 convolutions, as in the original model.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(vae.config.up_block_types)
    out: dict[str, Tensor] = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        value = value.clone()
        if key in top:
            new = top[key]
        elif parts[1] in ("down_blocks", "up_blocks"):
            side, b, kind = parts[0], int(parts[2]), parts[3]
            ldm_block = b if side == "encoder" else n_up - 1 - b
            word = "down" if side == "encoder" else "up"
            if kind in ("downsamplers", "upsamplers"):
                new = f"{side}.{word}.{ldm_block}.{'downsample' if side == 'encoder' else 'upsample'}.conv." + parts[-1]
            else:
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{word}.{ldm_block}.block.{parts[4]}.{rest}"
        elif parts[1] == "mid_block":
            side = parts[0]
            if parts[2] == "resnets":
                rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
            else:
                rest = ".".join(parts[4:])
                for new_name, old_name in _VAE_ATTN_TO_LDM:
                    if rest.startswith(new_name + "."):
                        rest = old_name + rest[len(new_name) :]
                        break
                new = f"{side}.mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            raise KeyError(key)
        out[new] = value
    return out


def clip_to_openai(image_encoder) -> dict[str, Tensor]:
    """transformers CLIPVisionModelWithProjection -> OpenAI CLIP ``visual.*`` keys (no prefix)."""
    sd = image_encoder.state_dict()
    out = {
        "class_embedding": sd["vision_model.embeddings.class_embedding"],
        "positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "proj": sd["visual_projection.weight"].t(),
    }
    renames = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(image_encoder.config.num_hidden_layers):
        src = f"vision_model.encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")])
            for new, old in renames.items():
                out[dst + f"{old}.{kind}"] = sd[src + f"{new}.{kind}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def ldm_state_dict(model: Zero123Model, ema_unet=None) -> dict[str, Tensor]:
    """The model in the original latent-diffusion layout (as zero123-xl.ckpt's "state_dict").

    ``ema_unet``: a UNet whose weights go under ``model_ema.*`` (LitEma's
    dot-less names), plus the ``model_ema.decay``/``num_updates`` scalars.
    Also holds a few text-tower keys and CLIP mean/std buffers, as the real file does.
    """
    out: dict[str, Tensor] = {}
    out.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(model.unet).items()})
    out.update({"first_stage_model." + k: v for k, v in vae_to_ldm(model.vae).items()})
    out.update({"cond_stage_model.model.visual." + k: v for k, v in clip_to_openai(model.image_encoder).items()})
    out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    out["cond_stage_model.mean"] = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    out["cond_stage_model.std"] = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    out["cc_projection.weight"] = model.camera_projection.weight.detach().clone()
    out["cc_projection.bias"] = model.camera_projection.bias.detach().clone()
    if ema_unet is not None:
        for key, value in unet_to_ldm(ema_unet).items():
            out[ema_key("model.diffusion_model." + key)] = value
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def save_ldm_checkpoint(model: Zero123Model, path: Path, ema_unet=None) -> Path:
    """Writes :func:`ldm_state_dict` as a .ckpt ({"state_dict": ..., "global_step": ...}) or a .safetensors file."""
    state = ldm_state_dict(model, ema_unet)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 105000, "epoch": 3}, path)
    return path


def probe_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed (images, noisy latents, poses, timesteps) for comparing two tiny models' guided noise predictions."""
    g = torch.Generator().manual_seed(11)
    return tiny_images(2, seed=3), torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 1, 4, generator=g), torch.tensor([700, 90])


def guided(m, probe) -> torch.Tensor:
    """Classifier-free guided epsilon of model ``m`` on :func:`probe_inputs` (scale 3)."""
    image, noisy, pose, t = probe
    with torch.no_grad():
        return m.eps_cfg(noisy, t, m.context(m.clip_embed(image)[:, None], pose), m.cond_latent(image), 3.0)

