"""``recon train-cascade --data DATA --init MODEL -o RUN``: Cascade-Zero123 self-distillation (see docs/TRAINING.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from recon.systems.cascade_training import TrainConfig, train


@dataclass
class TrainCascadeCommand:
    """Train Base/Refiner Zero-1-to-3 by self-distillation on a multi-view dataset (recon or Objaverse
    layout); rerunning the same command continues from the newest checkpoint, also on another number of GPUs.
    Multi-GPU: `accelerate launch --multi_gpu --num_processes N -m recon.cli.main train-cascade ...` (global batch =
    --batch-size x N; --lr-scaling; docs/TRAINING.md)."""

    data: Path
    """Multi-view dataset folder (recon layout from 'recon data synth', or Objaverse views_release)."""
    init: str
    """Starting weights for Base and Refiner: a diffusers folder, .ckpt/.safetensors, hub id, 'tiny',
    or random weights of an architecture ('random-tiny', 'random-full')."""
    output: Annotated[Path, tyro.conf.arg(aliases=("-o",))]
    """Run folder (checkpoints/, final/base, progress.json)."""
    training: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes]
    """How to train; every field is a flag of its own (--stage, --steps, --batch-size, ...)."""
    max_minutes: float | None = None
    """Stop cleanly (with a checkpoint) after this many minutes; rerun to continue."""
    device: str = "auto"
    """auto, cpu or cuda (under accelerate launch each process takes its own GPU)."""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Training fields as key=value (repeatable), applied over the flags, e.g. --set ema_decay=0.9999."""
    resume: bool = True
    """Continue the run in --output when it has one (--no-resume refuses an existing run)."""
    quiet: bool = False
    """Print only warnings and errors."""

    def run(self) -> int:
        """Trains (or continues) and returns the exit code."""
        from recon.config import resolve, to_plain
        from recon.progress import info, set_quiet

        set_quiet(self.quiet)
        cfg = resolve(TrainConfig, to_plain(self.training), overrides=self.set)
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
