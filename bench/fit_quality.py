"""Reference-view quality of `recon fit` with the fast paths on and off (same seed, same image, same prior).

    python bench/fit_quality.py IMAGE [--model tiny] [--preset default] [--steps N] [--set key=value ...] [--out q.json]

Fits ``IMAGE`` twice: as configured (batched render, analytic normals through
the fused hash grid for the first view of each fine step, near-empty samples
pruned, CUDA-graph replay of the UNet and of the VAE encoder, the encoder
channels-last with fused GroupNorm and matmul attention) and with the
reference paths (``batched_render=false``,
``field.normal_mode=finite_difference``, ``stages.fine.normal_views=0``,
``renderer.alpha_threshold=0``, ``guidance.cuda_graphs=false``,
``guidance.fast_vae_encoder=false``). After
each fit the reference view is rendered (eval mode) at the input's size and
compared with the input: PSNR of the colour over the background and IoU of
the silhouettes (opacity > 0.5 vs alpha > 0.5); and 8 views around the
object (15 degrees up, 128 px) are rendered with normals, scored by what the
normal regularisers minimise (``normal_smooth_2d``: squared differences of
neighbouring pixels of the normal maps, and ``orientation``), a measure of
how smooth the geometry came out. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from recon.cameras import orbit
from recon.fileio import write_json
from recon.systems import losses
from recon.systems.fit import Trainer

REFERENCE_PATHS = [
    "batched_render=false",
    "field.normal_mode=finite_difference",
    "stages.fine.normal_views=0",
    "renderer.alpha_threshold=0",
    "guidance.cuda_graphs=false",
    "guidance.fast_vae_encoder=false",
]


def measure(trainer: Trainer) -> dict[str, float]:
    """PSNR (dB) and mask IoU of the trained field's reference view against the input."""
    size = int(trainer.reference.rgba.shape[-1])
    trainer.renderer.eval()
    with torch.no_grad():
        out = trainer.renderer.render(trainer.reference_cameras(size), trainer.background)
    target_rgb, target_mask = trainer.targets(size)
    mse = torch.mean((out["rgb"].float().clamp(0, 1) - target_rgb) ** 2).item()
    mine, theirs = out["opacity"].float() > 0.5, target_mask > 0.5
    iou = ((mine & theirs).sum() / (mine | theirs).sum().clamp_min(1)).item()
    around = orbit(8, 15.0, trainer.sampler.radius, trainer.sampler.fovy_deg, 128).to(trainer.device)
    with torch.no_grad():
        views = trainer.renderer.render(around, trainer.background, normals=True)
    return {
        "psnr_db": round(-10.0 * math.log10(max(mse, 1e-12)), 3),
        "mask_iou": round(iou, 4),
        "normal_smooth_2d": round(losses.normal_smoothness_2d(views["normal"]).item(), 6),
        "orientation": round(losses.orientation(views["orientation"]).item(), 6),
    }


def main() -> None:
    """Runs both fits and prints the comparison."""
    from recon.api import fit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=None, help="total steps (schedules scale); default: the preset's")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--reference-set", dest="reference", action="append", default=None,
        help="the reference run's overrides (repeatable; default: every reference path) e.g. renderer.alpha_threshold=0 alone",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    original = Trainer.fit

    def fit_and_measure(self: Trainer, timer: Any = None) -> None:
        original(self, timer)
        results.append(measure(self))

    Trainer.fit = fit_and_measure
    rows = {}
    reference = REFERENCE_PATHS if args.reference is None else args.reference
    for name, extra in (("fast paths", []), ("reference paths", reference)):
        with tempfile.TemporaryDirectory() as scratch:
            fit(args.image, Path(scratch), args.preset, [*args.overrides, *extra], model=args.model, steps=args.steps, overwrite=True, batch=False)
        rows[name] = results[-1]
    print("| paths | reference PSNR dB | mask IoU | normal smoothness (8 views) | orientation (8 views) |\n|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['psnr_db']:.2f} | {row['mask_iou']:.4f} | {row['normal_smooth_2d']:.5f} | {row['orientation']:.5f} |")
    if args.out is not None:
        write_json(args.out, {
            "image": str(args.image), "model": args.model, "preset": args.preset, "steps": args.steps,
            "overrides": args.overrides, "reference_overrides": reference, "results": rows,
        })  # fmt: skip


if __name__ == "__main__":
    main()
