"""load_zero123 on every on-disk layout (tiny random models saved by the tests), and its refusals."""

import json

import pytest
import torch
from guidance_fixtures import (
    guided,
    ldm_state_dict,
    save_ldm_checkpoint,
    save_tiny_diffusers,
    tiny_model,
)
from safetensors.torch import load_file

from recon.errors import InputError, WeightsNotFoundError
from recon.guidance import checkpoints
from recon.guidance.checkpoints import (
    ema_key,
    load_zero123,
    read_state_dict,
    save_diffusers,
)


def assert_same_weights(a, b):
    for name in ("unet", "vae", "image_encoder", "camera_projection"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=f"{name}.{key}")


@pytest.mark.parametrize(("layout", "safe", "prefix"), [("cc_projection", True, "projection"), ("clip_camera_projection", False, "proj")])
def test_diffusers_variants_load_with_identical_eps(tmp_path, model, probe, layout, safe, prefix):
    folder = save_tiny_diffusers(model, tmp_path / "zero123", layout, safe=safe)
    index = json.loads((folder / "model_index.json").read_text())
    assert layout in index and not (set(checkpoints.PROJECTION_FOLDERS) - {layout}) & set(index)
    config = json.loads((folder / layout / "config.json").read_text())
    assert config["_class_name"] == ("CCProjection" if layout == "cc_projection" else "CLIPCameraProjection")
    weights = next((folder / layout).glob("diffusion_pytorch_model.*"))
    assert set(read_state_dict(weights)) == {f"{prefix}.weight", f"{prefix}.bias"}
    loaded = load_zero123(folder, "cpu")
    assert loaded.dtype == torch.float32 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert_same_weights(model, loaded)
    torch.testing.assert_close(guided(loaded, probe), guided(model, probe), atol=0, rtol=0)


def test_projection_from_a_plain_linear_state_dict(tmp_path, model):
    folder = tmp_path / "cc_projection"
    folder.mkdir()
    torch.save({"weight": model.camera_projection.weight, "bias": model.camera_projection.bias}, folder / "pytorch_model.bin")
    linear = checkpoints.load_projection(folder)
    torch.testing.assert_close(linear.weight, model.camera_projection.weight)
    torch.testing.assert_close(linear.bias, model.camera_projection.bias)


def test_ldm_layout_uses_the_real_key_names(model):
    state = ldm_state_dict(model, ema_unet=model.unet)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of an up block without attention
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.out.2.weight",
        "model_ema.diffusion_modelinput_blocks00weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.model.visual.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.visual.proj",
        "cc_projection.weight",
    ):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    width = model.image_encoder.config.hidden_size
    assert state["cond_stage_model.model.visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_ldm_checkpoint_loads_with_identical_eps(tmp_path, model, probe, suffix):
    path = save_ldm_checkpoint(model, tmp_path / f"zero123-xl{suffix}")
    loaded = load_zero123(path, "cpu")
    assert_same_weights(model, loaded)
    assert loaded.pose_encoding == "zero123" and not loaded.is_random
    torch.testing.assert_close(guided(loaded, probe), guided(model, probe), atol=0, rtol=0)


def test_ldm_checkpoint_of_the_prior_size_loads_without_the_pose_embedding(tmp_path):
    # The shipped prior's architecture adds a pose embedding that latent-diffusion files never have.
    from recon.guidance.architectures import POSE_EMBEDDING, architecture, build_components
    from recon.guidance.model import Zero123Model

    arch = architecture("prior")
    arch["unet"] = {k: v for k, v in arch["unet"].items() if k not in POSE_EMBEDDING}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Zero123Model(**build_components(arch), pose_encoding="zero123")
    loaded = load_zero123(save_ldm_checkpoint(model, tmp_path / "prior.ckpt"), "cpu")
    assert not hasattr(loaded.unet, "add_embedding") or loaded.unet.add_embedding is None
    assert_same_weights(model, loaded)


def test_stable_zero123_name_selects_its_pose_encoding(tmp_path, model):
    path = save_ldm_checkpoint(model, tmp_path / "stable_zero123.ckpt")
    assert load_zero123(path).pose_encoding == "stable-zero123"
    assert load_zero123(path, pose_encoding="zero123").pose_encoding == "zero123"


def test_ema_weights_preferred(tmp_path, model, probe):
    ema = tiny_model(seed=1)
    path = save_ldm_checkpoint(model, tmp_path / "105000.ckpt", ema_unet=ema.unet)
    loaded = load_zero123(path)
    assert "EMA" in loaded.description
    for key, value in ema.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value, atol=0, rtol=0)
    # VAE / CLIP / projection still come from the main weights.
    torch.testing.assert_close(loaded.camera_projection.weight, model.camera_projection.weight)


