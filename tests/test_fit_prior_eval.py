"""bench/fit_prior_eval.py: object placement for recon fit's recentring, and the whole benchmark at micro scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from script_loading import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/fit_prior_eval.py")


def test_heldout_seeds_are_disjoint_from_the_prior_training_set(bench):
    from recon.data.synth import object_seed

    seeds = bench.heldout_seeds(5, 3)
    assert seeds == [object_seed(2, 3 + i) for i in range(5)]
    recipe = json.loads(bench.RECIPE.read_text())["data"]["train"]
    assert min(seeds) > object_seed(recipe["seed"], recipe["objects"] - 1)


def test_heldout_cameras_avoid_the_input_view(bench):
    cameras, poses = bench.heldout_cameras(8, 16)
    assert len(cameras) == 8 and cameras.height == 16
    assert {e for e, _ in poses} == {15.0, 30.0}
    azimuths = sorted(a for _, a in poses)
    assert min(abs(a) for a in azimuths) == pytest.approx(22.5)
    assert np.allclose(np.diff(azimuths), 45.0)
    assert torch.allclose(cameras.centers.norm(dim=-1), torch.full((8,), 3.8), atol=1e-5)


@pytest.mark.parametrize("size", [32, 64])
def test_placed_object_is_left_unchanged_by_recon_preprocessing(bench, tmp_path, size):
    """The input render of the placed object goes through load_reference pixel for pixel: the fit's camera model holds."""
    from recon.data.primitives import random_object, render_object
    from recon.imageio import decode_image, save_rgba_png
    from recon.preprocess import load_reference

    original = random_object(bench.heldout_seeds(1, 1)[0])
    placed, frame = bench.place_object(original, size, 0.85)
    assert frame["recentre"]["identity"]
    assert frame["scale"] > 0 and frame["bounding_radius"] < 1.0
    # a similarity: true surface points scale by the reported factor
    a = original.sample_surface(256, seed=3)[0]
    b = placed.sample_surface(256, seed=3)[0]
    assert torch.allclose(b, a * frame["scale"] + torch.tensor(frame["offset"]), atol=1e-4)
    rgba = render_object(placed, bench.reference_camera(size), supersample=2)["rgba"][0].numpy()
    save_rgba_png(tmp_path / "in.png", rgba)
    reference = load_reference(tmp_path / "in.png", foreground_ratio=0.85, size=size)
    assert np.abs(reference.rgba.permute(1, 2, 0).numpy() - decode_image(tmp_path / "in.png")).max() < 1e-6


def test_micro_benchmark_runs_both_methods(bench, tmp_path):
    from recon.imageio import decode_image

    out = tmp_path / "eval.json"
    work = tmp_path / "work"
    micro = [
        "stages.coarse.steps=2", "stages.fine.steps=2", "preprocess.size=32", "stages.coarse.reference_resolution=32",
        "stages.fine.reference_resolution=32", "stages.fine.resolution=32", "export.mc_resolution=32",
    ]
    argv = ["--objects", "1", "--device", "cpu", "--views", "2", "--eval-size", "32", "--chamfer-points", "400",
            "--out", str(out), "--work", str(work), "--quiet"]
    for item in micro:
        argv += ["--set", item]
    record = bench.main(argv)
    saved = json.loads(out.read_text())
    assert saved["objects_done"] == 1 and not saved["stopped_early"]
    assert saved["preset"] == "cpu" and saved["model"] == "tiny"
    row = saved["objects"][0]
    assert row["frame"]["recentre"]["identity"]
    for method in ("sds", "no-sds"):
        result = row["results"][method]
        assert "error" not in result, result
        assert math.isfinite(result["chamfer"]) and result["chamfer"] > 0
        assert math.isfinite(result["psnr"]) and math.isfinite(result["ssim"])
        assert saved["summary"][method]["chamfer"] == pytest.approx(result["chamfer"])
        config = yaml.safe_load((Path(result["run_dir"]) / "config.yaml").read_text())
        weights = {name: stage["weights"]["sds"] for name, stage in config["stages"].items()}
        assert weights == ({"coarse": 0.05, "fine": 0.05} if method == "sds" else {"coarse": 0.0, "fine": 0.0})
        assert config["guidance"]["model"] == "tiny"
        # the fit's input is the render itself, pixel for pixel (no recentring happened)
        fitted = decode_image(Path(result["run_dir"]) / "input_rgba.png")
        assert np.array_equal(fitted, decode_image(work / f"object-{row['seed']}.png"))
    # the SDS run did call the prior (its losses include sds); the reference-only run never did
    sds_meta = json.loads((Path(row["results"]["sds"]["run_dir"]) / "meta.json").read_text())
    plain_meta = json.loads((Path(row["results"]["no-sds"]["run_dir"]) / "meta.json").read_text())
    assert "sds" in sds_meta["final_losses"] and "sds" not in plain_meta["final_losses"]
    assert record["summary"]["sds_minus_no_sds"]["objects"] == 1


