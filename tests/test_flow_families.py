"""SD 3/3.5 and Flux.1: which rows learn, the flow-matching loss against diffusers' formulas, Flux's packing, the
prompt encoding against the pipelines' own encode_prompt, exact resume, the saved keys, and the bad inputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import train_argv
from safetensors import safe_open
from safetensors.torch import load_file

import train_textual_inversion as tti

ENCODERS = {"sd3": ("clip_l", "clip_g", "t5"), "flux": ("clip_l", "t5")}
SUBFOLDERS = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"), "flux": ("text_encoder", "text_encoder_2")}
TOKENIZERS = {"sd3": ("tokenizer", "tokenizer_2", "tokenizer_3"), "flux": ("tokenizer", "tokenizer_2")}


@pytest.fixture
def pipeline_of(tiny_sd3_pipeline, tiny_flux_pipeline):
    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def run(pipeline, concept_dir, out, *extra) -> tti.TrainResult:
    return tti.main(tti.parse_args(train_argv(pipeline, concept_dir, out, *extra)))


def base_rows(pipeline, subfolder: str) -> torch.Tensor:
    from transformers import AutoModel

    return AutoModel.from_pretrained(pipeline, subfolder=subfolder).get_input_embeddings().weight.detach()


def toy_id(pipeline, subfolder: str) -> int:
    from transformers import AutoTokenizer

    (token_id,) = AutoTokenizer.from_pretrained(pipeline, subfolder=subfolder).encode("toy", add_special_tokens=False)
    return token_id


# ---- training moves exactly the right rows ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_encoder_learns_its_own_rows_only(family, pipeline_of, concept_dir, tmp_path, watch_steps, monkeypatch):
    pipeline, out = pipeline_of[family], tmp_path / "out"
    drawn = []
    draw = tti.draw_validation_images
    monkeypatch.setattr(tti, "draw_validation_images", lambda pipe, prompts, *a: drawn.append(list(prompts))
                        or draw(pipe, prompts, *a))
    result = run(pipeline, concept_dir, out, "--num_vectors", "2", "--max_train_steps", "3", "--validation_steps", "3",
                 "--validation_prompt", "a <cat-toy> on the beach", "--num_validation_images", "1",
                 "--validation_inference_steps", "2", "--checkpointing_steps", "3")
    originals = [base_rows(pipeline, sub) for sub in SUBFOLDERS[family]]
    assert len(watch_steps["frozen"]) == 3  # every encoder's whole table, bit for bit, after every step
    for frozen_after_step in watch_steps["frozen"]:
        assert all(torch.equal(f, o) for f, o in zip(frozen_after_step, originals, strict=True))
    # Each encoder's vectors start from "toy" in its own space, and move.
    saved = load_file(out / "learned_embeds.safetensors")
    for key, sub, tokenizer, start, original in zip(ENCODERS[family], SUBFOLDERS[family], TOKENIZERS[family],
                                                    watch_steps["initial"], originals, strict=True):
        toy = toy_id(pipeline, tokenizer)
        torch.testing.assert_close(start, original[[toy, toy]])
        assert saved[key].shape == (2, original.shape[1]) and not torch.allclose(saved[key], start)
        assert torch.equal(saved[key], result.embeds[key])
    # One key per encoder, and T5's also under ComfyUI's name; the same in the apps' file.
    assert set(saved) == {*ENCODERS[family], "t5xxl"} and torch.equal(saved["t5xxl"], saved["t5"])
    word = load_file(out / "cat-toy.safetensors")
    assert set(word) == set(saved) and all(torch.equal(word[k], saved[k]) for k in saved)
    with safe_open(str(out / "checkpoint-3" / "learned_embeds.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ENCODERS[family])  # checkpoints hold the vectors once
    # The SD3 pipeline does not write out a multi-vector token, so validation does; Flux's pipeline does it itself.
    expected = "a <cat-toy> <cat-toy>_1 on the beach" if family == "sd3" else "a <cat-toy> on the beach"
    assert drawn and all(prompts[1] == expected for prompts in drawn)


def test_text_encoders_picks_the_encoders_that_learn(tiny_flux_pipeline, concept_dir, tmp_path, watch_steps):
    out = tmp_path / "out"
    run(tiny_flux_pipeline, concept_dir, out, "--text_encoders", "t5", "--max_train_steps", "2",
        "--checkpointing_steps", "2")
    assert len(watch_steps["initial"]) == 1 and watch_steps["initial"][0].shape[1] == base_rows(tiny_flux_pipeline,
                                                                                    "text_encoder_2").shape[1]
    saved = load_file(out / "learned_embeds.safetensors")
    clip = base_rows(tiny_flux_pipeline, "text_encoder")
    assert torch.equal(saved["clip_l"], clip[[toy_id(tiny_flux_pipeline, "tokenizer")]])  # kept the initializer's
    assert not torch.allclose(saved["t5"], watch_steps["initial"][0])
    with safe_open(str(out / "learned_embeds.safetensors"), "pt") as f:
        assert f.metadata()["trained_text_encoders"] == "t5"
    # A resume must not mix this run with one training other encoders.
    argv = train_argv(tiny_flux_pipeline, concept_dir, out, "--max_train_steps", "3", "--resume_from_checkpoint",
                      "latest")
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["text_encoders"] == "t5"
    with pytest.raises(tti.UsageError, match="text_encoders"):
        tti.main(tti.parse_args(argv))


def test_t5_learns_at_a_rate_scaled_to_its_embeddings(tiny_flux_pipeline, concept_dir, tmp_path, watch_steps):
    """T5's token embeddings are ~50x CLIP's here (std 1 vs 0.02); at CLIP's rate its vectors would barely turn."""
    scaled = run(tiny_flux_pipeline, concept_dir, tmp_path / "a", "--max_train_steps", "3", "--learning_rate", "1e-3")
    clip_rate, t5_rate = watch_steps["rates"]
    embeddings = watch_steps["run"].models.embeddings
    ratio = tti.embedding_scale(embeddings[1]) / tti.embedding_scale(embeddings[0])
    assert clip_rate == 1e-3 and t5_rate == pytest.approx(1e-3 * ratio) and ratio > 10
    same = run(tiny_flux_pipeline, concept_dir, tmp_path / "b", "--max_train_steps", "3", "--learning_rate", "1e-3",
               "--t5_learning_rate", "1e-3")
    assert watch_steps["rates"] == [1e-3]  # one group when the rates agree
    turned = 1 - scaled.history[-1]["cosine_to_init/t5/0"]
    barely = 1 - same.history[-1]["cosine_to_init/t5/0"]
    assert turned > 20 * barely, (turned, barely)


