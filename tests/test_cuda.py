"""The CUDA paths: fp16 and bf16 training on SD and SDXL, bf16 on SD3 and Flux, the GradScaler across a resume, the
fp16 VAE upcast, validation under autocast, and the compiled UNet's gradient. `pytest -m cuda` runs them (benchmarks/gpu_check.sh
does, on a lent GPU); without CUDA they are skipped."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import train_textual_inversion as tti
from conftest import train_argv

# cuBLAS reads this when it makes its handle; with it, its results no longer depend on which workspace a call gets.
# Set at import, so before any test touches CUDA.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PIPELINES = {"sd": "tiny_pipeline", "sdxl": "tiny_sdxl_pipeline"}
ENCODERS = {"sd": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def run(pipeline, concept_dir, out, *extra) -> tti.TrainResult:
    return tti.main(tti.parse_args(train_argv(pipeline, concept_dir, out, *extra)))


def base_rows(pipeline, subfolder: str) -> torch.Tensor:
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(pipeline, subfolder=subfolder).get_input_embeddings().weight.detach()


@pytest.fixture
def spy(monkeypatch):
    """What a run built and did: its Models, the vectors at the start, the frozen matrices after every optimizer
    step that was taken (the GradScaler skips those whose fp16 gradients overflowed)."""
    seen = {"frozen": []}
    load, make = tti.load_frozen_models, tti.make_optimizer_and_schedule

    def load_spy(*args, **kwargs):
        seen["models"] = load(*args, **kwargs)
        return seen["models"]

    def make_spy(args, embeddings, *rest):
        optimizer, scheduler = make(args, embeddings, *rest)
        seen["initial"] = [e.vectors.detach().cpu().clone() for e in embeddings]
        step = optimizer.step

        def step_and_record(*a, **k):
            out = step(*a, **k)
            seen["frozen"].append([e.frozen.weight.detach().cpu().clone() for e in embeddings])
            return out

        optimizer.step = step_and_record
        return optimizer, scheduler

    monkeypatch.setattr(tti, "load_frozen_models", load_spy)
    monkeypatch.setattr(tti, "make_optimizer_and_schedule", make_spy)
    return seen


@pytest.fixture
def deterministic():
    """Two runs compared bit for bit need CUDA's deterministic kernels: atomic adds sum in a varying order."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = cudnn


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_mixed_precision_trains_the_vectors_and_leaves_every_other_row_bit_identical(request, family, precision,
                                                                                    concept_dir, tmp_path, spy):
    pipeline = request.getfixturevalue(PIPELINES[family])
    result = run(pipeline, concept_dir, tmp_path / "out", "--mixed_precision", precision, "--num_vectors", "2",
                 "--adam_weight_decay", "0.5")
    models, dtype = spy["models"], DTYPES[precision]
    assert models.unet.device.type == "cuda" and models.unet.dtype == dtype
    assert len(result.history) == 4 and all(math.isfinite(h["loss"]) for h in result.history)
    originals = [base_rows(pipeline, subfolder).to(dtype) for subfolder in ENCODERS[family]]
    assert spy["frozen"], "every step was skipped"
    for after_step in spy["frozen"]:  # weight decay reaches only the vectors, never the vocabulary
        assert all(torch.equal(frozen, original) for frozen, original in zip(after_step, originals, strict=True))
    for start, end in zip(spy["initial"], result.embeds.values(), strict=True):
        assert end.dtype == torch.float32 and torch.isfinite(end).all()
        assert not torch.allclose(end, start), "the vectors did not move"


