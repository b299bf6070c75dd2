"""Issue 14: pose encoding decided from the weights' own name / config / metadata, Stable-Zero123's recipe,
the input camera's elevation, Lightning checkpoints read without running their objects, convert-weights,
direct-to-dtype safetensors loading and hub downloads (faked: no test touches the network)."""

from __future__ import annotations

import json
import math
import pickle
import threading
from pathlib import Path

import pytest
import torch
from guidance_fixtures import guided, ldm_state_dict, save_ldm_checkpoint, save_tiny_diffusers, tiny_images, tiny_model
from safetensors import safe_open

from recon.errors import InputError
from recon.guidance import checkpoints
from recon.guidance.checkpoints import RECON_META, WeightPrefetch, decide_pose_encoding, load_zero123, read_state_dict
from recon.guidance.config import GuidanceConfig, timestep_schedules
from recon.guidance.interface import Zero123Guidance, make_guidance
from recon.guidance.lightning import Opaque, read_torch_zip
from recon.preprocess import ReferenceView

STABLE_MIN, STABLE_MAX = [50, 0.7, 0.3, 200], [50, 0.98, 0.8, 200]


def published_folder(model, folder: Path, layout: str) -> Path:
    """A diffusers folder as published on the hub: no recon metadata file."""
    save_tiny_diffusers(model, folder, layout)
    (folder / RECON_META).unlink()
    return folder


# ------------------------------------------------------------------ pose encoding
@pytest.mark.parametrize("layout", ["cc_projection", "clip_camera_projection"])
def test_pose_encoding_comes_from_the_folder_own_name_never_a_parent(tmp_path, model, capsys, layout):
    plain = published_folder(model, tmp_path / "stable-diffusion-models" / "zero123-xl", layout)
    assert load_zero123(plain).pose_encoding == "zero123"
    assert "pose encoding zero123" in capsys.readouterr().err
    stable = published_folder(model, tmp_path / "models" / "stable-zero123", layout)
    assert load_zero123(stable).pose_encoding == "stable-zero123"
    log = " ".join(capsys.readouterr().err.split())
    assert "pose encoding stable-zero123 (the name 'stable-zero123' says Stable-Zero123)" in log
    assert load_zero123(stable, pose_encoding="zero123").pose_encoding == "zero123"
    assert "set by guidance.pose_encoding" in " ".join(capsys.readouterr().err.split())


def test_pose_encoding_from_metadata_and_config(tmp_path, model):
    folder = published_folder(model, tmp_path / "weights", "cc_projection")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(dict(unet_config, _name_or_path="ashawkey/stable-zero123-diffusers")))
    assert load_zero123(folder).pose_encoding == "stable-zero123"
    # Our metadata file wins over the config, and survives a rename.
    (folder / RECON_META).write_text(json.dumps({"pose_encoding": "zero123"}))
    renamed = folder.rename(tmp_path / "stable-zero123-copy")
    assert load_zero123(renamed).pose_encoding == "zero123"


def test_decide_pose_encoding_rules():
    assert decide_pose_encoding("stable_zero123.ckpt")[0] == "stable-zero123"
    assert decide_pose_encoding("StableZero123")[0] == "stable-zero123"
    assert decide_pose_encoding("stable-diffusion-v1-5")[0] == "zero123"
    assert decide_pose_encoding("zero123-xl.ckpt") == ("zero123", decide_pose_encoding("zero123-xl.ckpt")[1])
    with pytest.raises(InputError, match="pose encoding 'polar'"):
        decide_pose_encoding("x", "polar")


def test_guidance_config_pose_encoding_reaches_the_loader(tmp_path, model):
    folder = published_folder(model, tmp_path / "stable-zero123", "cc_projection")
    assert make_guidance(GuidanceConfig(model=str(folder)), "cpu").model.pose_encoding == "stable-zero123"
    forced = make_guidance(GuidanceConfig(model=str(folder), pose_encoding="zero123"), "cpu")
    assert forced.model.pose_encoding == "zero123"
    with pytest.raises(Exception, match="pose_encoding"):
        GuidanceConfig(pose_encoding="polar")


