"""Settings of the score-distillation guidance (model choice, SDS recipe, Cascade-Zero123)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from recon.errors import ReconError
from recon.schedule import Schedule, validate_schedule

Mode = Literal["zero123", "cascade", "cascade-training-free"]
Weighting = Literal["sds", "uniform"]
DType = Literal["auto", "fp16", "bf16", "fp32"]
CoarseTarget = Literal["bank", "none"]
PoseEncodingChoice = Literal["auto", "zero123", "stable-zero123"]
TimestepRecipe = Literal["auto", "config"]
MODES = get_args(Mode)
WEIGHTINGS = get_args(Weighting)
DTYPES = get_args(DType)
COARSE_TARGETS = get_args(CoarseTarget)
POSE_ENCODING_CHOICES = get_args(PoseEncodingChoice)
TIMESTEP_RECIPES = get_args(TimestepRecipe)
# SDS timestep ranges (start, end values of the min / max ramps) of each pose encoding's weights, after threestudio:
# Zero123 [0, 0.4, 0.2, 200] / [0, 0.85, 0.5, 200]; Stable-Zero123 [50, 0.7, 0.3, 200] / [50, 0.98, 0.8, 200].
RECIPE_RANGES = {"zero123": ((0.4, 0.2), (0.85, 0.5)), "stable-zero123": ((0.7, 0.3), (0.98, 0.8))}
# Stable-Zero123's ramps start a quarter of the way to their end step (50 of 200).
STABLE_RAMP_START = 0.25
# The paper's self-prompted views, [delta_polar_deg, delta_azimuth_deg, delta_radius] from the input camera:
# +45 / -45 deg azimuth and 30 deg above. Training, SDS and evaluation must agree on them.
NEARBY_VIEWS = ((0.0, 45.0, 0.0), (0.0, -45.0, 0.0), (-30.0, 0.0, 0.0))


@dataclass
class GuidanceConfig:
    """Score distillation with Zero-1-to-3, alone or as the Cascade-Zero123 cascade (see docs/CASCADE.md)."""

    model: str = "tiny"
    """Zero123 weights for SDS in mode zero123, the Base-0123 in the cascade modes: a folder, a
    .ckpt/.safetensors file, a hub id, 'tiny' (the shipped prior), 'random-tiny' or 'random-full'."""
    refiner_model: str | None = None
    """Refiner-0123 weights (mode cascade only); None = the same weights as the Base."""
    pose_encoding: PoseEncodingChoice = "auto"
    """4th pose element the weights were trained with: 'auto' (from the weights' recon_zero123.json, config or own
    file/folder name), 'zero123' (radius change) or 'stable-zero123' (the input view's absolute polar angle)."""
    mode: Mode = "zero123"
    """'zero123': plain Zero123 SDS; 'cascade': Base self-prompts nearby views, a trained Refiner takes
    them as extra tokens; 'cascade-training-free': nearby views blended by pose proximity, one Zero123."""
    guidance_scale: Schedule = 3.0
    """Classifier-free guidance scale (a schedule)."""
    min_step_percent: Schedule = field(default_factory=lambda: [0, 0.4, 0.2, 200])
    """Lower end of the SDS timestep range as a fraction of the 1000 training steps (a schedule)."""
    max_step_percent: Schedule = field(default_factory=lambda: [0, 0.85, 0.5, 200])
    """Upper end of the SDS timestep range as a fraction of the 1000 training steps (a schedule)."""
    timestep_recipe: TimestepRecipe = "auto"
    """'auto': with Stable-Zero123 weights, a timestep range still at Zero123's recipe (ramps 0.4 -> 0.2 and
    0.85 -> 0.5, the presets' values) becomes Stable-Zero123's (0.7 -> 0.3 and 0.98 -> 0.8, ramps starting a
    quarter of the way to the same end step); 'config': min/max_step_percent exactly as given."""
    weighting: Weighting = "sds"
    """Per-timestep weight w(t): 'sds' = 1 - alpha_bar_t, 'uniform' = 1."""
    grad_clip: Schedule = None
    """Clamp each element of the latent SDS gradient to [-c, c] (a schedule); None = no clipping."""
    vae_grad_resolution: int = 256
    """Renders are resized to this size before the VAE encoder (with grad); smaller (e.g. 128) saves
    memory and time, the latents are then upsampled to the model's latent size, but the SDS gradient changes
    (bench/vae_grad_resolution.py: at half the model's size the mean gradient's cosine with the full-size one
    was 0.48 for the shipped prior). Capped at the model's size."""
    dtype: DType = "auto"
    """Model weights and compute: 'auto' (fp16 on CUDA, fp32 on the CPU), 'fp16', 'bf16' or 'fp32'."""
    cfg_chunk: int = 0
    """At most this many views per UNet call (each costs 2 UNet samples with CFG, more in the
    training-free cascade) and per VAE encode with gradients (checkpointed); 0 = the whole batch in one call."""
    cuda_graphs: bool = True
    """Replay CUDA graphs for the UNet's gradient-free calls and for the VAE encoder's forward and backward in SDS
    (CUDA only; removes kernel-launch gaps, several times faster at the batch sizes SDS uses; one graph per batch shape)."""
    fast_vae_encoder: bool = True
    """On CUDA, run the VAE encoder in channels-last layout with its GroupNorm + SiLU pairs fused in Triton
    (guidance/groupnorm.py; with Triton installed) and the VAE's attention as plain matmuls (diffusers'
    AttnProcessor: PyTorch's fused attention kernels have no fast path for its one 512-wide head). The same
    function, its forward and backward ~30% faster at 256 x 256. Used only where the encoder replays CUDA graphs
    (cuda_graphs on, cfg_chunk 0): run eagerly, as low-vram runs it, its many small launches cost more than it
    saves (bench/guidance.py, graphs off). False = the reference path (NCHW, SDPA)."""
    nearby_views: list[list[float]] = field(default_factory=lambda: [list(v) for v in NEARBY_VIEWS])
    """Self-prompted views as [delta_polar_deg, delta_azimuth_deg, delta_radius] from the input camera
    (negative polar = higher up). The paper's three: +45 / -45 deg azimuth and 30 deg above."""
    nearby_steps: int = 25
    """DDIM steps of the Base when it generates nearby and bank views."""
    nearby_guidance_scale: float = 3.0
    """Classifier-free guidance scale of the Base when it generates nearby and bank views."""
    coarse_target: CoarseTarget = "bank"
    """Coarse target token of the Refiner (mode cascade): 'bank' = the nearest of a grid of Base views
    generated once, 'none' = leave the token out (4 tokens instead of 5)."""
    bank_elevations_deg: list[float] = field(default_factory=lambda: [0.0, 30.0, 60.0])
    """Absolute elevations (degrees) of the coarse-target bank grid."""
    bank_azimuth_step_deg: float = 30.0
    """Azimuth spacing (degrees) of the coarse-target bank grid, starting at the input camera's azimuth."""
    generation_batch: int = 12
    """Views generated per batch when the Base self-prompts (bounds memory during prepare)."""
    training_free_temperature_deg: float = 30.0
    """Training-free cascade: condition weights are softmax(-angle(condition, target) / this), degrees."""
    seed: int = 0
    """Seed of the Base's self-prompting (nearby and bank views), independent of the training seed."""

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("weighting", self.weighting, WEIGHTINGS),
            ("dtype", self.dtype, DTYPES),
            ("coarse_target", self.coarse_target, COARSE_TARGETS),
            ("pose_encoding", self.pose_encoding, POSE_ENCODING_CHOICES),
            ("timestep_recipe", self.timestep_recipe, TIMESTEP_RECIPES),
        ):
            if value not in allowed:
                raise ReconError(f"guidance.{name}={value!r}: choose one of {', '.join(allowed)}")
        for name in ("guidance_scale", "min_step_percent", "max_step_percent"):
            validate_schedule(getattr(self, name), f"guidance.{name}")
        if self.grad_clip is not None:
            validate_schedule(self.grad_clip, "guidance.grad_clip")
        for view in self.nearby_views:
            if len(view) != 3:
                raise ReconError(
                    f"guidance.nearby_views: each view is [delta_polar_deg, delta_azimuth_deg, delta_radius], got {list(view)!r}"
                )
        if self.vae_grad_resolution < 8 or self.vae_grad_resolution % 8:
            raise ReconError(f"guidance.vae_grad_resolution={self.vae_grad_resolution}: use a positive multiple of 8")
        if self.cfg_chunk < 0 or self.generation_batch < 1 or self.nearby_steps < 1:
            raise ReconError("guidance.cfg_chunk must be >= 0, generation_batch and nearby_steps >= 1")
        if self.training_free_temperature_deg <= 0 or self.bank_azimuth_step_deg <= 0:
            raise ReconError("guidance.training_free_temperature_deg and bank_azimuth_step_deg must be > 0")


