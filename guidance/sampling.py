"""Novel-view synthesis with Zero-1-to-3: DDIM sampling with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from recon.cameras import relative_pose
from recon.guidance.model import Zero123Model


def native_size(model: Zero123Model) -> int:
    """Image side the model was trained at (256 for Zero123; the VAE config's sample_size)."""
    return int(model.vae.config.sample_size)


def encode_relative_views(
    model: Zero123Model,
    delta_elevation_deg: Sequence[float] | Tensor,
    delta_azimuth_deg: Sequence[float] | Tensor,
    delta_radius: Sequence[float] | Tensor | float = 0.0,
    cond_elevation_deg: float = 0.0,
) -> Tensor:
    """(N, 4) pose vectors for target views given relative to the input view, in the model's pose encoding.

    Positive elevation = camera moves up; positive azimuth = camera moves to
    its right (recon.cameras convention). ``cond_elevation_deg`` (the input
    view's elevation) only matters for Stable-Zero123, whose 4th element is
    the input view's absolute polar angle.
    """
    d_el = torch.as_tensor(delta_elevation_deg, dtype=torch.float32)
    d_az = torch.as_tensor(delta_azimuth_deg, dtype=torch.float32)
    d_r = torch.as_tensor(delta_radius, dtype=torch.float32)
    d_el, d_az, d_r = torch.broadcast_tensors(d_el, d_az, d_r)
    return relative_pose(
        cond_elevation_deg + d_el, d_az, 1.0 + d_r, cond_elevation_deg, 0.0, 1.0, encoding=model.pose_encoding
    ).reshape(-1, 4)


def to_8bit_levels(images: Tensor) -> Tensor:
    """Images clamped to [0, 1] and rounded to multiples of 1/255 (same shape), so that a generated view
    and the same view read back from its 8-bit PNG are identical."""
    return torch.round(images.clamp(0.0, 1.0) * 255.0) / 255.0


@torch.no_grad()
def ddim_sample(
    model: Zero123Model,
    context: Tensor,
    cond_latent: Tensor,
    noise: Tensor,
    steps: int,
    guidance_scale: float,
    batch_size: int = 8,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """DDIM with classifier-free guidance from ready-made conditioning -> images (N, 3, S, S) in [0, 1], float32 on the CPU.

    ``context``: (N, K, context_dim) cross-attention tokens (:meth:`Zero123Model.context`);
    ``cond_latent``: (N, 4, h, w) or (1, 4, h, w) channel-concatenated latents;
    ``noise``: (N, 4, h, w) initial noise, drawn by the caller (on the CPU from a
    seeded generator, so the result depends neither on the device nor on
    ``batch_size``). Samples run ``batch_size`` at a time, each batch with a
    fresh scheduler; latents are stepped in float32 whatever the model dtype.
    ``guidance_scale == 1`` skips the unconditional branch. ``generator`` feeds
    the DDIM step noise when ``eta > 0``; ``progress(step, total)`` is called
    after each DDIM step of each batch.
    """
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = model.device
    count = noise.shape[0]
    batches = [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    total, done = steps * len(batches), 0
    outputs = []
    for chunk in batches:
        n = chunk.stop - chunk.start
        scheduler = DDIMScheduler.from_config(model.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        latent_cond = cond_latent.expand(n, -1, -1, -1) if cond_latent.shape[0] == 1 else cond_latent[chunk]
        tokens = context[chunk]
        x = noise[chunk].to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            if guidance_scale == 1.0:
                eps = model.eps(x, t, tokens, latent_cond)
            else:
                eps = model.eps_cfg(x, t, tokens, latent_cond, guidance_scale)
            x = scheduler.step(eps.float(), t, x, eta=eta, generator=generator).prev_sample
            done += 1
            if progress is not None:
                progress(done, total)
        outputs.append(model.decode(x).float().cpu())
    return torch.cat(outputs)


@torch.no_grad()
def sample_views(
    model: Zero123Model,
    image: Tensor,
    poses: Tensor | tuple[Sequence[float], Sequence[float], Sequence[float] | float],
    steps: int = 50,
    guidance_scale: float = 3.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    batch_size: int = 8,
    image_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Generates N novel views of ``image`` (1, 3, H, W) in [0, 1] -> (N, 3, S, S) in [0, 1], float32 on the CPU.

    ``poses``: (N, 4) encoded relative poses, or ``(delta_elevation_deg,
    delta_azimuth_deg, delta_radius)`` sequences relative to the input view
    (see :func:`encode_relative_views`). The input is resized to ``image_size``
    (default: the model's native size, 256). The initial noise for all N
    views is drawn at once from ``generator`` (CPU), so results do not depend
    on ``batch_size``. ``progress(step, total)`` is called after each DDIM step.
    """
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"image must be (1, 3, H, W), got {tuple(image.shape)}")
    if not isinstance(poses, Tensor):
        poses = encode_relative_views(model, *poses)
    poses = poses.reshape(-1, 4).float()
    count = poses.shape[0]
    size = image_size or native_size(model)
    device = model.device
    image = image.to(device=device, dtype=torch.float32)
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)

    context = model.context(model.clip_embed(image).expand(count, -1), poses.to(device))
    cond_latent = model.cond_latent(image)
    latent_side = size // model.latent_scale
    noise = torch.randn(count, model.vae.config.latent_channels, latent_side, latent_side, generator=generator)
    return ddim_sample(model, context, cond_latent, noise, steps, guidance_scale, batch_size, eta, generator, progress)
