"""Analytic-primitive objects: exact silhouettes, depths, normals, surface samples, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from recon.cameras import Cameras, generate_rays
from recon.data.primitives import (
    Box,
    Capsule,
    Cylinder,
    Material,
    PrimitiveObject,
    Sphere,
    mug,
    random_object,
    render_object,
    toy_robot,
)

RED = Material((1.0, 0.0, 0.0))


def _camera(elevation: float = 0.0, azimuth: float = 0.0, radius: float = 3.8, size: int = 96) -> Cameras:
    return Cameras.from_spherical(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([radius]), 20.0, size)


def _sphere(radius: float = 0.5, center=(0.0, 0.0, 0.0), material: Material = RED) -> Sphere:
    return Sphere(torch.tensor(center), torch.eye(3), material, radius=radius)


def test_sphere_renders_as_disk_of_the_right_radius_and_depth():
    distance, r = 3.8, 0.5
    cameras = _camera(elevation=20.0, azimuth=40.0, radius=distance)
    out = render_object(PrimitiveObject([_sphere(r)]), cameras)
    origins, directions = generate_rays(cameras)
    to_center = -origins / origins.norm(dim=-1, keepdim=True)
    cos_angle = (directions * to_center).sum(-1)[0]
    angle = torch.acos(cos_angle.clamp(-1, 1))
    half_angle = math.asin(r / distance)
    alpha = out["rgba"][0, ..., 3]
    clear = (angle - half_angle).abs() > 1e-4
    assert torch.equal(alpha[clear] > 0.5, (angle < half_angle)[clear])
    # The disk's pixel area matches pi * (f tan(half_angle))^2 up to the rim.
    radius_px = float(cameras.focal[0]) * math.tan(half_angle)
    assert abs(float(alpha.sum()) - math.pi * radius_px**2) < 2 * math.pi * radius_px
    # Depth along the ray: d cos(a) - sqrt(r^2 - d^2 sin^2(a)) (float32 loses digits at the rim).
    hit = alpha > 0.5
    cos64 = cos_angle.double()
    expected = distance * cos64 - torch.sqrt((r**2 - distance**2 * (1 - cos64**2)).clamp_min(0))
    torch.testing.assert_close(out["depth"][0, ..., 0][hit].double(), expected[hit], atol=5e-4, rtol=0)
    assert torch.all(out["depth"][0, ..., 0][~hit] == 0)
    # Normals are the unit radial direction at the hit point.
    points = origins[0] + out["depth"][0] * directions[0]
    torch.testing.assert_close(out["normal"][0][hit], (points / r)[hit], atol=1e-4, rtol=0)


def test_box_front_face_depth_and_cylinder_seen_along_its_axis():
    distance = 3.0
    box = Box(torch.zeros(3), torch.eye(3), RED, half_size=torch.tensor([0.3, 0.2, 0.25]))
    cameras = _camera(radius=distance)
    out = render_object(PrimitiveObject([box]), cameras)
    _, directions = generate_rays(cameras)
    hit = out["rgba"][0, ..., 3] > 0.5
    cos_angle = -directions[0, ..., 2]
    torch.testing.assert_close(out["depth"][0, ..., 0][hit], ((distance - 0.25) / cos_angle)[hit], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["normal"][0][hit], torch.tensor([0.0, 0.0, 1.0]).expand_as(out["normal"][0])[hit])
    # The silhouette is the rectangle |x| <= 0.3, |y| <= 0.2 on the plane z = 0.25.
    rays_hit_plane = directions[0] * ((distance - 0.25) / cos_angle)[..., None]
    inside = (rays_hit_plane[..., 0].abs() < 0.3 - 1e-3) & (rays_hit_plane[..., 1].abs() < 0.2 - 1e-3)
    outside = (rays_hit_plane[..., 0].abs() > 0.3 + 1e-3) | (rays_hit_plane[..., 1].abs() > 0.2 + 1e-3)
    assert hit[inside].all() and not hit[outside].any()

    cylinder = Cylinder(torch.zeros(3), torch.eye(3), RED, radius=0.3, half_height=0.4)
    top = render_object(PrimitiveObject([cylinder]), _camera(elevation=90.0, radius=distance))
    hit = top["rgba"][0, ..., 3] > 0.5
    center_depth = top["depth"][0, 48, 48, 0]
    assert abs(float(center_depth) - (distance - 0.4)) < 1e-3
    torch.testing.assert_close(top["normal"][0][hit], torch.tensor([0.0, 1.0, 0.0]).expand_as(top["normal"][0])[hit])


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.det(q))


@pytest.mark.parametrize(
    "piece",
    [
        Box(torch.tensor([0.1, 0.0, -0.1]), _rotation(1), RED, half_size=torch.tensor([0.3, 0.15, 0.4])),
        Cylinder(torch.tensor([0.0, 0.1, 0.0]), _rotation(2), RED, radius=0.25, half_height=0.35),
        Capsule(torch.tensor([0.0, 0.0, 0.1]), _rotation(3), RED, radius=0.2, half_length=0.3),
        _sphere(0.4, (0.1, 0.2, 0.0)),
    ],
    ids=["box", "cylinder", "capsule", "sphere"],
)
def test_every_primitive_ray_hits_and_samples_lie_on_its_surface(piece):
    cameras = Cameras.from_spherical(torch.tensor([10.0, 50.0]), torch.tensor([30.0, -120.0]), torch.tensor([3.0, 3.0]), 25.0, 48)
    out = render_object(PrimitiveObject([piece]), cameras)
    origins, directions = generate_rays(cameras)
    hit = out["rgba"][..., 3] > 0.5
    assert hit.sum() > 100
    points = (origins + out["depth"] * directions)[hit]
    assert piece.sdf(points).abs().max() < 1e-4
    # The normal is the SDF gradient at the hit point.
    probe = points.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(piece.sdf(probe).sum(), probe)
    cosine = (grad * out["normal"][hit]).sum(-1) / grad.norm(dim=-1)
    assert cosine.min() > 0.99
    samples, normals = piece.sample_surface(2000, torch.Generator().manual_seed(0))
    assert piece.sdf(samples).abs().max() < 1e-5
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(2000))
    # Samples are spread over the whole area: the mean of a closed surface's normals is ~0.
    assert normals.mean(0).norm() < 0.1


def test_box_samples_are_uniform_over_area():
    box = Box(torch.zeros(3), torch.eye(3), RED, half_size=torch.tensor([0.5, 0.1, 0.1]))
    _, normals = box.sample_surface(20000, torch.Generator().manual_seed(0))
    on_end_faces = float((normals[:, 0].abs() > 0.5).float().mean())
    assert abs(on_end_faces - 2 * 0.04 / box.area()) < 0.01


def test_union_samples_lie_on_the_outer_surface_only():
    a, b = _sphere(0.4, (-0.2, 0.0, 0.0)), _sphere(0.4, (0.2, 0.0, 0.0))
    obj = PrimitiveObject([a, b])
    points, _ = obj.sample_surface(3000, seed=1)
    assert points.shape == (3000, 3)
    assert obj.sdf(points).abs().max() < 1e-5
    assert torch.minimum(a.sdf(points), b.sdf(points)).min() > -1e-5
    assert (a.sdf(points) > -1e-5).all() and (b.sdf(points) > -1e-5).all()


def test_union_samples_cover_every_piece_in_proportion_to_its_area():
    # Two disjoint spheres listed small-first: the samples split ~1:4 by area (a truncation that kept the first
    # pieces' points would give the small one far more than its share, or the big one nothing).
    small, big = _sphere(0.1, (-0.4, 0.0, 0.0)), _sphere(0.2, (0.2, 0.0, 0.0))
    points, _ = PrimitiveObject([small, big]).sample_surface(4000, seed=2)
    on_big = float((big.sdf(points).abs() < 1e-5).float().mean())
    assert abs(on_big - 0.8) < 0.03, on_big
    robot = toy_robot()
    points, _ = robot.sample_surface(20_000, seed=1)
    owner = torch.stack([piece.sdf(points).abs() for piece in robot.primitives]).argmin(dim=0)
    assert set(owner.tolist()) == set(range(len(robot.primitives)))  # arms, legs, eyes and antenna too


@pytest.mark.parametrize("make", [toy_robot, mug, lambda: random_object(7)], ids=["robot", "mug", "random"])
def test_built_objects_fit_the_sphere_and_rendered_points_are_on_the_surface(make):
    obj = make()
    assert obj.bounding_radius() <= 0.55 + 1e-5
    points, _ = obj.sample_surface(2000, seed=0)
    assert points.norm(dim=-1).max() <= 0.55 + 1e-4
    assert obj.sdf(points).abs().max() < 1e-4
    cameras = _camera(elevation=25.0, azimuth=-35.0, size=48)
    out = render_object(obj, cameras, shading="albedo")
    origins, directions = generate_rays(cameras)
    hit = out["rgba"][..., 3] > 0.5
    hit_points = (origins + out["depth"] * directions)[hit]
    assert obj.sdf(hit_points).abs().max() < 1e-4
    # Pure-albedo renders show exactly the albedo function at the hit points.
    torch.testing.assert_close(out["rgba"][..., :3][hit], obj.albedo(hit_points), atol=1e-5, rtol=0)


def test_lambert_shading_and_supersampled_alpha():
    obj = PrimitiveObject([_sphere(0.5, material=Material((0.8, 0.6, 0.4)))])
    cameras = _camera(size=64)
    light = (0.0, 0.0, 1.0)
    out = render_object(obj, cameras, light_direction=light, ambient=0.25)
    # The centre pixel's normal faces the light: full albedo.
    torch.testing.assert_close(out["rgba"][0, 32, 32, :3], torch.tensor([0.8, 0.6, 0.4]), atol=2e-3, rtol=0)
    hit = out["rgba"][0, ..., 3] > 0.5
    shade = 0.25 + 0.75 * out["normal"][0, ..., 2].clamp_min(0)
    torch.testing.assert_close(out["rgba"][0, ..., 0][hit], (0.8 * shade)[hit], atol=1e-5, rtol=0)
    smooth = render_object(obj, cameras, supersample=4)["rgba"][0, ..., 3]
    fractional = (smooth > 0.05) & (smooth < 0.95)
    assert fractional.any()
    # Partly covered pixels sit on the binary silhouette's rim only.
    assert torch.allclose(smooth.sum(), out["rgba"][0, ..., 3].sum(), rtol=0.02)


def test_patterns_vary_by_position():
    stripes = Material((1.0, 0.0, 0.0), "stripes", (0.0, 0.0, 1.0), frequency=2.0)
    local = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.35, 0.0], [5.0, 0.1, -3.0]])
    torch.testing.assert_close(stripes.evaluate(local), torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 0]]))
    checker = Material((1.0, 1.0, 1.0), "checker", (0.0, 0.0, 0.0), frequency=1.0)
    colors = checker.evaluate(torch.tensor([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [1.5, 1.5, 0.5]]))
    torch.testing.assert_close(colors[:, 0], torch.tensor([1.0, 0.0, 1.0]))


def test_deterministic_by_seed():
    cameras = _camera(elevation=30.0, azimuth=60.0, size=32)
    first = render_object(random_object(11), cameras)["rgba"]
    again = render_object(random_object(11), cameras)["rgba"]
    other = render_object(random_object(12), cameras)["rgba"]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    p1, _ = random_object(11).sample_surface(500, seed=3)
    p2, _ = random_object(11).sample_surface(500, seed=3)
    assert torch.equal(p1, p2)
