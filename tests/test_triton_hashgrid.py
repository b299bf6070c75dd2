"""The fused Triton hash grid computes the same function, gradients and second-order terms as the torch reference."""

import pytest
import torch
from triton_setup import DEVICE  # before any kernel: without CUDA, Triton's interpreter runs them

pytest.importorskip("triton")

from recon.encoding.reference import HashGridConfig, TorchHashGrid
from recon.encoding.triton_backend import TritonHashGrid


def _pair(cfg: HashGridConfig, **options) -> tuple[TorchHashGrid, TritonHashGrid]:
    torch.manual_seed(0)
    reference = TorchHashGrid(cfg).double()
    fused = TritonHashGrid(cfg, **options).to(DEVICE)
    with torch.no_grad():
        reference.table.normal_()
        fused.table.copy_(reference.table.float())
    return reference, fused


@pytest.mark.parametrize(("features", "copies"), [(1, 16), (2, 16), (4, 16), (2, 0)])
def test_forward_and_gradients_match_the_reference(features, copies):
    # base 4, scale 2, 2^10 rows: levels 0-1 dense, levels 2-5 hashed.
    cfg = HashGridConfig(n_levels=6, n_features_per_level=features, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)
    reference, fused = _pair(cfg, private_copies=copies, private_max_rows=200)
    assert fused.private_levels == (1 if copies else 0)  # level 0 (5^3 -> 128 rows) is private, level 1 (9^3) is not
    assert reference.hashed.any() and not reference.hashed.all()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(257, 3, generator=generator, dtype=torch.float64)
    x[:6] = x[:6] * 1.4 - 0.2  # some points outside [0, 1]: clamped, zero gradient
    x_ref = x.clone().requires_grad_()
    x_fused = x.float().to(DEVICE).requires_grad_()
    out_ref, out_fused = reference(x_ref), fused(x_fused)
    torch.testing.assert_close(out_fused.double().cpu(), out_ref, atol=1e-4, rtol=1e-4)
    grad = torch.randn(out_ref.shape, generator=generator, dtype=torch.float64)
    out_ref.backward(grad)
    out_fused.backward(grad.float().to(DEVICE))
    torch.testing.assert_close(fused.table.grad.double().cpu(), reference.table.grad, atol=1e-4, rtol=1e-4)
    scale = x_ref.grad.abs().max()
    torch.testing.assert_close(x_fused.grad.double().cpu() / scale, x_ref.grad / scale, atol=1e-4, rtol=0)
    assert (x_fused.grad[:6][(x[:6] < 0) | (x[:6] > 1)] == 0).all()


def test_table_gradient_without_point_gradient_and_empty_input():
    cfg = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0)
    _, fused = _pair(cfg)
    x = torch.rand(10, 3).to(DEVICE)
    fused(x).sum().backward()
    assert fused.table.grad.abs().sum() > 0
    assert fused(torch.empty(0, 3, device=DEVICE)).shape == (0, 6)


def test_second_order_terms_match_the_reference():
    # the graph analytic normals train through: d/dtable and d/dgrad_out of <v, dL/dx>, plus a first-order term
    cfg = HashGridConfig(n_levels=5, n_features_per_level=2, log2_hashmap_size=9, base_resolution=3, per_level_scale=2.0)
    reference, fused = _pair(cfg, private_max_rows=100)
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(193, 3, generator=generator, dtype=torch.float64)
    x[:5] = x[:5] * 1.4 - 0.2
    upstream = torch.randn(193, 10, generator=generator, dtype=torch.float64)
    v = torch.randn(193, 3, generator=generator, dtype=torch.float64)
    s = torch.randn(193, 10, generator=generator, dtype=torch.float64)

    def run(grid, x, upstream, v, s, via_input_gradient):
        x = x.clone().requires_grad_()
        upstream = upstream.clone().requires_grad_()
        out = grid(x)
        if via_input_gradient:
            grad_x = grid.input_gradient(x.detach(), upstream)
        else:
            (grad_x,) = torch.autograd.grad(out, x, upstream, create_graph=True)
        ((grad_x * v).sum() + (out * s).sum()).backward()
        return grad_x.detach(), upstream.grad, grid.table.grad

    expected = run(reference, x, upstream, v, s, False)
    for via in (False, True):
        fused.table.grad = None
        got = run(fused, *(t.float().to(DEVICE) for t in (x, upstream, v, s)), via)
        for a, b in zip(got, expected, strict=True):
            scale = b.abs().max()
            torch.testing.assert_close(a.double().cpu() / scale, b / scale, atol=2e-5, rtol=0)


