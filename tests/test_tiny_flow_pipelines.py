"""The tiny SD 3 and Flux.1 pipelines and the tiny T5 tokenizer from examples/make_tiny_pipeline.py: they load with
diffusers' own pipeline classes, render, and wire their text encoders to the transformer the way the real ones do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import make_tiny_pipeline as tiny

PROMPT = "a photo of a toy"
CLIP_EMBEDDING_BYTES = tiny.VOCAB_SIZE * 4  # per unit of width: the 49,408-row CLIP token table, float32


def load(pipeline_class, folder: Path):
    pipeline = pipeline_class.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def sd3(tiny_sd3_pipeline):
    from diffusers import StableDiffusion3Pipeline

    return load(StableDiffusion3Pipeline, tiny_sd3_pipeline)


@pytest.fixture(scope="session")
def flux(tiny_flux_pipeline):
    from diffusers import FluxPipeline

    return load(FluxPipeline, tiny_flux_pipeline)


@pytest.fixture
def t5_tokenizer(tiny_sd3_pipeline):
    """A fresh copy per test (add_tokens mutates it), loaded the way users load the real one."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(tiny_sd3_pipeline / "tokenizer_3")


# --- the tiny T5 tokenizer --------------------------------------------------------------------------------------------


def test_t5_tokenizer_has_t5s_special_tokens_and_appends_eos(tiny_sd3_pipeline, t5_tokenizer):
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = t5_tokenizer
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token is None and len(tok) == tiny.T5_VOCAB_SIZE + tiny.T5_EXTRA_IDS  # no BOS, as in T5
    assert tok.convert_ids_to_tokens([tiny.T5_VOCAB_SIZE]) == ["<extra_id_0>"]  # sentinels after the pieces
    ids = tok(PROMPT).input_ids
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1] and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁toy", "</s>"]
    assert tok([PROMPT], padding="max_length", max_length=10).input_ids[0] == ids + [0] * (10 - len(ids))
    auto = AutoTokenizer.from_pretrained(tiny_sd3_pipeline / "tokenizer_3")
    assert isinstance(auto, T5TokenizerFast)
    corpus = tiny.t5_corpus()[:200]
    assert auto(corpus).input_ids == tok(corpus).input_ids


@pytest.mark.parametrize("text", [
    "a photo of a toy",
    "A photo of a red toy cat on the beach, in watercolor style.",
    "Zebra #42 {x} jumps! 3.14 -- (50%) @home ~ [ok]",
])
def test_t5_tokenizer_round_trips_ordinary_text(t5_tokenizer, text):
    ids = t5_tokenizer(text).input_ids
    assert t5_tokenizer.unk_token_id not in ids  # every printable ASCII character is in the vocabulary
    assert t5_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_t5_tokenizer_takes_a_placeholder_token_as_one_new_id(t5_tokenizer):
    assert t5_tokenizer.add_tokens("<cat-toy>") == 1
    new_id = t5_tokenizer.convert_tokens_to_ids("<cat-toy>")
    assert new_id == tiny.T5_VOCAB_SIZE + tiny.T5_EXTRA_IDS == len(t5_tokenizer) - 1
    ids = t5_tokenizer("a photo of a <cat-toy>").input_ids
    assert ids == t5_tokenizer(PROMPT).input_ids[:4] + [new_id, t5_tokenizer.eos_token_id]


def test_t5_tokenizer_is_the_same_on_every_build(tiny_sd3_pipeline, tmp_path):
    # the Unigram trainer emits some pieces in hash-map order; build_t5_tokenizer must undo that
    tiny.build_t5_tokenizer(tmp_path)
    saved = json.loads((tiny_sd3_pipeline / "tokenizer_3" / "tokenizer.json").read_text(encoding="utf-8"))
    again = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert again["model"] == saved["model"]


# --- both pipelines ---------------------------------------------------------------------------------------------------


