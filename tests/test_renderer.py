"""Volume renderer: compositing, box misses, chunking, gradients, silhouettes, occupancy state."""

from __future__ import annotations

import math

import pytest
import torch

from recon.cameras import Cameras, generate_rays
from recon.encoding import HashGridConfig
from recon.errors import ReconError
from recon.field import FieldConfig, FieldOutput, RadianceField
from recon.render import RendererConfig, VolumeRenderer
from recon.render.compositing import accumulate, compositing_weights, over_background
from recon.render.samplers import stratified_samples

TINY = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.5, backend="torch")


class HalfSpaceField(RadianceField):
    """Density 1 and red for z < 0, density 2 and blue for z >= 0 (inside the box)."""

    def density(self, points):
        inside = (points.abs() <= self.cfg.bound).all(-1)
        return torch.where(points[:, 2] < 0, 1.0, 2.0) * inside

    def forward(self, points, with_normals=False, normal_points=None):
        red, blue = points.new_tensor([1.0, 0.0, 0.0]), points.new_tensor([0.0, 0.0, 1.0])
        albedo = torch.where(points[:, 2:3] < 0, red, blue)
        normal = points.new_tensor([0.0, 0.0, -1.0]).expand_as(points) if with_normals else None
        return FieldOutput(self.density(points), albedo, normal)


class SphereField(RadianceField):
    """Opaque grey ball of radius 0.5 (density 1000)."""

    def density(self, points):
        return 1000.0 * (points.norm(dim=-1) < 0.5).to(points.dtype)

    def forward(self, points, with_normals=False, normal_points=None):
        return FieldOutput(self.density(points), torch.full_like(points, 0.5))


def _config(**kwargs) -> FieldConfig:
    return FieldConfig(encoding=TINY, **kwargs)


def _renderer(field_cls=RadianceField, **kwargs) -> VolumeRenderer:
    torch.manual_seed(0)
    kwargs.setdefault("sampler", "stratified")
    return VolumeRenderer(field_cls(_config()), RendererConfig(**kwargs)).eval()


def _camera(size: int = 12, radius: float = 3.0, fovy_deg: float = 40.0) -> Cameras:
    return Cameras.from_spherical(torch.tensor([10.0]), torch.tensor([30.0]), torch.tensor([radius]), fovy_deg, size)


def test_compositing_hand_computed():
    sigmas = torch.tensor([[1.0, 2.0, 0.0]])
    deltas = torch.tensor([[0.5, 0.5, 1.0]])
    weights, transmittance, alphas = compositing_weights(sigmas, deltas)
    a0, a1 = 1 - math.exp(-0.5), 1 - math.exp(-1.0)
    torch.testing.assert_close(alphas, torch.tensor([[a0, a1, 0.0]]))
    torch.testing.assert_close(transmittance, torch.tensor([[1.0, 1 - a0, (1 - a0) * (1 - a1)]]))
    w = torch.tensor([[0.393469, 0.383400, 0.0]])
    torch.testing.assert_close(weights, w, atol=1e-6, rtol=0)
    colours = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    opacity = accumulate(weights)
    torch.testing.assert_close(opacity, torch.tensor([[0.776869]]), atol=1e-6, rtol=0)
    rgb = over_background(accumulate(weights, colours), opacity, torch.ones(3))
    torch.testing.assert_close(rgb, torch.tensor([[0.393469 + 0.223131, 0.383400 + 0.223131, 0.223131]]), atol=1e-6, rtol=0)
    depth = accumulate(weights, torch.tensor([[[0.25], [0.75], [1.5]]]))
    torch.testing.assert_close(depth, torch.tensor([[0.25 * 0.393469 + 0.75 * 0.383400]]), atol=1e-6, rtol=0)