def test_incomplete_ema_falls_back_to_the_trained_weights(tmp_path, model):
    state = ldm_state_dict(model, ema_unet=tiny_model(seed=1).unet)
    dropped = ema_key("model.diffusion_model.out.2.weight")
    del state[dropped]
    path = tmp_path / "partial.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    loaded = load_zero123(path)
    assert "EMA copy incomplete" in loaded.description
    torch.testing.assert_close(loaded.unet.conv_out.weight, model.unet.conv_out.weight)


def test_legacy_torch_file_with_objects_is_refused(tmp_path, model):
    """Non-zip (legacy) torch files cannot go through the restricted reader: refused, never unpickled."""
    marker = tmp_path / "pwned"
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": ldm_state_dict(model), "callbacks": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="old.ckpt.*refused.*legacy"):
        load_zero123(path)
    assert not marker.exists()


class Payload:
    """Unpickling this would create a file: the loader must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_missing_weights_list_every_place(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as info:
        load_zero123("nobody/zero123-nowhere")
    message = str(info.value)
    assert str(tmp_path / "nobody" / "zero123-nowhere") in message
    assert str(cache) in message
    assert "hub" in message and "HF_HUB_OFFLINE" in message
    assert "--model PATH" in message and "huggingface-cli download" in message
    assert "\n" not in message
    with pytest.raises(WeightsNotFoundError, match="not an owner/name id"):
        load_zero123(str(tmp_path / "models" / "weights" / "zero123.ckpt"))


def test_shipped_tiny_prior(tmp_path, monkeypatch, model, probe):
    monkeypatch.setattr(checkpoints, "shipped_prior_path", lambda: tmp_path / "assets" / "tiny-zero123")
    with pytest.raises(WeightsNotFoundError, match="shipped 'tiny' prior.*tiny-zero123.*random-tiny"):
        load_zero123("tiny")
    save_diffusers(model, tmp_path / "assets" / "tiny-zero123")
    torch.testing.assert_close(guided(load_zero123("tiny"), probe), guided(model, probe))


def test_random_weights_are_seeded_and_marked():
    state = torch.get_rng_state()
    a = load_zero123("random-tiny", "cpu", seed=5)
    assert torch.equal(state, torch.get_rng_state())
    b = load_zero123("random-tiny", "cpu", seed=5)
    c = load_zero123("random-tiny", "cpu", seed=6)
    assert a.is_random and "RANDOM WEIGHTS" in a.description
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_save_diffusers_keeps_metadata_and_refuses_to_clobber(tmp_path):
    stable = tiny_model(seed=2, pose_encoding="stable-zero123")
    folder = save_diffusers(stable, tmp_path / "out", projection_folder="clip_camera_projection")
    loaded = load_zero123(folder)
    assert loaded.pose_encoding == "stable-zero123" and loaded.is_random and "RANDOM WEIGHTS" in loaded.description
    with pytest.raises(InputError, match="not empty"):
        save_diffusers(stable, folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert set(load_file(folder / "clip_camera_projection" / "diffusion_pytorch_model.safetensors")) == {"proj.weight", "proj.bias"}


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="folder.*model_index.json"):
        load_zero123(tmp_path / "folder")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="notes.txt.*not a checkpoint"):
        load_zero123(tmp_path / "notes.txt")
    (tmp_path / "broken.ckpt").write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="broken.ckpt"):
        load_zero123(tmp_path / "broken.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}}, tmp_path / "sd.ckpt")
    with pytest.raises(InputError, match="sd.ckpt.*4 input channels"):
        load_zero123(tmp_path / "sd.ckpt")


def test_ldm_checkpoint_without_clip_takes_the_encoder_from_a_folder(tmp_path, model, probe):
    state = {k: v for k, v in ldm_state_dict(model).items() if not k.startswith("cond_stage_model.")}
    torch.save({"state_dict": state}, tmp_path / "noclip.ckpt")
    with pytest.raises(WeightsNotFoundError, match="noclip.ckpt.*CLIP"):
        load_zero123(tmp_path / "noclip.ckpt")
    folder = save_diffusers(model, tmp_path / "diffusers")
    loaded = load_zero123(tmp_path / "noclip.ckpt", image_encoder=folder)
    torch.testing.assert_close(guided(loaded, probe), guided(model, probe), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_loads_on_gpu_in_fp16(tmp_path, model):
    loaded = load_zero123(save_ldm_checkpoint(model, tmp_path / "z.safetensors"), "cuda")
    assert loaded.dtype == torch.float16 and loaded.device.type == "cuda"


@pytest.mark.parametrize("suffix", [".safetensors", "folder"])
def test_loading_in_bf16_converts_every_weight(tmp_path, model, suffix):
    path = save_ldm_checkpoint(model, tmp_path / "z.safetensors") if suffix != "folder" else save_diffusers(model, tmp_path / "d")
    loaded = load_zero123(path, "cpu", torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(loaded.camera_projection.weight.float(), model.camera_projection.weight, atol=1e-2, rtol=1e-2)
