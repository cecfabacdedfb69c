"""SD 1.x, SD 2.x (v-prediction) and SDXL in the same script, picked from the pipeline folder; SDXL's outputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_textual_inversion as tti
from conftest import train_argv

VOCAB = 49408
TOY = 5988  # "toy</w>" in the CLIP vocabulary (checked in test_embedded_tokenizer_is_the_real_clip_vocabulary)


def run(pipeline, concept_dir, out, *extra) -> tti.TrainResult:
    return tti.main(tti.parse_args(train_argv(pipeline, concept_dir, out, *extra)))


def base_rows(pipeline, subfolder: str) -> torch.Tensor:
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(pipeline, subfolder=subfolder).get_input_embeddings().weight.detach()


def family_of(pipeline) -> str:
    return tti.model_family(tti.find_model_source(str(pipeline))).name


def test_family_comes_from_model_index(tiny_pipeline, tiny_sd2_pipeline, tiny_sdxl_pipeline, tmp_path):
    assert [family_of(p) for p in (tiny_pipeline, tiny_sd2_pipeline, tiny_sdxl_pipeline)] == ["sd", "sd", "sdxl"]
    other = tmp_path / "pixart"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(tti.UsageError, match="--pretrained_model_name_or_path .* PixArtAlphaPipeline"):
        family_of(other)


def test_v_prediction_target_is_the_velocity():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([0, 499, 999])
    target = tti.diffusion_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)  # v, by hand
    scheduler.register_to_config(prediction_type="epsilon")
    assert torch.equal(tti.diffusion_target(scheduler, latents, noise, timesteps), noise)


def test_sd2_v_prediction_trains_its_rows_only_and_renders(tiny_sd2_pipeline, concept_dir, tmp_path, watch_steps,
                                                           monkeypatch):
    from diffusers import StableDiffusionPipeline

    targets = []
    target = tti.diffusion_target
    monkeypatch.setattr(tti, "diffusion_target",
                        lambda s, *a: targets.append(s.config.prediction_type) or target(s, *a))
    result = run(tiny_sd2_pipeline, concept_dir, tmp_path / "out", "--max_train_steps", "3")
    assert set(targets) == {"v_prediction"} and all(math.isfinite(h["loss"]) for h in result.history)
    original = base_rows(tiny_sd2_pipeline, "text_encoder")
    assert all(torch.equal(frozen, original) for (frozen,) in watch_steps["frozen"]) and len(watch_steps["frozen"]) == 3
    torch.testing.assert_close(watch_steps["initial"][0], original[[TOY]])
    assert not torch.allclose(result.vectors, original[[TOY]])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2_pipeline, safety_checker=None)
    pipe.load_textual_inversion(tmp_path / "out")
    image = pipe("a photo of <cat-toy>", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and (image >= 0).all() and (image <= 1).all()


def test_sdxl_trains_both_encoders_rows_only_and_saves_clip_l_clip_g(tiny_sdxl_pipeline, concept_dir, tmp_path,
                                                                    watch_steps):
    result = run(tiny_sdxl_pipeline, concept_dir, tmp_path / "out", "--num_vectors", "2", "--max_train_steps", "3",
                 "--adam_weight_decay", "0.5", "--save_steps", "2", "--checkpointing_steps", "2")
    originals = [base_rows(tiny_sdxl_pipeline, sub) for sub in ("text_encoder", "text_encoder_2")]
    assert len(watch_steps["frozen"]) == 3
    for frozen_after_step in watch_steps["frozen"]:
        assert all(torch.equal(f, o) for f, o in zip(frozen_after_step, originals, strict=True))
    for start, original in zip(watch_steps["initial"], originals, strict=True):  # each in its own embedding space
        torch.testing.assert_close(start, original[[TOY, TOY]])
    out = tmp_path / "out"
    saved = load_file(out / "learned_embeds.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    for key, start in zip(("clip_l", "clip_g"), watch_steps["initial"]):
        assert saved[key].dtype == torch.float32 and not torch.allclose(saved[key], start)
        assert torch.equal(saved[key], result.embeds[key])
    for file in (out / "learned_embeds.safetensors", out / "learned_embeds-steps-2.safetensors",
                 out / "checkpoint-2" / "learned_embeds.safetensors"):
        with safe_open(str(file), "pt") as f:
            meta, keys = f.metadata(), set(f.keys())
        assert keys == {"clip_l", "clip_g"}
        assert {k: meta[k] for k in ("placeholder_token", "num_vectors", "initializer_token", "learnable_property",
                                     "base_model", "script_version")} == {
            "placeholder_token": "<cat-toy>", "num_vectors": "2", "initializer_token": "toy",
            "learnable_property": "object", "base_model": str(tiny_sdxl_pipeline), "script_version": tti.__version__}
        assert meta["step"] == ("3" if file.name == "learned_embeds.safetensors" and file.parent == out else "2")


def test_sdxl_added_conditions_for_a_short_last_batch(tiny_sdxl_pipeline, concept_dir, tmp_path, monkeypatch):
    seen = []
    load = tti.load_frozen_models

    def spy(*args, **kwargs):
        models = load(*args, **kwargs)
        forward = models.unet.forward

        def record(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kw):
            if torch.is_grad_enabled():  # training, not the validation loss
                seen.append((encoder_hidden_states.shape, {k: v.shape for k, v in added_cond_kwargs.items()},
                             added_cond_kwargs["time_ids"].clone()))
            return forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kw)

        models.unet.forward = record
        return models

    monkeypatch.setattr(tti, "load_frozen_models", spy)
    # 4 images, 1 repeat, batch 3: micro-batches of 3 and then 1.
    run(tiny_sdxl_pipeline, concept_dir, tmp_path / "out", "--repeats", "1", "--train_batch_size", "3",
        "--max_train_steps", "2")
    assert [(h, a) for h, a, _ in seen] == [
        ((3, 77, 80), {"text_embeds": (3, 48), "time_ids": (3, 6)}),
        ((1, 77, 80), {"text_embeds": (1, 48), "time_ids": (1, 6)}),
    ]
    for _, _, time_ids in seen:  # the 128 x 128 example images, trained at 32 px, not cropped
        assert time_ids.tolist() == [[128, 128, 0, 0, 32, 32]] * len(time_ids)


def test_sdxl_time_ids_record_original_size_and_center_crop():
    sizes = [(400, 600), (600, 400), (300, 300)]  # (height, width)

    def time_ids(center_crop, buckets=None):
        frames = [tti.framing(w, h, 512, center_crop, buckets) for h, w in sizes]
        pixels = [torch.zeros(3, *f.size, dtype=torch.uint8) for f in frames]
        return tti.sdxl_time_ids(tti.TrainingImages(pixels, None, sizes, [f.crop_top_left for f in frames])).tolist()

    assert time_ids(False) == [[400, 600, 0, 0, 512, 512], [600, 400, 0, 0, 512, 512], [300, 300, 0, 0, 512, 512]]
    # Centre-cropped: the offset in the resized image, as SDXL's training described its crops.
    assert time_ids(True) == [[400, 600, 0, 128, 512, 512], [600, 400, 128, 0, 512, 512], [300, 300, 0, 0, 512, 512]]
    # Buckets: the target is each image's bucket (3:2 -> 384 x 640, the nearest ratio at 512^2, so 20 of 400 rows
    # are cut at the top, 21 at the bucket's scale); a square stays whole.
    buckets = tti.bucket_sizes(512, 256, 1024, 64)
    assert time_ids(False, buckets) == [[400, 600, 21, 0, 384, 640], [600, 400, 0, 21, 640, 384],
                                        [300, 300, 0, 0, 512, 512]]


def test_sdxl_pools_at_end_of_text_not_at_the_placeholder(tiny_sdxl_pipeline):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl_pipeline, subfolder="tokenizer_2")
    encoder = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_pipeline, subfolder="text_encoder_2").eval()
    ids = tti.add_placeholder_tokens(tokenizer, "<cat-toy>", 1)
    tti.install_placeholder_embedding(encoder, ids, torch.randn(1, 48))
    input_ids = tokenizer("a photo of <cat-toy>", padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos, placeholder = (input_ids[0] == tokenizer.eos_token_id).nonzero()[0, 0], (input_ids[0] == ids[0]).nonzero()[0, 0]
    with torch.no_grad():
        legacy = encoder(input_ids, output_hidden_states=True)
        tti.pool_at_end_of_text(encoder, tokenizer)
        fixed = encoder(input_ids, output_hidden_states=True)
        at = lambda position: encoder.text_projection(fixed.last_hidden_state[0, position])  # noqa: E731
    torch.testing.assert_close(legacy.text_embeds[0], at(placeholder))  # what the legacy config does
    torch.testing.assert_close(fixed.text_embeds[0], at(eos))
    assert not torch.allclose(fixed.text_embeds, legacy.text_embeds)


def test_sdxl_resume_is_bit_identical(tiny_sdxl_pipeline, concept_dir, tmp_path):
    args = ("--max_train_steps", "5", "--checkpointing_steps", "2", "--num_vectors", "2")
    whole = run(tiny_sdxl_pipeline, concept_dir, tmp_path / "whole", *args)
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = run(tiny_sdxl_pipeline, concept_dir, tmp_path / "cut", *args, "--resume_from_checkpoint", "latest")
    assert resumed.first_step == 2 and resumed.history == whole.history[2:]
    assert all(torch.equal(resumed.embeds[k], whole.embeds[k]) for k in ("clip_l", "clip_g"))


def test_readme_sdxl_loading_in_diffusers(tiny_sdxl_pipeline, concept_dir, tmp_path):
    """The README's two load_textual_inversion calls, verbatim, on this script's SDXL output."""
    from diffusers import StableDiffusionXLPipeline

    run(tiny_sdxl_pipeline, concept_dir, tmp_path / "out", "--num_vectors", "2", "--max_train_steps", "1")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    state = load_file(tmp_path / "out" / "learned_embeds.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="<cat-toy>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<cat-toy>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                    (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):
        ids = tokenizer(pipe.maybe_convert_prompt("a photo of <cat-toy>", tokenizer)).input_ids
        assert ids[4:6] == [VOCAB, VOCAB + 1]
        assert torch.equal(encoder.get_input_embeddings().weight[VOCAB:].detach(), state[key])
    image = pipe("a photo of <cat-toy>", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and (image >= 0).all() and (image <= 1).all()
