"""The toy CLIP (examples/toy_world/clip, made by examples/toy_world/train_clip.py): it loads like a hub CLIP model
and reads fresh world images as its training measured. The accuracy and pair checks are also run on an untrained
model of the same configuration, which must fail them, so the thresholds mean something."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy_world"
sys.path[:0] = [str(TOY)]

import train_clip  # noqa: E402
import world  # noqa: E402

CLIP_DIR = TOY / "clip"
SEED = 777  # neither the training seed (0) nor the one clip_log.json was measured on (1000)
N = 160


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    model = CLIPModel.from_pretrained(CLIP_DIR).eval()
    processor = CLIPProcessor.from_pretrained(CLIP_DIR)
    return model, processor


@pytest.fixture(scope="module")
def untrained(clip):
    from transformers import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(clip[0].config).eval()


@pytest.fixture(scope="module")
def world_images():
    return world.sample(N, SEED)


def image_embeddings(model, processor, images: np.ndarray) -> torch.Tensor:
    pixels = processor(images=list(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    return torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def text_embeddings(model, processor, texts: list[str]) -> torch.Tensor:
    # max_length padding, as a scorer would use with a real CLIP; training padded to the longest caption
    tokens = processor(text=texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    return torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def accuracy(model, processor, images, attrs, name: str, prompts: list[str]) -> float:
    img = image_embeddings(model, processor, images)
    txt = text_embeddings(model, processor, prompts)
    truth = torch.tensor([world.ATTRIBUTES[name].index(a[name]) for a in attrs])
    return float(((img @ txt.T).argmax(1) == truth).float().mean())


def same_minus_different(model, processor, images, attrs) -> float:
    img = image_embeddings(model, processor, images)
    sim = (img @ img.T).numpy()
    keys = [(a["shape"], a["colour"], a["pattern"]) for a in attrs]
    same = np.array([[k == j for j in keys] for k in keys]) & ~np.eye(len(keys), dtype=bool)
    different = ~np.array([[k == j for j in keys] for k in keys])
    assert same.sum() >= 10  # enough same-concept pairs among N images
    return float(sim[same].mean() - sim[different].mean())


def test_loads_like_a_hub_model_in_float32(clip):
    model, processor = clip
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vision_config.image_size == 32
    assert len(processor.tokenizer) == 49408
    # pooling happens at the first EOS, which is also the pad token
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id == 49407
    size = sum(f.stat().st_size for f in CLIP_DIR.rglob("*") if f.is_file())
    assert size < 10.5e6


def test_processor_prepares_images_as_training_did(clip):
    _, processor = clip
    images, _ = world.sample(8, SEED + 1)
    from PIL import Image

    from_arrays = processor(images=list(images), return_tensors="pt").pixel_values
    from_pil = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt").pixel_values
    trained_on = train_clip.pixel_values(images)
    assert from_arrays.shape == trained_on.shape == (8, 3, 32, 32)
    assert from_arrays.dtype == trained_on.dtype == torch.float32
    assert torch.allclose(from_arrays, trained_on, atol=1e-6, rtol=0)
    assert torch.allclose(from_pil, trained_on, atol=1e-6, rtol=0)
    # and the normalisation is not the identity: a plain x / 255 would differ
    assert not torch.allclose(from_arrays, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, atol=1e-2)


@pytest.mark.parametrize("family", ["noun", "no_noun"])
def test_reads_background_zero_shot(clip, untrained, world_images, family):
    images, attrs = world_images
    prompts = [train_clip.prompt("background", b, family) for b in world.ATTRIBUTES["background"]]
    if family == "no_noun":
        assert prompts[3] == "a photo of a on a pink background"  # the CLIP-T prompt once "<S*>" is removed
    assert accuracy(*clip, images, attrs, "background", prompts) >= 0.9
    assert accuracy(untrained, clip[1], images, attrs, "background", prompts) < 0.6


def test_reads_colour_and_size_zero_shot(clip, untrained, world_images):
    images, attrs = world_images
    colour = [f"a photo of a {c} shape" for c in world.ATTRIBUTES["colour"]]
    size = ["a photo of a small", "a photo of a large"]  # what "a photo of a small <S*>" becomes
    assert accuracy(*clip, images, attrs, "colour", colour) >= 0.85
    assert accuracy(*clip, images, attrs, "size", size) >= 0.85
    assert accuracy(untrained, clip[1], images, attrs, "colour", colour) < 0.5


def test_same_concept_images_are_closer_than_different_ones(clip, untrained, world_images):
    images, attrs = world_images
    assert same_minus_different(*clip, images, attrs) > 0.15
    assert same_minus_different(untrained, clip[1], images, attrs) < 0.05


def test_held_out_concept_is_closest_to_its_own_training_images(clip):
    """CLIP-I for the never-seen purple striped triangle: fresh renders (any size and background) are closer to its
    training images than renders of concepts that differ in one of shape, colour or pattern."""
    model, processor = clip
    reference = image_embeddings(model, processor, world.concept_examples()[0])
    rng = np.random.default_rng(SEED)

    def clip_i(concept):
        attrs = [{**concept, "size": s, "background": b} for s in world.ATTRIBUTES["size"]
                 for b in world.ATTRIBUTES["background"]]
        images = np.stack([world.render(a, rng) for a in attrs])
        return float((image_embeddings(model, processor, images) @ reference.T).mean())

    same = clip_i(world.HELD_OUT)
    for other in ({**world.HELD_OUT, "shape": "circle"}, {**world.HELD_OUT, "colour": "red"},
                  {**world.HELD_OUT, "pattern": "plain"}):
        assert same > clip_i(other) + 0.02, other
