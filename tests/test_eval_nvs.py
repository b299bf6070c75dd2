"""Novel-view evaluation: scores, baselines, consistency and the eval-nvs report on a tiny dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch

from guidance.checkpoints import load_zero123
from guidance.evaluation import EvalConfig, evaluate, image_scores, markdown_report
from recon.cli.main import main
from recon.data.multiview import MultiViewDataset, composite
from recon.data.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "heldout"
    synthesize(SynthConfig(objects=2, views=4, size=64, seed=9, supersample=1, orbit=True), root)
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


def test_cli_eval_nvs_writes_table_and_json(heldout, tmp_path):
    code = main(["eval-nvs", "--data", str(heldout), "--model", "random-tiny", "-o", str(tmp_path / "out"),
                 "--steps", "1", "--max-objects", "1", "--no-consistency", "--device", "cpu", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["objects"] == 1 and report["summary"]["base"]["consistency_psnr"] is None
    text = (tmp_path / "out" / "eval.md").read_text()
    assert text.startswith("# Novel-view evaluation (1 objects, 3 target views)")
    assert "| base |" in text and "| copy-input |" in text
