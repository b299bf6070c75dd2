"""Novel-view evaluation: scores, baselines, consistency and the eval-nvs report on a tiny dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch
from guidance_fixtures import tiny_images, tiny_model

from recon.cli.main import main
from recon.data.multiview import MultiViewDataset
from recon.data.synth import SynthConfig, synthesize
from recon.guidance.cascade import generate_views, generate_views_many
from recon.guidance.checkpoints import load_zero123
from recon.imageio import composite
from recon.systems.evaluation import (
    EvalConfig,
    cascade_views,
    cascade_views_many,
    evaluate,
    image_scores,
    markdown_report,
)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "heldout"
    synthesize(SynthConfig(objects=2, views=4, size=64, seed=9, supersample=1, orbit=True), root)
    return root


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Three objects with 5, 4 and 3 views (4, 3 and 2 targets)."""
    root = tmp_path_factory.mktemp("eval") / "uneven"
    synthesize(SynthConfig(objects=3, views=5, size=64, seed=4, supersample=1, orbit=True), root)
    for folder, drop in (("00001", ["004"]), ("00002", ["003", "004"])):
        for name in drop:
            for suffix in (".png", ".json"):
                (root / folder / (name + suffix)).unlink()
    return root


def test_orbit_views_have_fixed_relative_poses(heldout):
    item = MultiViewDataset(heldout)[0]
    assert torch.allclose(item.elevation_deg, item.elevation_deg[0].expand(4))
    steps = torch.remainder(item.azimuth_deg - item.azimuth_deg[0], 360.0)
    torch.testing.assert_close(steps, torch.tensor([0.0, 90.0, 180.0, 270.0]), atol=1e-3, rtol=0)


