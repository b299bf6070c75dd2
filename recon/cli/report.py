"""``recon report OUTPUTS_DIR``: one self-contained report.html over a folder of run folders (see recon.systems.report)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro


@dataclass(kw_only=True)
class ReportCommand:
    """Write OUTPUTS_DIR/report.html: one card per image (input, cut-out, turntable, 3D viewer, status, timings)."""

    outputs: tyro.conf.Positional[Path]
    """The -o folder of recon fit / recon batch (holds batch_summary.json and/or run folders)."""
    output: Annotated[Path | None, tyro.conf.arg(aliases=("-o",))] = None
    """Where to write the page (default OUTPUTS_DIR/report.html)."""
    max_glb_mb: float = 64.0
    """GLBs larger than this many MiB are listed but not embedded in the page."""

    def run(self) -> int:
        """Writes the report and prints its path; exit code 0."""
        from recon.progress import info
        from recon.systems.report import write_report

        path = write_report(self.outputs, self.output, max_glb_bytes=int(self.max_glb_mb * 2**20))
        info(f"wrote {path} (open it in a browser; it needs no network)")
        return 0
