"""``recon fit-views transforms.json -o OUT``: fit a NeRF to posed images, report held-out metrics, export."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from recon.errors import ReconError


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
    overwrite: bool = False
    """Redo the run in --output from scratch (deletes only the files that run wrote)."""
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
        from recon.api import fit_views
        from recon.progress import set_quiet

        set_quiet(self.quiet)
        run, metrics = fit_views(
            self._input_json(),
            self.output or default_output(self.transforms),
            preset=self.preset,
            overrides=self.set,
            steps=self.steps,
            seed=self.seed,
            device=self.device,
            resume=self.resume,
            overwrite=self.overwrite,
            export=self.export,
        )
        if metrics:
            print(f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}")
        print(f"run: {run.root}")
        return 0
