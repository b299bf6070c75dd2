"""recon: one image to a Blender-ready textured mesh (Cascade-Zero123 score distillation into a NeRF).

``import recon`` stays cheap: the Python API (``recon.fit``, ``recon.export``,
mirroring ``recon fit`` / ``recon export``; ``recon.fit_image`` with
``recon.Models`` and ``recon.build_config`` for one image at a time) is
imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Models", "build_config", "export", "fit", "fit_image"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from recon import api

        return getattr(api, name)
    raise AttributeError(f"module 'recon' has no attribute {name!r}")