def test_table_gradient_of_a_table_gradient_is_a_forward_gather():
    cfg = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0)
    reference, fused = _pair(cfg)
    x = torch.rand(50, 3, dtype=torch.float64)
    upstream = torch.randn(50, 6, dtype=torch.float64)
    probe = torch.randn(reference.table.shape, dtype=torch.float64)
    results = []
    for grid, cast in ((reference, torch.Tensor.double), (fused, lambda t: t.float().to(DEVICE))):
        u = cast(upstream).requires_grad_()
        (grad_table,) = torch.autograd.grad(grid(cast(x)), grid.table, u, create_graph=True)
        (grad_u,) = torch.autograd.grad((grad_table * cast(probe)).sum(), u)
        results.append(grad_u.double().cpu())
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


def _count_scatters(monkeypatch) -> list[int]:
    """Patches the Triton backend's table-gradient scatter to record each call (a kernel launch)."""
    from recon.encoding import triton_backend

    calls, scatter = [], triton_backend._scatter
    monkeypatch.setattr(triton_backend, "_scatter", lambda *args: calls.append(1) or scatter(*args))
    return calls


@pytest.mark.parametrize("normal_points", [None, 120, 0])
def test_field_normals_and_their_training_gradients_match_the_torch_field(normal_points, monkeypatch):
    # the fused path (MLP by autograd, dL/dx by the kernel) against autograd through the torch grid, with normals
    # for every point or for the first normal_points only (as the batched training render asks)
    from recon.field import FieldConfig, RadianceField

    cfg = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=4, per_level_scale=1.6, backend="torch")
    torch.manual_seed(3)
    reference = RadianceField(FieldConfig(encoding=cfg, mlp_width=16)).double()
    fused = RadianceField(FieldConfig(encoding=cfg, mlp_width=16))
    fused.encoding.backend = TritonHashGrid(cfg)
    fused.load_state_dict(reference.state_dict())
    fused = fused.to(DEVICE)
    with torch.no_grad():
        reference.encoding.backend.table.normal_(0, 0.3)
        fused.encoding.backend.table.copy_(reference.encoding.backend.table.float())
    points = (torch.rand(300, 3, dtype=torch.float64) * 2 - 1) * 0.9
    weights = torch.randn(300, 3, dtype=torch.float64)
    scatters = _count_scatters(monkeypatch)
    grads = []
    for field, cast in ((reference, torch.Tensor.double), (fused, lambda t: t.float().to(DEVICE))):
        out = field(cast(points), with_normals=True, normal_points=normal_points)
        ((out.normal * cast(weights)).sum() + out.density.sum() * 1e-3).backward()
        grads.append((out.normal.detach(), *(p.grad for p in field.parameters())))
    # the encoding's table gradient and the normals' go out in one scatter
    assert len(scatters) == 1
    count = 300 if normal_points is None else normal_points
    assert (grads[1][0][count:] == 0).all() and (grads[1][0][:count].norm(dim=-1) > 0.99).all()
    # float32 against float64: the MLP biases' gradients, sums over the points with cancellation, differ by up to
    # 1.6e-4 of their largest (tests/test_field.py checks the fused path's formula in float64 to 1e-6)
    for got, expected in zip(grads[1], grads[0], strict=True):
        scale = expected.abs().max().clamp_min(1e-12)  # without normals (normal_points 0) every normal is 0
        torch.testing.assert_close(got.double().cpu() / scale, expected / scale, atol=3e-4, rtol=0)


