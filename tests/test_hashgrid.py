"""Hash-grid encoding: table lookups at vertices, interpolation, gradients, level masking, backends."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from recon.encoding import HashGridConfig, HashGridEncoding, make_encoding
from recon.encoding.hashgrid import resolve_backend
from recon.encoding.reference import PRIMES, level_layouts
from recon.errors import ReconError

# level 0: 4^3 = 64 rows (dense), level 1: 8^3 = 512 (dense), level 2: 16^3 > 1024 (hashed)
SMALL = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0, backend="torch")


def _encoding(cfg: HashGridConfig = SMALL, dtype: torch.dtype = torch.float64, seed: int = 0) -> HashGridEncoding:
    torch.manual_seed(seed)
    enc = make_encoding(cfg).to(dtype)
    with torch.no_grad():
        enc.backend.table.uniform_(-1.0, 1.0)  # large values so interpolation errors would show
    return enc


def _expected_row(layout, vertex: tuple[int, int, int]) -> int:
    """Row of an integer vertex, computed independently with Python integers."""
    i, j, k = vertex
    if layout.hashed:
        index = ((i * PRIMES[0]) ^ (j * PRIMES[1]) ^ (k * PRIMES[2])) & 0xFFFFFFFF
    else:
        index = i + j * layout.resolution + k * layout.resolution**2
    return layout.offset + index % layout.size


def _vertex_point(layout, vertex: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(vertex, dtype=torch.float64) - 0.5) / layout.scale


def test_layout_dense_then_hashed():
    layouts = level_layouts(SMALL)
    assert [lay.hashed for lay in layouts] == [False, False, True]
    assert [lay.size for lay in layouts] == [64, 512, 1024]
    assert [lay.offset for lay in layouts] == [0, 64, 576]
    assert [lay.resolution for lay in layouts] == [4, 8, 16]


def test_init_range_and_output_shape():
    torch.manual_seed(0)
    enc = make_encoding(SMALL)
    table = enc.backend.table
    assert table.shape == (64 + 512 + 1024, 2)
    assert table.abs().max() <= 1e-4 and table.abs().max() > 0
    out = enc(torch.rand(5, 3))
    assert out.shape == (5, 6) and out.dtype == torch.float32 and enc.output_dim == 6


@pytest.mark.parametrize("level", [0, 1, 2])
def test_vertex_values_are_table_entries(level):
    enc = _encoding()
    layout = level_layouts(SMALL)[level]
    top = int(layout.scale + 0.5)
    vertices = [(1, 1, 1), (2, 1, 3), (top, 1, 2), (1, top, top), (3, 2, 1)]
    x = torch.stack([_vertex_point(layout, v) for v in vertices])
    out = enc(x).view(len(vertices), SMALL.n_levels, -1)[:, level]
    rows = [_expected_row(layout, v) for v in vertices]
    torch.testing.assert_close(out, enc.backend.table[rows].detach(), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "cfg",
    [
        HashGridConfig(n_levels=2, log2_hashmap_size=12, base_resolution=4, per_level_scale=2.0, backend="torch"),  # dense only
        HashGridConfig(n_levels=2, log2_hashmap_size=6, base_resolution=8, per_level_scale=1.5, backend="torch"),  # hashed only
    ],
    ids=["dense-only", "hashed-only"],
)
def test_vertex_values_with_levels_of_one_kind(cfg):
    enc = _encoding(cfg)
    layouts = level_layouts(cfg)
    assert len({lay.hashed for lay in layouts}) == 1
    for level, layout in enumerate(layouts):
        top = int(layout.scale + 0.5)
        vertices = [(1, 1, 1), (2, 1, 3), (top, 1, 2), (1, top, top)]
        x = torch.stack([_vertex_point(layout, v) for v in vertices])
        out = enc(x).view(len(vertices), cfg.n_levels, -1)[:, level]
        torch.testing.assert_close(out, enc.backend.table[[_expected_row(layout, v) for v in vertices]].detach(), atol=1e-10, rtol=0)


def test_interpolation_is_linear_along_an_edge():
    enc = _encoding()
    for level, layout in enumerate(level_layouts(SMALL)):
        a, b = (2, 1, 3), (2, 2, 3)  # neighbours along y
        pa, pb = _vertex_point(layout, a), _vertex_point(layout, b)
        t = torch.linspace(0.0, 1.0, 7, dtype=torch.float64)[:, None]
        out = enc(pa + t * (pb - pa)).view(7, SMALL.n_levels, -1)[:, level]
        fa, fb = enc.backend.table[[_expected_row(layout, a), _expected_row(layout, b)]].detach()
        torch.testing.assert_close(out, (1 - t) * fa + t * fb, atol=1e-10, rtol=0)


def test_gradients_match_finite_differences():
    enc = _encoding()
    torch.manual_seed(1)
    x = (0.1 + 0.8 * torch.rand(4, 3, dtype=torch.float64)).requires_grad_(True)
    table = enc.backend.table.detach().clone().requires_grad_(True)

    def fn(points, tab):
        return functional_call(enc, {"backend.table": tab}, (points,))

    assert torch.autograd.gradcheck(fn, (x, table), eps=1e-6, atol=1e-6)


def test_cpu_lookup_in_passes_matches_one_pass_in_values_and_gradients(monkeypatch):
    enc = _encoding()
    torch.manual_seed(3)
    x = torch.rand(1000, 3, dtype=torch.float64)
    weights = torch.randn(1000, enc.output_dim, dtype=torch.float64)
    results = []
    for per_pass in (1 << 16, 96):  # one pass, then eleven (the last one short)
        monkeypatch.setattr("recon.encoding.reference.CPU_POINTS_PER_PASS", per_pass)
        enc.zero_grad()
        points = x.clone().requires_grad_(True)
        features = enc(points)
        (grad_x,) = torch.autograd.grad((features * weights).sum(), points, create_graph=True)
        grad_x.square().sum().backward()  # second order: to the table through the input gradient
        results.append((features.detach(), grad_x.detach(), points.grad, enc.backend.table.grad.clone()))
    (f1, gx1, gp1, gt1), (f2, gx2, gp2, gt2) = results
    assert torch.equal(f1, f2) and torch.equal(gx1, gx2)
    torch.testing.assert_close(gp2, gp1)
    torch.testing.assert_close(gt2, gt1)  # summed in another order
    assert gt1.abs().sum() > 0


def test_second_derivatives_match_finite_differences():
    cfg = HashGridConfig(n_levels=2, n_features_per_level=1, log2_hashmap_size=6, base_resolution=2, per_level_scale=2.0, backend="torch")
    enc = _encoding(cfg)
    torch.manual_seed(2)
    x = (0.1 + 0.8 * torch.rand(3, 3, dtype=torch.float64)).requires_grad_(True)
    table = enc.backend.table.detach().clone().requires_grad_(True)

    def fn(points, tab):
        return functional_call(enc, {"backend.table": tab}, (points,))

    assert torch.autograd.gradgradcheck(fn, (x, table), eps=1e-6, atol=1e-6)


def test_level_masking_zeroes_exactly_the_masked_levels():
    enc = _encoding(dtype=torch.float32)
    x = torch.rand(16, 3)
    full = enc(x).view(16, 3, 2)
    enc.set_active_levels(2)
    assert enc.active_levels == 2
    table = enc.backend.table
    masked = enc(x).view(16, 3, 2)
    torch.testing.assert_close(masked[:, :2], full[:, :2], atol=0, rtol=0)
    assert torch.count_nonzero(masked[:, 2]) == 0 and torch.count_nonzero(full[:, 2]) > 0
    masked.sum().backward()
    offset = level_layouts(SMALL)[2].offset
    assert torch.count_nonzero(table.grad[offset:]) == 0
    assert torch.count_nonzero(table.grad[:offset]) > 0
    enc.set_active_levels(99)
    torch.testing.assert_close(enc(x).view(16, 3, 2), full)
    assert "level_mask" in enc.state_dict()


def test_backend_selection_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    assert resolve_backend("auto") == "torch"
    assert make_encoding(HashGridConfig(backend="auto", n_levels=2, log2_hashmap_size=8)).backend_name == "torch"
    with pytest.raises(ReconError, match="tcnn"):
        resolve_backend("tcnn")
    with pytest.raises(ReconError, match="unknown"):
        resolve_backend("triton-nope")


def test_config_validation():
    with pytest.raises(ReconError, match="log2_hashmap_size"):
        HashGridConfig(log2_hashmap_size=40)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_cuda_matches_cpu():
    enc = _encoding(dtype=torch.float32)
    x = torch.rand(1000, 3)
    torch.testing.assert_close(enc.cuda()(x.cuda()).cpu(), enc.cpu()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tcnn_parity():
    pytest.importorskip("tinycudann")
    from recon.encoding.tcnn_backend import tcnn_params_to_table

    cfg = HashGridConfig(backend="tcnn")
    torch.manual_seed(0)
    tc = make_encoding(cfg).cuda()
    with torch.no_grad():
        tc.backend.module.params.uniform_(-1.0, 1.0)
    ref = make_encoding(HashGridConfig(backend="torch")).cuda()
    with torch.no_grad():
        ref.backend.table.copy_(tcnn_params_to_table(tc.backend.module.params, cfg.n_features_per_level))
    x = torch.rand(4096, 3, device="cuda")
    torch.testing.assert_close(tc(x), ref(x), atol=2e-2, rtol=1e-2)  # tinycudann computes in half precision
