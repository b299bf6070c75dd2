"""The Python API behind ``recon fit`` / ``recon batch`` / ``recon export``: the place that wires the parts.

    import recon
    results = recon.fit("cat.png", preset="cpu", model="random-tiny")
    recon.export(results[0].run_dir, formats=["obj"])

``fit`` takes one image, several, or a folder; each image gets a run folder
``OUTPUT/<stem>/``. The guidance models are loaded once for all images.
For control over each image (own loop, own run folders), the same steps one
at a time, with the models loaded once:

    from recon.runtime import resolve_device

    models = recon.Models(resolve_device("auto"))
    cfg = recon.build_config("cpu", ["stages.fine.steps=200"])
    recon.fit_image(Path("cat.png"), Path("runs/cat"), cfg, models.device, models)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from recon.config import to_plain
from recon.errors import InputError, ReconError, save_traceback
from recon.progress import PhaseTimer
from recon.runs import RunDir
from recon.systems.batch import ImageResult, print_summary, run_batch, save_summary
from recon.systems.fit import FitConfig, Trainer, resolve_config, scale_steps

SMOKE_TEST_NOTE = "SMOKE_TEST_RANDOM_WEIGHTS.txt"
SMOKE_TEST_TEXT = "These files were made with random guidance weights ({model}): a smoke test, not a reconstruction.\n"


def build_config(
    preset: str | os.PathLike[str] = "default",
    overrides: Sequence[str] = (),
    *,
    model: str | None = None,
    formats: Sequence[str] | str | None = None,
    seed: int | None = None,
    foreground_ratio: float | None = None,
    remove_bg: bool | None = None,
    steps: int | None = None,
    elevation: float | None = None,
) -> FitConfig:
    """Defaults <- preset <- ``--set key.path=value`` overrides <- explicit flags, as a :class:`FitConfig`.

    ``steps`` rescales every stage (and every schedule) to that many steps in all; ``elevation`` is the input
    photo's camera elevation in degrees (``cameras.reference_elevation_deg``). A ``preprocess.foreground_ratio``
    left at None becomes the framing the guidance weights record
    (:func:`recon.guidance.checkpoints.foreground_ratio_for`), so config.yaml holds the number used.
    """
    from recon.config import read_preset
    from recon.guidance.checkpoints import foreground_ratio_for

    flags: dict[str, Any] = {}
    if model is not None:
        flags["guidance"] = {"model": model}
    if formats is not None:
        from recon.exports.config import parse_formats

        flags["export"] = {"formats": parse_formats(formats if isinstance(formats, str) else ",".join(formats))}
    if seed is not None:
        flags["seed"] = seed
    if foreground_ratio is not None:
        flags.setdefault("preprocess", {})["foreground_ratio"] = foreground_ratio
    if remove_bg is not None:
        flags.setdefault("preprocess", {})["remove_bg"] = remove_bg
    if elevation is not None:
        flags["cameras"] = {"reference_elevation_deg": float(elevation)}
    cfg = resolve_config(read_preset(preset), overrides=tuple(overrides))
    if flags:  # explicit flags win over --set
        cfg = resolve_config(to_plain(cfg), flags)
    if steps is not None:
        cfg = scale_steps(cfg, steps)
    cfg.preprocess.foreground_ratio = foreground_ratio_for(cfg.guidance.model, cfg.preprocess.foreground_ratio)
    if cfg.guidance.model.startswith("random-") and not cfg.export.note:  # every mesh file says so as it is written
        cfg.export.note = SMOKE_TEST_TEXT.format(model=cfg.guidance.model).strip()
    return cfg


def load_reference_png(path: Path, elevation_deg: float = 0.0) -> Any:
    """The run's ``input_rgba.png`` as the :class:`ReferenceView` the trainer fits, seen from ``elevation_deg``
    (other camera values: recon.cameras defaults)."""
    import numpy as np

    from recon.imageio import decode_image
    from recon.preprocess import ReferenceView

    pixels = decode_image(path)
    if pixels.shape[2] == 3:
        pixels = np.concatenate([pixels, np.ones_like(pixels[..., :1])], axis=2)
    rgba = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
    return ReferenceView(rgba=rgba, source=path, elevation_deg=float(elevation_deg))


class Models:
    """The guidance models of :func:`fit_image`, loaded once and shared by every image fitted with them.

    Holds one :class:`guidance.interface.Zero123Guidance` (the Zero-1-to-3 Base and,
    in cascade mode, Refiner weights) per distinct ``cfg.guidance``, on
    ``device``; each is loaded on first :meth:`get`. Build one with
    ``Models(resolve_device("auto"))`` (:func:`recon.runtime.resolve_device`)
    and pass it to every :func:`fit_image` call of a batch, as :func:`fit` does.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cache: dict[str, Any] = {}

    def get(self, cfg: FitConfig, timer: PhaseTimer) -> Any:
        """The Zero123Guidance of ``cfg.guidance``, loaded on first use (timed under ``timer``'s "import libraries"
        for diffusers and transformers, while on CUDA a background thread reads the weights, then "load models")."""
        key = repr(to_plain(cfg.guidance))
        if key not in self._cache:
            from recon.guidance.architectures import import_model_libraries
            from recon.guidance.interface import make_guidance, prefetch_weights

            prefetched = prefetch_weights(cfg.guidance, self.device)  # on CUDA: reads the weights while the libraries import
            with timer.phase("import libraries"):
                import_model_libraries()
            with timer.phase("load models"):
                self._cache[key] = make_guidance(cfg.guidance, self.device, prefetched=prefetched)
        return self._cache[key]