@pytest.mark.parametrize("features_in_loss", [True, False])
def test_an_input_gradient_not_computed_from_its_features_scatters_on_its_own(features_in_loss, monkeypatch):
    # pairing needs the encoding's backward to run after the input gradient's: dL/dfeatures that does not come
    # from the paired features (a leaf here) is not paired, and the table gets the same gradient, even when the
    # encoding's backward never runs (its features not in the loss)
    cfg = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0)
    reference, fused = _pair(cfg, private_max_rows=100)
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(90, 3, generator=generator, dtype=torch.float64)
    upstream = torch.randn(60, 6, generator=generator, dtype=torch.float64)
    v = torch.randn(60, 3, generator=generator, dtype=torch.float64)
    s = torch.randn(90, 6, generator=generator, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    out_ref = reference(x_ref)
    (grad_x,) = torch.autograd.grad(reference(x_ref[:60]), x_ref, upstream.requires_grad_(), create_graph=True)
    loss = (grad_x[:60] * v).sum() + ((out_ref * s).sum() if features_in_loss else 0)
    loss.backward()
    scatters = _count_scatters(monkeypatch)
    cast = lambda t: t.detach().float().to(DEVICE)
    features, input_gradient = fused.encode_with_input_gradient(cast(x))
    grad_x = input_gradient(cast(upstream).requires_grad_())
    ((grad_x * cast(v)).sum() + ((features * cast(s)).sum() if features_in_loss else 0)).backward()
    assert len(scatters) == (2 if features_in_loss else 1)
    scale = reference.table.grad.abs().max()
    torch.testing.assert_close(fused.table.grad.double().cpu() / scale, reference.table.grad / scale, atol=2e-5, rtol=0)


def test_masked_levels_are_skipped_with_the_same_features_and_gradients():
    # coarse-to-fine: with k active levels the fused backend looks up only those; the encoding's
    # output, table gradient and normals' second-order terms equal the all-level lookup times the mask
    from recon.encoding.hashgrid import HashGridEncoding

    cfg = HashGridConfig(n_levels=5, n_features_per_level=2, log2_hashmap_size=9, base_resolution=4, per_level_scale=1.6, backend="torch")
    reference = HashGridEncoding(cfg).double()
    fused = HashGridEncoding(cfg)
    fused.backend = TritonHashGrid(cfg)
    with torch.no_grad():
        reference.backend.table.normal_()
        fused.backend.table.copy_(reference.backend.table.float())
    fused = fused.to(DEVICE)
    x = torch.rand(200, 3, dtype=torch.float64)
    upstream = torch.randn(200, 10, dtype=torch.float64)
    for encoding in (reference, fused):
        encoding.set_active_levels(2)
    assert fused.backend.active_levels == 2
    raw = fused.backend(x.float().to(DEVICE))
    assert (raw[:, 4:] == 0).all() and (raw[:, :4] != 0).any()  # inactive levels are never looked up
    results = []
    for encoding, cast in ((reference, torch.Tensor.double), (fused, lambda t: t.float().to(DEVICE))):
        point = cast(x).requires_grad_()
        out = encoding(point)
        (grad_x,) = torch.autograd.grad(out, point, cast(upstream), create_graph=True)
        ((out * cast(upstream)).sum() + grad_x.square().sum()).backward()
        results.append((out.detach(), encoding.backend.table.grad))
    for got, expected in zip(results[1], results[0], strict=True):
        scale = expected.abs().max()
        torch.testing.assert_close(got.double().cpu() / scale, expected / scale, atol=1e-4, rtol=0)
    # a loaded state (whose mask may open more levels) makes the backend look up every level again
    fused.load_state_dict(fused.state_dict())
    assert fused.backend.active_levels == 5


def test_a_cold_triton_cache_is_told_apart_from_a_warm_one(tmp_path, monkeypatch):
    """The first-run compile notice is printed only while Triton's cache holds no build of our kernels."""
    from recon.encoding import triton_backend

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert not triton_backend.compiled_before("forward_kernel")
    (tmp_path / "0123abcd").mkdir()
    (tmp_path / "0123abcd" / "forward_kernel.json").write_text("{}")
    assert triton_backend.compiled_before("forward_kernel")


def test_cpu_points_on_a_gpu_machine_use_the_reference_lookup(monkeypatch):
    # a field on the CPU of a GPU machine (recon fit --device cpu): the compiled kernels cannot read its tensors
    from recon.encoding import triton_backend

    monkeypatch.setattr(triton_backend, "interpreted", lambda: False)
    monkeypatch.setattr(triton_backend, "_Encode", None)  # the kernels must not be called
    monkeypatch.setattr(triton_backend, "_InputGradient", None)
    cfg = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0)
    torch.manual_seed(0)
    reference, fused = TorchHashGrid(cfg), TritonHashGrid(cfg)
    with torch.no_grad():
        fused.table.copy_(reference.table)
    x = torch.rand(33, 3)
    torch.testing.assert_close(fused(x), reference(x))
    grad = torch.randn(33, cfg.n_levels * cfg.n_features_per_level)
    point = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(point), point, grad)
    torch.testing.assert_close(fused.input_gradient(x, grad), expected)


def _fields_sharing_weights(field_cfg) -> tuple:
    """(torch-grid field in float64, Triton-grid field on DEVICE with ``fused_density`` on) with the same weights
    and a random table."""
    import dataclasses

    from recon.field import RadianceField

    field_cfg = dataclasses.replace(field_cfg, fused_density=True)

    torch.manual_seed(5)
    reference = RadianceField(field_cfg).double()
    fused = RadianceField(field_cfg)
    fused.encoding.backend = TritonHashGrid(field_cfg.encoding)
    fused.load_state_dict(reference.state_dict())
    with torch.no_grad():
        reference.encoding.backend.table.normal_(0, 0.5)
        fused.encoding.backend.table.copy_(reference.encoding.backend.table.float())
    return reference, fused.to(DEVICE)


