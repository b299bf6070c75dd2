"""Paired per-object statistics of the novel-view evaluation, and the richer synthetic object families."""

from __future__ import annotations

import pytest
import torch

from recon.cameras import Cameras, generate_rays
from recon.data.primitives import FAMILIES, Ellipsoid, Material, PrimitiveObject, random_object, render_object
from recon.data.synth import SynthConfig, is_complete, synthesize
from recon.errors import ReconError
from recon.fileio import read_json
from recon.systems.evaluation import (
    bootstrap_interval,
    grouped_markdown,
    grouped_summary,
    paired_comparison,
    paired_markdown,
    per_object,
)


def report(scores: dict[str, dict[str, list[float]]], consistency: dict[str, dict[str, float]] | None = None) -> dict:
    """A minimal evaluation report: per-view rows of {method: {object: [psnr per view]}} (ssim = psnr / 100)."""
    rows = []
    objects = next(iter(scores.values()))
    for obj, values in objects.items():
        for k in range(len(values)):
            row = {"object": obj}
            for method, per in scores.items():
                row[f"{method}_psnr"] = per[obj][k]
                row[f"{method}_ssim"] = per[obj][k] / 100
            rows.append(row)
    return {"views": rows, "consistency_by_object": consistency or {}}


def test_per_object_means_and_paired_differences():
    r = report({"base": {"a": [10.0, 12.0], "b": [14.0, 14.0], "c": [9.0, 11.0]},
                "cascade": {"a": [12.0, 12.0], "b": [13.0, 13.0], "c": [12.0, 12.0]}},
               {"base": {"a": 15.0, "b": 16.0, "c": 17.0}, "cascade": {"a": 16.0, "b": 16.5, "c": 16.0}})
    assert per_object(r, "base", "psnr") == {"a": 11.0, "b": 14.0, "c": 10.0}
    assert per_object(r, "cascade", "consistency_psnr") == {"a": 16.0, "b": 16.5, "c": 16.0}
    result = paired_comparison(r, "base", r, "cascade", resamples=2000)
    psnr = result["psnr"]
    assert psnr["objects"] == 3 and psnr["first"] == pytest.approx(35 / 3) and psnr["second"] == pytest.approx(37 / 3)
    assert psnr["mean_diff"] == pytest.approx(2 / 3) and psnr["win_fraction"] == pytest.approx(2 / 3)
    # The interval lies within the range of the per-object differences (1, -1, 2) and holds the mean.
    assert -1.0 <= psnr["ci95"][0] <= psnr["mean_diff"] <= psnr["ci95"][1] <= 2.0
    assert result["ssim"]["mean_diff"] == pytest.approx(psnr["mean_diff"] / 100)
    assert result["consistency_psnr"]["mean_diff"] == pytest.approx(0.5 / 3)
    table = paired_markdown([("cascade vs base", result)])
    assert "| cascade vs base | psnr | 3 |" in table and "67 %" in table


def test_paired_comparison_matches_objects_by_id_across_reports():
    first = report({"base": {"a": [10.0], "b": [20.0], "x": [0.0]}})
    second = report({"base": {"b": [21.0], "a": [13.0], "y": [99.0]}})
    psnr = paired_comparison(first, "base", second, "base", ("psnr",))["psnr"]
    assert psnr["objects"] == 2 and psnr["mean_diff"] == pytest.approx(2.0) and psnr["win_fraction"] == 1.0


def test_grouped_summary_averages_the_views_of_each_group():
    r = report({"base": {"a": [10.0, 12.0], "b": [14.0, 16.0], "c": [9.0, 11.0], "d": [50.0, 50.0]},
                "copy-input": {"a": [8.0, 8.0], "b": [20.0, 20.0], "c": [12.0, 12.0], "d": [50.0, 50.0]}})
    grouped = grouped_summary(r, {"a": "blob", "c": "blob", "b": "stacked"})  # d in no group: left out
    assert list(grouped) == ["blob", "stacked"]
    assert grouped["blob"]["objects"] == 2 and grouped["blob"]["views"] == 4
    assert grouped["blob"]["base"]["psnr"] == pytest.approx(10.5) and grouped["blob"]["copy-input"]["psnr"] == pytest.approx(10.0)
    assert grouped["stacked"]["base"]["psnr"] == pytest.approx(15.0) and grouped["stacked"]["copy-input"]["ssim"] == pytest.approx(0.2)
    table = grouped_markdown(grouped, "family")
    assert table.splitlines()[0] == "| family | objects | base PSNR / SSIM | copy-input PSNR / SSIM |"
    assert "| stacked | 1 | 15.00 / 0.1500 | 20.00 / 0.2000 |" in table


