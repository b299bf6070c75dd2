"""``recon fit-views transforms.json -o OUT``: fit a NeRF to posed images, report held-out metrics, export."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from recon.errors import ReconError
from recon.runs import RunDir


def default_output(transforms: Path) -> Path:
    """``outputs/<scene>`` where the scene is the folder holding the JSON (or the JSON's stem)."""
    folder = transforms if transforms.is_dir() else transforms.parent
    name = folder.resolve().name or transforms.stem
    return Path("outputs") / name


@dataclass
class FitViewsCommand:
    """Fit a radiance field to posed images (NeRF-synthetic / instant-NGP transforms.json) and export a mesh."""

    transforms: tyro.conf.Positional[Path]
    """transforms.json (or a folder holding transforms.json / transforms_train.json)."""
    output: Annotated[Path | None, tyro.conf.arg(aliases=("-o",))] = None
    """Run folder (default: outputs/<folder of the JSON>)."""
    steps: int | None = None
    """Optimisation steps (default: the preset's)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    seed: int | None = None
    """Random seed (default: the preset's)."""
    preset: str | None = None
    """Preset name or .yaml path of config overrides."""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Config override key.path=value (repeatable), e.g. --set rays_per_batch=8192."""
    resume: bool = False
    """Continue the run in --output from its newest checkpoint."""
    export: bool = True
    """Export a textured mesh when training ends."""
    quiet: bool = False
    """Print only warnings and errors."""

    def _input_json(self) -> Path:
        path = self.transforms
        if path.is_dir():
            for name in ("transforms.json", "transforms_train.json"):
                if (path / name).is_file():
                    return path / name
            raise ReconError(f"{path}: holds no transforms.json or transforms_train.json")
        return path

    def run(self) -> int:
        """Fits (or resumes), evaluates and exports; returns the exit code."""
        from recon.config import read_preset, resolve, to_plain
        from recon.progress import PhaseTimer, info, set_quiet
        from recon.runtime import resolve_device, seed_everything
        from recon.systems.fit_views import (
            FitViewsConfig,
            FitViewsTrainer,
            load_views,
            resolve_scene,
        )

        set_quiet(self.quiet)
        device = resolve_device(self.device)
        transforms = self._input_json()
        output = self.output or default_output(self.transforms)
        cli_layer = {k: v for k, v in (("steps", self.steps), ("seed", self.seed)) if v is not None}
        resuming = RunDir.is_run(output)
        if resuming and not self.resume:
            raise ReconError(f"{output}: already holds a run; add --resume to continue it or choose another -o")
        if resuming:
            run = RunDir.open(output)
            if self.preset:
                info("--preset is ignored when resuming (the run's config.yaml is used)")
            cfg = resolve(FitViewsConfig, run.read_config(), cli_layer, overrides=self.set)
        else:
            cfg = resolve(FitViewsConfig, read_preset(self.preset) if self.preset else None, cli_layer, overrides=self.set)
        views = load_views(transforms, cfg)
        cfg = resolve_scene(cfg, views.train.cameras)
        seed_everything(cfg.seed)
        if resuming:
            run.write_config(to_plain(cfg))
        else:
            run = RunDir.create(output, to_plain(cfg), seed=cfg.seed, device=str(device))
        held = 0 if views.held_out is None else len(views.held_out)
        info(f"{transforms}: {len(views.train)} training and {held} held-out views of "
             f"{views.train.cameras.width}x{views.train.cameras.height}; run folder {run.root}")
        trainer = FitViewsTrainer(run, cfg, views, device)
        result = trainer.fit()
        if self.export:
            from recon.systems.run_export import export_run

            timer = PhaseTimer()
            with timer.phase("export"):
                export_run(run, cfg.export, device)
            run.record_timings(timer.seconds)
        if result.metrics:
            print(f"held-out PSNR {result.metrics['psnr']:.2f} dB, SSIM {result.metrics['ssim']:.3f}")
        print(f"run: {run.root}")
        return 0