# ---- the prompt encoding is the pipeline's ---------------------------------------------------------------------------
def pipeline_encoding(family: str, pipeline, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    if family == "sd3":
        embeds, _, pooled, _ = pipeline.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                      max_sequence_length=77)
    else:
        embeds, pooled, _ = pipeline.encode_prompt(prompt, prompt, max_sequence_length=512)
    return embeds, pooled


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_encodes_prompts_as_the_pipeline_and_the_result_loads_and_renders(family, pipeline_of, concept_dir,
                                                                                   tmp_path, watch_steps):
    import diffusers
    from generate import load_learned_embeds, write_out_tokens

    pipeline, out = pipeline_of[family], tmp_path / "out"
    run(pipeline, concept_dir, out, "--num_vectors", "2", "--max_train_steps", "2")
    models = watch_steps["run"].models
    prompt = "a photo of a <cat-toy> on the beach"
    ids = tti.stack_windows([tti.tokenize_prompts(t, [prompt], "<cat-toy>", 2) for t in models.tokenizers])
    with torch.no_grad():
        trained = models.prompt_encoder(ids)
    # The same vectors loaded into a fresh pipeline the way users load them.
    fresh = getattr(diffusers, tti.FAMILY_NAMES[family].pipeline).from_pretrained(pipeline)
    fresh.set_progress_bar_config(disable=True)
    assert load_learned_embeds(fresh, out / "learned_embeds.safetensors") == ["<cat-toy>"]
    with torch.no_grad():
        loaded = pipeline_encoding(family, fresh, write_out_tokens(fresh, prompt))
        plain = pipeline_encoding(family, fresh, "a photo of a toy on the beach")
    for ours, theirs in zip(trained, loaded, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained[0], plain[0])
    image = fresh(write_out_tokens(fresh, prompt), num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and ((image >= 0) & (image <= 1)).all()


# ---- flow matching as diffusers computes it --------------------------------------------------------------------------
def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


@pytest.mark.parametrize("scheme", tti.FLOW_WEIGHTING_SCHEMES)
def test_flow_matching_draws_noises_targets_and_weights_as_diffusers_sd3_script(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheduler = sd3_scheduler()
    process = tti.FlowMatching(scheduler, scheme, 0.0, 1.0, 1.29, 2)
    latents, noise = torch.randn(6, 16, 8, 8), torch.randn(6, 16, 8, 8)
    timesteps = process.draw_timesteps(latents, torch.Generator().manual_seed(3))
    # diffusers' train_dreambooth_sd3.py, step by step
    u = compute_density_for_timestep_sampling(scheme, 6, 0.0, 1.0, 1.29, "cpu", torch.Generator().manual_seed(3))
    indices = (u * scheduler.config.num_train_timesteps).long()
    torch.testing.assert_close(timesteps, scheduler.timesteps[indices])
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    torch.testing.assert_close(process.noisy(latents, noise, timesteps), (1.0 - sigmas) * latents + sigmas * noise)
    assert torch.equal(process.target(latents, noise, timesteps), noise - latents)
    expected = compute_loss_weighting_for_sd3(scheme, sigmas).flatten()
    weights = process.weights(timesteps)
    if weights is None:
        assert torch.equal(expected, torch.ones(6))
    else:
        torch.testing.assert_close(weights, expected)


def test_flux_timesteps_take_the_schedulers_resolution_dependent_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    process = tti.FlowMatching(scheduler, "none", latent_patch=2)
    u = torch.tensor([0.05, 0.3, 0.5, 0.9])
    for height, width in [(8, 8), (64, 64), (128, 96)]:  # 16, 1024 and 3072 image tokens
        mu = calculate_shift(height * width // 4, 256, 4096, 0.5, 1.15)
        unshifted = scheduler.sigmas[(u * 1000).long()]
        expected = math.exp(mu) / (math.exp(mu) + (1 / unshifted - 1))
        torch.testing.assert_close(process.sigmas_at(u, (height, width)), expected)
    # Larger images get noisier timesteps, as Flux's sampler gives them at inference.
    assert (process.sigmas_at(u, (128, 128)) > process.sigmas_at(u, (32, 32))).all()


def test_flux_packing_round_trips_and_matches_diffusers():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 12)
    packed = tti.pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(tti.unpack_latents(packed, 8, 12), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 96, vae_scale_factor=8), latents)
    assert torch.equal(tti.latent_image_ids(8, 12, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


# ---- exact resume ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_resume_is_bit_exact(family, pipeline_of, concept_dir, tmp_path):
    pipeline, whole, resumed = pipeline_of[family], tmp_path / "whole", tmp_path / "resumed"
    straight = run(pipeline, concept_dir, whole, "--max_train_steps", "4", "--checkpointing_steps", "2")
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    again = run(pipeline, concept_dir, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2",
                "--resume_from_checkpoint", "latest")
    assert again.first_step == 2 and set(again.embeds) == set(ENCODERS[family])
    assert all(torch.equal(again.embeds[k], straight.embeds[k]) for k in straight.embeds)


# ---- bad input: one line, exit 2 -------------------------------------------------------------------------------------
def refused(capsys, argv) -> str:
    assert tti.cli(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def test_a_family_the_script_does_not_train(capsys, tmp_path, concept_dir):
    other = tmp_path / "pixart"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    line = refused(capsys, train_argv(other, concept_dir, tmp_path / "out"))
    assert "--pretrained_model_name_or_path" in line and "PixArtAlphaPipeline" in line and "FluxPipeline" in line


def test_an_encoder_the_family_lacks(capsys, tiny_flux_pipeline, tiny_pipeline, concept_dir, tmp_path):
    line = refused(capsys, train_argv(tiny_flux_pipeline, concept_dir, tmp_path / "out", "--text_encoders",
                                      "clip_l,clip_g"))
    assert "--text_encoders clip_g" in line and "clip_l, t5" in line
    line = refused(capsys, train_argv(tiny_pipeline, concept_dir, tmp_path / "out", "--text_encoders", "t5"))
    assert "--text_encoders t5" in line


def test_a_placeholder_the_t5_tokenizer_already_knows(capsys, tiny_sd3_pipeline, concept_dir, tmp_path):
    # <extra_id_0> is several pieces to CLIP but one of T5's sentinel tokens
    line = refused(capsys, train_argv(tiny_sd3_pipeline, concept_dir, tmp_path / "out", "--placeholder_token",
                                      "<extra_id_0>"))
    assert "--placeholder_token '<extra_id_0>'" in line and "tokenizer_3" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, family, named", [
    (["--snr_gamma", "5"], "flux", "--snr_gamma"),
    (["--weighting_scheme", "logit_normal"], "sd", "--weighting_scheme"),
    (["--t5_learning_rate", "1e-3"], "sd", "--t5_learning_rate"),
    (["--resolution", "40"], "sd3", "--resolution 40"),
])
def test_flags_of_another_family(capsys, flags, family, named, tiny_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline,
                                 concept_dir, tmp_path):
    pipeline = {"sd": tiny_pipeline, "flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}[family]
    assert named in refused(capsys, train_argv(pipeline, concept_dir, tmp_path / "out", *flags))


# ---- bf16 and gradient checkpointing ---------------------------------------------------------------------------------
def count_checkpointed_calls(model: torch.nn.Module, calls: dict, key: str) -> None:
    """Count, under `key`, the calls through every checkpointing function of `model`'s modules (transformers' layers
    and diffusers' models both keep it as `_gradient_checkpointing_func`): a flag set but never used counts none."""
    for module in model.modules():
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None:
            def counted(*args, _checkpoint=checkpoint, **kwargs):
                calls[key] += 1
                return _checkpoint(*args, **kwargs)

            module._gradient_checkpointing_func = counted


def test_flux_trains_in_bf16_with_gradient_checkpointing(tiny_flux_pipeline, concept_dir, tmp_path, monkeypatch):
    seen, calls, train = {}, {"t5": 0, "transformer": 0}, tti.train

    def inspect_and_train(run, *rest):
        models = run.models
        (clip, t5), transformer = models.prompt_encoder.text_encoders, models.denoiser
        seen["initial"] = [e.vectors.detach().clone() for e in models.embeddings]
        seen["vectors"] = [e.vectors.dtype for e in models.embeddings]
        learned = {id(e.vectors) for e in models.embeddings}
        seen["frozen"] = {p.dtype for model in (clip, t5, transformer) for p in model.parameters()
                          if id(p) not in learned}
        seen["t5_frozen_rows"] = models.embeddings[1].frozen.weight.dtype
        # transformers 5 keeps the flag on the T5 stack and each block (GradientCheckpointingLayer).
        seen["t5_checkpointing"] = (t5.encoder.gradient_checkpointing,
                                    all(block.gradient_checkpointing for block in t5.encoder.block))
        seen["transformer_checkpointing"] = transformer.gradient_checkpointing
        seen["t5_blocks"] = len(t5.encoder.block)
        seen["transformer_blocks"] = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        # Dropout off, yet train mode (the only mode in which transformers checkpoints): T5's own is 0.1.
        seen["t5_training"] = t5.training and t5.encoder.block[0].training
        seen["dropouts"] = [m.p for m in t5.modules() if isinstance(m, torch.nn.Dropout)]
        seen["attention_dropouts"] = [m.dropout for m in t5.modules() if isinstance(getattr(m, "dropout", None), float)]
        ids = torch.tensor([[3, 4, 5, 6, 1]])
        with torch.no_grad():  # what dropout would make differ
            seen["repeatable"] = torch.equal(t5(ids).last_hidden_state, t5(ids).last_hidden_state)
        count_checkpointed_calls(t5, calls, "t5")
        count_checkpointed_calls(transformer, calls, "transformer")
        return train(run, *rest)

    monkeypatch.setattr(tti, "train", inspect_and_train)
    result = run(tiny_flux_pipeline, concept_dir, tmp_path / "out", "--max_train_steps", "2", "--mixed_precision",
                 "bf16", "--gradient_checkpointing")
    assert seen["frozen"] == {torch.bfloat16} and seen["t5_frozen_rows"] == torch.bfloat16
    assert seen["vectors"] == [torch.float32, torch.float32]
    assert seen["t5_checkpointing"] == (True, True) and seen["transformer_checkpointing"] is True
    assert seen["t5_training"] and seen["repeatable"]
    assert seen["dropouts"] and set(seen["dropouts"]) == {0.0}
    assert seen["attention_dropouts"] and set(seen["attention_dropouts"]) == {0.0}
    # Checkpointing engaged in every block of both models at both steps (one micro-batch each; the backward's
    # recomputation runs inside torch's checkpoint, not through the counted function).
    assert calls == {"t5": 2 * seen["t5_blocks"], "transformer": 2 * seen["transformer_blocks"]}, calls
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    assert result.embeds["t5"].dtype == torch.float32 and torch.isfinite(result.embeds["t5"]).all()
    assert not torch.allclose(result.embeds["t5"], seen["initial"][1])


def test_gradient_checkpointing_does_not_change_what_flux_learns(tiny_flux_pipeline, concept_dir, tmp_path):
    plain = run(tiny_flux_pipeline, concept_dir, tmp_path / "plain", "--max_train_steps", "2")
    checkpointed = run(tiny_flux_pipeline, concept_dir, tmp_path / "checkpointed", "--max_train_steps", "2",
                       "--gradient_checkpointing")
    assert set(plain.embeds) == set(checkpointed.embeds) == set(ENCODERS["flux"])
    # The recomputation repeats the same fp32 operations (no dropout to replay), so bit for bit, as the exact resume.
    assert all(torch.equal(checkpointed.embeds[key], plain.embeds[key]) for key in plain.embeds)
    start = base_rows(tiny_flux_pipeline, "text_encoder_2")[[toy_id(tiny_flux_pipeline, "tokenizer_2")]]
    assert not torch.allclose(plain.embeds["t5"], start)  # and they did learn something to compare


def test_the_resume_command_keeps_text_encoders(tiny_flux_pipeline, concept_dir, tmp_path):
    import shlex

    args = tti.parse_args(train_argv(tiny_flux_pipeline, concept_dir, tmp_path, "--text_encoders", "t5, clip_l",
                                     "--guidance_scale", "2.5"))
    again = tti.parse_args(shlex.split(tti.resume_command(args))[3:])
    assert again.text_encoders == ("t5", "clip_l") and again.guidance_scale == 2.5
    assert again.resume_from_checkpoint == "latest"


@pytest.fixture(scope="session")
def tiny_schnell_pipeline(tmp_path_factory):
    from make_tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-schnell") / "pipe", seed=0, guidance_embeds=False)


@pytest.mark.parametrize("distilled", [True, False], ids=["dev", "schnell"])
def test_flux_guidance_embedding_only_for_guidance_distilled_models(distilled, tiny_flux_pipeline,
                                                                    tiny_schnell_pipeline, concept_dir, tmp_path,
                                                                    monkeypatch):
    guidance = []
    train = tti.train

    def spy_on_transformer(run, *rest):
        forward = run.models.denoiser.forward
        run.models.denoiser.forward = lambda *a, **k: guidance.append(k["guidance"]) or forward(*a, **k)
        return train(run, *rest)

    monkeypatch.setattr(tti, "train", spy_on_transformer)
    pipeline = tiny_flux_pipeline if distilled else tiny_schnell_pipeline
    result = run(pipeline, concept_dir, tmp_path / "out", "--max_train_steps", "2", "--guidance_scale", "2.5")
    # 2 training steps, then the validation loss (one call per training image) at the last step
    assert len(guidance) == 2 + 4 and all(math.isfinite(h["loss"]) for h in result.history)
    if distilled:  # --guidance_scale for every sample of the batch
        assert all(torch.equal(g, torch.full((len(g),), 2.5)) for g in guidance)
    else:
        assert guidance == [None] * 6
