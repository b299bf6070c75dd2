"""``recon convert-weights``: any Zero-1-to-3 weights -> a diffusers folder of safetensors that later loads fast and safely."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from recon.guidance.checkpoints import load_zero123, save_diffusers
from recon.guidance.model import PoseEncoding

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def convert_weights(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "fp16",
    projection_folder: str = "cc_projection",
    pose_encoding: PoseEncoding | None = None,
    image_encoder: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Reads ``source`` (a .ckpt / .safetensors checkpoint, a diffusers folder or a hub id) once, on the CPU,
    and writes ``out_dir`` as a diffusers folder of safetensors in ``dtype`` ("fp16", "bf16" or "fp32").

    ``recon_zero123.json`` records the pose encoding (decided now from the
    source, or ``pose_encoding``), the source and the dtype, so the folder
    loads with the same encoding whatever it is renamed to. The folder is
    written beside ``out_dir`` and renamed into place (atomic); ``overwrite``
    replaces only a folder written by recon. Returns ``out_dir``.
    """
    from recon.errors import ReconError

    if dtype not in DTYPES:
        raise ReconError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model = load_zero123(source, "cpu", DTYPES[dtype], pose_encoding=pose_encoding, image_encoder=image_encoder)
    extra = {"converted_from": str(source), "dtype": dtype}
    return save_diffusers(model, out_dir, projection_folder=projection_folder, overwrite=overwrite, extra_meta=extra)
