"""Makes the example input image examples/robot.png (deterministic; no downloads, no assets).

The toy robot of :func:`recon.data.primitives.toy_robot` (boxes, spheres,
capsules and cylinders) is ray-cast exactly with Lambertian shading, seen
from a little above and to its left, on a transparent background, with
4 x 4 supersampled (anti-aliased) edges. Run from anywhere::

    python examples/make_example.py            # writes examples/robot.png
    python examples/make_example.py --object mug --output mug.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from recon.cameras import Cameras
from recon.data.primitives import mug, render_object, toy_robot
from recon.imageio import save_rgba_png

ELEVATION_DEG = 10.0
"""Camera elevation of the example view, degrees."""
AZIMUTH_DEG = 25.0
"""Camera azimuth of the example view, degrees (0 = straight at the robot's face)."""
RADIUS = 3.8
"""Camera distance, scene units (the Zero-1-to-3 default)."""
FOVY_DEG = 20.0
"""Vertical field of view, degrees."""


def make_example(output: Path, size: int = 512, name: str = "robot", supersample: int = 4) -> Path:
    """Renders the example object to an RGBA PNG of ``size`` x ``size`` pixels at ``output``."""
    obj = toy_robot() if name == "robot" else mug()
    cameras = Cameras.from_spherical(
        torch.tensor([ELEVATION_DEG]), torch.tensor([AZIMUTH_DEG]), torch.tensor([RADIUS]), FOVY_DEG, size
    )
    with torch.no_grad():
        rgba = render_object(obj, cameras, shading="lambert", supersample=supersample)["rgba"][0]
    save_rgba_png(output, rgba.numpy())
    return output


def main() -> None:
    """Command-line entry: writes the example image and prints its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "robot.png")
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--object", choices=("robot", "mug"), default="robot")
    args = parser.parse_args()
    print(make_example(args.output, args.size, args.object))


if __name__ == "__main__":
    main()
