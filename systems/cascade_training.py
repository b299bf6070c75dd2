"""Training Cascade-Zero123 by self-distillation (and plain Zero-1-to-3 fine-tuning).

Stage ``cascade`` (the paper's recipe, ZERO123.md): Base and Refiner start
from the same weights. Each step samples B (object, input view, target view)
triples; the Base self-prompts, without gradients, the nearby views
(``nearby_views`` offsets from the input camera) and a coarse view near the
target (DDIM + CFG, few steps); the Refiner learns the epsilon-MSE loss on
the target with one cross-attention token per condition image, built by
:func:`guidance.cascade.refiner_tokens` (the same code the SDS guidance
uses), and only the input's latent channel-concatenated. After every
optimiser step the Refiner's EMA becomes the Base's weights. The Base
parameters *are* the EMA (updated in place, ``base = lerp(base, refiner,
1 - decay)``), which is the same as keeping a separate EMA and copying it
over, without a third copy of the UNet in memory.

Stage ``base``: plain Zero-1-to-3 fine-tuning (one token, no self-prompting);
the EMA is kept the same way and saved as the result.

Stage ``vae``: trains only the AutoencoderKL as an autoencoder on the
dataset's views composited over the background (L1 + L2 reconstruction of a
posterior sample, plus ``kl_weight`` x KL), then sets the VAE's
``scaling_factor`` to 1 / std of its latents (posterior modes of a sample of
views) and writes the whole model to ``final/base``; later stages start from
that folder and keep the VAE frozen. For networks trained from scratch (the
shipped ``prior`` architecture), where a random decoder turns any latent into
noise.

Conditioning dropout (per sample): all tokens, the concat latent, or both
(the classifier-free-guidance unconditional: zero tokens after the
projection and a zero latent, as :meth:`Zero123Model.eps_cfg` uses), and each
self-prompted token on its own. Two additions of ours, both can be set to 0:
``single_token_p`` trains a fraction of steps with the input token alone, so
the Base (the Refiner's EMA) keeps its one-token skill; ``coarse_jitter_deg``
generates the coarse view up to that far from the target, as the inference
bank (a 30 deg grid) gives a view near, not at, the target.

The run folder ``RUN`` holds config.yaml, meta.json, progress.json,
``checkpoints/step_XXXXXX.pt`` (student, Base/EMA, optimiser, step, RNG;
``torch.load(weights_only=True)``) and ``final/base`` (a diffusers folder that
``load_zero123`` reads; the cascade's Refiner is the same weights). Training
resumes from the newest checkpoint and stops cleanly at ``max_minutes``.
Every random draw of a step comes from a generator seeded by (seed, process,
step), so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recon.cameras import relative_pose
from recon.data.multiview import MultiViewDataset
from recon.errors import InputError, ReconError, TrainingDivergedError
from recon.guidance.cascade import Conditions, nearby_poses, refiner_tokens
from recon.guidance.config import NEARBY_VIEWS
from recon.guidance.sampling import ddim_sample, to_8bit_levels
from recon.imageio import composite
from recon.systems.checkpoint import (
    list_checkpoints,
    read_checkpoint_file,
    write_checkpoint_file,
)

if TYPE_CHECKING:
    from recon.guidance.model import Zero123Model
    from recon.runs import StepReporter

Stage = Literal["cascade", "base", "vae"]
Precision = Literal["auto", "no", "bf16", "fp16"]
LossWeighting = Literal["eps", "truncated-snr"]
LrScaling = Literal["none", "linear", "sqrt"]
LrSchedule = Literal["constant", "linear"]
STAGES = get_args(Stage)
PRECISIONS = get_args(Precision)
LOSS_WEIGHTINGS = get_args(LossWeighting)
LR_SCALINGS = get_args(LrScaling)
LR_SCHEDULES = get_args(LrSchedule)
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Cascade-Zero123 self-distillation (stage cascade), Zero-1-to-3 fine-tuning (stage base) or VAE training (stage vae)."""

    stage: Stage = "cascade"
    """'cascade': train the Refiner, its EMA is the Base; 'base': plain Zero123 fine-tuning;
    'vae': train the VAE alone as an autoencoder and set its scaling factor (for networks trained
    from scratch; later stages start from that run's final/base and keep the VAE frozen)."""
    steps: int = 2000
    """Optimiser steps in total (a resumed run continues to this count)."""
    batch_size: int = 4
    """Samples per step and process."""
    image_size: int = 0
    """Side of the images fed to the model; 0 = the model's native size (256 for Zero123)."""
    lr_unet: float = 1e-4
    """AdamW learning rate of the UNet."""
    lr_projection: float = 1e-3
    """AdamW learning rate of the 772 -> 768 camera projection."""
    lr_scaling: LrScaling = "none"
    """How the learning rates follow the number of data-parallel processes N (global batch = batch_size x N):
    'none' (as given), 'linear' (x N) or 'sqrt' (x sqrt N); see docs/TRAINING.md."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    lr_schedule: LrSchedule = "constant"
    """The learning rate after the warm-up: 'constant', or 'linear' (down to zero at ``steps``: a run that ends by
    its step count, not by a time limit, finishes at a low rate, where the weights settle)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    ema_decay: float = 0.999
    """EMA decay of the Refiner (capped by (1 + n) / (10 + n) early on)."""
    mixed_precision: Precision = "auto"
    """'auto' (bf16 on CUDA, off on the CPU), 'no', 'bf16' or 'fp16'."""
    loss_weighting: LossWeighting = "eps"
    """'eps': the plain epsilon-MSE of Zero-1-to-3; 'truncated-snr': epsilon-MSE x max(1, 1/SNR(t)), normalised to
    mean 1 over the timesteps (Salimans & Ho 2022), which stresses the noisiest timesteps where sampling starts
    and a model trained from scratch otherwise learns to use its conditioning last."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass (less memory, ~30 % slower)."""
    compile: str = ""
    """Compile the trained UNet and camera projection with torch.compile and this backend before the first
    step: '' = no (eager PyTorch); 'inductor' = its default backend, default mode (no autotuning): fused
    kernels for the norms, activations and dtype casts that bound a small model's step, after a compile of
    the first steps; other backends (e.g. 'aot_eager') trace without generating kernels (for checking)."""
    drop_tokens_p: float = 0.05
    """Chance per sample that all cross-attention tokens are zeroed."""
    drop_latent_p: float = 0.05
    """Chance per sample that the concat latent is zeroed."""
    drop_both_p: float = 0.05
    """Chance per sample that tokens and latent are both zeroed (the CFG unconditional)."""
    drop_extra_token_p: float = 0.1
    """Cascade: chance that each self-prompted token (coarse, nearby) is zeroed on its own."""
    single_token_p: float = 0.1
    """Cascade: fraction of steps trained with the input token alone (keeps the Base's one-token skill)."""
    nearby_views: list[list[float]] = field(default_factory=lambda: [list(v) for v in NEARBY_VIEWS])
    """Self-prompted views, [delta_polar_deg, delta_azimuth_deg, delta_radius] from the input camera."""
    coarse_target: bool = True
    """Cascade: give the Refiner a Base-generated coarse view near the target as a token."""
    coarse_jitter_deg: float = 15.0
    """Cascade: the coarse view is generated up to this far (elevation and azimuth) from the target; 0 = at it."""
    prompt_steps: int = 10
    """DDIM steps of the Base when it self-prompts."""
    prompt_guidance_scale: float = 3.0
    """Classifier-free guidance scale of the Base when it self-prompts."""
    background: float = 1.0
    """Grey level the RGBA views are composited over (Zero123's renders: white)."""
    seed: int = 0
    """Seed of data sampling, noise, dropout and self-prompting."""
    checkpoint_every: int = 500
    """Steps between checkpoints (one is also written when training stops)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    lr_vae: float = 1e-3
    """Stage vae: AdamW learning rate of the VAE."""
    kl_weight: float = 1e-6
    """Stage vae: weight of the KL term (per latent element) against the per-pixel reconstruction loss."""
    chroma_weight: float = 0.0
    """Stage vae: weight of an extra L1 loss on the colour alone (each pixel minus its channel mean), which the
    plain loss, dominated by white background and shading, learns last."""
    scale_samples: int = 512
    """Stage vae: views encoded to measure the latents' std (scaling_factor = 1 / std)."""
    vae_decoder_only: bool = False
    """Stage vae: train only the decoder; the encoder, hence the latent space and scaling_factor, stay as they
    are, so a UNet already trained on those latents keeps working (e.g. to sharpen a trained prior's colours)."""
    preload: bool = False
    """Decode every view once into memory (8-bit RGBA) and draw batches there; fast for datasets that fit in RAM.
    In stage base also encode every view once with the frozen VAE and image encoder (EncodedViews)."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ReconError(f"stage {self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.mixed_precision not in PRECISIONS:
            raise ReconError(f"mixed_precision {self.mixed_precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ReconError(f"loss_weighting {self.loss_weighting!r}: choose one of {', '.join(LOSS_WEIGHTINGS)}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ReconError(f"lr_scaling {self.lr_scaling!r}: choose one of {', '.join(LR_SCALINGS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ReconError(f"lr_schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.steps < 1 or self.batch_size < 1 or self.prompt_steps < 1 or self.scale_samples < 1:
            raise ReconError("steps, batch_size, prompt_steps and scale_samples must be >= 1")
        for name in ("drop_tokens_p", "drop_latent_p", "drop_both_p", "drop_extra_token_p", "single_token_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ReconError(f"{name} must be in [0, 1]")
        for view in self.nearby_views:
            if len(view) != 3:
                raise ReconError(f"nearby_views: each view is [delta_polar_deg, delta_azimuth_deg, delta_radius], got {view!r}")
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile not in backends:
                raise ReconError(f"compile {self.compile!r}: not a torch.compile backend; choose '' (off), inductor or one of {', '.join(backends)}")


# ------------------------------------------------------------------ data
@dataclass
class ViewBatch:
    """B training triples: input and target images (B, 3, S, S) in [0, 1] and their absolute poses (B,)."""

    input_images: Tensor
    input_elevation: Tensor
    input_azimuth: Tensor
    input_radius: Tensor
    target_images: Tensor
    target_elevation: Tensor
    target_azimuth: Tensor
    target_radius: Tensor


def sample_batch(dataset: MultiViewDataset, batch_size: int, generator: torch.Generator, background: float = 1.0) -> ViewBatch:
    """Draws ``batch_size`` objects (with replacement) and, for each, an input view and a different target view."""
    inputs, targets, poses = [], [], []
    for _ in range(batch_size):
        index = int(torch.randint(len(dataset), (1,), generator=generator))
        views = dataset.objects[index].views
        if len(views) < 2:
            raise InputError(f"{dataset.objects[index].folder}: needs at least 2 views for training")
        i, j = torch.randperm(len(views), generator=generator)[:2].tolist()
        inputs.append(composite(dataset.view_image(index, i), background))
        targets.append(composite(dataset.view_image(index, j), background))
        poses.append([views[i].elevation_deg, views[i].azimuth_deg, views[i].radius, views[j].elevation_deg, views[j].azimuth_deg, views[j].radius])
    p = torch.tensor(poses, dtype=torch.float32)
    return ViewBatch(torch.stack(inputs), p[:, 0], p[:, 1], p[:, 2], torch.stack(targets), p[:, 3], p[:, 4], p[:, 5])


class ViewCache:
    """Every view of a :class:`MultiViewDataset` decoded once into memory as 8-bit RGBA (N_views, 4, S, S).

    ``device``: where the images live (the GPU saves a host-to-device copy per
    step). :meth:`sample` draws the same kind of batch as :func:`sample_batch`
    (objects with replacement, two different views each), vectorised.
    """

    def __init__(self, dataset: MultiViewDataset, device: torch.device | str = "cpu", workers: int = 8) -> None:
        from concurrent.futures import ThreadPoolExecutor

        for record in dataset.objects:
            if len(record.views) < 2:
                raise InputError(f"{record.folder}: needs at least 2 views for training")
        pairs = [(i, v) for i, record in enumerate(dataset.objects) for v in range(len(record.views))]

        size = dataset.image_size

        def load(pair: tuple[int, int]) -> Tensor:
            # Fast path for 8-bit RGBA PNGs already at the size without an EXIF rotation (e.g. `recon data
            # synth`): their bytes as they are, which is what the general decode gives after rounding; PIL
            # decodes without holding the GIL. Anything else, unreadable files included, takes the general
            # decode (its checks and its one-line errors).
            from PIL import Image

            try:
                with Image.open(dataset.objects[pair[0]].views[pair[1]].image_path) as image:
                    plain = (
                        image.format == "PNG" and image.mode == "RGBA" and size is not None and image.size == (size, size)
                        and len(image.tile) == 1 and image.tile[0][3] == "RGBA"  # not "RGBA;16B": 16 bits per channel
                        and image.getexif().get(0x0112, 1) == 1
                    )
                    if plain:
                        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
            except (OSError, ValueError, SyntaxError):
                pass
            return (dataset.view_image(*pair) * 255.0).round().to(torch.uint8)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            images = list(pool.map(load, pairs))
        self.images = torch.stack(images).to(device)
        counts = [len(record.views) for record in dataset.objects]
        self.counts = torch.tensor(counts)
        self.offsets = torch.cumsum(torch.tensor([0] + counts[:-1]), 0)
        self.poses = torch.tensor([[v.elevation_deg, v.azimuth_deg, v.radius] for r in dataset.objects for v in r.views], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.counts)

    def rgb(self, flat_index: Tensor, background: float) -> Tensor:
        """(B, 3, S, S) float images in [0, 1] of flat view indices (B,), composited over ``background``."""
        rgba = self.images[flat_index.to(self.images.device)].float() / 255.0
        return composite(rgba, background)

    def sample_views(self, count: int, generator: torch.Generator, background: float = 1.0) -> Tensor:
        """``count`` views drawn uniformly (with replacement) from all views, (count, 3, S, S)."""
        return self.rgb(torch.randint(self.images.shape[0], (count,), generator=generator), background)

    def sample_pairs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Flat view indices (B,) of ``batch_size`` input views and, of the same objects, different target views
        (objects drawn with replacement)."""
        objects = torch.randint(len(self.counts), (batch_size,), generator=generator)
        counts = self.counts[objects]
        first = (torch.rand(batch_size, generator=generator) * counts).long().clamp_max(counts - 1)
        shift = 1 + (torch.rand(batch_size, generator=generator) * (counts - 1)).long().clamp_max(counts - 2)
        return self.offsets[objects] + first, self.offsets[objects] + torch.remainder(first + shift, counts)

    def batch(self, inputs: Tensor, targets: Tensor, background: float = 1.0) -> ViewBatch:
        """The :class:`ViewBatch` of flat input and target view indices (B,)."""
        pi, pj = self.poses[inputs], self.poses[targets]
        return ViewBatch(self.rgb(inputs, background), pi[:, 0], pi[:, 1], pi[:, 2], self.rgb(targets, background), pj[:, 0], pj[:, 1], pj[:, 2])

    def sample(self, batch_size: int, generator: torch.Generator, background: float = 1.0) -> ViewBatch:
        """A :class:`ViewBatch` of ``batch_size`` (object, input view, different target view) triples."""
        return self.batch(*self.sample_pairs(batch_size, generator), background)


