"""A synthetic multi-view training set: random primitive objects rendered at Zero-1-to-3's cameras.

Every object is :func:`recon.data.primitives.random_object` of its own seed,
fitted into a sphere of radius 0.55 about the origin, rendered with
Lambertian shading under a world-fixed light (so colours agree across views),
anti-aliased, RGBA. Cameras follow the threestudio Zero-1-to-3 recipe
(ZERO123.md): distance 3.8, fixed vertical field of view 20 deg, elevation in
[-10, 80] deg (uniform over the sphere band), azimuth uniform in [-180, 180];
the object then spans at most ~80 % of the image height, and typically less
(:func:`median_foreground_ratio`: 0.711 of the side at elevation 0 for the
shipped prior's training data, against the 0.85 that photos are recentred to
for real Zero-1-to-3 weights; a prior records its own). Files follow the recon
layout of :mod:`recon.data.multiview`. An object folder is complete once its
``object.json`` exists; a rerun skips complete objects, so a killed run resumes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from recon.cameras import Cameras, ViewSampler
from recon.data.multiview import write_recon_view
from recon.data.primitives import DEFAULT_OBJECT_RADIUS, FAMILIES, PrimitiveObject, random_object, render_object
from recon.errors import ReconError
from recon.fileio import read_json, write_json
from recon.progress import format_rate, progress_bar

OBJECT_META = "object.json"


@dataclass
class SynthConfig:
    """A synthetic dataset: objects, views, cameras, primitives and shading (what :func:`synthesize` renders)."""

    objects: int = 100
    """Number of objects."""
    views: int = 12
    """Views per object (Zero-1-to-3 trained on 12)."""
    size: int = 128
    """Image side in pixels."""
    seed: int = 0
    """Dataset seed; object i uses seed * 1000003 + i, so datasets with different seeds do not overlap."""
    radius: float = 3.8
    """Camera distance from the origin (scene units)."""
    fovy_deg: float = 20.0
    """Vertical field of view in degrees (fixed, as Zero-1-to-3 was trained)."""
    elevation_min_deg: float = -10.0
    """Lowest camera elevation in degrees."""
    elevation_max_deg: float = 80.0
    """Highest camera elevation in degrees."""
    min_primitives: int | None = None
    """Fewest primitives per object; None = 2, or max_primitives when that is lower."""
    max_primitives: int = 6
    """Most primitives per object."""
    textured_probability: float = 0.5
    """Chance that a primitive gets a pattern (blob: stripes or checker; other families also dots, rings,
    gradient) instead of a plain colour; the single family's main piece, nearly all of its surface, at least 0.8."""
    families: str = "blob"
    """Comma-separated shape families (recon.data.primitives.FAMILIES: blob, stacked, symmetric, single);
    object i uses family i mod their count."""
    object_radius: float = DEFAULT_OBJECT_RADIUS
    """Objects are scaled into a sphere of this radius about the origin (scene units)."""
    supersample: int = 2
    """Rays per pixel side (anti-aliasing)."""
    shading: Literal["lambert", "albedo"] = "lambert"
    """'lambert' (ambient + one world-fixed light) or 'albedo' (flat colours)."""
    orbit: bool = False
    """Views evenly spaced in azimuth (360 / views apart, random start) at one random elevation per
    object, instead of random views: fixed relative poses for evaluation (eval-nvs)."""

    def __post_init__(self) -> None:
        if self.min_primitives is None:
            self.min_primitives = min(2, self.max_primitives)
        if self.objects < 1 or self.views < 1 or self.size < 8:
            raise ReconError("data synth: --objects and --views must be >= 1 and --size >= 8")
        if not 1 <= self.min_primitives <= self.max_primitives:
            raise ReconError("data synth: need 1 <= min_primitives <= max_primitives")
        if self.shading not in ("lambert", "albedo"):
            raise ReconError(f"data synth: shading {self.shading!r}; choose lambert or albedo")
        unknown = [f for f in self.family_list() if f not in FAMILIES]
        if unknown or not self.family_list():
            raise ReconError(f"data synth: families {self.families!r}; choose from {', '.join(FAMILIES)}")

    def family_list(self) -> list[str]:
        """The shape families, in order."""
        return [f.strip() for f in self.families.split(",") if f.strip()]


def object_seed(dataset_seed: int, index: int) -> int:
    """The random_object seed of object ``index`` in a dataset of seed ``dataset_seed``."""
    return dataset_seed * 1_000_003 + index


