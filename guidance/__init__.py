"""Zero-1-to-3 guidance: the model wrapper, checkpoint loading, novel-view sampling, SDS and the cascade.

Only torch-level modules are imported here; diffusers and transformers load
when a model is built or read.
"""

from recon.guidance.checkpoints import load_zero123, random_model, save_diffusers
from recon.guidance.model import Zero123Model
from recon.guidance.protocol import Guidance, Reference
from recon.guidance.sampling import encode_relative_views, sample_views
from recon.guidance.sds import SDSOutput

__all__ = [
    "Guidance",
    "Reference",
    "SDSOutput",
    "Zero123Model",
    "encode_relative_views",
    "load_zero123",
    "random_model",
    "sample_views",
    "save_diffusers",
]
