"""The PyTorch occupancy-grid sampler (recon.render.occupancy): nerfacc's refresh, lattice marching, packed weights."""

from __future__ import annotations

import math

import pytest
import torch

from recon.cameras import Cameras, generate_rays
from recon.encoding import HashGridConfig
from recon.field import FieldConfig, RadianceField
from recon.render import RendererConfig, VolumeRenderer
from recon.render.compositing import compositing_weights
from recon.render.occupancy import TorchOccupancyGrid, accumulate_packed, packed_weights

TINY = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.5, backend="torch")
AABB = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def _ball(points: torch.Tensor) -> torch.Tensor:
    """Density 50 inside a ball of radius 0.4 around (0.1, 0, 0), 0 elsewhere."""
    return 50.0 * ((points - points.new_tensor([0.1, 0.0, 0.0])).norm(dim=-1) < 0.4).float()


def _rays(size: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    cams = Cameras.from_spherical(torch.tensor([15.0]), torch.tensor([40.0]), torch.tensor([2.5]), 45.0, size)
    origins, directions = generate_rays(cams)
    return origins.reshape(-1, 3), directions.reshape(-1, 3)


def test_refresh_matches_nerfacc_update_step_for_step():
    nerfacc = pytest.importorskip("nerfacc")
    ours = TorchOccupancyGrid(AABB, 8)
    theirs = nerfacc.OccGridEstimator(roi_aabb=AABB.reshape(-1), resolution=8, levels=1).train()
    for step in (0, 3, 4, 8):  # warm-up (every cell), a skipped step, then sampled cells
        torch.manual_seed(step)
        ours.update(step, _ball, 0.01, 0.01, every=4, warmup_steps=5)
        torch.manual_seed(step)
        theirs.update_every_n_steps(step, lambda x: _ball(x) * 0.01, occ_thre=0.01, warmup_steps=5, n=4)
        assert torch.equal(ours.estimator.occs, theirs.occs)
        assert torch.equal(ours.estimator.binaries, theirs.binaries)
    assert 0.0 < ours.occupied_fraction < 0.2
    assert set(ours.state_dict()) == {"estimator.occs", "estimator.binaries"}


def _reference_samples(grid, origin, direction, base, step, density_fn, eps):
    """One ray marched in a Python loop, as nerfacc's traversal does: lattice base + k * step, kept while the
    midpoint is inside the box in an occupied cell and the transmittance before it is >= eps."""
    lo, hi = AABB[0], AABB[1]
    starts, optical = [], 0.0
    for k in range(2000):
        mid = base + (k + 0.5) * step
        point = origin + direction * mid
        if not ((point >= lo) & (point < hi)).all():
            continue
        cell = ((point - lo) / (hi - lo) * grid.resolution).floor().long().clamp(0, grid.resolution - 1)
        if not grid.estimator.binaries[0, cell[0], cell[1], cell[2]]:
            continue
        if math.exp(-optical) < eps:
            break
        starts.append(mid - 0.5 * step)
        optical += float(density_fn(point[None])[0]) * step
    return starts


@pytest.mark.parametrize(("eps", "first_round", "two_rounds"), [(0.0, 32, True), (1e-2, 32, True), (1e-2, 2, True), (1e-2, 2, False)])
def test_lattice_marching_matches_a_per_ray_loop(eps, first_round, two_rounds, monkeypatch):
    # first_round 2: most rays need the second round of density evaluations (the rest of their candidates)
    monkeypatch.setattr("recon.render.occupancy.FIRST_ROUND", first_round)
    grid = TorchOccupancyGrid(AABB, 16)
    grid.update(0, _ball, 0.02, 0.01, every=1, warmup_steps=10)
    origins, directions = _rays(7)
    step = 0.02
    rays, t_starts, t_ends, prefix = grid.sample(origins, directions, _ball, step, 0.0, eps, stratified=False, two_rounds=two_rounds)
    assert prefix is None  # not asked for
    assert torch.equal(rays, rays.sort().values) and rays.dtype == torch.long
    torch.testing.assert_close(t_ends - t_starts, torch.full_like(t_starts, step))
    hit = 0
    for r in range(origins.shape[0]):
        expected = _reference_samples(grid, origins[r], directions[r], 0.0, step, _ball, eps)
        got = t_starts[rays == r]
        assert got.numel() == len(expected), r
        torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), atol=1e-4, rtol=0)
        hit += bool(expected)
    assert hit > 5  # the ball is seen


