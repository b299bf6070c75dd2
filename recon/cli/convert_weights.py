"""``recon convert-weights IN OUT_DIR``: Zero-1-to-3 weights of any layout -> a diffusers folder of safetensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro


@dataclass(kw_only=True)
class ConvertWeightsCommand:
    """Convert a Zero-1-to-3 checkpoint (Lightning .ckpt, .safetensors, diffusers folder or hub id) into a diffusers
    folder of safetensors plus recon_zero123.json: later loads are memory-mapped, fast and never unpickle anything."""

    source: tyro.conf.Positional[str]
    """IN: zero123-xl.ckpt, 105000.ckpt, stable_zero123.ckpt, a .safetensors file, a diffusers folder or a hub id."""
    out_dir: tyro.conf.Positional[Path]
    """OUT_DIR: the diffusers folder to write (must not exist, or be empty)."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Precision of the written weights (fp16 halves the size; recon runs in fp16 on CUDA anyway)."""
    projection_folder: Literal["cc_projection", "clip_camera_projection"] = "cc_projection"
    """Name of the camera projection folder (both published layouts load in recon)."""
    pose_encoding: Literal["auto", "zero123", "stable-zero123"] = "auto"
    """Pose encoding to record; auto = decided from IN's own name (or its metadata/config)."""
    image_encoder: Path | None = None
    """A diffusers Zero-1-to-3 folder to take the CLIP image encoder from, for a checkpoint without one."""
    overwrite: bool = False
    """Replace OUT_DIR if recon wrote it before."""

    def run(self) -> int:
        """Converts; exit code 0."""
        from recon.guidance.convert import convert_weights
        from recon.progress import info

        folder = convert_weights(
            self.source,
            self.out_dir,
            dtype=self.dtype,
            projection_folder=self.projection_folder,
            pose_encoding=None if self.pose_encoding == "auto" else self.pose_encoding,
            image_encoder=self.image_encoder,
            overwrite=self.overwrite,
        )
        info(f"[green]wrote[/] {folder} ({self.dtype}); use it with --model {folder}")
        return 0
