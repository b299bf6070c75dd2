"""tinycudann backend of the hash-grid encoding (CUDA only, imported lazily).

Its parameter vector uses the same layout as :class:`TorchHashGrid`'s flat
table (rows x features, level after level), so the two can be compared or
converted with :func:`tcnn_params_to_table`.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor, nn

from recon.encoding.reference import HashGridConfig
from recon.errors import ReconError


def tcnn_available() -> bool:
    """True when the ``tinycudann`` package is installed (it is not imported here)."""
    return importlib.util.find_spec("tinycudann") is not None


def tcnn_encoding_config(cfg: HashGridConfig) -> dict:
    """The tinycudann ``encoding_config`` dict equivalent to ``cfg``."""
    return {
        "otype": "HashGrid",
        "n_levels": cfg.n_levels,
        "n_features_per_level": cfg.n_features_per_level,
        "log2_hashmap_size": cfg.log2_hashmap_size,
        "base_resolution": cfg.base_resolution,
        "per_level_scale": cfg.per_level_scale,
        "interpolation": "Linear",
    }


class TcnnHashGrid(nn.Module):
    """Hash-grid lookup by tinycudann: (P, 3) in [0, 1] -> (P, n_levels * F) float32 (computed in tcnn's precision)."""

    def __init__(self, cfg: HashGridConfig) -> None:
        super().__init__()
        try:
            import tinycudann as tcnn
        except ImportError as exc:
            raise ReconError(f"encoding.backend 'tcnn': tinycudann failed to import ({exc}); use backend torch") from exc
        self.cfg = cfg
        self.module = tcnn.Encoding(n_input_dims=3, encoding_config=tcnn_encoding_config(cfg))

    def forward(self, x: Tensor) -> Tensor:
        """Encodes points ``x`` (P, 3) in [0, 1] -> (P, n_levels * F) float32."""
        return self.module(x.float().clamp(0.0, 1.0)).float()


def tcnn_params_to_table(params: Tensor, n_features_per_level: int) -> Tensor:
    """tinycudann's flat parameter vector as a (rows, F) float32 table for :class:`TorchHashGrid`."""
    return params.detach().float().reshape(-1, n_features_per_level)