def test_bootstrap_interval_narrows_with_more_objects_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(10, generator=g), torch.randn(1000, generator=g)
    lo_s, hi_s = bootstrap_interval(small, 4000)
    lo_l, hi_l = bootstrap_interval(large, 4000)
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    assert lo_l < float(large.mean()) < hi_l
    assert bootstrap_interval(small, 4000) == (lo_s, hi_s)
    constant = bootstrap_interval(torch.full((5,), 0.25), 100)
    assert constant == pytest.approx((0.25, 0.25))


def test_ellipsoid_renders_its_analytic_silhouette():
    piece = Ellipsoid(torch.zeros(3), torch.eye(3), Material((1.0, 0.0, 0.0)), radii=torch.tensor([0.5, 0.25, 0.3]))
    cameras = Cameras.from_spherical(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.8]), 20.0, 128)
    out = render_object(PrimitiveObject([piece]), cameras)
    origins, directions = generate_rays(cameras)
    hit = out["rgba"][0, ..., 3] > 0.5
    # Seen along +Z: an ellipse with semi-axes 0.5 (x) and 0.25 (y); its image area ~ pi a b / pixel area.
    pixel = 2 * 3.8 * torch.tan(torch.deg2rad(torch.tensor(10.0))) / 128
    assert float(hit.sum()) == pytest.approx(float(torch.pi * 0.5 * 0.25 / pixel**2), rel=0.03)
    front = (origins + out["depth"] * directions)[0][64, 64]
    torch.testing.assert_close(front, torch.tensor([0.0, 0.0, 0.3]), atol=2e-2, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_deterministic_fitted_objects(family):
    obj = random_object(31, family=family)
    assert obj.bounding_radius() <= 0.55 + 1e-5 and obj.name.startswith("random" if family == "blob" else family)
    points, _ = obj.sample_surface(500, seed=0)
    assert obj.sdf(points).abs().max() < 1e-3
    cameras = Cameras.from_spherical(torch.tensor([20.0]), torch.tensor([40.0]), torch.tensor([3.8]), 20.0, 32)
    first = render_object(obj, cameras)["rgba"]
    assert 0.02 < float(first[..., 3].mean()) < 0.8
    assert torch.equal(first, render_object(random_object(31, family=family), cameras)["rgba"])
    if family == "symmetric":  # mirrored limbs: the union is symmetric about x = 0 before fitting moved it
        mirrored = points * torch.tensor([-1.0, 1.0, 1.0])
        centre_x = (points[:, 0].max() + points[:, 0].min()) / 2
        assert obj.sdf(mirrored + torch.tensor([2 * float(centre_x), 0.0, 0.0])).abs().max() < 2e-2


def test_blob_family_is_the_default_and_unknown_families_fail(tmp_path):
    default, blob, other = random_object(5), random_object(5, family="blob"), random_object(5, family="stacked")
    assert default.name == "random-5"
    assert [p.center.tolist() for p in default.primitives] == [p.center.tolist() for p in blob.primitives]
    assert [p.center.tolist() for p in default.primitives] != [p.center.tolist() for p in other.primitives]
    with pytest.raises(ValueError, match="unknown object family"):
        random_object(5, family="teapot")
    with pytest.raises(ReconError, match="families"):
        SynthConfig(families="blob,teapot")
    cfg = SynthConfig(objects=2, views=2, size=16, supersample=1, families="stacked,single")
    synthesize(cfg, tmp_path)
    assert [read_json(tmp_path / f"0000{i}" / "object.json")["family"] for i in range(2)] == ["stacked", "single"]
    assert is_complete(tmp_path / "00000", cfg) and not is_complete(tmp_path / "00000", SynthConfig(objects=2, views=2, size=16, supersample=1))


def test_latent_colour_share_is_zero_for_a_colour_blind_encoder_and_large_for_an_identity():
    from types import SimpleNamespace

    from recon.systems.cascade_training import latent_colour_share

    class Encoder(torch.nn.Module):
        """A stand-in VAE whose posterior mode is the image itself, or its grey level when ``blind``."""

        dtype = torch.float32

        def __init__(self, blind: bool) -> None:
            super().__init__()
            self.blind = blind

        def encode(self, x):
            mode = x.mean(dim=1, keepdim=True).expand_as(x) if self.blind else x
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mode))

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert latent_colour_share(Encoder(True), images) == 0.0
    x = images * 2 - 1
    expected = (x - x.mean(dim=1, keepdim=True)).abs().mean() / x.std()
    assert latent_colour_share(Encoder(False), images, chunk=4) == pytest.approx(float(expected), rel=1e-5)
