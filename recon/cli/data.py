"""``recon data synth -o DATA``: render a synthetic multi-view training set of primitive objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro


@dataclass
class DataSynthCommand:
    """Render random primitive objects (spheres, boxes, cylinders, capsules; striped/checkered colours)
    from random views at Zero-1-to-3's cameras, in the recon multi-view layout (DATA/<id>/NNN.png + NNN.json).
    A rerun into the same folder keeps finished objects."""

    output: Annotated[Path, tyro.conf.arg(aliases=("-o",))]
    """Dataset folder to write."""
    objects: int = 100
    """Number of objects."""
    views: int = 12
    """Views per object."""
    size: int = 128
    """Image side in pixels."""
    seed: int = 0
    """Dataset seed (different seeds give disjoint objects, e.g. a held-out set)."""
    radius: float = 3.8
    """Camera distance (scene units; objects fit a sphere of radius 0.55)."""
    fovy_deg: float = 20.0
    """Vertical field of view in degrees."""
    elevation_min_deg: float = -10.0
    """Lowest camera elevation in degrees."""
    elevation_max_deg: float = 80.0
    """Highest camera elevation in degrees."""
    max_primitives: int = 6
    """Most primitives per object."""
    shading: str = "lambert"
    """'lambert' (ambient + a world-fixed light) or 'albedo' (flat colours)."""
    orbit: bool = False
    """Views evenly spaced in azimuth at one elevation per object (fixed relative poses, for eval-nvs)."""
    quiet: bool = False
    """Print only warnings and errors."""

    def run(self) -> int:
        """Renders the dataset; returns the exit code."""
        from recon.data.synth import SynthConfig, synthesize
        from recon.progress import info, set_quiet

        set_quiet(self.quiet)
        cfg = SynthConfig(
            objects=self.objects, views=self.views, size=self.size, seed=self.seed, radius=self.radius,
            fovy_deg=self.fovy_deg, elevation_min_deg=self.elevation_min_deg, elevation_max_deg=self.elevation_max_deg,
            max_primitives=self.max_primitives, min_primitives=min(2, self.max_primitives), shading=self.shading, orbit=self.orbit,
        )
        counts = synthesize(cfg, self.output)
        info(f"{self.output}: {counts['written']} objects rendered, {counts['skipped']} already there ({self.views} views each)")
        return 0
