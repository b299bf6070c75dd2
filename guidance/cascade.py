"""Cascade-Zero123: self-prompted views from the Base and the Refiner's multi-token conditioning.

* The Base generates views of the input object by DDIM + CFG (no grad, a
  fixed seed): the nearby views (a few fixed offsets from the input camera)
  and, for the coarse-target token, a bank of views on an absolute
  elevation/azimuth grid. Each set is generated once per input and cached in
  a folder as PNGs plus a JSON of poses; a later prepare with the same input
  and settings reads them back instead of sampling again.
* The Refiner cross-attends to one token per condition image,
  ``[input, coarse target, nearby_1..N]``, each CLIP(image) with the image's
  pose relative to the target through the shared projection; only the input
  latent is channel-concatenated.
* The training-free variant (one ordinary Zero123) conditions on the input
  and on each nearby view separately (own pose, own concat latent) and blends
  the conditional predictions with weights that favour the condition closest
  to the target; classifier-free guidance is applied to the blend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from recon.cameras import relative_pose, spherical_to_position
from recon.fileio import atomic_path, read_json, write_json
from recon.guidance.sampling import ddim_sample, to_8bit_levels
from recon.runtime import to_device

if TYPE_CHECKING:
    from recon.guidance.model import Zero123Model


@dataclass
class ViewSet:
    """Condition images with absolute cameras: ``images`` (N, 3, S, S) in [0, 1]; poses (N,) each."""

    images: Tensor
    elevation_deg: Tensor
    azimuth_deg: Tensor
    radius: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Conditions:
    """Condition images as one model sees them: CLIP embeds (N, D), absolute poses (N,) in degrees /
    scene units, and optionally their concat latents (N, 4, h, w) (training-free cascade)."""

    clip: Tensor
    elevation_deg: Tensor
    azimuth_deg: Tensor
    radius: Tensor
    latents: Tensor | None = None

    def __len__(self) -> int:
        return self.clip.shape[0]


# ------------------------------------------------------------------ poses
def nearby_poses(
    elevation_deg: float, azimuth_deg: float, radius: float, deltas: Sequence[Sequence[float]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Absolute (elevation, azimuth, radius), each (N,), of views at ``deltas`` =
    [(delta_polar_deg, delta_azimuth_deg, delta_radius), ...] from a camera (polar = 90 - elevation)."""
    d = torch.tensor([list(map(float, v)) for v in deltas], dtype=torch.float32).reshape(-1, 3)
    return elevation_deg - d[:, 0], azimuth_deg + d[:, 1], radius + d[:, 2]


