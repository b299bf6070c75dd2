"""``recon eval-nvs --data HELDOUT --model M -o OUT``: score novel views against ground-truth renders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro


@dataclass
class EvalNVSCommand:
    """Generate every other view of each held-out object from one input view with the Base alone and
    with the cascade; report PSNR / SSIM against the ground truth, two trivial baselines (copy the
    input; the dataset's mean image) and a multi-view consistency score (eval.md + eval.json)."""

    data: Path
    """Held-out multi-view dataset (recon or Objaverse layout), e.g. 'recon data synth --orbit --seed 1'."""
    model: str
    """Base weights: a run's final/base folder, any Zero123 folder/checkpoint/hub id, 'tiny' or 'random-tiny'."""
    output: Annotated[Path, tyro.conf.arg(aliases=("-o",))] = Path("outputs/eval-nvs")
    """Folder for eval.md and eval.json."""
    refiner: str | None = None
    """Refiner weights; default: the same as --model (a cascade run's Base and Refiner are one network)."""
    no_cascade: bool = False
    """Score the Base alone (skip the cascade)."""
    steps: int = 25
    """DDIM steps."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale."""
    input_view: int = 0
    """Index of each object's input view."""
    max_objects: int = 0
    """Evaluate at most this many objects (0 = all)."""
    consistency: bool = True
    """Also generate from a second input view for the consistency score (twice the time)."""
    batch: int = 64
    """Views per UNet batch (lower it if the GPU runs out of memory)."""
    group: int = 16
    """Objects whose views are sampled together (fuller UNet batches; the scores do not change)."""
    seed: int = 0
    """Seed of the samplers' noise."""
    mean_samples: int = 0
    """Also score 'base-mean', the mean of this many Base samples per view (the model's posterior mean; each
    sample beyond the first costs one more Base pass); 0 = not scored."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    quiet: bool = False
    """Print only warnings and errors."""

    def run(self) -> int:
        """Evaluates and writes the report; returns the exit code."""
        from recon.api import evaluate_nvs
        from recon.progress import info, progress_bar, set_quiet
        from recon.systems.evaluation import EvalConfig, markdown_report, write_report

        set_quiet(self.quiet)
        cfg = EvalConfig(
            steps=self.steps, guidance_scale=self.guidance_scale, input_view=self.input_view,
            max_objects=self.max_objects, consistency=self.consistency, batch=self.batch, group=self.group,
            seed=self.seed, mean_samples=self.mean_samples,
        )
        with progress_bar() as bar:
            task = bar.add_task("evaluating objects", total=None, rate="", status="")
            report = evaluate_nvs(
                self.data, self.model, cfg, refiner=self.refiner, cascade=not self.no_cascade, device=self.device,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        json_path, md_path = write_report(report, self.output)
        info(markdown_report(report))
        info(f"wrote {md_path} and {json_path}")
        return 0