def _existing_run(run_dir: Path, cfg: FitConfig, resume: bool, overwrite: bool) -> tuple[FitConfig, bool]:
    """The config in force for ``run_dir`` and whether it resumes; clears it with ``overwrite``.

    A resumed run keeps its own config.yaml. Raises :class:`ReconError` for an
    unfinished run without ``resume`` / ``overwrite`` or a folder recon did not make
    (:meth:`RunDir.claim`; ``overwrite`` deletes only what the run wrote).
    """
    from recon.progress import info

    if RunDir.claim(run_dir, resume=resume, overwrite=overwrite):
        saved = resolve_config(RunDir.open(run_dir).read_config())
        if to_plain(saved) != to_plain(cfg):
            info(f"{run_dir}: resuming with the run's own config.yaml (preset, --set and config flags apply to new runs only)")
        return saved, True
    return cfg, False


def cutout(image: str | os.PathLike[str], cfg: FitConfig) -> Any:
    """The reference view that :func:`fit_image` fits for ``image`` under ``cfg``: background removed,
    recentred to ``cfg.preprocess.foreground_ratio`` (None: the guidance weights' framing, as in :func:`build_config`),
    (4, S, S) RGBA in a :class:`recon.preprocess.ReferenceView` (saved as the run's ``input_rgba.png``). Raises
    :class:`InputError` with the CLI's one-line message for bad input."""
    from recon.guidance.checkpoints import foreground_ratio_for
    from recon.preprocess import load_reference

    ratio = foreground_ratio_for(cfg.guidance.model, cfg.preprocess.foreground_ratio)
    return load_reference(Path(image), ratio, cfg.preprocess.remove_bg, cfg.preprocess.size)


def _create_run(image: Path, reference: Any, run_dir: Path, cfg: FitConfig, device: torch.device) -> RunDir:
    """Makes the run folder for ``image`` (its :func:`cutout` is ``reference``): input files, config.yaml, meta.json, progress.json."""
    from recon import fileio
    from recon.progress import warn

    random_weights = cfg.guidance.model.startswith("random-")
    run = RunDir.create(
        run_dir,
        to_plain(cfg),
        seed=cfg.seed,
        device=str(device),
        extra_meta={
            "input": str(image),
            "background_method": reference.background_method,
            "model": cfg.guidance.model,
            "random_weights": random_weights,
        },
    )
    if random_weights:  # labelled before anything else is written (and again beside the exports)
        fileio.write_text(run.file(SMOKE_TEST_NOTE), SMOKE_TEST_TEXT.format(model=cfg.guidance.model))
        warn(f"{run_dir}: guidance model {cfg.guidance.model!r} has random weights; this run is a smoke test, not a reconstruction")
    fileio.write_bytes(run.file(f"input{image.suffix.lower()}"), image.read_bytes())
    reference.save(run.file("input_rgba.png"))
    run.register("guidance/")  # the guidance's cache of generated views
    return run


def turntable_alongside_export(device: torch.device) -> bool:
    """Whether a fit on ``device`` renders its turntable while the mesh exports: on CUDA, where the export
    spends most of its time on the CPU (cleanup, the xatlas child process, file writing) with the GPU idle.
    On the CPU both would compete for the same cores."""
    return device.type == "cuda"