@dataclass
class EncodedBatch:
    """What the frozen encoders make of a :class:`ViewBatch`: the inputs' image embeddings (B, D), their concat
    latents (B, 4, h, w; :meth:`Zero123Model.cond_latent`) and the targets' diffusion latents (B, 4, h, w;
    :meth:`Zero123Model.encode`)."""

    input_embeds: Tensor
    cond_latent: Tensor
    target: Tensor


class EncodedViews:
    """Every view of a :class:`ViewCache` passed once through the frozen VAE encoder (posterior mode) and image
    encoder, on the model's device.

    Both encoders are deterministic and frozen outside stage vae, so stage base
    reads a batch's latents and embeddings here instead of encoding 2 B images
    per step (over half of a step's arithmetic for the ``prior``
    architecture). ``autocast``: the context the encoders run in (the
    training's mixed precision).
    """

    def __init__(self, views: ViewCache, model: Zero123Model, background: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, chunk: int = 256) -> None:
        modes, embeds = [], []
        with torch.no_grad(), autocast():
            for index in torch.arange(views.images.shape[0]).split(chunk):
                rgb = views.rgb(index, background).to(model.device)
                modes.append(model.cond_latent(rgb).float())
                embeds.append(model.clip_embed(rgb).float())
        self.modes = torch.cat(modes)
        self.embeds = torch.cat(embeds)
        self.scaling_factor = model.scaling_factor

    def encoded(self, inputs: Tensor, targets: Tensor) -> EncodedBatch:
        """The :class:`EncodedBatch` of flat input and target view indices (B,)."""
        inputs, targets = inputs.to(self.modes.device), targets.to(self.modes.device)
        return EncodedBatch(self.embeds[inputs], self.modes[inputs], self.modes[targets] * self.scaling_factor)


