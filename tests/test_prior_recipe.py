"""The shipped-prior architecture, the VAE stage, the in-memory view cache and bench/train_tiny_prior.py at micro scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from script_loading import load_script

from recon.data.multiview import MultiViewDataset
from recon.data.synth import SynthConfig, synthesize
from recon.guidance.architectures import (
    architecture,
    build_components,
    has_pose_embedding,
    match_architecture,
)
from recon.guidance.checkpoints import load_zero123, recorded_foreground_ratio
from recon.imageio import composite
from recon.systems.cascade_training import (
    TrainConfig,
    ViewCache,
    latent_std,
    reconstruction_scores,
    train,
)
from recon.systems.evaluation import METHODS

ROOT = Path(__file__).resolve().parents[1]
ABLATION = ("one", "near", "far")  # every NEARBY_SETS but the default "paper"
MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions run far faster on one thread than on an oversubscribed 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prior") / "data"
    synthesize(SynthConfig(objects=3, views=3, size=64, seed=5, supersample=1), root)
    return root


def test_prior_architecture_sizes():
    with torch.device("meta"):
        parts = build_components("prior")
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    assert 2e6 <= counts["unet"] <= 6e6
    assert counts["vae"] <= 2e6 and counts["image_encoder"] <= 2e6
    # Shipped in fp16, every weight file and the whole folder stay under the 16 MiB file limit.
    assert 2 * sum(counts.values()) < 15 * MIB
    cfg = architecture("prior")
    assert cfg["vae"]["sample_size"] == 128 and 2 ** (len(cfg["vae"]["block_out_channels"]) - 1) == 4
    assert cfg["unet"]["sample_size"] == 32
    assert cfg["image_encoder"]["projection_dim"] + 4 == parts["camera_projection"].in_features
    assert parts["camera_projection"].out_features == cfg["unet"]["cross_attention_dim"]
    assert match_architecture(cfg["unet"]["block_out_channels"][0], cfg["image_encoder"]["hidden_size"]) == "prior"
    assert match_architecture(32, 32) == "tiny"


def test_view_cache_draws_two_different_views_of_one_object(data):
    dataset = MultiViewDataset(data, image_size=64)
    cache = ViewCache(dataset, workers=2)
    assert cache.images.shape == (9, 4, 64, 64) and cache.images.dtype == torch.uint8
    torch.testing.assert_close(cache.rgb(torch.tensor([4]), 1.0)[0], composite(dataset.view_image(1, 1), 1.0), atol=0.5 / 255, rtol=0)
    batch = cache.sample(64, torch.Generator().manual_seed(0))
    assert batch.input_images.shape == (64, 3, 64, 64)
    poses = {(round(v.elevation_deg, 4), round(v.azimuth_deg, 4)): (o, k) for o, r in enumerate(dataset.objects) for k, v in enumerate(r.views)}
    for i in range(64):
        a = poses[(round(float(batch.input_elevation[i]), 4), round(float(batch.input_azimuth[i]), 4))]
        b = poses[(round(float(batch.target_elevation[i]), 4), round(float(batch.target_azimuth[i]), 4))]
        assert a[0] == b[0] and a[1] != b[1]
        torch.testing.assert_close(batch.input_images[i], composite(dataset.view_image(*a), 1.0), atol=0.5 / 255, rtol=0)
        torch.testing.assert_close(batch.target_images[i], composite(dataset.view_image(*b), 1.0), atol=0.5 / 255, rtol=0)
    again = cache.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(again.target_images, batch.target_images)


def test_vae_stage_learns_and_sets_the_scaling_factor(data, tmp_path):
    cfg = TrainConfig(stage="vae", steps=12, batch_size=4, lr_vae=2e-3, warmup_steps=1, scale_samples=8, preload=True)
    result = train(cfg, data, "random-tiny", tmp_path / "run", device="cpu")
    assert result.finished and result.step == 12 and result.final is not None
    assert result.metrics["psnr_after"] > result.metrics["psnr_before"] + 1.0
    model = load_zero123(result.final, "cpu", torch.float32)
    assert model.is_random  # the UNet was not trained
    saved = json.loads((result.final / "vae" / "config.json").read_text())["scaling_factor"]
    assert saved == pytest.approx(1.0 / result.metrics["latent_std"], rel=1e-6)
    assert model.scaling_factor == pytest.approx(saved)
    # The same views through the reloaded VAE give the same std.
    views = ViewCache(MultiViewDataset(data, image_size=64)).sample_views(8, torch.Generator().manual_seed(cfg.seed + 2))
    assert latent_std(model.vae, views) == pytest.approx(result.metrics["latent_std"], rel=1e-4)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["vae_metrics"]["steps"] == 12

    # Decoder only: the encoder and the scaling factor (the UNet's latent space) stay, the decoder learns.
    cfg = TrainConfig(stage="vae", steps=12, batch_size=4, lr_vae=2e-3, warmup_steps=1, scale_samples=8, preload=True, vae_decoder_only=True)
    decoder = train(cfg, data, str(result.final), tmp_path / "decoder", device="cpu")
    tuned = load_zero123(decoder.final, "cpu", torch.float32)
    assert tuned.scaling_factor == pytest.approx(model.scaling_factor, rel=1e-6)
    changed = {name for name, tensor in model.vae.state_dict().items() if not torch.equal(tensor, tuned.vae.state_dict()[name])}
    assert changed and all(name.startswith(("decoder.", "post_quant_conv.")) for name in changed)


def test_reconstruction_scores_separate_colour_from_brightness():
    class Grey(torch.nn.Module):
        """A stand-in VAE whose reconstruction is the image's grey level (colour lost, brightness kept)."""

        dtype = torch.float32

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

        def decode(self, z):
            return SimpleNamespace(sample=z.mean(dim=1, keepdim=True).expand_as(z))

    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scores = reconstruction_scores(Grey(), images)
    grey = images.mean(dim=1, keepdim=True)
    colour = images - grey
    assert scores["chroma_psnr"] == pytest.approx(float(-10 * torch.log10(colour.square().mean())), rel=1e-4)
    assert scores["psnr"] == pytest.approx(scores["chroma_psnr"], rel=1e-4)  # all of the error is colour