def dataset_object(cfg: SynthConfig, index: int) -> tuple[int, str, PrimitiveObject]:
    """Object ``index`` of the dataset ``cfg``: its random_object seed, its shape family and the object."""
    seed = object_seed(cfg.seed, index)
    families = cfg.family_list()
    family = families[index % len(families)]
    return seed, family, random_object(seed, cfg.min_primitives, cfg.max_primitives, cfg.textured_probability, cfg.object_radius, family)


def synthesize_object(cfg: SynthConfig, index: int, folder: Path) -> None:
    """Renders object ``index`` into ``folder`` (views, then ``object.json`` as the completion mark)."""
    seed, family, obj = dataset_object(cfg, index)
    generator = torch.Generator().manual_seed(seed)
    sampler = ViewSampler((cfg.elevation_min_deg, cfg.elevation_max_deg), (-180.0, 180.0), cfg.radius, cfg.fovy_deg)
    cameras, elevation, azimuth = sampler.sample(cfg.views, cfg.size, generator)
    if cfg.orbit:
        azimuth = torch.remainder(azimuth[0] + torch.arange(cfg.views) * (360.0 / cfg.views) + 180.0, 360.0) - 180.0
        elevation = elevation[:1].expand(cfg.views).clone()
        cameras = Cameras.from_spherical(elevation, azimuth, torch.full((cfg.views,), cfg.radius), cfg.fovy_deg, cfg.size)
    rgba = render_object(obj, cameras, shading=cfg.shading, supersample=cfg.supersample)["rgba"]
    for view in range(cfg.views):
        write_recon_view(folder, view, rgba[view], float(elevation[view]), float(azimuth[view]), cfg.radius, cfg.fovy_deg, cameras.c2w[view])
    write_json(folder / OBJECT_META, {"source": "primitives", "object_seed": seed, "name": obj.name, "family": family, "primitives": len(obj.primitives), "config": asdict(cfg)})


def median_foreground_ratio(cfg: SynthConfig, objects: int = 256, elevation_deg: float = 0.0) -> float:
    """How much of the frame ``cfg``'s objects fill: the median over objects 0..``objects``-1 of the longer side of
    the alpha > 0.5 bounding box over the image side (:func:`recon.preprocess.foreground_bbox`, the measure that
    recentring sets), each seen from ``elevation_deg`` at a random azimuth (seeded per object) at ``cfg``'s camera
    distance, field of view and size.

    A prior trained on ``cfg`` records it as its framing (``recon_zero123.json`` ``foreground_ratio``), so that
    ``recon fit`` recentres a photo to the object size the prior was trained on.
    """
    import numpy as np

    from recon.preprocess import foreground_bbox

    ratios = []
    for index in range(objects):
        seed, _, obj = dataset_object(cfg, index)
        azimuth = torch.rand(1, generator=torch.Generator().manual_seed(seed)) * 360.0 - 180.0
        camera = Cameras.from_spherical(torch.tensor([elevation_deg]), azimuth, torch.tensor([cfg.radius]), cfg.fovy_deg, cfg.size)
        alpha = render_object(obj, camera, shading="albedo", supersample=cfg.supersample)["rgba"][0, ..., 3].numpy()
        top, left, bottom, right = foreground_bbox(alpha)
        ratios.append(max(bottom - top, right - left) / cfg.size)
    return float(np.median(ratios))


def is_complete(folder: Path, cfg: SynthConfig) -> bool:
    """True when ``folder`` already holds this object rendered with the same settings."""
    meta = folder / OBJECT_META
    if not meta.is_file():
        return False
    try:
        return read_json(meta).get("config") == asdict(cfg)
    except (OSError, ValueError):
        return False


def synthesize(cfg: SynthConfig, output: Path) -> dict[str, int]:
    """Writes ``cfg.objects`` objects under ``output`` (``00000/``, ``00001/``, ...); returns counts.

    Objects already complete with the same settings are kept, so a rerun resumes.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("rendering objects", total=cfg.objects, rate="", status="")
        for index in range(cfg.objects):
            folder = output / f"{index:05d}"
            if is_complete(folder, cfg):
                skipped += 1
            else:
                synthesize_object(cfg, index, folder)
                written += 1
            bar.update(task, advance=1, rate=format_rate(written, time.perf_counter() - start))
    write_json(output / "dataset.json", {"layout": "recon", "objects": cfg.objects, "views": cfg.views, "config": asdict(cfg)})
    return {"written": written, "skipped": skipped}