@pytest.mark.parametrize(
    ("features", "width", "hidden_layers", "bias", "activation"),
    [(2, 16, 2, "blob", "softplus"), (1, 32, 1, "none", "trunc_exp"), (4, 16, 3, "blob", "trunc_exp")],
)
def test_fused_density_matches_the_encoding_then_the_mlp(features, width, hidden_layers, bias, activation):
    # the sampler's and the export's density queries (no gradients): one kernel for the lookup and the MLP
    from recon.field import FieldConfig

    grid = HashGridConfig(n_levels=5, n_features_per_level=features, log2_hashmap_size=9, base_resolution=4, per_level_scale=1.6, backend="torch")
    field_cfg = FieldConfig(encoding=grid, mlp_width=width, mlp_hidden_layers=hidden_layers, density_bias=bias, density_activation=activation)
    reference, fused = _fields_sharing_weights(field_cfg)
    for field in (reference, fused):
        field.set_active_levels(3)  # the masked levels' first-layer rows must not count
    points = torch.rand(300, 3, dtype=torch.float64) * 2.4 - 1.2  # some outside the box: density 0
    device_points = points.float().to(DEVICE)
    with torch.no_grad():
        expected = reference.density(points)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            got = fused.density(device_points)
        fused.cfg.fused_density = False
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            expected_bf16 = fused.density(device_points)
        float32 = fused.density(device_points)
    assert (expected == 0).any() and (expected > 0).any()
    # the same roundings (to nearest, ties to even) as the reference path's bfloat16 linear layers; compiled,
    # the tile dots may accumulate in another order and move a rounding by one bfloat16 step
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if DEVICE == "cpu" else {"atol": 5e-3, "rtol": 5e-3}
    torch.testing.assert_close(got, expected_bf16, **tolerance)
    assert (got - float32).abs().max() > 1e-4  # it did round to bfloat16
    torch.testing.assert_close(got.double().cpu(), expected, atol=0.05, rtol=0.05)  # the function of the float64 field


def _count_kernel_calls(monkeypatch) -> list:
    """What each call of ``TritonHashGrid.mlp_channel`` returns from now on (None: the reference path answered)."""
    calls = []
    original = TritonHashGrid.mlp_channel

    def counted(self, *args):
        calls.append(original(self, *args))
        return calls[-1]

    monkeypatch.setattr(TritonHashGrid, "mlp_channel", counted)
    return calls


def test_fused_density_serves_half_precision_queries_only(monkeypatch):
    # float32 queries (the occupancy refresh, the export, evaluation renders) take the reference path: the
    # kernel's float32 products would be tf32; float16 queries are served like bfloat16 ones
    from recon.field import FieldConfig

    grid = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0, backend="torch")
    _, fused = _fields_sharing_weights(FieldConfig(encoding=grid, mlp_width=16))
    calls = _count_kernel_calls(monkeypatch)
    points = torch.rand(64, 3, device=DEVICE) * 2 - 1
    with torch.no_grad():
        got = fused.density(points)
        assert calls == [None]
        fused.cfg.fused_density = False
        torch.testing.assert_close(got, fused.density(points), atol=0, rtol=0)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.float16):
            expected = fused.density(points)
            fused.cfg.fused_density = True
            half = fused.density(points)
    assert calls[-1] is not None
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if DEVICE == "cpu" else {"atol": 5e-3, "rtol": 5e-3}
    torch.testing.assert_close(half, expected, **tolerance)


def test_fused_density_only_without_gradients(monkeypatch):
    # a training query (gradients to the field) and widths the kernel cannot tile use the encoding and the MLP
    from recon.field import FieldConfig

    grid = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0, backend="torch")
    calls = _count_kernel_calls(monkeypatch)
    _, fused = _fields_sharing_weights(FieldConfig(encoding=grid, mlp_width=16))
    points = torch.rand(50, 3, device=DEVICE) - 0.5
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        density = fused.density(points)
        assert density.requires_grad and not calls
        with torch.no_grad():
            no_grad = fused.density(points)
        assert len(calls) == 1 and calls[-1] is not None
        fused.requires_grad_(False)  # a frozen field needs no graph either, unless the points do
        torch.testing.assert_close(fused.density(points), no_grad)
        assert len(calls) == 2
        assert fused.density(points.clone().requires_grad_()).requires_grad and len(calls) == 2
        torch.testing.assert_close(no_grad, density.detach(), atol=5e-3, rtol=5e-3)
        _, odd = _fields_sharing_weights(FieldConfig(encoding=grid, mlp_width=24))
        with torch.no_grad():
            expected = odd.density(points)
            odd.cfg.fused_density = False
            torch.testing.assert_close(odd.density(points), expected)
    assert calls[-1] is None  # a width of 24 cannot be tiled: the reference path answered