def _export(run: RunDir, cfg: FitConfig, trainer: Trainer, device: torch.device, timer: Any) -> dict[str, Path]:
    """Mesh files and the turntable video of a trained run.

    Where :func:`turntable_alongside_export`, the turntable renders in a second thread while the mesh exports,
    and its phase is the time it adds after the export ends.
    """
    from concurrent.futures import ThreadPoolExecutor

    from recon.exports.turntable import render_turntable
    from recon.systems.run_export import export_run

    def turntable() -> Path:
        e, ref = cfg.export, trainer.reference

        @torch.no_grad()
        def render(cameras: Any) -> torch.Tensor:
            return trainer.renderer.render(cameras.to(device), trainer.background)["rgb"]

        return render_turntable(
            render, run.exports / "turntable.mp4", e.turntable_frames, e.turntable_elevation_deg,
            ref.radius, ref.fovy_deg, e.turntable_resolution, e.turntable_fps,
        )

    def turntable_in_thread() -> Path:
        # a thread has its own current CUDA device (the one Triton launches on)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return turntable()

    if cfg.turntable:
        run.register("exports/turntable.mp4", "exports/turntable.gif")  # a GIF without ffmpeg
    with ThreadPoolExecutor(max_workers=1) as alongside:
        video = alongside.submit(turntable_in_thread) if cfg.turntable and turntable_alongside_export(device) else None
        with timer.phase("export"):
            paths = dict(export_run(run, cfg.export, device))
        if cfg.turntable:
            with timer.phase("turntable"):
                paths["turntable"] = turntable() if video is None else video.result()
    if cfg.guidance.model.startswith("random-"):
        from recon import fileio

        fileio.write_text(run.file(f"exports/{SMOKE_TEST_NOTE}"), SMOKE_TEST_TEXT.format(model=cfg.guidance.model))
    return paths


