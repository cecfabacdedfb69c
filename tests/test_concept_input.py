"""Telling the trainer what the concept is: captions, masks, aspect-ratio buckets, and loss weighting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import train_textual_inversion as tti
from conftest import watch_frozen_rows
from train_textual_inversion import UsageError

PLACEHOLDER = "<cat-toy>"


def images_in(folder, sizes=((32, 32), (48, 32))):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        paths.append(folder / f"{i}.png")
        Image.new("RGB", size, (200, 40 * i, 0)).save(paths[-1])
    return paths


# ---- captions --------------------------------------------------------------------------------------------------------
def test_captions_from_files_beside_the_images(tmp_path):
    paths = images_in(tmp_path / "data")
    for path, text in zip(paths, ["a photo of {} on a beach", f"{PLACEHOLDER} in the snow\n"]):
        path.with_suffix(".txt").write_text(text)
    captions = tti.read_captions(paths, tmp_path / "data", ".txt", "text")
    assert [c for c, _ in captions] == ["a photo of {} on a beach", f"{PLACEHOLDER} in the snow"]
    assert captions[1][1].endswith("1.txt")
    assert tti.read_captions(paths, tmp_path / "data", None, "text") is None  # nothing asked, no metadata.jsonl


def test_an_image_without_a_caption_is_refused_naming_the_file(tmp_path):
    paths = images_in(tmp_path / "data")
    paths[0].with_suffix(".txt").write_text("a photo of {}")
    with pytest.raises(UsageError, match=r"--caption_extension \.txt: 1\.png has no readable caption.*1\.txt"):
        tti.read_captions(paths, tmp_path / "data", ".txt", "text")
    paths[1].with_suffix(".txt").write_text("  \n")
    with pytest.raises(UsageError, match=r"1\.txt is empty"):
        tti.read_captions(paths, tmp_path / "data", ".txt", "text")


def test_captions_from_metadata_jsonl(tmp_path):
    paths = images_in(tmp_path / "data")
    rows = [{"file_name": "1.png", "caption": "{} on grass"}, {"file_name": "0.png", "caption": "{} on sand"}]
    (tmp_path / "data" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    captions = tti.read_captions(paths, tmp_path / "data", None, "caption")
    assert [c for c, _ in captions] == ["{} on sand", "{} on grass"]  # in the images' order
    with pytest.raises(UsageError, match=r"--caption_column.*line 1"):
        tti.read_captions(paths, tmp_path / "data", None, "text")


@pytest.mark.parametrize("rows, expect", [
    ([{"file_name": "0.png", "text": "{}"}], r"no caption for 1\.png"),
    ([{"file_name": "0.png", "text": "{}"}, {"file_name": "1.png", "text": "{}"}, {"file_name": "gone.png",
                                                                                 "text": "{}"}],
     r"line 3 names gone\.png, which is not in --train_data_dir"),
])
def test_metadata_jsonl_mistakes_are_named(tmp_path, rows, expect):
    paths = images_in(tmp_path / "data")
    (tmp_path / "data" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UsageError, match=expect):
        tti.read_captions(paths, tmp_path / "data", None, "text")


CAPTIONS = [("a photo of {} on a beach", "a.txt"), (f"{PLACEHOLDER} in the snow", "b.txt")]


def test_captions_alone_are_the_prompts():
    assert tti.caption_prompts(["a photo of a {}"], CAPTIONS, PLACEHOLDER, templates_given=False) == [
        [f"a photo of {PLACEHOLDER} on a beach"], [f"{PLACEHOLDER} in the snow"]]


def test_caption_template_combinations():
    templates = ["a photo of a {}, {caption}", "a rendering of {caption}", "a drawing of a {}"]
    # The template carries the word: the caption need not (A1111's [filewords]).
    with pytest.raises(UsageError, match=r"a\.txt: the caption 'large' does not name the concept.*a rendering of"):
        tti.caption_prompts(templates, [("large", "a.txt")], PLACEHOLDER, templates_given=True)
    # A caption that places the word itself works in every template.
    prompts = tti.caption_prompts(templates, [("large {} on white", "a.txt")], PLACEHOLDER, templates_given=True)
    assert prompts == [[f"a photo of a {PLACEHOLDER}, large {PLACEHOLDER} on white",
                        f"a rendering of large {PLACEHOLDER} on white", f"a drawing of a {PLACEHOLDER}"]]
    only_caption_slots = ["a photo of a {}, {caption}"]
    assert tti.caption_prompts(only_caption_slots, [("on white", "a.txt")], PLACEHOLDER, True) == [
        [f"a photo of a {PLACEHOLDER}, on white"]]
    with pytest.raises(UsageError, match=r"--templates has no \{caption\} line"):
        tti.caption_prompts(["a photo of {}"], CAPTIONS, PLACEHOLDER, templates_given=True)
    with pytest.raises(UsageError, match=r"b\.txt: the caption 'a dog' does not name the concept"):
        tti.caption_prompts(["{}"], [("{} here", "a.txt"), ("a dog", "b.txt")], PLACEHOLDER, False)


def test_caption_dropout_draws_templates_with_the_word_alone():
    # One image: its caption (prompt 0), then three templates a dropped caption becomes.
    ids = torch.arange(4 * 6).view(1, 4, 6)
    def caption_share(rate):
        ds = tti.TextualInversionDataset(1, ids, 1000, seed=0, per_image=True, captioned_prompts=1,
                                         caption_dropout_rate=rate)
        drawn = [int(ds[(0, i)]["input_ids"][0]) // 6 for i in range(1000)]
        return drawn.count(0) / len(drawn), set(drawn)
    share, drawn = caption_share(0.5)
    assert 0.45 < share < 0.55 and drawn == {0, 1, 2, 3}
    assert caption_share(1.0) == (0.0, {1, 2, 3})
    share, _ = caption_share(0.0)  # no dropout: every prompt alike, as before the flag
    assert 0.2 < share < 0.3


def test_caption_dropout_prompts_follow_each_caption(tiny_pipeline, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    paths = images_in(tmp_path / "data")
    for path, text in zip(paths, ("a photo of {} on a beach", "{} in the snow")):
        path.with_suffix(".txt").write_text(text)
    templates = tmp_path / "t.txt"
    def prompts(*flags):
        args = tti.parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--train_data_dir",
                               str(tmp_path / "data"), "--placeholder_token", PLACEHOLDER, "--initializer_token",
                               "toy", "--caption_extension", ".txt", *flags])
        ids, per_image, captioned = tti.tokenized_prompts(args, [tokenizer], paths)
        texts = [[tokenizer.decode(row[0], skip_special_tokens=True) for row in image] for image in ids]
        return per_image, captioned, texts
    # Whole captions, no templates: each caption, then the built-in templates.
    per_image, captioned, texts = prompts("--caption_dropout_rate", "0.5")
    assert per_image and captioned == 1 and [len(t) for t in texts] == [1 + len(tti.TEMPLATES["object"])] * 2
    assert "beach" in texts[0][0] and "snow" in texts[1][0] and not any("beach" in t for t in texts[0][1:])
    # A file's lines without {caption} are what a dropped caption becomes; without dropout such a file is refused.
    templates.write_text("a rendering of {caption}\na drawing of a {}\na sketch of a {}\n")
    per_image, captioned, texts = prompts("--caption_dropout_rate", "0.25", "--templates", str(templates))
    word = "< cat - toy >"  # as the tiny tokenizer, which has not added the placeholder, decodes it
    assert captioned == 1 and texts == [[f"a rendering of a photo of {word} on a beach", f"a drawing of a {word}",
                                         f"a sketch of a {word}"],
                                        [f"a rendering of {word} in the snow", f"a drawing of a {word}",
                                         f"a sketch of a {word}"]]
    templates.write_text("a drawing of a {}\n")
    with pytest.raises(UsageError, match=r"--templates has no \{caption\} line"):
        prompts("--templates", str(templates))
    assert prompts("--templates", str(templates), "--caption_dropout_rate", "0.5")[1:2] == (1,)
    for path in paths:
        path.with_suffix(".txt").unlink()
    with pytest.raises(UsageError, match="--caption_dropout_rate drops captions, and the images have none"):
        tti.tokenized_prompts(tti.parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline),
                                              "--train_data_dir", str(tmp_path / "data"), "--placeholder_token",
                                              PLACEHOLDER, "--initializer_token", "toy",
                                              "--caption_dropout_rate", "0.5"]), [tokenizer], paths)


def test_templates_may_hold_a_caption_slot(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {}, {caption}\na rendering of {caption}\n")
    assert tti.load_templates(str(f)) == ["a photo of a {}, {caption}", "a rendering of {caption}"]
    f.write_text("a photo of {} and {}, {caption}\n")
    with pytest.raises(UsageError, match="line 1"):
        tti.load_templates(str(f))


def test_a_prompt_too_long_for_the_tokenizer_is_named(tiny_tokenizer):
    tti.check_prompt_lengths(tiny_tokenizer, [("a photo of a cat", "a.txt")])
    long = "a photo of " + "a very " * 40 + "cat"
    with pytest.raises(UsageError, match=r"b\.txt: .* tokens with the placeholder's vectors, over the tokenizer's 77"):
        tti.check_prompt_lengths(tiny_tokenizer, [("a photo", "a.txt"), (long, "b.txt")])


def test_captioned_sdxl_run_expands_the_placeholder_in_both_tokenizers(tiny_sdxl_pipeline, concept_dir, tmp_path,
                                                                      monkeypatch):
    from conftest import train_argv
    from transformers import CLIPTokenizer

    for image in concept_dir.iterdir():
        image.with_suffix(".txt").write_text(f"a photo of {PLACEHOLDER} on a table" if "0" in image.name else
                                             "{} in a box")
    seen, real = [], tti.training_loss
    monkeypatch.setattr(tti, "training_loss", lambda batch, *a: seen.append(batch) or real(batch, *a))
    tti.main(tti.parse_args(train_argv(tiny_sdxl_pipeline, concept_dir, tmp_path / "out", "--caption_extension",
                                       ".txt", "--num_vectors", "2", "--max_train_steps", "2")))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl_pipeline, subfolder="tokenizer")
    tti.add_placeholder_tokens(tokenizer, PLACEHOLDER, 2)
    texts = set()
    for batch in seen:
        for ids, index in zip(batch["input_ids"], batch["image_index"].tolist()):
            end = ids[0].tolist().index(tokenizer.eos_token_id) + 1  # the second pads with "!", not end-of-text
            assert torch.equal(ids[0][:end], ids[1][:end])  # both tokenizers, same prompt (same vocabulary here)
            texts.add((index, tuple(ids[0][:end].tolist())))
    expect = {0: "a photo of <cat-toy> <cat-toy>_1 on a table", 1: "<cat-toy> <cat-toy>_1 in a box"}
    expect = {i: tuple(tokenizer(text).input_ids) for i, text in expect.items()}
    assert 49408 in expect[0] and 49409 in expect[1]  # both vectors' tokens, in each caption
    assert texts and all(ids == expect[min(index, 1)] for index, ids in texts)


# ---- masks -----------------------------------------------------------------------------------------------------------
def test_alpha_mask_follows_exif_rotation_crop_resize_and_flip(tmp_path):
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 20, 20))  # opaque left half, transparent right half
    exif = rgba.getexif()
    exif[0x0112] = 6  # stored sideways: upright it is 20 wide, 40 tall, and the opaque half is on top
    path = tmp_path / "a.png"
    rgba.save(path, exif=exif)
    loaded = tti.load_training_images([path], 16, center_crop=False, alpha_mask=True)
    mask = loaded.masks[0][0].float() / 255
    assert loaded.original_sizes == [(40, 20)]
    assert mask[:7].min() == 1 and mask[9:].max() == 0  # top opaque, bottom transparent, after rotation and squash
    weights = tti.latent_loss_weights(loaded.masks, 4)[0]
    assert weights.shape == (2, 1, 4, 4) and torch.equal(weights[1], weights[0].flip(-1))
    cropped = tti.load_training_images([path], 16, center_crop=True, alpha_mask=True).masks[0][0].float() / 255
    assert cropped[:7].min() == 1 and cropped[9:].max() == 0  # rows 10-30 of 40 kept: half opaque, half not
    left_right = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    left_right.paste((0, 0, 0, 255), (0, 0, 8, 32))
    left_right.save(tmp_path / "lr.png")
    w = tti.latent_loss_weights(tti.load_training_images([tmp_path / "lr.png"], 32, False, alpha_mask=True).masks, 8)[0]
    assert w[0, 0, :, 0].min() == 1 and w[0, 0, :, 3].max() == 0  # left column counts
    assert w[1, 0, :, 3].min() == 1 and w[1, 0, :, 0].max() == 0  # flipped: the right column


def test_mask_dir_masks_are_checked_before_models_load(tmp_path):
    paths = images_in(tmp_path / "data")
    masks = tmp_path / "masks"
    masks.mkdir()
    with pytest.raises(UsageError, match=r"--mask_dir .* has no mask for 0\.png"):
        tti.load_training_images(paths, 16, False, mask_dir=str(masks))
    Image.new("L", (32, 32), 255).save(masks / "0.png")
    Image.new("L", (32, 32), 255).save(masks / "1.png")  # image 1 is 48 x 32
    with pytest.raises(UsageError, match=r"mask .*1\.png is 32x32 but its image 1\.png is 48x32"):
        tti.load_training_images(paths, 16, False, mask_dir=str(masks))
    Image.new("L", (48, 32), 0).save(masks / "1.png")
    with pytest.raises(UsageError, match=r"--mask_dir: the mask of 1\.png .* is all zero"):
        tti.load_training_images(paths, 16, False, mask_dir=str(masks))
    (masks / "1.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match=r"--mask_dir: cannot read mask .*1\.png"):
        tti.load_training_images(paths, 16, False, mask_dir=str(masks))
    Image.new("L", (48, 32), 128).save(masks / "1.png")
    loaded = tti.load_training_images(paths, 16, False, mask_dir=str(masks))
    assert [m.unique().tolist() for m in loaded.masks] == [[255], [128]]


def test_masked_loss_counts_only_the_mask_and_does_not_depend_on_its_area():
    prediction, target = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    target[:, :, :, :2] = 1.0  # error 1 on the left half, 0 on the right
    left, right = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    left[..., :1], right[..., 2:] = 1.0, 1.0  # a small left mask; a large right one
    assert tti.diffusion_loss(prediction, target, left).item() == pytest.approx(1.0)
    assert tti.diffusion_loss(prediction, target, right).item() == 0.0
    assert tti.diffusion_loss(prediction, target, torch.ones(2, 1, 4, 4)).item() == pytest.approx(
        torch.nn.functional.mse_loss(prediction, target).item())


def test_unmasked_weight_and_area_normalisation_weigh_the_background():
    prediction, target = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    target[..., :2] = 1.0  # error 1 in columns 0-1, 0 in columns 2-3
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :1] = 1.0  # the object: column 0

    def loss(**options):
        return tti.diffusion_loss(prediction, target, mask, None, tti.LossOptions(**options)).item()

    assert loss() == pytest.approx(1.0)  # today's: the object only, over its own area
    assert loss(unmasked_weight=1.0) == pytest.approx(0.5)  # the background counts fully: the plain MSE
    assert loss(unmasked_weight=0.5) == pytest.approx((1 + 0.5) / (1 + 3 * 0.5))  # per row: weighted error / weights
    assert loss(normalize_masked_area_loss=False) == pytest.approx(1 / 4)  # over the whole image


def test_prior_preservation_pulls_the_background_only_towards_the_prior():
    prediction = torch.zeros(1, 1, 4, 4, requires_grad=True)
    target, prior = torch.ones(1, 1, 4, 4), torch.full((1, 1, 4, 4), 3.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0
    options = tti.LossOptions(masked_prior_preservation_weight=0.5)
    loss = tti.diffusion_loss(prediction, target, mask, None, options, prior)
    assert loss.item() == pytest.approx(1.0 + 0.5 * 9.0)  # the object's error, plus the pull over the background
    loss.backward()
    grad = prediction.grad[0, 0]
    assert (grad[:, :2] < 0).all() and (grad[:, 2:] < 0).all()  # both push the prediction up...
    assert torch.allclose(grad[:, :2], torch.full((4, 2), -2 / 8)) and torch.allclose(grad[:, 2:], torch.full(
        (4, 2), -0.5 * 6 / 8))  # ...the object towards the target (1), the background towards the prior (3)


def test_unmasked_probability_draws_whole_masks_from_the_generator():
    masks = torch.zeros(64, 1, 2, 2)
    assert tti.unmasked_draw(masks, 0.0, torch.Generator().manual_seed(0)) is masks  # no draw: the noise is as before
    assert (tti.unmasked_draw(masks, 1.0, torch.Generator().manual_seed(0)) == 1).all()
    drawn = tti.unmasked_draw(masks, 0.25, torch.Generator().manual_seed(3))
    whole = (drawn == 1).flatten(1).all(dim=1)
    assert (whole | (drawn == 0).flatten(1).all(dim=1)).all()  # whole masks, never parts of one
    assert 4 <= whole.sum() <= 28 and torch.equal(drawn, tti.unmasked_draw(masks, 0.25, torch.Generator().manual_seed(3)))


def half_masks(concept_dir, folder):
    folder.mkdir()
    for image in concept_dir.iterdir():
        with Image.open(image) as opened:
            mask = Image.new("L", opened.size, 0)
        mask.paste(255, (0, 0, mask.width // 2, mask.height))
        mask.save(folder / f"{image.stem}.png")
    return ["--mask_dir", str(folder)]


def test_masks_hold_the_background_with_the_prior_by_default(tiny_pipeline, tmp_path):
    def options(*flags):
        return tti.masked_loss_options(tti.parse_args([
            "--pretrained_model_name_or_path", str(tiny_pipeline), "--train_data_dir", str(tmp_path),
            "--placeholder_token", PLACEHOLDER, "--initializer_token", "toy", "--mask_dir", str(tmp_path), *flags]))
    assert options() == {"unmasked_weight": 0.0, "unmasked_probability": 0.0, "normalize_masked_area_loss": True,
                         "masked_prior_preservation_weight": 1.0}
    assert options("--masked_prior_preservation_weight", "0")["masked_prior_preservation_weight"] == 0.0


def test_background_options_in_a_run(run_training, concept_dir, tmp_path, tiny_pipeline, monkeypatch):
    from transformers import CLIPTextModel

    masks = half_masks(concept_dir, tmp_path / "masks")
    masked = run_training("--max_train_steps", "2", *masks, "--masked_prior_preservation_weight", "0",
                          out=tmp_path / "masked")
    # The prior is the frozen model with the initializer's vectors: equal to the prediction at the first step (no
    # pull, the same update), pulling once the vectors have moved. The token table stays the model's own throughout.
    table = CLIPTextModel.from_pretrained(tiny_pipeline, subfolder="text_encoder").get_input_embeddings().weight
    checks = watch_frozen_rows(monkeypatch, table.detach().clone())
    prior = run_training("--max_train_steps", "2", *masks, out=tmp_path / "prior")  # the default with masks: 1
    assert checks == [True, True]
    assert prior.history[0]["loss"] == masked.history[0]["loss"]
    assert prior.history[1]["loss"] > masked.history[1]["loss"]
    # Every sample without its mask is the run without masks.
    never = run_training("--max_train_steps", "2", *masks, "--unmasked_probability", "1", out=tmp_path / "never")
    plain = run_training("--max_train_steps", "2", out=tmp_path / "plain")
    torch.testing.assert_close(never.vectors, plain.vectors)
    assert not torch.allclose(masked.vectors, plain.vectors)


def test_transparent_images_without_alpha_mask_are_said_out_loud(tmp_path, caplog):
    clear, opaque = tmp_path / "clear.png", tmp_path / "opaque.png"
    object_on_nothing = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    object_on_nothing.paste((255, 0, 0, 255), (4, 4, 12, 12))
    object_on_nothing.save(clear)
    Image.new("RGBA", (16, 16), (255, 0, 0, 255)).save(opaque)  # an alpha channel that says nothing
    with caplog.at_level("WARNING", logger="textual_inversion"):
        tti.load_training_images([clear, opaque], 16, False)
    (line,) = [r.getMessage() for r in caplog.records if "transparency" in r.getMessage()]
    assert "1 of 2 images" in line and "clear.png" in line and "white" in line and "--alpha_mask" in line
    caplog.clear()
    with caplog.at_level("WARNING", logger="textual_inversion"):
        tti.load_training_images([clear, opaque], 16, False, alpha_mask=True)
        tti.load_training_images([opaque], 16, False)
    assert not [r for r in caplog.records if "transparency" in r.getMessage()]


# ---- loss weighting --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_diffusers_formula(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 300, 999])
    alphas = scheduler.alphas_cumprod[timesteps].double()
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(tti.min_snr_weights(scheduler, timesteps, 5.0).double(), expected, rtol=1e-5)
    squared = torch.rand(4, 4, 2, 2)
    weighted = tti.diffusion_loss(squared.sqrt(), torch.zeros_like(squared), None, expected.float())
    assert weighted.item() == pytest.approx((squared.mean(dim=(1, 2, 3)) * expected.float()).mean().item(), rel=1e-5)


def test_noise_offset_and_max_grad_norm_act(run_training, monkeypatch):
    norms = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        norms.append(math.sqrt(sum(float(p.grad.norm()) ** 2 for g in self.param_groups for p in g["params"])))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    plain = run_training("--max_train_steps", "3").history
    unclipped = norms[:]
    norms.clear()
    run_training("--max_train_steps", "3", "--max_grad_norm", "1e-3")
    assert min(unclipped) > 1e-3 and max(norms) == pytest.approx(1e-3, rel=1e-3)
    offset = run_training("--max_train_steps", "3", "--noise_offset", "0.5").history
    assert [h["loss"] for h in offset] != [h["loss"] for h in plain]


# ---- aspect-ratio buckets --------------------------------------------------------------------------------------------
def test_bucket_sizes_are_multiples_of_the_step_within_the_bounds_and_the_area():
    buckets = tti.bucket_sizes(512, 256, 1024, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for h, w in buckets:
        assert h % 64 == w % 64 == 0 and 256 <= min(h, w) and max(h, w) <= 1024 and h * w <= 512 * 512


@pytest.mark.parametrize("width, height", [(600, 400), (400, 900), (1000, 1000), (2000, 300)])
def test_framing_in_a_bucket_never_squashes(width, height):
    how = tti.framing(width, height, 512, False, tti.bucket_sizes(512, 256, 1024, 64))
    left, top, right, bottom = how.box
    box_ratio = (right - left) / (bottom - top)
    assert box_ratio == pytest.approx(how.size[1] / how.size[0], rel=0.02)  # the cut has the bucket's shape
    assert right - left == width or bottom - top == height  # and cuts one side only


def test_bucketed_batches_hold_one_size_and_follow_the_seed():
    buckets = (0, 1, 1, 2, 0)
    plan = tti.BatchPlan(num_samples=5 * 7, batch_size=3, gradient_accumulation_steps=1, num_processes=1,
                         process_index=0, seed=3, image_buckets=buckets)
    for epoch in range(3):
        batches = plan.epoch_batches(epoch)
        assert len(batches) == plan.batches_per_epoch
        assert all(len({buckets[i % 5] for _, i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for _, i in batch) == list(range(35))
        assert batches == tti.BatchPlan(35, 3, 1, 1, 0, 3, buckets).epoch_batches(epoch)
    ranks = [tti.BatchPlan(35, 2, 1, 2, rank, 3, buckets).epoch_batches(0) for rank in (0, 1)]
    for mine, theirs in zip(*ranks):
        assert len(mine) == len(theirs) and len({buckets[i % 5] for _, i in mine + theirs}) == 1


def test_bucketed_run_trains_each_image_at_its_own_size(tiny_pipeline, tmp_path, monkeypatch):
    from conftest import train_argv

    data = tmp_path / "data"
    images_in(data, sizes=((64, 32), (32, 64), (48, 48), (64, 30)))
    shapes, real = [], tti.training_loss

    def record(batch, models, generator, timesteps=None):
        if timesteps is None:  # training, not the validation loss
            shapes.append((batch["image_index"].tolist(),
                           tuple(models.latents.sample(batch["image_index"], batch["flip"], generator).shape)))
        return real(batch, models, generator, timesteps)

    monkeypatch.setattr(tti, "training_loss", record)
    tti.main(tti.parse_args(train_argv(tiny_pipeline, data, tmp_path / "out", "--enable_bucket", "--resolution", "40",
                                       "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps",
                                       "8", "--max_train_steps", "6", "--repeats", "3")))
    by_image = {}
    for indices, shape in shapes:
        for i in indices:
            by_image.setdefault(i, set()).add(shape[2:])
    assert len(by_image) == 4 and all(len(s) == 1 for s in by_image.values())
    (h0, w0), (h1, w1), (h2, w2) = (next(iter(by_image[i])) for i in range(3))
    assert w0 > h0 and h1 > w1 and h2 == w2  # landscape, portrait, square
