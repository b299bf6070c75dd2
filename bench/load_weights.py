"""Host memory and time to load Zero-1-to-3 weights: a Lightning .ckpt vs the folder ``recon convert-weights`` writes.

    python bench/load_weights.py all /tmp/w --device cuda          # make, convert, load both (fresh processes)
    python bench/load_weights.py all /tmp/w --device cpu --arch tiny  # smoke test of the script itself

Steps (``all`` runs them in order, each load in a fresh Python process):

* ``make DIR``: seeded random weights of the real architecture written as a
  Lightning-style ``DIR/zero123-full.ckpt``: fp32 ``state_dict`` with the EMA
  UNet copy (like zero123-xl.ckpt, ~8.5 GB) plus a hyper-parameter object that
  ``torch.load(weights_only=True)`` refuses, so the restricted reader is used.
* ``convert DIR``: ``recon convert-weights`` (fp16) into ``DIR/zero123-full-fp16``.
* ``load PATH``: ``load_zero123(PATH, device, dtype)``; prints one JSON line.

Peak host RSS is the process's high-water mark (VmHWM) reset just before the
load, so it counts the load alone on top of the process's RSS before it
(imports, CUDA context), which is reported as ``baseline_rss_gib``. Each
file's pages are dropped from the page cache first (posix_fadvise DONTNEED),
so the loads read from disk. The issue's target: peak - baseline under 1.5x
the fp16 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
CKPT_NAME = "zero123-full.ckpt"
CONVERTED_NAME = "zero123-full-fp16"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _drop_from_page_cache(path: Path) -> None:
    """Asks the kernel to forget the cached pages of ``path`` (every file of a folder)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _size_gib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_size for f in files) / GIB


def make(folder: Path, arch: str) -> dict:
    """Writes DIR/zero123-full.ckpt (random weights of ``arch``, Lightning layout with EMA)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from guidance_fixtures import ldm_state_dict  # the inverse of diffusers' LDM converters

    from recon.guidance.architectures import build_components
    from recon.guidance.model import Zero123Model

    start = time.perf_counter()
    with torch.device("meta"):
        parts = build_components(arch)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in parts.values():
            module.to_empty(device="cpu")
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.is_floating_point():
                    tensor.normal_(0.0, 0.02, generator=generator)
    model = Zero123Model(**parts, description=f"bench random {arch}")
    state = ldm_state_dict(model, ema_unet=model.unet)
    params = sum(p.numel() for p in model.parameters())
    del model, parts
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CKPT_NAME
    hyper = argparse.Namespace(base_learning_rate=1e-4, target="ldm.models.diffusion.ddpm.LatentDiffusion")
    torch.save({"state_dict": state, "global_step": 105000, "hyper_parameters": hyper}, path)
    return {"step": "make", "arch": arch, "parameters": params, "ckpt_gib": round(_size_gib(path), 3), "seconds": round(time.perf_counter() - start, 1)}


def convert(folder: Path) -> dict:
    """recon convert-weights DIR/zero123-full.ckpt DIR/zero123-full-fp16 (fp16)."""
    from recon.guidance.convert import convert_weights

    _import_libraries()
    source, out = folder / CKPT_NAME, folder / CONVERTED_NAME
    _drop_from_page_cache(source)
    _reset_peak_rss()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    convert_weights(source, out, overwrite=True)
    seconds = time.perf_counter() - start
    return {
        "step": "convert", "seconds": round(seconds, 2), "folder_gib": round(_size_gib(out), 3),
        "baseline_rss_gib": round(baseline / 2**20, 3), "peak_rss_gib": round(_status_kib("VmHWM") / 2**20, 3),
    }  # fmt: skip


def _import_libraries() -> None:
    """Imports what loading imports lazily, so that import time and memory stay out of the measurement."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import single_file_utils  # noqa: F401
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection  # noqa: F401


def load(path: Path, device: str, dtype_name: str) -> dict:
    """One timed load_zero123 of ``path`` onto ``device`` in ``dtype``, after CUDA is initialised."""
    import torch

    from recon.guidance.checkpoints import load_zero123

    _import_libraries()

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if device.startswith("cuda"):
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    _drop_from_page_cache(path)
    reset = _reset_peak_rss()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    model = load_zero123(path, device, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    fp16_gib = sum(p.numel() for p in model.parameters()) * 2 / GIB
    return {
        "step": "load", "source": path.name, "device": device, "dtype": dtype_name, "seconds": round(seconds, 2),
        "baseline_rss_gib": round(baseline / 2**20, 3), "peak_rss_gib": round(peak / 2**20, 3),
        "load_rss_gib": round((peak - baseline) / 2**20, 3), "fp16_weights_gib": round(fp16_gib, 3),
        "load_rss_over_fp16": round((peak - baseline) / 2**20 / fp16_gib, 2), "peak_reset": reset,
        "gpu_gib": round(torch.cuda.memory_allocated() / GIB, 3) if device.startswith("cuda") else None,
    }  # fmt: skip


def _in_fresh_process(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("all", "make", "convert", "load"))
    parser.add_argument("path", type=Path, help="working folder (all/make/convert) or the weights to load (load)")
    parser.add_argument("--arch", default="full", help="architecture of the random weights: full (real size) or tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.step == "make":
        results = [make(args.path, args.arch)]
    elif args.step == "convert":
        results = [convert(args.path)]
    elif args.step == "load":
        results = [load(args.path, args.device, args.dtype)]
    else:
        results = [_in_fresh_process(["make", str(args.path), "--arch", args.arch])]
        print(json.dumps(results[-1]), flush=True)
        results.append(_in_fresh_process(["convert", str(args.path)]))
        print(json.dumps(results[-1]), flush=True)
        for name in (CKPT_NAME, CONVERTED_NAME):
            results.append(_in_fresh_process(["load", str(args.path / name), "--device", args.device, "--dtype", args.dtype]))
            print(json.dumps(results[-1]), flush=True)
    if args.step != "all":
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