# ------------------------------------------------------------------ recipe
def test_stable_recipe_is_picked_when_stable_weights_load(tmp_path, model, capsys):
    folder = published_folder(model, tmp_path / "stable-zero123", "clip_camera_projection")
    guidance = make_guidance(GuidanceConfig(model=str(folder)), "cpu")
    assert (guidance.min_step_percent, guidance.max_step_percent) == (STABLE_MIN, STABLE_MAX)
    assert "Stable-Zero123's recipe" in " ".join(capsys.readouterr().err.split())
    plain = make_guidance(GuidanceConfig(model=str(published_folder(model, tmp_path / "zero123-xl", "cc_projection"))), "cpu")
    assert (plain.min_step_percent, plain.max_step_percent) == ([0, 0.4, 0.2, 200], [0, 0.85, 0.5, 200])


def test_stable_recipe_follows_the_preset_ramp_and_keeps_user_schedules():
    fast = GuidanceConfig(min_step_percent=[0, 0.4, 0.2, 100], max_step_percent=[0, 0.85, 0.5, 100])
    assert timestep_schedules(fast, "stable-zero123")[:2] == ([25, 0.7, 0.3, 100], [25, 0.98, 0.8, 100])
    user = GuidanceConfig(min_step_percent=0.3, max_step_percent=[0, 0.9, 0.6, 100])
    assert timestep_schedules(user, "stable-zero123")[:2] == (0.3, [0, 0.9, 0.6, 100])
    pinned = GuidanceConfig(timestep_recipe="config")
    assert timestep_schedules(pinned, "stable-zero123")[:2] == ([0, 0.4, 0.2, 200], [0, 0.85, 0.5, 200])


def test_sds_draws_timesteps_from_the_stable_range(model):
    stable = tiny_model(seed=0, pose_encoding="stable-zero123")
    guidance = Zero123Guidance(GuidanceConfig(model="random-tiny"), stable)
    guidance.prepare(reference(0.0))
    out = guidance.sds(tiny_images(2, seed=1), torch.tensor([10.0, 20.0]), torch.tensor([30.0, 60.0]), torch.tensor([3.8, 3.8]), 0)
    assert (out.diagnostics["sds_min_step"], out.diagnostics["sds_max_step"]) == (700, 980)


def test_stable_zero123_preset():
    from recon.api import build_config

    cfg = build_config("stable-zero123", elevation=5)
    assert cfg.guidance.pose_encoding == "stable-zero123" and cfg.guidance.timestep_recipe == "config"
    assert (cfg.guidance.min_step_percent, cfg.guidance.max_step_percent) == (STABLE_MIN, STABLE_MAX)
    assert cfg.cameras.reference_elevation_deg == 5.0


# ------------------------------------------------------------------ elevation
def reference(elevation: float, size: int = 48) -> ReferenceView:
    rgb = tiny_images(1, size, seed=3)[0]
    return ReferenceView(torch.cat([rgb, torch.ones(1, size, size)]), Path("ref.png"), elevation, 0.0, 3.8)


def recorded_poses(guidance: Zero123Guidance, monkeypatch, target) -> torch.Tensor:
    seen = []
    original = guidance.model.context
    monkeypatch.setattr(guidance.model, "context", lambda embeds, poses: seen.append(poses) or original(embeds, poses))
    guidance.context(target)
    return seen[-1]


@pytest.mark.parametrize("encoding", ["zero123", "stable-zero123"])
def test_elevation_changes_the_pose_vectors(monkeypatch, encoding):
    net = tiny_model(seed=0, pose_encoding=encoding)
    target = (torch.tensor([30.0]), torch.tensor([90.0]), torch.tensor([3.8]))
    poses = {}
    for elevation in (0.0, 5.0):
        guidance = Zero123Guidance(GuidanceConfig(model="random-tiny"), net)
        guidance.prepare(reference(elevation))
        poses[elevation] = recorded_poses(guidance, monkeypatch, target)[0]
    assert poses[5.0][0].item() == pytest.approx(math.radians(-25.0))
    assert poses[0.0][0].item() == pytest.approx(math.radians(-30.0))
    if encoding == "stable-zero123":
        assert poses[5.0][3].item() == pytest.approx(math.radians(85.0))
        assert poses[0.0][3].item() == pytest.approx(math.radians(90.0))
    else:
        assert poses[5.0][3].item() == poses[0.0][3].item() == 0.0