@dataclass
class Prompts:
    """Self-prompted views per sample: nearby (B, N, 3, S, S) with poses (B, N); coarse (B, 3, S, S) or None."""

    nearby_images: Tensor
    nearby_elevation: Tensor
    nearby_azimuth: Tensor
    nearby_radius: Tensor
    coarse_images: Tensor | None
    coarse_elevation: Tensor | None
    coarse_azimuth: Tensor | None
    coarse_radius: Tensor | None


@torch.no_grad()
def self_prompt(base: Zero123Model, batch: ViewBatch, cfg: TrainConfig, generator: torch.Generator) -> Prompts:
    """The Base's nearby views of each input and, if ``cfg.coarse_target``, a coarse view near each target.

    All samples' views in one batched DDIM + CFG run (``cfg.prompt_steps``),
    as :func:`guidance.cascade.generate_views` samples them one input at a
    time: initial noise from ``generator`` on the CPU, outputs rounded to
    8-bit levels.
    """
    b = batch.input_images.shape[0]
    n = len(cfg.nearby_views)
    near = [nearby_poses(float(batch.input_elevation[k]), float(batch.input_azimuth[k]), float(batch.input_radius[k]), cfg.nearby_views) for k in range(b)]
    n_el, n_az, n_r = (torch.stack([p[c] for p in near]) for c in range(3))
    t_el, t_az, t_r = n_el, n_az, n_r
    coarse_pose = None
    if cfg.coarse_target:
        jitter = (torch.rand(b, 2, generator=generator) * 2 - 1) * cfg.coarse_jitter_deg
        coarse_pose = torch.stack([(batch.target_elevation + jitter[:, 0]).clamp(-89.0, 89.0), batch.target_azimuth + jitter[:, 1], batch.target_radius.clone()], dim=1)
        t_el, t_az, t_r = (torch.cat([t, coarse_pose[:, c : c + 1]], dim=1) for c, t in enumerate((n_el, n_az, n_r)))
    per = t_el.shape[1]
    rel = relative_pose(
        t_el.reshape(-1), t_az.reshape(-1), t_r.reshape(-1),
        batch.input_elevation.repeat_interleave(per), batch.input_azimuth.repeat_interleave(per),
        batch.input_radius.repeat_interleave(per), encoding=base.pose_encoding,
    )
    device = base.device
    inputs = batch.input_images.to(device=device, dtype=torch.float32)
    clip = base.clip_embed(inputs).repeat_interleave(per, dim=0)
    latent = base.cond_latent(inputs).repeat_interleave(per, dim=0)
    noise = torch.randn(latent.shape, generator=generator)
    context = base.context(clip, rel.to(device))
    images = to_8bit_levels(ddim_sample(base, context, latent, noise, cfg.prompt_steps, cfg.prompt_guidance_scale, batch_size=noise.shape[0]))
    # Prompts live where the batch lives (cascade_tokens concatenates them with the inputs).
    images = images.view(b, per, *images.shape[1:]).to(batch.input_images.device)
    return Prompts(
        images[:, :n], n_el, n_az, n_r,
        images[:, n] if cfg.coarse_target else None,
        *((coarse_pose[:, k] for k in range(3)) if coarse_pose is not None else (None, None, None)),
    )


