"""``recon data synth -o DATA``: render a synthetic multi-view training set of primitive objects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from recon.data.synth import SynthConfig, synthesize


@dataclass
class DataSynthCommand:
    """Render random primitive objects (spheres, boxes, cylinders, capsules; striped/checkered colours)
    from random views at Zero-1-to-3's cameras, in the recon multi-view layout (DATA/<id>/NNN.png + NNN.json).
    A rerun into the same folder keeps finished objects."""

    output: Annotated[Path, tyro.conf.arg(aliases=("-o",))]
    """Dataset folder to write."""
    dataset: Annotated[SynthConfig, tyro.conf.OmitArgPrefixes]
    """What to render; every field is a flag of its own (--objects, --views, --size, ...)."""
    quiet: bool = False
    """Print only warnings and errors."""

    def run(self) -> int:
        """Renders the dataset; returns the exit code."""
        from recon.progress import info, set_quiet

        set_quiet(self.quiet)
        counts = synthesize(self.dataset, self.output)
        info(f"{self.output}: {counts['written']} objects rendered, {counts['skipped']} already there ({self.dataset.views} views each)")
        return 0
