"""The toy world (examples/toy_world): generator, judge, pretrained pipeline, and textual inversion as judged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy_world"
sys.path[:0] = [str(TOY)]

import world  # noqa: E402

PIPELINE = TOY / "pipeline"
CONCEPT_DIR = ROOT / "examples" / "toy_concept"


@pytest.fixture(scope="module")
def judge():
    import judge as judge_lib

    return judge_lib.load_judge()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(PIPELINE, subfolder="tokenizer")


def test_world_is_deterministic_and_captions_name_every_attribute(tokenizer):
    images, attrs = world.sample(12, seed=3)
    again, attrs_again = world.sample(12, seed=3)
    other, _ = world.sample(12, seed=4)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and attrs == attrs_again
    assert not np.array_equal(images, other)
    for a in attrs:
        text = world.caption(a)
        for name in world.NAMES:
            assert f" {a[name]} " in f" {text} "
    # Every attribute value is one word of the real CLIP vocabulary, so a prompt names it with one token.
    for values in world.ATTRIBUTES.values():
        for word in values:
            assert tokenizer.tokenize(word) == [word + "</w>"]
    # The held-out concept never occurs in pretraining samples, but is drawable by the renderer.
    _, many = world.sample(3000, seed=5)
    assert not any(world.is_held_out(a) for a in many)
    concept, concept_attrs = world.concept_images()
    assert all(world.is_held_out(a) for a in concept_attrs) and len({a["background"] for a in concept_attrs}) >= 3


def test_concept_folder_holds_the_generated_concept_images():
    from PIL import Image

    images, _ = world.concept_images()
    files = sorted(CONCEPT_DIR.glob("*.png"))
    assert len(files) == len(images)
    for file, image in zip(files, images):
        assert np.array_equal(np.asarray(Image.open(file).convert("RGB")), image)


def test_judge_reads_fresh_world_images(judge):
    import judge as judge_lib

    images, attrs = world.sample(600, seed=424242, allow_held_out=True)
    accuracy = judge_lib.accuracy(judge, images, attrs)
    assert min(accuracy.values()) >= 0.95, accuracy
    # Softened images (blur, noise, colour drift), like a diffusion model's, are read too.
    soft = judge_lib.augment(judge_lib.to_input(images), torch.Generator().manual_seed(1))
    soft = (soft * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert min(judge_lib.accuracy(judge, soft, attrs).values()) >= 0.95


def test_pipeline_is_small_and_draws_what_captions_say(judge):
    import evaluate as ev
    import judge as judge_lib

    size = sum(f.stat().st_size for f in PIPELINE.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, size
    pipeline = ev.load_pipeline(PIPELINE)
    assert pipeline.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    attrs = {"shape": "circle", "colour": "orange", "pattern": "dotted", "size": "large", "background": "teal"}
    images = ev.draw(pipeline, world.caption(attrs), 6, seed=0, guidance_scale=5.0, steps=20)
    judged = judge_lib.predict(judge, images)
    assert np.mean([j == attrs for j in judged]) >= 0.5, judged


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The `make demo` training run (same flags: caption templates, captions beside the images, validation scored by
    the toy CLIP every 50 steps), in-process: about 20 s of CPU."""
    import train_textual_inversion as tti

    out = tmp_path_factory.mktemp("toy-demo")
    tti.main(tti.parse_args([
        "--pretrained_model_name_or_path", str(PIPELINE), "--train_data_dir", str(CONCEPT_DIR),
        "--placeholder_token", "<toy-concept>", "--initializer_token", "triangle", "--num_vectors", "2",
        "--templates", str(TOY / "caption_templates.txt"), "--caption_extension", ".txt", "--resolution", "32",
        "--train_batch_size", "4",
        "--max_train_steps", "200", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "0",
        "--report_to", "none", "--output_dir", str(out),
        "--validation_prompt", "a photo of a <toy-concept> on a pink background",
        "--validation_prompt", "a photo of a small <toy-concept>", "--validation_guidance_scale", "5",
        "--validation_steps", "50", "--clip_model_name_or_path", str(TOY / "clip"),
    ]))
    return out


def test_textual_inversion_beats_the_initializer_on_the_judge(demo_run, judge):
    """The learned word draws the held-out concept and keeps it under edits; the initializer ("triangle") and a
    random vector of a word's norm almost never draw it."""
    import evaluate as ev
    from generate import load_learned_embeds

    pipeline = ev.load_pipeline(PIPELINE)
    tokens = load_learned_embeds(pipeline, demo_run / "learned_embeds-best.safetensors")  # what make demo judges
    result = ev.evaluate(pipeline, judge, tokens[0], "triangle", ev.CONCEPT, [], num_images=8, seed=0, steps=20,
                         num_vectors=2)
    recon, edit = result["reconstruction"], result["editability"]
    assert recon["learned"] >= 0.75 and recon["learned"] >= recon["initializer"] + 0.5, recon
    assert recon["learned"] >= recon["random"] + 0.5, recon
    assert edit["learned"] >= 0.4 and edit["learned"] >= edit["initializer"] + 0.3, edit


def test_evaluate_cli_writes_the_summary_and_the_picture(demo_run, tmp_path):
    import evaluate as ev
    from PIL import Image

    summary = tmp_path / "eval.json"
    assert ev.main(["--learned_embeds", str(demo_run), "--output_json", str(summary), "--num_images", "4",
                    "--num_inference_steps", "10"]) == 0
    result = json.loads(summary.read_text())
    assert set(result["reconstruction"]) == set(result["editability"]) == {"learned", "initializer", "random"}
    for scores in (result["reconstruction"], result["editability"]):
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert result["settings"]["num_vectors"] == 2 and result["settings"]["placeholder"] == "<toy-concept>"
    # Rows: training images, initializer, learned, two edits; each row shows its images 3x enlarged.
    picture = Image.open(result["images"])
    assert picture.height >= 5 * 3 * world.RESOLUTION
    assert picture.width >= 250 + 5 * 3 * world.RESOLUTION
