"""The latent cache, the compute dtype and attention of the frozen models, and the optional compiled UNet."""

from __future__ import annotations

import math

import pytest
import torch

import frozen_models
import train_textual_inversion as tti


@pytest.fixture
def spy_models(monkeypatch):
    """Captures the Models bundle a run builds, to look at what the step actually used."""
    seen = {}
    load = tti.load_frozen_models

    def spy(*args, **kwargs):
        seen["models"] = load(*args, **kwargs)
        return seen["models"]

    monkeypatch.setattr(tti, "load_frozen_models", spy)
    return seen


@pytest.fixture(scope="module")
def tiny_vae(tiny_pipeline):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_pipeline, subfolder="vae").eval()


def test_cached_posterior_equals_encoding_each_image_and_flip(tiny_vae):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    latents = tti.ImageLatents(images, tiny_vae)
    latents.cache()
    mean, std = torch.stack(latents.mean), torch.stack(latents.std)  # one [2 (flip), C, h, w] per image
    assert mean.shape == std.shape == (3, 2, 4, 4, 4) and mean.dtype == torch.float32
    for i in range(3):
        for flip in (False, True):
            pixels = tti.pixel_values(images, torch.tensor([i]), torch.tensor([flip]))
            dist = tiny_vae.encode(pixels).latent_dist
            torch.testing.assert_close(mean[i, int(flip)], dist.mean[0].detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(std[i, int(flip)], dist.std[0].detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mean[:, 0], mean[:, 1])  # the flips are different images


def test_cached_and_encoded_latents_are_the_same_draws(tiny_vae):
    """Same generator state, same latents: the cache changes the cost, not the distribution the UNet sees."""
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    index, flip = torch.tensor([1, 0, 1]), torch.tensor([True, False, False])
    cached = tti.ImageLatents(images, tiny_vae)
    cached.cache()
    encoded = tti.ImageLatents(images, tiny_vae)
    a = cached.sample(index, flip, torch.Generator().manual_seed(7))
    b = encoded.sample(index, flip, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    expected = tiny_vae.encode(tti.pixel_values(images, index, flip)).latent_dist.sample(
        torch.Generator().manual_seed(7)) * tiny_vae.config.scaling_factor  # diffusers' own sampling
    torch.testing.assert_close(a, expected.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, cached.sample(index, flip, torch.Generator().manual_seed(8)))  # a fresh draw


@pytest.mark.parametrize("extra", [(), ("--center_crop", "--repeats", "3", "--train_batch_size", "5")],
                         ids=["default", "center-crop-repeats-short-batch"])
def test_training_with_and_without_the_cache_matches(run_training, tmp_path, spy_models, extra):
    cached = run_training(*extra, out=tmp_path / "cached")
    assert spy_models["models"].latents.mean is not None
    encoded = run_training(*extra, "--no_cache_latents", out=tmp_path / "encoded")
    assert spy_models["models"].latents.mean is None
    for a, b in zip(cached.history, encoded.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    torch.testing.assert_close(cached.vectors, encoded.vectors, rtol=1e-4, atol=1e-5)


def test_vae_is_upcast_for_fp16_only_when_its_config_asks():
    class FakeVae:
        def __init__(self, **config):
            self.config = config

    assert frozen_models.vae_dtype_for(torch.float16, FakeVae()) == torch.float32  # diffusers' default: force_upcast
    assert frozen_models.vae_dtype_for(torch.float16, FakeVae(force_upcast=True)) == torch.float32
    assert frozen_models.vae_dtype_for(torch.float16, FakeVae(force_upcast=False)) == torch.float16
    assert frozen_models.vae_dtype_for(torch.bfloat16, FakeVae(force_upcast=True)) == torch.bfloat16
    assert frozen_models.vae_dtype_for(torch.float32, FakeVae()) == torch.float32


def test_bf16_runs_frozen_weights_in_bf16_and_trains_fp32_vectors(run_training, spy_models, monkeypatch):
    states = []
    make = tti.make_optimizer_and_schedule

    def spy(*args):
        optimizer, scheduler = make(*args)
        states.append(optimizer)
        return optimizer, scheduler

    monkeypatch.setattr(tti, "make_optimizer_and_schedule", spy)
    result = run_training("--mixed_precision", "bf16", "--max_train_steps", "3")
    models = spy_models["models"]
    (embedding,) = models.embeddings
    for module in (models.unet, models.vae, embedding.frozen):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert embedding.vectors.dtype == torch.float32
    exp_avg = states[0].state[embedding.vectors]["exp_avg"]
    assert exp_avg.dtype == torch.float32 and exp_avg.abs().sum() > 0
    assert all(mean.dtype == torch.float32 for mean in models.latents.mean)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.vectors.dtype == torch.float32 and torch.isfinite(result.vectors).all()


def test_attention_is_pytorch_sdpa_by_default(run_training, spy_models):
    from diffusers.models.attention_processor import AttnProcessor2_0

    run_training("--max_train_steps", "1")
    models = spy_models["models"]
    assert {type(p) for p in models.unet.attn_processors.values()} == {AttnProcessor2_0}
    (text_encoder,) = models.prompt_encoder.text_encoders
    assert text_encoder.config._attn_implementation == "sdpa"


def test_compiled_unet_trains_to_the_same_vectors(run_training, tmp_path, spy_models, monkeypatch):
    # Dynamo's graph capture and AOT autograd's backward are what the trainer relies on; inductor's C++ code
    # generation, cold on every CI clone, cost this test 70 s of a 10-minute suite. gpu_check.sh compiles for real.
    compile_for_real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: compile_for_real(*a, **{**kw, "backend": "aot_eager"}))
    plain = run_training("--max_train_steps", "2", out=tmp_path / "plain")
    compiled = run_training("--max_train_steps", "2", "--compile_unet", out=tmp_path / "compiled")
    assert spy_models["models"].unet._compiled_call_impl is not None  # really compiled, not silently skipped
    torch.testing.assert_close(compiled.vectors, plain.vectors, rtol=1e-4, atol=1e-5)


def test_fp16_frozen_weights_give_fp32_gradients_the_grad_scaler_can_unscale():
    """What fp16 training needs (it runs on GPUs only, so here without one): the frozen matrix and the activations in
    fp16, the vectors, their gradient and AdamW in fp32, so the scaler never meets an fp16 gradient."""
    frozen = torch.nn.Embedding(10, 4).to(torch.float16).requires_grad_(False)
    embedding = tti.PlaceholderEmbedding(frozen, 10, torch.randn(2, 4))
    optimizer = torch.optim.AdamW([embedding.vectors], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    out = embedding(torch.tensor([[1, 10, 11]]))
    assert out.dtype == torch.float16
    scaler.scale(out.float().square().sum()).backward()
    assert embedding.vectors.grad.dtype == torch.float32
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" for fp16 parameters
    before = embedding.vectors.detach().clone()
    scaler.step(optimizer)
    assert not torch.equal(embedding.vectors, before) and torch.equal(embedding.frozen.weight, frozen.weight)
