"""Cascade-Zero123 training: overfitting, EMA into the Base, dropout, checkpoints, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recon.cli.main import main
from recon.data.multiview import MultiViewDataset
from recon.data.synth import SynthConfig, synthesize
from recon.errors import ReconError
from recon.guidance.checkpoints import load_zero123
from recon.systems.cascade_training import (
    EncodedViews,
    TrainConfig,
    Trainer,
    ViewCache,
    cascade_tokens,
    condition_dropout,
    device_noise,
    ema_decay_at,
    lr_factor,
    lr_scale,
    make_accelerator,
    sample_batch,
    self_prompt,
    step_generator,
    timestep_weights,
    train,
    trainable_modules,
)
from recon.systems.checkpoint import list_checkpoints, read_checkpoint_file

NO_DROP = {"drop_tokens_p": 0.0, "drop_latent_p": 0.0, "drop_both_p": 0.0, "drop_extra_token_p": 0.0, "single_token_p": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mv") / "data"
    synthesize(SynthConfig(objects=2, views=3, size=64, seed=3, supersample=1), root)
    return root


def _trainer(cfg: TrainConfig) -> Trainer:
    return Trainer(cfg, load_zero123("random-tiny", "cpu", torch.float32, seed=0), make_accelerator("cpu", "no"))


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for m in trainable_modules(model) for p in m.parameters()]


def test_condition_dropout_drops_what_it_should():
    g = torch.Generator().manual_seed(0)
    everything = TrainConfig(drop_tokens_p=1.0, drop_latent_p=1.0, drop_both_p=0.0, drop_extra_token_p=0.0)
    tokens, latent = condition_dropout(8, 5, everything, g)
    assert torch.all(tokens == 0) and torch.all(latent == 0)
    tokens, latent = condition_dropout(8, 5, TrainConfig(**NO_DROP), g)
    assert torch.all(tokens == 1) and torch.all(latent == 1)
    tokens, latent = condition_dropout(8, 5, TrainConfig(**dict(NO_DROP, drop_both_p=1.0)), g)
    assert torch.all(tokens == 0) and torch.all(latent == 0)
    # Per-token dropout never touches the input token (index 0).
    tokens, latent = condition_dropout(4000, 5, TrainConfig(**dict(NO_DROP, drop_extra_token_p=0.5)), g)
    assert torch.all(tokens[:, 0] == 1) and torch.all(latent == 1)
    assert abs(float(tokens[:, 1:].mean()) - 0.5) < 0.03
    tokens, latent = condition_dropout(4000, 1, TrainConfig(**dict(NO_DROP, drop_latent_p=0.1)), g)
    assert abs(float(1 - latent.mean()) - 0.1) < 0.02 and torch.all(tokens == 1)


def test_dropped_conditioning_reaches_the_unet_as_zeros(data):
    trainer = _trainer(TrainConfig(**NO_DROP))
    seen = {}
    unet = trainer.student.unet
    handle = unet.register_forward_pre_hook(lambda module, args, kwargs: seen.update(x=args[0], ctx=kwargs["encoder_hidden_states"]), with_kwargs=True)
    noisy = torch.randn(2, 4, 8, 8)
    embeds, poses = torch.randn(2, 3, 64), torch.randn(2, 3, 4)
    latent = torch.randn(2, 4, 8, 8)
    trainer.denoiser(noisy, torch.tensor([10, 500]), embeds, poses, latent, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), torch.tensor([1.0, 0.0]))
    handle.remove()
    assert torch.all(seen["ctx"][0, 1] == 0) and torch.all(seen["ctx"][1] == 0) and seen["ctx"][0, 0].abs().sum() > 0
    assert torch.equal(seen["x"][0, 4:], latent[0]) and torch.all(seen["x"][1, 4:] == 0)


def test_cascade_tokens_follow_the_refiner_order(data):
    cfg = TrainConfig(prompt_steps=1, coarse_jitter_deg=0.0, **NO_DROP)
    trainer = _trainer(cfg)
    dataset = MultiViewDataset(data, image_size=64)
    generator = torch.Generator().manual_seed(1)
    batch = sample_batch(dataset, 2, generator)
    assert not torch.equal(batch.input_images, batch.target_images)
    prompts = self_prompt(trainer.base, batch, cfg, generator)
    assert prompts.nearby_images.shape == (2, 3, 3, 64, 64) and prompts.coarse_images.shape == (2, 3, 64, 64)
    torch.testing.assert_close(prompts.nearby_azimuth[:, 0], batch.input_azimuth + 45.0)
    torch.testing.assert_close(prompts.nearby_elevation[:, 2], batch.input_elevation + 30.0)
    embeds, poses = cascade_tokens(trainer.student, batch, prompts)
    assert embeds.shape == (2, 5, 64) and poses.shape == (2, 5, 4)
    # Token 1 is the coarse view at the target itself: zero rotation.
    torch.testing.assert_close(poses[:, 1], torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2), atol=1e-5, rtol=0)
    single, single_poses = cascade_tokens(trainer.student, batch, None)
    assert single.shape == (2, 1, 64)
    torch.testing.assert_close(single_poses[:, 0], poses[:, 0])


def test_fixed_batch_overfits_and_base_is_the_ema_after_every_step(data):
    cfg = TrainConfig(lr_unet=1e-3, lr_projection=1e-3, warmup_steps=1, ema_decay=0.9, prompt_steps=1, **NO_DROP)
    trainer = _trainer(cfg)
    batch = sample_batch(MultiViewDataset(data, image_size=64), 2, torch.Generator().manual_seed(0))
    prompts = self_prompt(trainer.base, batch, cfg, torch.Generator().manual_seed(0))
    shadow = _params(trainer.base)
    losses = []
    for step in range(1, 31):
        before = _params(trainer.base)
        losses.append(trainer.train_step(batch, torch.Generator().manual_seed(7), prompts))
        decay = ema_decay_at(step, cfg.ema_decay)
        shadow = [s.lerp(p, 1 - decay) for s, p in zip(shadow, _params(trainer.student))]
        after = _params(trainer.base)
        assert any(not torch.equal(a, b) for a, b in zip(after, before))
        for got, want in zip(after, shadow):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert trainer.step == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_train_resumes_exactly_and_final_reloads_with_the_same_eps(data, tmp_path):
    cfg = TrainConfig(stage="cascade", batch_size=1, prompt_steps=1, warmup_steps=1, steps=3, checkpoint_every=1)
    whole = train(cfg, data, "random-tiny", tmp_path / "whole", device="cpu")
    assert whole.finished and whole.step == 3 and len(whole.losses) == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "whole" / "checkpoints")] == [2, 3]
    first = train(TrainConfig(**{**cfg.__dict__, "steps": 2}), data, "random-tiny", tmp_path / "split", device="cpu")
    assert first.step == 2
    second = train(cfg, data, "random-tiny", tmp_path / "split", device="cpu")
    assert second.step == 3 and len(second.losses) == 1
    a = read_checkpoint_file(tmp_path / "whole" / "checkpoints" / "step_000003.pt")
    b = read_checkpoint_file(tmp_path / "split" / "checkpoints" / "step_000003.pt")
    for key in ("student", "base"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=1e-6, rtol=1e-5)

    # final/base reloads through load_zero123 and predicts what the checkpoint's Base predicts.
    reloaded = load_zero123(tmp_path / "whole" / "final" / "base", "cpu", torch.float32)
    assert not reloaded.is_random
    reference = load_zero123("random-tiny", "cpu", torch.float32)
    for i, module in enumerate(trainable_modules(reference)):
        module.load_state_dict({k[2:]: v for k, v in a["base"].items() if k.startswith(f"{i}.")})
    assert any(not torch.equal(p, q) for p, q in zip(_params(reference), _params(load_zero123("random-tiny", "cpu", torch.float32))))
    g = torch.Generator().manual_seed(0)
    noisy, latent = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    context = reference.context(torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 4, generator=g))
    t = torch.tensor([100, 700])
    torch.testing.assert_close(reloaded.eps(noisy, t, context, latent), reference.eps(noisy, t, context, latent), atol=1e-5, rtol=1e-5)


def test_time_budget_stops_with_a_checkpoint_and_no_final(data, tmp_path):
    result = train(TrainConfig(stage="base", steps=50, batch_size=1), data, "random-tiny", tmp_path / "run", device="cpu", max_minutes=0.0)
    assert not result.finished and result.step == 0 and result.final is None
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1][0] == 0
    assert not (tmp_path / "run" / "final").exists()


def test_learning_rates_scale_with_the_process_count():
    assert [lr_factor("none", 4), lr_factor("linear", 4), lr_factor("sqrt", 4)] == [1.0, 4.0, 2.0]
    trainer = _trainer(TrainConfig(lr_scaling="linear", lr_unet=1e-4, lr_projection=1e-3, warmup_steps=1))
    assert trainer.base_lrs == [1e-4, 1e-3]  # one process: linear scaling leaves the rates as given
    with pytest.raises(ReconError, match="lr_scaling"):
        TrainConfig(lr_scaling="quadratic")


def test_linear_schedule_warms_up_then_falls_to_zero_at_the_step_count(data):
    linear = TrainConfig(stage="base", steps=10, warmup_steps=2, lr_schedule="linear", batch_size=1)
    assert [lr_scale(linear, s) for s in range(10)] == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert lr_scale(linear, 10) == 0.0
    constant = TrainConfig(steps=10, warmup_steps=2)
    assert [lr_scale(constant, s) for s in (0, 1, 9)] == [0.5, 1.0, 1.0]
    # The trainer's optimiser runs each step at the schedule's rate.
    trainer = _trainer(linear)
    cache = ViewCache(MultiViewDataset(data, image_size=trainer.image_size), workers=1)
    for step in range(4):
        generator = step_generator(0, 0, step)
        trainer.train_step(cache.sample(1, generator, 1.0), generator)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([lr * lr_scale(linear, step) for lr in trainer.base_lrs])
    with pytest.raises(ReconError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")


def test_bad_config_values_are_refused():
    with pytest.raises(ReconError, match="stage"):
        TrainConfig(stage="refiner")
    with pytest.raises(ReconError, match="drop_tokens_p"):
        TrainConfig(drop_tokens_p=1.5)
    with pytest.raises(ReconError, match="loss_weighting"):
        TrainConfig(loss_weighting="snr")


def test_truncated_snr_weights_stress_the_noisy_timesteps():
    from recon.guidance.model import make_scheduler

    scheduler = make_scheduler()
    assert torch.equal(timestep_weights(scheduler, "eps"), torch.ones(1000))
    weights = timestep_weights(scheduler, "truncated-snr")
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar)
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    # Flat where SNR >= 1 (the epsilon loss), then proportional to 1 / SNR (the x0 loss).
    flat = weights[snr >= 1]
    assert torch.allclose(flat, flat[0].expand_as(flat))
    ratio = weights[snr < 1] * snr[snr < 1].float()
    assert torch.allclose(ratio, flat[0].expand_as(ratio), rtol=1e-4)
    assert weights[-1] > 100 * weights[0]


def test_weighted_loss_is_the_weighted_epsilon_mse(data):
    cfg = TrainConfig(stage="base", loss_weighting="truncated-snr", warmup_steps=1, **NO_DROP)
    trainer = _trainer(cfg)
    batch = sample_batch(MultiViewDataset(data, image_size=64), 3, torch.Generator().manual_seed(0))
    model = trainer.student
    # Replay the step's draws: timesteps, then noise, from the same generator.
    generator = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (3,), generator=generator)
    noise = device_noise((3, 4, 8, 8), torch.device("cpu"), generator)
    with torch.no_grad():
        embeds, poses = cascade_tokens(model, batch, None)
        target = model.encode(batch.target_images)
        eps = model.eps(model.scheduler.add_noise(target, noise, t), t, model.context(embeds, poses), model.cond_latent(batch.input_images))
    per_sample = (eps - noise).pow(2).flatten(1).mean(1)
    want = (per_sample * timestep_weights(model.scheduler, "truncated-snr")[t]).mean()
    got = trainer.train_step(batch, torch.Generator().manual_seed(5))
    assert got == pytest.approx(float(want), rel=1e-4)


def test_encoded_views_give_the_step_the_encoders_would(data):
    # Stage base reads each view's latents and image embedding from EncodedViews instead of encoding the batch.
    cfg = TrainConfig(stage="base", warmup_steps=1, **NO_DROP)
    cache = ViewCache(MultiViewDataset(data, image_size=64), workers=1)
    inputs, targets = cache.sample_pairs(4, torch.Generator().manual_seed(0))
    assert torch.all(inputs != targets)
    batch = cache.batch(inputs, targets)
    plain, fast = _trainer(cfg), _trainer(cfg)
    encoded = EncodedViews(cache, fast.student, cfg.background, chunk=3).encoded(inputs, targets)
    with torch.no_grad():
        torch.testing.assert_close(encoded.target, plain.student.encode(batch.target_images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoded.cond_latent, plain.student.cond_latent(batch.input_images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoded.input_embeds, plain.student.clip_embed(batch.input_images), atol=1e-5, rtol=1e-5)
    for step in range(3):
        want = plain.train_step(batch, torch.Generator().manual_seed(step))
        got = fast.train_step(batch, torch.Generator().manual_seed(step), encoded=encoded)
        assert got == pytest.approx(want, rel=1e-4)
    for a, b in zip(_params(plain.base), _params(fast.base)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_preloaded_stage_base_trains_as_the_plain_loader_does(data, tmp_path):
    # train() with preload reads the encoded views of the very pairs it draws: replay its draws through the encoders.
    cfg = TrainConfig(stage="base", batch_size=2, steps=3, warmup_steps=1, preload=True)
    preloaded = train(cfg, data, "random-tiny", tmp_path / "run", device="cpu")
    replay = _trainer(cfg)
    cache = ViewCache(MultiViewDataset(data, image_size=replay.image_size), workers=1)
    losses = []
    for step in range(cfg.steps):
        generator = step_generator(cfg.seed, 0, step)
        losses.append(replay.train_step(cache.sample(cfg.batch_size, generator, cfg.background), generator))
    assert preloaded.losses == pytest.approx(losses, rel=1e-4)


def test_a_non_finite_loss_stops_training_with_the_step_that_gave_it(data, tmp_path, monkeypatch):
    # Losses are read one step late; the error still names the step whose loss was not finite, and no checkpoint
    # after it is written.
    from recon.errors import TrainingDivergedError

    original = Trainer.queue_step

    def nan_at_step_two(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.step == 2 else loss

    monkeypatch.setattr(Trainer, "queue_step", nan_at_step_two)
    cfg = TrainConfig(stage="base", batch_size=1, steps=5, warmup_steps=1, checkpoint_every=2)
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 2; lower the learning rate"):
        train(cfg, data, "random-tiny", tmp_path / "run", device="cpu")
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_a_compiled_denoiser_trains_as_the_eager_one(data, tmp_path):
    # torch.compile's aot_eager backend traces forward and backward as inductor does, without generating kernels
    # (no compiler needed); the parameters keep their names, so checkpoints and exported weights are the same files.
    eager = train(TrainConfig(stage="base", batch_size=2, steps=3, warmup_steps=1), data, "random-tiny", tmp_path / "eager", device="cpu")
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = train(TrainConfig(stage="base", batch_size=2, steps=3, warmup_steps=1, compile="aot_eager"), data, "random-tiny",
                     tmp_path / "compiled", device="cpu")
    assert counters["stats"]["unique_graphs"] >= 1  # the step did run through dynamo
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    a = load_zero123(tmp_path / "eager" / "final" / "base", "cpu", torch.float32)
    b = load_zero123(tmp_path / "compiled" / "final" / "base", "cpu", torch.float32)
    assert a.unet.state_dict().keys() == b.unet.state_dict().keys()
    for x, y in zip(_params(a), _params(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    with pytest.raises(ReconError, match="compile 'fastest': not a torch.compile backend"):
        TrainConfig(compile="fastest")


def test_cli_train_cascade_stage_base(data, tmp_path):
    code = main(["train-cascade", "--data", str(data), "--init", "random-tiny", "-o", str(tmp_path / "run"),
                 "--stage", "base", "--steps", "2", "--batch-size", "1", "--device", "cpu", "--quiet"])
    assert code == 0
    model = load_zero123(tmp_path / "run" / "final" / "base", "cpu", torch.float32)
    assert model.unet.config.in_channels == 8


def test_two_processes_train_data_parallel_and_resume_on_one(data, tmp_path):
    """Data-parallel training (torchrun, DDP over gloo on the CPU): both processes step, the main one writes once;
    the run then resumes in one process (another process count) from that checkpoint."""
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "recon.cli.main",
        "train-cascade", "--data", str(data), "--init", "random-tiny", "-o", str(run), "--stage", "cascade", "--steps", "2",
        "--batch-size", "1", "--prompt-steps", "1", "--device", "cpu", "--quiet",
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((run / "meta.json").read_text())["processes"] == 2
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [2]
    state = read_checkpoint_file(run / "checkpoints" / "step_000002.pt")
    assert state["step"] == 2
    trained = load_zero123(run / "final" / "base", "cpu", torch.float32)
    initial = load_zero123("random-tiny", "cpu", torch.float32, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.parameters(), initial.unet.parameters()))
    launch = json.loads((run / "meta.json").read_text())["launches"][0]
    assert launch["processes"] == 2 and launch["global_batch"] == 2 and launch["steps"] == [0, 2]

    cfg = TrainConfig(stage="cascade", steps=3, batch_size=1, prompt_steps=1, lr_scaling="linear")
    resumed = train(cfg, data, "random-tiny", run, device="cpu")
    assert resumed.step == 3 and len(resumed.losses) == 1
    meta = json.loads((run / "meta.json").read_text())
    assert meta["processes"] == 1 and [x["processes"] for x in meta["launches"]] == [2, 1]
    assert meta["launches"][1]["steps"] == [2, 3] and meta["launches"][1]["lr_factor"] == 1.0


def test_two_processes_train_a_compiled_denoiser(data, tmp_path):
    """torch.compile inside DDP (torchrun, gloo, the aot_eager backend) in stage cascade, whose steps have one
    token or five: both processes step and the weights load by their usual names."""
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "recon.cli.main",
        "train-cascade", "--data", str(data), "--init", "random-tiny", "-o", str(run), "--stage", "cascade", "--steps", "3",
        "--batch-size", "1", "--prompt-steps", "1", "--single-token-p", "0.5", "--compile", "aot_eager", "--device", "cpu", "--quiet",
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((run / "meta.json").read_text())["processes"] == 2
    trained = load_zero123(run / "final" / "base", "cpu", torch.float32)
    initial = load_zero123("random-tiny", "cpu", torch.float32, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.parameters(), initial.unet.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cascade_steps_on_cuda(data, tmp_path):
    cfg = TrainConfig(batch_size=2, prompt_steps=2, steps=3, gradient_checkpointing=True)
    result = train(cfg, data, "random-tiny", tmp_path / "gpu", device="cuda")
    assert result.finished and all(torch.isfinite(torch.tensor(result.losses)))
