"""Multi-view datasets: recon and Objaverse layouts give the same poses; synth writes readable data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon.cameras import Cameras, relative_pose
from recon.cli.main import main
from recon.data.multiview import (
    OBJAVERSE_FOVY_DEG,
    MultiViewDataset,
    blender_w2c_to_c2w,
    c2w_to_blender_w2c,
    load_rgba,
    scan_objects,
    write_recon_view,
)
from recon.data.synth import SynthConfig, synthesize
from recon.errors import InputError
from recon.imageio import composite, save_rgba_png


def blender_rt(polar_deg: float, azimuth_deg: float, distance: float) -> np.ndarray:
    """Zero-1-to-3's camera, built the Blender way: Z up, position (sin t cos p, sin t sin p, cos t) * r,
    looking at the origin with world +Z as up; returns the 3x4 world-to-camera [R | t]."""
    theta, phi = math.radians(polar_deg), math.radians(azimuth_deg)
    eye = distance * np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])
    back = eye / np.linalg.norm(eye)  # camera +Z points away from what it looks at
    right = np.cross(np.array([0.0, 0.0, 1.0]), back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    rotation = np.stack([right, up, back])  # rows: camera axes in world = world-to-camera rotation
    return np.concatenate([rotation, (-rotation @ eye)[:, None]], axis=1)


def _rgba(size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.random((size, size, 4)).astype(np.float32)
    image[..., 3] = (rng.random((size, size)) > 0.5).astype(np.float32)
    return image


def test_objaverse_npy_gives_back_the_known_elevation_and_azimuth(tmp_path):
    folder = tmp_path / "views_release" / "0a1b2c"
    folder.mkdir(parents=True)
    known = [(60.0, 30.0, 1.8), (90.0, -120.0, 2.1), (20.0, 175.0, 1.5)]  # polar, Blender azimuth, distance
    for i, (polar, azimuth, distance) in enumerate(known):
        np.save(folder / f"{i:03d}.npy", blender_rt(polar, azimuth, distance))
        save_rgba_png(folder / f"{i:03d}.png", _rgba(seed=i))
    (record,) = scan_objects(tmp_path / "views_release")
    assert record.object_id == "0a1b2c" and len(record.views) == 3
    for view, (polar, azimuth, distance) in zip(record.views, known):
        assert view.elevation_deg == pytest.approx(90.0 - polar, abs=1e-4)
        # Our azimuth is Blender's + 90 deg (Blender's front, -Y, is our +Z).
        assert math.remainder(view.azimuth_deg - (azimuth + 90.0), 360.0) == pytest.approx(0.0, abs=1e-4)
        assert view.radius == pytest.approx(distance, abs=1e-5)
        assert view.fovy_deg == pytest.approx(49.1343, abs=1e-3) and OBJAVERSE_FOVY_DEG == view.fovy_deg
        # The camera looks at the origin, upright in our +Y-up world, as recon.cameras builds it.
        expected = Cameras.from_spherical(torch.tensor([view.elevation_deg]), torch.tensor([view.azimuth_deg]), torch.tensor([view.radius]), 20.0, 8)
        torch.testing.assert_close(view.c2w, expected.c2w[0], atol=1e-5, rtol=0)
    # Zero-1-to-3's own relative pose (its get_T) equals recon.cameras.relative_pose of the converted views.
    a, b = record.views[0], record.views[1]
    d_azimuth = math.radians((known[1][1] - known[0][1]) % 360.0)
    zero123_t = torch.tensor([math.radians(known[1][0] - known[0][0]), math.sin(d_azimuth), math.cos(d_azimuth), known[1][2] - known[0][2]])
    ours = relative_pose(b.elevation_deg, b.azimuth_deg, b.radius, a.elevation_deg, a.azimuth_deg, a.radius)
    torch.testing.assert_close(ours, zero123_t, atol=1e-5, rtol=0)


def test_axis_conversion_is_a_rotation_and_round_trips():
    rt = torch.from_numpy(blender_rt(45.0, 10.0, 2.0)).float()
    c2w = blender_w2c_to_c2w(rt)
    assert torch.det(c2w[:3, :3]) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(c2w_to_blender_w2c(c2w), rt, atol=1e-5, rtol=0)
    # Blender's +Z (up) is our +Y: a camera straight above in Blender is straight above here.
    top = blender_w2c_to_c2w(torch.from_numpy(blender_rt(1e-3, 0.0, 2.0)).float())
    assert top[1, 3] == pytest.approx(2.0, abs=1e-4)


def test_recon_and_objaverse_layouts_give_the_same_records(tmp_path):
    cameras = Cameras.from_spherical(torch.tensor([10.0, 45.0]), torch.tensor([-30.0, 120.0]), torch.tensor([3.8, 3.8]), 49.1343, 32)
    elevations, azimuths = [10.0, 45.0], [-30.0, 120.0]
    for i in range(2):
        write_recon_view(tmp_path / "recon" / "obj", i, _rgba(seed=i), elevations[i], azimuths[i], 3.8, OBJAVERSE_FOVY_DEG, cameras.c2w[i])
        (tmp_path / "objaverse" / "obj").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "objaverse" / "obj" / f"{i:03d}.npy", c2w_to_blender_w2c(cameras.c2w[i]).numpy())
        save_rgba_png(tmp_path / "objaverse" / "obj" / f"{i:03d}.png", _rgba(seed=i))
    ours, theirs = MultiViewDataset(tmp_path / "recon")[0], MultiViewDataset(tmp_path / "objaverse")[0]
    for name in ("elevation_deg", "azimuth_deg", "radius", "fovy_deg", "c2w"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-4, rtol=0)
    assert torch.equal(ours.images, theirs.images)
    torch.testing.assert_close(ours.elevation_deg, torch.tensor(elevations))
    # The PNG round trip keeps 8-bit values.
    torch.testing.assert_close(ours.images[0].permute(1, 2, 0), torch.from_numpy(np.round(_rgba(seed=0) * 255) / 255), atol=1e-6, rtol=0)


def test_bad_files_raise_input_errors_naming_them(tmp_path):
    folder = tmp_path / "data" / "obj"
    folder.mkdir(parents=True)
    save_rgba_png(folder / "000.png", _rgba())
    (folder / "000.json").write_text('{"elevation_deg": 0, "azimuth_deg": 0, "radius": 2, "fovy_deg": 20, "c2w": [[1]]}')
    with pytest.raises(InputError, match="000.json"):
        scan_objects(tmp_path / "data")
    c2w = Cameras.from_spherical(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]), 20.0, 8).c2w[0]
    write_recon_view(folder, 0, _rgba(), 30.0, 0.0, 2.0, 20.0, c2w)  # centre disagrees with elevation 30
    with pytest.raises(InputError, match="does not match"):
        scan_objects(tmp_path / "data")
    with pytest.raises(InputError, match="not found"):
        scan_objects(tmp_path / "missing")
    with pytest.raises(InputError, match="no object folders"):
        scan_objects(tmp_path / "data" / "obj")


def test_synth_writes_a_dataset_whose_images_match_their_poses(tmp_path):
    cfg = SynthConfig(objects=2, views=3, size=32, seed=5, supersample=1)
    assert synthesize(cfg, tmp_path / "data") == {"written": 2, "skipped": 0}
    assert synthesize(cfg, tmp_path / "data") == {"written": 0, "skipped": 2}
    dataset = MultiViewDataset(tmp_path / "data", image_size=16)
    assert len(dataset) == 2
    item = dataset[1]
    assert item.images.shape == (3, 4, 16, 16)
    assert ((item.elevation_deg >= -10) & (item.elevation_deg <= 80)).all()
    assert torch.all(item.radius == 3.8) and torch.all(item.fovy_deg == 20.0)
    # Re-render object 1 at the recorded poses: the stored image is that render.
    from recon.data.primitives import random_object, render_object
    from recon.data.synth import object_seed

    obj = random_object(object_seed(5, 1))
    cams = Cameras.from_spherical(item.elevation_deg, item.azimuth_deg, item.radius, 20.0, 32)
    expected = render_object(obj, cams)["rgba"]
    stored = torch.stack([load_rgba(view.image_path).permute(1, 2, 0) for view in dataset.objects[1].views])
    assert (stored - expected).abs().max() < 1 / 255 + 1e-6
    rgb = composite(item.images, 1.0)
    assert rgb.shape == (3, 3, 16, 16) and rgb.max() <= 1.0


def test_cli_data_synth(tmp_path):
    code = main(["data", "synth", "-o", str(tmp_path / "d"), "--objects", "1", "--views", "2", "--size", "16", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "d" / "00000").iterdir()) == ["000.json", "000.png", "001.json", "001.png", "object.json"]
