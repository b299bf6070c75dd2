"""Trains the shipped ``tiny`` Zero-1-to-3 prior from scratch in one command (docs/TINY-PRIOR.md).

    PYTHONPATH=. python3 bench/train_tiny_prior.py --out OUT [--budget-minutes 9]

Steps, all inside one time budget (default 9 minutes of wall time):

1. synthesise the training set (random primitive objects, ``--objects`` x
   ``--views`` views at ``--size`` px, ``recon.data.synth``) in parallel
   processes, stopping at ``--synth-minutes``, and a held-out orbit set of
   other seeds;
2. build random weights of ``--arch`` (``prior``: 128 px, VAE factor 4);
3. stage vae: the VAE as an autoencoder (~``--vae-minutes``), scaling factor
   from its latents;
4. stage base (plain Zero-1-to-3 objective) then stage cascade
   (self-distillation), sharing the time left after reserving
   ``--eval-reserve-minutes`` for the evaluation;
5. the final Base (= the Refiner's EMA) saved in the diffusers layout in
   ``--save-dtype`` (fp16 by default), evaluated on the held-out set (Base,
   cascade, copy-input, mean-image) as it ships.

Writes into ``--out`` (flat, every file < 16 MiB): ``tiny-zero123.tar`` (the
diffusers folder, with ``recipe.json``, ``eval.md`` and ``eval.json`` inside;
split into ``tiny-zero123.tar.partNN`` if larger than 15 MiB: ``cat`` them),
``eval.md``, ``eval.json``, ``recipe.json`` (exact settings, data recipe,
timings, VAE metrics, parameter counts), ``samples.png`` (rows per held-out
object: ground truth, Base, cascade; the first column is the input) and
``log.txt``, ``extra.json`` (the ``--compare`` model's report, the
nearby-view ablation's reports, every paired per-object comparison with its
bootstrap interval). Scratch data and runs go to ``--work`` (default: a
temporary folder outside ``--out``).

Several GPUs (data-parallel, global batch = batch x processes):
``torchrun --standalone --nproc_per_node N bench/train_tiny_prior.py --work DIR ...``;
process 0 renders the data, measures and evaluates, every process trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# The budget counts from here, before torch is imported.
START = time.perf_counter()


import torch

from recon.fileio import read_json, write_bytes, write_json, write_text
from recon.guidance.config import NEARBY_VIEWS

if TYPE_CHECKING:
    from recon.data.multiview import MultiViewDataset

PART_BYTES = 15 * 1024 * 1024
PRIOR_NAME = "tiny-zero123"
NEARBY_SETS: dict[str, list[list[float]]] = {
    "paper": [list(v) for v in NEARBY_VIEWS],
    "near": [[0.0, 20.0, 0.0], [0.0, -20.0, 0.0], [-15.0, 0.0, 0.0]],
    "far": [[0.0, 90.0, 0.0], [0.0, -90.0, 0.0], [-45.0, 0.0, 0.0]],
    "one": [[0.0, 45.0, 0.0]],
}
"""The cascade's self-prompted view sets ([delta_polar, delta_azimuth, delta_radius] from the input camera):
the paper's (+-45 deg azimuth and 30 deg above), near (+-20 deg and 15 above), far (+-90 deg and 45 above) and
one view (+45 deg). --nearby-views picks the one trained and evaluated; the ablation evaluates the others."""


@dataclass
class RecipeConfig:
    """Every setting of the recipe (recorded verbatim in recipe.json)."""

    out: str = ""
    """Output folder for the tar, metrics, samples and log (required)."""
    work: str = ""
    """Scratch folder for the datasets and training runs ('' = a new temporary folder)."""
    budget_minutes: float = 9.0
    """Wall time of the whole command, from start to the last file written."""
    device: str = "auto"
    """auto, cpu or cuda."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, off on the CPU), no, bf16 or fp16."""
    compile: str = ""
    """torch.compile backend of the UNet stages (TrainConfig.compile): '' = eager; 'inductor' ran a base step
    1.77x as fast on one H100 after about 70 s of compiling (docs/TINY-PRIOR.md)."""
    seed: int = 0
    """Seed of the training data (held-out data uses seed + 1), weights and training draws."""
    arch: str = "prior"
    """Network sizes (guidance.architectures)."""
    init: str = ""
    """Continue from these weights (a diffusers folder, e.g. recon/assets/tiny-zero123) instead of random
    --arch weights: the VAE stage is skipped and the folder's VAE kept."""
    pose_embedding: bool = True
    """Give --init weights without it the prior's extra pose path (guidance.architectures.POSE_EMBEDDING,
    started as the identity); random --arch prior weights have it already."""
    pose_embedding_gain: float = 0.0
    """With --init: set the pose embedding's output gain (its last LayerNorm's weight) to this before stage base
    where it is smaller (0 = leave it). Added as the identity, the path learns slowly: its gradients scale with
    that gain."""
    transformer_layers: int = 0
    """With --init: deepen the UNet's attention layers to this many transformer blocks each before stage base
    (guidance.architectures.deepen_transformers: the new blocks start as the identity; 0 = leave them). The
    shipped prior has 1 per layer (UNet 4.29 M parameters; 2 per layer: 5.88 M)."""
    projection_pose_gain: float = 1.0
    """Multiply the camera projection's 4 pose columns by this before stage base (a larger pose signal
    in the tokens speeds up a from-scratch UNet's learning to use the camera)."""
    objects: int = 1000
    """Training objects to synthesise (fewer if --synth-minutes runs out)."""
    views: int = 12
    """Views per training object."""
    families: str = "blob,stacked,symmetric,single"
    """Shape families of the training objects (recon.data.primitives.FAMILIES), object i uses family i mod count."""
    heldout_families: str = "blob"
    """Shape families of the held-out objects ('blob' = the family of every earlier evaluation; since
    PrimitiveObject.sample_surface samples whole surfaces, normalized() centres them a little differently). With
    more than one, eval.md and recipe.json (``eval_by_family``) also score every method on each family."""
    size: int = 128
    """Image side in pixels (the VAE's sample_size is set to it)."""
    supersample: int = 2
    """Rays per pixel side when rendering (anti-aliasing)."""
    synth_minutes: float = 2.0
    """Stop synthesising training objects after this long and use the complete ones."""
    workers: int = 0
    """Rendering processes (0 = all CPU cores)."""
    heldout_objects: int = 40
    """Held-out evaluation objects (orbit views, other seeds)."""
    heldout_views: int = 8
    """Views per held-out object (one input, the rest targets)."""
    vae_minutes: float = 1.25
    """Time for the VAE stage (with --init: the decoder alone, the encoder and latent space kept; 0 = skip)."""
    vae_steps: int = 1_000_000
    """Most VAE steps (time usually ends the stage first)."""
    vae_batch: int = 64
    """Views per VAE step."""
    lr_vae: float = 1e-3
    """AdamW learning rate of the VAE."""
    kl_weight: float = 1e-6
    """KL weight of the VAE stage (per latent element)."""
    chroma_weight: float = 1.0
    """Weight of the VAE stage's extra L1 loss on the colour alone (TrainConfig.chroma_weight): without it a VAE
    trained from scratch learns brightness first and carries colour in latent variations too small for the UNet."""
    base_steps: int = 1_000_000
    """Most base-stage steps (time usually ends the stage first)."""
    base_batch: int = 128
    """Samples per base-stage step."""
    cascade_steps: int = 1_000_000
    """Most cascade-stage steps (0 = skip the cascade stage)."""
    cascade_batch: int = 32
    """Samples per cascade-stage step (each self-prompts 4 views)."""
    cascade_fraction: float = 0.3
    """Share of the UNet training time given to the cascade stage (1 with --init: no base stage, the cascade
    stage continues --init's weights)."""
    prompt_steps: int = 8
    """DDIM steps of the Base's self-prompting in the cascade stage."""
    nearby_views: str = "paper"
    """Self-prompted view set (NEARBY_SETS: paper, near, far or one) of the cascade stage and the main evaluation."""
    lr_unet: float = 4e-4
    """AdamW learning rate of the UNet (from scratch: higher than fine-tuning's 1e-4)."""
    lr_projection: float = 1e-3
    """AdamW learning rate of the camera projection."""
    warmup_steps: int = 200
    """Linear warm-up steps of every stage."""
    lr_schedule: str = "constant"
    """The learning rate after the warm-up (TrainConfig.lr_schedule): constant, or linear (to zero at the
    stage's step count: give --base-steps / --vae-steps / --cascade-steps that fit the time budget)."""
    ema_decay: float = 0.995
    """EMA decay of the Base (the shipped weights are the EMA)."""
    loss_weighting: str = "truncated-snr"
    """Timestep weighting of the UNet stages' loss: eps or truncated-snr (guidance.training.TrainConfig)."""
    eval_steps: int = 20
    """DDIM steps of the evaluation samplers."""
    eval_objects: int = 40
    """Held-out objects evaluated (at most --heldout-objects)."""
    eval_batch: int = 256
    """Views per UNet batch in the evaluation."""
    eval_group: int = 40
    """Held-out objects whose views are sampled together in the evaluation."""
    eval_reserve_minutes: float = 1.5
    """Time kept for saving, evaluation, samples and packing after training (the weights are packed
    before the evaluation, so a command killed during it still returns them)."""
    consistency: bool = True
    """Also score multi-view consistency in the evaluation (doubles its cost)."""
    mean_samples: int = 0
    """Also score base-mean, the mean of this many Base samples per target (systems.evaluation; 0 = not scored)."""
    evaluate_only: bool = False
    """Train nothing: render the held-out set and score --init as it is (evaluation, --compare, ablation, CFG
    sweep); one process. The packed weights are --init's, unchanged."""
    compare: str = ""
    """Also evaluate these weights (e.g. the previously shipped prior) on the same held-out objects, with paired
    per-object comparisons against the new ones ('' = none)."""
    ablation: bool = True
    """Evaluate the cascade with the other nearby-view sets (NEARBY_SETS) after the main evaluation."""
    cfg_sweep: str = "1.0,2.0"
    """Comma-separated classifier-free guidance scales at which the Base alone is also evaluated (no consistency;
    '' = none), beside the main evaluation's scale (3)."""
    sample_objects: int = 4
    """Held-out objects shown in samples.png (0 = none)."""
    save_dtype: str = "fp16"
    """Weights dtype of the shipped folder: fp16 (half the size; the loader casts) or fp32."""