def fit_image(image: Path, run_dir: Path, cfg: FitConfig, device: torch.device, models: Models, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Preprocess, prepare the guidance, train every stage, export: one image into ``run_dir``.

    ``cfg`` usually comes from :func:`build_config`; ``models`` is a :class:`Models`
    on ``device``, shared by the calls of a batch so that weights load once.
    Returns ``{"exports": {format: path}, "timings_s": {phase: seconds}}``.
    Marks the run failed (or interrupted) in progress.json before re-raising.
    """
    from recon.progress import info
    from recon.runtime import import_in_background, peak_memory_gib, reset_peak_memory, seed_everything

    timer = PhaseTimer()
    start = time.perf_counter()
    reset_peak_memory(device)
    image, run_dir = Path(image), Path(run_dir)
    cfg, resuming = _existing_run(run_dir, cfg, resume, overwrite)
    if not resuming:  # a bad image fails before the models load
        with timer.phase("preprocess"):
            cut = cutout(image, cfg)
    guidance = models.get(cfg, timer)  # before the run folder exists: missing weights leave nothing behind
    run = RunDir.open(run_dir) if resuming else _create_run(image, cut, run_dir, cfg, device)
    try:
        reference = load_reference_png(run.root / "input_rgba.png", cfg.cameras.reference_elevation_deg)
        seed_everything(cfg.seed)
        with timer.phase("prepare guidance"):
            guidance.prepare(reference, run.root / "guidance")
        seed_everything(cfg.seed)
        trainer = Trainer(cfg, guidance, reference, run, device)
        if resuming and trainer.restore_latest():
            info(f"{run.root}: resuming at step {trainer.step} of {cfg.total_steps}")
        # the export's libraries (trimesh, networkx, scipy's parts: ~1 s of a command on the GPU machine) load while
        # the steps keep the GPU busy
        import_in_background("recon.systems.run_export", "recon.exports.turntable")
        trainer.fit(timer)
        paths = _export(run, cfg, trainer, device, timer)
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    except BaseException as exc:
        run.set_status("failed")
        if not isinstance(exc, ReconError):
            save_traceback(exc, run.file("error.log"))
        raise
    finally:
        run.record_timings(timer.seconds)
    peak = peak_memory_gib(device)
    run.update_meta(
        peak_gpu_memory_gib=None if peak is None else round(peak, 3),
        total_seconds=round(time.perf_counter() - start, 3),
        final_step=trainer.step,
        rollbacks=trainer.rollbacks,
        final_losses=trainer.last_losses,
        exports={"files": {k: str(v) for k, v in paths.items()}},
    )
    run.write_progress(None, cfg.total_steps, cfg.total_steps, 0.0, "finished")
    info(f"[green]done[/] {run.root} ({time.perf_counter() - start:.1f} s)")
    return {"exports": paths, "timings_s": {k: round(v, 3) for k, v in timer.seconds.items()}}


def batch_worker(cfg: FitConfig, resume: bool, overwrite: bool, device: str) -> Any:
    """The fit function of one scaled-out batch worker (a process per GPU, or a Ray actor) on ``device``.

    Loads the guidance models now, once per worker. Returns
    ``fit_one(image, run_dir, retry)`` (:func:`fit_image` with this batch's
    settings); ``retry`` (after a crashed worker) resumes what that attempt left.
    """
    from recon.runtime import resolve_device

    models = Models(resolve_device(device))
    models.get(cfg, PhaseTimer())

    def fit_one(image: Path, run_dir: Path, retry: bool) -> dict[str, Any]:
        return fit_image(image, run_dir, cfg, models.device, models, resume=resume or retry, overwrite=overwrite and not retry)

    return fit_one


def fit(
    images: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    output: str | os.PathLike[str] = "outputs",
    preset: str | os.PathLike[str] = "default",
    overrides: Sequence[str] = (),
    *,
    model: str | None = None,
    formats: Sequence[str] | str | None = None,
    device: str = "auto",
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    foreground_ratio: float | None = None,
    remove_bg: bool | None = None,
    steps: int | None = None,
    batch: bool | None = None,
    elevation: float | None = None,
    gpus: str | None = None,
    workers: int | None = None,
    ray: str | None = None,
) -> list[ImageResult]:
    """Reconstructs each image (a file, several, or a folder) into ``output/<stem>/``; mirrors ``recon fit``.

    With one image file (and ``batch`` not True) errors are raised as
    :class:`ReconError`; otherwise each image's failure is recorded, the
    batch goes on, and ``output/batch_summary.json`` is written. Returns one
    :class:`ImageResult` per image. Scale-out (always a batch): ``gpus``
    (``all``, ``2``, ``0,2``: a worker process per GPU, or ``workers`` of them
    spread over the GPUs) or ``workers`` with ``device="cpu"`` (CPU worker
    processes), see :mod:`recon.systems.workers`;
    ``ray`` (``local``, ``auto`` or an address: Ray actors, ``workers`` of them
    or one per GPU), see :mod:`recon.systems.ray_batch`.
    """
    from recon.imageio import list_images
    from recon.progress import quiet_while
    from recon.runtime import resolve_device

    with quiet_while(quiet):
        output = Path(output)
        if output.exists() and not output.is_dir():
            raise InputError(f"{output}: is a file; --output takes the folder that holds one run folder per image")
        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        image_list = list_images(paths)
        scale_out = gpus is not None or workers is not None or ray is not None
        if batch is None or scale_out:
            batch = scale_out or len(image_list) != 1 or any(Path(p).is_dir() for p in paths)
        cfg = build_config(
            preset, overrides, model=model, formats=formats, seed=seed, foreground_ratio=foreground_ratio,
            remove_bg=remove_bg, steps=steps, elevation=elevation,
        )
        dev = resolve_device(device)
        if dev.type == "cpu" and str(preset) in ("default", "fast", "stable-zero123"):
            from recon.progress import warn

            warn(f"--preset {preset} is made for a GPU and no GPU is in use: it would take hours on the CPU; "
                 "use --preset cpu for a run of minutes")
        models = Models(dev)

        def one(image: Path, run_dir: Path) -> dict[str, Any]:
            return fit_image(image, run_dir, cfg, dev, models, resume=resume, overwrite=overwrite)

        if not batch:
            from recon.systems.batch import is_finished, run_names

            run_dir = output / run_names(image_list)[0]
            result = ImageResult(image=image_list[0], run_dir=run_dir)
            start = time.perf_counter()
            if is_finished(run_dir) and not overwrite:
                from recon.progress import info

                info(f"{run_dir}: already finished; skipped (--overwrite to redo)")
                result.status = "skipped"
            else:
                outcome = one(image_list[0], run_dir)
                result.status = "finished"
                result.exports = {k: str(v) for k, v in outcome["exports"].items()}
                result.timings_s = outcome["timings_s"]
            result.seconds = round(time.perf_counter() - start, 3)
            return [result]
        if scale_out:
            from functools import partial

            factory = partial(batch_worker, cfg, resume, overwrite)
            if ray is not None:
                from recon.systems.ray_batch import run_ray

                if gpus is not None:
                    raise ReconError("--gpus and --ray do not combine: on Ray each worker gets one GPU of the cluster (--workers N to limit them)")
                results = run_ray(image_list, output, factory, ray, device, workers, overwrite)
            else:
                from recon.systems.workers import local_workers, run_pool

                results = run_pool(image_list, output, factory, local_workers(gpus, workers, device), overwrite)
        else:
            results = run_batch(image_list, output, one, overwrite=overwrite)
            save_summary(output, results)
        print_summary(results)
        from recon.progress import info
        from recon.systems.report import write_report

        info(f"report: {write_report(output)}")
        return results


def export(
    run_dir: str | os.PathLike[str],
    formats: Sequence[str] | str | None = None,
    device: str = "auto",
    output: str | os.PathLike[str] | None = None,
    photos: str | os.PathLike[str] | None = None,
    **settings: Any,
) -> dict[str, Path]:
    """Re-exports a finished or interrupted run (its newest checkpoint); mirrors ``recon export``.

    ``formats``: e.g. ``["glb", "obj"]`` or ``"glb,obj"`` (default: the run's);
    ``settings``: any :class:`exports.config.ExportConfig` field (``texture_resolution=2048``);
    ``photos``: a fit-views run's dataset (its transforms.json or folder): the texture comes from its
    training photos where they see the surface, as ``recon fit-views`` bakes it (default: from the field).
    Returns {format: path}.
    """
    from dataclasses import replace

    from recon.config import from_plain
    from recon.exports.config import ExportConfig, parse_formats
    from recon.runtime import resolve_device
    from recon.systems.run_export import export_run

    run = RunDir.open(run_dir)
    saved = run.read_config().get("export")
    cfg = from_plain(ExportConfig, saved) if isinstance(saved, dict) else ExportConfig()
    if formats is not None:
        settings["formats"] = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    unknown = sorted(set(settings) - set(ExportConfig.__dataclass_fields__))
    if unknown:
        raise ReconError(f"export: unknown setting(s) {', '.join(unknown)}")
    posed = None
    if photos is not None:
        from recon.systems.fit_views import training_photos

        posed = training_photos(run, photos)
    return export_run(run, replace(cfg, **settings), resolve_device(device), None if output is None else Path(output), posed)


def fit_views(
    transforms: str | os.PathLike[str],
    output: str | os.PathLike[str],
    preset: str | None = None,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    resume: bool = False,
    export: bool = True,
    overwrite: bool = False,
) -> tuple[RunDir, dict[str, float]]:
    """Fits a radiance field to posed images (a transforms.json), evaluates held-out views, exports; mirrors ``recon fit-views``.

    ``output`` is the run folder; an existing run there is continued only with
    ``resume`` and redone only with ``overwrite`` (which deletes only what that run
    wrote); a folder recon did not make is refused (:meth:`RunDir.claim`). Returns the run and its held-out metrics (``psnr``, ``ssim``;
    empty without held-out views).
    """
    from recon.config import read_preset, resolve
    from recon.progress import info
    from recon.runtime import resolve_device, seed_everything
    from recon.systems.fit_views import FitViewsConfig, FitViewsTrainer, load_views, resolve_scene
    from recon.systems.run_export import export_run

    transforms, output = Path(transforms), Path(output)
    torch_device = resolve_device(device)
    flags = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    resuming = RunDir.claim(output, resume=resume, overwrite=overwrite)
    if resuming:
        run = RunDir.open(output)
        if preset:
            info("--preset is ignored when resuming (the run's config.yaml is used)")
        cfg = resolve(FitViewsConfig, run.read_config(), flags, overrides=list(overrides))
    else:
        cfg = resolve(FitViewsConfig, read_preset(preset) if preset else None, flags, overrides=list(overrides))
    views = load_views(transforms, cfg)
    cfg = resolve_scene(cfg, views.train.cameras)
    seed_everything(cfg.seed)
    if resuming:
        run.write_config(to_plain(cfg))
    else:
        run = RunDir.create(output, to_plain(cfg), seed=cfg.seed, device=str(torch_device))
    held = 0 if views.held_out is None else len(views.held_out)
    info(f"{transforms}: {len(views.train)} training and {held} held-out views of "
         f"{views.train.cameras.width}x{views.train.cameras.height}; run folder {run.root}")
    try:
        result = FitViewsTrainer(run, cfg, views, torch_device).fit()
        if export:
            timer = PhaseTimer()
            with timer.phase("export"):
                export_run(run, cfg.export, torch_device, photos=views.train)
            run.record_timings(timer.seconds)
    except Exception as exc:
        if not isinstance(exc, ReconError):
            save_traceback(exc, run.file("error.log"))
        raise
    return run, dict(result.metrics or {})


def novel_views(
    image: str | os.PathLike[str],
    poses: Sequence[tuple[float, float]],
    radius: float = 0.0,
    model: str = "tiny",
    device: str = "auto",
    dtype: torch.dtype | None = None,
    pose_encoding: str | None = None,
    image_encoder: str | os.PathLike[str] | None = None,
    input_elevation: float = 0.0,
    steps: int = 50,
    guidance_scale: float = 3.0,
    seed: int = 0,
    foreground_ratio: float | None = None,
    remove_bg: bool = True,
    progress: Any = None,
) -> tuple[torch.Tensor, Any]:
    """New views of an object photo with Zero-1-to-3; mirrors ``recon novel-view``.

    ``poses``: (delta elevation, delta azimuth) in degrees per view, relative to
    the photo's camera. Returns the views (N, 3, S, S) in [0, 1] over white and
    the loaded :class:`recon.guidance.model.Zero123Model` (for its description).
    ``progress(done, total)`` is called per DDIM step. ``foreground_ratio`` None = the framing ``model`` records
    (:func:`recon.guidance.checkpoints.foreground_ratio_for`).
    """
    from recon.guidance.checkpoints import foreground_ratio_for, load_zero123
    from recon.guidance.sampling import encode_relative_views, native_size, sample_views
    from recon.preprocess import load_reference
    from recon.progress import info, warn
    from recon.runtime import resolve_device, seed_everything

    if steps < 1:
        raise ReconError("--steps must be at least 1")
    torch_device = resolve_device(device)
    if dtype == torch.float16 and torch_device.type != "cuda":
        raise ReconError("--dtype fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    loaded = load_zero123(model, torch_device, dtype, pose_encoding=pose_encoding, image_encoder=image_encoder)
    info(f"model: {loaded.description} ({loaded.pose_encoding}, {str(loaded.dtype).removeprefix('torch.')}, {torch_device})")
    if loaded.is_random:
        warn(f"--model {model}: RANDOM WEIGHTS, the images will be noise (use --model PATH for real Zero-1-to-3 weights)")
    ratio = foreground_ratio_for(model, foreground_ratio)
    reference = load_reference(image, foreground_ratio=ratio, remove_bg=remove_bg, size=native_size(loaded))
    elevations, azimuths = zip(*poses)
    encoded = encode_relative_views(loaded, elevations, azimuths, radius, cond_elevation_deg=input_elevation)
    views = sample_views(
        loaded,
        reference.rgb_over((1.0, 1.0, 1.0))[None],
        encoded,
        steps=steps,
        guidance_scale=guidance_scale,
        generator=seed_everything(seed),
        progress=progress,
    )
    return views, loaded


def evaluate_nvs(
    data: str | os.PathLike[str],
    model: str,
    cfg: Any,
    refiner: str | None = None,
    cascade: bool = True,
    device: str = "auto",
    progress: Any = None,
) -> dict[str, Any]:
    """Scores novel views of a held-out multi-view dataset (Base alone and the cascade); mirrors ``recon eval-nvs``.

    ``cfg`` is a :class:`recon.systems.evaluation.EvalConfig`; ``refiner``
    defaults to ``model``. Returns the report that
    :func:`recon.systems.evaluation.write_report` writes. ``progress(done, total)``
    is called per object.
    """
    from recon.data.multiview import MultiViewDataset
    from recon.guidance.checkpoints import load_zero123
    from recon.guidance.sampling import native_size
    from recon.runtime import resolve_device
    from recon.systems.evaluation import evaluate

    torch_device = resolve_device(device)
    base = load_zero123(model, torch_device)
    second = None
    if cascade:
        second = base if refiner in (None, model) else load_zero123(refiner, torch_device)
    dataset = MultiViewDataset(Path(data), image_size=native_size(base))
    return evaluate(dataset, base, second, cfg, progress=progress)

