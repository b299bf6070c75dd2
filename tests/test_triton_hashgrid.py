"""The fused Triton hash grid computes the same function and gradients as the torch reference.

On a machine without CUDA the kernels run under Triton's interpreter, so
this parity test runs in CI; on CUDA it checks the compiled kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported

pytest.importorskip("triton")

from recon.encoding.reference import HashGridConfig, TorchHashGrid
from recon.encoding.triton_backend import TritonHashGrid

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(cfg: HashGridConfig) -> tuple[TorchHashGrid, TritonHashGrid]:
    torch.manual_seed(0)
    reference = TorchHashGrid(cfg).double()
    fused = TritonHashGrid(cfg).to(DEVICE)
    with torch.no_grad():
        reference.table.normal_()
        fused.table.copy_(reference.table.float())
    return reference, fused


@pytest.mark.parametrize("features", [1, 2, 4])
def test_forward_and_gradients_match_the_reference(features):
    # base 4, scale 2, 2^10 rows: levels 0-1 dense, levels 2-5 hashed.
    cfg = HashGridConfig(n_levels=6, n_features_per_level=features, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)
    reference, fused = _pair(cfg)
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


def test_second_derivatives_are_refused():
    cfg = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0)
    _, fused = _pair(cfg)
    x = torch.rand(4, 3, device=DEVICE, requires_grad=True)
    (grad_x,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()
