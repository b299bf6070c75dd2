"""Multi-resolution hash-grid encoding (instant-NGP) with torch (reference), Triton and tinycudann backends."""

from recon.encoding.hashgrid import BACKENDS, HashGridEncoding, make_encoding
from recon.encoding.reference import HashGridConfig, TorchHashGrid

__all__ = ["BACKENDS", "HashGridConfig", "HashGridEncoding", "TorchHashGrid", "make_encoding"]