# ------------------------------------------------------------ conditioning
def condition_dropout(
    batch: int, tokens: int, cfg: TrainConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Keep masks for conditioning dropout: tokens (B, K) and latent (B,), 1 = keep, 0 = zeroed.

    Token 0 is the input; tokens 1.. are self-prompted views, dropped one by
    one with ``drop_extra_token_p``. ``drop_tokens_p`` zeroes all of a
    sample's tokens, ``drop_latent_p`` its latent, ``drop_both_p`` both.
    """
    both = torch.rand(batch, generator=generator) < cfg.drop_both_p
    no_tokens = (torch.rand(batch, generator=generator) < cfg.drop_tokens_p) | both
    no_latent = (torch.rand(batch, generator=generator) < cfg.drop_latent_p) | both
    keep = torch.ones(batch, tokens)
    if tokens > 1:
        keep[:, 1:] = (torch.rand(batch, tokens - 1, generator=generator) >= cfg.drop_extra_token_p).float()
    keep[no_tokens] = 0.0
    return keep, (~no_latent).float()


def cascade_tokens(model: Zero123Model, batch: ViewBatch, prompts: Prompts | None, input_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CLIP embeds (B, K, D) and poses (B, K, 4) of the conditioning tokens for each sample's target.

    With ``prompts`` the Refiner's tokens [input, coarse, nearby...] from
    :func:`guidance.cascade.refiner_tokens`; without, the single Zero123 token
    (input, pose of the target relative to the input), whose embeddings
    ``input_embeds`` (B, D) gives when they are already known.
    """
    device = model.device
    b = batch.input_images.shape[0]
    if prompts is None:
        if input_embeds is None:
            input_embeds = model.clip_embed(batch.input_images.to(device))
        embeds = input_embeds.to(device, model.dtype)[:, None]
        poses = relative_pose(
            batch.target_elevation, batch.target_azimuth, batch.target_radius,
            batch.input_elevation, batch.input_azimuth, batch.input_radius, encoding=model.pose_encoding,
        )[:, None]
        return embeds, poses.to(device)
    n = prompts.nearby_images.shape[1]
    images = [batch.input_images, prompts.nearby_images.flatten(0, 1)]
    if prompts.coarse_images is not None:
        images.append(prompts.coarse_images)
    clip = model.clip_embed(torch.cat(images).to(device))
    clip_in, clip_near = clip[:b], clip[b : b + b * n].view(b, n, -1)
    clip_coarse = clip[b + b * n :] if prompts.coarse_images is not None else None
    embeds, poses = [], []
    for i in range(b):
        inputs = Conditions(clip_in[i : i + 1], batch.input_elevation[i : i + 1], batch.input_azimuth[i : i + 1], batch.input_radius[i : i + 1])
        nearby = Conditions(clip_near[i], prompts.nearby_elevation[i], prompts.nearby_azimuth[i], prompts.nearby_radius[i])
        bank = None
        if clip_coarse is not None:
            bank = Conditions(clip_coarse[i : i + 1], prompts.coarse_elevation[i : i + 1], prompts.coarse_azimuth[i : i + 1], prompts.coarse_radius[i : i + 1])
        target = (batch.target_elevation[i : i + 1], batch.target_azimuth[i : i + 1], batch.target_radius[i : i + 1])
        e, p = refiner_tokens(target, inputs, nearby, bank, model.pose_encoding)
        embeds.append(e)
        poses.append(p)
    return torch.cat(embeds), torch.cat(poses)


class Denoiser(nn.Module):
    """The trainable part of a Zero123Model (UNet + camera projection) as one module for DDP/accelerate.

    ``forward(noisy, t, embeds (B, K, D), poses (B, K, 4), cond_latent, token_keep (B, K), latent_keep (B,))``
    projects the tokens, applies the dropout masks and returns eps (B, 4, h, w).
    """

    def __init__(self, model: Zero123Model) -> None:
        super().__init__()
        self.unet = model.unet
        self.camera_projection = model.camera_projection
        # Not a submodule: the frozen VAE/CLIP must stay out of DDP and the optimiser.
        object.__setattr__(self, "_model", model)

    def forward(self, noisy: Tensor, t: Tensor, embeds: Tensor, poses: Tensor, cond_latent: Tensor, token_keep: Tensor, latent_keep: Tensor) -> Tensor:
        """See the class docstring."""
        model = self._model
        context = model.context(embeds, poses) * token_keep[..., None].to(embeds.device, model.dtype)
        latent = cond_latent * latent_keep[:, None, None, None].to(cond_latent.device, cond_latent.dtype)
        return model.eps(noisy, t, context, latent)


def trainable_modules(model: Zero123Model) -> list[nn.Module]:
    """The modules that training changes: the UNet and the camera projection."""
    return [model.unet, model.camera_projection]


@torch.no_grad()
def ema_update(target: Zero123Model, source: Zero123Model, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, over the trainable modules' parameters and buffers."""
    for t_mod, s_mod in zip(trainable_modules(target), trainable_modules(source)):
        # One multi-tensor launch per module instead of one per parameter (a step of the tiny prior is short).
        torch._foreach_lerp_(list(t_mod.parameters()), [s.detach() for s in s_mod.parameters()], 1.0 - decay)
        for t, s in zip(t_mod.buffers(), s_mod.buffers()):
            t.copy_(s)


def timestep_weights(scheduler: Any, weighting: str) -> Tensor:
    """Per-timestep loss weights (num_train_timesteps,) for ``TrainConfig.loss_weighting``.

    'eps': all ones. 'truncated-snr': max(1, 1/SNR(t)) with SNR = alpha_bar / (1 - alpha_bar), divided by
    its mean so that the loss keeps the epsilon-MSE's scale under uniform timestep sampling.
    """
    alpha_bar = scheduler.alphas_cumprod.double()
    if weighting == "eps":
        return torch.ones_like(alpha_bar).float()
    weights = torch.clamp((1.0 - alpha_bar) / alpha_bar, min=1.0)
    return (weights / weights.mean()).float()


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay used after optimiser step ``step`` (1-based): min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1.0 + step) / (10.0 + step))


