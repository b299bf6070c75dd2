"""Times score distillation with full-size (random-weight) Zero123 networks.

    python bench/guidance.py --out bench-guidance.json [--batches 2 4 12] [--steps 20] [--encoders reference fast]

For each VAE encoder path (the reference: NCHW, SDPA attention; then the
fast one, guidance.fast_vae_encoder: channels-last with fused GroupNorm +
SiLU, matmul attention, used with CUDA graphs only), modes zero123 and
cascade (Refiner = the Base's weights, 5 tokens), CUDA graphs off and on,
and each batch size: milliseconds per SDS step = VAE encode of 256x256
renders with grad + CFG UNet call + backward to the pixels, and peak CUDA
memory.
Also the one-time cascade preparation (Base self-prompting of the nearby
views and of the coarse-target bank, DDIM 25 steps + CFG). CUDA timings use
CUDA events after warm-up. Prints a Markdown table; writes JSON to --out.
Random weights time exactly like real ones (same shapes and kernels).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from recon.fileio import write_json
from recon.guidance.checkpoints import load_zero123
from recon.guidance.config import GuidanceConfig
from recon.guidance.interface import DTYPES, Zero123Guidance, make_guidance
from recon.preprocess import ReferenceView


def _reference(size: int = 256) -> ReferenceView:
    """A synthetic input: a shaded disc on a transparent background."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    alpha = (xs**2 + ys**2 < 0.5).float()
    rgb = torch.stack([0.5 + 0.4 * xs, 0.5 + 0.4 * ys, torch.full_like(xs, 0.6)]).clamp(0, 1)
    return ReferenceView(torch.cat([rgb, alpha[None]]), Path("synthetic.png"))


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sds(guidance: Zero123Guidance, batch: int, resolution: int, steps: int, warmup: int) -> dict[str, float]:
    """Mean ms per SDS step (forward + backward to the renders) and peak memory for one batch size."""
    device = guidance.device
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, resolution, resolution, device=device, generator=generator).requires_grad_(True)
    elevation = torch.linspace(-10.0, 60.0, batch)
    azimuth = torch.linspace(-170.0, 170.0, batch)
    radius = torch.full((batch,), 3.8)
    nonfinite = 0.0

    def step(index: int) -> None:
        nonlocal nonfinite
        images.grad = None
        out = guidance.sds(images, elevation, azimuth, radius, step=index, generator=generator)
        out.loss.backward()
        nonfinite += out.diagnostics["sds_nonfinite"]

    for i in range(warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            step(i)
        end.record()
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end) / steps
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        ms = (time.perf_counter() - t0) * 1000.0 / steps
        peak = None
    return {"ms_per_step": ms, "peak_memory_gib": peak, "nonfinite_samples": nonfinite}


def main(argv: list[str] | None = None) -> dict:
    """Parses the flags, runs the timings, prints the table and writes the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--spec", default="random-full", help="weights to load (random-full times the real network)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 12])
    parser.add_argument("--resolution", type=int, default=256, help="render size fed to the guidance")
    parser.add_argument("--steps", type=int, default=20, help="timed SDS steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--nearby-steps", type=int, default=25, help="DDIM steps of the self-prompting")
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=["reference", "fast"],
        choices=["reference", "fast"],
        help="VAE encoder paths to time (the reference runs first: switching the shared model to the fast one is one-way)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    t0 = time.perf_counter()
    base = load_zero123(args.spec, device, DTYPES[args.dtype])
    _sync(device)
    load_seconds = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    reference = _reference()
    results: dict = {
        "device": name,
        "spec": args.spec,
        "dtype": args.dtype,
        "resolution": args.resolution,
        "load_seconds": load_seconds,
        "sds": [],
        "prepare": {},
    }
    encoders = sorted(set(args.encoders), key=["reference", "fast"].index)
    # the fast encoder is used only with CUDA graphs (GuidanceConfig.fast_vae_encoder)
    runs = [(e, m, g) for e in encoders for m in ("zero123", "cascade") for g in (False, True) if g or e == "reference"]
    for encoder, mode, graphs in runs:
        cfg = GuidanceConfig(
            model=args.spec,
            mode=mode,
            dtype=args.dtype,
            vae_grad_resolution=args.resolution,
            nearby_steps=args.nearby_steps,
            cuda_graphs=graphs,
            fast_vae_encoder=encoder == "fast",
        )
        guidance = make_guidance(cfg, device, base=base)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        info = guidance.prepare(reference, None)
        _sync(device)
        if mode == "cascade":
            results["prepare"][f"{encoder}, {'graphs' if graphs else 'eager'}"] = {
                "seconds": time.perf_counter() - t0,
                "nearby_views": len(guidance.nearby_views),
                "nearby_seconds": info["nearby_seconds"],
                "bank_views": len(guidance.bank_views),
                "bank_seconds": info["bank_seconds"],
                "ddim_steps": args.nearby_steps,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            }
        tokens = guidance.context((torch.zeros(1), torch.zeros(1), torch.full((1,), 3.8))).shape[1]
        for batch in args.batches:
            row = {"encoder": encoder, "mode": mode, "cuda_graphs": graphs, "batch": batch, "tokens": tokens}
            row.update(time_sds(guidance, batch, args.resolution, args.steps, args.warmup))
            results["sds"].append(row)
            print(
                f"  {encoder:<9} {mode:<8} graphs={graphs!s:<5} B={batch:<2} {row['ms_per_step']:8.1f} ms/step  peak {_gib(row['peak_memory_gib'])} GiB", flush=True
            )
        del guidance
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(
        f"\nSDS step on {name}, {args.dtype}, {args.resolution}x{args.resolution} renders, grad through the VAE encoder "
        f"(model load {load_seconds:.1f} s)\n"
    )
    print("| VAE encoder | mode | CUDA graphs | tokens | batch | ms / step | ms / view | peak GiB | non-finite |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["sds"]:
        print(
            f"| {row['encoder']} | {row['mode']} | {'on' if row['cuda_graphs'] else 'off'} | {row['tokens']} | {row['batch']} | {row['ms_per_step']:.1f} "
            f"| {row['ms_per_step'] / row['batch']:.1f} | {_gib(row['peak_memory_gib'])} | {row['nonfinite_samples']:.0f} |"
        )
    for runner, prep in results["prepare"].items():
        print(
            f"\nCascade preparation ({runner}, once per input, DDIM {prep['ddim_steps']} steps + CFG): "
            f"{prep['seconds']:.2f} s total; {prep['nearby_views']} nearby views {prep['nearby_seconds']:.2f} s, "
            f"{prep['bank_views']} bank views {prep['bank_seconds']:.2f} s; peak {_gib(prep['peak_memory_gib'])} GiB"
        )
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
