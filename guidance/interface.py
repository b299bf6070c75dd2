"""The one object systems/ calls: ``prepare`` once per input image, then ``sds`` every step."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from recon.cameras import relative_pose
from recon.guidance.cascade import (
    Conditions,
    ViewSet,
    bank_poses,
    cached_views,
    nearby_poses,
    refiner_tokens,
    training_free_eps,
)
from recon.guidance.config import GuidanceConfig, timestep_schedules
from recon.guidance.cuda_graphs import encoder_runner
from recon.guidance.model import Zero123Model
from recon.guidance.protocol import Reference
from recon.guidance.sds import SDSOutput, score_distillation, timestep_range
from recon.runtime import to_device
from recon.schedule import value_at

if TYPE_CHECKING:
    from recon.guidance.checkpoints import WeightPrefetch

DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _resize(images: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size), bilinear, antialiased when shrinking; differentiable."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _as_batch(value: Tensor | float, batch: int) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float32).detach().cpu().reshape(-1).expand(batch).clone()


class Zero123Guidance:
    """Zero123 / Cascade-Zero123 score distillation for one input image at a time (a :class:`recon.guidance.Guidance`).

    ``base`` self-prompts the nearby and bank views (cascade modes) and is the
    SDS model in modes ``zero123`` and ``cascade-training-free``; ``refiner``
    is the SDS model in mode ``cascade`` (default: the Base's weights).
    """

    def __init__(self, cfg: GuidanceConfig, base: Zero123Model, refiner: Zero123Model | None = None) -> None:
        self.cfg = cfg
        self.base = base
        self.refiner = (base if refiner is None else refiner) if cfg.mode == "cascade" else None
        self.model = self.refiner if self.refiner is not None else base
        self.min_step_percent, self.max_step_percent, self.timestep_reason = timestep_schedules(cfg, self.model.pose_encoding)
        # the fast encoder pays off only replayed from graphs: eager, its many small launches cost more than it saves
        fast_encoder = cfg.fast_vae_encoder and cfg.cuda_graphs and not cfg.cfg_chunk
        for model in {id(m): m for m in (base, self.refiner) if m is not None}.values():
            model.use_cuda_graphs(cfg.cuda_graphs)
            if fast_encoder:
                model.use_fast_encoder()
        self._encode_with_grad = encoder_runner(self.model.encode, cfg.cuda_graphs)
        self.nearby_views: ViewSet | None = None
        self.bank_views: ViewSet | None = None
        self._input: Conditions | None = None
        self._alphas_cumprod: Tensor | None = None  # the scheduler's, on the device: no copy per step
        self._nearby: Conditions | None = None
        self._bank: Conditions | None = None

    @property
    def device(self) -> torch.device:
        """Device of the SDS model."""
        return self.model.device

    @property
    def image_size(self) -> int:
        """Native image size of the SDS model (256 for Zero123)."""
        return int(self.model.unet.config.sample_size) * self.model.latent_scale

    # ----------------------------------------------------------------- prepare
    @torch.no_grad()
    def prepare(self, reference: Reference, cache_dir: str | Path | None = None) -> dict[str, float]:
        """Conditions on ``reference`` (a ReferenceView: ``rgb_over``, ``elevation_deg``, ``azimuth_deg``,
        ``radius``): CLIP embeds and concat latents once; in the cascade modes the Base's nearby views
        (and the coarse-target bank), read from ``cache_dir`` when generated there before.

        Returns plain read-outs: ``prepare_seconds`` (and ``nearby_seconds`` / ``bank_seconds``), and
        ``nearby_generated`` / ``bank_generated`` = 1.0 when the set was sampled now, 0.0 when read from the cache.
        """
        start = time.perf_counter()
        cfg, model, size = self.cfg, self.model, self.image_size
        image = _resize(reference.rgb_over((1.0, 1.0, 1.0))[None].float(), size)[0].clamp(0.0, 1.0).cpu()
        pose = (float(reference.elevation_deg), float(reference.azimuth_deg), float(reference.radius))
        self._input = self._conditions(model, image[None], *(torch.tensor([p]) for p in pose), latents=True)
        info: dict[str, float] = {}
        self.nearby_views = self.bank_views = self._nearby = self._bank = None
        if cfg.mode != "zero123":
            cache = None if cache_dir is None else Path(cache_dir)
            targets = nearby_poses(*pose, cfg.nearby_views)
            self.nearby_views = self._self_prompt("nearby", image, pose, targets, cfg.seed, cache, info)
            self._nearby = self._view_conditions(self.nearby_views, latents=cfg.mode == "cascade-training-free")
            if cfg.mode == "cascade" and cfg.coarse_target == "bank":
                targets = bank_poses(cfg.bank_elevations_deg, cfg.bank_azimuth_step_deg, pose[1], pose[2])
                self.bank_views = self._self_prompt("bank", image, pose, targets, cfg.seed + 1, cache, info)
                self._bank = self._view_conditions(self.bank_views, latents=False)
        info["prepare_seconds"] = time.perf_counter() - start
        return info

    def _self_prompt(
        self,
        name: str,
        image: Tensor,
        pose: tuple[float, float, float],
        targets: tuple[Tensor, Tensor, Tensor],
        seed: int,
        cache: Path | None,
        info: dict[str, float],
    ) -> ViewSet:
        """Base views of ``image`` at ``targets`` (cached as ``{name}_*.png``); records time and whether generated."""
        cfg = self.cfg
        settings = {"model": cfg.model, "size": self.image_size, "pose_encoding": self.base.pose_encoding}
        started = time.perf_counter()
        views, generated = cached_views(
            cache, name, self.base, image, pose, targets, settings,
            cfg.nearby_steps, cfg.nearby_guidance_scale, seed, cfg.generation_batch,
        )  # fmt: skip
        info[f"{name}_generated"] = float(generated)
        info[f"{name}_seconds"] = time.perf_counter() - started
        return views

    def _view_conditions(self, views: ViewSet, latents: bool) -> Conditions:
        return self._conditions(self.model, views.images, views.elevation_deg, views.azimuth_deg, views.radius, latents)

    def _conditions(self, model: Zero123Model, images: Tensor, el: Tensor, az: Tensor, r: Tensor, latents: bool) -> Conditions:
        """CLIP embeds (and optionally concat latents) of ``images`` (N, 3, S, S), in chunks."""
        clips, lats = [], []
        for chunk in images.split(self.cfg.generation_batch):
            chunk = chunk.to(device=model.device, dtype=torch.float32)
            clips.append(model.clip_embed(chunk))
            if latents:
                lats.append(model.cond_latent(chunk))
        return Conditions(torch.cat(clips), el.float(), az.float(), r.float(), torch.cat(lats) if latents else None)

    # --------------------------------------------------------------------- sds
    def encode(self, images: Tensor) -> Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> fp32 diffusion latents at the model's latent size, with grad.

        The VAE encoder runs at ``vae_grad_resolution`` (capped at the model's
        size); smaller latents are upsampled bilinearly. With ``cfg_chunk`` it
        encodes that many views at a time, gradient-checkpointed.
        """
        size = self.image_size
        resolution = min(self.cfg.vae_grad_resolution, size)
        x = _resize(images.to(self.device), resolution)
        chunk = self.cfg.cfg_chunk
        if chunk and x.shape[0] > chunk and torch.is_grad_enabled():
            # bounded memory (low-vram): one chunk's encoder activations at a time, recomputed in backward
            from torch.utils.checkpoint import checkpoint

            parts = [checkpoint(self.model.encode, part, use_reentrant=False) for part in x.split(chunk)]
            latents = torch.cat(parts).float()
        else:
            latents = self._encode_with_grad(x).float()
        return _resize(latents, size // self.model.latent_scale)

    def sds(
        self,
        images: Tensor,
        elevation_deg: Tensor,
        azimuth_deg: Tensor,
        radius: Tensor,
        step: int,
        generator: torch.Generator | None = None,
    ) -> SDSOutput:
        """SDS loss for renders ``images`` (B, 3, H, W) in [0, 1] (with grad) seen from absolute cameras
        (degrees, scene units; each (B,) or scalar) at optimisation ``step`` (drives the schedules).

        Cameras are made relative to the reference camera given to :meth:`prepare`.
        Noise and timesteps come from ``generator`` or the global RNG of the device.
        """
        if self._input is None:
            raise RuntimeError("Zero123Guidance.sds called before prepare(reference)")
        cfg, model = self.cfg, self.model
        batch = images.shape[0]
        target = tuple(_as_batch(v, batch) for v in (elevation_deg, azimuth_deg, radius))
        scale = value_at(cfg.guidance_scale, step)
        min_step, max_step = timestep_range(
            model.scheduler.config.num_train_timesteps, value_at(self.min_step_percent, step), value_at(self.max_step_percent, step)
        )
        clip = None if cfg.grad_clip is None else value_at(cfg.grad_clip, step)
        latents = self.encode(images)
        if self._alphas_cumprod is None or self._alphas_cumprod.device != latents.device:
            self._alphas_cumprod = model.scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
        out = score_distillation(
            latents,
            self.eps_function(target, scale),
            self._alphas_cumprod,
            min_step,
            max_step,
            weighting=cfg.weighting,
            grad_clip=clip,
            generator=generator,
        )
        out.diagnostics["guidance_scale"] = scale
        return out

    def context(self, target: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Cross-attention tokens (B, K, D) of the SDS model for target cameras (mode zero123 / cascade)."""
        model, inputs = self.model, self._input
        if self.cfg.mode == "cascade":
            embeds, poses = refiner_tokens(target, inputs, self._nearby, self._bank, model.pose_encoding)
            return model.context(embeds, poses)
        pose = relative_pose(
            *target, inputs.elevation_deg[0], inputs.azimuth_deg[0], inputs.radius[0], encoding=model.pose_encoding
        )
        return model.context(inputs.clip.expand(target[0].shape[0], -1), to_device(pose, model.device))

    def eps_function(self, target: tuple[Tensor, Tensor, Tensor], scale: float) -> Callable[[Tensor, Tensor], Tensor]:
        """The guided noise prediction ``eps_fn(noisy (B, 4, h, w), t (B,)) -> (B, 4, h, w)`` fp32 for
        target cameras ``target`` = (elevation, azimuth, radius) each (B,), in chunks of ``cfg_chunk`` views."""
        cfg, model, inputs = self.cfg, self.model, self._input

        if cfg.mode == "cascade-training-free":
            conditions = Conditions(
                torch.cat([inputs.clip, self._nearby.clip]),
                torch.cat([inputs.elevation_deg, self._nearby.elevation_deg]),
                torch.cat([inputs.azimuth_deg, self._nearby.azimuth_deg]),
                torch.cat([inputs.radius, self._nearby.radius]),
                torch.cat([inputs.latents, self._nearby.latents]),
            )

            def one(noisy: Tensor, t: Tensor, part: slice) -> Tensor:
                sub = tuple(v[part] for v in target)
                return training_free_eps(model, noisy[part], t[part], sub, conditions, scale, cfg.training_free_temperature_deg)

        else:

            def one(noisy: Tensor, t: Tensor, part: slice) -> Tensor:
                context = self.context(tuple(v[part] for v in target))
                latent = inputs.latents.expand(context.shape[0], -1, -1, -1)
                return model.eps_cfg(noisy[part], t[part], context, latent, scale)

        def eps_fn(noisy: Tensor, t: Tensor) -> Tensor:
            batch = noisy.shape[0]
            size = cfg.cfg_chunk or batch
            return torch.cat([one(noisy, t, slice(i, i + size)).float() for i in range(0, batch, size)])

        return eps_fn


def guidance_weight_specs(cfg: GuidanceConfig) -> list[str]:
    """The weight specs ``cfg`` loads: the Base's, then the Refiner's where it is another."""
    separate = cfg.mode == "cascade" and cfg.refiner_model not in (None, cfg.model)
    return [cfg.model, cfg.refiner_model] if separate else [cfg.model]


def prefetch_weights(cfg: GuidanceConfig, device: torch.device | str) -> WeightPrefetch | None:
    """On CUDA, starts reading the weights of ``cfg``'s models onto ``device`` in a background thread; pass the
    result to :func:`make_guidance` (see :class:`recon.guidance.checkpoints.WeightPrefetch`). None on the CPU,
    where the loader memory-maps the files and leaves nothing to overlap."""
    from recon.guidance.checkpoints import WeightPrefetch

    if torch.device(device).type != "cuda":
        return None
    return WeightPrefetch(guidance_weight_specs(cfg), device, DTYPES[cfg.dtype])


def _load_weights(cfg: GuidanceConfig, spec: str, device: torch.device | str, prefetched: WeightPrefetch | None = None) -> Zero123Model:
    """The model of weight spec ``spec`` (``cfg.model`` or ``cfg.refiner_model``) in ``cfg``'s dtype and pose encoding."""
    from recon.guidance.checkpoints import load_zero123

    encoding = None if cfg.pose_encoding == "auto" else cfg.pose_encoding
    return load_zero123(spec, device, DTYPES[cfg.dtype], pose_encoding=encoding, prefetched=prefetched)


def load_models(
    cfg: GuidanceConfig, device: torch.device | str, prefetched: WeightPrefetch | None = None,
) -> tuple[Zero123Model, Zero123Model | None]:
    """Loads the Base (``cfg.model``) and, in mode cascade, the Refiner (the same object when
    ``refiner_model`` is None or equal). Load once and pass to :func:`make_guidance` for a batch.
    ``prefetched``: from :func:`prefetch_weights`."""
    specs = guidance_weight_specs(cfg)
    base = _load_weights(cfg, specs[0], device, prefetched)
    refiner = None
    if cfg.mode == "cascade":
        refiner = base if len(specs) == 1 else _load_weights(cfg, specs[1], device, prefetched)
    return base, refiner


def make_guidance(
    cfg: GuidanceConfig,
    device: torch.device | str,
    base: Zero123Model | None = None,
    refiner: Zero123Model | None = None,
    prefetched: WeightPrefetch | None = None,
) -> Zero123Guidance:
    """A :class:`Zero123Guidance` for ``cfg``; loads the weights (with what ``prefetched`` has read) unless
    already-loaded ``base`` / ``refiner`` are given."""
    if base is None:
        base, loaded_refiner = load_models(cfg, device, prefetched)
        refiner = loaded_refiner if refiner is None else refiner
    elif refiner is None and len(specs := guidance_weight_specs(cfg)) > 1:
        refiner = _load_weights(cfg, specs[1], device, prefetched)
    if cfg.model == "tiny":
        from recon.progress import info

        info(
            "guidance: the shipped 'tiny' prior knows only synthetic toy objects; "
            "real photos need real Zero123 weights (--model PATH, see docs/GUIDANCE-MODELS.md)"
        )
    if base.is_random or (refiner is not None and refiner.is_random):
        from recon.progress import warn

        warn(f"guidance uses random weights ({cfg.model}): the result will be noise, not a reconstruction")
    guidance = Zero123Guidance(cfg, base, refiner)
    from recon.progress import info

    info(
        f"guidance: SDS timestep range min {guidance.min_step_percent}, max {guidance.max_step_percent} "
        f"({guidance.timestep_reason})"
    )
    return guidance
