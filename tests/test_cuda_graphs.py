"""CUDA-graph replay of the UNet (without autograd) and of the VAE encoder's forward and backward gives the eager result."""

import pytest
import torch
from guidance_fixtures import tiny_model

from recon.guidance.cuda_graphs import GraphedEncoder, encoder_runner


def test_graphs_are_a_no_op_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tiny_model()
    model.use_cuda_graphs(True)
    assert model._graphed_unet is None
    assert encoder_runner(model.encode, True) == model.encode


def test_graphed_encoder_runs_eagerly_off_the_gpu_and_without_grad():
    model = tiny_model()
    encoder = GraphedEncoder(model.encode)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    torch.testing.assert_close(encoder(images), model.encode(images))
    assert encoder.graphed is None


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: drives GraphedEncoder's capture logic without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_graphed_encoder_collects_only_old_graphs_and_never_during_a_capture(monkeypatch):
    import gc

    from recon.guidance import cuda_graphs

    captures, collections, collect = [], [], gc.collect
    monkeypatch.setattr(cuda_graphs.gc, "collect", lambda: collections.append(len(captures)) or collect())

    def fake_capture(fn, samples, num_warmup_iters):
        captures.append((tuple(samples[0].shape), gc.isenabled()))
        return fn

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_capture)
    encoder = GraphedEncoder(lambda images: images * 2.0)
    assert gc.isenabled()
    for batch in (2, 2, 3):
        images = torch.Tensor._make_subclass(_ClaimsCuda, torch.rand(batch, 3, 4, 4), True)
        torch.testing.assert_close(encoder(images).as_subclass(torch.Tensor), images.as_subclass(torch.Tensor) * 2.0)
    assert captures == [((2, 3, 4, 4), False), ((3, 3, 4, 4), False)]  # a new shape only; collector off while capturing
    assert collections == [1]  # before the second capture only: the first has no graphs to free
    assert gc.isenabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_matches_eager_for_new_inputs_and_shapes():
    model = tiny_model().to("cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)

    def inputs(batch: int):
        noisy = torch.randn(batch, 4, 8, 8, device="cuda", generator=generator)
        t = torch.randint(0, 1000, (batch,), device="cuda", generator=generator)
        context = torch.randn(batch, 3, model.context_dim, device="cuda", generator=generator)
        latent = torch.randn(batch, 4, 8, 8, device="cuda", generator=generator)
        return noisy, t, context, latent

    batches = [inputs(2), inputs(2), inputs(3)]
    with torch.no_grad():
        eager = [model.eps(*b) for b in batches]
        model.use_cuda_graphs(True)
        replayed = [model.eps(*b) for b in batches]
    assert len(model._graphed_unet.graphs) == 2
    for a, b in zip(eager, replayed):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    noisy, t, context, latent = batches[0]
    context = context.clone().requires_grad_()
    model.eps(noisy, t, context, latent).sum().backward()  # with autograd: the eager path
    assert context.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_encoder_matches_eager_values_and_gradients_across_shapes():
    model = tiny_model().to("cuda")
    encoder = GraphedEncoder(model.encode)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for batch in (2, 2, 3, 2):
        images = torch.rand(batch, 3, 32, 32, device="cuda", generator=generator)
        weights = torch.randn(batch, 4, 4, 4, device="cuda", generator=generator)
        results = []
        for run in (model.encode, encoder):
            pixels = images.clone().requires_grad_(True)
            latents = run(pixels)
            (latents.float() * weights).sum().backward()
            results.append((latents.detach().clone(), pixels.grad))
        assert encoder.key[0] == (batch, 3, 32, 32)  # one shape's graphs at a time
        torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_encoder_frees_the_previous_shapes_graphs_before_capturing(monkeypatch):
    # the previous graphs sit in reference cycles: if the cyclic collector freed them during the next capture,
    # that capture would fail; they must be gone as soon as the new shape's graphs exist
    import gc

    from recon.guidance import cuda_graphs

    model = tiny_model().to("cuda")
    encoder = GraphedEncoder(model.encode)
    gc.collect()  # earlier tests' graphs
    collections, collect = [], gc.collect
    monkeypatch.setattr(cuda_graphs.gc, "collect", lambda: collections.append(len(collections)) or collect())
    gc.disable()
    try:
        for batch in (2, 3):
            encoder(torch.rand(batch, 3, 32, 32, device="cuda", requires_grad=True)).sum().backward()
            assert len(collections) == batch - 2  # none before the first capture: nothing to free yet
        graphs = [o for o in gc.get_objects() if isinstance(o, torch.cuda.CUDAGraph)]
    finally:
        gc.enable()
    assert len(graphs) == 2  # the forward and backward graph of batch 3 only
