"""examples/generate.py on the flow-matching families: SD3 (CLIP-L + CLIP-G + T5, no diffusers loader) and Flux.1
(CLIP-L + T5, diffusers' load_textual_inversion). Embedding files are written by hand in the layouts the trainer,
OneTrainer and ComfyUI use, and loaded into the tiny pipelines of examples/make_tiny_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import generate
import make_tiny_pipeline as tiny
from generate import load_learned_embeds, read_embeddings, write_out_tokens

TOKEN = "<tok>"
L, G, T5 = tiny.TEXT_HIDDEN, tiny.TEXT_HIDDEN_2, tiny.T5_HIDDEN  # the tiny encoders' widths: 32, 48, 128
PROMPT = f"a photo of {TOKEN}"
# read_embeddings' key -> (text encoder, tokenizer) attribute names
ENCODERS = {
    "sd3": {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
            "t5": ("text_encoder_3", "tokenizer_3")},
    "flux": {"clip_l": ("text_encoder", "tokenizer"), "t5": ("text_encoder_2", "tokenizer_2")},
}


@pytest.fixture
def load(request):
    """`load("sd3" | "flux")`: a fresh pipeline per call (loading tokens mutates it; the tiny ones load in ~0.3 s)."""

    def load_family(family: str):
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        pipeline_class = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
        pipeline = pipeline_class.from_pretrained(request.getfixturevalue(f"tiny_{family}_pipeline"))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    return load_family


def widths(pipeline, family: str) -> dict[str, int]:
    return {key: getattr(pipeline, encoder).get_input_embeddings().weight.shape[1]
            for key, (encoder, _) in ENCODERS[family].items()}


def write_embeds(path: Path, dims: dict[str, int], n: int, seed: int = 0, t5_keys: tuple[str, ...] = ("t5", "t5xxl"),
                 token: str = TOKEN) -> dict[str, torch.Tensor]:
    """A file in the trainer's layout (T5 under both names, by default); returns the vectors per encoder."""
    generator = torch.Generator().manual_seed(seed)
    vectors = {key: torch.randn(n, dim, generator=generator) for key, dim in dims.items()}
    # clones: safetensors refuses two names for one tensor
    state = {key: t for key, t in vectors.items() if key != "t5"} | {name: vectors["t5"].clone() for name in t5_keys}
    save_file(state, str(path), metadata={"placeholder_token": token})
    return vectors


def snapshot(pipeline, family: str) -> dict[str, tuple[torch.Tensor, int]]:
    """Each encoder's embedding matrix and its tokenizer's length, before loading."""
    return {key: (getattr(pipeline, encoder).get_input_embeddings().weight.detach().clone(),
                  len(getattr(pipeline, tokenizer))) for key, (encoder, tokenizer) in ENCODERS[family].items()}


def new_ids(pipeline, family: str, key: str, n: int) -> list[int]:
    tokenizer = getattr(pipeline, ENCODERS[family][key][1])
    names = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, n)]
    assert set(names) <= set(tokenizer.get_vocab())
    return tokenizer.convert_tokens_to_ids(names)


def t5_ids(pipeline, family: str, prompt: str) -> list[int]:
    """The T5 ids the pipeline itself will encode `prompt` with (Flux expands multi-vector tokens on its own)."""
    tokenizer = getattr(pipeline, ENCODERS[family]["t5"][1])
    if hasattr(pipeline, "maybe_convert_prompt"):
        prompt = pipeline.maybe_convert_prompt(prompt, tokenizer)
    return tokenizer(prompt).input_ids


def encode(pipeline, family: str, prompt: str) -> dict[str, torch.Tensor]:
    """The text conditioning, split by source encoder: CLIP's (SD3's CLIP sequence + pooled, Flux's pooled), T5's."""
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipeline.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                                          max_sequence_length=32)
            return {"clip": embeds[:, :77], "pooled": pooled, "t5": embeds[:, 77:]}
        embeds, pooled, _ = pipeline.encode_prompt(prompt, None, max_sequence_length=32)
        return {"pooled": pooled, "t5": embeds}


