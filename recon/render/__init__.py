"""Volume rendering of the radiance field: samplers, compositing, the renderer."""

from recon.render.renderer import RendererConfig, VolumeRenderer

__all__ = ["RendererConfig", "VolumeRenderer"]
