"""Novel-view sampling (DDIM + CFG) and the ``recon novel-view`` command, on tiny random weights."""

import numpy as np
import pytest
import torch
from guidance_fixtures import tiny_images, tiny_model
from PIL import Image

from recon.cli.main import main
from recon.cli.novel_view import make_grid, output_paths, pair_poses
from recon.errors import ReconError
from recon.guidance.sampling import encode_relative_views, sample_views


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def test_sample_views_shapes_range_and_determinism(model):
    image = tiny_images(1, size=48, seed=1)
    poses = ([0.0, 30.0, -20.0], [90.0, 0.0, 180.0], 0.0)
    a = sample_views(model, image, poses, steps=3, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0
    b = sample_views(model, image, encode_relative_views(model, *poses), steps=3, generator=torch.Generator().manual_seed(7), batch_size=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    c = sample_views(model, image, poses, steps=3, generator=torch.Generator().manual_seed(8))
    assert (a - c).abs().max() > 1e-3


def test_sample_views_matches_a_hand_written_ddim_loop(model):
    from diffusers import DDIMScheduler

    image = tiny_images(1, seed=2)
    pose = encode_relative_views(model, [10.0], [45.0])
    out = sample_views(model, image, pose, steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(3))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, clip_sample=False, set_alpha_to_one=False,
    )
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [501, 1]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ctx = model.context(model.clip_embed(image), pose)
        cond = model.cond_latent(image)
        for t in scheduler.timesteps:
            e_cond = model.eps(latents, t[None], ctx, cond)
            e_uncond = model.eps(latents, t[None], torch.zeros_like(ctx), torch.zeros_like(cond))
            latents = scheduler.step(e_uncond + 2.0 * (e_cond - e_uncond), t, latents).prev_sample
        expected = model.decode(latents)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_sample_views_rejects_bad_shapes(model):
    with pytest.raises(ValueError, match="image"):
        sample_views(model, torch.rand(2, 3, 64, 64), torch.zeros(1, 4), steps=1)


def test_pose_pairing_and_paths(tmp_path):
    assert pair_poses((0.0,), (90.0, 180.0)) == [(0.0, 90.0), (0.0, 180.0)]
    assert pair_poses((10.0, 20.0), (30.0, 40.0)) == [(10.0, 30.0), (20.0, 40.0)]
    with pytest.raises(ReconError, match="--elevation has 2 values and --azimuth 3"):
        pair_poses((1.0, 2.0), (1.0, 2.0, 3.0))
    assert output_paths(tmp_path / "v.png", 2, grid=False) == [tmp_path / "v_00.png", tmp_path / "v_01.png"]
    assert output_paths(tmp_path / "v.png", 3, grid=True) == [tmp_path / "v.png"]
    with pytest.raises(ReconError, match="png"):
        output_paths(tmp_path / "v.jpg", 1, grid=False)
    grid = make_grid(torch.zeros(3, 3, 4, 4))
    assert grid.shape == (3, 8, 8) and grid[:, 4:, 4:].min() == 1 and grid[:, :4, :4].max() == 0


@pytest.fixture
def photo(tmp_path):
    """An RGBA photo of a red disc on a transparent background."""
    yy, xx = np.mgrid[:80, :80]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 < 25**2
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[disc] = (220, 40, 30, 255)
    path = tmp_path / "disc.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_cli_writes_numbered_pngs_marked_random(photo, tmp_path, capsys):
    out = tmp_path / "views" / "novel.png"
    code = main(["novel-view", str(photo), "--model", "random-tiny", "--elevation", "0", "30", "--azimuth", "90",
                 "-o", str(out), "--steps", "2", "--device", "cpu", "--seed", "1"])
    assert code == 0
    err = capsys.readouterr().err
    assert "RANDOM WEIGHTS" in err
    files = sorted((tmp_path / "views").iterdir())
    assert [f.name for f in files] == ["novel_00.png", "novel_01.png"]
    with Image.open(files[1]) as png:
        assert png.size == (64, 64) and png.mode == "RGB"
        assert png.text["recon:random"] == "true" and "RANDOM" in png.text["recon:model"]
        assert png.text["recon:poses"] == "el=30 az=90"
        second = np.asarray(png)
    # Same seed, same views.
    main(["novel-view", str(photo), "--model", "random-tiny", "--elevation", "0", "30", "--azimuth", "90",
          "-o", str(tmp_path / "again.png"), "--steps", "2", "--device", "cpu", "--seed", "1"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again_01.png")), second)


def test_cli_grid_and_errors(photo, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["novel-view", str(photo), "--model", "random-tiny", "--azimuth", "0", "120", "240", "--grid",
                 "-o", str(out), "--steps", "2", "--device", "cpu"]) == 0
    with Image.open(out) as png:
        assert png.size == (128, 128)
        assert png.text["recon:poses"] == "el=0 az=0; el=0 az=120; el=0 az=240"
    assert main(["novel-view", str(photo), "--model", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "x.png")]) == 3
    assert "missing.ckpt" in capsys.readouterr().err
    assert main(["novel-view", str(tmp_path / "nope.png"), "--model", "random-tiny", "-o", str(tmp_path / "y.png"), "--steps", "1"]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()
