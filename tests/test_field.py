"""Radiance field: box masking, blob initialisation, activations, normals."""

from __future__ import annotations

import pytest
import torch

from recon.encoding import HashGridConfig
from recon.errors import ReconError
from recon.field import FieldConfig, RadianceField, padded_rows, run_on_padded_rows, trunc_exp

TINY = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=1.5, backend="torch")


def _field(**kwargs) -> RadianceField:
    torch.manual_seed(0)
    return RadianceField(FieldConfig(encoding=TINY, **kwargs))


def _radial(field: RadianceField) -> RadianceField:
    """Zeroes the last MLP layer so the raw density is the blob bias alone (a radial field)."""
    with torch.no_grad():
        field.mlp[-1].weight.zero_()
        field.mlp[-1].bias.zero_()
    return field


def test_density_zero_outside_the_box_and_positive_inside():
    field = _field(bound=1.5, density_bias="none")
    outside = torch.tensor([[1.6, 0.0, 0.0], [0.0, -1.51, 0.0], [0.2, 0.3, 2.0], [3.0, 3.0, 3.0]])
    inside = torch.tensor([[1.49, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 1.2]])
    out = field(torch.cat([outside, inside]))
    assert torch.equal(out.density[:4], torch.zeros(4))
    assert (out.density[4:] > 0).all()
    assert out.albedo.shape == (7, 3) and (out.albedo >= 0).all() and (out.albedo <= 1).all()
    torch.testing.assert_close(field.aabb, torch.tensor([[-1.5] * 3, [1.5] * 3]))


def test_blob_bias_makes_the_centre_dense():
    blob = _field()
    centre, far = torch.zeros(1, 3), torch.full((1, 3), 0.9)
    assert blob.density(centre).item() > 5.0
    assert blob.density(far).item() < 1e-3
    plain = _field(density_bias="none")
    assert plain.density(centre).item() < 2.0


