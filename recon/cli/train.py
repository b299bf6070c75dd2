"""``recon train-cascade --data DATA --init MODEL -o RUN``: Cascade-Zero123 self-distillation (see docs/TRAINING.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro


@dataclass
class TrainCascadeCommand:
    """Train Base/Refiner Zero-1-to-3 by self-distillation on a multi-view dataset (recon or Objaverse
    layout); rerunning the same command continues from the newest checkpoint. Multi-GPU:
    `accelerate launch -m recon.cli.main train-cascade ...`."""

    data: Path
    """Multi-view dataset folder (recon layout from 'recon data synth', or Objaverse views_release)."""
    init: str
    """Starting weights for Base and Refiner: a diffusers folder, .ckpt/.safetensors, hub id, 'tiny',
    or random weights of an architecture ('random-tiny', 'random-full')."""
    output: Annotated[Path, tyro.conf.arg(aliases=("-o",))]
    """Run folder (checkpoints/, final/base, progress.json)."""
    stage: str = "cascade"
    """'cascade': Refiner training with its EMA as the Base; 'base': plain Zero123 fine-tuning;
    'vae': train the VAE alone as an autoencoder and set its scaling factor (from-scratch networks;
    later stages use --init RUN/final/base and keep it frozen)."""
    steps: int = 2000
    """Total optimiser steps."""
    batch_size: int = 4
    """Samples per step and GPU."""
    image_size: int = 0
    """Model input side; 0 = the model's native size."""
    lr_unet: float = 1e-4
    """AdamW learning rate of the UNet."""
    lr_projection: float = 1e-3
    """AdamW learning rate of the camera projection."""
    prompt_steps: int = 10
    """DDIM steps of the Base's self-prompting."""
    mixed_precision: str = "auto"
    """'auto' (bf16 on CUDA), 'no', 'bf16' or 'fp16'."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass to save memory."""
    preload: bool = False
    """Decode every view into memory once (8-bit) and draw batches there: much faster for small datasets."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    max_minutes: float | None = None
    """Stop cleanly (with a checkpoint) after this many minutes; rerun to continue."""
    seed: int = 0
    """Seed of data sampling, noise and dropout."""
    device: str = "auto"
    """auto, cpu or cuda (under accelerate launch each process takes its own GPU)."""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Other TrainConfig fields as key=value (repeatable), e.g. --set ema_decay=0.9999."""
    resume: bool = True
    """Continue the run in --output when it has one (--no-resume refuses an existing run)."""
    quiet: bool = False
    """Print only warnings and errors."""

    def run(self) -> int:
        """Trains (or continues) and returns the exit code."""
        from guidance.training import TrainConfig, train
        from recon.config import resolve
        from recon.progress import info, set_quiet

        set_quiet(self.quiet)
        flags = {
            "stage": self.stage, "steps": self.steps, "batch_size": self.batch_size, "image_size": self.image_size,
            "lr_unet": self.lr_unet, "lr_projection": self.lr_projection, "prompt_steps": self.prompt_steps,
            "mixed_precision": self.mixed_precision, "gradient_checkpointing": self.gradient_checkpointing,
            "checkpoint_every": self.checkpoint_every, "seed": self.seed, "preload": self.preload,
        }
        cfg = resolve(TrainConfig, flags, overrides=self.set)
        result = train(cfg, self.data, self.init, self.output, self.device, self.max_minutes, self.resume)
        if result.metrics:
            info("VAE: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
        if result.finished:
            info(f"finished {result.step} steps; Base (and Refiner) weights: {result.final}")
        elif result.final is not None:
            info(f"stopped at step {result.step}/{cfg.steps} (time budget); wrote {result.final}")
        else:
            info(f"stopped at step {result.step}/{cfg.steps} (time budget); rerun the same command to continue")
        return 0
