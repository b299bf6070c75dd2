"""Finding and loading Zero-1-to-3 weights in every layout a user may point us at.

``load_zero123(spec)`` accepts:

* ``random-tiny`` / ``random-full``: untrained weights (seeded), marked ``is_random``;
* ``tiny``: the small prior shipped inside the package (``recon/assets/tiny-zero123``);
* a diffusers folder (``model_index.json``) whose camera projection folder is
  ``cc_projection`` (kxic/zero123-xl-diffusers) or ``clip_camera_projection``
  (bennyguo/ashawkey zero123-xl-diffusers, ashawkey/stable-zero123-diffusers);
* an original latent-diffusion checkpoint (``.ckpt``, ``.safetensors``):
  ``model.diffusion_model.*`` (EMA copy ``model_ema.*`` preferred),
  ``first_stage_model.*``, ``cond_stage_model.*`` (OpenAI CLIP vision tower),
  ``cc_projection.*``;
* a Hugging Face hub id (``owner/name``): the local HF cache first, else a
  download (progress bar, resumable) when online.

Nothing is ever unpickled beyond tensors and plain containers: torch files go
through ``torch.load(weights_only=True)`` and, when that refuses a Lightning
checkpoint's extra objects, through :mod:`recon.guidance.lightning`'s
restricted unpickler. safetensors weights are memory-mapped and placed on the
target device in the target dtype tensor by tensor, into modules built on the
meta device (no random initialisation, no fp32 copy of the whole model).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recon.errors import InputError, WeightsNotFoundError
from recon.guidance.architectures import (
    POSE_EMBEDDING,
    architecture,
    build_components,
    match_architecture,
)
from recon.guidance.model import (
    POSE_ENCODINGS,
    PoseEncoding,
    Zero123Model,
    default_dtype,
    make_scheduler,
)

RANDOM_SPECS = ("random-tiny", "random-full")
SHIPPED_SPEC = "tiny"
# Projection sub-folder names of the two published diffusers layouts.
PROJECTION_FOLDERS = ("cc_projection", "clip_camera_projection")
# Our own sidecar in folders written by save_diffusers.
RECON_META = "recon_zero123.json"
# Its entry for the framing of the training images (recorded_foreground_ratio).
FOREGROUND_RATIO_KEY = "foreground_ratio"
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
SAFETENSORS_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A name that says Stable-Zero123: stable-zero123, stable_zero123, StableZero123, stable-zero-1-2-3 ...
STABLE_NAME = re.compile(r"stable[\W_]*zero[\W_]*1[\W_]*2[\W_]*3", re.IGNORECASE)
HOW_TO_PROVIDE = (
    "download weights yourself, e.g. `huggingface-cli download ashawkey/zero123-xl-diffusers "
    "--local-dir models/zero123-xl` (or an original zero123-xl.ckpt), then pass --model PATH; "
    "see docs/GUIDANCE-MODELS.md"
)


# ------------------------------------------------------------------ public API
def load_zero123(
    spec: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    pose_encoding: PoseEncoding | None = None,
    image_encoder: str | os.PathLike[str] | None = None,
    seed: int = 0,
    prefetched: WeightPrefetch | None = None,
) -> Zero123Model:
    """Resolves ``spec`` (see module docs) and returns the model on ``device`` in eval mode, frozen.

    ``dtype`` defaults to fp16 on CUDA and fp32 on the CPU. ``pose_encoding``
    None = decided by :func:`decide_pose_encoding` (our metadata file, the
    configs, the folder's or file's own name); the choice and its reason are
    logged. ``image_encoder``: a diffusers folder (or its ``image_encoder``
    sub-folder) to take the CLIP tower from when the checkpoint lacks one.
    ``seed`` only affects ``random-*`` specs. ``prefetched``: weights a
    :class:`WeightPrefetch` has been reading meanwhile, used where it read them.
    """
    from recon.progress import info

    spec_str = str(spec)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if spec_str in RANDOM_SPECS:
        with _quiet_libraries():
            model = random_model(spec_str.removeprefix("random-"), seed=seed, pose_encoding=pose_encoding or "zero123")
        reason = "set by the caller" if pose_encoding else "random weights"
    else:
        path, origin, name = _locate(spec_str)  # a hub download happens here, with its progress bar
        with _quiet_libraries():
            if path.is_dir():
                model, reason = _load_diffusers_folder(path, pose_encoding, image_encoder, origin, dtype, device, name, prefetched)
            else:
                model, reason = _load_checkpoint_file(path, pose_encoding, image_encoder, dtype, device)
    model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    info(f"guidance weights: {model.description}; pose encoding {model.pose_encoding} ({reason})")
    return model


def random_model(arch: str = "tiny", seed: int = 0, pose_encoding: PoseEncoding = "zero123") -> Zero123Model:
    """A Zero123Model with seeded random weights of architecture ``arch`` ("tiny" or "full"), fp32 on the CPU.

    The global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = build_components(arch)
    return Zero123Model(
        **parts,
        pose_encoding=pose_encoding,
        is_random=True,
        description=f"RANDOM WEIGHTS ({arch} architecture, seed {seed}): outputs are noise, not predictions",
    )


