"""How well priors denoise, timestep by timestep: epsilon-MSE and clean-latent MSE on the same held-out pairs.

    python bench/prior_timesteps.py HELDOUT WEIGHTS [WEIGHTS ...] [--pairs 256] [--timesteps 25,100,...] [--guidance-scale 3] [--out r.json]

HELDOUT is a folder of views as bench/train_tiny_prior.py renders its
held-out set (OUT/work/heldout, or bench/prior_overfit.py's WORK/heldout).
Every set of weights sees the same (input, target) pairs (the recipe's
``heldout_pairs``, seed ``--seed``) and the same noise at each timestep t.
Printed per t: the epsilon-MSE (the training loss at t, unweighted) and the
MSE of the clean latent recovered from the prediction (x0 = (x_t -
sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)); last, the x0-MSE of
predicting every target by the pairs' mean latent, the blur a model must
beat. Lower is better in both. A model that wins here at every t but not in
sampled views (bench/train_tiny_prior.py's evaluation) improved its
one-step estimates without improving its samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from recon.fileio import write_json

TIMESTEPS = (25, 100, 250, 400, 550, 700, 850, 950)


@torch.no_grad()
def denoising_errors(weights: str | Path, heldout: Path, size: int, device: str, timesteps: tuple[int, ...], count: int = 256,
                     seed: int = 0, guidance_scale: float = 1.0) -> dict:
    """``{"eps": [...], "x0": [...], "mean_latent_x0": float}``: per timestep of ``timesteps`` the epsilon-MSE and
    clean-latent MSE of ``weights`` on ``count`` held-out pairs (noise seeded by ``seed``, the same for any weights).
    The two differ by the factor (1 - alpha_bar) / alpha_bar at each t; the clean-latent one compares with
    ``mean_latent_x0``, the error of the pairs' mean latent as the prediction of every target. ``guidance_scale``
    other than 1 scores the classifier-free guided prediction (``Zero123Model.eps_cfg``) that sampling uses."""
    from train_tiny_prior import heldout_pairs  # bench/ is the script's folder, first on sys.path

    from recon.guidance.checkpoints import load_zero123
    from recon.runtime import resolve_device

    model = load_zero123(weights, resolve_device(device), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    cond_latent, target, context, _, _ = heldout_pairs(model, heldout, size, count, generator)
    noise = torch.randn(target.shape, generator=generator).to(model.device)
    eps_errors, x0_errors = [], []
    for step in timesteps:
        t = torch.full((count,), step, device=model.device)
        noisy = model.scheduler.add_noise(target, noise, t)
        if guidance_scale == 1.0:
            eps = model.eps(noisy, t, context, cond_latent).float()
        else:
            eps = model.eps_cfg(noisy, t, context, cond_latent, guidance_scale).float()
        alpha_bar = model.scheduler.alphas_cumprod[step].to(model.device)
        x0 = (noisy - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        eps_errors.append(float(torch.nn.functional.mse_loss(eps, noise)))
        x0_errors.append(float(torch.nn.functional.mse_loss(x0, target)))
    mean = float(torch.nn.functional.mse_loss(target.mean(0, keepdim=True).expand_as(target), target))
    return {"eps": eps_errors, "x0": x0_errors, "mean_latent_x0": mean}


def main(argv: list[str] | None = None) -> int:
    """Prints a Markdown table of :func:`denoising_errors` for every set of weights; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heldout", type=Path, help="folder of held-out views (the recipe's WORK/heldout)")
    parser.add_argument("weights", nargs="+", help="priors to compare: diffusers folders (or load_zero123 names)")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--timesteps", default=",".join(str(t) for t in TIMESTEPS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="score the CFG-guided prediction at this scale (1 = conditional)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    timesteps = tuple(int(t) for t in args.timesteps.split(","))
    report = {"heldout": str(args.heldout), "pairs": args.pairs, "seed": args.seed, "guidance_scale": args.guidance_scale,
              "timesteps": list(timesteps), "weights": {}}
    for weights in args.weights:
        report["weights"][str(weights)] = denoising_errors(weights, args.heldout, args.size, args.device, timesteps, args.pairs,
                                                           args.seed, args.guidance_scale)
    print("| weights | error | " + " | ".join(f"t={t}" for t in timesteps) + " |")
    print("|---|---|" + "---:|" * len(timesteps))
    for name, row in report["weights"].items():
        for kind in ("eps", "x0"):
            print(f"| {name} | {kind} | " + " | ".join(f"{v:.4f}" for v in row[kind]) + " |")
    first = next(iter(report["weights"].values()))
    print(f"\nx0-MSE of the pairs' mean latent: {first['mean_latent_x0']:.4f}")
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
