"""Profiles `recon export` of a run folder: seconds per export stage and the functions inside them.

    python bench/export_profile.py RUN_DIR [--device auto] [--set key=value ...] [--profile 30] [--out prof.json]
    python bench/export_profile.py RUN_DIR --pack-field DIR     # also: the run's field in parts of < 16 MB
    python bench/export_profile.py --unpack-field DIR --to RUN  # a run folder (config, meta, checkpoint) from them

The export runs as `recon export` runs it (systems/run_export.py: the run's
export settings from config.yaml, ``--set`` overrides on top, the training
cameras of meta.json), into a scratch folder, ``--repeat`` times (the first
pays one-time costs: imports, CUDA context, kernel builds). It prints the
stage seconds of each repeat and, with ``--profile N``, the N functions of the
last repeat with the most cumulative time (cProfile; on the GPU the field
calls are asynchronous, so their time shows up where results are copied to
the CPU). ``--pack-field`` saves the field's weights (fp16, split into parts)
with the run's config.yaml and meta.json, so a field fitted on the GPU
machine can be re-exported elsewhere; ``--unpack-field`` turns such a folder
back into a run that ``recon export`` and this script accept.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from recon.config import from_plain, resolve
from recon.exports.config import ExportConfig
from recon.fileio import read_json, write_json
from recon.runs import RunDir
from recon.runtime import resolve_device

PART_BYTES = 15_000_000


def pack_field(run_dir: Path, folder: Path) -> list[Path]:
    """Writes the run's field weights (floating tensors as fp16, rows split so no file exceeds PART_BYTES) as
    ``field_NN.pt`` with its config.yaml and meta.json into ``folder``; returns the files written."""
    from recon.systems.checkpoint import load_field_from_run

    field, checkpoint = load_field_from_run(run_dir, "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    pieces: list[dict] = [{}]
    size = 0
    for name, tensor in field.state_dict().items():
        tensor = tensor.half() if tensor.is_floating_point() else tensor
        rows = max(1, PART_BYTES // max(1, tensor[0].numel() * tensor.element_size())) if tensor.dim() else 1
        for index, start in enumerate(range(0, max(1, len(tensor)) if tensor.dim() else 1, rows)):
            part = tensor[start : start + rows].clone() if tensor.dim() else tensor
            nbytes = part.numel() * part.element_size()
            if size + nbytes > PART_BYTES and pieces[-1]:
                pieces.append({})
                size = 0
            pieces[-1][f"{name}#{index}"] = part
            size += nbytes
    written = []
    for number, piece in enumerate(pieces):
        torch.save(piece, folder / f"field_{number:02d}.pt")
        written.append(folder / f"field_{number:02d}.pt")
    for name in ("config.yaml", "meta.json"):
        shutil.copy(run_dir / name, folder / name)
    write_json(folder / "field_step.json", {"step": checkpoint.step, "stage": checkpoint.stage})
    return written


def unpack_field(folder: Path, run_dir: Path) -> RunDir:
    """A run folder at ``run_dir`` (new) holding the field packed by :func:`pack_field` in ``folder``."""
    from recon.field import FieldConfig, RadianceField
    from recon.systems.checkpoint import save_checkpoint

    run = RunDir.create(run_dir, {})
    shutil.copy(folder / "config.yaml", run.config_path)
    meta = read_json(folder / "meta.json")
    run.update_meta(**{k: v for k, v in meta.items() if k in ("train_cameras", "device")})
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for path in sorted(folder.glob("field_[0-9][0-9].pt")):
        for key, tensor in torch.load(path, weights_only=True).items():
            name, index = key.rsplit("#", 1)
            parts.setdefault(name, []).append((int(index), tensor))
    state = {name: torch.cat([t for _, t in sorted(items)]) if items[0][1].dim() else items[0][1] for name, items in parts.items()}
    field = RadianceField(from_plain(FieldConfig, run.read_config()["field"]))
    reference = field.state_dict()
    field.load_state_dict({k: v.to(reference[k].dtype) for k, v in state.items()})
    step = read_json(folder / "field_step.json")
    save_checkpoint(run, step["step"], step["stage"], {"field": field})
    return run


def export_once(run_dir: Path, overrides: list[str], device: torch.device, out_dir: Path, profile: cProfile.Profile | None) -> dict:
    """One `recon export` of the run into ``out_dir``; returns meta.json's ``exports`` record and the wall seconds."""
    from recon.systems.run_export import export_run

    run = RunDir.open(run_dir)
    saved = run.read_config().get("export")
    cfg = resolve(ExportConfig, saved if isinstance(saved, dict) else {}, overrides=overrides)
    cfg = replace(cfg, formats=[f for f in cfg.formats if f != "ply"] or ["glb"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    export_run(run, cfg, device, out_dir)
    if profile is not None:
        profile.disable()
    wall = time.perf_counter() - start
    record = run.read_meta()["exports"]
    return {"wall_s": round(wall, 3), "timings_s": record["timings_s"], "mesh": record["mesh"]}


def main() -> None:
    """Parses the flags; packs/unpacks a field or profiles the export and prints the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", help="run folder (recon fit / fit-views output)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="export setting key=value (repeatable)")
    parser.add_argument("--repeat", type=int, default=2, help="exports to time (the first one is a warm-up)")
    parser.add_argument("--profile", type=int, default=0, help="print the N functions with the most cumulative time")
    parser.add_argument("--pack-field", type=Path, default=None, help="also write the run's field in parts to this folder")
    parser.add_argument("--unpack-field", type=Path, default=None, help="folder written by --pack-field")
    parser.add_argument("--to", type=Path, default=None, help="with --unpack-field: the new run folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.unpack_field is not None:
        print(unpack_field(args.unpack_field, args.to).root)
        return
    if args.pack_field is not None:
        print("packed:", ", ".join(str(p) for p in pack_field(args.run, args.pack_field)))
    device = resolve_device(args.device)
    profile = cProfile.Profile() if args.profile else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="recon-export-profile-") as scratch:
        for index in range(max(1, args.repeat)):
            last = index == max(1, args.repeat) - 1
            rows.append(export_once(args.run, args.overrides, device, Path(scratch) / str(index), profile if last else None))
            print(json.dumps({"repeat": index, **rows[-1]}), flush=True)
    if profile is not None:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(args.profile)
        print(text.getvalue())
    if args.out is not None:
        write_json(args.out, {"run": str(args.run), "device": str(device), "overrides": args.overrides, "repeats": rows})


if __name__ == "__main__":
    main()
