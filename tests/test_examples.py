"""The tiny pipeline builders (examples/make_tiny_pipeline.py) and examples/generate.py, which evaluate.py and users load with."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT, notices_in


def test_embedded_tokenizer_is_the_real_clip_vocabulary(tiny_tokenizer):
    assert len(tiny_tokenizer) == 49408
    assert tiny_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tiny_tokenizer.model_max_length == 77
    assert tiny_tokenizer.convert_tokens_to_ids("toy</w>") == 5988  # the initializer id other tests rely on


def test_generate_renders_a_grid_with_multi_vector_embeds(tiny_pipeline, tmp_path):
    embeds = tmp_path / "learned_embeds.safetensors"
    save_file({"<my-tok>": torch.randn(3, 32)}, str(embeds))
    grid = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "examples/generate.py", "--pretrained_model_name_or_path",
                           str(tiny_pipeline), "--learned_embeds", str(tmp_path), "--prompt", "a photo of <my-tok>",
                           "--num_images", "2", "--num_inference_steps", "2", "--resolution", "32", "--output",
                           str(grid), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(grid).size == (64, 32)
    assert notices_in(proc.stdout + proc.stderr) == []  # e.g. transformers' "mean resizing" in load_textual_inversion


def test_generate_names_a_missing_embeddings_file(tiny_pipeline, tmp_path):
    proc = subprocess.run([sys.executable, "examples/generate.py", "--pretrained_model_name_or_path",
                           str(tiny_pipeline), "--learned_embeds", str(tmp_path / "nope.safetensors"), "--prompt", "x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nope.safetensors" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name, payload", [
    ("diffusers.safetensors", lambda t: {"my-toy": t}),
    ("my-toy.pt", lambda t: {"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "x", "step": 3}),
    ("my-toy.safetensors", lambda t: {"emb_params": t}),
    ("my-toy.bin", lambda t: {"emp_params": t}),
], ids=["diffusers", "automatic1111", "kohya", "onetrainer"])
def test_every_common_format_loads_under_its_token(tiny_pipeline, tmp_path, name, payload):
    from diffusers import StableDiffusionPipeline
    from generate import load_learned_embeds

    vectors = torch.randn(2, 32)
    file = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(payload(vectors), str(file))
    else:
        torch.save(payload(vectors), file)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    assert load_learned_embeds(pipe, file) == ["my-toy"]
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a photo of my-toy", pipe.tokenizer)).input_ids
    assert ids[4:6] == [49408, 49409]  # both vectors, expanded from the one token in the prompt
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[49408:].detach(), vectors)
    assert_renders(pipe, "a photo of my-toy")


def assert_renders(pipe, prompt: str) -> None:
    image = pipe(prompt, num_inference_steps=1, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and (image >= 0).all() and (image <= 1).all()


@pytest.mark.parametrize("name", ["my-toy.safetensors", "my-toy.bin"])
def test_sdxl_clip_l_clip_g_files_load_into_both_encoders_and_render(tiny_sdxl_pipeline, tmp_path, name):
    from diffusers import StableDiffusionXLPipeline
    from generate import load_learned_embeds

    state = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}  # kohya / AUTOMATIC1111 / ComfyUI layout
    file = tmp_path / name
    save_file(state, str(file)) if name.endswith(".safetensors") else torch.save(state, file)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    assert load_learned_embeds(pipe, file) == ["my-toy"]  # no name inside: the file's, as in AUTOMATIC1111
    for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                    (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):
        assert tokenizer(pipe.maybe_convert_prompt("a photo of my-toy", tokenizer)).input_ids[4:6] == [49408, 49409]
        torch.testing.assert_close(encoder.get_input_embeddings().weight[49408:].detach(), state[key])
        assert encoder.config.eos_token_id == tokenizer.eos_token_id == 49407  # pooled at end-of-text, as trained
    assert_renders(pipe, "a photo of my-toy")


def test_embeddings_for_the_other_family_are_refused(tiny_pipeline, tiny_sdxl_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from generate import load_learned_embeds

    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)}, str(tmp_path / "xl.safetensors"))
    save_file({"<tok>": torch.randn(1, 32)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ValueError, match="SDXL .* 1 text encoder"):
        load_learned_embeds(StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None),
                            tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="single-text-encoder .* 2 text encoder"):
        load_learned_embeds(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline), tmp_path / "sd.safetensors")


def test_generate_renders_the_trainers_sdxl_output(tiny_sdxl_pipeline, concept_dir, tmp_path, capsys):
    import generate
    import train_textual_inversion as tti
    from conftest import train_argv

    out = tmp_path / "out"
    tti.main(tti.parse_args(train_argv(tiny_sdxl_pipeline, concept_dir, out, "--placeholder_token", "<xl-toy>",
                                       "--max_train_steps", "1")))
    grid = tmp_path / "grid.png"
    assert generate.main(["--pretrained_model_name_or_path", str(tiny_sdxl_pipeline), "--learned_embeds", str(out),
                          "--prompt", "a photo of <xl-toy>", "--num_images", "2", "--num_inference_steps", "2",
                          "--resolution", "32", "--output", str(grid), "--device", "cpu"]) == 0
    assert "loaded token(s): <xl-toy>" in capsys.readouterr().out  # the token name comes from the file's metadata
    assert Image.open(grid).size == (64, 32)