def test_elevation_moves_the_cascade_nearby_views():
    cfg = GuidanceConfig(model="random-tiny", mode="cascade-training-free", nearby_steps=1)
    guidance = Zero123Guidance(cfg, tiny_model(seed=0))
    guidance.prepare(reference(5.0))
    assert guidance.nearby_views.elevation_deg.tolist() == [5.0, 5.0, 35.0]


def test_elevation_flag_reaches_the_reference_view(tmp_path, monkeypatch):
    from recon.api import build_config, load_reference_png
    from recon.cli.main import main

    assert build_config("cpu").cameras.reference_elevation_deg == 0.0
    assert build_config("cpu", ["cameras.reference_elevation_deg=3"], elevation=7.5).cameras.reference_elevation_deg == 7.5
    reference(0.0).save(tmp_path / "input_rgba.png")
    assert load_reference_png(tmp_path / "input_rgba.png", 7.5).elevation_deg == 7.5
    seen = {}
    monkeypatch.setattr("recon.api.fit", lambda images, **kwargs: seen.update(kwargs) or [])
    assert main(["fit", str(tmp_path / "input_rgba.png"), "--elevation", "5"]) == 0
    assert seen["elevation"] == 5.0


# ------------------------------------------------------------------ Lightning checkpoints
class WritesOnUnpickle:
    """Unpickling this creates ``marker`` through __reduce__ (a callable the file names)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "reduce ran"))


class WritesOnSetState:
    """Unpickling this creates ``marker`` through __setstate__ (the class's own code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        Path(state["marker"]).write_text("setstate ran")


def lightning_checkpoint(model, path: Path, marker: Path, ema=None) -> Path:
    """A Lightning-style .ckpt: state_dict plus callbacks, hyper-parameters and optimiser state objects."""
    torch.save(
        {
            "epoch": 3,
            "global_step": 105000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": ldm_state_dict(model, ema_unet=ema),
            "callbacks": {"ModelCheckpoint": WritesOnUnpickle(marker)},
            "hyper_parameters": {"cfg": WritesOnSetState(marker), "names": {"a", "b"}, "blob": b"\x00\xff"},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
        },
        path,
    )
    return path


def test_malicious_lightning_checkpoint_loads_without_running_anything(tmp_path, model, probe):
    marker = tmp_path / "pwned"
    path = lightning_checkpoint(model, tmp_path / "105000.ckpt", marker, ema=model.unet)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what used to stop users
    loaded = load_zero123(path)
    assert not marker.exists()
    torch.testing.assert_close(guided(loaded, probe), guided(model, probe), atol=0, rtol=0)
    # The test is not vacuous: a full unpickle of the same file runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_restricted_reader_builds_tensors_and_plain_values_only(tmp_path, model):
    marker = tmp_path / "pwned"
    path = lightning_checkpoint(model, tmp_path / "x.ckpt", marker)
    obj, replaced = read_torch_zip(path)
    assert not marker.exists()
    assert isinstance(obj["callbacks"]["ModelCheckpoint"], Opaque) and isinstance(obj["hyper_parameters"]["cfg"], Opaque)
    assert obj["hyper_parameters"]["names"] == {"a", "b"} and obj["hyper_parameters"]["blob"] == b"\x00\xff"
    assert obj["global_step"] == 105000 and obj["optimizer_states"][0]["param_groups"] == [{"lr": 1e-4}]
    assert sum(replaced.values()) >= 2
    clean = torch.load(path, weights_only=False)["state_dict"]
    assert set(obj["state_dict"]) == set(clean)
    for key, value in clean.items():
        assert obj["state_dict"][key].dtype == value.dtype and torch.equal(obj["state_dict"][key], value), key


def test_restricted_reader_keeps_views_and_dtypes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"view": base[1:, ::2], "half": base.half().t(), "bf16": base.bfloat16(), "long": torch.arange(5), "param": torch.nn.Parameter(base)}
    torch.save({"state_dict": tensors}, tmp_path / "t.ckpt")
    obj, _ = read_torch_zip(tmp_path / "t.ckpt")
    for key, value in tensors.items():
        got = obj["state_dict"][key]
        assert got.dtype == value.dtype and got.shape == value.shape and got.stride() == value.stride()
        assert torch.equal(got, value.detach()), key
    assert set(read_state_dict(tmp_path / "t.ckpt")) == set(tensors)