def render(pipeline, prompt: str) -> np.ndarray:
    return pipeline(prompt, height=32, width=32, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


# --- the vectors land where they belong ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_file_vectors_land_in_every_encoder_and_nothing_else_changes(load, tmp_path, family, n):
    pipeline = load(family)
    before = snapshot(pipeline, family)
    vectors = write_embeds(tmp_path / "embeds.safetensors", widths(pipeline, family), n)
    assert load_learned_embeds(pipeline, tmp_path / "embeds.safetensors") == [TOKEN]
    for key, (encoder, _) in ENCODERS[family].items():
        old_weight, vocab = before[key]
        ids = new_ids(pipeline, family, key, n)
        assert ids == list(range(vocab, vocab + n))  # right after the vocabulary, as diffusers and the trainer do
        weight = getattr(pipeline, encoder).get_input_embeddings().weight.detach()
        assert torch.equal(weight[ids], vectors[key]), key
        assert torch.equal(weight[:vocab], old_weight[:vocab]), key


def test_sd3_keeps_a_padded_t5_table_and_its_dtype(load, tmp_path):
    """Real T5 has 32,128 rows for 32,100 tokens: new ids already fit, so nothing is resized (and nothing dropped)."""
    pipeline = load("sd3")
    pipeline.text_encoder_3.resize_token_embeddings(len(pipeline.tokenizer_3) + 28, mean_resizing=False)
    pipeline.to(torch.bfloat16)
    before = pipeline.text_encoder_3.get_input_embeddings().weight.detach().clone()
    vectors = write_embeds(tmp_path / "embeds.safetensors", widths(pipeline, "sd3"), n=2)
    load_learned_embeds(pipeline, tmp_path / "embeds.safetensors")
    weight = pipeline.text_encoder_3.get_input_embeddings().weight.detach()
    ids = new_ids(pipeline, "sd3", "t5", 2)
    assert weight.shape == before.shape and weight.dtype == torch.bfloat16
    assert torch.equal(weight[ids], vectors["t5"].to(torch.bfloat16))
    assert torch.equal(weight[[i for i in range(len(weight)) if i not in ids]],
                       before[[i for i in range(len(before)) if i not in ids]])


def test_comfyui_t5xxl_only_file_loads_like_a_t5_file(load, tmp_path):
    loaded = []
    for t5_keys in (("t5",), ("t5xxl",)):
        pipeline = load("flux")
        file = tmp_path / f"{t5_keys[0]}.safetensors"
        write_embeds(file, widths(pipeline, "flux"), n=2, t5_keys=t5_keys)
        assert load_learned_embeds(pipeline, file) == [TOKEN]
        loaded.append([pipeline.text_encoder.get_input_embeddings().weight.detach(),
                       pipeline.text_encoder_2.get_input_embeddings().weight.detach()])
    assert all(torch.equal(a, b) for a, b in zip(*loaded))


def test_t5_wins_over_t5xxl_when_both_are_there(tmp_path):
    file = tmp_path / "both.safetensors"
    t5, t5xxl = torch.randn(2, T5), torch.randn(2, T5)
    save_file({"clip_l": torch.randn(2, L), "t5": t5, "t5xxl": t5xxl}, str(file),
              metadata={"placeholder_token": TOKEN})
    embeds = read_embeddings(file)
    assert set(embeds) == {TOKEN} and set(embeds[TOKEN]) == {"clip_l", "t5"}
    assert torch.equal(embeds[TOKEN]["t5"], t5)


# --- prompts with the token ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompt_with_the_token_conditions_every_encoder_and_renders(load, tmp_path, family):
    pipeline = load(family)
    write_embeds(tmp_path / "embeds.safetensors", widths(pipeline, family), n=2)
    load_learned_embeds(pipeline, tmp_path / "embeds.safetensors")
    prompt = write_out_tokens(pipeline, PROMPT)
    # both vectors reach T5 (SD3: written out here; Flux: expanded by the pipeline itself)
    assert set(new_ids(pipeline, family, "t5", 2)) <= set(t5_ids(pipeline, family, prompt))
    with_token, without = encode(pipeline, family, prompt), encode(pipeline, family, "a photo of")
    for part in with_token:
        assert torch.isfinite(with_token[part]).all(), part
        assert not torch.equal(with_token[part], without[part]), part
    images = render(pipeline, prompt)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert (images >= 0).all() and (images <= 1).all()


def test_write_out_tokens_gives_sd3_every_vector(load, tmp_path):
    pipeline = load("sd3")
    write_embeds(tmp_path / "embeds.safetensors", widths(pipeline, "sd3"), n=3)
    load_learned_embeds(pipeline, tmp_path / "embeds.safetensors")
    assert not hasattr(pipeline, "maybe_convert_prompt")  # why SD3 needs it
    all_three = f"{TOKEN} {TOKEN}_1 {TOKEN}_2"
    assert write_out_tokens(pipeline, f"{TOKEN}, by {TOKEN}") == f"{all_three}, by {all_three}"
    assert write_out_tokens(pipeline, f"a {all_three}") == f"a {all_three}"  # already written out: left alone
    assert write_out_tokens(pipeline, f"{TOKEN}_1 {TOKEN}") == f"{TOKEN}_1 {all_three}"  # `tok_1` is not `tok`
    assert write_out_tokens(pipeline, "a photo of a toy") == "a photo of a toy"
    # the written-out vectors change what the encoders see
    first_only, every = encode(pipeline, "sd3", PROMPT), encode(pipeline, "sd3", f"a photo of {all_three}")
    assert not torch.equal(first_only["t5"], every["t5"]) and not torch.equal(first_only["clip"], every["clip"])


def test_write_out_tokens_leaves_flux_prompts_to_the_pipeline(load, tmp_path):
    pipeline = load("flux")
    write_embeds(tmp_path / "embeds.safetensors", widths(pipeline, "flux"), n=2)
    load_learned_embeds(pipeline, tmp_path / "embeds.safetensors")
    assert write_out_tokens(pipeline, PROMPT) == PROMPT
    assert pipeline.maybe_convert_prompt(PROMPT, pipeline.tokenizer_2) == f"a photo of {TOKEN} {TOKEN}_1"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_clip_pools_at_end_of_text_after_loading(load, tmp_path, family):
    pipeline = load(family)
    clips = [(pipeline.text_encoder, pipeline.tokenizer)]
    if family == "sd3":
        clips.append((pipeline.text_encoder_2, pipeline.tokenizer_2))
    for text_encoder, _ in clips:  # the legacy ids of SD3's and Flux's published CLIP configs
        pooling_module = getattr(text_encoder, "text_model", text_encoder)  # transformers 5's CLIPTextModel has none
        text_encoder.config.eos_token_id = pooling_module.eos_token_id = 2
    write_embeds(tmp_path / "embeds.safetensors", widths(pipeline, family), n=1)
    load_learned_embeds(pipeline, tmp_path / "embeds.safetensors")
    for text_encoder, tokenizer in clips:
        assert text_encoder.config.eos_token_id == tokenizer.eos_token_id
        # pooled at end-of-text, not at the placeholder, whose id is now the largest in the prompt
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            out = getattr(text_encoder, "text_model", text_encoder)(input_ids=ids)  # pooled, before any projection
        end = ids[0].tolist().index(tokenizer.eos_token_id)
        assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, end])
    t5 = pipeline.text_encoder_3 if family == "sd3" else pipeline.text_encoder_2
    assert t5.config.eos_token_id == 1  # T5's own config is left alone


