"""CUDA-graph replay of the UNet gives the eager result and is used only without autograd."""

import pytest
import torch
from guidance_fixtures import tiny_model


def test_graphs_are_a_no_op_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tiny_model()
    model.use_cuda_graphs(True)
    assert model._graphed_unet is None


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