def bank_poses(
    elevations_deg: Sequence[float], azimuth_step_deg: float, azimuth0_deg: float, radius: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The coarse-target bank grid: every elevation x azimuths ``azimuth0 + k * step`` over a full turn."""
    count = max(1, round(360.0 / azimuth_step_deg))
    azimuths = azimuth0_deg + torch.arange(count, dtype=torch.float32) * (360.0 / count)
    elevations = torch.tensor([float(e) for e in elevations_deg], dtype=torch.float32)
    el, az = torch.meshgrid(elevations, azimuths, indexing="ij")
    el, az = el.reshape(-1), az.reshape(-1)
    return el, az, torch.full_like(el, float(radius))


def angular_distance_deg(el_a: Tensor, az_a: Tensor, el_b: Tensor, az_b: Tensor) -> Tensor:
    """Great-circle angle (degrees) between viewing directions; inputs broadcast, radius ignored."""
    one = torch.ones(())
    a = spherical_to_position(el_a, az_a, one)
    b = spherical_to_position(el_b, az_b, one)
    a, b = torch.broadcast_tensors(a, b)
    cos = (a * b).sum(-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def proximity_weights(target_el: Tensor, target_az: Tensor, cond_el: Tensor, cond_az: Tensor, temperature_deg: float) -> Tensor:
    """(B, C) condition weights softmax(-angle(condition, target) / temperature); rows sum to 1."""
    distance = angular_distance_deg(target_el[:, None], target_az[:, None], cond_el[None, :], cond_az[None, :])
    return torch.softmax(-distance / temperature_deg, dim=1)


# --------------------------------------------------------------- sampling
def in_chunks(encode: Callable[[Tensor], Tensor], images: Tensor, batch: int) -> Tensor:
    """``encode`` (e.g. :meth:`Zero123Model.clip_embed`) applied to ``images`` (N, ...) ``batch`` at a
    time, results concatenated along dim 0, so the peak memory does not grow with N."""
    return torch.cat([encode(images[start : start + batch]) for start in range(0, images.shape[0], batch)])


@torch.no_grad()
def generate_views_many(
    model: Zero123Model,
    images: Tensor,
    poses: Sequence[tuple[float, float, float]],
    targets: Sequence[tuple[Tensor, Tensor, Tensor]],
    steps: int,
    guidance_scale: float,
    seeds: Sequence[int],
    batch: int,
) -> list[Tensor]:
    """Novel views of G input images at once: one (N_g, 3, S, S) tensor in [0, 1] per input.

    ``images`` (G, 3, S, S) in [0, 1] were taken from ``poses[g]`` (elevation
    deg, azimuth deg, radius); ``targets[g]`` holds the N_g absolute target
    cameras of input g, three (N_g,) tensors. All views are sampled by DDIM
    with classifier-free guidance in shared UNet batches of ``batch`` views.
    Input g's initial noise comes from its own CPU generator seeded with
    ``seeds[g]``, so its views depend neither on the device, nor on the batch
    split, nor on the other inputs. Outputs are rounded to 8-bit levels, so a
    view read back from its PNG is identical.
    """
    device = model.device
    cond = images.to(device=device, dtype=torch.float32)
    latents = in_chunks(model.cond_latent, cond, batch)
    clips = in_chunks(model.clip_embed, cond, batch)
    counts = [int(t[0].shape[0]) for t in targets]
    owner = torch.repeat_interleave(torch.tensor(counts)).to(device)  # the input of every view
    rel = torch.cat([relative_pose(*t, *p, encoding=model.pose_encoding) for t, p in zip(targets, poses, strict=True)])
    context = model.context(clips[owner], rel.to(device))
    noise = torch.cat([
        torch.randn((n, *latents.shape[1:]), generator=torch.Generator().manual_seed(seed))
        for n, seed in zip(counts, seeds, strict=True)
    ])
    views = ddim_sample(model, context, latents[owner], noise, steps, guidance_scale, batch)
    return list(to_8bit_levels(views).split(counts))


def generate_views(
    model: Zero123Model,
    image: Tensor,
    pose: tuple[float, float, float],
    targets: tuple[Tensor, Tensor, Tensor],
    steps: int,
    guidance_scale: float,
    seed: int,
    batch: int,
) -> Tensor:
    """Novel views (N, 3, S, S) in [0, 1] of ``image`` (3, S, S) taken from ``pose`` (elevation, azimuth,
    radius) at the absolute ``targets`` cameras: :func:`generate_views_many` for one input."""
    return generate_views_many(model, image[None], [pose], [targets], steps, guidance_scale, [seed], batch)[0]


# ----------------------------------------------------------------- caching
def image_digest(image: Tensor) -> str:
    """SHA-256 of an image (3, S, S) in [0, 1] at 8-bit precision (stable across devices)."""
    pixels = torch.round(image.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    return hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()


def _save_png(path: Path, image: Tensor) -> None:
    from PIL import Image

    array = torch.round(image.float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)


def _load_png(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def cached_views(
    cache_dir: Path | None,
    name: str,
    model: Zero123Model,
    image: Tensor,
    pose: tuple[float, float, float],
    targets: tuple[Tensor, Tensor, Tensor],
    settings: dict,
    steps: int,
    guidance_scale: float,
    seed: int,
    batch: int,
) -> tuple[ViewSet, bool]:
    """Views of ``image`` at ``targets``, from ``cache_dir`` when generated before, else from the model.

    The cache is ``{name}_00.png ...`` plus ``{name}.json`` holding the input's
    digest, ``settings`` (anything that changes the result: weights, steps,
    seed, poses) and each view's pose; it is reused only when all of them
    match. Returns the views and whether they were generated now. With
    ``cache_dir=None`` nothing is read or written.
    """
    el, az, r = (v.float().cpu() for v in targets)
    record = {
        "input_sha256": image_digest(image),
        "settings": json.loads(
            json.dumps(dict(settings, steps=steps, guidance_scale=guidance_scale, seed=seed, input_pose=list(pose)))
        ),
        "poses": [[round(float(a), 6), round(float(b), 6), round(float(c), 6)] for a, b, c in zip(el, az, r, strict=True)],
    }
    meta_path = None if cache_dir is None else Path(cache_dir) / f"{name}.json"
    if meta_path is not None and meta_path.is_file():
        try:
            saved = read_json(meta_path)
        except (OSError, ValueError):
            saved = None
        if saved is not None and all(saved.get(k) == v for k, v in record.items()):
            files = [meta_path.parent / view["file"] for view in saved.get("views", [])]
            if len(files) == len(el) and all(f.is_file() for f in files):
                images = torch.stack([_load_png(f) for f in files])
                return ViewSet(images, el, az, r), False
    images = generate_views(model, image, pose, (el, az, r), steps, guidance_scale, seed, batch)
    if meta_path is not None:
        # A stale JSON must not vouch for PNGs that are being overwritten.
        meta_path.unlink(missing_ok=True)
        views = []
        for i, img in enumerate(images):
            file = f"{name}_{i:02d}.png"
            _save_png(meta_path.parent / file, img)
            views.append({"file": file, "elevation_deg": float(el[i]), "azimuth_deg": float(az[i]), "radius": float(r[i])})
        # The JSON goes last: its presence means every PNG is complete.
        write_json(meta_path, dict(record, views=views))
    return ViewSet(images, el, az, r), True


# ------------------------------------------------------- refiner conditioning
def refiner_tokens(
    target: tuple[Tensor, Tensor, Tensor],
    inputs: Conditions,
    nearby: Conditions,
    bank: Conditions | None,
    encoding: str,
) -> tuple[Tensor, Tensor]:
    """Refiner token inputs for B target cameras: CLIP embeds (B, K, D) and poses (B, K, 4).

    Token order: the input (pose T(input -> target)), the bank view nearest
    to the target (T(bank -> target); left out when ``bank`` is None), then
    each nearby view (T(nearby_k -> target)). K = 2 + N, or 1 + N without bank.
    """
    t_el, t_az, t_r = (v.float() for v in target)
    device = inputs.clip.device
    batch = t_el.shape[0]

    def pose_of(cond_el: Tensor, cond_az: Tensor, cond_r: Tensor) -> Tensor:
        return relative_pose(t_el, t_az, t_r, cond_el, cond_az, cond_r, encoding=encoding)

    embeds = [inputs.clip[:1].expand(batch, -1)]
    poses = [pose_of(inputs.elevation_deg[0].cpu(), inputs.azimuth_deg[0].cpu(), inputs.radius[0].cpu())]
    if bank is not None:
        nearest = angular_distance_deg(
            t_el[:, None].cpu(), t_az[:, None].cpu(), bank.elevation_deg[None].cpu(), bank.azimuth_deg[None].cpu()
        ).argmin(dim=1)
        embeds.append(bank.clip[to_device(nearest, device)])
        poses.append(pose_of(bank.elevation_deg.cpu()[nearest], bank.azimuth_deg.cpu()[nearest], bank.radius.cpu()[nearest]))
    for k in range(len(nearby)):
        embeds.append(nearby.clip[k : k + 1].expand(batch, -1))
        poses.append(pose_of(nearby.elevation_deg[k].cpu(), nearby.azimuth_deg[k].cpu(), nearby.radius[k].cpu()))
    # the poses are built on the host and sent in one copy that does not wait for the GPU
    return torch.stack(embeds, dim=1), to_device(torch.stack(poses, dim=1), device)


def training_free_eps(
    model: Zero123Model,
    noisy: Tensor,
    t: Tensor,
    target: tuple[Tensor, Tensor, Tensor],
    conditions: Conditions,
    guidance_scale: float,
    temperature_deg: float,
) -> Tensor:
    """Guided eps (B, 4, h, w) composed from C single-image conditions (input first, then nearby views).

    eps_cond = sum_c w_c eps(x_t | CLIP_c, T(c -> target), latent_c) with
    w = :func:`proximity_weights`; eps = eps_uncond + s (eps_cond - eps_uncond),
    unconditional = one zero token + zero latent. One UNet call of B (C + 1) samples.
    """
    if conditions.latents is None:
        raise ValueError("the training-free cascade needs the conditions' concat latents")
    t_el, t_az, t_r = (v.float().cpu() for v in target)
    batch, count = noisy.shape[0], len(conditions)
    device = noisy.device
    weights = proximity_weights(t_el, t_az, conditions.elevation_deg.cpu(), conditions.azimuth_deg.cpu(), temperature_deg).to(
        device
    )
    rel = relative_pose(
        t_el[:, None],
        t_az[:, None],
        t_r[:, None],
        conditions.elevation_deg.cpu()[None],
        conditions.azimuth_deg.cpu()[None],
        conditions.radius.cpu()[None],
        encoding=model.pose_encoding,
    ).to(device)  # (B, C, 4)
    context = model.context(conditions.clip[None].expand(batch, -1, -1).reshape(batch * count, -1), rel.reshape(batch * count, 4))
    latents = conditions.latents[None].expand(batch, -1, -1, -1, -1).reshape(batch * count, *conditions.latents.shape[1:])
    t = torch.as_tensor(t, device=device).reshape(-1).expand(batch)
    eps = model.eps(
        torch.cat([noisy.repeat_interleave(count, dim=0), noisy]),
        torch.cat([t.repeat_interleave(count), t]),
        torch.cat([context, torch.zeros(batch, 1, context.shape[-1], device=device, dtype=context.dtype)]),
        torch.cat([latents, torch.zeros_like(latents[:batch])]),
    ).float()
    cond = eps[: batch * count].view(batch, count, *eps.shape[1:])
    cond = (weights.view(batch, count, 1, 1, 1) * cond).sum(dim=1)
    uncond = eps[batch * count :]
    return uncond + guidance_scale * (cond - uncond)
