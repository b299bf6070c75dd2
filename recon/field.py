"""The radiance field: a hash-grid encoding and a small MLP giving density and albedo.

Points are in world units inside the axis-aligned box ``[-bound, bound]^3``;
they are mapped to ``[0, 1]^3`` for the encoding. One shared MLP turns the
encoded features into a raw density and three albedo logits (threestudio's
implicit volume, with a single trunk). At initialisation a "blob" bias
(Magic3D) makes the centre of the box dense so that optimisation starts from
a solid ball rather than from empty space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recon.encoding import HashGridConfig, make_encoding
from recon.errors import ReconError

TRUNC_EXP_MAX = 15.0


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)), so large raw densities cannot explode the update."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # written with differentiable ops so second derivatives (analytic normals) work
        return grad * torch.exp(x.clamp(max=TRUNC_EXP_MAX))


def trunc_exp(x: Tensor) -> Tensor:
    """exp with a clamped gradient (instant-NGP / threestudio density activation)."""
    return _TruncExp.apply(x)


@dataclass
class FieldConfig:
    """Radiance field: hash grid + MLP, density and albedo."""

    encoding: HashGridConfig = field(default_factory=HashGridConfig)
    """Hash-grid encoding."""
    bound: float = 1.0
    """Half-size of the axis-aligned box [-bound, bound]^3 holding the object (world units)."""
    mlp_width: int = 64
    """Hidden width of the MLP."""
    mlp_hidden_layers: int = 2
    """Hidden layers of the MLP."""
    density_activation: Literal["softplus", "trunc_exp"] = "softplus"
    """Raw density -> density: softplus or trunc_exp (exp with a clamped gradient)."""
    density_bias: Literal["blob", "none"] = "blob"
    """Bias added to the raw density: blob (dense ball at the centre at init) or none."""
    blob_density: float = 10.0
    """Blob bias at the centre (raw density units)."""
    blob_radius: float = 0.5
    """Radius (world units) where the blob bias falls to zero; negative beyond."""
    normal_mode: Literal["auto", "analytic", "finite_difference"] = "auto"
    """Normals from the density's gradient (analytic: one extra gather, trainable through the torch and
    Triton hash grids), from central finite differences (six extra density evaluations per point), or
    auto: analytic with the torch and Triton grids, finite differences with tinycudann."""
    fd_step: float = 0.01
    """Finite-difference step for normals (world units)."""
    fused_density: bool = True
    """Density queries without gradients under half-precision autocast (the ray sampler's visibility test, as
    the fit renders in bfloat16) in one Triton kernel, hash-grid lookup and MLP together, features never
    stored, the MLP rounded as PyTorch rounds it (Triton hash grid only; float32 queries such as the occupancy
    refresh and the export take the reference path). false = the encoding then the MLP in PyTorch."""
    mlp_row_sizes: int = 16
    """On CUDA, the MLP runs on its rows padded with zeros to one of this many sizes per power of two (at most
    1/this more rows; a power of two): the sample count changes every step, and cuBLAS choosing a kernel for a
    matrix shape it has not seen costs ~0.15-0.2 ms of host time per product, ten times a repeated shape's
    (bench/mlp_rows.py; the fast preset's steps, bound by the host, 1.6-2.7 ms shorter: docs/SPEED.md).
    0 = the exact row count (the reference path)."""

    def __post_init__(self) -> None:
        if self.bound <= 0 or self.blob_radius <= 0 or self.fd_step <= 0:
            raise ReconError("field: bound, blob_radius and fd_step must be > 0")
        if self.mlp_row_sizes < 0 or self.mlp_row_sizes & (self.mlp_row_sizes - 1):
            raise ReconError(f"field: mlp_row_sizes={self.mlp_row_sizes}: use 0 or a power of two")
        if self.mlp_width < 1 or self.mlp_hidden_layers < 0:
            raise ReconError("field: mlp_width must be >= 1 and mlp_hidden_layers >= 0")


@dataclass
class FieldOutput:
    """Per-point field values: ``density`` (P,) >= 0, ``albedo`` (P, 3) in [0, 1], ``normal`` (P, 3) unit or None."""

    density: Tensor
    albedo: Tensor
    normal: Tensor | None = None


def padded_rows(rows: int, sizes_per_octave: int) -> int:
    """The smallest of ``sizes_per_octave`` (a power of two) evenly spaced sizes between consecutive powers of
    two that holds ``rows`` (``rows`` itself when it is smaller than ``sizes_per_octave``, or with 0)."""
    if sizes_per_octave <= 0 or rows <= sizes_per_octave:
        return rows
    granule = 1 << (rows.bit_length() - sizes_per_octave.bit_length())
    return -(-rows // granule) * granule


def run_on_padded_rows(mlp: nn.Module, features: Tensor, sizes_per_octave: int) -> Tensor:
    """``mlp(features)`` (P, out) for a row-wise ``mlp`` and ``features`` (P, in), computed on the rows padded
    with zeros to ``padded_rows(P, sizes_per_octave)``: the same values and gradients of every order, since
    each output row depends on its own input row only and the padding's outputs are cut off."""
    rows = features.shape[0]
    padding = padded_rows(rows, sizes_per_octave) - rows
    if padding == 0:
        return mlp(features)
    return mlp(F.pad(features, (0, 0, 0, padding)))[:rows]


def _mlp(in_dim: int, width: int, hidden_layers: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(dim, width), nn.ReLU(inplace=True)]
        dim = width
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class RadianceField(nn.Module):
    """Density and albedo of world points in ``[-bound, bound]^3`` (density is 0 outside)."""

    def __init__(self, cfg: FieldConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoding = make_encoding(cfg.encoding)
        self.mlp = _mlp(self.encoding.output_dim, cfg.mlp_width, cfg.mlp_hidden_layers, 4)
        self.normal_mode = cfg.normal_mode
        if self.normal_mode == "auto":
            self.normal_mode = "analytic" if self.encoding.backend_name in ("torch", "triton") else "finite_difference"

    @property
    def aabb(self) -> Tensor:
        """(2, 3) box corners [min, max] in world units, on the field's device."""
        b = self.cfg.bound
        return torch.tensor([[-b, -b, -b], [b, b, b]], device=self.encoding.level_mask.device)

    def set_active_levels(self, k: int) -> None:
        """Coarse-to-fine: only the first ``k`` hash-grid levels contribute."""
        self.encoding.set_active_levels(k)

    def _inside(self, points: Tensor) -> Tensor:
        return (points.abs() <= self.cfg.bound).all(dim=-1)

    def _unit(self, points: Tensor) -> Tensor:
        return (points / self.cfg.bound + 1.0) * 0.5

    def _raw(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Raw density (P,) with the bias and albedo logits (P, 3) at world ``points`` (P, 3)."""
        return self._head(self.encoding(self._unit(points)), points)

    def _density_bias(self, points: Tensor) -> Tensor | None:
        """(P,) the bias added to the raw density at world ``points``, None without one."""
        if self.cfg.density_bias != "blob":
            return None
        return points.norm(dim=-1).mul(-self.cfg.blob_density / self.cfg.blob_radius).add(self.cfg.blob_density)

    def _density_bias_slope(self, points: Tensor) -> Tensor | None:
        """(P, 3) the gradient of :meth:`_density_bias` at world ``points`` (0 at the origin), None without a bias."""
        if self.cfg.density_bias != "blob":
            return None
        return points * (-self.cfg.blob_density / self.cfg.blob_radius / points.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def _head(self, features: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Raw density (P,) (with the bias at ``points``) and albedo logits (P, 3) from encoded features."""
        # split, not indexing: the backward joins both gradients in one kernel instead of a zero-fill and copy per slice
        sizes = self.cfg.mlp_row_sizes if features.is_cuda else 0  # the host cost it saves is cuBLAS's
        raw_density, albedo = run_on_padded_rows(self.mlp, features, sizes).to(points.dtype).split([1, 3], dim=1)
        raw_density = raw_density.squeeze(1)
        bias = self._density_bias(points)
        return (raw_density if bias is None else raw_density + bias), albedo

    def _activate(self, raw_density: Tensor, points: Tensor) -> Tensor:
        if self.cfg.density_activation == "trunc_exp":
            density = trunc_exp(raw_density)
        else:
            density = F.softplus(raw_density)
        return torch.where(self._inside(points), density, 0.0)

    def density(self, points: Tensor) -> Tensor:
        """Density (P,) >= 0 at world points (P, 3); exactly 0 outside the box.

        Where no gradient can flow (grad mode off, or a frozen field at points that need none) and with
        ``fused_density`` the fused kernel computes it where the encoding has one for the query (see
        ``FieldConfig.fused_density``)."""
        unit = self._unit(points)
        if self.cfg.fused_density and not self._needs_graph(points):
            linears = [layer for layer in self.mlp if isinstance(layer, nn.Linear)]
            raw = self.encoding.mlp_channel(unit, linears, 0)
            if raw is not None:
                raw, bias = raw.to(points.dtype), self._density_bias(points)
                return self._activate(raw if bias is None else raw + bias, points)
        return self._activate(self._head(self.encoding(unit), points)[0], points)

    def _needs_graph(self, points: Tensor) -> bool:
        """Whether a query at ``points`` must keep an autograd graph (to the points or to the field)."""
        return torch.is_grad_enabled() and (points.requires_grad or any(p.requires_grad for p in self.parameters()))

    def albedo(self, points: Tensor) -> Tensor:
        """Albedo (P, 3) in [0, 1] at world points (P, 3)."""
        return torch.sigmoid(self._raw(points)[1])

    def forward(self, points: Tensor, with_normals: bool = False, normal_points: int | None = None) -> FieldOutput:
        """Density (P,) and albedo (P, 3) at world points (P, 3); also unit normals when ``with_normals``.

        ``normal_points``: normals for the first this many points only (the others' are 0; None = all). A
        fused encoding looks every point up once, the others evaluate the two parts apart. Analytic normals
        keep their graph when grad is enabled (for normal-smoothness / orientation losses) and are computed
        without one under ``torch.no_grad()``.
        """
        if not with_normals:
            raw_density, albedo = self._raw(points)
            return FieldOutput(self._activate(raw_density, points), torch.sigmoid(albedo))
        total = points.shape[0]
        count = total if normal_points is None else max(0, min(normal_points, total))
        if self.normal_mode == "analytic" and hasattr(self.encoding.backend, "encode_with_input_gradient"):
            return self._analytic_fused(points, torch.is_grad_enabled(), count)
        if count == total:
            return self._with_normals(points)
        tail = self(points[count:])
        if count == 0:
            return FieldOutput(tail.density, tail.albedo, torch.zeros_like(tail.albedo))
        return _joined(self._with_normals(points[:count]), tail)

    def normals(self, points: Tensor) -> Tensor:
        """Unit outward normals (P, 3) (minus the density gradient) at world points (P, 3); 0 where it vanishes."""
        if self.normal_mode == "analytic":
            return self(points, with_normals=True).normal
        return self._fd_normals(points)

    def _with_normals(self, points: Tensor) -> FieldOutput:
        """Every output at ``points`` without a fused encoding: analytic normals by autograd through the
        points, or finite differences."""
        if self.normal_mode == "analytic":
            return self._analytic_autograd(points, torch.is_grad_enabled())
        out = self(points)
        out.normal = self._fd_normals(points)
        return out

    def _analytic_autograd(self, points: Tensor, create_graph: bool) -> FieldOutput:
        """Density, albedo and normals from the density's gradient by autograd through the whole lookup; with
        ``create_graph`` the normals keep their graph (to the MLP and the table), else every output is detached."""
        with torch.enable_grad():
            p = points.detach().requires_grad_(True)
            raw_density, albedo = self._raw(p)
            density = self._activate(raw_density, p)
            (gradient,) = torch.autograd.grad(density.sum(), p, create_graph=create_graph)
        return _detached_unless(create_graph, FieldOutput(density, torch.sigmoid(albedo), _unit(-gradient)))

    def _analytic_fused(self, points: Tensor, create_graph: bool, count: int) -> FieldOutput:
        """Every output at ``points`` (P, 3), normals for the first ``count`` (0 after), from one lookup of a
        fused encoding (:meth:`HashGridEncoding.encode_with_input_gradient`); graphs as in
        :meth:`_analytic_autograd`.

        Only the MLP is differentiated with autograd (to the features and to the raw density); dL/dx comes from
        the encoding's input-gradient kernel plus the density bias's slope, known in closed form, so no graph
        reaches the points. The MLP runs on the points with normals and on the others apart, so that its
        second-order graph spans the former only.
        """
        points = points.detach()
        with torch.enable_grad():
            features, input_gradient = self.encoding.encode_with_input_gradient(self._unit(points))
            if count == points.shape[0]:  # no split: its backward would copy the gradient
                parts = [(features, points)]
            else:
                sizes = [count, points.shape[0] - count]
                parts = list(zip(features.split(sizes), points.split(sizes), strict=True))
            head_features, head_points = parts[0]
            raw_density, albedo = self._head(head_features, head_points)
            density = self._activate(raw_density, head_points)
            grad_features, grad_raw = torch.autograd.grad(density.sum(), [head_features, raw_density], create_graph=create_graph)
            gradient = input_gradient(grad_features) * (0.5 / self.cfg.bound)
            slope = self._density_bias_slope(head_points)
            if slope is not None:
                gradient = gradient + grad_raw[:, None] * slope
            out = FieldOutput(density, torch.sigmoid(albedo), _unit(-gradient))
            if len(parts) == 2:  # the points without normals
                tail_features, tail_points = parts[1]
                tail_raw, tail_albedo = self._head(tail_features, tail_points)
                out = _joined(out, FieldOutput(self._activate(tail_raw, tail_points), torch.sigmoid(tail_albedo)))
        return _detached_unless(create_graph, out)

    def _fd_normals(self, points: Tensor) -> Tensor:
        h = self.cfg.fd_step
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * h
        probes = torch.cat([points[:, None] + offsets, points[:, None] - offsets], dim=1)  # (P, 6, 3)
        d = self.density(probes.reshape(-1, 3)).view(-1, 6)
        gradient = (d[:, :3] - d[:, 3:]) / (2.0 * h)
        return _unit(-gradient)


def _joined(head: FieldOutput, tail: FieldOutput) -> FieldOutput:
    """The outputs of ``head``'s points then ``tail``'s; ``tail`` has no normals, its rows get 0."""
    return FieldOutput(
        torch.cat([head.density, tail.density]), torch.cat([head.albedo, tail.albedo]), torch.cat([head.normal, torch.zeros_like(tail.albedo)])
    )


def _detached_unless(keep_graph: bool, out: FieldOutput) -> FieldOutput:
    """``out`` as it is with ``keep_graph``, else with every value detached."""
    if keep_graph:
        return out
    return FieldOutput(out.density.detach(), out.albedo.detach(), out.normal.detach())


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
