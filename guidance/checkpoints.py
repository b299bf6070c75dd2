"""Finding and loading Zero-1-to-3 weights in every layout a user may point us at.

``load_zero123(spec)`` accepts:

* ``random-tiny`` / ``random-full``: untrained weights (seeded), marked ``is_random``;
* ``tiny``: the small prior shipped inside the package (``recon/assets/tiny-zero123``);
* a diffusers folder (``model_index.json``) whose camera projection folder is
  ``cc_projection`` (kxic/zero123-xl-diffusers) or ``clip_camera_projection``
  (bennyguo/ashawkey zero123-xl-diffusers, ashawkey/stable-zero123-diffusers);
* an original latent-diffusion checkpoint (``.ckpt`` read with
  ``torch.load(weights_only=True)``, or ``.safetensors``): ``model.diffusion_model.*``
  (EMA copy ``model_ema.*`` preferred), ``first_stage_model.*``,
  ``cond_stage_model.*`` (OpenAI CLIP vision tower), ``cc_projection.*``;
* a Hugging Face hub id (``owner/name``): the local HF cache first, the hub
  when online.

Nothing is ever unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from recon.guidance.architectures import (
    architecture,
    build_components,
    match_architecture,
)
from recon.guidance.model import (
    PoseEncoding,
    Zero123Model,
    default_dtype,
    make_scheduler,
)
from torch import Tensor, nn

from recon.errors import InputError, WeightsNotFoundError

RANDOM_SPECS = ("random-tiny", "random-full")
SHIPPED_SPEC = "tiny"
# Projection sub-folder names of the two published diffusers layouts.
PROJECTION_FOLDERS = ("cc_projection", "clip_camera_projection")
# Our own sidecar in folders written by save_diffusers.
RECON_META = "recon_zero123.json"
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
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
) -> Zero123Model:
    """Resolves ``spec`` (see module docs) and returns the model on ``device`` in eval mode, frozen.

    ``dtype`` defaults to fp16 on CUDA and fp32 on the CPU. ``pose_encoding``
    defaults to what the folder records, else "stable-zero123" when the name
    says "stable", else "zero123". ``image_encoder``: a diffusers folder (or
    its ``image_encoder`` sub-folder) to take the CLIP tower from when the
    checkpoint lacks one. ``seed`` only affects ``random-*`` specs.
    """
    spec_str = str(spec)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    with _quiet_libraries():
        if spec_str in RANDOM_SPECS:
            model = random_model(spec_str.removeprefix("random-"), seed=seed, pose_encoding=pose_encoding or "zero123")
        else:
            model = _load_weights(spec_str, pose_encoding, image_encoder, dtype)
    model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
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


def save_diffusers(
    model: Zero123Model,
    folder: str | os.PathLike[str],
    projection_folder: str = "cc_projection",
    safe_serialization: bool = True,
    overwrite: bool = False,
) -> Path:
    """Writes ``model`` as a diffusers folder that :func:`load_zero123` (and the published pipelines) read.

    ``projection_folder``: "cc_projection" (CCProjection, key ``projection.*``)
    or "clip_camera_projection" (CLIPCameraProjection, key ``proj.*``). The
    folder is written beside its final name and renamed into place at the end.
    """
    from transformers import CLIPImageProcessor

    if projection_folder not in PROJECTION_FOLDERS:
        raise ValueError(f"projection_folder must be one of {PROJECTION_FOLDERS}")
    if not model.has_decoder:
        raise ValueError("cannot save a model whose VAE decoder was dropped")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise InputError(f"{folder}: folder exists and is not empty (pass overwrite=True)")
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


def _load_weights(
    spec: str, pose_encoding: PoseEncoding | None, image_encoder: str | os.PathLike[str] | None, dtype: torch.dtype
) -> Zero123Model:
    looked: list[str] = []
    if spec == SHIPPED_SPEC:
        path = shipped_prior_path()
        if (path / "model_index.json").is_file():
            return _load_diffusers_folder(path, pose_encoding, image_encoder, "shipped tiny prior", dtype)
        raise WeightsNotFoundError(
            f"the shipped 'tiny' prior is not in this installation (looked in {path}); "
            f"use --model PATH for real Zero-1-to-3 weights ({HOW_TO_PROVIDE}), or --model random-tiny for a smoke test"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _load_diffusers_folder(path, pose_encoding, image_encoder, str(path), dtype)
        raise InputError(
            f"{path}: folder has no model_index.json; expected a diffusers Zero-1-to-3 folder "
            f"(unet/, vae/, image_encoder/, cc_projection/ or clip_camera_projection/) or pass a .ckpt/.safetensors file"
        )
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise InputError(f"{path}: not a checkpoint (expected {', '.join(CHECKPOINT_SUFFIXES)} or a diffusers folder)")
        return load_ldm_checkpoint(path, pose_encoding=pose_encoding, image_encoder=image_encoder, dtype=dtype)
    looked.append(f"local path {path.resolve()} (does not exist)")
    if HUB_ID.match(spec):
        folder = _hub_snapshot(spec, looked)
        if folder is not None:
            return _load_diffusers_folder(folder, pose_encoding, image_encoder, f"hub {spec} ({folder})", dtype)
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
    """The local folder of ``repo_id`` from the HF cache, or downloaded when online; ``None`` if neither."""
    from huggingface_hub import snapshot_download

    cache = _hf_cache_dir()
    patterns = ["*.json", "*.txt", "*.safetensors", "*.bin"]
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several unrelated types here
        looked.append(f"Hugging Face cache {cache} ({type(exc).__name__})")
    if _hf_offline():
        looked.append("Hugging Face hub (skipped: HF_HUB_OFFLINE is set)")
        return None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-repo errors all mean "not available"
        looked.append(f"Hugging Face hub {repo_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
        return None


def _guess_pose_encoding(name: str) -> PoseEncoding:
    return "stable-zero123" if "stable" in name.lower() else "zero123"


# ------------------------------------------------------------ diffusers folders
def _load_diffusers_folder(
    folder: Path,
    pose_encoding: PoseEncoding | None,
    image_encoder: str | os.PathLike[str] | None,
    origin: str,
    dtype: torch.dtype = torch.float32,
) -> Zero123Model:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for part in ("unet", "vae"):
        if not (folder / part / "config.json").is_file():
            raise InputError(f"{folder}: diffusers folder has no {part}/config.json")
    names = [n for n in PROJECTION_FOLDERS if n in index or (folder / n).is_dir()]
    if not names:
        raise InputError(f"{folder}: no camera projection folder (expected one of {', '.join(PROJECTION_FOLDERS)})")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    encoder = _load_image_encoder(folder, image_encoder, dtype)
    projection = load_projection(folder / names[0])
    meta: dict[str, Any] = {}
    if (folder / RECON_META).is_file():
        meta = json.loads((folder / RECON_META).read_text(encoding="utf-8"))
    encoding = pose_encoding or meta.get("pose_encoding") or _guess_pose_encoding(str(folder))
    is_random = bool(meta.get("is_random", False))
    description = f"diffusers folder {origin} ({names[0]})"
    if is_random:
        description = f"RANDOM WEIGHTS saved in {description}"
    return Zero123Model(unet, vae, encoder, projection, make_scheduler(), encoding, is_random, description)


def _load_image_encoder(folder: Path | None, override: str | os.PathLike[str] | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection

    candidates = []
    if override is not None:
        override = Path(override).expanduser()
        candidates += [override / "image_encoder", override]
    if folder is not None:
        candidates.append(folder / "image_encoder")
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return CLIPVisionModelWithProjection.from_pretrained(candidate, dtype=dtype)
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
    """Tensors of a .safetensors file, or of a torch file read with ``weights_only=True``.

    A torch file holding anything but tensors and plain containers is refused
    (InputError), never unpickled. A top-level "state_dict" entry is unwrapped.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        # Legacy (non-zip) torch files cannot be memory-mapped.
        if "mmap" not in str(exc):
            raise InputError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from exc
        obj = _torch_load_plain(path)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path}: refused to load: the file contains Python objects beyond tensors "
            f"(only weights_only=True loading is allowed; convert it to .safetensors)"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _torch_load_plain(path: Path) -> Any:
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refused to load: the file contains Python objects beyond tensors") from exc
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
) -> Zero123Model:
    """A Zero123Model (weights in ``dtype``, on the CPU) from an original latent-diffusion checkpoint (.ckpt or .safetensors).

    The UNet and VAE go through diffusers' single-file converters; the
    OpenAI CLIP vision tower is converted here (or taken from ``image_encoder``).
    The EMA UNet weights are used when the checkpoint has a complete EMA copy.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    path = Path(path)
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
        encoder = _load_image_encoder(None, image_encoder, dtype)
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
    unet_sd = convert_ldm_unet_checkpoint(unet_state, dict(arch["unet"]))
    vae_sd = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_VAE)}, dict(arch["vae"]))

    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
    _assign(unet, unet_sd, path, "UNet (model.diffusion_model.*)", dtype)
    _assign(vae, vae_sd, path, "VAE (first_stage_model.*)", dtype)
    if encoder is None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        with torch.device("meta"):
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**arch["image_encoder"]))
        _assign(encoder, convert_openai_clip_vision(state, clip_prefix), path, f"CLIP vision tower ({clip_prefix}*)", dtype)

    if LDM_PROJECTION + "weight" not in state:
        raise InputError(f"{path}: no camera projection (cc_projection.weight)")
    weight, bias = state[LDM_PROJECTION + "weight"], state.get(LDM_PROJECTION + "bias")
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        projection.weight.copy_(weight)
        if bias is not None:
            projection.bias.copy_(bias)
    source = "EMA weights" if use_ema else ("non-EMA weights: EMA copy incomplete" if any(k.startswith("model_ema.") for k in state) else "no EMA copy")
    encoding = pose_encoding or _guess_pose_encoding(path.name)
    return Zero123Model(unet, vae, encoder, projection, make_scheduler(), encoding, False, f"latent-diffusion checkpoint {path} ({source})")


def _assign(module: nn.Module, state: dict[str, Tensor], path: Path, what: str, dtype: torch.dtype) -> None:
    """Loads ``state`` into a meta-device ``module`` (no copy), exactly: every key present, no extra ones."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise InputError(f"{path}: {what} does not match the network: missing {missing[:3]}, unexpected {extra[:3]} ...")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise InputError(f"{path}: {what} key {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    module.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, assign=True)
    # Buffers that are not in the state dict (non-persistent) stay on meta: rebuild them.
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            leaf = name.rpartition(".")[2]
            if leaf == "position_ids":
                owner.register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
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