def test_stratified_marching_shifts_the_lattice_and_chunks_agree(monkeypatch):
    grid = TorchOccupancyGrid(AABB, 16)
    grid.update(0, _ball, 0.02, 0.01, every=1, warmup_steps=10)
    origins, directions = _rays(6)
    torch.manual_seed(3)
    whole = grid.sample(origins, directions, _ball, 0.02, 0.0, 1e-3, stratified=True)
    monkeypatch.setattr("recon.render.occupancy.CANDIDATES_PER_CHUNK", 700)  # a few rays per chunk
    torch.manual_seed(3)
    chunked = grid.sample(origins, directions, _ball, 0.02, 0.0, 1e-3, stratified=True)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)
    offsets = torch.remainder(whole[1] / 0.02, 1.0)
    assert offsets.std() > 0.1  # jittered per ray, not on the plain lattice


def test_packed_weights_match_dense_compositing():
    torch.manual_seed(0)
    sigmas = torch.rand(5, 7, dtype=torch.float64) * 30
    deltas = torch.rand(5, 7, dtype=torch.float64) * 0.1
    t_starts = torch.cumsum(deltas, 1) - deltas
    dense, _, _ = compositing_weights(sigmas, deltas)
    rays = torch.arange(5).repeat_interleave(7)
    packed = packed_weights(t_starts.reshape(-1), (t_starts + deltas).reshape(-1), sigmas.reshape(-1), rays)
    torch.testing.assert_close(packed.view(5, 7), dense)
    values = torch.rand(35, 3, dtype=torch.float64)
    torch.testing.assert_close(accumulate_packed(packed, values, rays, 6)[:5], (dense[..., None] * values.view(5, 7, 3)).sum(1))
    assert accumulate_packed(packed, None, rays, 6)[5].item() == 0.0  # a ray without samples


def test_grid_renderer_matches_stratified_on_a_smooth_field():
    torch.manual_seed(0)
    field = RadianceField(FieldConfig(encoding=TINY))
    with torch.no_grad():  # blob bias alone plus a smooth colour: a soft ball
        field.mlp[-1].weight.zero_()
        field.mlp[-1].bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    grid = VolumeRenderer(field, RendererConfig(sampler="grid", grid_resolution=32)).train()
    grid.update_occupancy(0)
    grid.eval()
    strat = VolumeRenderer(field, RendererConfig(sampler="stratified", samples_per_ray=512)).eval()
    cams = Cameras.from_spherical(torch.tensor([10.0]), torch.tensor([30.0]), torch.tensor([3.0]), 40.0, 24)
    with torch.no_grad():
        a = grid.render(cams, torch.ones(3), normals=True)
        b = strat.render(cams, torch.ones(3), normals=True)
    for key in ("rgb", "opacity", "depth", "normal"):
        difference = (a[key] - b[key]).abs() / (3.0 if key == "depth" else 1.0)
        assert difference.mean().item() < 0.02, key
        assert difference.max().item() < 0.1, key
    out = grid.train().render(cams, torch.ones(3))
    out["rgb"].sum().backward()
    assert field.mlp[-1].weight.grad.abs().sum() > 0



def test_occupied_box_follows_refreshes_and_loaded_state():
    renderer = VolumeRenderer(RadianceField(FieldConfig(encoding=TINY)), RendererConfig(sampler="grid", grid_resolution=8)).train()
    assert renderer.occupancy.occupied_box() is None  # nothing occupied yet: no samples at all
    origins, directions = _rays(4)
    rays, t_starts, _, prefix = renderer.occupancy.sample(origins, directions, renderer.field.density, 0.05, 0.0, 1e-4, stratified=False, prefix_rays=3)
    assert rays.numel() == 0 and t_starts.numel() == 0 and prefix == 0
    renderer.update_occupancy(0)  # the blob: cells around the centre
    box, diagonal, mean = renderer.occupancy.occupied_box()
    assert (box[0] > -1).all() and (box[1] < 1).all() and diagonal < 2 * math.sqrt(3)
    assert mean == pytest.approx(renderer.occupancy.estimator.occs.mean().item())
    fresh = VolumeRenderer(RadianceField(FieldConfig(encoding=TINY)), RendererConfig(sampler="grid", grid_resolution=8))
    fresh.occupancy.update(0, lambda p: torch.full(p.shape[:1], 100.0), 0.05, 0.01, every=1, warmup_steps=1)
    assert torch.equal(fresh.occupancy.occupied_box()[0], AABB)  # every cell occupied: the whole box, cached
    fresh.load_state_dict(renderer.state_dict())  # a loaded grid replaces the cached box
    torch.testing.assert_close(fresh.occupancy.occupied_box()[0], box)
    fresh.occupancy.update(0, lambda p: torch.full(p.shape[:1], 100.0), 0.05, 0.01, every=1, warmup_steps=1)
    fresh.occupancy.occupied_box()
    fresh.to(torch.float64)  # moving the module (device or dtype) drops the box cached on the old one
    assert fresh.occupancy._box is None