def base_copy(model: Zero123Model) -> Zero123Model:
    """A second Zero123Model with its own UNet and projection but sharing the frozen VAE, CLIP and scheduler."""
    from recon.guidance.model import Zero123Model

    base = Zero123Model(
        copy.deepcopy(model.unet), model.vae, model.image_encoder, copy.deepcopy(model.camera_projection),
        model.scheduler, model.pose_encoding, model.is_random, model.description,
    )
    base.eval().requires_grad_(False)
    return base.to(model.device)  # its own CLIP normalisation buffers start on the CPU


def lr_factor(scaling: str, processes: int) -> float:
    """The learning-rate multiplier of ``TrainConfig.lr_scaling`` for ``processes`` data-parallel processes."""
    return {"none": 1.0, "linear": float(processes), "sqrt": math.sqrt(processes)}[scaling]


def lr_scale(cfg: TrainConfig, step: int) -> float:
    """The multiplier of the base learning rates at 0-based ``step``: the linear warm-up over
    ``cfg.warmup_steps``, then ``cfg.lr_schedule`` (1, or a straight line from 1 after the warm-up to 0 at
    ``cfg.steps``)."""
    warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant":
        return warmup
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    return min(warmup, max(0.0, (cfg.steps - step) / decay_steps))


TIME_CHECK_EVERY = 10
"""Steps between the processes' joint budget checks when several train (each check is a collective and a sync)."""


def out_of_time(accelerator: Any, start: float, max_minutes: float | None, step: int = 0) -> bool:
    """Whether ``max_minutes`` have passed since ``start``, decided by all processes together (any one over
    the budget stops them all, so that no process waits forever in a gradient all-reduce).

    One process decides on the host alone. Several decide only at steps that are multiples of
    :data:`TIME_CHECK_EVERY` (the same steps on every process; False in between), since the joint decision
    is an all-reduce that makes each process wait for its GPU: a run may overrun its budget by that many steps.
    """
    if max_minutes is None:
        return False
    over = time.perf_counter() - start > 60.0 * max_minutes
    if accelerator.num_processes == 1:
        return over
    if step % TIME_CHECK_EVERY != 0:
        return False
    flag = accelerator.reduce(torch.tensor([float(over)], device=accelerator.device), reduction="sum")
    return bool(flag.item() > 0)


class Throughput:
    """Samples per second of a training launch, timed from the end of its first step (which includes warm-up)."""

    def __init__(self, global_batch: int, start_step: int) -> None:
        self.global_batch = global_batch
        self.start_step = start_step
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def stepped(self, step: int) -> None:
        """Call after every optimiser step."""
        now = (step, time.perf_counter())
        if self.first is None:
            self.first = now
        self.last = now

    def record(self, processes: int, lr_multiplier: float) -> dict[str, Any]:
        """What meta.json's ``launches`` keeps of this launch: processes, global batch, lr factor, steps and samples/s."""
        samples_per_s = None
        if self.first is not None and self.last is not None and self.last[0] > self.first[0]:
            samples_per_s = round((self.last[0] - self.first[0]) * self.global_batch / (self.last[1] - self.first[1]), 2)
        end = self.last[0] if self.last is not None else self.start_step
        return {"processes": processes, "global_batch": self.global_batch, "lr_factor": round(lr_multiplier, 4),
                "steps": [self.start_step, end], "samples_per_s": samples_per_s}


def step_generator(seed: int, process: int, step: int) -> torch.Generator:
    """The CPU generator of every random draw of ``step`` on process ``process``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + process)


def device_noise(shape: tuple[int, ...] | torch.Size, device: torch.device, generator: torch.Generator) -> Tensor:
    """Standard normal float32 noise of ``shape`` drawn on ``device`` by a generator there, seeded from the CPU
    ``generator`` (one draw from it), so a step's noise still follows from (seed, process, step).

    A training step's noise is the size of its latents (16 MiB at batch 1,024 of the ``prior``): drawn on the
    CPU and copied over, it took tens of milliseconds of host time per step while the GPU waited.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)


