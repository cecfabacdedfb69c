"""The embedded pipeline and examples/generate.py, as `make demo` uses them."""

from __future__ import annotations

import subprocess
import sys

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
