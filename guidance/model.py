"""Zero-1-to-3 as a set of diffusers / transformers components with the conditioning done in torch.

Conditioning (see docs/GUIDANCE-MODELS.md): the UNet sees the noisy latent
channel-concatenated with the conditioning image's VAE posterior mode
(unscaled), and cross-attends to tokens ``Linear([CLIP image embed, pose])``.
Classifier-free guidance uses zero tokens (after the projection) and a zero
concatenated latent for the unconditional branch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

PoseEncoding = Literal["zero123", "stable-zero123"]
POSE_ENCODINGS: tuple[PoseEncoding, ...] = ("zero123", "stable-zero123")

# OpenAI CLIP normalisation (the reference pipeline's constants).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# DDIM settings of Zero-1-to-3 (Stable Diffusion 1.x training schedule).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def make_scheduler() -> DDIMScheduler:
    """A fresh DDIMScheduler with Zero-1-to-3's settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA, fp32 on the CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


class Zero123Model(nn.Module):
    """Zero-1-to-3 network: UNet (8 input channels), VAE, CLIP vision tower, camera projection, DDIM scheduler.

    Attributes: ``unet``, ``vae``, ``image_encoder``, ``camera_projection``
    (Linear(embed + 4 -> cross_attention_dim)), ``scheduler``, ``pose_encoding``
    ("zero123" | "stable-zero123", which 4th pose element the network was
    trained with), ``is_random`` (True for untrained weights), ``description``
    (where the weights came from). Loaders return it in eval mode with
    ``requires_grad`` off on every parameter; training turns it back on.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        image_encoder: CLIPVisionModelWithProjection,
        camera_projection: nn.Linear,
        scheduler: DDIMScheduler | None = None,
        pose_encoding: PoseEncoding = "zero123",
        is_random: bool = False,
        description: str = "",
    ) -> None:
        super().__init__()
        if unet.config.in_channels != 2 * vae.config.latent_channels:
            raise ValueError(f"UNet has {unet.config.in_channels} input channels; Zero123 needs {2 * vae.config.latent_channels}")
        embed_dim = image_encoder.config.projection_dim
        if camera_projection.in_features != embed_dim + 4 or camera_projection.out_features != unet.config.cross_attention_dim:
            raise ValueError(
                f"camera projection is {camera_projection.in_features}->{camera_projection.out_features}; "
                f"expected {embed_dim + 4}->{unet.config.cross_attention_dim}"
            )
        if pose_encoding not in POSE_ENCODINGS:
            raise ValueError(f"unknown pose encoding {pose_encoding!r}")
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        self.camera_projection = camera_projection
        self.scheduler = scheduler if scheduler is not None else make_scheduler()
        self.pose_encoding: PoseEncoding = pose_encoding
        self.is_random = is_random
        self._graphed_unet = None  # set by use_cuda_graphs
        self.description = description
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        """Device of the UNet weights."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (dtype of the UNet weights)."""
        return next(self.unet.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        """Size of the CLIP image embedding (768 for ViT-L/14)."""
        return int(self.image_encoder.config.projection_dim)

    @property
    def context_dim(self) -> int:
        """Size of one cross-attention token (768 for the real model)."""
        return int(self.unet.config.cross_attention_dim)

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel (8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """VAE latent scale factor (0.18215)."""
        return float(self.vae.config.scaling_factor)

    def to(self, *args, **kwargs) -> Zero123Model:
        super().to(*args, **kwargs)
        # The CLIP constants stay fp32: preprocessing runs in fp32 whatever the weights are.
        self.clip_mean = self.clip_mean.float()
        self.clip_std = self.clip_std.float()
        return self

    # ----------------------------------------------------------- memory knobs
    def drop_decoder(self) -> None:
        """Frees the VAE decoder (SDS never decodes); :meth:`decode` then raises."""
        self.vae.decoder = None
        self.vae.post_quant_conv = None

    @property
    def has_decoder(self) -> bool:
        """False after :meth:`drop_decoder`."""
        return self.vae.decoder is not None

    def set_attention(self, mode: Literal["sdpa", "sliced", "classic"] = "sdpa", slice_size: int | str = "auto") -> None:
        """Attention implementation of the UNet: torch SDPA (default, fused and memory-efficient),
        sliced (lowest memory, slower) or the classic matmul-softmax one (reference)."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if mode == "sdpa":
            self.unet.set_attn_processor(AttnProcessor2_0())
        elif mode == "classic":
            self.unet.set_attn_processor(AttnProcessor())
        elif mode == "sliced":
            self.unet.set_attention_slice(slice_size)
        else:
            raise ValueError(f"unknown attention mode {mode!r}; expected sdpa, sliced or classic")

    # ----------------------------------------------------------- conditioning
    def clip_preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) CLIP input, differentiable, fp32.

        As the reference pipeline: [0, 1] -> [-1, 1] -> bicubic resize to the
        encoder's size (224; align_corners, no antialias) -> [0, 1] -> OpenAI
        mean/std.
        """
        size = int(self.image_encoder.config.image_size)
        x = images.float() * 2.0 - 1.0
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
        x = (x + 1.0) / 2.0
        return (x - self.clip_mean) / self.clip_std

    def clip_embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, embed_dim) projected CLIP image embeddings (model dtype)."""
        pixels = self.clip_preprocess(images).to(self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixels).image_embeds.to(self.dtype)

    def cond_latent(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 4, H/8, W/8) VAE posterior mode, NOT scaled (the concat condition)."""
        x = (images * 2.0 - 1.0).to(self.vae.dtype)
        return self.vae.encode(x).latent_dist.mode().to(self.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 4, H/8, W/8) diffusion latents (x scaling_factor).

        The posterior mode by default; ``sample=True`` draws from the posterior.
        """
        x = (images * 2.0 - 1.0).to(self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return (latents * self.scaling_factor).to(self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """(B, 4, h, w) diffusion latents -> (B, 3, 8h, 8w) images in [0, 1] (model dtype)."""
        if not self.has_decoder:
            raise RuntimeError("the VAE decoder was dropped (drop_decoder); reload the model to decode")
        images = self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0).to(self.dtype)

    def context(self, clip_embeds: Tensor, poses: Tensor) -> Tensor:
        """Cross-attention tokens: (B, K, embed_dim) embeddings + (B, K, 4) poses -> (B, K, context_dim).

        Also accepts (B, embed_dim) + (B, 4) and then returns one token (B, 1, context_dim).
        """
        if clip_embeds.ndim == 2:
            clip_embeds, poses = clip_embeds[:, None], poses[:, None]
        tokens = torch.cat([clip_embeds.to(self.dtype), poses.to(device=clip_embeds.device, dtype=self.dtype)], dim=-1)
        return self.camera_projection(tokens)

    # -------------------------------------------------------------- denoising
    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Replays CUDA graphs for gradient-free UNet calls on CUDA (see guidance/cuda_graphs.py)."""
        from recon.guidance.cuda_graphs import unet_runner

        self._graphed_unet = unet_runner(self.unet, enabled)

    def use_fast_encoder(self) -> None:
        """On CUDA: the VAE's attention as plain matmuls, and (with Triton) its encoder in channels-last layout
        with fused GroupNorm + SiLU (guidance/groupnorm.py). Elsewhere nothing changes. One-way: it edits the
        VAE's modules in place (same parameters, same state-dict keys)."""
        from diffusers.models.attention_processor import AttnProcessor

        from recon.encoding.triton_backend import triton_available
        from recon.guidance.groupnorm import channels_last_encoder

        if self.vae.device.type != "cuda":
            return
        self.vae.set_attn_processor(AttnProcessor())
        if triton_available():
            channels_last_encoder(self.vae)

    def eps(self, noisy: Tensor, t: Tensor, context: Tensor, cond_latent: Tensor) -> Tensor:
        """Predicted noise (B, 4, h, w) for ``noisy`` diffusion latents at integer timesteps ``t`` (B,)."""
        x = torch.cat([noisy, cond_latent], dim=1).to(self.dtype)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        context = context.to(self.dtype)
        if self._graphed_unet is not None and x.is_cuda and not torch.is_grad_enabled():
            return self._graphed_unet(x, t.contiguous(), context)
        return self.unet(x, t, encoder_hidden_states=context).sample

    def eps_cfg(self, noisy: Tensor, t: Tensor, context: Tensor, cond_latent: Tensor, scale: float) -> Tensor:
        """Classifier-free guided noise: one UNet call on the batch [cond; uncond].

        Unconditional = zero context tokens (after the projection) and a zero
        concatenated latent; eps = uncond + scale * (cond - uncond).
        """
        t = torch.as_tensor(t, device=noisy.device).reshape(-1).expand(noisy.shape[0])
        both = self.eps(
            torch.cat([noisy, noisy]),
            torch.cat([t, t]),
            torch.cat([context, torch.zeros_like(context)]),
            torch.cat([cond_latent, torch.zeros_like(cond_latent)]),
        )
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)
