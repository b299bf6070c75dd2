"""Procedural objects made of analytic primitives, rendered by exact ray casting.

An object is a union of spheres, boxes, capped cylinders and capsules, each
with a material (a colour, optionally striped or checkered by position in the
primitive's own frame). Because every piece is convex, the first hit of a ray
on the union is the smallest first hit over the pieces, which each have a
closed form; so renders, depth and normals are exact up to float precision.
This gives ground truth for tests and training data without any asset files:

* ``render_object(obj, cameras)``: RGBA (straight alpha = coverage), depth
  (distance along the ray), world normals and albedo, channels-last;
* ``obj.sample_surface(n)``: points on the true outer surface (for Chamfer
  distance); ``obj.albedo(points)``: the colour at any point on/near it;
* ``random_object(seed)``, ``toy_robot()``, ``mug()``.

Cameras and rays come from :mod:`recon.cameras` (world +Y up, front = +Z).
Scene units: objects built here fit inside a sphere of radius
``DEFAULT_OBJECT_RADIUS`` about the origin, which at the Zero-1-to-3 camera
(radius 3.8, fovy 20 deg) fills at most ~80 % of the image height.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from recon.cameras import Cameras, generate_rays

Pattern = Literal["solid", "stripes", "checker", "dots", "rings", "gradient"]
Shading = Literal["lambert", "albedo"]

DEFAULT_OBJECT_RADIUS = 0.55
"""Radius (scene units) of the sphere about the origin that built objects fit in."""

_EPS = 1e-6
_INF = float("inf")


def _vec(values: Tensor | tuple[float, ...] | list[float]) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32).clone()


@dataclass
class Material:
    """Surface colour of one primitive; patterns are evaluated in the primitive's local frame.

    ``stripes``: bands perpendicular to the local +Y axis; ``checker``: a 3-D
    checkerboard; ``dots``: balls of ``color2`` on a 3-D lattice; ``rings``:
    bands by distance from the local Y axis; ``gradient``: ``color`` blended
    into ``color2`` along local +Y over 1 / ``frequency`` units (clamped).
    ``frequency`` is in cycles per scene unit.
    """

    color: tuple[float, float, float]
    pattern: Pattern = "solid"
    color2: tuple[float, float, float] = (1.0, 1.0, 1.0)
    frequency: float = 6.0

    def evaluate(self, local: Tensor) -> Tensor:
        """Albedo (P, 3) in [0, 1] at local-frame points (P, 3)."""
        first = local.new_tensor(self.color).expand(len(local), 3)
        if self.pattern == "solid":
            return first.clone()
        second = local.new_tensor(self.color2).expand(len(local), 3)
        if self.pattern == "stripes":
            use_second = torch.frac(local[:, 1] * self.frequency + 1000.0) >= 0.5
        elif self.pattern == "checker":
            use_second = torch.floor(local * self.frequency).sum(-1).remainder(2) >= 1
        elif self.pattern == "dots":
            cell = torch.frac(local * self.frequency + 1000.0) - 0.5
            use_second = cell.norm(dim=-1) < 0.3
        elif self.pattern == "rings":
            use_second = torch.frac(local[:, [0, 2]].norm(dim=-1) * self.frequency) >= 0.5
        elif self.pattern == "gradient":
            blend = (local[:, 1:2] * self.frequency + 0.5).clamp(0.0, 1.0)
            return first * (1.0 - blend) + second * blend
        else:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected solid, stripes, checker, dots, rings or gradient")
        return torch.where(use_second[:, None], second, first)


def _first_hit(candidates: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The nearest of several (t (R,), normal (R, 3)) candidates; t = inf where none hit."""
    ts = torch.stack([t for t, _ in candidates], dim=0)
    t, index = ts.min(dim=0)
    normals = torch.stack([n for _, n in candidates], dim=0)
    normal = normals.gather(0, index[None, :, None].expand(1, -1, 3))[0]
    return t, normal