def _is_ramp(schedule: Any, values: tuple[float, float]) -> bool:
    return (
        isinstance(schedule, (list, tuple))
        and len(schedule) == 4
        and all(abs(float(a) - b) < 1e-9 for a, b in zip(schedule[1:3], values, strict=True))
    )


def timestep_schedules(cfg: GuidanceConfig, pose_encoding: str) -> tuple[Any, Any, str]:
    """The (min_step_percent, max_step_percent) schedules SDS uses with weights of ``pose_encoding``, and why.

    See :attr:`GuidanceConfig.timestep_recipe`. With the defaults and
    Stable-Zero123 weights: [50, 0.7, 0.3, 200] / [50, 0.98, 0.8, 200].
    """
    low, high = cfg.min_step_percent, cfg.max_step_percent
    if cfg.timestep_recipe == "config":
        return low, high, "as configured (guidance.timestep_recipe=config)"
    zero_low, zero_high = RECIPE_RANGES["zero123"]
    if pose_encoding != "stable-zero123":
        return low, high, "as configured"
    if not (_is_ramp(low, zero_low) and _is_ramp(high, zero_high)):
        return low, high, "as configured (set away from Zero123's recipe, so kept with Stable-Zero123 weights)"
    stable_low, stable_high = RECIPE_RANGES["stable-zero123"]

    def stable(ramp: Any, values: tuple[float, float]) -> list[float]:
        start, end = float(ramp[0]), float(ramp[3])
        return [round(start + STABLE_RAMP_START * (end - start)), values[0], values[1], round(end)]

    return stable(low, stable_low), stable(high, stable_high), "Stable-Zero123's recipe, chosen for its weights"