# --- files that do not fit are refused, and leave the pipeline as it was ---------------------------------------------


@pytest.mark.parametrize("family, dims, message", [
    ("flux", {"clip_l": L, "clip_g": G}, "an SDXL .* Flux.1"),
    ("sd3", {"clip_l": L, "clip_g": G}, "an SDXL .* SD3"),
    ("sd3", {"clip_l": L, "t5": T5}, "a Flux.1 .* SD3"),
    ("flux", {"clip_l": L, "clip_g": G, "t5": T5}, "an SD3 .* Flux.1"),
    ("flux", {"emb_params": L}, "single-text-encoder .* Flux.1"),
    ("flux", {"clip_l": L, "t5": 64}, "64-dim t5 vectors .* 128"),
    ("sd3", {"clip_l": L, "clip_g": L, "t5": T5}, "32-dim clip_g vectors .* 48"),
], ids=["sdxl-into-flux", "sdxl-into-sd3", "flux-into-sd3", "sd3-into-flux", "sd1-into-flux", "t5-width",
        "clip_g-width"])
def test_files_that_do_not_fit_are_refused(load, tmp_path, family, dims, message):
    pipeline = load(family)
    before = snapshot(pipeline, family)
    file = tmp_path / "embeds.safetensors"
    save_file({key: torch.randn(2, dim) for key, dim in dims.items()}, str(file), metadata={"placeholder_token": TOKEN})
    with pytest.raises(ValueError, match=message):
        load_learned_embeds(pipeline, file)
    for key, (weight, vocab) in snapshot(pipeline, family).items():
        assert vocab == before[key][1] and torch.equal(weight, before[key][0]), key


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_token_already_in_the_vocabulary_is_refused(load, tmp_path, family):
    pipeline = load(family)
    write_embeds(tmp_path / "embeds.safetensors", widths(pipeline, family), n=2)
    load_learned_embeds(pipeline, tmp_path / "embeds.safetensors")
    with pytest.raises(ValueError, match="'<tok>' is already in the clip_l tokenizer"):
        load_learned_embeds(pipeline, tmp_path / "embeds.safetensors")


# --- the command line ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_renders_a_grid(request, tmp_path, family, capsys):
    from PIL import Image

    folder = request.getfixturevalue(f"tiny_{family}_pipeline")
    dims = {"sd3": {"clip_l": L, "clip_g": G, "t5": T5}, "flux": {"clip_l": L, "t5": T5}}[family]
    write_embeds(tmp_path / "learned_embeds.safetensors", dims, n=2)
    grid = tmp_path / "grid.png"
    assert generate.main(["--pretrained_model_name_or_path", str(folder), "--learned_embeds", str(tmp_path),
                          "--prompt", PROMPT, "--num_images", "2", "--num_inference_steps", "2", "--resolution", "32",
                          "--guidance_scale", "3.5", "--output", str(grid), "--device", "cpu"]) == 0
    assert f"loaded token(s): {TOKEN}" in capsys.readouterr().out
    assert Image.open(grid).size == (64, 32)


def test_generate_wants_a_multiple_of_16_for_flux(tiny_flux_pipeline, tmp_path, capsys):
    write_embeds(tmp_path / "learned_embeds.safetensors", {"clip_l": L, "t5": T5}, n=1)
    assert generate.main(["--pretrained_model_name_or_path", str(tiny_flux_pipeline), "--learned_embeds", str(tmp_path),
                          "--prompt", PROMPT, "--resolution", "40", "--device", "cpu"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
