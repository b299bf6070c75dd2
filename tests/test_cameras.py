"""The world frame, look-at poses, rays, view sampling and the Zero123 pose encoding."""

import math

import pytest
import torch

from recon.cameras import (
    Cameras,
    ViewSampler,
    fovy_from_fovx,
    generate_rays,
    look_at,
    orbit,
    pixel_rays,
    position_to_spherical,
    relative_pose,
    spherical_to_position,
)


def test_reference_camera_sits_on_plus_z_and_looks_at_origin():
    cams = Cameras.from_spherical(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.8]), 20.0, 8)
    c2w = cams.c2w[0]
    torch.testing.assert_close(c2w[:3, 3], torch.tensor([0.0, 0.0, 3.8]))
    # OpenGL camera axes: right = +X, up = +Y, looking down -Z (towards the origin).
    torch.testing.assert_close(c2w[:3, :3], torch.eye(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("elevation", "azimuth", "expected"),
    [(0.0, 90.0, (1.0, 0.0, 0.0)), (0.0, -90.0, (-1.0, 0.0, 0.0)), (90.0, 0.0, (0.0, 1.0, 0.0)), (0.0, 180.0, (0.0, 0.0, -1.0))],
)
def test_spherical_positions_on_known_angles(elevation, azimuth, expected):
    position = spherical_to_position(torch.tensor(elevation), torch.tensor(azimuth), torch.tensor(2.0))
    torch.testing.assert_close(position, 2.0 * torch.tensor(expected), atol=1e-6, rtol=0)


def test_spherical_round_trip():
    generator = torch.Generator().manual_seed(0)
    elevation = torch.rand(50, generator=generator) * 170 - 85
    azimuth = torch.rand(50, generator=generator) * 358 - 179
    radius = torch.rand(50, generator=generator) * 3 + 0.5
    el, az, r = position_to_spherical(spherical_to_position(elevation, azimuth, radius))
    torch.testing.assert_close(el, elevation, atol=1e-4, rtol=0)
    torch.testing.assert_close(az, azimuth, atol=1e-4, rtol=0)
    torch.testing.assert_close(r, radius, atol=1e-5, rtol=0)


def test_look_at_is_a_rotation_looking_at_target_with_up_kept():
    eye = spherical_to_position(torch.tensor([30.0, -20.0, 89.9, -89.9]), torch.tensor([45.0, 200.0, 10.0, 0.0]), torch.tensor(3.0))
    c2w = look_at(eye)
    rotation = c2w[:, :3, :3]
    torch.testing.assert_close(rotation.transpose(1, 2) @ rotation, torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(4), atol=1e-5, rtol=0)
    forward = -rotation[:, :, 2]
    torch.testing.assert_close(forward, -eye / eye.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
    # Camera up has a non-negative world-Y component (the image is upright).
    assert (rotation[:, 1, 1] >= -1e-6).all()


def test_look_at_at_the_poles_stays_defined_and_continuous():
    above = look_at(torch.tensor([[0.0, 3.0, 0.0]]))[0]
    near_above = look_at(spherical_to_position(torch.tensor([89.99]), torch.tensor([0.0]), torch.tensor(3.0)))[0]
    torch.testing.assert_close(above[:3, :3], near_above[:3, :3], atol=1e-3, rtol=0)
    below = look_at(torch.tensor([[0.0, -3.0, 0.0]]))[0]
    near_below = look_at(spherical_to_position(torch.tensor([-89.99]), torch.tensor([0.0]), torch.tensor(3.0)))[0]
    torch.testing.assert_close(below[:3, :3], near_below[:3, :3], atol=1e-3, rtol=0)


def test_rays_through_the_centre_and_corners():
    cams = Cameras.from_spherical(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([4.0]), 90.0, 2, 2)
    origins, directions = generate_rays(cams)
    assert origins.shape == directions.shape == (1, 2, 2, 3)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(1, 2, 2))
    # fovy 90 deg on a 2x2 image: pixel centres at +-0.5 of the half-extent 1 -> direction (+-0.5, -+0.5, -1).
    expected_top_left = torch.tensor([-0.5, 0.5, -1.0])
    torch.testing.assert_close(directions[0, 0, 0], expected_top_left / expected_top_left.norm())
    torch.testing.assert_close(origins[0, 1, 1], torch.tensor([0.0, 0.0, 4.0]))


def test_pixel_rays_match_generate_rays_and_the_pinhole_model():
    cameras = Cameras(orbit(3, 20.0, 3.0, 30.0, 6).c2w, torch.tensor([0.5, 0.7, 0.9]), 6, 9)
    origins, directions = generate_rays(cameras)
    image = torch.tensor([0, 2, 1, 2])
    rows = torch.tensor([0, 5, 3, 2])
    cols = torch.tensor([8, 0, 4, 7])
    o, d = pixel_rays(cameras.c2w[image], cameras.focal[image], rows, cols, 6, 9)
    assert torch.allclose(o, origins[image, rows, cols], atol=1e-6)
    assert torch.allclose(d, directions[image, rows, cols], atol=1e-6)
    # Pinhole camera: pixel centre (col + 0.5, row + 0.5) -> camera-space direction (x, y, -1), rotated to world.
    focal = cameras.focal[image]
    local = torch.stack([(cols + 0.5 - 4.5) / focal, -(rows + 0.5 - 3.0) / focal, -torch.ones(4)], dim=-1)
    world = (cameras.c2w[image, :3, :3] @ local[:, :, None])[..., 0]
    torch.testing.assert_close(d, world / world.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(o, cameras.c2w[image, :3, 3])


def test_projection_of_a_world_point_lands_on_the_expected_pixel():
    # A point at +X (the object's right from the front camera) appears on the right half of the image.
    cams = Cameras.from_spherical(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([4.0]), 40.0, 64)
    origins, directions = generate_rays(cams)
    target = torch.tensor([0.5, 0.0, 0.0])
    to_target = (target - origins[0, 0, 0]) / (target - origins[0, 0, 0]).norm()
    best = (directions[0] @ to_target).flatten().argmax()
    row, col = divmod(int(best), 64)
    assert col > 32 and abs(row - 31.5) <= 1


def test_fov_conversion_and_focal():
    assert fovy_from_fovx(math.radians(60), 100, 100) == pytest.approx(math.radians(60))
    assert fovy_from_fovx(math.radians(60), 200, 100) < math.radians(60)
    cams = Cameras.from_spherical(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]), 90.0, 100)
    torch.testing.assert_close(cams.focal, torch.tensor([50.0]))