def test_reference_only_guidance_refuses_sds(bench):
    from recon.errors import ReconError

    guidance = bench._NoGuidanceModels().get(None, None)
    assert guidance.prepare(object()) == {}
    with pytest.raises(ReconError, match="every stages"):
        guidance.sds(torch.zeros(1, 3, 8, 8), torch.zeros(1), torch.zeros(1), torch.ones(1), 0)


def _record(bench, seeds, chamfer_gain):
    """A benchmark record with made-up scores: sds beats no-sds on Chamfer by ``chamfer_gain`` on every object."""
    rows = []
    for seed in seeds:
        base = {"chamfer": 0.07 + 0.001 * (seed % 5), "psnr": 11.0 + 0.1 * (seed % 3), "ssim": 0.55, "input_psnr": 32.0, "seconds": 10.0}
        sds = dict(base, chamfer=base["chamfer"] - chamfer_gain, psnr=base["psnr"] + (0.5 if seed % 2 else -0.5), ssim=0.6, input_psnr=30.0)
        rows.append({"seed": seed, "results": {"sds": sds, "no-sds": base}})
    record = {"preset": "fast", "model": "tiny", "overrides": [], "steps": {"coarse": 60}, "views": 8, "eval_size": 128,
              "chamfer_points": 100, "device": "cuda", "gpu": "x", "heldout": "h", "max_minutes": 1.0, "objects": rows,
              "objects_requested": len(rows), "objects_done": len(rows), "stopped_early": False, "wall_s": 1.0}
    record["summary"] = bench.summarise(rows)
    return record


def test_paired_summary_has_bootstrap_intervals_and_counts_wins_per_direction(bench):
    d = _record(bench, range(2000006, 2000016), chamfer_gain=0.01)["summary"]["sds_minus_no_sds"]
    assert d["objects"] == 10
    assert d["chamfer"] == pytest.approx(-0.01) and d["chamfer_ci95"] == pytest.approx([-0.01, -0.01])
    assert d["sds_better_chamfer"] == 10  # lower Chamfer is better
    assert d["psnr"] == pytest.approx(0.0) and d["psnr_ci95"][0] < 0 < d["psnr_ci95"][1] and d["sds_better_psnr"] == 5
    assert d["sds_better_input_psnr"] == 0 and d["input_psnr"] == pytest.approx(-2.0)


def test_merge_combines_shards_and_refuses_mismatched_or_overlapping_ones(bench, tmp_path):
    from recon.errors import ReconError
    from recon.fileio import write_json

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_json(first, _record(bench, range(2000006, 2000009), chamfer_gain=0.01))
    write_json(second, _record(bench, range(2000009, 2000011), chamfer_gain=0.02))
    merged = bench.merge([first, second])
    assert merged["objects_done"] == 5 and merged["seeds"] == list(range(2000006, 2000011))
    assert merged["summary"]["sds_minus_no_sds"]["chamfer"] == pytest.approx(-(3 * 0.01 + 2 * 0.02) / 5)
    assert "| chamfer | -0.0140 |" in bench.markdown(merged)
    with pytest.raises(ReconError, match="more than one shard"):
        bench.merge([first, first])
    other = tmp_path / "c.json"
    write_json(other, dict(_record(bench, [2000020], chamfer_gain=0.0), preset="default"))
    with pytest.raises(ReconError, match=r"c.json: not a shard .*\(differs in preset\)"):
        bench.merge([first, other])