def parse_args(argv: list[str] | None = None) -> RecipeConfig:
    """The command line as a :class:`RecipeConfig` (one --flag per field)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(RecipeConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, required=f.name == "out")
    cfg = RecipeConfig(**vars(parser.parse_args(argv)))
    if cfg.save_dtype not in ("fp16", "fp32"):
        parser.error("--save-dtype must be fp16 or fp32")
    if cfg.evaluate_only and not cfg.init:
        parser.error("--evaluate-only needs --init (the weights to score)")
    if cfg.nearby_views not in NEARBY_SETS:
        parser.error(f"--nearby-views must be one of {', '.join(NEARBY_SETS)}")
    if not 0.0 <= cfg.cascade_fraction <= 1.0 or (cfg.cascade_fraction == 1.0 and not cfg.init):
        parser.error("--cascade-fraction must be in [0, 1], and 1 (no base stage) needs --init")
    return cfg


class Log:
    """Timestamped progress lines on stdout (flushed) and in OUT/log.txt."""

    def __init__(self, path: Path, main: bool = True) -> None:
        self.path = path
        self.main = main
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}"
        if self.main:
            print(line, flush=True)
        self.lines.append(line)

    def flush(self) -> None:
        """Rewrites log.txt with every line so far (process 0 only)."""
        if self.main:
            write_text(self.path, "\n".join(self.lines) + "\n")


def remaining_s(cfg: RecipeConfig) -> float:
    """Seconds left of the budget."""
    return cfg.budget_minutes * 60.0 - (time.perf_counter() - START)


# ------------------------------------------------------------------ data
def _init_worker() -> None:
    torch.set_num_threads(1)


def _render(job: tuple) -> int:
    from recon.data.synth import synthesize_object

    synth_cfg, index, folder = job
    synthesize_object(synth_cfg, index, Path(folder))
    return index


def synthesize_parallel(synth_cfg, root: Path, workers: int, deadline_s: float, log: Log) -> int:
    """Renders ``synth_cfg.objects`` objects into ``root`` with ``workers`` processes until ``deadline_s``
    (perf_counter); removes incomplete object folders; returns the number of complete objects."""
    from recon.data.synth import is_complete

    root.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(synth_cfg.objects) if not is_complete(root / f"{i:05d}", synth_cfg)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    done, last = 0, time.perf_counter()
    with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker) as pool:
        for _ in pool.imap_unordered(_render, [(synth_cfg, i, str(root / f"{i:05d}")) for i in todo], chunksize=2):
            done += 1
            if time.perf_counter() - last > 15.0:
                last = time.perf_counter()
                log(f"  rendered {done}/{len(todo)} objects")
            if time.perf_counter() > deadline_s:
                log(f"  synthesis time is up after {done}/{len(todo)} objects")
                pool.terminate()
                break
    complete = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_complete(folder, synth_cfg):
            complete += 1
        else:
            shutil.rmtree(folder)
    write_json(root / "dataset.json", {"layout": "recon", "objects": complete, "views": synth_cfg.views, "config": asdict(synth_cfg)})
    return complete


# ------------------------------------------------------------------ model
def random_init(cfg: RecipeConfig, folder: Path) -> dict[str, int]:
    """Seeded random weights of ``cfg.arch`` sized for ``cfg.size`` px, saved as a diffusers folder; parameter counts."""
    from recon.guidance.architectures import architecture, build_components
    from recon.guidance.checkpoints import save_diffusers
    from recon.guidance.model import Zero123Model

    arch = architecture(cfg.arch)
    factor = 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    if cfg.size % (factor * 2 ** (len(arch["unet"]["block_out_channels"]) - 1)):
        raise SystemExit(f"--size {cfg.size} must be divisible by the VAE and UNet downsampling of {cfg.arch}")
    arch["vae"]["sample_size"] = cfg.size
    arch["unet"]["sample_size"] = cfg.size // factor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        parts = build_components(arch)
    model = Zero123Model(**parts, is_random=True, description=f"random {cfg.arch} weights (seed {cfg.seed}) for bench/train_tiny_prior.py")
    save_diffusers(model, folder, overwrite=True)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def grown_init(init: Path, folder: Path, seed: int, pose_embedding: bool = True, gain: float = 0.0,
               transformer_layers: int = 0) -> list[str]:
    """``init`` re-saved into ``folder`` with (if ``pose_embedding``) the pose embedding added where it lacks one
    (seeded, the identity at first), its output gain raised to ``gain`` where smaller (0 = unchanged) and its UNet's attention layers
    deepened to ``transformer_layers`` transformer blocks each (0 = unchanged; the new blocks the identity at
    first, seeded). Returns what was changed (nothing written when empty)."""
    from recon.guidance.architectures import add_pose_embedding, deepen_transformers, has_pose_embedding
    from recon.guidance.checkpoints import load_zero123, save_diffusers

    model = load_zero123(init, "cpu", torch.float32)
    changes = []
    if pose_embedding and not has_pose_embedding(model.unet):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.unet = add_pose_embedding(model.unet)
        changes.append("added the pose embedding (identity at the start)")
    if gain > 0 and has_pose_embedding(model.unet):
        weight = model.unet.add_embedding.norm2.weight
        with torch.no_grad():
            weight.copy_(torch.where(weight.abs() < gain, torch.full_like(weight, gain), weight))
        changes.append(f"pose embedding output gain raised to {gain}")
    if transformer_layers > 0:
        before = model.unet.config.transformer_layers_per_block
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            unet = deepen_transformers(model.unet, transformer_layers)
        if unet is not model.unet:
            model.unet = unet
            changes.append(f"transformer blocks per attention layer {before} -> {transformer_layers} (the new ones the identity at the start)")
    if changes:
        save_diffusers(model, folder, overwrite=True)
    return changes


def with_pose_gain(init: Path, gain: float, folder: Path) -> Path:
    """``init`` re-saved into ``folder`` with the camera projection's pose columns multiplied by ``gain``."""
    from recon.guidance.architectures import POSE_DIM
    from recon.guidance.checkpoints import load_zero123, save_diffusers

    model = load_zero123(init, "cpu", torch.float32)
    with torch.no_grad():
        model.camera_projection.weight[:, -POSE_DIM:] *= gain
    return save_diffusers(model, folder, overwrite=True)