def test_cameras_indexing_and_resizing():
    cams = orbit(4, 10.0, 3.0, 30.0, 16)
    assert len(cams) == 4 and len(cams[1:3]) == 2 and len(cams[0]) == 1
    assert cams.resized(32, 48).width == 48
    with pytest.raises(ValueError):
        Cameras(torch.zeros(4, 4), torch.tensor(0.5), 8, 8)


def test_view_sampler_respects_ranges_and_seed():
    sampler = ViewSampler(elevation_range=(0.0, 30.0), azimuth_range=(-90.0, 90.0), radius=2.5, fovy_deg=20.0)
    cams, elevation, azimuth = sampler.sample(256, 8, torch.Generator().manual_seed(1))
    assert elevation.min() >= 0 and elevation.max() <= 30
    assert azimuth.min() >= -90 and azimuth.max() <= 90
    torch.testing.assert_close(cams.centers.norm(dim=-1), torch.full((256,), 2.5))
    el, az, _ = position_to_spherical(cams.centers)
    torch.testing.assert_close(el, elevation, atol=1e-3, rtol=0)
    torch.testing.assert_close(az, azimuth, atol=1e-3, rtol=0)
    again, elevation2, _ = sampler.sample(256, 8, torch.Generator().manual_seed(1))
    torch.testing.assert_close(elevation, elevation2)
    torch.testing.assert_close(again.c2w, cams.c2w)


def test_zero123_relative_pose_on_known_poses():
    # Same camera: no rotation.
    torch.testing.assert_close(relative_pose(0.0, 0.0, 3.8, 0.0, 0.0, 3.8), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # Target 30 deg higher: polar decreases by 30 deg; 90 deg to the right; 0.5 further away.
    pose = relative_pose(30.0, 90.0, 4.3, 0.0, 0.0, 3.8)
    torch.testing.assert_close(pose, torch.tensor([-math.pi / 6, 1.0, 0.0, 0.5]), atol=1e-6, rtol=0)
    # Deltas are target minus conditioning, and wrap through sin/cos.
    pose = relative_pose(10.0, -170.0, 3.8, 10.0, 170.0, 3.8)
    torch.testing.assert_close(pose, torch.tensor([0.0, math.sin(math.radians(20)), math.cos(math.radians(20)), 0.0]), atol=1e-6, rtol=0)


def test_stable_zero123_pose_uses_the_conditioning_polar_angle():
    pose = relative_pose(torch.tensor([30.0, 0.0]), torch.tensor([90.0, 0.0]), 3.8, 20.0, 0.0, 3.8, encoding="stable-zero123")
    assert pose.shape == (2, 4)
    torch.testing.assert_close(pose[:, 3], torch.full((2,), math.radians(70.0)))
    torch.testing.assert_close(pose[0, :3], torch.tensor([-math.radians(10.0), 1.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown pose encoding"):
        relative_pose(0.0, 0.0, 1.0, 0.0, 0.0, 1.0, encoding="bogus")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cameras_reach_the_gpu_unchanged_from_expanded_host_tensors():
    cameras = Cameras.from_spherical(torch.tensor([10.0, 20.0]), torch.tensor([0.0, 90.0]), torch.tensor([2.0, 2.0]), 40.0, 16)
    assert cameras.fovy.stride() == (0,)  # expanded: pinning it as it is would fail
    moved = cameras.to("cuda")
    assert moved.c2w.is_cuda and torch.equal(moved.c2w.cpu(), cameras.c2w) and torch.equal(moved.fovy.cpu(), cameras.fovy)