def record_loss(value: float, step: int, losses: list[float], reporter: StepReporter | None,
                on_step: Callable[[int, float], None] | None, what: str, lower: str) -> None:
    """Appends step ``step``'s loss ``value`` to ``losses`` and, on the main process (``reporter`` given), shows
    the mean of the last 20 and calls ``on_step``. A non-finite ``value`` raises TrainingDivergedError, whose
    message names ``what`` and the setting to ``lower``."""
    if not math.isfinite(value):
        raise TrainingDivergedError(f"{what} is {value} at step {step}; lower {lower} or use bf16/fp32")
    losses.append(value)
    if reporter is not None:
        reporter.update(step, f"loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if on_step is not None:
            on_step(step, value)


# ------------------------------------------------------------------ trainer
class Trainer:
    """Holds the student (Refiner, or the model in stage base), the Base (= EMA) and the optimiser.

    ``accelerator``: an ``accelerate.Accelerator`` (multi-GPU, mixed
    precision); the trainer prepares the denoiser and optimiser with it.
    """

    def __init__(self, cfg: TrainConfig, model: Zero123Model, accelerator: Any) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.student = model
        self.student.requires_grad_(False)
        for module in trainable_modules(model):
            module.requires_grad_(True)
            module.train()
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        self.base = base_copy(model)
        self.denoiser = Denoiser(model)
        # Peak rates of the UNet and projection groups, from the config and this launch's process count (not from a
        # checkpoint's optimiser state, so a run resumed on another number of GPUs scales for that number).
        factor = lr_factor(cfg.lr_scaling, accelerator.num_processes)
        self.base_lrs = [cfg.lr_unet * factor, cfg.lr_projection * factor]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": list(model.unet.parameters()), "lr": self.base_lrs[0]},
                {"params": list(model.camera_projection.parameters()), "lr": self.base_lrs[1]},
            ],
            weight_decay=cfg.weight_decay,
            fused=model.device.type == "cuda",  # one kernel for all parameters instead of a few per tensor list
        )
        self.step = 0
        self._prepared = None
        self.loss_weights = timestep_weights(model.scheduler, cfg.loss_weighting).to(model.device)

    @property
    def image_size(self) -> int:
        """Side of the images the model is fed."""
        return self.cfg.image_size or int(self.student.vae.config.sample_size)

    def prepare(self) -> None:
        """Compiles the denoiser if ``cfg.compile`` names a backend (in place: the parameters' names stay), then
        wraps it and the optimiser with the accelerator (call after restoring a checkpoint)."""
        if self.cfg.compile:
            self.denoiser.compile(backend=self.cfg.compile)
        self._prepared = self.accelerator.prepare(self.denoiser, self.optimizer)

    def _set_lr(self, optimizer: torch.optim.Optimizer) -> None:
        scale = lr_scale(self.cfg, self.step)
        for group, base_lr in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * scale

    def train_step(self, batch: ViewBatch, generator: torch.Generator, prompts: Prompts | None = None,
                   encoded: EncodedBatch | None = None) -> float:
        """One optimiser step on ``batch`` (self-prompting first in stage cascade); returns the loss.

        :meth:`queue_step`, then its loss read back (a wait for the device).
        """
        return float(self.queue_step(batch, generator, prompts, encoded))

    def queue_step(self, batch: ViewBatch, generator: torch.Generator, prompts: Prompts | None = None,
                   encoded: EncodedBatch | None = None) -> Tensor:
        """One optimiser step on ``batch`` (self-prompting first in stage cascade), queued on the device; returns
        the loss as a 0-dim tensor there, not yet read (reading it waits for the step).

        All random draws (single-token choice, prompts, timesteps, dropout, and
        the seed of the noise, drawn on the model's device) come from
        ``generator``; ``prompts`` skips self-prompting; ``encoded`` (the
        batch's :class:`EncodedBatch`) skips the frozen encoders on
        single-token steps.
        """
        if self._prepared is None:
            self.prepare()
        denoiser, optimizer = self._prepared
        cfg, model, acc = self.cfg, self.student, self.accelerator
        device = model.device
        use_cascade = cfg.stage == "cascade" and float(torch.rand(1, generator=generator)) >= cfg.single_token_p
        with acc.autocast():
            if use_cascade and prompts is None:
                prompts = self_prompt(self.base, batch, cfg, generator)
            with torch.no_grad():
                if encoded is not None and not use_cascade:
                    embeds, poses = cascade_tokens(model, batch, None, encoded.input_embeds)
                    cond_latent, target = encoded.cond_latent, encoded.target
                else:
                    embeds, poses = cascade_tokens(model, batch, prompts if use_cascade else None)
                    cond_latent = model.cond_latent(batch.input_images.to(device))
                    target = model.encode(batch.target_images.to(device))
        b = target.shape[0]
        t = torch.randint(0, model.scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
        noise = device_noise(target.shape, device, generator)
        noisy = model.scheduler.add_noise(target.float(), noise, t)
        token_keep, latent_keep = condition_dropout(b, embeds.shape[1], cfg, generator)
        self._set_lr(optimizer)
        with acc.autocast():
            eps = denoiser(noisy, t, embeds, poses, cond_latent, token_keep.to(device), latent_keep.to(device))
        per_sample = (eps.float() - noise).pow(2).flatten(1).mean(dim=1)
        loss = (per_sample * self.loss_weights[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_([p for m in trainable_modules(model) for p in m.parameters()], cfg.grad_clip)
        optimizer.step()
        self.step += 1
        ema_update(self.base, model, ema_decay_at(self.step, cfg.ema_decay))
        return loss.detach()

    # -------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Everything a checkpoint needs (tensors and plain values)."""
        from recon.runtime import rng_state

        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "stage": self.cfg.stage,
            "student": {f"{i}.{k}": v for i, m in enumerate(trainable_modules(self.student)) for k, v in m.state_dict().items()},
            "base": {f"{i}.{k}": v for i, m in enumerate(trainable_modules(self.base)) for k, v in m.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
        }

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        """Restores :meth:`state` (call before :meth:`prepare`)."""
        from recon.runtime import set_rng_state

        if state.get("format") != CHECKPOINT_FORMAT or state.get("stage") != self.cfg.stage:
            raise InputError(f"{path}: not a {self.cfg.stage}-stage training checkpoint of this format")
        for key, model in (("student", self.student), ("base", self.base)):
            for i, module in enumerate(trainable_modules(model)):
                prefix = f"{i}."
                module.load_state_dict({k[len(prefix) :]: v for k, v in state[key].items() if k.startswith(prefix)})
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        rng = dict(state["rng"])
        if "cuda" in rng:  # saved on a machine with another number of GPUs: restore those that exist here
            rng["cuda"] = list(rng["cuda"])[: torch.cuda.device_count()]
        set_rng_state(rng)


def export_base(trainer: Trainer, folder: Path, init: str) -> Path:
    """Writes the Base (the EMA weights) as a diffusers folder that ``load_zero123`` reads."""
    from recon.guidance.checkpoints import save_diffusers

    base = trainer.base
    base.is_random = False
    base.description = f"recon train-cascade (stage {trainer.cfg.stage}) from {init}, {trainer.step} steps"
    return save_diffusers(base, folder, overwrite=True)


def make_accelerator(device: str, mixed_precision: str) -> Any:
    """An ``accelerate.Accelerator`` on ``device`` (``auto``/``cpu``/``cuda``) with the chosen precision."""
    try:
        from accelerate import Accelerator
    except ImportError as exc:
        raise ReconError("training needs the 'accelerate' package: pip install accelerate (or recon[train])") from exc
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if mixed_precision == "auto":
        mixed_precision = "no" if cpu else "bf16"
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


@dataclass
class TrainResult:
    """What :func:`train` did: the step reached, whether training finished, the last losses, the Base folder."""

    step: int
    finished: bool
    losses: list[float]
    final: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    """Stage vae: reconstruction PSNR, chroma PSNR and :func:`latent_colour_share` before/after on a fixed batch,
    the latents' std and scaling_factor."""


def train(
    cfg: TrainConfig, data: Path, init: str, run_dir: Path, device: str = "auto",
    max_minutes: float | None = None, resume: bool = True,
    export_on_stop: bool = False, on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Trains from ``init`` (any ``load_zero123`` spec, e.g. a weights folder or ``random-tiny``) on ``data``.

    Resumes from ``run_dir/checkpoints`` when it holds a checkpoint (and
    ``resume``). Stops after ``cfg.steps`` steps (then writes
    ``run_dir/final/base``) or after ``max_minutes`` (with a checkpoint, and
    also ``final/base`` when ``export_on_stop``). ``on_step(step, loss)`` is
    called on the main process after every step. Stage ``vae`` goes to
    :func:`train_vae`.
    """
    if cfg.stage == "vae":
        return train_vae(cfg, data, init, run_dir, device, max_minutes, resume, on_step)
    from recon.config import to_plain
    from recon.guidance.checkpoints import load_zero123
    from recon.progress import info
    from recon.runs import RunDir, StepReporter

    start = time.perf_counter()
    acc = make_accelerator(device, cfg.mixed_precision)
    main = acc.is_main_process
    run_dir = Path(run_dir)
    plain = {"train": to_plain(cfg), "data": str(data), "init": str(init)}
    existed = RunDir.is_run(run_dir)
    if existed and not resume:
        raise ReconError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another folder")
    # Every process looks before the main one creates the folder.
    acc.wait_for_everyone()
    run = RunDir.create(run_dir, plain, seed=cfg.seed, device=str(acc.device)) if main and not existed else RunDir(run_dir)
    if main:
        run.update_meta(processes=acc.num_processes)
    acc.wait_for_everyone()
    model = load_zero123(init, acc.device, torch.float32, seed=cfg.seed)
    trainer = Trainer(cfg, model, acc)
    dataset = MultiViewDataset(data, image_size=trainer.image_size)
    cache = ViewCache(dataset, acc.device) if cfg.preload else None
    encoded = EncodedViews(cache, model, cfg.background, acc.autocast) if cache is not None and cfg.stage == "base" else None
    found = list_checkpoints(run.checkpoints)
    if found:
        trainer.load_state(read_checkpoint_file(found[-1][1]), found[-1][1])
        if main:
            info(f"resumed {run_dir} at step {trainer.step}")
    trainer.prepare()
    losses: list[float] = []
    stopped_early = False
    speed = Throughput(cfg.batch_size * acc.num_processes, trainer.step)
    reporter = StepReporter(run, f"train {cfg.stage}", cfg.steps, trainer.step) if main else contextlib.nullcontext()
    # Each step's loss is read after the next step has been queued, so the host prepares step n + 1 while the
    # device still runs step n; every queued loss is read before a checkpoint and at the end.
    queued: list[tuple[int, Tensor]] = []

    def read_queued() -> None:
        for step, value in queued:
            record_loss(float(value), step, losses, reporter if main else None, on_step, "loss", "the learning rate")
        queued.clear()

    with reporter:
        while trainer.step < cfg.steps:
            if out_of_time(acc, start, max_minutes, trainer.step):
                stopped_early = True
                break
            generator = step_generator(cfg.seed, acc.process_index, trainer.step)
            pair = cache.sample_pairs(cfg.batch_size, generator) if cache is not None else None
            batch = cache.batch(*pair, cfg.background) if pair is not None else sample_batch(dataset, cfg.batch_size, generator, cfg.background)
            value = trainer.queue_step(batch, generator, encoded=encoded.encoded(*pair) if encoded is not None else None)
            if len(queued) > 0:
                read_queued()
            queued.append((trainer.step, value))
            speed.stepped(trainer.step)
            if trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.steps:
                read_queued()
                if main:
                    write_checkpoint_file(run.checkpoints, trainer.step, trainer.state(), cfg.keep_checkpoints)
        read_queued()
    final = None
    if main:
        launches = run.read_meta().get("launches", [])
        run.update_meta(launches=[*launches, speed.record(acc.num_processes, lr_factor(cfg.lr_scaling, acc.num_processes))])
        write_checkpoint_file(run.checkpoints, trainer.step, trainer.state(), cfg.keep_checkpoints)
        if not stopped_early or export_on_stop:
            final = export_base(trainer, run.root / "final" / "base", init)
        run.write_progress(f"train {cfg.stage}", trainer.step, cfg.steps, None, "interrupted" if stopped_early else "finished",
                           loss=(sum(losses[-20:]) / len(losses[-20:])) if losses else None)
    acc.wait_for_everyone()
    return TrainResult(trainer.step, not stopped_early, losses, final)


# ------------------------------------------------------------------ stage vae
class AutoencoderLoss(nn.Module):
    """The VAE as one module for DDP/accelerate.

    ``forward(x (B, 3, S, S) in [-1, 1], noise (B, C, h, w))`` -> the
    reconstruction (B, 3, S, S) of the posterior sample ``mean + std * noise``
    and the KL divergence to N(0, I) per latent element (B,).
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """See the class docstring."""
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * noise.to(dist.mean.dtype)
        kl = 0.5 * (dist.mean.float() ** 2 + dist.var.float() - 1.0 - dist.logvar.float()).flatten(1).mean(1)
        return self.vae.decode(z).sample, kl


@torch.no_grad()
def reconstruction_scores(vae: nn.Module, images: Tensor, chunk: int = 64) -> dict[str, float]:
    """PSNR (dB) of ``images`` (N, 3, S, S) in [0, 1] through the VAE (posterior mode, decoded, clamped):
    ``psnr`` of the RGB values and ``chroma_psnr`` of the colour alone (each pixel minus its channel mean),
    which a VAE that only reproduces brightness scores badly on."""
    errors, chroma_errors = [], []
    for part in images.split(chunk):
        x = (part * 2.0 - 1.0).to(vae.dtype)
        rec = ((vae.decode(vae.encode(x).latent_dist.mode()).sample.float() + 1.0) / 2.0).clamp(0, 1)
        diff = rec - part.float()
        errors.append(diff.square().flatten(1).mean(1))
        chroma_errors.append((diff - diff.mean(dim=1, keepdim=True)).square().flatten(1).mean(1))
    return {
        name: float(-10.0 * torch.log10(torch.cat(err).mean().clamp_min(1e-10)))
        for name, err in (("psnr", errors), ("chroma_psnr", chroma_errors))
    }


@torch.no_grad()
def latent_colour_share(vae: nn.Module, images: Tensor, chunk: int = 64) -> float:
    """How much of the latent space carries colour: mean |mode(x) - mode(grey(x))| / std(mode(x)) over the
    posterior modes of ``images`` (N, 3, S, S) in [0, 1] and of the same images greyed (channel mean). Near 0
    when colour lives in tiny latent variations that diffusion noise drowns (a UNet then cannot learn it)."""
    diffs, modes = [], []
    for part in images.split(chunk):
        x = (part * 2.0 - 1.0).to(vae.dtype)
        grey = x.mean(dim=1, keepdim=True).expand_as(x)
        mode = vae.encode(x).latent_dist.mode().float()
        diffs.append((mode - vae.encode(grey).latent_dist.mode().float()).abs().flatten())
        modes.append(mode.flatten())
    return float(torch.cat(diffs).mean() / torch.cat(modes).std().clamp_min(1e-12))


@torch.no_grad()
def latent_std(vae: nn.Module, images: Tensor, chunk: int = 64) -> float:
    """Standard deviation over all elements of the posterior modes of ``images`` (N, 3, S, S) in [0, 1]."""
    modes = [vae.encode((part * 2.0 - 1.0).to(vae.dtype)).latent_dist.mode().float() for part in images.split(chunk)]
    return float(torch.cat(modes).std())


def _random_views(dataset: MultiViewDataset, cache: ViewCache | None, count: int, generator: torch.Generator, background: float) -> Tensor:
    """``count`` views drawn uniformly over objects, then views, (count, 3, S, S) over ``background``."""
    if cache is not None:
        return cache.sample_views(count, generator, background)
    views = []
    for _ in range(count):
        index = int(torch.randint(len(dataset), (1,), generator=generator))
        view = int(torch.randint(len(dataset.objects[index].views), (1,), generator=generator))
        views.append(composite(dataset.view_image(index, view), background))
    return torch.stack(views)


def train_vae(
    cfg: TrainConfig, data: Path, init: str, run_dir: Path, device: str = "auto",
    max_minutes: float | None = None, resume: bool = True, on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Stage vae: trains ``init``'s VAE as an autoencoder on ``data`` and writes the model to ``run_dir/final/base``.

    Loss per step: L1 + L2 between the views (in [-1, 1]) and the decoded
    posterior samples, plus ``cfg.chroma_weight`` x L1 of their colour
    difference alone (each pixel's error minus its channel mean), plus
    ``cfg.kl_weight`` x KL per latent element;
    AdamW (``cfg.lr_vae``, warm-up, clip). Ends after ``cfg.steps`` steps or
    ``max_minutes``; either way the VAE's ``scaling_factor`` becomes 1 / std
    of the latents of ``cfg.scale_samples`` views (unless
    ``cfg.vae_decoder_only``: then only the decoder trains and the encoder and
    scaling factor are kept) and the whole model (UNet,
    image encoder and projection untouched) is written. No mid-run
    checkpoints: rerunning starts the VAE training over.
    """
    from recon.config import to_plain
    from recon.guidance.checkpoints import load_zero123, save_diffusers
    from recon.runs import RunDir, StepReporter

    start = time.perf_counter()
    acc = make_accelerator(device, cfg.mixed_precision)
    main = acc.is_main_process
    run_dir = Path(run_dir)
    existed = RunDir.is_run(run_dir)
    if existed and not resume:
        raise ReconError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another folder")
    acc.wait_for_everyone()
    plain = {"train": to_plain(cfg), "data": str(data), "init": str(init)}
    run = RunDir.create(run_dir, plain, seed=cfg.seed, device=str(acc.device)) if main and not existed else RunDir(run_dir)
    acc.wait_for_everyone()
    model = load_zero123(init, acc.device, torch.float32, seed=cfg.seed)
    vae = model.vae
    size = cfg.image_size or int(vae.config.sample_size)
    dataset = MultiViewDataset(data, image_size=size)
    cache = ViewCache(dataset, acc.device) if cfg.preload else None
    fixed = _random_views(dataset, cache, min(32, cfg.scale_samples), torch.Generator().manual_seed(cfg.seed + 1), cfg.background).to(acc.device)
    before = {**reconstruction_scores(vae, fixed), "colour_share": latent_colour_share(vae, fixed)}
    trained = [vae.decoder, vae.post_quant_conv] if cfg.vae_decoder_only else [vae]
    vae.requires_grad_(False)
    for module in trained:
        module.requires_grad_(True)
        module.train()
    parameters = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr_vae, weight_decay=0.0)
    module, optimizer = acc.prepare(AutoencoderLoss(vae), optimizer)
    latent_side = size // model.latent_scale
    losses: list[float] = []
    step = 0
    stopped_early = False
    reporter = StepReporter(run, "train vae", cfg.steps, 0) if main else contextlib.nullcontext()
    with reporter:
        while step < cfg.steps:
            if out_of_time(acc, start, max_minutes, step):
                stopped_early = True
                break
            generator = step_generator(cfg.seed, acc.process_index, step)
            x = _random_views(dataset, cache, cfg.batch_size, generator, cfg.background).to(acc.device) * 2.0 - 1.0
            noise = torch.randn((x.shape[0], vae.config.latent_channels, latent_side, latent_side), generator=generator).to(acc.device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_vae * lr_factor(cfg.lr_scaling, acc.num_processes) * lr_scale(cfg, step)
            with acc.autocast():
                rec, kl = module(x, noise)
            rec = rec.float()
            loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + cfg.kl_weight * kl.float().mean()
            if cfg.chroma_weight > 0:
                diff = rec - x
                loss = loss + cfg.chroma_weight * (diff - diff.mean(dim=1, keepdim=True)).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(parameters, cfg.grad_clip)
            optimizer.step()
            step += 1
            record_loss(float(loss.detach()), step, losses, reporter if main else None, on_step, "VAE loss", "lr_vae")
    vae.eval().requires_grad_(False)
    std = latent_std(vae, _random_views(dataset, cache, cfg.scale_samples, torch.Generator().manual_seed(cfg.seed + 2), cfg.background).to(acc.device))
    if not cfg.vae_decoder_only:
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-8))
    after = {**reconstruction_scores(vae, fixed), "colour_share": latent_colour_share(vae, fixed)}
    metrics = {
        "psnr_before": before["psnr"], "psnr_after": after["psnr"], "chroma_psnr_before": before["chroma_psnr"],
        "chroma_psnr_after": after["chroma_psnr"], "colour_share_before": before["colour_share"],
        "colour_share_after": after["colour_share"], "latent_std": std, "scaling_factor": float(vae.config.scaling_factor),
        "steps": float(step),
    }
    final = None
    if main:
        part = "VAE decoder" if cfg.vae_decoder_only else "VAE"
        model.description = f"recon train-cascade (stage vae) from {init}: {part} trained {step} steps, UNet untouched"
        final = save_diffusers(model, run.root / "final" / "base", overwrite=True)
        run.update_meta(vae_metrics=metrics)
        run.write_progress("train vae", step, cfg.steps, None, "interrupted" if stopped_early else "finished",
                           loss=(sum(losses[-20:]) / len(losses[-20:])) if losses else None)
    acc.wait_for_everyone()
    return TrainResult(step, not stopped_early, losses, final, metrics)