def render(pipeline, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipeline(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np", generator=generator,
                    **kwargs).images


def assert_real_image(images):
    assert images.shape == (1, 32, 32, 3)
    assert (images >= 0).all() and (images <= 1).all()
    assert images.std() > 1e-3  # not constant


def test_sd3_loads_with_its_pipeline_class_and_renders(sd3):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5EncoderModel, T5TokenizerFast

    assert type(sd3) is StableDiffusion3Pipeline and isinstance(sd3.transformer, SD3Transformer2DModel)
    assert isinstance(sd3.tokenizer_3, T5TokenizerFast) and isinstance(sd3.text_encoder_3, T5EncoderModel)
    images = render(sd3)
    assert_real_image(images)
    assert (render(sd3) == images).all()


def test_flux_loads_with_its_pipeline_class_and_renders(flux):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5EncoderModel, T5TokenizerFast

    assert type(flux) is FluxPipeline and isinstance(flux.transformer, FluxTransformer2DModel)
    assert isinstance(flux.tokenizer_2, T5TokenizerFast) and isinstance(flux.text_encoder_2, T5EncoderModel)
    assert flux.transformer.config.guidance_embeds
    images = render(flux, guidance_scale=3.5)
    assert_real_image(images)
    assert not (render(flux, guidance_scale=1.0) == images).all()  # the guidance embedding is wired in


def test_flux_without_guidance_embedding_renders(tmp_path):
    from diffusers import FluxPipeline

    pipeline = load(FluxPipeline, tiny.build_tiny_flux_pipeline(tmp_path / "pipe", guidance_embeds=False))
    assert not pipeline.transformer.config.guidance_embeds
    assert_real_image(render(pipeline))


def test_sd3_text_embeddings_fit_the_transformer(sd3):
    cfg = sd3.transformer.config
    clip_widths = [sd3.text_encoder.config.hidden_size, sd3.text_encoder_2.config.hidden_size]
    t5_width = sd3.text_encoder_3.config.d_model
    embeds, negative, pooled, negative_pooled = sd3.encode_prompt(PROMPT, None, None, max_sequence_length=64)
    # CLIP-L and CLIP-G states side by side, zero-padded to T5's width, then the T5 states after them
    assert embeds.shape == (1, 77 + 64, cfg.joint_attention_dim) == negative.shape
    assert cfg.joint_attention_dim == t5_width > sum(clip_widths)
    assert (embeds[:, :77, sum(clip_widths):] == 0).all() and (embeds[:, :77, :sum(clip_widths)] != 0).any()
    assert (embeds[:, 77:, sum(clip_widths):] != 0).any()
    # the two CLIPs' projected pooled outputs, concatenated
    projections = [sd3.text_encoder.config.projection_dim, sd3.text_encoder_2.config.projection_dim]
    assert pooled.shape == (1, cfg.pooled_projection_dim) == negative_pooled.shape
    assert cfg.pooled_projection_dim == sum(projections)
    # text tokens join image tokens in one attention; the VAE's latents are what the transformer patches
    assert cfg.caption_projection_dim == cfg.num_attention_heads * cfg.attention_head_dim
    assert cfg.in_channels == cfg.out_channels == sd3.vae.config.latent_channels == 16
    assert sd3.text_encoder_3.config.vocab_size == tiny.T5_EMBEDDING_ROWS > len(sd3.tokenizer_3)  # spare rows, as T5
    assert [sd3.text_encoder.config.eos_token_id, sd3.text_encoder_2.config.eos_token_id] == [
        sd3.tokenizer.eos_token_id, sd3.tokenizer_2.eos_token_id]
    assert (sd3.vae.config.shift_factor, sd3.vae.config.scaling_factor) == (0.0609, 1.5305)
    assert sd3.scheduler.config.shift == 3.0 and not sd3.scheduler.config.use_dynamic_shifting


def test_flux_text_embeddings_fit_the_transformer(flux):
    cfg = flux.transformer.config
    embeds, pooled, text_ids = flux.encode_prompt(PROMPT, None, max_sequence_length=64)
    # T5's states are the sequence; CLIP-L's pooled output is the only CLIP input
    assert embeds.shape == (1, 64, cfg.joint_attention_dim)
    assert cfg.joint_attention_dim == flux.text_encoder_2.config.d_model
    assert pooled.shape == (1, cfg.pooled_projection_dim)
    assert cfg.pooled_projection_dim == flux.text_encoder.config.hidden_size
    assert text_ids.shape == (64, 3)
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert cfg.in_channels == 4 * flux.vae.config.latent_channels == 64
    assert flux.text_encoder_2.config.vocab_size == tiny.T5_EMBEDDING_ROWS > len(flux.tokenizer_2)
    assert (flux.vae.config.shift_factor, flux.vae.config.scaling_factor) == (0.1159, 0.3611)
    schedule = flux.scheduler.config
    assert schedule.use_dynamic_shifting and (schedule.base_shift, schedule.max_shift) == (0.5, 1.15)
    assert (schedule.base_image_seq_len, schedule.max_image_seq_len) == (256, 4096)


def test_flux_packing_round_trips_latents():
    from diffusers import FluxPipeline

    batch, channels, height, width, vae_scale = 2, 16, 4, 6, 8
    latents = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)  # latent-space height/width
    assert packed.shape == (batch, (height // 2) * (width // 2), channels * 4)
    assert torch.equal(packed[1, 0], latents[1, :, :2, :2].reshape(-1))  # token = one 2x2 patch, channel-major
    unpacked = FluxPipeline._unpack_latents(packed, height * vae_scale, width * vae_scale, vae_scale)  # pixels
    assert torch.equal(unpacked, latents)


# --- what is saved ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_sd3_pipeline", "tiny_flux_pipeline"])
def test_weights_are_float32_and_small(request, name):
    folder = request.getfixturevalue(name)
    weights = sorted(folder.glob("*/*.safetensors"))
    assert {w.parent.name for w in weights} >= {"transformer", "vae", "text_encoder", "text_encoder_2"}
    for path in weights:
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}, path
    # Apart from the CLIP tokenizers and CLIP's 49,408-row token tables (as in the SD 1.x/XL fixtures), it is tiny.
    configs = [json.loads(c.read_text()) for c in folder.glob("text_encoder*/config.json")]
    clip_tables = sum(c["hidden_size"] * CLIP_EMBEDDING_BYTES for c in configs if c["model_type"] == "clip_text_model")
    clip_tokenizers = sum(f.stat().st_size for v in folder.glob("tokenizer*/vocab.json") for f in v.parent.iterdir())
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total - clip_tables - clip_tokenizers < 5_000_000


def test_cli_builds_a_flux_pipeline(tmp_path):
    out = tmp_path / "tiny-flux"
    assert tiny.main(["--family", "flux", "--output_dir", str(out)]) == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert tiny.main(["--family", "sd3", "--output_dir", str(out)]) == 0  # an existing folder is left alone
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
