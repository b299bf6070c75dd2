"""Times the turntable of a run (recon.exports.turntable): rendering and encoding separately.

    python bench/turntable.py RUN_DIR [--device auto] [--frames 60] [--resolution 256] [--fps 24] [--gif] [--out t.json]
    python bench/turntable.py --robot [--frames 60] [--resolution 256] [--gif]   # encoding only, no field

With RUN_DIR the run's field and renderer (config.yaml, newest checkpoint with
its occupancy grid) render the turntable as `recon fit` does after the export;
``--frames/--resolution/--fps`` default to the run's export.turntable_* settings.
``--robot`` replaces the renderer by rotated copies of examples/robot.png on
white (object-like frames, no render cost), to time the encoding alone.
``--gif`` forces the GIF path (no ffmpeg), which the GPU machine takes.
Prints total seconds, the seconds inside the render calls (synchronised; each
call's too) and the rest (conversion and encoding), and the file size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recon.config import from_plain
from recon.exports import turntable
from recon.exports.config import ExportConfig
from recon.runs import RunDir
from recon.runtime import resolve_device
from recon.systems.checkpoint import load_renderer_from_run


def robot_render(resolution: int):
    """A render function that returns rotated copies of examples/robot.png over white (frame i turned 6i degrees)."""
    from PIL import Image

    robot = Image.open(Path(__file__).resolve().parents[1] / "examples" / "robot.png").convert("RGBA")
    robot = robot.resize((resolution * 3 // 4,) * 2)
    count = [0]

    def render(cameras):
        frames = []
        for _ in range(len(cameras)):
            canvas = Image.new("RGBA", (resolution, resolution), (255, 255, 255, 255))
            canvas.alpha_composite(robot.rotate(6 * count[0], resample=Image.BILINEAR), ((resolution - robot.width) // 2,) * 2)
            frames.append(np.asarray(canvas.convert("RGB"), dtype=np.float32) / 255.0)
            count[0] += 1
        return torch.from_numpy(np.stack(frames))

    return render


def main() -> None:
    """Parses the flags, renders and encodes one turntable, prints the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--robot", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--fps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--gif", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if (args.run_dir is None) == (not args.robot):
        parser.error("give a RUN_DIR or --robot")
    settings = ExportConfig()
    device = resolve_device(args.device)
    if args.robot:
        radius, fovy, background = 3.8, 20.0, None
    else:
        renderer, _ = load_renderer_from_run(args.run_dir, device)
        config = RunDir.open(args.run_dir).read_config()
        settings = from_plain(ExportConfig, config.get("export", {}))
        radius, fovy = 3.8, 20.0
        background = torch.tensor(config.get("background", [1.0, 1.0, 1.0]), device=device)
    frames = args.frames or settings.turntable_frames
    resolution = args.resolution or settings.turntable_resolution
    fps = args.fps or settings.turntable_fps
    inner = robot_render(resolution) if args.robot else (lambda cameras: renderer.render(cameras.to(device), background)["rgb"])
    calls: list[float] = []  # seconds of each render call

    def timed_render(cameras):
        start = time.perf_counter()
        rgb = inner(cameras)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        calls.append(time.perf_counter() - start)
        return rgb

    if args.gif:
        turntable.ffmpeg_available = lambda: False
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = turntable.render_turntable(timed_render, Path(tmp) / "turntable.mp4", frames, 15.0, radius, fovy, resolution, fps, args.batch_size)
        total = time.perf_counter() - start
        size = path.stat().st_size
    result = {
        "device": str(device), "frames": frames, "resolution": resolution, "format": path.suffix[1:], "calls": len(calls),
        "total_s": round(total, 3), "render_s": round(sum(calls), 3), "encode_s": round(total - sum(calls), 3), "bytes": size,
        "render_calls_s": [round(c, 3) for c in calls],  # a slow first call: one-time costs (kernel compiles, caches)
    }
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