@torch.no_grad()
def heldout_pairs(model, heldout: Path, size: int, count: int, generator: torch.Generator):
    """``count`` (input, target) view pairs of the views under ``heldout``, drawn with ``generator``, as ``model``
    sees them: (concatenated input latents, target latents, true tokens, the input images, the relative poses),
    the first three on the model's device."""
    from recon.cameras import relative_pose
    from recon.data.multiview import MultiViewDataset
    from recon.systems.cascade_training import ViewCache

    batch = ViewCache(MultiViewDataset(heldout, image_size=size)).sample(count, generator)
    dev = model.device
    images = batch.input_images.to(dev)
    rel = relative_pose(batch.target_elevation, batch.target_azimuth, batch.target_radius,
                        batch.input_elevation, batch.input_azimuth, batch.input_radius, encoding=model.pose_encoding)
    context = model.context(model.clip_embed(images), rel.to(dev))
    return model.cond_latent(images), model.encode(batch.target_images.to(dev)), context, images, rel


@torch.no_grad()
def pose_use(weights: Path, heldout: Path, size: int, device: str, count: int = 256, seed: int = 0) -> dict[str, float]:
    """How much a model uses its tokens: epsilon-MSE on ``count`` held-out (input, target) pairs with the
    true tokens (``true``), with the tokens of other pairs (``shuffled``), with the true image embeddings but
    other pairs' poses (``shuffled_pose``) and with zero tokens (``zero``); ``gap`` = shuffled_pose / true - 1,
    the loss share that the camera explains. A model that ignores the camera scores the same on all of them."""
    from recon.guidance.checkpoints import load_zero123
    from recon.runtime import resolve_device

    model = load_zero123(weights, resolve_device(device), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    cond_latent, target, context, images, rel = heldout_pairs(model, heldout, size, count, generator)
    dev = model.device
    t = torch.randint(50, 950, (count,), generator=generator).to(dev)
    noise = torch.randn(target.shape, generator=generator).to(dev)
    noisy = model.scheduler.add_noise(target, noise, t)
    other = torch.roll(torch.arange(count), 1)
    shuffled = context[other]
    shuffled_pose = model.context(model.clip_embed(images), rel[other].to(dev))
    scores = {}
    for name, tokens in (("true", context), ("shuffled", shuffled), ("shuffled_pose", shuffled_pose), ("zero", torch.zeros_like(context))):
        scores[name] = float(torch.nn.functional.mse_loss(model.eps(noisy, t, tokens, cond_latent).float(), noise))
    scores["gap"] = scores["shuffled_pose"] / scores["true"] - 1.0
    return scores


def stage_config(cfg: RecipeConfig, stage: str, steps: int, batch: int):
    """The TrainConfig of one training stage."""
    from recon.systems.cascade_training import TrainConfig

    return TrainConfig(
        stage=stage, steps=max(1, steps), batch_size=batch, image_size=cfg.size, lr_unet=cfg.lr_unet,
        lr_projection=cfg.lr_projection, lr_vae=cfg.lr_vae, kl_weight=cfg.kl_weight, chroma_weight=cfg.chroma_weight, warmup_steps=cfg.warmup_steps,
        lr_schedule=cfg.lr_schedule, ema_decay=cfg.ema_decay, loss_weighting=cfg.loss_weighting, mixed_precision=cfg.mixed_precision, compile=cfg.compile, prompt_steps=cfg.prompt_steps,
        nearby_views=NEARBY_SETS[cfg.nearby_views],
        seed=cfg.seed, preload=True, checkpoint_every=10**9, keep_checkpoints=1, vae_decoder_only=bool(cfg.init),
    )


def run_stage(cfg: RecipeConfig, stage: str, steps: int, batch: int, data: Path, init: Path, run: Path, minutes: float, log: Log):
    """Runs one stage of guidance.training.train within ``minutes`` (on every process); returns its TrainResult
    with ``final`` = the stage's weights folder on every process."""
    from recon.systems.cascade_training import train

    tcfg = stage_config(cfg, stage, steps, batch)
    state = {"t": time.perf_counter(), "n": 0, "loss": 0.0}

    def on_step(step: int, loss: float) -> None:
        state["n"] += 1
        state["loss"] += loss
        now = time.perf_counter()
        if now - state["t"] > 15.0 or step == 1:
            rate = state["n"] / (now - state["t"])
            log(f"  {stage} step {step}: loss {state['loss'] / state['n']:.4f} ({rate:.1f} steps/s, {rate * batch * processes:.0f} samples/s)")
            state.update(t=now, n=0, loss=0.0)

    from accelerate import PartialState

    launch = PartialState()
    processes = launch.num_processes
    if launch.is_main_process and run.exists():
        shutil.rmtree(run)  # this stage's scratch run from an earlier command into the same --work
    launch.wait_for_everyone()
    log(f"stage {stage}: up to {steps} steps of batch {batch} x {processes} processes in {minutes:.2f} min from {init}")
    result = train(tcfg, data, str(init), run, cfg.device, max_minutes=minutes, resume=False, export_on_stop=True, on_step=on_step)
    tail = result.losses[-50:]
    log(f"stage {stage} done: {result.step} steps, mean loss of the last {len(tail)} {sum(tail) / max(1, len(tail)):.4f}")
    final = run / "final" / "base"
    if not (final / "model_index.json").is_file():
        raise SystemExit(f"stage {stage} wrote no final weights")
    return dataclasses.replace(result, final=final)


# ------------------------------------------------------------------ outputs
def save_shipped(final: Path, folder: Path, dtype: str, description: str, foreground_ratio: float) -> Path:
    """The Base of ``final`` rewritten as the shipped folder in ``dtype`` (fp16 / fp32), recording the framing of its
    training images (``foreground_ratio``, :func:`recon.data.synth.median_foreground_ratio`) for ``recon fit``."""
    from recon.guidance.checkpoints import FOREGROUND_RATIO_KEY, load_zero123, save_diffusers

    model = load_zero123(final, "cpu", torch.float16 if dtype == "fp16" else torch.float32)
    model.is_random = False
    model.description = description
    return save_diffusers(model, folder, overwrite=True, extra_meta={FOREGROUND_RATIO_KEY: round(foreground_ratio, 3)})


def sample_grid(base, dataset, count: int, cfg, background: float) -> torch.Tensor:
    """(3, H, W) grid: per object rows of ground truth, Base views and cascade views; column 0 = the input."""
    from recon.guidance.cascade import generate_views
    from recon.imageio import composite
    from recon.systems.evaluation import cascade_views

    rows = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        views = composite(item.images, background)
        targets = tuple(p[1:] for p in (item.elevation_deg, item.azimuth_deg, item.radius))
        pose = (float(item.elevation_deg[0]), float(item.azimuth_deg[0]), float(item.radius[0]))
        base_views = generate_views(base, views[0], pose, targets, cfg.steps, cfg.guidance_scale, index, cfg.batch)
        cascade = cascade_views(base, base, views[0], pose, targets, base_views, cfg, index)
        for images in (views[1:], base_views, cascade):
            rows.append(torch.cat([views[0], *images.cpu()], dim=2))
    return torch.cat(rows, dim=1)


def write_png(path: Path, image: torch.Tensor) -> None:
    """Writes a (3, H, W) image in [0, 1] as an opaque PNG."""
    from recon.imageio import save_rgba_png

    rgba = torch.cat([image, torch.ones_like(image[:1])]).permute(1, 2, 0).numpy()
    save_rgba_png(path, rgba)


def pack(folder: Path, out: Path) -> list[str]:
    """Tars ``folder`` (as ``PRIOR_NAME/...``) into ``out``; splits into 15 MiB parts if larger. Returns file names."""
    tar_path = out / f"{PRIOR_NAME}.tar"
    tmp = out / f".{PRIOR_NAME}.tar.tmp"
    with tarfile.open(tmp, "w") as tar:
        tar.add(folder, arcname=PRIOR_NAME)
    data = tmp.read_bytes()
    tmp.unlink()
    if len(data) <= PART_BYTES:
        write_bytes(tar_path, data)
        return [tar_path.name]
    names = []
    for k, start in enumerate(range(0, len(data), PART_BYTES)):
        part = out / f"{PRIOR_NAME}.tar.part{k:02d}"
        write_bytes(part, data[start : start + PART_BYTES])
        names.append(part.name)
    return names


# ------------------------------------------------------------------ main
def prepare_data(cfg: RecipeConfig, work: Path, log: Log, record: dict, timings: dict) -> int:
    """Process 0: renders the held-out and training sets into ``work``; returns the training object count."""
    from recon.data.synth import SynthConfig

    t = time.perf_counter()
    workers = cfg.workers or os.cpu_count() or 1
    train_synth = SynthConfig(objects=cfg.objects, views=cfg.views, size=cfg.size, seed=cfg.seed, supersample=cfg.supersample, families=cfg.families)
    held_synth = SynthConfig(objects=cfg.heldout_objects, views=cfg.heldout_views, size=cfg.size, seed=cfg.seed + 1,
                             supersample=cfg.supersample, orbit=True, families=cfg.heldout_families)
    training = "no" if cfg.evaluate_only else f"up to {cfg.objects}"
    log(f"synthesising {cfg.heldout_objects} held-out and {training} training objects with {workers} processes")
    held_count = synthesize_parallel(held_synth, work / "heldout", workers, float("inf"), log)
    train_count = 0 if cfg.evaluate_only else synthesize_parallel(train_synth, work / "train", workers, START + 60.0 * cfg.synth_minutes, log)
    timings["synth_s"] = time.perf_counter() - t
    record["data"] = {"train": {**asdict(train_synth), "objects": train_count}, "heldout": {**asdict(held_synth), "objects": held_count}}
    log(f"data: {train_count} training objects x {cfg.views} views, {held_count} held-out objects x {cfg.heldout_views} views ({timings['synth_s']:.0f} s)")
    return train_count


def heldout_vae_scores(weights: Path, heldout: Path, size: int, device: str) -> dict[str, float]:
    """Reconstruction PSNR and chroma PSNR of ``weights``' VAE on every held-out view."""
    from recon.data.multiview import MultiViewDataset
    from recon.guidance.checkpoints import load_zero123
    from recon.runtime import resolve_device
    from recon.systems.cascade_training import ViewCache, reconstruction_scores

    model = load_zero123(weights, resolve_device(device), torch.float32)
    cache = ViewCache(MultiViewDataset(heldout, image_size=size))
    views = cache.rgb(torch.arange(cache.images.shape[0]), 1.0).to(model.device)
    return reconstruction_scores(model.vae, views)


def object_families(dataset: MultiViewDataset) -> dict[str, str]:
    """{object id: shape family} of a synthetic dataset's objects, from each object's ``object.json``."""
    from recon.data.synth import OBJECT_META

    families: dict[str, str] = {}
    for record in dataset.objects:
        meta = record.folder / OBJECT_META
        if meta.is_file():
            families[record.object_id] = read_json(meta).get("family", "unknown")
    return families


def stage_throughput(run: Path) -> dict | None:
    """The last launch record (processes, global batch, samples/s) of a training run's meta.json."""
    meta = run / "meta.json"
    launches = read_json(meta).get("launches", []) if meta.is_file() else []
    return launches[-1] if launches else None


def evaluate_extras(cfg: RecipeConfig, model, heldout, ecfg, report: dict, out: Path, log: Log, record: dict) -> dict:
    """After the main evaluation: the ``--compare`` model and the nearby-view ablation on the same objects, and
    the paired per-object comparisons; written to OUT/extra.json after each part. Returns the extra record."""
    from recon.guidance.checkpoints import load_zero123
    from recon.systems.evaluation import MEAN_METHOD, evaluate, paired_comparison

    extra: dict = {"paired": {}, "ablation": {}, "compare": None, "cfg_sweep": {}}
    paired = extra["paired"]
    paired["cascade vs base"] = paired_comparison(report, "base", report, "cascade")
    generative = [m for m in ("base", "cascade", MEAN_METHOD) if m in report["summary"]]
    if MEAN_METHOD in generative:
        paired[f"{MEAN_METHOD} vs base"] = paired_comparison(report, "base", report, MEAN_METHOD, ("psnr", "ssim"))
    for baseline in ("copy-input", "mean-image"):
        for method in generative:
            paired[f"{method} vs {baseline}"] = paired_comparison(report, baseline, report, method, ("psnr", "ssim"))
    write_json(out / "extra.json", extra)
    if cfg.compare and remaining_s(cfg) > 20.0:
        old = load_zero123(cfg.compare, model.device, torch.float32)
        t = time.perf_counter()
        extra["compare"] = evaluate(heldout, old, old, ecfg)
        extra["compare_weights"] = cfg.compare
        extra["compare_pose_use"] = pose_use(Path(cfg.compare), Path(heldout.root), cfg.size, cfg.device, seed=cfg.seed)
        for method in ("base", "cascade") + ((MEAN_METHOD,) if cfg.mean_samples else ()):
            paired[f"new {method} vs compared {method}"] = paired_comparison(extra["compare"], method, report, method)
        summary = {k: round(v["psnr"], 3) for k, v in extra["compare"]["summary"].items()}
        log(f"compared weights {cfg.compare} ({time.perf_counter() - t:.0f} s): PSNR {summary}; pose use {extra['compare_pose_use']}")
        write_json(out / "extra.json", extra)
        del old
    others = [name for name in NEARBY_SETS if name != cfg.nearby_views]
    for label in others if cfg.ablation else ():
        if remaining_s(cfg) < 25.0:
            log(f"ablation stopped before {label!r}: time is up")
            break
        t = time.perf_counter()
        views = NEARBY_SETS[label]
        ablated = evaluate(heldout, model, model, dataclasses.replace(ecfg, nearby_views=views))
        extra["ablation"][label] = {"nearby_views": views, "summary": ablated["summary"],
                                    "consistency_by_object": ablated["consistency_by_object"], "views": ablated["views"]}
        paired[f"cascade [{label}] vs base"] = paired_comparison(ablated, "base", ablated, "cascade")
        paired[f"cascade [{label}] vs cascade [{cfg.nearby_views}]"] = paired_comparison(report, "cascade", ablated, "cascade")
        log(f"ablation {label} ({time.perf_counter() - t:.0f} s): cascade PSNR {ablated['summary']['cascade']['psnr']:.3f}")
        write_json(out / "extra.json", extra)
    for scale in (float(v) for v in cfg.cfg_sweep.split(",") if v.strip()):
        if remaining_s(cfg) < 15.0:
            log(f"CFG sweep stopped before scale {scale}: time is up")
            break
        swept = evaluate(heldout, model, None, dataclasses.replace(ecfg, guidance_scale=scale, consistency=False))
        extra["cfg_sweep"][str(scale)] = swept["summary"]["base"]
        paired[f"base at CFG {scale} vs base at CFG {ecfg.guidance_scale}"] = paired_comparison(report, "base", swept, "base", ("psnr", "ssim"))
        log(f"base at CFG {scale}: PSNR {swept['summary']['base']['psnr']:.3f}, SSIM {swept['summary']['base']['ssim']:.4f}")
        write_json(out / "extra.json", extra)
    return extra


def train_prior(cfg: RecipeConfig, work: Path, log: Log, record: dict, timings: dict) -> tuple[Path, dict[str, int]]:
    """Stages vae (when due), base and cascade (when due) from --init or random weights, on every process;
    returns the final weights folder and the steps per stage. Fills ``record``'s params, VAE metrics, pose use
    and throughput."""
    from accelerate import PartialState

    state = PartialState()
    is_main = state.is_main_process
    from recon.guidance.checkpoints import load_zero123

    if cfg.init:
        initial = load_zero123(cfg.init, "cpu", torch.float32)
        record["params"] = {name: sum(p.numel() for p in getattr(initial, name).parameters()) for name in ("unet", "vae", "image_encoder", "camera_projection")}
        start_weights = Path(cfg.init)
        if (start_weights / "recipe.json").is_file():
            record["previous"] = read_json(start_weights / "recipe.json")
        log(f"continuing from {cfg.init}" + ("; the VAE decoder alone is trained" if cfg.vae_minutes > 0 else "; stage vae skipped"))
        if cfg.pose_embedding or cfg.transformer_layers > 0:
            grown = work / "init-grown"
            if is_main:
                shutil.rmtree(grown, ignore_errors=True)  # an earlier run's, in a reused --work: not this --init's
                for change in grown_init(start_weights, grown, cfg.seed, cfg.pose_embedding, cfg.pose_embedding_gain, cfg.transformer_layers):
                    log(change)
            state.wait_for_everyone()
            if (grown / "model_index.json").is_file():
                start_weights = grown
                record["params"]["unet"] = sum(p.numel() for p in load_zero123(grown, "cpu", torch.float32).unet.parameters())
    else:
        record["params"] = random_init(cfg, work / "init") if is_main else {}
        state.wait_for_everyone()
        start_weights = work / "init"
    if is_main:
        record["vae_heldout_start"] = heldout_vae_scores(start_weights, work / "heldout", cfg.size, cfg.device)
        log(f"VAE on the held-out views at the start: {record['vae_heldout_start']}")
    if cfg.vae_minutes > 0 or not cfg.init:
        t = time.perf_counter()
        vae = run_stage(cfg, "vae", cfg.vae_steps, cfg.vae_batch, work / "train", start_weights, work / "run-vae", cfg.vae_minutes, log)
        timings["vae_s"] = time.perf_counter() - t
        record["vae"] = vae.metrics
        log("VAE: " + ", ".join(f"{k} {v:.4g}" for k, v in vae.metrics.items()))
        start_weights = vae.final
    log(f"parameters: {record['params']} (total {sum(record['params'].values()) / 1e6:.2f} M)")
    if cfg.projection_pose_gain != 1.0:
        if is_main:
            with_pose_gain(start_weights, cfg.projection_pose_gain, work / "init-pose-gain")
        state.wait_for_everyone()
        start_weights = work / "init-pose-gain"
        log(f"camera projection pose columns x {cfg.projection_pose_gain}")
    record["pose_use"] = {}
    if is_main:
        record["pose_use"]["start"] = pose_use(start_weights, work / "heldout", cfg.size, cfg.device, seed=cfg.seed)
        log(f"pose use at the start (eps-MSE with true / shuffled / shuffled-pose / zero tokens, gap): {record['pose_use']['start']}")
    log.flush()

    unet_s = max(0.0, remaining_s(cfg) - 60.0 * cfg.eval_reserve_minutes)
    cascade_share = cfg.cascade_fraction if cfg.cascade_steps > 0 else 0.0
    stages: dict[str, int] = {}
    record["throughput"] = {}

    def unet_stage(stage: str, steps: int, batch: int, init: Path, minutes: float) -> Path:
        """Runs UNet stage ``stage`` from ``init``; records its steps, time, throughput and pose use; returns its weights."""
        t = time.perf_counter()
        result = run_stage(cfg, stage, steps, batch, work / "train", init, work / f"run-{stage}", minutes, log)
        timings[f"{stage}_s"] = time.perf_counter() - t
        stages[stage] = result.step
        record["throughput"][stage] = stage_throughput(work / f"run-{stage}")
        if is_main:
            record["pose_use"][stage] = pose_use(result.final, work / "heldout", cfg.size, cfg.device, seed=cfg.seed)
            log(f"pose use after stage {stage}: {record['pose_use'][stage]}")
        return result.final

    final = start_weights
    if cascade_share < 1.0:
        final = unet_stage("base", cfg.base_steps, cfg.base_batch, final, unet_s * (1 - cascade_share) / 60.0)
    if cascade_share > 0:
        minutes = max(0.1, remaining_s(cfg) - 60.0 * cfg.eval_reserve_minutes) / 60.0
        final = unet_stage("cascade", cfg.cascade_steps, cfg.cascade_batch, final, minutes)
    return final, stages


def main(argv: list[str] | None = None) -> int:
    """Runs the whole recipe; returns the exit code."""
    cfg = parse_args(argv)
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu")
    is_main = state.is_main_process
    out = Path(cfg.out)
    if cfg.work:
        work = Path(cfg.work)
    elif state.num_processes == 1:
        work = Path(tempfile.mkdtemp(prefix="tiny-prior-"))
    else:
        raise SystemExit("several processes need a shared --work folder")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.txt", is_main)
    timings: dict[str, float] = {}
    record: dict = {"recipe": asdict(cfg), "command": " ".join(sys.argv), "python": sys.version.split()[0], "torch": torch.__version__,
                    "processes": state.num_processes}
    log(f"recipe: work folder {work}, output {out}, budget {cfg.budget_minutes} min, {state.num_processes} process(es)")

    from accelerate.utils import broadcast_object_list

    train_count = prepare_data(cfg, work, log, record, timings) if is_main else 0
    state.wait_for_everyone()
    train_count = broadcast_object_list([train_count])[0]  # every process stops, not only the main one
    if train_count < 2 and not cfg.evaluate_only:
        raise SystemExit("fewer than 2 training objects were rendered; raise --synth-minutes")

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    from recon.guidance.checkpoints import load_zero123

    if cfg.evaluate_only:
        final, stages = Path(cfg.init), {}
        if (final / "recipe.json").is_file():
            record["previous"] = read_json(final / "recipe.json")
    else:
        final, stages = train_prior(cfg, work, log, record, timings)
    record["steps"] = stages
    log.flush()
    if not is_main:
        return 0

    from recon.data.multiview import MultiViewDataset
    from recon.data.synth import SynthConfig, median_foreground_ratio
    from recon.runtime import resolve_device
    from recon.systems.evaluation import (
        EvalConfig,
        evaluate,
        grouped_markdown,
        grouped_summary,
        markdown_report,
        paired_markdown,
        write_report,
    )

    t = time.perf_counter()
    shipped = work / PRIOR_NAME
    done = f"{train_count} synthetic objects (base {stages.get('base', 0)} steps, cascade {stages.get('cascade', 0)} steps)"
    if cfg.init:
        description = load_zero123(cfg.init, "cpu", torch.float32).description
        if not cfg.evaluate_only:
            description += f"; then continued by bench/train_tiny_prior.py on {done}"
    else:
        description = f"recon tiny prior: {cfg.arch} architecture trained from scratch by bench/train_tiny_prior.py on {done}"
    # the framing depends on the generator's settings, not on how many objects were rendered (none with --evaluate-only)
    train_synth = SynthConfig(**{**record["data"]["train"], "objects": max(1, train_count)})
    record["foreground_ratio"] = median_foreground_ratio(train_synth)
    save_shipped(final, shipped, cfg.save_dtype, description, record["foreground_ratio"])
    device = resolve_device(cfg.device)
    model = load_zero123(shipped, device, torch.float32)
    heldout = MultiViewDataset(work / "heldout", image_size=cfg.size)
    record["description"] = description
    write_json(shipped / "recipe.json", record)
    names = pack(shipped, out)
    log(f"wrote {', '.join(names)} (weights before the evaluation)")
    ecfg = EvalConfig(steps=cfg.eval_steps, batch=cfg.eval_batch, group=cfg.eval_group, consistency=cfg.consistency,
                      seed=cfg.seed, max_objects=min(cfg.eval_objects, len(heldout)), nearby_views=NEARBY_SETS[cfg.nearby_views],
                      mean_samples=cfg.mean_samples)
    log(f"evaluating {ecfg.max_objects}/{len(heldout)} held-out objects")
    report = evaluate(heldout, model, model, ecfg)
    timings["eval_s"] = time.perf_counter() - t
    write_report(report, out)
    log("\n" + markdown_report(report))
    record["eval_summary"] = {k: {"psnr": v["psnr"], "ssim": v["ssim"]} for k, v in report["summary"].items()}
    write_json(out / "recipe.json", record)

    if cfg.sample_objects > 0 and remaining_s(cfg) > 15.0:
        write_png(out / "samples.png", sample_grid(model, heldout, cfg.sample_objects, ecfg, ecfg.background))
    t = time.perf_counter()
    extra = evaluate_extras(cfg, model, heldout, ecfg, report, out, log, record)
    timings["extras_s"] = time.perf_counter() - t
    table = "\n## Paired per-object comparisons\n\n" + paired_markdown(list(extra["paired"].items()))
    families = object_families(heldout)
    if len(set(families.values())) > 1:
        record["eval_by_family"] = grouped_summary(report, families)
        table = "\n## By shape family\n\n" + grouped_markdown(record["eval_by_family"], "family") + table
    log(table)
    write_report(report, shipped)
    for folder in (out, shipped):
        write_text(folder / "eval.md", markdown_report(report) + table)
    record["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    record["paired"] = extra["paired"]
    write_json(shipped / "recipe.json", record)
    names = pack(shipped, out)
    record["files"] = {name: (out / name).stat().st_size for name in names}
    record["timings_s"]["total"] = round(time.perf_counter() - START, 1)
    write_json(out / "recipe.json", record)
    log(f"wrote {', '.join(names)} ({sum(record['files'].values()) / 2**20:.1f} MiB), eval.md, eval.json, extra.json, recipe.json to {out}")
    log.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