def test_image_scores_match_the_definitions():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=g)
    pred = (target + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)
    psnr, ssim = image_scores(pred, target)
    expected = -10 * torch.log10(((pred - target) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(psnr, expected, atol=1e-4, rtol=0)
    same_psnr, same_ssim = image_scores(target, target)
    assert torch.all(torch.isinf(same_psnr)) or torch.all(same_psnr > 80)
    torch.testing.assert_close(same_ssim, torch.ones(2))
    assert torch.all(ssim < 1)


def test_evaluate_scores_baselines_and_consistency(heldout):
    dataset = MultiViewDataset(heldout, image_size=64)
    model = load_zero123("random-tiny", "cpu", torch.float32)
    report = evaluate(dataset, model, model, EvalConfig(steps=2, batch=4))
    assert report["objects"] == 2 and report["target_views"] == 6
    assert set(report["summary"]) == {"base", "cascade", "copy-input", "mean-image"}
    # The copy baseline's score is recomputable from the files.
    item = dataset[0]
    views = composite(item.images, 1.0)
    psnr, _ = image_scores(views[0][None].expand(3, -1, -1, -1), views[1:])
    rows = [r for r in report["views"] if r["object"] == item.object_id]
    assert [r["target_view"] for r in rows] == [1, 2, 3]
    assert [abs(r["delta_azimuth_deg"]) for r in rows] == pytest.approx([90.0, 180.0, 90.0], abs=1e-3)
    torch.testing.assert_close(torch.tensor([r["copy-input_psnr"] for r in rows]), psnr, atol=1e-3, rtol=0)
    # The mean image beats copying the input on average (it minimises the MSE over the set).
    assert report["summary"]["mean-image"]["psnr"] > report["summary"]["copy-input"]["psnr"]
    for name in ("base", "cascade"):
        assert math.isfinite(report["summary"][name]["consistency_psnr"])
    assert report["summary"]["copy-input"]["consistency_psnr"] is None
    table = markdown_report(report)
    assert "| cascade |" in table and "| mean-image |" in table and "| 90-135 | 135-180 |" in table and "0-45" not in table


def test_base_mean_averages_base_samples_of_other_seeds(heldout):
    dataset = MultiViewDataset(heldout, image_size=64)
    model = load_zero123("random-tiny", "cpu", torch.float32)
    one = evaluate(dataset, model, None, EvalConfig(steps=1, batch=4, consistency=False, mean_samples=1))
    for row in one["views"]:  # the mean of one sample is the Base's own sample
        assert row["base-mean_psnr"] == pytest.approx(row["base_psnr"], abs=1e-4)
    report = evaluate(dataset, model, None, EvalConfig(steps=1, batch=4, consistency=False, mean_samples=3, seed=2))
    assert list(report["summary"]) == ["base", "copy-input", "mean-image", "base-mean"]
    assert report["summary"]["base-mean"]["consistency_psnr"] is None
    # object 0's three samples by hand: the evaluation's seed, then + 3 and + 4
    item = dataset[0]
    views = composite(item.images, 1.0)
    targets = tuple(p[1:] for p in (item.elevation_deg, item.azimuth_deg, item.radius))
    pose = (float(item.elevation_deg[0]), float(item.azimuth_deg[0]), float(item.radius[0]))
    seed = 2 * 1_000_003
    samples = [generate_views_many(model, views[:1], [pose], [targets], 1, 3.0, [seed + offset], 4)[0] for offset in (0, 3, 4)]
    expected, _ = image_scores(torch.stack(samples).mean(dim=0), views[1:])
    rows = [r for r in report["views"] if r["object"] == item.object_id]
    torch.testing.assert_close(torch.tensor([r["base-mean_psnr"] for r in rows]), expected, atol=1e-3, rtol=0)
    assert "| base-mean |" in markdown_report(report)


def test_cli_eval_nvs_writes_table_and_json(heldout, tmp_path):
    code = main(["eval-nvs", "--data", str(heldout), "--model", "random-tiny", "-o", str(tmp_path / "out"),
                 "--steps", "1", "--max-objects", "1", "--no-consistency", "--device", "cpu", "--quiet", "--mean-samples", "2"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["objects"] == 1 and report["summary"]["base"]["consistency_psnr"] is None
    assert report["config"]["mean_samples"] == 2 and "base-mean" in report["summary"]
    text = (tmp_path / "out" / "eval.md").read_text()
    assert text.startswith("# Novel-view evaluation (1 objects, 3 target views)")
    assert "| base |" in text and "| copy-input |" in text


# Three inputs with 2, 3 and 1 target cameras (two share a seed, as an object's two inputs do).
POSES = [(10.0, 0.0, 1.5), (-5.0, 40.0, 1.6), (30.0, -90.0, 1.4)]
TARGETS = [
    (torch.tensor([20.0, 0.0]), torch.tensor([30.0, 120.0]), torch.tensor([1.5, 1.5])),
    (torch.tensor([0.0, 15.0, -10.0]), torch.tensor([0.0, 90.0, 200.0]), torch.tensor([1.6, 1.5, 1.7])),
    (torch.tensor([5.0]), torch.tensor([-45.0]), torch.tensor([1.4])),
]
SEEDS = [3, 17, 3]


def test_generate_views_many_matches_one_input_at_a_time():
    model, images, poses, targets, seeds = tiny_model(), tiny_images(3, seed=1), POSES, TARGETS, SEEDS
    together = generate_views_many(model, images, poses, targets, 2, 3.0, seeds, batch=4)
    assert [v.shape[0] for v in together] == [2, 3, 1]
    for image, pose, target, seed, views in zip(images, poses, targets, seeds, together, strict=True):
        alone = generate_views(model, image, pose, target, 2, 3.0, seed, batch=8)
        torch.testing.assert_close(views, alone, rtol=0, atol=1.01 / 255)


def test_cascade_views_many_matches_one_input_at_a_time():
    model, images = tiny_model(), tiny_images(3, seed=2)
    base_views = generate_views_many(model, images, POSES, TARGETS, 2, 3.0, SEEDS, batch=8)
    together = cascade_views_many(model, model, images, POSES, TARGETS, base_views, EvalConfig(steps=2, batch=4), SEEDS)
    assert [v.shape[0] for v in together] == [2, 3, 1]
    for image, pose, target, base, seed, views in zip(images, POSES, TARGETS, base_views, SEEDS, together, strict=True):
        alone = cascade_views(model, model, image, pose, target, base, EvalConfig(steps=2, batch=1), seed)
        torch.testing.assert_close(views, alone, rtol=0, atol=2e-3)


def test_evaluate_does_not_depend_on_group_or_batch(uneven):
    dataset = MultiViewDataset(uneven, image_size=64)
    model = load_zero123("random-tiny", "cpu", torch.float32)
    alone = evaluate(dataset, model, model, EvalConfig(steps=1, batch=2, group=1))
    together = evaluate(dataset, model, model, EvalConfig(steps=1, batch=5, group=3))
    assert alone["target_views"] == together["target_views"] == 9
    keys = [f"{m}_psnr" for m in ("base", "cascade", "copy-input", "mean-image")]
    for a, b in zip(alone["views"], together["views"], strict=True):
        assert (a["object"], a["target_view"]) == (b["object"], b["target_view"])
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], abs=1e-3)
    for name in ("base", "cascade"):
        assert alone["summary"][name]["consistency_psnr"] == pytest.approx(together["summary"][name]["consistency_psnr"], abs=1e-3)