def test_restricted_reader_refuses_non_archives(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError, match="bad.ckpt"):
        read_torch_zip(tmp_path / "bad.ckpt")


# ------------------------------------------------------------------ convert-weights
def test_convert_weights_round_trip_gives_the_same_eps(tmp_path, model, probe):
    from recon.cli.main import main

    marker = tmp_path / "pwned"
    source = lightning_checkpoint(model, tmp_path / "stable_zero123.ckpt", marker, ema=model.unet)
    out = tmp_path / "converted"
    assert main(["convert-weights", str(source), str(out), "--dtype", "fp32"]) == 0
    assert not marker.exists()
    meta = json.loads((out / RECON_META).read_text())
    assert meta["pose_encoding"] == "stable-zero123" and meta["dtype"] == "fp32" and meta["converted_from"] == str(source)
    assert not list(out.rglob("*.bin")) and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    original, converted = load_zero123(source), load_zero123(out.rename(tmp_path / "renamed"))
    assert converted.pose_encoding == "stable-zero123"
    torch.testing.assert_close(guided(converted, probe), guided(original, probe), atol=0, rtol=0)


def test_convert_weights_defaults_to_fp16(tmp_path, model):
    from recon.guidance.convert import convert_weights

    source = save_ldm_checkpoint(model, tmp_path / "zero123-xl.ckpt")
    out = convert_weights(source, tmp_path / "half")
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}  # noqa: SIM118
    loaded = load_zero123(out, "cpu", torch.float32)
    for key, value in model.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value.half().float(), atol=0, rtol=0)
    with pytest.raises(InputError, match="not empty"):
        convert_weights(source, out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="recon did not write"):
        convert_weights(source, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert convert_weights(source, out, overwrite=True) == out


# ------------------------------------------------------------------ loading path
def test_safetensors_folder_loads_straight_into_the_target_dtype(tmp_path, model, monkeypatch):
    """No from_pretrained (which would build the module, maybe randomly initialised, then overwrite it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    folder = save_tiny_diffusers(model, tmp_path / "zero123")
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPVisionModelWithProjection):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("from_pretrained called")))
    loaded = load_zero123(folder, "cpu", torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    for key, value in model.vae.state_dict().items():
        torch.testing.assert_close(loaded.vae.state_dict()[key], value.bfloat16(), atol=0, rtol=0)


def test_bin_folder_still_loads_through_from_pretrained(tmp_path, model, probe):
    folder = save_tiny_diffusers(model, tmp_path / "old", safe=False)
    torch.testing.assert_close(guided(load_zero123(folder), probe), guided(model, probe), atol=0, rtol=0)


# ------------------------------------------------------------------ hub ids (faked)
def test_hub_id_downloads_with_progress_and_names_the_encoding(tmp_path, model, monkeypatch, capsys):
    import huggingface_hub

    snapshot = published_folder(model, tmp_path / "hub" / "snapshots" / "0123abcd", "clip_camera_projection")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs, huggingface_hub.utils.are_progress_bars_disabled()))
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(checkpoints, "_hf_offline", lambda: False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    huggingface_hub.utils.disable_progress_bars()
    loaded = load_zero123("ashawkey/stable-zero123-diffusers")
    assert [c[1].get("local_files_only", False) for c in calls] == [True, False]
    assert calls[1][2] is False  # progress bars on while downloading
    assert loaded.pose_encoding == "stable-zero123"  # from the repo's name, not the snapshot folder's hash
    assert "downloading ashawkey/stable-zero123-diffusers" in " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------ reading weights while the libraries import
def recorded_reads(monkeypatch) -> list[tuple[str, str]]:
    """(thread name, component folder name) of every read_safetensors call from now on for the unet, vae and
    image_encoder (the camera projection, a few KB, is not prefetched)."""
    calls: list[tuple[str, str]] = []
    real = checkpoints.read_safetensors

    def recording(files, *args, **kwargs):
        if Path(files[0]).parent.name in WeightPrefetch.COMPONENTS:
            calls.append((threading.current_thread().name, Path(files[0]).parent.name))
        return real(files, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "read_safetensors", recording)
    return calls


def test_prefetched_weights_are_the_ones_loaded(tmp_path, model, probe, monkeypatch):
    folder = save_tiny_diffusers(model, tmp_path / "zero123")
    calls = recorded_reads(monkeypatch)
    prefetched = WeightPrefetch([str(folder), str(folder)], "cpu", torch.float32)
    loaded = load_zero123(folder, "cpu", torch.float32, prefetched=prefetched)
    # the three large components were read once, in the background thread; the loader read none of them again
    assert sorted(calls) == [("recon-weight-prefetch", p) for p in ("image_encoder", "unet", "vae")]
    torch.testing.assert_close(guided(loaded, probe), guided(model, probe), atol=0, rtol=0)
    assert prefetched.take(folder / "unet", "cpu", torch.float32) is None  # handed out once


def test_prefetch_in_another_dtype_is_not_used(tmp_path, model, monkeypatch):
    folder = save_tiny_diffusers(model, tmp_path / "zero123")
    prefetched = WeightPrefetch([str(folder)], "cpu", torch.float32)
    calls = recorded_reads(monkeypatch)
    loaded = load_zero123(folder, "cpu", torch.bfloat16, prefetched=prefetched)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert sorted(name for thread, name in calls if thread == "MainThread") == ["image_encoder", "unet", "vae"]


def test_a_damaged_file_is_reported_by_the_loader_as_without_prefetch(tmp_path, model):
    folder = save_tiny_diffusers(model, tmp_path / "zero123")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    prefetched = WeightPrefetch([str(folder)], "cpu", torch.float32)
    with pytest.raises(InputError, match=r"unet[/\\]diffusion_pytorch_model.safetensors: not a readable safetensors file"):
        load_zero123(folder, "cpu", torch.float32, prefetched=prefetched)


def test_prefetch_reads_only_local_folders_and_never_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_hub_snapshot", lambda *a: pytest.fail("the prefetch looked at the hub"))
    calls = recorded_reads(monkeypatch)
    prefetched = WeightPrefetch(["owner/name", "random-tiny", str(tmp_path / "missing"), str(tmp_path)], "cpu")
    assert prefetched.take(tmp_path / "unet", "cpu", torch.float32) is None
    assert calls == []


def fit_models_reads(device: str, monkeypatch) -> list[tuple[str, str]]:
    """The reads of the shipped prior's weights as ``recon fit`` loads them on ``device``."""
    from recon.api import Models, build_config
    from recon.progress import PhaseTimer

    calls = recorded_reads(monkeypatch)
    guidance = Models(torch.device(device)).get(build_config("cpu"), PhaseTimer())
    assert not guidance.base.is_random
    return calls


def test_fit_models_read_on_the_cpu_in_the_main_thread(monkeypatch):
    """Memory-mapped on the CPU: nothing to overlap, so no thread."""
    assert sorted(fit_models_reads("cpu", monkeypatch)) == [("MainThread", p) for p in ("image_encoder", "unet", "vae")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_models_read_on_cuda_in_the_background(monkeypatch):
    assert sorted(fit_models_reads("cuda", monkeypatch)) == [("recon-weight-prefetch", p) for p in ("image_encoder", "unet", "vae")]