def _sphere_hit(origins: Tensor, directions: Tensor, center: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    oc = origins - center
    b = (oc * directions).sum(-1)
    c = (oc * oc).sum(-1) - radius * radius
    disc = b * b - c
    t = -b - torch.sqrt(disc.clamp_min(0.0))
    t = torch.where((disc >= 0) & (t > _EPS), t, torch.full_like(t, _INF))
    normal = (origins + t.clamp_max(1e9)[:, None] * directions - center) / radius
    return t, normal


def _random_rotation(generator: torch.Generator) -> Tensor:
    """A uniformly random rotation matrix (3, 3) from a random unit quaternion."""
    w, x, y, z = torch.nn.functional.normalize(torch.randn(4, generator=generator), dim=0).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _frame_from_axis(axis: Tensor) -> Tensor:
    """A rotation (3, 3) whose second column (local +Y) is the unit vector ``axis``."""
    y = axis / axis.norm()
    helper = torch.tensor([1.0, 0.0, 0.0]) if abs(float(y[0])) < 0.9 else torch.tensor([0.0, 0.0, 1.0])
    x = torch.linalg.cross(helper, y)
    x = x / x.norm()
    z = torch.linalg.cross(x, y)
    return torch.stack([x, y, z], dim=1)


@dataclass
class Primitive:
    """Base of the convex pieces: a centre, a rotation (columns = local axes in world) and a material."""

    center: Tensor
    rotation: Tensor
    material: Material

    def to_local(self, points: Tensor) -> Tensor:
        """World points (P, 3) in this primitive's frame."""
        return (points - self.center.to(points)) @ self.rotation.to(points)

    def _to_world_dirs(self, local: Tensor) -> Tensor:
        return local @ self.rotation.to(local).T

    def intersect(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """First hit along unit rays (R, 3): distance t (R,) (inf on a miss) and outward world normal (R, 3)."""
        raise NotImplementedError

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance (P,) in scene units, negative inside."""
        raise NotImplementedError

    def area(self) -> float:
        """Surface area in square scene units."""
        raise NotImplementedError

    def sample_surface(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``count`` points uniform over the surface (count, 3) and their outward normals."""
        raise NotImplementedError

    def bounding_radius(self) -> float:
        """An upper bound of |p| over the primitive (distance from the world origin)."""
        raise NotImplementedError

    def transformed(self, scale: float, offset: Tensor) -> Primitive:
        """The primitive under p -> scale * p + offset (scale > 0)."""
        raise NotImplementedError


@dataclass
class Sphere(Primitive):
    """A sphere of ``radius`` about ``center``."""

    radius: float = 0.5

    def intersect(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.intersect`."""
        return _sphere_hit(origins, directions, self.center.to(origins), self.radius)

    def sdf(self, points: Tensor) -> Tensor:
        """See :meth:`Primitive.sdf`."""
        return (points - self.center.to(points)).norm(dim=-1) - self.radius

    def area(self) -> float:
        """See :meth:`Primitive.area`."""
        return 4.0 * math.pi * self.radius**2

    def sample_surface(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.sample_surface`."""
        normal = torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=-1)
        return self.center + self.radius * normal, normal

    def bounding_radius(self) -> float:
        """See :meth:`Primitive.bounding_radius`."""
        return float(self.center.norm()) + self.radius

    def transformed(self, scale: float, offset: Tensor) -> Sphere:
        """See :meth:`Primitive.transformed`."""
        return replace(self, center=self.center * scale + offset, radius=self.radius * scale)


@dataclass
class Box(Primitive):
    """An oriented box with half-extents ``half_size`` (3,) along its local axes."""

    half_size: Tensor = field(default_factory=lambda: torch.full((3,), 0.5))

    def intersect(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.intersect` (slab method in the local frame)."""
        o = self.to_local(origins)
        d = directions @ self.rotation.to(directions)
        d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        h = self.half_size.to(o)
        t1, t2 = (-h - o) / d, (h - o) / d
        t_near, axis = torch.minimum(t1, t2).max(dim=-1)
        t_far = torch.maximum(t1, t2).min(dim=-1).values
        t = torch.where((t_near <= t_far) & (t_near > _EPS), t_near, torch.full_like(t_near, _INF))
        local_normal = torch.nn.functional.one_hot(axis, 3).to(o) * -torch.sign(d.gather(1, axis[:, None]))
        return t, self._to_world_dirs(local_normal)

    def sdf(self, points: Tensor) -> Tensor:
        """See :meth:`Primitive.sdf`."""
        q = self.to_local(points).abs() - self.half_size.to(points)
        return q.clamp_min(0.0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0.0)

    def _face_areas(self) -> Tensor:
        hx, hy, hz = self.half_size.tolist()
        return torch.tensor([4 * hy * hz, 4 * hx * hz, 4 * hx * hy])

    def area(self) -> float:
        """See :meth:`Primitive.area`."""
        return float(2 * self._face_areas().sum())

    def sample_surface(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.sample_surface`."""
        axis = torch.multinomial(self._face_areas(), count, replacement=True, generator=generator)
        sign = torch.randint(0, 2, (count,), generator=generator).float() * 2 - 1
        local = (torch.rand(count, 3, generator=generator) * 2 - 1) * self.half_size
        onehot = torch.nn.functional.one_hot(axis, 3).float()
        local = local * (1 - onehot) + onehot * sign[:, None] * self.half_size
        return local @ self.rotation.T + self.center, (onehot * sign[:, None]) @ self.rotation.T

    def bounding_radius(self) -> float:
        """See :meth:`Primitive.bounding_radius` (exact: the farthest corner)."""
        corners = torch.tensor([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=torch.float32)
        return float(((corners * self.half_size) @ self.rotation.T + self.center).norm(dim=-1).max())

    def transformed(self, scale: float, offset: Tensor) -> Box:
        """See :meth:`Primitive.transformed`."""
        return replace(self, center=self.center * scale + offset, half_size=self.half_size * scale)


@dataclass
class Ellipsoid(Primitive):
    """An oriented ellipsoid with semi-axes ``radii`` (3,) along its local axes."""

    radii: Tensor = field(default_factory=lambda: torch.full((3,), 0.5))

    def intersect(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.intersect` (a unit sphere after scaling the local frame by 1 / radii)."""
        r = self.radii.to(origins)
        o = self.to_local(origins) / r
        d = (directions @ self.rotation.to(directions)) / r
        a = (d * d).sum(-1)
        b = (o * d).sum(-1)
        c = (o * o).sum(-1) - 1.0
        disc = b * b - a * c
        t = (-b - torch.sqrt(disc.clamp_min(0.0))) / a
        t = torch.where((disc >= 0) & (t > _EPS), t, torch.full_like(t, _INF))
        local = self.to_local(origins + t.clamp_max(1e9)[:, None] * directions)
        normal = torch.nn.functional.normalize(self._to_world_dirs(local / (r * r)), dim=-1)
        return t, normal

    def sdf(self, points: Tensor) -> Tensor:
        """See :meth:`Primitive.sdf`: the usual bound k0 (k0 - 1) / k1 (exact on the surface, where its gradient is
        the normal; within a factor of the smallest to largest radius elsewhere)."""
        r = self.radii.to(points)
        q = self.to_local(points)
        k0 = (q / r).norm(dim=-1)
        k1 = (q / (r * r)).norm(dim=-1).clamp_min(1e-12)
        return k0 * (k0 - 1.0) / k1

    def area(self) -> float:
        """See :meth:`Primitive.area` (Knud Thomsen's approximation, within 1.1 %)."""
        a, b, c = (float(v) for v in self.radii)
        p = 1.6075
        return 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)

    def sample_surface(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.sample_surface`: sphere directions, kept with probability proportional to the area
        element |(bc n1, ac n2, ab n3)| of the map n -> radii * n."""
        a, b, c = (float(v) for v in self.radii)
        stretch = torch.tensor([b * c, a * c, a * b])
        kept: list[Tensor] = []
        have = 0
        while have < count:
            n = torch.nn.functional.normalize(torch.randn(2 * count + 64, 3, generator=generator), dim=-1)
            accept = torch.rand(len(n), generator=generator) * stretch.max() < (n * stretch).norm(dim=-1)
            kept.append(n[accept])
            have += int(accept.sum())
        n = torch.cat(kept)[:count]
        local = n * self.radii
        normal = torch.nn.functional.normalize(n / self.radii, dim=-1)
        return local @ self.rotation.T + self.center, normal @ self.rotation.T

    def bounding_radius(self) -> float:
        """See :meth:`Primitive.bounding_radius`."""
        return float(self.center.norm()) + float(self.radii.max())

    def transformed(self, scale: float, offset: Tensor) -> Ellipsoid:
        """See :meth:`Primitive.transformed`."""
        return replace(self, center=self.center * scale + offset, radii=self.radii * scale)


@dataclass
class Cylinder(Primitive):
    """A capped cylinder along its local +Y axis: ``radius``, length 2 * ``half_height``."""

    radius: float = 0.5
    half_height: float = 0.5

    def intersect(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.intersect` (side quadric plus the two cap disks)."""
        o = self.to_local(origins)
        d = directions @ self.rotation.to(directions)
        r, h = self.radius, self.half_height
        a = d[:, 0] ** 2 + d[:, 2] ** 2
        b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
        c = o[:, 0] ** 2 + o[:, 2] ** 2 - r * r
        disc = b * b - a * c
        t_side = (-b - torch.sqrt(disc.clamp_min(0.0))) / a.clamp_min(1e-12)
        y_side = o[:, 1] + t_side * d[:, 1]
        side_ok = (a > 1e-12) & (disc >= 0) & (y_side.abs() <= h) & (t_side > _EPS)
        t_side = torch.where(side_ok, t_side, torch.full_like(t_side, _INF))
        hit_side = o + t_side.clamp_max(1e9)[:, None] * d
        n_side = torch.stack([hit_side[:, 0], torch.zeros_like(a), hit_side[:, 2]], dim=-1) / r
        candidates = [(t_side, n_side)]
        safe_dy = torch.where(d[:, 1].abs() < 1e-12, torch.full_like(a, 1e-12), d[:, 1])
        for sign in (1.0, -1.0):
            t_cap = (sign * h - o[:, 1]) / safe_dy
            hit = o + t_cap.clamp(-1e9, 1e9)[:, None] * d
            cap_ok = (hit[:, 0] ** 2 + hit[:, 2] ** 2 <= r * r) & (t_cap > _EPS) & (d[:, 1].abs() >= 1e-12)
            n_cap = torch.zeros_like(o)
            n_cap[:, 1] = sign
            candidates.append((torch.where(cap_ok, t_cap, torch.full_like(t_cap, _INF)), n_cap))
        t, normal = _first_hit(candidates)
        return t, self._to_world_dirs(normal)

    def sdf(self, points: Tensor) -> Tensor:
        """See :meth:`Primitive.sdf`."""
        q = self.to_local(points)
        d = torch.stack([q[:, [0, 2]].norm(dim=-1) - self.radius, q[:, 1].abs() - self.half_height], dim=-1)
        return d.clamp_min(0.0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0.0)

    def area(self) -> float:
        """See :meth:`Primitive.area`."""
        return 2 * math.pi * self.radius * 2 * self.half_height + 2 * math.pi * self.radius**2

    def sample_surface(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.sample_surface`."""
        r, h = self.radius, self.half_height
        weights = torch.tensor([4 * math.pi * r * h, math.pi * r * r, math.pi * r * r])
        part = torch.multinomial(weights, count, replacement=True, generator=generator)
        angle = torch.rand(count, generator=generator) * 2 * math.pi
        # Uniform over a disk: radius ~ sqrt(U).
        rho = r * torch.sqrt(torch.rand(count, generator=generator))
        y_side = (torch.rand(count, generator=generator) * 2 - 1) * h
        on_side = part == 0
        sign = torch.where(part == 1, 1.0, -1.0)
        rad = torch.where(on_side, torch.full_like(rho, r), rho)
        local = torch.stack([rad * torch.cos(angle), torch.where(on_side, y_side, sign * h), rad * torch.sin(angle)], dim=-1)
        normal = torch.where(
            on_side[:, None],
            torch.stack([torch.cos(angle), torch.zeros_like(angle), torch.sin(angle)], dim=-1),
            torch.stack([torch.zeros_like(angle), sign, torch.zeros_like(angle)], dim=-1),
        )
        return local @ self.rotation.T + self.center, normal @ self.rotation.T

    def bounding_radius(self) -> float:
        """See :meth:`Primitive.bounding_radius`."""
        return float(self.center.norm()) + math.hypot(self.radius, self.half_height)

    def transformed(self, scale: float, offset: Tensor) -> Cylinder:
        """See :meth:`Primitive.transformed`."""
        return replace(
            self, center=self.center * scale + offset, radius=self.radius * scale, half_height=self.half_height * scale
        )


@dataclass
class Capsule(Primitive):
    """All points within ``radius`` of the segment of half-length ``half_length`` along local +Y."""

    radius: float = 0.2
    half_length: float = 0.5

    @staticmethod
    def between(a: Tensor | tuple[float, ...], b: Tensor | tuple[float, ...], radius: float, material: Material) -> Capsule:
        """The capsule around the segment from ``a`` to ``b`` (world points)."""
        a, b = _vec(a), _vec(b)
        return Capsule(
            center=(a + b) / 2, rotation=_frame_from_axis(b - a), material=material,
            radius=radius, half_length=float((b - a).norm()) / 2,
        )

    def _ends(self) -> tuple[Tensor, Tensor]:
        axis = self.rotation[:, 1] * self.half_length
        return self.center - axis, self.center + axis

    def intersect(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.intersect`: a capped cylinder united with two end spheres (all convex)."""
        body = Cylinder(self.center, self.rotation, self.material, radius=self.radius, half_height=self.half_length)
        a, b = self._ends()
        return _first_hit(
            [
                body.intersect(origins, directions),
                _sphere_hit(origins, directions, a.to(origins), self.radius),
                _sphere_hit(origins, directions, b.to(origins), self.radius),
            ]
        )

    def sdf(self, points: Tensor) -> Tensor:
        """See :meth:`Primitive.sdf`."""
        q = self.to_local(points)
        q = torch.stack([q[:, 0], q[:, 1] - q[:, 1].clamp(-self.half_length, self.half_length), q[:, 2]], dim=-1)
        return q.norm(dim=-1) - self.radius

    def area(self) -> float:
        """See :meth:`Primitive.area`."""
        return 2 * math.pi * self.radius * 2 * self.half_length + 4 * math.pi * self.radius**2

    def sample_surface(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """See :meth:`Primitive.sample_surface`."""
        r, h = self.radius, self.half_length
        on_side = torch.rand(count, generator=generator) < (4 * math.pi * r * h) / self.area()
        angle = torch.rand(count, generator=generator) * 2 * math.pi
        y_side = (torch.rand(count, generator=generator) * 2 - 1) * h
        side_normal = torch.stack([torch.cos(angle), torch.zeros_like(angle), torch.sin(angle)], dim=-1)
        # The two hemispherical ends together are one sphere split at the equator.
        cap_normal = torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=-1)
        normal = torch.where(on_side[:, None], side_normal, cap_normal)
        y = torch.where(on_side, y_side, torch.sign(cap_normal[:, 1]) * h)
        local = normal * r + torch.stack([torch.zeros_like(y), y, torch.zeros_like(y)], dim=-1)
        return local @ self.rotation.T + self.center, normal @ self.rotation.T

    def bounding_radius(self) -> float:
        """See :meth:`Primitive.bounding_radius` (exact)."""
        a, b = self._ends()
        return max(float(a.norm()), float(b.norm())) + self.radius

    def transformed(self, scale: float, offset: Tensor) -> Capsule:
        """See :meth:`Primitive.transformed`."""
        return replace(
            self, center=self.center * scale + offset, radius=self.radius * scale, half_length=self.half_length * scale
        )


@dataclass
class PrimitiveObject:
    """A union of primitives; everything is in world units (see the module docstring)."""

    primitives: list[Primitive]
    name: str = "object"

    def intersect(self, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """First hit of unit rays (R, 3): t (R,) (inf on a miss), world normal (R, 3), primitive index (R,)."""
        hits = [p.intersect(origins, directions) for p in self.primitives]
        ts = torch.stack([t for t, _ in hits])
        t, index = ts.min(dim=0)
        normals = torch.stack([n for _, n in hits])
        normal = normals.gather(0, index[None, :, None].expand(1, -1, 3))[0]
        return t, normal, index

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance (P,) to the union (exact outside each piece; a bound elsewhere)."""
        return torch.stack([p.sdf(points) for p in self.primitives]).min(dim=0).values

    def albedo(self, points: Tensor) -> Tensor:
        """Albedo (P, 3) at points on or near the surface: the material of the closest piece."""
        owner = torch.stack([p.sdf(points) for p in self.primitives]).argmin(dim=0)
        return self._albedo_of(points, owner)

    def _albedo_of(self, points: Tensor, owner: Tensor) -> Tensor:
        albedo = torch.zeros_like(points)
        for i, prim in enumerate(self.primitives):
            mask = owner == i
            if mask.any():
                albedo[mask] = prim.material.evaluate(prim.to_local(points[mask]))
        return albedo

    def area(self) -> float:
        """Sum of the pieces' areas (an upper bound of the union's outer area)."""
        return sum(p.area() for p in self.primitives)

    def sample_surface(self, count: int, seed: int = 0, tolerance: float = 1e-5) -> tuple[Tensor, Tensor]:
        """``count`` points uniform over the union's outer surface (count, 3) and their normals.

        Pieces are picked by area, and points that lie inside another piece
        (deeper than ``tolerance``) are rejected, so only the visible outer
        surface remains. Deterministic for a given ``seed``.
        """
        generator = torch.Generator().manual_seed(seed)
        areas = torch.tensor([p.area() for p in self.primitives])
        points, normals, have = [], [], 0
        for _ in range(1000):
            batch = max(2 * count, 256)
            which = torch.multinomial(areas, batch, replacement=True, generator=generator)
            for i, prim in enumerate(self.primitives):
                n = int((which == i).sum())
                if n == 0:
                    continue
                p, nrm = prim.sample_surface(n, generator)
                others = [q.sdf(p) for j, q in enumerate(self.primitives) if j != i]
                keep = torch.stack(others).min(dim=0).values > -tolerance if others else torch.ones(n, dtype=torch.bool)
                points.append(p[keep])
                normals.append(nrm[keep])
                have += int(keep.sum())
            if have >= count:
                break
        else:
            raise RuntimeError(f"{self.name}: could not sample its outer surface (is every piece hidden?)")
        # the batches list the pieces in order: a random subset, not the first ``count``, keeps the sampling uniform
        chosen = torch.randperm(have, generator=generator)[:count]
        return torch.cat(points)[chosen], torch.cat(normals)[chosen]

    def bounding_radius(self) -> float:
        """An upper bound of |p| over the object."""
        return max(p.bounding_radius() for p in self.primitives)

    def normalized(self, radius: float = DEFAULT_OBJECT_RADIUS) -> PrimitiveObject:
        """The object centred (box of its surface samples) and scaled to fit a sphere of ``radius``."""
        samples, _ = self.sample_surface(4096, seed=0)
        offset = -(samples.min(0).values + samples.max(0).values) / 2
        moved = [p.transformed(1.0, offset) for p in self.primitives]
        scale = radius / max(p.bounding_radius() for p in moved)
        return PrimitiveObject([p.transformed(scale, torch.zeros(3)) for p in moved], self.name)


def render_object(
    obj: PrimitiveObject,
    cameras: Cameras,
    shading: Shading = "lambert",
    light_direction: tuple[float, float, float] = (0.4, 1.0, 0.7),
    ambient: float = 0.35,
    supersample: int = 1,
    chunk: int = 1 << 18,
) -> dict[str, Tensor]:
    """Ray-casts ``obj`` from every camera.

    Returns channels-last tensors on the cameras' device:
    ``rgba`` (N, H, W, 4) straight (not premultiplied) colour and alpha =
    pixel coverage; ``depth`` (N, H, W, 1) distance along the ray (0 where
    nothing is hit); ``normal`` (N, H, W, 3) world unit normals (0 on a miss);
    ``albedo`` (N, H, W, 3). ``lambert`` shading uses a light fixed in the
    world (so a surface point has the same colour in every view):
    albedo * (ambient + (1 - ambient) * max(0, n . l)); ``albedo`` returns
    the bare albedo. ``supersample`` s casts s x s rays per pixel and
    averages (anti-aliased edges; depth/normal averaged over hit rays).
    """
    if shading not in ("lambert", "albedo"):
        raise ValueError(f"unknown shading {shading!r}; expected lambert or albedo")
    s = int(supersample)
    fine = cameras.resized(cameras.height * s, cameras.width * s)
    origins, directions = generate_rays(fine)
    shape = origins.shape[:-1]
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    light = torch.nn.functional.normalize(origins.new_tensor(light_direction), dim=0)
    out = {"color": [], "albedo": [], "hit": [], "depth": [], "normal": []}
    for start in range(0, len(origins), chunk):
        o, d = origins[start : start + chunk], directions[start : start + chunk]
        t, normal, owner = obj.intersect(o, d)
        hit = torch.isfinite(t)
        t = torch.where(hit, t, torch.zeros_like(t))
        normal = torch.where(hit[:, None], normal, torch.zeros_like(normal))
        albedo = torch.zeros_like(o)
        if hit.any():
            albedo[hit] = obj._albedo_of(o[hit] + t[hit, None] * d[hit], owner[hit])
        if shading == "lambert":
            color = albedo * (ambient + (1 - ambient) * (normal @ light).clamp_min(0.0))[:, None]
        else:
            color = albedo
        for key, value in (("color", color), ("albedo", albedo), ("hit", hit[:, None].to(o)), ("depth", t[:, None]), ("normal", normal)):
            out[key].append(value)
    full = {k: torch.cat(v).reshape(*shape, -1) for k, v in out.items()}
    if s > 1:
        full = {k: _pool(v, s) for k, v in full.items()}
    alpha = full["hit"]
    weight = alpha.clamp_min(1e-8)
    # Pooled colour/depth/normal are sums over hit rays / s^2; divide by coverage for straight values.
    color = torch.where(alpha > 0, full["color"] / weight, torch.zeros_like(full["color"]))
    albedo = torch.where(alpha > 0, full["albedo"] / weight, torch.zeros_like(full["albedo"]))
    depth = torch.where(alpha > 0, full["depth"] / weight, torch.zeros_like(full["depth"]))
    normal = torch.nn.functional.normalize(full["normal"], dim=-1)
    return {"rgba": torch.cat([color.clamp(0, 1), alpha], dim=-1), "depth": depth, "normal": normal, "albedo": albedo}


def _pool(value: Tensor, s: int) -> Tensor:
    """Averages s x s blocks of a channels-last (N, H*s, W*s, C) tensor."""
    return torch.nn.functional.avg_pool2d(value.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)


def _random_color(generator: torch.Generator) -> tuple[float, float, float]:
    h, s, v = torch.rand(3, generator=generator).tolist()
    return colorsys.hsv_to_rgb(h, 0.35 + 0.55 * s, 0.45 + 0.5 * v)


def _random_material(generator: torch.Generator, textured_probability: float) -> Material:
    color = _random_color(generator)
    if float(torch.rand(1, generator=generator)) >= textured_probability:
        return Material(color)
    pattern: Pattern = "stripes" if float(torch.rand(1, generator=generator)) < 0.5 else "checker"
    frequency = 3.0 + 6.0 * float(torch.rand(1, generator=generator))
    return Material(color, pattern, _random_color(generator), frequency)


FAMILIES = ("blob", "stacked", "symmetric", "single")
"""Shape families of :func:`random_object`."""

_PATTERNS: tuple[Pattern, ...] = ("stripes", "checker", "dots", "rings", "gradient")


def random_object(
    seed: int,
    min_primitives: int = 2,
    max_primitives: int = 6,
    textured_probability: float = 0.5,
    radius: float = DEFAULT_OBJECT_RADIUS,
    family: str = "blob",
) -> PrimitiveObject:
    """A random connected union of primitives, centred and scaled into a sphere of ``radius``.

    ``family`` (:data:`FAMILIES`): ``blob`` (the first piece at the origin,
    each further piece centred on the surface of an earlier one: one
    connected blob); ``stacked`` (upright pieces stacked along +Y: vases,
    lamps, snowmen, chess pieces); ``symmetric`` (a body with mirrored pairs
    of limbs and often a head: figures, animals, robots); ``single`` (one
    larger piece, sometimes with a small attachment). Only ``blob`` uses
    ``min_primitives`` / ``max_primitives``; the other families also use
    ellipsoids and the dots / rings / gradient patterns. Colours, patterns,
    sizes and orientations are random; the same ``seed`` and family always
    give the same object.
    """
    if family != "blob":
        if family not in FAMILIES:
            raise ValueError(f"unknown object family {family!r}; expected one of {', '.join(FAMILIES)}")
        builder = {"stacked": _stacked_pieces, "symmetric": _symmetric_pieces, "single": _single_pieces}[family]
        generator = torch.Generator().manual_seed(seed)
        pieces = builder(generator, textured_probability)
        return PrimitiveObject(pieces, name=f"{family}-{seed}").normalized(radius)
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=generator))

    count = int(torch.randint(min_primitives, max_primitives + 1, (1,), generator=generator))
    pieces: list[Primitive] = []
    for index in range(count):
        size = uniform(0.35, 0.6) if index == 0 else uniform(0.12, 0.35)
        if index == 0:
            center = torch.zeros(3)
        else:
            anchor = pieces[int(torch.randint(0, len(pieces), (1,), generator=generator))]
            center = anchor.sample_surface(1, generator)[0][0]
        material = _random_material(generator, textured_probability)
        rotation = _random_rotation(generator)
        kind = int(torch.randint(0, 4, (1,), generator=generator))
        if kind == 0:
            pieces.append(Sphere(center, torch.eye(3), material, radius=size))
        elif kind == 1:
            half = torch.tensor([uniform(0.5, 1.0) for _ in range(3)]) * size
            pieces.append(Box(center, rotation, material, half_size=half))
        elif kind == 2:
            pieces.append(Cylinder(center, rotation, material, radius=size * uniform(0.4, 0.9), half_height=size * uniform(0.5, 1.0)))
        else:
            pieces.append(Capsule(center, rotation, material, radius=size * uniform(0.3, 0.6), half_length=size * uniform(0.5, 1.2)))
    return PrimitiveObject(pieces, name=f"random-{seed}").normalized(radius)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def _rich_material(generator: torch.Generator, textured_probability: float) -> Material:
    """A plain colour, or (with ``textured_probability``) one of the five patterns in two colours."""
    color = _random_color(generator)
    if float(torch.rand(1, generator=generator)) >= textured_probability:
        return Material(color)
    pattern = _PATTERNS[int(torch.randint(len(_PATTERNS), (1,), generator=generator))]
    frequency = _uniform(generator, 1.5, 4.0) if pattern == "gradient" else _uniform(generator, 3.0, 9.0)
    return Material(color, pattern, _random_color(generator), frequency)


def _turn_about_y(generator: torch.Generator) -> Tensor:
    angle = _uniform(generator, 0.0, 2 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _upright_piece(generator: torch.Generator, center: Tensor, width: float, half_height: float, material: Material) -> Primitive:
    """A piece whose local +Y is world +Y, ``width`` across and 2 ``half_height`` tall, centred at ``center``."""
    kind = int(torch.randint(0, 5, (1,), generator=generator))
    if kind == 0:
        return Cylinder(center, _turn_about_y(generator), material, radius=width, half_height=half_height)
    if kind == 1:
        return Ellipsoid(center, _turn_about_y(generator), material, radii=torch.tensor([width, half_height, width * _uniform(generator, 0.7, 1.0)]))
    if kind == 2:
        half = torch.tensor([width, half_height, width * _uniform(generator, 0.6, 1.0)])
        return Box(center, _turn_about_y(generator), material, half_size=half)
    if kind == 3:
        return Sphere(center, torch.eye(3), material, radius=min(width, half_height))
    radius = min(width, half_height)
    return Capsule(center, torch.eye(3), material, radius=radius, half_length=max(half_height - radius, 0.02))


def _top(piece: Primitive) -> float:
    """The highest world Y of an upright piece built by :func:`_upright_piece`."""
    y = float(piece.center[1])
    if isinstance(piece, Cylinder):
        return y + piece.half_height
    if isinstance(piece, Ellipsoid):
        return y + float(piece.radii[1])
    if isinstance(piece, Box):
        return y + float(piece.half_size[1])
    if isinstance(piece, Capsule):
        return y + piece.half_length + piece.radius
    return y + piece.radius  # type: ignore[attr-defined]


def _stacked_pieces(generator: torch.Generator, textured_probability: float) -> list[Primitive]:
    pieces: list[Primitive] = []
    y = 0.0
    shared = _rich_material(generator, textured_probability)
    for _ in range(int(torch.randint(2, 6, (1,), generator=generator))):
        width = _uniform(generator, 0.12, 0.45)
        half_height = _uniform(generator, 0.06, 0.3)
        material = shared if float(torch.rand(1, generator=generator)) < 0.4 else _rich_material(generator, textured_probability)
        centre_y = y + half_height * _uniform(generator, 0.6, 1.0)
        piece = _upright_piece(generator, torch.tensor([0.0, centre_y, 0.0]), width, half_height, material)
        pieces.append(piece)
        y = _top(piece)
    return pieces


def _random_kind(generator: torch.Generator, center: Tensor, size: float, material: Material) -> Primitive:
    """One randomly oriented piece of any kind about ``size`` across."""
    rotation = _random_rotation(generator)
    kind = int(torch.randint(0, 5, (1,), generator=generator))
    if kind == 0:
        return Sphere(center, torch.eye(3), material, radius=size)
    if kind == 1:
        return Box(center, rotation, material, half_size=torch.tensor([_uniform(generator, 0.5, 1.0) for _ in range(3)]) * size)
    if kind == 2:
        return Cylinder(center, rotation, material, radius=size * _uniform(generator, 0.4, 0.9), half_height=size * _uniform(generator, 0.5, 1.0))
    if kind == 3:
        return Capsule(center, rotation, material, radius=size * _uniform(generator, 0.3, 0.6), half_length=size * _uniform(generator, 0.5, 1.2))
    return Ellipsoid(center, rotation, material, radii=torch.tensor([_uniform(generator, 0.4, 1.0) for _ in range(3)]) * size)


_MIRROR = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))


def _mirrored(piece: Primitive) -> Primitive:
    """``piece`` reflected through the plane x = 0 (M R M is again a rotation)."""
    return replace(piece, center=piece.center * torch.tensor([-1.0, 1.0, 1.0]), rotation=_MIRROR @ piece.rotation @ _MIRROR)


def _symmetric_pieces(generator: torch.Generator, textured_probability: float) -> list[Primitive]:
    body_size = _uniform(generator, 0.3, 0.5)
    body = _upright_piece(generator, torch.zeros(3), body_size * _uniform(generator, 0.6, 1.0), body_size, _rich_material(generator, textured_probability))
    pieces: list[Primitive] = [body]
    if float(torch.rand(1, generator=generator)) < 0.7:
        head = _uniform(generator, 0.12, 0.25)
        pieces.append(_upright_piece(generator, torch.tensor([0.0, _top(body) + 0.7 * head, 0.0]), head, head, _rich_material(generator, textured_probability)))
    surface, _ = body.sample_surface(256, generator)
    side = surface[surface[:, 0] > 0.5 * float(surface[:, 0].max())]
    for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
        anchor = side[int(torch.randint(len(side), (1,), generator=generator))]
        limb = _random_kind(generator, anchor.clone(), _uniform(generator, 0.08, 0.2), _rich_material(generator, textured_probability))
        pieces += [limb, _mirrored(limb)]
    return pieces


def _single_pieces(generator: torch.Generator, textured_probability: float) -> list[Primitive]:
    # the main piece is nearly all the object's surface: patterned at least 4 times in 5, so colour varies on it
    main = _random_kind(generator, torch.zeros(3), _uniform(generator, 0.35, 0.6), _rich_material(generator, max(textured_probability, 0.8)))
    pieces = [main]
    if float(torch.rand(1, generator=generator)) < 0.5:
        anchor = main.sample_surface(1, generator)[0][0]
        pieces.append(_random_kind(generator, anchor, _uniform(generator, 0.08, 0.18), _rich_material(generator, textured_probability)))
    return pieces


def toy_robot(radius: float = DEFAULT_OBJECT_RADIUS) -> PrimitiveObject:
    """A deterministic toy robot facing +Z: box body and head, eyes, antenna, capsule arms, cylinder legs."""
    eye = torch.eye(3)
    metal = Material((0.55, 0.6, 0.7), "stripes", (0.35, 0.4, 0.5), 8.0)
    red = Material((0.85, 0.2, 0.15))
    dark = Material((0.08, 0.08, 0.1))
    yellow = Material((0.95, 0.8, 0.2))
    blue = Material((0.2, 0.35, 0.8), "checker", (0.9, 0.9, 0.95), 10.0)
    pieces: list[Primitive] = [
        Box(_vec((0.0, 0.0, 0.0)), eye, blue, half_size=_vec((0.35, 0.4, 0.22))),
        Box(_vec((0.0, 0.62, 0.0)), eye, metal, half_size=_vec((0.25, 0.2, 0.2))),
        Sphere(_vec((-0.1, 0.66, 0.19)), eye, dark, radius=0.06),
        Sphere(_vec((0.1, 0.66, 0.19)), eye, dark, radius=0.06),
        Box(_vec((0.0, 0.54, 0.2)), eye, red, half_size=_vec((0.1, 0.025, 0.02))),
        Capsule.between((0.0, 0.8, 0.0), (0.0, 1.0, 0.0), 0.025, metal),
        Sphere(_vec((0.0, 1.03, 0.0)), eye, red, radius=0.06),
        Capsule.between((-0.42, 0.28, 0.0), (-0.55, -0.25, 0.1), 0.08, metal),
        Capsule.between((0.42, 0.28, 0.0), (0.55, -0.25, 0.1), 0.08, metal),
        Sphere(_vec((-0.56, -0.3, 0.11)), eye, yellow, radius=0.1),
        Sphere(_vec((0.56, -0.3, 0.11)), eye, yellow, radius=0.1),
        Cylinder(_vec((-0.17, -0.62, 0.0)), eye, metal, radius=0.11, half_height=0.24),
        Cylinder(_vec((0.17, -0.62, 0.0)), eye, metal, radius=0.11, half_height=0.24),
        Box(_vec((-0.17, -0.88, 0.05)), eye, red, half_size=_vec((0.14, 0.05, 0.18))),
        Box(_vec((0.17, -0.88, 0.05)), eye, red, half_size=_vec((0.14, 0.05, 0.18))),
    ]
    return PrimitiveObject(pieces, name="toy-robot").normalized(radius)


def mug(radius: float = DEFAULT_OBJECT_RADIUS) -> PrimitiveObject:
    """A deterministic striped mug with coffee on top and a handle (an arc of capsules) on +X."""
    eye = torch.eye(3)
    body = Material((0.9, 0.88, 0.82), "stripes", (0.2, 0.45, 0.75), 5.0)
    coffee = Material((0.3, 0.17, 0.08))
    handle = Material((0.2, 0.45, 0.75))
    pieces: list[Primitive] = [
        Cylinder(_vec((0.0, 0.0, 0.0)), eye, body, radius=0.5, half_height=0.55),
        Cylinder(_vec((0.0, 0.555, 0.0)), eye, coffee, radius=0.44, half_height=0.01),
    ]
    arc = [(0.45 + 0.32 * math.sin(a), 0.32 * math.cos(a), 0.0) for a in torch.linspace(0, math.pi, 7).tolist()]
    pieces += [Capsule.between(arc[i], arc[i + 1], 0.06, handle) for i in range(len(arc) - 1)]
    return PrimitiveObject(pieces, name="mug").normalized(radius)