def test_recipe_runs_end_to_end_at_micro_scale(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "bench" / "train_tiny_prior.py"), "--out", str(out), "--work", str(tmp_path / "work"),
        "--device", "cpu", "--mixed-precision", "bf16", "--objects", "3", "--views", "3", "--size", "32", "--supersample", "1",
        "--workers", "2", "--heldout-objects", "2", "--heldout-views", "3", "--vae-steps", "8", "--vae-batch", "4",
        "--lr-vae", "2e-3", "--base-steps", "2", "--base-batch", "2", "--cascade-steps", "2", "--cascade-batch", "1",
        "--prompt-steps", "1", "--warmup-steps", "1", "--eval-steps", "1", "--sample-objects", "1", "--budget-minutes", "4",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["eval.json", "eval.md", "extra.json", "log.txt", "recipe.json", "samples.png", "tiny-zero123.tar"]
    assert all(p.is_file() and p.stat().st_size < 16 * MIB for p in out.iterdir())
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["vae"]["psnr_after"] > recipe["vae"]["psnr_before"]
    assert recipe["steps"] == {"base": 2, "cascade": 2} and recipe["data"]["train"]["objects"] == 3
    report = json.loads((out / "eval.json").read_text())
    assert set(report["summary"]) == set(METHODS)
    assert "| mean-image |" in (out / "eval.md").read_text()
    with tarfile.open(out / "tiny-zero123.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    folder = tmp_path / "unpacked" / "tiny-zero123"
    assert {"recipe.json", "eval.json", "eval.md", "model_index.json"} <= {p.name for p in folder.iterdir()}
    from safetensors import safe_open

    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    model = load_zero123(folder, "cpu", torch.float32)
    assert not model.is_random and model.latent_scale == 4 and model.dtype == torch.float32
    assert 0.0 < recipe["foreground_ratio"] < 1.0  # the training images' framing, which recon fit recentres to
    assert recorded_foreground_ratio(folder) == pytest.approx(recipe["foreground_ratio"], abs=1e-3)
    assert model.scaling_factor == pytest.approx(recipe["vae"]["scaling_factor"], rel=1e-3)
    images = model.decode(torch.zeros(1, 4, 8, 8))
    assert images.shape == (1, 3, 32, 32)
    assert set(recipe["pose_use"]) == {"start", "base", "cascade"}
    for scores in recipe["pose_use"].values():
        assert all(scores[k] > 0 for k in ("true", "shuffled", "shuffled_pose", "zero"))
        assert scores["gap"] == pytest.approx(scores["shuffled_pose"] / scores["true"] - 1.0)
    assert has_pose_embedding(model.unet)
    extra = json.loads((out / "extra.json").read_text())
    assert set(extra["ablation"]) == set(ABLATION) and extra["compare"] is None
    assert set(extra["cfg_sweep"]) == {"1.0", "2.0"} and "base at CFG 1.0 vs base at CFG 3.0" in extra["paired"]
    cascade = extra["paired"]["cascade vs base"]["psnr"]
    assert cascade["objects"] == 2 and cascade["ci95"][0] <= cascade["mean_diff"] <= cascade["ci95"][1]
    assert "## Paired per-object comparisons" in (out / "eval.md").read_text()
    assert "## By shape family" not in (out / "eval.md").read_text() and "eval_by_family" not in recipe  # one family

    # A second run, into the same work folder, continues from the first's weights (no VAE stage): the same VAE,
    # provenance kept; with --cascade-fraction 1 only the cascade stage trains, on the near views.
    again = tmp_path / "again"
    command = [*command[:3], str(again), "--work", str(tmp_path / "work"), *command[6:], "--init", str(folder), "--projection-pose-gain", "2", "--vae-minutes", "0",
               "--compare", str(folder), "--no-ablation", "--pose-embedding-gain", "0.25", "--transformer-layers", "2", "--cascade-fraction", "1", "--nearby-views", "near"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    second = json.loads((again / "recipe.json").read_text())
    assert "vae" not in second and second["previous"]["steps"] == recipe["steps"]
    assert second["steps"] == {"cascade": 2} and set(second["pose_use"]) == {"start", "cascade"}
    assert json.loads((again / "eval.json").read_text())["config"]["nearby_views"] == [[0.0, 20.0, 0.0], [0.0, -20.0, 0.0], [-15.0, 0.0, 0.0]]
    assert "camera projection pose columns x 2.0" in (again / "log.txt").read_text()
    assert "pose embedding output gain raised to 0.25" in (again / "log.txt").read_text()
    assert "transformer blocks per attention layer 1 -> 2" in (again / "log.txt").read_text()
    with tarfile.open(again / "tiny-zero123.tar") as tar:
        tar.extractall(tmp_path / "unpacked-again", filter="data")
    deeper = load_zero123(tmp_path / "unpacked-again" / "tiny-zero123", "cpu", torch.float32)
    assert deeper.unet.config.transformer_layers_per_block == 2
    extra = json.loads((again / "extra.json").read_text())
    assert extra["ablation"] == {} and set(extra["compare"]["summary"]) == set(METHODS)
    assert extra["paired"]["new base vs compared base"]["psnr"]["objects"] == 2
    with tarfile.open(again / "tiny-zero123.tar") as tar:
        tar.extractall(tmp_path / "unpacked2", filter="data")
    continued = load_zero123(tmp_path / "unpacked2" / "tiny-zero123", "cpu", torch.float32)
    assert continued.unet.add_embedding.norm2.weight.abs().min() > 0.2
    assert continued.scaling_factor == pytest.approx(model.scaling_factor)
    for a, b in zip(continued.vae.state_dict().values(), model.vae.state_dict().values()):
        assert torch.equal(a, b)

    # --evaluate-only scores the weights as they are: no training data, no steps, the same tensors packed.
    scored = tmp_path / "scored"
    command = [*command[:3], str(scored), "--work", str(tmp_path / "work"), *command[6:], "--init", str(folder), "--evaluate-only",
               "--no-ablation", "--cfg-sweep", "", "--mean-samples", "2", "--heldout-families", "blob,stacked"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    third = json.loads((scored / "recipe.json").read_text())
    assert third["steps"] == {} and third["data"]["train"]["objects"] == 0 and third["previous"]["steps"] == recipe["steps"]
    assert third["description"] == model.description
    assert set(json.loads((scored / "eval.json").read_text())["summary"]) == {*METHODS, "base-mean"}
    paired = json.loads((scored / "extra.json").read_text())["paired"]
    assert {"base-mean vs base", "base-mean vs mean-image", "base-mean vs copy-input"} <= set(paired)
    assert list(third["eval_by_family"]) == ["blob", "stacked"]  # held-out object i takes family i mod 2
    assert third["eval_by_family"]["stacked"]["objects"] == 1 and "base-mean" in third["eval_by_family"]["blob"]
    assert "## By shape family" in (scored / "eval.md").read_text()
    with tarfile.open(scored / "tiny-zero123.tar") as tar:
        tar.extractall(tmp_path / "unpacked3", filter="data")
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "unpacked3" / "tiny-zero123" / unet).read_bytes() == (folder / unet).read_bytes()


def test_recipe_rejects_an_unknown_view_set_and_a_cascade_only_run_from_scratch(capsys):
    recipe = load_script("bench/train_tiny_prior.py")
    assert recipe.parse_args(["--out", "o", "--nearby-views", "near"]).nearby_views == "near"
    for flags, message in ((["--nearby-views", "close"], "--nearby-views must be one of paper, near, far, one"),
                           (["--cascade-fraction", "1"], "1 (no base stage) needs --init")):
        with pytest.raises(SystemExit):
            recipe.parse_args(["--out", "o", *flags])
        assert message in capsys.readouterr().err