def test_renderer_two_sample_ray_hand_computed():
    renderer = _renderer(HalfSpaceField, samples_per_ray=2)
    origins, directions = torch.tensor([[0.0, 0.0, -3.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    out = renderer.render_rays(origins, directions, torch.tensor([0.0, 1.0, 0.0]), normals=True)
    # box entry t=2, exit t=4: bins [2, 3] (z=-0.5, sigma 1) and [3, 4] (z=0.5, sigma 2)
    w0, w1 = 1 - math.exp(-1.0), math.exp(-1.0) * (1 - math.exp(-2.0))
    opacity = w0 + w1
    torch.testing.assert_close(out["opacity"], torch.tensor([[opacity]]))
    torch.testing.assert_close(out["rgb"], torch.tensor([[w0, 1 - opacity, w1]]))
    torch.testing.assert_close(out["depth"], torch.tensor([[2.5 * w0 + 3.5 * w1]]))
    torch.testing.assert_close(out["normal"], torch.tensor([[0.0, 0.0, -opacity]]))
    torch.testing.assert_close(out["orientation"], torch.zeros(1, 1))  # normals face the camera


def test_ray_missing_the_box_gives_background():
    renderer = _renderer(HalfSpaceField, samples_per_ray=8)
    origins = torch.tensor([[0.0, 3.0, -3.0], [0.0, 0.0, -3.0]])
    directions = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    background = torch.tensor([[0.2, 0.3, 0.4], [0.5, 0.6, 0.7]])
    out = renderer.render_rays(origins, directions, background)
    torch.testing.assert_close(out["rgb"][0], background[0], atol=0, rtol=0)
    assert out["opacity"][0].item() == 0.0 and out["depth"][0].item() == 0.0
    assert out["opacity"][1].item() > 0.9


def test_per_pixel_background_and_output_shapes():
    renderer = _renderer(SphereField, samples_per_ray=16)
    cams = Cameras(torch.cat([_camera(8).c2w, _camera(8).c2w]), torch.deg2rad(torch.tensor(40.0)), 8, 10)
    background = torch.rand(2, 8, 10, 3)
    out = renderer.render(cams, background)
    assert out["rgb"].shape == (2, 8, 10, 3) and out["opacity"].shape == (2, 8, 10, 1) and out["depth"].shape == (2, 8, 10, 1)
    empty = out["opacity"][..., 0] == 0
    assert empty.any()
    torch.testing.assert_close(out["rgb"][empty], background[empty])
    with pytest.raises(ValueError, match="background"):
        renderer.render(cams, torch.rand(1, 8, 10, 3))


def test_opaque_sphere_renders_a_disk_of_the_expected_radius():
    size, radius, fovy = 48, 3.0, 30.0
    renderer = _renderer(SphereField, samples_per_ray=96)
    cams = Cameras.from_spherical(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([radius]), fovy, size)
    with torch.no_grad():
        out = renderer.render(cams, torch.ones(3))
    focal = 0.5 * size / math.tan(math.radians(fovy) / 2)
    expected = focal * math.tan(math.asin(0.5 / radius))
    area = (out["opacity"] > 0.5).sum().item()
    assert abs(math.sqrt(area / math.pi) - expected) < 0.5
    assert out["opacity"].amax().item() > 0.99
    centre_depth = out["depth"][0, size // 2 - 1 : size // 2 + 1, size // 2 - 1 : size // 2 + 1].mean().item()
    assert abs(centre_depth - (radius - 0.5)) < 2 * 2.0 / 96  # within two sample bins


def test_chunked_render_equals_unchunked_with_gradients():
    whole = _renderer(chunk_rays=100000, samples_per_ray=12)
    chunked = _renderer(chunk_rays=37, samples_per_ray=12)
    chunked.load_state_dict(whole.state_dict())
    cams, bg = _camera(10), torch.tensor([1.0, 1.0, 1.0])
    grads = []
    outs = []
    for renderer in (whole, chunked):
        out = renderer.render(cams, bg, normals=True)
        loss = out["rgb"].square().sum() + out["opacity"].sum() + out["normal"].sum() + out["orientation"].sum()
        loss.backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.reshape(-1) for p in renderer.field.parameters()]))
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(chunked.render(cams, bg)["rgb"], outs[0]["rgb"].detach(), atol=1e-5, rtol=1e-5)


def test_gradient_reaches_every_field_parameter():
    renderer = _renderer(samples_per_ray=16).train()
    out = renderer.render(_camera(10), torch.zeros(3), normals=True)
    (out["rgb"].sum() + out["orientation"].sum()).backward()
    for name, param in renderer.field.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_stratified_jitter_is_deterministic_given_the_seed():
    renderer = _renderer(samples_per_ray=8).train()
    cams = _camera(6)
    with torch.no_grad():
        torch.manual_seed(5)
        a = renderer.render(cams, torch.ones(3))["rgb"]
        torch.manual_seed(5)
        b = renderer.render(cams, torch.ones(3))["rgb"]
        torch.manual_seed(6)
        c = renderer.render(cams, torch.ones(3))["rgb"]
        renderer.eval()
        d = renderer.render(cams, torch.ones(3))["rgb"]
        e = renderer.render(cams, torch.ones(3))["rgb"]
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)


