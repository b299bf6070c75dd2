"""Multi-resolution hash-grid encoding (instant-NGP) with torch / tinycudann backends."""

from recon.encoding.hashgrid import (
    BACKENDS,
    HashGridConfig,
    HashGridEncoding,
    TorchHashGrid,
    make_encoding,
)

__all__ = ["BACKENDS", "HashGridConfig", "HashGridEncoding", "TorchHashGrid", "make_encoding"]
