"""``recon fit IMAGES...`` and ``recon batch DIR``: images to Blender-ready meshes (see recon.api)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro


@dataclass(kw_only=True)
class _FitOptions:
    """Options shared by `recon fit` and `recon batch`."""

    output: Annotated[Path, tyro.conf.arg(aliases=("-o",))] = Path("outputs")
    """Folder of the run folders (one per image, named by its stem)."""
    preset: str = "default"
    """Preset: default (GPU, quality), fast (GPU, fewer steps), cpu (no GPU, minutes), or a .yaml path."""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Override any config value, e.g. --set stages.fine.steps=200 (repeatable)."""
    model: str | None = None
    """Zero123 weights (overrides guidance.model; preset default 'tiny'): a folder, a .ckpt/.safetensors
    file, a hub id, or random-tiny / random-full (random weights: a smoke test only)."""
    format: str | None = None
    """Mesh formats, comma-separated: glb (default), obj (OBJ+MTL+PNG), ply."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    seed: int | None = None
    """Random seed (default: the preset's, 0); recorded in meta.json."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint (same result as an uninterrupted run)."""
    overwrite: bool = False
    """Delete and redo runs that already exist (finished runs are otherwise skipped)."""
    quiet: bool = False
    """Print only warnings and errors."""
    foreground_ratio: float | None = None
    """Object size as a fraction of the reference image side (default 0.85)."""
    remove_bg: bool = True
    """Remove the background of images without transparency (--no-remove-bg uses the whole frame)."""
    steps: int | None = None
    """Total optimisation steps; every stage and schedule is scaled to match (default: the preset's)."""
    elevation: float | None = None
    """Elevation of the input photo's camera in degrees, positive = looking down on the object (default 0;
    threestudio uses 5); conditions both pose encodings and the cascade's nearby views."""

    def _fit(self, images: list[Path], batch: bool | None) -> int:
        from recon.api import fit

        results = fit(
            images,
            output=self.output,
            preset=self.preset,
            overrides=self.set,
            model=self.model,
            formats=self.format,
            device=self.device,
            seed=self.seed,
            resume=self.resume,
            overwrite=self.overwrite,
            quiet=self.quiet,
            foreground_ratio=self.foreground_ratio,
            remove_bg=None if self.remove_bg else False,
            steps=self.steps,
            batch=batch,
            elevation=self.elevation,
        )
        return 1 if any(r.status == "failed" for r in results) else 0


@dataclass(kw_only=True)
class FitCommand(_FitOptions):
    """Reconstruct one image (or several, or a folder) as a textured mesh: outputs/<stem>/exports/mesh.glb."""

    images: tyro.conf.Positional[list[Path]]
    """Image files (PNG with transparency is best) or folders of images."""

    def run(self) -> int:
        """Runs the fit; exit code 0, or 1 when any image of several failed."""
        from recon.errors import ReconError

        if not self.images:
            raise ReconError("give at least one image file or folder")
        return self._fit(self.images, None)


@dataclass(kw_only=True)
class BatchCommand(_FitOptions):
    """Reconstruct every image of a folder; resumable, finished runs skipped, one failure never stops the rest."""

    folder: tyro.conf.Positional[Path]
    """Folder of images (not searched recursively)."""
    resume: bool = True
    """Continue interrupted runs from their last checkpoint (--no-resume makes them errors)."""

    def run(self) -> int:
        """Runs the batch; exit code 1 when any image failed."""
        from recon.errors import InputError

        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: not a folder (recon batch takes a folder; use recon fit for files)")
        return self._fit([self.folder], True)