def test_fp16_resume_restores_the_grad_scaler_and_continues_exactly(tiny_pipeline, concept_dir, tmp_path,
                                                                    monkeypatch, deterministic):
    scales = []  # after every optimizer step (taken or skipped), in the order the runs make them
    make_accelerator = tti.make_accelerator

    def growing_scaler(args):
        accelerator = make_accelerator(args)
        # Growth every step (the default waits 2,000) moves the scale before the first checkpoint, so a resume
        # that dropped the scaler's state would continue from a different scale than the uninterrupted run.
        accelerator.scaler = scaler = torch.amp.GradScaler("cuda", growth_interval=1)
        update = scaler.update
        scaler.update = lambda *a, **k: (update(*a, **k), scales.append(scaler.get_scale()))[0]
        return accelerator

    monkeypatch.setattr(tti, "make_accelerator", growing_scaler)
    args = ("--mixed_precision", "fp16", "--max_train_steps", "5", "--checkpointing_steps", "2")
    whole = run(tiny_pipeline, concept_dir, tmp_path / "whole", *args)
    whole_scales = scales[:]
    saved = torch.load(tmp_path / "whole" / "checkpoint-2" / "optimizer.pt", weights_only=False)["scaler"]
    assert saved["scale"] == whole_scales[1] != 2.0**16  # the scale after step 2, moved from the initial one
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    scales.clear()
    resumed = run(tiny_pipeline, concept_dir, tmp_path / "cut", *args, "--resume_from_checkpoint", "latest")
    assert resumed.first_step == 2
    assert scales == whole_scales[2:]
    assert resumed.history == whole.history[2:]
    assert torch.equal(resumed.vectors, whole.vectors)


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_keeps_the_vae_in_fp32_when_its_config_says_force_upcast(tiny_pipeline, concept_dir, tmp_path, spy,
                                                                        force_upcast):
    pipeline = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, pipeline)
    config = json.loads((pipeline / "vae" / "config.json").read_text())
    (pipeline / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": force_upcast}))
    result = run(pipeline, concept_dir, tmp_path / "out", "--mixed_precision", "fp16", "--max_train_steps", "2")
    models = spy["models"]
    assert models.vae.dtype == (torch.float32 if force_upcast else torch.float16)
    assert models.unet.dtype == torch.float16 and models.vae.device.type == "cuda"
    assert models.latents.mean.dtype == torch.float32 and torch.isfinite(models.latents.mean).all()
    assert torch.isfinite(models.latents.std).all()
    assert all(math.isfinite(h["loss"]) for h in result.history)


@pytest.mark.parametrize("family,precision", [("sd", "fp16"), ("sdxl", "fp16"), ("sd", "bf16")])
def test_validation_images_render_under_autocast(request, family, precision, concept_dir, tmp_path, spy,
                                                 monkeypatch):
    """The vectors are fp32 and the text encoder fp16/bf16: the pipeline only runs under autocast."""
    from PIL import Image

    calls = []  # (autocast on, its dtype) at each UNet call while drawing the validation images
    draw = tti.draw_validation_images

    def draw_and_watch(pipeline, *rest):
        hook = pipeline.unet.register_forward_pre_hook(
            lambda module, inputs: calls.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))))
        try:
            return draw(pipeline, *rest)
        finally:
            hook.remove()

    monkeypatch.setattr(tti, "draw_validation_images", draw_and_watch)
    pipeline = request.getfixturevalue(PIPELINES[family])
    result = run(pipeline, concept_dir, tmp_path / "out", "--mixed_precision", precision, "--max_train_steps", "2",
                 "--validation_prompt", "a photo of <cat-toy>", "--validation_steps", "2",
                 "--num_validation_images", "2")
    assert calls, "validation did not run the UNet"
    assert set(calls) == {(True, DTYPES[precision])}
    grid = np.asarray(Image.open(result.output_path.parent / "validation" / "step-2.png").convert("RGB"))
    assert grid.shape == (64, 64, 3)  # a row per prompt (reconstruction, then this one), two 32 px images each
    for image in (grid[y:y + 32, x:x + 32] for y in (0, 32) for x in (0, 32)):  # NaN latents decode to a flat colour
        assert image.std() > 0


@pytest.fixture
def inductor_config():
    """Inductor's config, put back afterwards: freeze_and_place sets it process-wide. (Not with monkeypatch: after
    its undo, torch's config module no longer knows the key.)"""
    import torch._inductor.config as inductor

    with inductor.patch(layout_optimization=inductor.layout_optimization):
        yield inductor