def test_trunc_exp_forward_and_clamped_gradient():
    x = torch.tensor([0.0, 1.0, 20.0], dtype=torch.float64, requires_grad=True)
    y = trunc_exp(x)
    torch.testing.assert_close(y, torch.exp(x.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.exp(torch.tensor([0.0, 1.0, 15.0], dtype=torch.float64)))
    field = _field(density_activation="trunc_exp")
    assert field.density(torch.zeros(1, 3)).item() > 1000.0  # exp(~10)


@pytest.mark.parametrize("mode", ["analytic", "finite_difference"])
def test_normals_of_a_radial_field_point_outward(mode):
    field = _radial(_field(normal_mode=mode, fd_step=1e-3))
    torch.manual_seed(3)
    points = torch.randn(32, 3)
    points = points / points.norm(dim=-1, keepdim=True) * (0.1 + 0.3 * torch.rand(32, 1))
    normals = field.normals(points)
    expected = points / points.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(normals, expected, atol=1e-3, rtol=0)
    out = field(points, with_normals=True)
    torch.testing.assert_close(out.normal, normals)


def test_analytic_normals_match_finite_differences_on_a_random_field():
    torch.manual_seed(4)
    field = RadianceField(FieldConfig(encoding=TINY, normal_mode="analytic", density_bias="none")).double()
    with torch.no_grad():
        field.encoding.backend.table.uniform_(-1.0, 1.0)
    fd = RadianceField(FieldConfig(encoding=TINY, normal_mode="finite_difference", fd_step=1e-6, density_bias="none")).double()
    fd.load_state_dict(field.state_dict())
    points = torch.rand(16, 3, dtype=torch.float64) * 1.6 - 0.8
    torch.testing.assert_close(field.normals(points), fd.normals(points), atol=1e-5, rtol=0)


def test_analytic_normals_are_trainable_and_graph_free_without_grad():
    field = _field()
    points = torch.rand(64, 3) - 0.5
    normals = field.normals(points)
    assert normals.requires_grad
    (normals[:, 2] ** 2).sum().backward()
    assert field.encoding.backend.table.grad.abs().sum() > 0
    assert field.mlp[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = field(points, with_normals=True)
    assert not out.normal.requires_grad and not out.density.requires_grad
    torch.testing.assert_close(out.normal, normals.detach())


@pytest.mark.parametrize("normal_points", [None, 120])
def test_fused_normal_path_equals_autograd_through_the_points_in_float64(normal_points):
    # the path of a fused encoding (autograd to the features and the raw density, the bias slope in closed form;
    # with normal_points, one lookup and the MLP on the two parts apart) against autograd through the points (the
    # two parts evaluated apart), both in float64: normals and every training gradient agree
    cfg = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=9, base_resolution=4, per_level_scale=1.6, backend="torch")
    torch.manual_seed(3)
    reference = RadianceField(FieldConfig(encoding=cfg, mlp_width=16)).double()
    with torch.no_grad():
        reference.encoding.backend.table.normal_(0, 0.3)
    fused = RadianceField(FieldConfig(encoding=cfg, mlp_width=16)).double()
    fused.load_state_dict(reference.state_dict())

    def encode_with_input_gradient(x: torch.Tensor):
        def input_gradient(grad_features: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                point = x[: grad_features.shape[0]].detach().requires_grad_(True)
                return torch.autograd.grad(fused.encoding.backend(point), point, grad_features, create_graph=True)[0]

        return fused.encoding.backend(x), input_gradient

    fused.encoding.backend.encode_with_input_gradient = encode_with_input_gradient
    points = (torch.rand(300, 3, dtype=torch.float64) * 2 - 1) * 0.9
    points[0] = 0.0  # the blob bias's slope at the centre is 0
    weights = torch.randn(300, 3, dtype=torch.float64)
    grads = []
    for field in (reference, fused):
        out = field(points, with_normals=True, normal_points=normal_points)
        ((out.normal * weights).sum() + out.density.sum() * 1e-3).backward()
        grads.append((out.normal.detach(), *(p.grad for p in field.parameters())))
    if normal_points is not None:
        assert (grads[1][0][normal_points:] == 0).all() and (grads[1][0][:normal_points].norm(dim=-1) > 0.99).all()
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6 * expected.abs().max(), rtol=0)


def test_set_active_levels_reaches_the_encoding():
    field = _field()
    field.set_active_levels(1)
    assert field.encoding.active_levels == 1


def test_config_validation():
    with pytest.raises(ReconError, match="bound"):
        FieldConfig(bound=0.0)
    with pytest.raises(ReconError, match="mlp_row_sizes=12: use 0 or a power of two"):
        FieldConfig(mlp_row_sizes=12)


def test_padded_rows_hold_the_rows_with_few_sizes_per_octave():
    for sizes in (1, 4, 16):
        padded = [padded_rows(rows, sizes) for rows in range(1, 4097)]
        for rows, size in enumerate(padded, start=1):
            assert rows <= size <= rows + max(0, rows - 1) // sizes
        for k in range(5, 12):  # rows in [2^k, 2^(k+1)): 2^k itself, or one of `sizes` sizes above it
            assert len(set(padded[2**k - 1 : 2 ** (k + 1) - 1])) == sizes + 1
    assert padded_rows(1000, 16) == 1024 and padded_rows(1025, 16) == 1088 and padded_rows(100_000, 16) == 102_400
    assert padded_rows(1000, 0) == 1000 and padded_rows(7, 16) == 7


def test_mlp_on_padded_rows_gives_the_same_values_and_gradients_to_second_order():
    mlp = _field(mlp_width=16).mlp.double()
    features = torch.randn(1000, mlp[0].in_features, dtype=torch.float64)
    results = []
    for sizes in (0, 16):
        x = features.clone().requires_grad_(True)
        out = run_on_padded_rows(mlp, x, sizes)
        (dx,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)  # as the analytic normals do
        (out.square().sum() + dx.square().sum()).backward()
        results.append((out.detach(), dx.detach(), x.grad, *(p.grad.clone() for p in mlp.parameters())))
        mlp.zero_grad()
    assert results[0][0].shape == (1000, 4)
    for padded, exact in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(padded, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the MLP rows are padded on CUDA only")
def test_field_pads_its_mlp_rows_on_cuda_with_the_same_outputs():
    seen = []
    fields = [_field(mlp_row_sizes=sizes).cuda() for sizes in (16, 0)]
    fields[0].mlp[0].register_forward_hook(lambda _module, args, _out: seen.append(args[0].shape[0]))
    points = (torch.rand(1000, 3, device="cuda") * 2 - 1) * 0.9
    outputs = [field(points, with_normals=True) for field in fields]
    assert seen == [1024]
    for name in ("density", "albedo", "normal"):
        torch.testing.assert_close(getattr(outputs[0], name), getattr(outputs[1], name), rtol=1e-4, atol=1e-5)


def test_auto_normals_are_analytic_with_torch_and_triton_and_finite_differences_with_tcnn(monkeypatch):
    assert RadianceField(FieldConfig(encoding=TINY)).normal_mode == "analytic"
    from recon.encoding import hashgrid

    monkeypatch.setattr(hashgrid, "resolve_backend", lambda name: "triton")
    monkeypatch.setitem(hashgrid.BACKENDS, "triton", hashgrid.BACKENDS["torch"])
    assert RadianceField(FieldConfig(encoding=TINY)).normal_mode == "analytic"
    monkeypatch.setattr(hashgrid, "resolve_backend", lambda name: "tcnn")
    monkeypatch.setitem(hashgrid.BACKENDS, "tcnn", hashgrid.BACKENDS["torch"])
    assert RadianceField(FieldConfig(encoding=TINY)).normal_mode == "finite_difference"
    assert RadianceField(FieldConfig(encoding=TINY, normal_mode="analytic")).normal_mode == "analytic"
