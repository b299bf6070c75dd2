"""The seam between guidance and the systems that train with it: what a guidance offers, typed.

Systems depend on :class:`Guidance` (and :class:`Reference` for what
``prepare`` reads), not on a concrete model wrapper:
:class:`recon.guidance.interface.Zero123Guidance` implements it for Zero-1-to-3
and Cascade-Zero123, and tests pass small stand-ins that satisfy it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from recon.guidance.sds import SDSOutput


class Reference(Protocol):
    """The input view a guidance conditions on (:class:`recon.preprocess.ReferenceView` is one)."""

    elevation_deg: float
    azimuth_deg: float
    radius: float

    def rgb_over(self, color: tuple[float, float, float] | float = (1.0, 1.0, 1.0)) -> Tensor:
        """(3, S, S) colour in [0, 1] composited over ``color``."""
        ...


@runtime_checkable
class Guidance(Protocol):
    """Score distillation for one input image at a time: ``prepare`` once, then ``sds`` every step."""

    @property
    def device(self) -> torch.device:
        """Device the guidance computes on (renders are moved there)."""
        ...

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the guidance scores natively (renders are resized to it)."""
        ...

    def prepare(self, reference: Reference, cache_dir: str | Path | None = None) -> dict[str, float]:
        """Conditions on ``reference``; returns plain read-outs (seconds, cache hits) for the run's meta.json."""
        ...

    def sds(
        self,
        images: Tensor,
        elevation_deg: Tensor,
        azimuth_deg: Tensor,
        radius: Tensor,
        step: int,
        generator: torch.Generator | None = None,
    ) -> SDSOutput:
        """SDS loss (scalar with grad to ``images`` (B, 3, H, W) in [0, 1]) for renders seen from absolute
        cameras (degrees, scene units; each (B,) or scalar) at optimisation ``step``."""
        ...
