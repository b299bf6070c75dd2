"""``recon fit IMAGES...`` and ``recon batch DIR``: images to Blender-ready meshes (see recon.api)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro
from tyro.constructors import PrimitiveConstructorSpec

DOCUMENTED_DEFAULT = tyro.conf.arg(help_behavior_hint="")
"""For flags whose docstring says what their default means (no second "(default: None)")."""


@dataclass(kw_only=True)
class _FitOptions:
    """Options shared by `recon fit` and `recon batch`."""

    output: Annotated[Path, tyro.conf.arg(aliases=("-o",))] = Path("outputs")
    """Folder of the run folders (one per image, named by its stem)."""
    preset: str = "default"
    """Preset: default (GPU, quality), fast (GPU, fewer steps), cpu (no GPU, minutes), or a .yaml path."""
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Override any config value, e.g. --set stages.fine.steps=200 (repeatable)."""
    model: Annotated[str | None, DOCUMENTED_DEFAULT] = None
    """Zero123 weights (overrides guidance.model; preset default 'tiny'): a folder, a .ckpt/.safetensors
    file, a hub id, or random-tiny / random-full (random weights: a smoke test only)."""
    format: Annotated[str | None, DOCUMENTED_DEFAULT] = None
    """Mesh formats, comma-separated: glb (default), obj (OBJ+MTL+PNG), ply."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    seed: Annotated[int | None, DOCUMENTED_DEFAULT] = None
    """Random seed (default: the preset's, 0); recorded in meta.json."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint (same result as an uninterrupted run)."""
    overwrite: bool = False
    """Redo runs that already exist, deleting only the files recon wrote in them (finished runs are otherwise skipped)."""
    quiet: bool = False
    """Print only warnings and errors."""
    foreground_ratio: Annotated[float | None, DOCUMENTED_DEFAULT] = None
    """Object size as a fraction of the reference image side (default: the weights' own framing, else 0.85)."""
    remove_bg: Annotated[bool, DOCUMENTED_DEFAULT] = True
    """--no-remove-bg: use the whole frame of images without transparency (default: remove their background)."""
    steps: Annotated[int | None, DOCUMENTED_DEFAULT] = None
    """Total optimisation steps; every stage and schedule is scaled to match (default: the preset's)."""
    elevation: Annotated[float | None, DOCUMENTED_DEFAULT] = None
    """Elevation of the input photo's camera in degrees, positive = looking down on the object (default 0;
    threestudio uses 5); conditions both pose encodings and the cascade's nearby views."""

    def _fit(self, images: list[Path], batch: bool | None, **scale_out: Any) -> int:
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
            **scale_out,
        )
        return 1 if any(r.status == "failed" for r in results) else 0


@dataclass(kw_only=True)
class FitCommand(_FitOptions):
    """Reconstruct one image (or several, or a folder) as a textured mesh: outputs/<stem>/exports/mesh.glb."""

    images: tyro.conf.Positional[Annotated[list[Path], tyro.conf.arg(metavar="IMAGE [IMAGE ...]", help_behavior_hint="(required)")]]
    """Image files (PNG with transparency is best) or folders of images."""

    def run(self) -> int:
        """Runs the fit; exit code 0, or 1 when any image of several failed."""
        from recon.errors import ReconError

        if not self.images:
            raise ReconError("give at least one image file or folder")
        return self._fit(self.images, None)


def _one_or_none(args: list[str]) -> str:
    from recon.errors import ReconError

    if len(args) > 1:
        raise ReconError(f"--ray takes at most one address, got {' '.join(args)}")
    return args[0] if args else "local"


_OPTIONAL_VALUE = PrimitiveConstructorSpec(
    nargs="*", metavar="[ADDRESS]", instance_from_str=_one_or_none, is_instance=lambda v: isinstance(v, str), str_from_instance=lambda v: [v],
)
"""``--ray`` alone means ``local``; ``--ray ADDRESS`` gives the address."""


@dataclass(kw_only=True)
class BatchCommand(_FitOptions):
    """Reconstruct every image of a folder; resumable, finished runs skipped, one failure never stops the rest."""

    folder: tyro.conf.Positional[Path]
    """Folder of images (not searched recursively)."""
    resume: Annotated[bool, DOCUMENTED_DEFAULT] = True
    """--no-resume: an interrupted run is an error (default: continue it from its last checkpoint)."""
    gpus: str | None = None
    """One worker process per GPU, each loading the models once: all, a count (2) or indices (0,2)."""
    workers: int | None = None
    """CPU worker processes (with --device cpu), worker processes spread over the GPUs (with --gpus; 2 per GPU
    overlaps one image's export with another's fit), or the number of Ray workers (with --ray)."""
    ray: Annotated[str | None, _OPTIONAL_VALUE] = None
    """Run on a Ray cluster (pip install ".[ray]"): --ray alone uses or starts a local one, --ray auto an existing
    cluster, --ray HOST:PORT that one; one worker per GPU (or per CPU with --device cpu); -o must be shared storage."""

    def run(self) -> int:
        """Runs the batch; exit code 1 when any image failed."""
        from recon.errors import InputError

        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: not a folder (recon batch takes a folder; use recon fit for files)")
        return self._fit([self.folder], True, gpus=self.gpus, workers=self.workers, ray=self.ray)
