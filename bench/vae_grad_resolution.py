"""How much ``guidance.vae_grad_resolution`` changes the SDS gradient that reaches a small render.

    PYTHONPATH=. python3 bench/vae_grad_resolution.py [IMAGE] [--model tiny] [--render-size 32] [--resolution 64]

Encoding a render at less than the model's size (``vae_grad_resolution``,
the latents then upsampled to the model's grid) makes the VAE encoder's
forward and backward cheaper by the square of the ratio. This script
measures what it does to the gradient: for ``--trials`` random target
cameras and timesteps in the coarse stage's range (t in 200..850), the input
photo resized to ``--render-size`` stands in for a render, and the SDS
gradient on its pixels is computed with the encoder at ``--resolution``
(``reduced``) and at the model's size (``full``), each averaged over
``--draws`` noise draws (the same draws for both) at that timestep: the
optimisation follows the expected gradient, not one draw. Reported: the
cosine similarity of the two mean pixel gradients and the ratio of their
norms; and, as the scale of what ``--draws`` draws leave of the SDS
gradient's randomness, the cosine between two ``full`` means over disjoint
sets of draws.

With the shipped 128 px prior, 32 px renders and ``--resolution 64`` the
sizes are in the ratios of the default preset's coarse stage with
full-size weights encoded at 128 instead of 256 (render : reduced : full =
64 : 128 : 256). Random full-size weights would say nothing here, so the
script runs on any device.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from recon.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    """Parses the flags, computes the gradient pairs, prints a Markdown table, writes ``--out``; returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, nargs="?", default=ROOT / "examples" / "robot.png")
    parser.add_argument("--model", default="tiny", help="guidance weights (default: the shipped prior)")
    parser.add_argument("--render-size", type=int, default=0, help="side of the stand-in render, px (0 = a quarter of the model's size)")
    parser.add_argument("--resolution", type=int, default=0, help="reduced encoder input side, px (0 = half the model's size)")
    parser.add_argument("--trials", type=int, default=16, help="random (camera, timestep) draws")
    parser.add_argument("--draws", type=int, default=8, help="noise draws averaged per trial and gradient")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="JSON record")
    args = parser.parse_args(argv)

    from recon.guidance.checkpoints import load_zero123
    from recon.guidance.config import GuidanceConfig
    from recon.guidance.interface import Zero123Guidance
    from recon.guidance.sampling import native_size
    from recon.preprocess import load_reference
    from recon.runtime import resolve_device

    device = resolve_device(args.device)
    model = load_zero123(args.model, device, torch.float32)
    reference = load_reference(args.image)
    size = native_size(model)
    render = args.render_size or size // 4
    sizes = {"reduced": args.resolution or size // 2, "full": size}
    guidances = {}
    for name, resolution in sizes.items():
        guidances[name] = Zero123Guidance(GuidanceConfig(model=args.model, vae_grad_resolution=resolution, cuda_graphs=False), model)
        guidances[name].prepare(reference)
    image = F.interpolate(reference.rgb_over()[None].float(), size=(render, render), mode="bilinear", antialias=True).to(device)
    print(f"model {args.model} ({size} px), render {render} px: encoded at {sizes['reduced']} px (reduced) and {size} px (full)")

    draws = torch.Generator().manual_seed(0)
    rows = []
    for trial in range(args.trials):
        elevation = float(torch.empty(1).uniform_(-10.0, 40.0, generator=draws))
        azimuth = float(torch.empty(1).uniform_(-180.0, 180.0, generator=draws))
        t = int(torch.randint(200, 851, (1,), generator=draws))
        grads = {}
        for name, first in (("reduced", 0), ("full", 0), ("full, other noise", args.draws)):
            g = guidances[name.split(",")[0]]
            # min_step == max_step: the timestep is t; the noise comes from the seeded generator
            g.min_step_percent = g.max_step_percent = t / 1000.0
            pixels = image.clone().requires_grad_(True)
            for draw in range(first, first + args.draws):
                seed = 100_000 * trial + draw
                out = g.sds(pixels, torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([3.8]), step=0,
                            generator=torch.Generator(device=device).manual_seed(seed))
                out.loss.backward()  # gradients add up over the draws: their sum has the mean's direction
            grads[name] = pixels.grad.flatten().double() / args.draws
        cosine = float(F.cosine_similarity(grads["reduced"], grads["full"], dim=0))
        noise_cosine = float(F.cosine_similarity(grads["full, other noise"], grads["full"], dim=0))
        ratio = float(grads["reduced"].norm() / grads["full"].norm())
        rows.append({"elevation": elevation, "azimuth": azimuth, "t": t, "cosine": cosine, "norm_ratio": ratio, "noise_cosine": noise_cosine})

    mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("cosine", "norm_ratio", "noise_cosine")}
    print(f"\nmeans over {args.draws} noise draws per gradient")
    print("\n| trial | elevation | azimuth | t | cosine reduced vs full | norm reduced / full | cosine full vs full, other draws |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        print(f"| {i} | {r['elevation']:.1f} | {r['azimuth']:.1f} | {r['t']} | {r['cosine']:.3f} | {r['norm_ratio']:.3f} | {r['noise_cosine']:.3f} |")
    print(f"| mean | | | | {mean['cosine']:.3f} | {mean['norm_ratio']:.3f} | {mean['noise_cosine']:.3f} |")
    record = {"model": args.model, "render_size": render, "encoded": sizes, "draws": args.draws, "trials": rows, "mean": mean}
    if args.out:
        write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
