"""Import first in tests of Triton kernels: without CUDA it switches Triton to its CPU interpreter, so the
kernel parity tests run in CI too (on CUDA they check the compiled kernels). ``DEVICE`` is where they run.

Triton reads ``TRITON_INTERPRET`` when a kernel is first defined, so this must come before any import of
them. Import from tests: ``from triton_setup import DEVICE``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