def test_compiled_unet_gradient_to_the_text_matches_eager(tiny_pipeline, monkeypatch, inductor_config):
    """Inductor's channels-last layout pass got this gradient wrong through the UNet's upsampling on a CPU (torch
    2.13); the trainer turns the pass off when it compiles. Compiled and eager, in fp32, from the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    # TF32 convolutions (on by default; TF32 matmuls are off) differ from each other at 1e-3.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    device = torch.device("cuda")
    eager = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet").to(device).requires_grad_(False)
    compiled = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    args = argparse.Namespace(gradient_checkpointing=False, enable_xformers_memory_efficient_attention=False,
                              compile_unet=True, allow_tf32=False)
    vae = AutoencoderKL.from_pretrained(tiny_pipeline, subfolder="vae")
    tti.freeze_and_place(argparse.Namespace(device=device), args, [], vae, compiled, torch.float32)
    assert compiled._compiled_call_impl is not None and inductor_config.layout_optimization is False

    generator = torch.Generator(device).manual_seed(0)
    sample = torch.randn(2, 4, 4, 4, generator=generator, device=device)
    timesteps = torch.tensor([10, 900], device=device)
    text = torch.randn(2, 77, 32, generator=generator, device=device)
    target = torch.randn(2, 4, 4, 4, generator=generator, device=device)

    def text_gradient(unet) -> torch.Tensor:
        conditioning = text.clone().requires_grad_(True)
        # The training loss: its backward reads the UNet's output. (A loss whose gradient does not, like a weighted
        # sum, came out right on a CPU even with the layout pass on.)
        torch.nn.functional.mse_loss(unet(sample, timesteps, conditioning).sample, target).backward()
        return conditioning.grad

    expected = text_gradient(eager)
    for _ in range(2):  # the first call compiles; the second runs what was compiled
        got = text_gradient(compiled)
        assert (got - expected).norm() / expected.norm() < 1e-3  # with the layout pass on, 0.69 on a CPU


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_train_in_bf16_and_leave_every_other_row_bit_identical(request, family, concept_dir, tmp_path,
                                                                           monkeypatch):
    """T5 and the transformer in bf16 on the GPU, the vectors in fp32; every encoder's table unchanged per step."""
    pipeline = request.getfixturevalue({"sd3": "tiny_sd3_pipeline", "flux": "tiny_flux_pipeline"}[family])
    seen = {"same": []}
    make, train = tti.make_optimizer_and_schedule, tti.train

    def watch(args, embeddings, *rest):
        optimizer, scheduler = make(args, embeddings, *rest)
        before = [e.frozen.weight.detach().clone() for e in embeddings]
        step = optimizer.step

        def step_and_check(*a, **k):
            out = step(*a, **k)
            seen["same"].append(all(torch.equal(e.frozen.weight, b) for e, b in zip(embeddings, before)))
            return out

        optimizer.step = step_and_check
        return optimizer, scheduler

    monkeypatch.setattr(tti, "make_optimizer_and_schedule", watch)
    monkeypatch.setattr(tti, "train", lambda run, *rest: seen.update(models=run.models) or train(run, *rest))
    result = run(pipeline, concept_dir, tmp_path / "out", "--mixed_precision", "bf16", "--gradient_checkpointing",
                 "--max_train_steps", "3", "--validation_prompt", "a photo of <cat-toy>", "--validation_steps", "3",
                 "--num_validation_images", "1", "--validation_inference_steps", "2")
    models = seen["models"]
    assert models.denoiser.device.type == "cuda" and models.denoiser.dtype == torch.bfloat16
    assert all(e.frozen.weight.dtype == torch.bfloat16 and e.vectors.dtype == torch.float32 for e in models.embeddings)
    assert seen["same"] == [True] * 3 and all(math.isfinite(h["loss"]) for h in result.history)
    assert (tmp_path / "out" / "validation" / "step-3.png").is_file()