def shipped_prior_path() -> Path:
    """Where the shipped ``tiny`` prior lives inside the installed package."""
    from recon import assets

    # the package folder itself: importlib.resources cannot list an editable install's package
    return Path(assets.__file__).resolve().parent / "tiny-zero123"


def recorded_foreground_ratio(spec: str | os.PathLike[str]) -> float | None:
    """The framing the weights ``spec`` were trained at, from ``foreground_ratio`` in their folder's recon_zero123.json.

    That number is the median size of the objects in the training images (longer side of the bounding box / image
    side); an input recentred to it shows the object at the scale the model knows. None where nothing is recorded:
    random weights, checkpoint files, hub ids (nothing is downloaded here) and folders without the entry, such as
    converted real Zero-1-to-3 weights. Raises :class:`InputError` for a recorded value outside (0, 1].
    """
    spec_str = str(spec)
    if spec_str in RANDOM_SPECS:
        return None
    folder = shipped_prior_path() if spec_str == SHIPPED_SPEC else Path(spec_str).expanduser()
    value = _recon_meta(folder).get(FOREGROUND_RATIO_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise InputError(f"{folder / RECON_META}: {FOREGROUND_RATIO_KEY} must be a number in (0, 1], got {value!r}")
    return float(value)


def foreground_ratio_for(spec: str | os.PathLike[str], ratio: float | None = None) -> float:
    """``ratio`` where given, else the framing the weights ``spec`` record (:func:`recorded_foreground_ratio`), else
    :data:`recon.preprocess.DEFAULT_FOREGROUND_RATIO`: the object size a photo is recentred to for them."""
    from recon.preprocess import DEFAULT_FOREGROUND_RATIO

    if ratio is not None:
        return ratio
    recorded = recorded_foreground_ratio(spec)
    return DEFAULT_FOREGROUND_RATIO if recorded is None else recorded


def decide_pose_encoding(
    name: str,
    requested: PoseEncoding | None = None,
    meta: Mapping[str, Any] | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[PoseEncoding, str]:
    """Which pose encoding weights take, and why (a phrase for the log).

    In order: ``requested`` (the user's setting); ``meta["pose_encoding"]``
    (our ``recon_zero123.json``); a ``_name_or_path`` in ``configs``
    ({file name: parsed JSON}) that names Stable-Zero123; ``name`` (the
    folder's or file's OWN name, or the hub repo's name, never a parent
    directory) naming Stable-Zero123; else "zero123".
    """
    if requested is not None:
        if requested not in POSE_ENCODINGS:
            raise InputError(f"pose encoding {requested!r}: choose one of {', '.join(POSE_ENCODINGS)}")
        return requested, "set by guidance.pose_encoding / --pose-encoding"
    recorded = (meta or {}).get("pose_encoding")
    if recorded in POSE_ENCODINGS:
        return recorded, f"recorded in {RECON_META}"
    for where, config in (configs or {}).items():
        value = config.get("_name_or_path")
        if isinstance(value, str) and STABLE_NAME.search(value):
            return "stable-zero123", f"{where} names {value!r}"
    if STABLE_NAME.search(name):
        return "stable-zero123", f"the name {name!r} says Stable-Zero123"
    return "zero123", f"neither {RECON_META}, the configs nor the name {name!r} say Stable-Zero123"


def save_diffusers(
    model: Zero123Model,
    folder: str | os.PathLike[str],
    projection_folder: str = "cc_projection",
    safe_serialization: bool = True,
    overwrite: bool = False,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``model`` as a diffusers folder that :func:`load_zero123` (and the published pipelines) read.

    ``projection_folder``: "cc_projection" (CCProjection, key ``projection.*``)
    or "clip_camera_projection" (CLIPCameraProjection, key ``proj.*``). The
    folder is written beside its final name and renamed into place at the end;
    ``overwrite`` replaces only a folder that recon wrote (it holds
    ``recon_zero123.json``). ``extra_meta`` is added to that file.
    """
    from transformers import CLIPImageProcessor

    if projection_folder not in PROJECTION_FOLDERS:
        raise ValueError(f"projection_folder must be one of {PROJECTION_FOLDERS}")
    if not model.has_decoder:
        raise ValueError("cannot save a model whose VAE decoder was dropped")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise InputError(f"{folder}: folder exists and is not empty (pass overwrite=True / --overwrite)")
        if not (folder / RECON_META).is_file():
            raise InputError(f"{folder}: refusing to overwrite a non-empty folder that recon did not write (no {RECON_META})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        with _quiet_libraries():
            model.unet.save_pretrained(tmp / "unet", safe_serialization=safe_serialization)
            model.vae.save_pretrained(tmp / "vae", safe_serialization=safe_serialization)
            model.image_encoder.save_pretrained(tmp / "image_encoder", safe_serialization=safe_serialization)
            model.scheduler.save_pretrained(tmp / "scheduler")
            size = int(model.image_encoder.config.image_size)
            CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
                tmp / "feature_extractor"
            )
            _save_projection(model.camera_projection, tmp / projection_folder, projection_folder, safe_serialization)
            pipeline = "Zero1to3StableDiffusionPipeline" if projection_folder == "cc_projection" else "Zero123Pipeline"
            module = "pipeline_zero1to3" if projection_folder == "cc_projection" else "zero123"
            projection_class = "CCProjection" if projection_folder == "cc_projection" else "CLIPCameraProjection"
            index = {
                "_class_name": pipeline,
                "feature_extractor": ["transformers", "CLIPImageProcessor"],
                "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                projection_folder: [module, projection_class],
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            meta = {"pose_encoding": model.pose_encoding, "is_random": model.is_random, "description": model.description}
            meta.update(extra_meta or {})
            (tmp / RECON_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


# ------------------------------------------------------------------ resolution
@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silences diffusers/transformers info logs and per-file progress bars while loading; restores them after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars:
            transformers_logging.enable_progress_bar()


def _locate(spec: str) -> tuple[Path, str, str]:
    """``spec`` -> (local folder or file, origin for messages, the name that speaks for the weights).

    Raises WeightsNotFoundError listing every place looked at, InputError for
    a folder or file that is not Zero-1-to-3 weights.
    """
    looked: list[str] = []
    path = _local_path(spec)
    if spec == SHIPPED_SPEC:
        if (path / "model_index.json").is_file():
            return path, "shipped tiny prior", path.name
        raise WeightsNotFoundError(
            f"the shipped 'tiny' prior is not in this installation (looked in {path}); "
            f"use --model PATH for real Zero-1-to-3 weights ({HOW_TO_PROVIDE}), or --model random-tiny for a smoke test"
        )
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return path, str(path), path.resolve().name
        raise InputError(
            f"{path}: folder has no model_index.json; expected a diffusers Zero-1-to-3 folder "
            f"(unet/, vae/, image_encoder/, cc_projection/ or clip_camera_projection/) or pass a .ckpt/.safetensors file"
        )
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise InputError(f"{path}: not a checkpoint (expected {', '.join(CHECKPOINT_SUFFIXES)} or a diffusers folder)")
        return path, str(path), path.name
    looked.append(f"local path {path.resolve()} (does not exist)")
    if HUB_ID.match(spec):
        folder = _hub_snapshot(spec, looked)
        if folder is not None:
            return folder, f"hub {spec} ({folder})", spec.split("/")[1]
    else:
        looked.append(f"Hugging Face hub: not tried ({spec!r} is not an owner/name id)")
    raise WeightsNotFoundError(f"Zero-1-to-3 weights {spec!r} not found; looked in: " + "; ".join(looked) + f". To fix: {HOW_TO_PROVIDE}")


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _hf_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if flag is None else flag.strip().lower() in ("1", "true", "yes", "on")


def _hub_snapshot(repo_id: str, looked: list[str]) -> Path | None:
    """The local folder of ``repo_id`` from the HF cache, or downloaded when online; ``None`` if neither.

    The download shows huggingface_hub's progress bars (unless the user turned
    them off with HF_HUB_DISABLE_PROGRESS_BARS) and resumes partial files left
    in the cache by an interrupted run.
    """
    import huggingface_hub
    from huggingface_hub import constants

    from recon.progress import info

    cache = _hf_cache_dir()
    patterns = ["*.json", "*.txt", "*.safetensors", "*.bin"]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several unrelated types here
        looked.append(f"Hugging Face cache {cache} ({type(exc).__name__})")
    if _hf_offline():
        looked.append("Hugging Face hub (skipped: HF_HUB_OFFLINE is set)")
        return None
    info(f"downloading {repo_id} from the Hugging Face hub into {cache} (an interrupted download resumes when rerun)")
    if not constants.HF_HUB_DISABLE_PROGRESS_BARS:
        huggingface_hub.utils.enable_progress_bars()
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-repo errors all mean "not available"
        looked.append(f"Hugging Face hub {repo_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
        return None


def _load_checkpoint_file(
    path: Path, pose_encoding: PoseEncoding | None, image_encoder: str | os.PathLike[str] | None, dtype: torch.dtype, device: torch.device
) -> tuple[Zero123Model, str]:
    encoding, reason = decide_pose_encoding(path.name, pose_encoding)
    model = load_ldm_checkpoint(path, encoding, image_encoder, dtype, device)
    return model, reason


# ------------------------------------------------------------ diffusers folders
def _recon_meta(folder: Path) -> dict[str, Any]:
    """``folder``'s recon_zero123.json (written by :func:`save_diffusers`), {} where it has none."""
    meta = folder / RECON_META
    return _read_json(meta) if meta.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _load_diffusers_folder(
    folder: Path,
    pose_encoding: PoseEncoding | None,
    image_encoder: str | os.PathLike[str] | None,
    origin: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    name: str | None = None,
    prefetched: WeightPrefetch | None = None,
) -> tuple[Zero123Model, str]:
    """The model of a diffusers folder and the reason for its pose encoding; ``name`` = what the weights are called
    (default: the folder's own name)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    device = torch.device(device)
    index = _read_json(folder / "model_index.json")
    for part in ("unet", "vae"):
        if not (folder / part / "config.json").is_file():
            raise InputError(f"{folder}: diffusers folder has no {part}/config.json")
    names = [n for n in PROJECTION_FOLDERS if n in index or (folder / n).is_dir()]
    if not names:
        raise InputError(f"{folder}: no camera projection folder (expected one of {', '.join(PROJECTION_FOLDERS)})")
    meta = _recon_meta(folder)
    configs = {"model_index.json": index, "unet/config.json": _read_json(folder / "unet" / "config.json")}
    encoding, reason = decide_pose_encoding(name or folder.resolve().name, pose_encoding, meta, configs)
    unet = load_component(folder / "unet", UNet2DConditionModel, device, dtype, state=_take(prefetched, folder / "unet", device, dtype))
    vae = load_component(folder / "vae", AutoencoderKL, device, dtype, state=_take(prefetched, folder / "vae", device, dtype))
    encoder = _load_image_encoder(folder, image_encoder, dtype, device, prefetched)
    projection = load_projection(folder / names[0])
    is_random = bool(meta.get("is_random", False))
    description = f"diffusers folder {origin} ({names[0]})"
    if is_random:
        description = f"RANDOM WEIGHTS saved in {description}"
    return Zero123Model(unet, vae, encoder, projection, make_scheduler(), encoding, is_random, description), reason


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a component folder (one file, or the shards of an index); [] if none."""
    for name in SAFETENSORS_INDEXES:
        if (folder / name).is_file():
            weight_map = _read_json(folder / name).get("weight_map", {})
            return [folder / shard for shard in sorted(set(weight_map.values()))]
    return [folder / name for name in WEIGHT_FILES if name.endswith(".safetensors") and (folder / name).is_file()][:1]


def read_safetensors(files: list[Path], device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every tensor of ``files`` (memory-mapped), placed on ``device`` in ``dtype`` one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    device = torch.device(device)
    where = "cpu" if device.type == "cpu" else str(device if device.index is not None else torch.device(device.type, 0))
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=where) as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    tensor = handle.get_tensor(key)
                    state[key] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{file}: not a readable safetensors file ({exc})") from exc
    return state


class WeightPrefetch:
    """Reads the safetensors weights of local diffusers folders onto a device in a background thread.

    Placing full-size Zero123 weights on a GPU took 0.6-0.7 s on an H200, nearly all of it in copies that release
    the GIL, so it can run while diffusers and transformers import
    (:func:`recon.guidance.architectures.import_model_libraries`, 3.1-3.5 s there) rather than after them.
    :func:`load_zero123` then takes the tensors with :meth:`take`. Only local diffusers folders (``tiny`` or a
    folder path) are read: random weights, checkpoint files and hub ids are left to the loader, so nothing is
    downloaded here. A component that fails to read is left out, and the loader's own read reports the error.
    """

    COMPONENTS = ("unet", "vae", "image_encoder")

    def __init__(self, specs: Sequence[str], device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Starts reading every component of the local diffusers folders among ``specs``, in ``dtype`` (default:
        the loader's for ``device``)."""
        # imported before the thread starts: a first import inside it could deadlock with the caller's imports
        import safetensors  # noqa: F401

        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self._states: dict[Path, dict[str, Tensor]] = {}
        jobs = []
        for spec in dict.fromkeys(specs):
            folder = _local_diffusers_folder(spec)
            for part in self.COMPONENTS if folder is not None else ():
                with contextlib.suppress(InputError):  # an unreadable index: the loader reports it
                    files = _safetensors_files(folder / part)
                    if files:
                        jobs.append(((folder / part).resolve(), files))
        self._thread = threading.Thread(target=self._read, args=(jobs,), name="recon-weight-prefetch", daemon=True)
        self._thread.start()

    def _read(self, jobs: list[tuple[Path, list[Path]]]) -> None:
        for folder, files in jobs:
            with contextlib.suppress(Exception):  # whatever fails here, the loader reads again and reports
                self._states[folder] = read_safetensors(files, self.device, self.dtype)

    def take(self, folder: Path, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor] | None:
        """The tensors read for component ``folder`` if read for ``device`` and ``dtype`` (waits for the reading to
        end); each component is handed out once. None where it was not read."""
        self._thread.join()
        if torch.device(device) != self.device or dtype != self.dtype:
            return None
        return self._states.pop(folder.resolve(), None)


def _take(prefetched: WeightPrefetch | None, folder: Path, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor] | None:
    return prefetched.take(folder, device, dtype) if prefetched is not None else None


def _local_path(spec: str) -> Path:
    """The local path a weight spec names: the shipped prior's folder for ``tiny``, else the spec (``~`` expanded)."""
    return shipped_prior_path() if spec == SHIPPED_SPEC else Path(spec).expanduser()


def _local_diffusers_folder(spec: str) -> Path | None:
    """The local diffusers folder ``spec`` names (``tiny`` or a path), found without looking anywhere else; or None."""
    path = _local_path(spec)
    return path if (path / "model_index.json").is_file() else None


def load_component(
    folder: Path, cls: Any, device: torch.device | str, dtype: torch.dtype, build: Callable[[], nn.Module] | None = None,
    state: dict[str, Tensor] | None = None,
) -> nn.Module:
    """A diffusers / transformers model of class ``cls`` from its sub-folder, on ``device`` in ``dtype``.

    safetensors weights: the module is built on the meta device from
    ``config.json`` (or by ``build``) and its parameters are the loaded tensors
    themselves (memory-mapped, cast tensor by tensor; ``state``: those tensors
    already read, e.g. by a :class:`WeightPrefetch`). ``.bin`` weights, or
    key names of an older library version, go through ``cls.from_pretrained``
    (``weights_only`` loading) and are moved afterwards.
    """
    files = _safetensors_files(folder)
    if files:
        with torch.device("meta"):
            module = build() if build is not None else cls.from_config(cls.load_config(folder))
        try:
            _assign(module, state if state is not None else read_safetensors(files, device, dtype), folder, cls.__name__, dtype, device)
            return module
        except _LayoutMismatch:
            pass
    kwargs = {"dtype": dtype} if cls.__module__.startswith("transformers") else {"torch_dtype": dtype}
    try:
        return cls.from_pretrained(folder, **kwargs).to(device)
    except (OSError, ValueError) as exc:  # a damaged file, or a pickle .bin that weights_only loading refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{folder}: cannot load the {cls.__name__} weights ({first}); re-download the folder, or convert "
            "pickle .bin weights to .safetensors"
        ) from exc


def _load_image_encoder(
    folder: Path | None,
    override: str | os.PathLike[str] | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prefetched: WeightPrefetch | None = None,
) -> nn.Module:
    """The CLIP vision tower from ``override``, else from ``folder``'s image_encoder/ (the tensors ``prefetched``
    has read where it has)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    candidates = []
    if override is not None:
        override = Path(override).expanduser()
        candidates += [override / "image_encoder", override]
    if folder is not None:
        candidates.append(folder / "image_encoder")
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            config = CLIPVisionConfig.from_pretrained(candidate)
            state = _take(prefetched, candidate, device, dtype)
            return load_component(candidate, CLIPVisionModelWithProjection, device, dtype, lambda c=config: CLIPVisionModelWithProjection(c), state)
    where = ", ".join(str(c) for c in candidates) or "nowhere"
    raise WeightsNotFoundError(
        f"no CLIP image encoder found (looked in {where}); pass image_encoder= / --image-encoder a diffusers "
        f"Zero-1-to-3 folder whose image_encoder/ holds CLIPVisionModelWithProjection weights"
    )


def load_projection(folder: Path) -> nn.Linear:
    """The camera projection Linear from a ``cc_projection`` / ``clip_camera_projection`` folder.

    Accepts a diffusers-saved module (config.json + diffusion_pytorch_model.*)
    or a plain state dict of one Linear, whatever its key prefix.
    """
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            state = read_state_dict(folder / name)
            break
    else:
        raise InputError(f"{folder}: no weights file (expected one of {', '.join(WEIGHT_FILES)})")
    weights = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if len(weights) != 1:
        raise InputError(f"{folder}: expected the weights of one Linear layer, found 2-d tensors {weights}")
    weight = state[weights[0]]
    bias = state.get(weights[0][: -len("weight")] + "bias")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _save_projection(linear: nn.Linear, folder: Path, layout: str, safe_serialization: bool) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if layout == "cc_projection":
        config = {"_class_name": "CCProjection", "in_channel": linear.in_features, "out_channel": linear.out_features}
        prefix = "projection"
    else:
        config = {"_class_name": "CLIPCameraProjection", "embedding_dim": linear.out_features, "additional_embeddings": linear.in_features - linear.out_features}
        prefix = "proj"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in linear.state_dict().items()}
    if safe_serialization:
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")


# ------------------------------------------------------------ state dict files
def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file, or of a torch file, on the CPU (memory-mapped where the format allows).

    Torch files are read with ``torch.load(weights_only=True)``; a zip-format
    file it refuses (a Lightning checkpoint holding callbacks, hyper-parameter
    or optimiser objects) is read with :func:`recon.guidance.lightning.read_torch_zip`,
    which builds only tensors and plain containers: nothing in the file runs.
    A top-level "state_dict" entry is unwrapped.
    """
    import pickle
    import zipfile

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return read_safetensors([path])
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):
            raise InputError(
                f"{path}: refused to load: a legacy (non-zip) torch file holding Python objects beyond tensors; "
                f"re-save its state_dict with torch.save or convert it to .safetensors"
            ) from None
        obj = _read_restricted(path)
    except RuntimeError as exc:
        # Legacy (non-zip) torch files cannot be memory-mapped.
        if "mmap" not in str(exc):
            raise InputError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from exc
        obj = _torch_load_plain(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _read_restricted(path: Path) -> Any:
    """:func:`read_torch_zip`, logging which objects were left unbuilt."""
    from recon.guidance.lightning import read_torch_zip
    from recon.progress import info

    obj, replaced = read_torch_zip(path)
    names = ", ".join(sorted(replaced)[:4]) + (" ..." if len(replaced) > 4 else "")
    info(f"{path}: holds Python objects beyond tensors ({names}); read with the restricted unpickler, which left them unbuilt")
    return obj


def _torch_load_plain(path: Path) -> Any:
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path}: refused to load: a legacy (non-zip) torch file holding Python objects beyond tensors; "
            f"re-save its state_dict with torch.save or convert it to .safetensors"
        ) from exc
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from exc


# ----------------------------------------------------- latent-diffusion layout
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_PROJECTION = "cc_projection."
LDM_CLIP_PREFIXES = ("cond_stage_model.model.visual.", "cond_stage_model.visual.")


def ema_key(unet_key: str) -> str:
    """LitEma's flat name of a ``model.diffusion_model.*`` key: dots removed after ``model.``."""
    return "model_ema." + unet_key.removeprefix("model.").replace(".", "")


def load_ldm_checkpoint(
    path: str | os.PathLike[str],
    pose_encoding: PoseEncoding | None = None,
    image_encoder: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Zero123Model:
    """A Zero123Model (weights on ``device`` in ``dtype``) from an original latent-diffusion checkpoint (.ckpt or .safetensors).

    The file is memory-mapped; only the tensors used are read, each cast and
    placed on ``device`` into modules built on the meta device. The UNet and
    VAE go through diffusers' single-file converters; the OpenAI CLIP vision
    tower is converted here (or taken from ``image_encoder``). The EMA UNet
    weights are used when the checkpoint has a complete EMA copy.
    ``pose_encoding`` None = decided from the file's name.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    path = Path(path)
    device = torch.device(device)
    state = read_state_dict(path)
    unet_keys = [k for k in state if k.startswith(LDM_UNET)]
    conv_in = state.get(LDM_UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise InputError(f"{path}: not a latent-diffusion Zero-1-to-3 checkpoint (no {LDM_UNET}input_blocks.0.0.weight)")
    if conv_in.shape[1] != 8:
        raise InputError(f"{path}: the UNet takes {conv_in.shape[1]} input channels; a Zero-1-to-3 UNet takes 8")
    clip_prefix = next((p for p in LDM_CLIP_PREFIXES if p + "conv1.weight" in state), None)
    encoder = None
    if image_encoder is not None:
        encoder = _load_image_encoder(None, image_encoder, dtype, device)
    elif clip_prefix is None:
        raise WeightsNotFoundError(
            f"{path}: has no CLIP vision tower (cond_stage_model.*); pass --image-encoder a diffusers Zero-1-to-3 folder"
        )
    clip_width = encoder.config.hidden_size if encoder is not None else state[clip_prefix + "conv1.weight"].shape[0]
    arch_name = match_architecture(conv_in.shape[0], clip_width)
    if arch_name is None:
        raise InputError(f"{path}: unknown network size (UNet width {conv_in.shape[0]}, CLIP width {clip_width})")
    arch = architecture(arch_name)

    ema_missing = [k for k in unet_keys if ema_key(k) not in state]
    use_ema = len(ema_missing) == 0
    unet_state = {k: (state[ema_key(k)] if use_ema else state[k]) for k in unet_keys}

    def assign(module: nn.Module, converted: dict[str, Tensor], what: str) -> None:
        try:
            _assign(module, converted, path, what, dtype, device)
        except _LayoutMismatch as exc:
            raise InputError(str(exc)) from None

    # This layout comes from the original latent-diffusion code, which has no pose embedding (POSE_EMBEDDING).
    unet_config = {k: v for k, v in arch["unet"].items() if k not in POSE_EMBEDDING}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**arch["vae"])
    assign(unet, convert_ldm_unet_checkpoint(unet_state, unet_config), "UNet (model.diffusion_model.*)")
    del unet_state
    assign(vae, convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_VAE)}, dict(arch["vae"])), "VAE (first_stage_model.*)")
    if encoder is None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        with torch.device("meta"):
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**arch["image_encoder"]))
        assign(encoder, convert_openai_clip_vision(state, clip_prefix), f"CLIP vision tower ({clip_prefix}*)")

    if LDM_PROJECTION + "weight" not in state:
        raise InputError(f"{path}: no camera projection (cc_projection.weight)")
    weight, bias = state[LDM_PROJECTION + "weight"], state.get(LDM_PROJECTION + "bias")
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        projection.weight.copy_(weight)
        if bias is not None:
            projection.bias.copy_(bias)
    source = "EMA weights" if use_ema else ("non-EMA weights: EMA copy incomplete" if any(k.startswith("model_ema.") for k in state) else "no EMA copy")
    encoding = pose_encoding or decide_pose_encoding(path.name)[0]
    return Zero123Model(unet, vae, encoder, projection, make_scheduler(), encoding, False, f"latent-diffusion checkpoint {path} ({source})")


class _LayoutMismatch(Exception):
    """A state dict whose keys or shapes do not match the module (message names file and key)."""


def _assign(
    module: nn.Module, state: dict[str, Tensor], path: Path, what: str, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> None:
    """Loads ``state`` into a meta-device ``module`` exactly (every key present, no extra ones, same shapes),
    each tensor cast to ``dtype`` and moved to ``device`` (no copy when it is there already)."""
    device = torch.device(device)
    expected = module.state_dict()
    # Older transformers saved the non-persistent position_ids buffer: not a weight.
    state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in expected)}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise _LayoutMismatch(f"{path}: {what} does not match the network: missing {missing[:3]}, unexpected {extra[:3]} ...")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise _LayoutMismatch(f"{path}: {what} key {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    for key in list(state):
        state[key] = state[key].to(device=device, dtype=dtype).contiguous()
    module.load_state_dict(state, assign=True)
    # Buffers that are not in the state dict (non-persistent) stay on meta: rebuild them.
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            leaf = name.rpartition(".")[2]
            if leaf == "position_ids":
                owner.register_buffer(leaf, torch.arange(buffer.shape[-1], device=device).expand(buffer.shape), persistent=False)
            else:
                raise InputError(f"{path}: cannot initialise buffer {name} of the {what}")


def convert_openai_clip_vision(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """OpenAI CLIP ``visual.*`` tensors (under ``prefix``) -> transformers CLIPVisionModelWithProjection keys.

    ``attn.in_proj_weight`` (3W, W) splits into q/k/v; ``proj`` (W, P) becomes
    ``visual_projection.weight`` (P, W).
    """
    out: dict[str, Tensor] = {
        "vision_model.embeddings.class_embedding": state[prefix + "class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state[prefix + "positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state[prefix + "conv1.weight"],
        "vision_model.pre_layrnorm.weight": state[prefix + "ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state[prefix + "ln_pre.bias"],
        "vision_model.post_layernorm.weight": state[prefix + "ln_post.weight"],
        "vision_model.post_layernorm.bias": state[prefix + "ln_post.bias"],
        "visual_projection.weight": state[prefix + "proj"].t(),
    }
    renames = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key, value in state.items():
        match = block.match(key)
        if not match:
            continue
        index, rest = match.groups()
        target = f"vision_model.encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rpartition("_")[2]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{target}self_attn.{name}.{kind}"] = part
            continue
        module, _, param = rest.rpartition(".")
        if module not in renames:
            raise InputError(f"unexpected CLIP key {key}")
        out[f"{target}{renames[module]}.{param}"] = value
    return out