def test_occupancy_grid_is_module_state_and_checkpoints_cross_samplers():
    pytest.importorskip("nerfacc")
    grid = _renderer(sampler="nerfacc", grid_resolution=8, grid_warmup_steps=10).train()
    assert grid.occupancy.occupied_fraction == 0.0
    grid.update_occupancy(0)  # runs in plain torch: the blob makes the centre occupied
    binaries = grid.occupancy.estimator.binaries[0]
    assert binaries[3:5, 3:5, 3:5].all() and not binaries[0, 0, 0]
    occs = grid.occupancy.estimator.occs.clone()
    grid.update_occupancy(1)  # not a multiple of update_every: unchanged
    assert torch.equal(grid.occupancy.estimator.occs, occs)
    state = grid.state_dict()
    assert "occupancy.estimator.binaries" in state and "occupancy.estimator.occs" in state

    plain = _renderer(sampler="stratified")
    plain.load_state_dict(state)
    torch.testing.assert_close(plain.field.encoding.backend.table, grid.field.encoding.backend.table)
    fresh = _renderer(sampler="nerfacc", grid_resolution=8)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.occupancy.estimator.binaries, grid.occupancy.estimator.binaries)
    fresh.load_state_dict(plain.state_dict())  # a checkpoint without a grid keeps the current one
    assert torch.equal(fresh.occupancy.estimator.binaries, grid.occupancy.estimator.binaries)


def test_nerfacc_sampler_refuses_cpu_rays():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    renderer = _renderer(sampler="nerfacc", grid_resolution=8)
    with pytest.raises(ReconError, match="CUDA"):
        renderer.render(_camera(4), torch.ones(3))
    assert _renderer(sampler="auto").occupancy is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nerfacc_agrees_with_stratified_on_a_smooth_field():
    pytest.importorskip("nerfacc")
    torch.manual_seed(0)
    field = RadianceField(_config()).cuda()
    with torch.no_grad():  # blob bias alone plus a smooth colour: a soft ball
        field.mlp[-1].weight.zero_()
        field.mlp[-1].bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    grid = VolumeRenderer(field, RendererConfig(sampler="nerfacc", grid_resolution=64)).cuda().train()
    grid.update_occupancy(0)
    grid.eval()
    strat = VolumeRenderer(field, RendererConfig(sampler="stratified", samples_per_ray=512)).cuda().eval()
    cams = _camera(64).to("cuda")
    with torch.no_grad():
        a = grid.render(cams, torch.ones(3, device="cuda"), normals=True)
        b = strat.render(cams, torch.ones(3, device="cuda"), normals=True)
    # depth is in world units: compare it relative to the camera distance
    scale = {"depth": float(cams.centers.norm(dim=-1).max())}
    for key in ("rgb", "opacity", "depth", "normal"):
        difference = (a[key] - b[key]).abs() / scale.get(key, 1.0)
        assert difference.mean().item() < 0.02, key
        assert difference.max().item() < 0.1, key
    out = grid.train().render(cams, torch.ones(3, device="cuda"))
    out["rgb"].sum().backward()
    # the zeroed output layer blocks gradients to the table; its own weights get them
    assert field.mlp[-1].weight.grad.abs().sum() > 0


def test_packed_shading_matches_dense_shading():
    renderer = _renderer(samples_per_ray=6)
    origins, directions = (t.reshape(-1, 3) for t in generate_rays(_camera(5)))
    t_starts, t_ends, t_mid = stratified_samples(origins, directions, renderer.field.aabb, 6, jitter=False)
    background = torch.rand(origins.shape[0], 3)
    dense = renderer._shade_dense(origins, directions, background, t_starts, t_ends, t_mid, True)
    ray_indices = torch.arange(origins.shape[0]).repeat_interleave(6)
    packed = renderer._shade_packed(origins, directions, background, ray_indices, t_starts.reshape(-1), t_ends.reshape(-1), True)
    for a, b in zip(dense, packed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_normals_for_the_first_rays_only_match_normals_for_all():
    # the batched training render asks for normals on the random views' rays only (a prefix of the ray set)
    renderer = _renderer(samples_per_ray=6)
    origins, directions = (t.reshape(-1, 3) for t in generate_rays(_camera(5)))
    background = torch.rand(origins.shape[0], 3)
    full = renderer.render_rays(origins, directions, background, normals=True)
    for k in (0, 7, origins.shape[0]):
        part = renderer.render_rays(origins, directions, background, normals=True, normal_rays=k)
        for key in ("rgb", "opacity", "depth"):
            torch.testing.assert_close(part[key], full[key])
        for key in ("normal", "orientation"):
            torch.testing.assert_close(part[key][:k], full[key][:k])
            assert (part[key][k:] == 0).all()
    # packed samples: the prefix of samples belonging to the first k rays
    t_starts, t_ends, _ = stratified_samples(origins, directions, renderer.field.aabb, 6, jitter=False)
    ray_indices = torch.arange(origins.shape[0]).repeat_interleave(6)
    args = (origins, directions, background, ray_indices, t_starts.reshape(-1), t_ends.reshape(-1), True)
    whole, prefix = renderer._shade_packed(*args), renderer._shade_packed(*args, split=7 * 6)
    torch.testing.assert_close(prefix[0], whole[0])
    torch.testing.assert_close(prefix[3][:7], whole[3][:7])
    assert (prefix[3][7:] == 0).all()