@pytest.mark.parametrize("sampler", ["grid", "stratified"])
def test_rays_that_find_no_samples_and_no_rays_at_all_render(sampler):
    renderer = VolumeRenderer(RadianceField(FieldConfig(encoding=TINY)), RendererConfig(sampler=sampler, grid_resolution=8))
    renderer.train().update_occupancy(0)
    white = torch.ones(3)
    missing = renderer.render_rays(torch.tensor([[0.0, 5.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]), white)  # away from the box
    assert torch.equal(missing["rgb"], white[None]) and missing["opacity"].item() == 0.0
    none = renderer.render_rays(torch.zeros(0, 3), torch.zeros(0, 3), white, normals=True)
    assert {k: tuple(v.shape) for k, v in none.items()} == {"rgb": (0, 3), "opacity": (0, 1), "depth": (0, 1), "normal": (0, 3), "orientation": (0, 1)}


def test_a_grid_renderer_loads_a_nerfacc_checkpoint():
    # nerfacc's estimator also saves its resolution and box; the PyTorch grid keeps only occs and binaries.
    renderer = VolumeRenderer(RadianceField(FieldConfig(encoding=TINY)), RendererConfig(sampler="grid", grid_resolution=8)).train()
    renderer.update_occupancy(0)
    state = renderer.state_dict()
    state["occupancy.estimator.resolution"] = torch.tensor([8, 8, 8], dtype=torch.int32)
    state["occupancy.estimator.aabbs"] = AABB.reshape(1, 6)
    fresh = VolumeRenderer(RadianceField(FieldConfig(encoding=TINY)), RendererConfig(sampler="grid", grid_resolution=8))
    fresh.load_state_dict(state)  # strict
    assert torch.equal(fresh.occupancy.estimator.binaries, renderer.occupancy.estimator.binaries)


def test_renders_without_gradients_use_smaller_chunks_with_the_same_pixels():
    torch.manual_seed(0)
    field = RadianceField(FieldConfig(encoding=TINY))
    renderers = [VolumeRenderer(field, RendererConfig(sampler="grid", grid_resolution=16, step_size=0.05, chunk_rays=c)) for c in (None, 1 << 20)]
    renderers[0].train().update_occupancy(0)
    renderers[1].load_state_dict(renderers[0].state_dict())
    assert renderers[0].chunk_rays(torch.device("cpu")) == 262144  # training: one chunk per step
    cams = Cameras.from_spherical(torch.tensor([10.0, 40.0]), torch.tensor([30.0, 200.0]), torch.tensor([2.5, 2.5]), 45.0, 190)
    with torch.no_grad():
        assert renderers[0].chunk_rays(torch.device("cpu")) == 65536  # 72200 rays: two chunks
        a, b = (r.eval().render(cams, torch.ones(3)) for r in renderers)
    for key in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(a[key], b[key])
    assert a["opacity"].max() > 0.5


def test_alpha_threshold_drops_near_empty_samples_and_keeps_the_image():
    """threestudio's alpha threshold (0.01, the default) against the exact sampler (0): the faint rim of a
    soft ball is no longer shaded, and the render changes by about that rim's own opacity."""
    torch.manual_seed(0)
    field = RadianceField(FieldConfig(encoding=TINY, blob_density=60.0, blob_radius=0.8))
    with torch.no_grad():  # blob bias plus a constant raw density offset: a dense ball in a faint fog
        field.mlp[-1].weight.zero_()
        field.mlp[-1].bias.copy_(torch.tensor([-4.0, 1.0, -1.0, 0.5]))
    renderers = {a: VolumeRenderer(field, RendererConfig(sampler="grid", grid_resolution=16, alpha_threshold=a, occupancy_threshold=1e-5)).train() for a in (0.0, 0.01)}
    for renderer in renderers.values():
        torch.manual_seed(1)  # the same random point per cell: the same grid
        renderer.update_occupancy(0)
    origins, directions = _rays(24)
    counts, images = {}, {}
    for alpha, renderer in renderers.items():
        box = renderer.occupancy.occupied_box()
        assert box[2] > 0.01  # the cap (mean occupancy) does not lower the threshold here
        counts[alpha] = renderer.occupancy.sample(origins, directions, field.density, renderer.step_size, alpha, 1e-4, stratified=False).ray_indices.numel()
        with torch.no_grad():
            images[alpha] = renderer.eval().render_rays(origins, directions, torch.ones(3))
    assert counts[0.01] < 0.6 * counts[0.0]  # measured 22313 of 38639
    # the pruned samples' opacity is lost (never gained): measured 0.014 on average, up to 0.35 on rays that graze
    # the soft rim, which is why the fit benchmarks compare both settings (bench/fit_quality.py, bench/fit_views.py)
    fog = images[0.0]["opacity"] - images[0.01]["opacity"]
    assert fog.min().item() >= -1e-6 and 0.0 < fog.mean().item() < 0.02
    assert (images[0.0]["rgb"] - images[0.01]["rgb"]).abs().mean().item() < 0.01  # measured 0.0063


@pytest.mark.parametrize(("alpha", "eps"), [(1e-3, 1e-2), (0.0, 1e-2), (1e-3, 0.0), (0.0, 0.0)])
def test_one_round_of_density_queries_gives_the_samples_of_two_and_counts_the_prefix(alpha, eps):
    grid = TorchOccupancyGrid(AABB, 16)
    grid.update(0, _ball, 0.02, 0.01, every=1, warmup_steps=10)
    origins, directions = _rays(9)
    samples = {}
    for two_rounds in (True, False):
        torch.manual_seed(5)  # the same stratified jitter
        samples[two_rounds] = grid.sample(origins, directions, _ball, 0.005, alpha, eps, stratified=True, prefix_rays=40, two_rounds=two_rounds)
    for a, b in zip(samples[True], samples[False], strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    rays = samples[False].ray_indices
    assert samples[False].prefix == int((rays < 40).sum()) and 0 < samples[False].prefix < rays.numel()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_sampling_pass_waits_for_the_device_three_times_in_one_round_five_in_two():
    import warnings

    grid = TorchOccupancyGrid(AABB, 16).cuda()
    grid.update(0, _ball, 0.02, 0.01, every=1, warmup_steps=10)
    grid.occupied_box()  # computed once per refresh, not per pass
    origins, directions = (t.cuda() for t in _rays(9))
    centre = torch.tensor([0.1, 0.0, 0.0], device="cuda")  # _ball's own copy of it to the device would wait too

    def ball(points: torch.Tensor) -> torch.Tensor:
        return 50.0 * ((points - centre).norm(dim=-1) < 0.4).float()

    waits = {}
    for two_rounds in (False, True):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                samples = grid.sample(origins, directions, ball, 0.005, 1e-3, 1e-2, stratified=True, prefix_rays=40, two_rounds=two_rounds)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        waits[two_rounds] = sum("synchroniz" in str(w.message) for w in caught)
        assert samples.ray_indices.numel() > 0 and samples.prefix == int((samples.ray_indices < 40).sum())
    # the rays that cross the grid, their candidates, the survivors' and the prefix's counts; two rounds also
    # pack each round's candidates
    assert waits == {False: 3, True: 5}


def test_early_stopping_evaluates_the_density_of_few_candidates_behind_the_surface():
    grid = TorchOccupancyGrid(AABB, 16)
    grid.update(0, _ball, 0.02, 0.01, every=1, warmup_steps=10)
    origins, directions = _rays(7)
    evaluated = {}

    def counting(eps):
        def density(points):
            evaluated[eps] = evaluated.get(eps, 0) + points.shape[0]
            return _ball(points)

        return density

    for eps in (0.0, 1e-2):  # alpha_threshold > 0 with eps 0: every candidate is evaluated once
        grid.sample(origins, directions, counting(eps), 0.005, 1e-3, eps, stratified=False)
    # the ball (optical depth 0.25 per step) stops a ray within ~20 candidates: the second round is nearly empty
    assert evaluated[1e-2] < 0.7 * evaluated[0.0]
