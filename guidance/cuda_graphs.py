"""CUDA-graph replay of the UNet's gradient-free forward pass and of the VAE encoder's forward and backward.

A Zero123 UNet call at the batch sizes score distillation uses is bound by
kernel launches, not arithmetic: replaying a captured graph removes the
launch gaps (several times faster at batch 4-8 on an H100). One graph is
captured per input shape (stages change the batch size) and replayed with
the new inputs copied into its static buffers. Only UNet calls made without
autograd use it; training and anything that needs gradients run eagerly.

The SDS gradient reaches the renders through the VAE encoder: at the small
batches of the fine stage its forward and backward are launch-bound too
(~10 ms of fixed cost per step on an H200). :class:`GraphedEncoder` captures
both with :func:`torch.cuda.make_graphed_callables`, for one input shape at
a time: a new shape (a stage or schedule change) drops the previous graphs
and their activation memory.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

WARMUP_CALLS = 2


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block (on again after, if it was on): a collection during a
    capture could destroy an unreachable CUDA graph (graphs sit in reference cycles), which invalidates the
    capture."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class GraphedUNet:
    """Callable ``(sample, t, context) -> eps`` that captures and replays one CUDA graph per shape."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[Tensor, Tensor, Tensor], Tensor]] = {}

    def _eager(self, sample: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(sample, t, encoder_hidden_states=context).sample

    def _capture(self, sample: Tensor, t: Tensor, context: Tensor) -> tuple:
        static = (sample.clone(), t.clone(), context.clone())
        stream = torch.cuda.Stream(sample.device)
        stream.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):  # lets cuDNN/cuBLAS pick and allocate before capture
                self._eager(*static)
        torch.cuda.current_stream(sample.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(graph):
            output = self._eager(*static)
        return graph, static, output

    def __call__(self, sample: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """eps (B, 4, h, w) for ``sample`` (B, C, h, w), timesteps ``t`` (B,), tokens ``context`` (B, K, D)."""
        key = (tuple(sample.shape), tuple(t.shape), tuple(context.shape), sample.dtype, t.dtype, sample.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(sample, t, context)
        graph, (static_sample, static_t, static_context), output = self.graphs[key]
        static_sample.copy_(sample)
        static_t.copy_(t)
        static_context.copy_(context)
        graph.replay()
        return output.clone()


class GraphedEncoder:
    """Callable ``images (B, 3, S, S) -> latents`` like ``encode``, whose forward and backward (to the images) replay
    CUDA graphs when the images are CUDA tensors that require grad; any other call runs ``encode`` eagerly.

    ``encode`` must be a pure function of its input apart from frozen weights (no RNG, no parameter that
    requires grad). The returned latents and the images' gradient live in the graphs' static buffers: use
    them before the next call, as one training step does.
    """

    def __init__(self, encode: Callable[[Tensor], Tensor]) -> None:
        self.encode = encode
        self.key: tuple | None = None
        self.graphed: Callable[[Tensor], Tensor] | None = None

    def __call__(self, images: Tensor) -> Tensor:
        """Latents of ``images`` (B, 3, S, S), differentiable with respect to ``images``."""
        if not (images.is_cuda and images.requires_grad and torch.is_grad_enabled()):
            return self.encode(images)
        key = (tuple(images.shape), images.dtype, images.device)
        if key != self.key:
            # frees the previous shape's graphs before capturing the new ones. They sit in reference cycles
            # (make_graphed_callables builds an autograd.Function class per callable), so only the cyclic
            # collector frees them, and destroying a graph while a stream captures invalidates the capture (a
            # CUDA error at the next shape change): collect here, when there is a graph to free (a full
            # collection takes ~0.2 s with diffusers and transformers loaded), and not during the capture.
            if self.graphed is not None:
                self.graphed = None
                gc.collect()
            sample = torch.rand_like(images).requires_grad_(True)
            with collector_paused():
                self.graphed = torch.cuda.make_graphed_callables(self.encode, (sample,), num_warmup_iters=WARMUP_CALLS)
            self.key = key
        return self.graphed(images)


def unet_runner(unet: nn.Module, use_graphs: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """A graph-replaying runner for ``unet`` when ``use_graphs`` and CUDA is available, else ``None``."""
    if not use_graphs or not torch.cuda.is_available():
        return None
    return GraphedUNet(unet)


def encoder_runner(encode: Callable[[Tensor], Tensor], use_graphs: bool) -> Callable[[Tensor], Tensor]:
    """``encode`` with CUDA-graph replay of its forward and backward (:class:`GraphedEncoder`) when ``use_graphs``
    and CUDA is available, else ``encode`` itself."""
    if not use_graphs or not torch.cuda.is_available():
        return encode
    return GraphedEncoder(encode)
