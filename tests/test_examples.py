"""The embedded pipeline and examples/generate.py, as `make demo` uses them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT


def test_embedded_tokenizer_is_the_real_clip_vocabulary(tiny_tokenizer):
    assert len(tiny_tokenizer) == 49408
    assert tiny_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tiny_tokenizer.model_max_length == 77


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
