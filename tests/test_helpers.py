"""Unit tests of train_textual_inversion's pure helpers: tokens, templates, images, data plan, checkpoints, saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import templates
import train_textual_inversion as tti
from train_textual_inversion import UsageError

VOCAB = 49408


# --------------------------------------------------------------------------------------------------------------------
# Tokens and their initial vectors
# --------------------------------------------------------------------------------------------------------------------


def test_placeholder_token_names_follow_load_textual_inversion_naming():
    assert tti.placeholder_token_names("<x>", 1) == ["<x>"]
    assert tti.placeholder_token_names("<x>", 3) == ["<x>", "<x>_1", "<x>_2"]


def test_add_placeholder_tokens_gives_consecutive_ids_after_the_vocabulary(tokenizer):
    assert len(tokenizer) == VOCAB
    ids = tti.add_placeholder_tokens(tokenizer, "<cat-toy>", 3)
    assert ids == [VOCAB, VOCAB + 1, VOCAB + 2]
    assert tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]) == ids
    encoded = tokenizer("a photo of <cat-toy> <cat-toy>_1 <cat-toy>_2", add_special_tokens=False).input_ids
    assert encoded[-3:] == ids


def test_add_placeholder_tokens_refuses_an_existing_word(tokenizer):
    for existing in ["cat", "Cat", "toy"]:
        with pytest.raises(UsageError, match=f"--placeholder_token '{existing}'"):
            tti.add_placeholder_tokens(tokenizer, existing, 1)
    assert len(tokenizer) == VOCAB  # nothing was added


def test_add_placeholder_tokens_refuses_a_token_added_before(tokenizer):
    tti.add_placeholder_tokens(tokenizer, "<x>", 1)
    with pytest.raises(UsageError, match="--placeholder_token"):
        tti.add_placeholder_tokens(tokenizer, "<x>", 1)
    assert len(tokenizer) == VOCAB + 1


def test_add_placeholder_tokens_refuses_a_collision_with_a_numbered_name(tokenizer):
    tokenizer.add_tokens(["<x>_1"])
    with pytest.raises(UsageError, match=r"--placeholder_token '<x>_1'"):
        tti.add_placeholder_tokens(tokenizer, "<x>", 2)
    assert len(tokenizer) == VOCAB + 1  # "<x>" was not added either


def test_initializer_token_ids_one_word_and_a_phrase(tiny_tokenizer):
    toy = tti.initializer_token_ids(tiny_tokenizer, "toy")
    teddy_bear = tti.initializer_token_ids(tiny_tokenizer, "teddy bear")
    assert toy == tiny_tokenizer.convert_tokens_to_ids(["toy</w>"])
    assert teddy_bear == tiny_tokenizer.convert_tokens_to_ids(["teddy</w>", "bear</w>"])


@pytest.mark.parametrize("empty", ["", "   ", "\t\n"])
def test_initializer_token_ids_refuses_empty_or_whitespace(tiny_tokenizer, empty):
    with pytest.raises(UsageError, match="--initializer_token"):
        tti.initializer_token_ids(tiny_tokenizer, empty)


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(10, 6, generator=torch.Generator().manual_seed(0))


def test_initial_vectors_one_to_one_when_n_equals_k(weight):
    assert torch.equal(tti.initial_vectors(weight, [3, 7], 2), weight[[3, 7]])


def test_initial_vectors_single_vector_is_the_phrase_mean(weight):
    torch.testing.assert_close(tti.initial_vectors(weight, [1, 2, 5], 1), weight[[1, 2, 5]].mean(0, keepdim=True))


def test_initial_vectors_teddy_bear_over_four_vectors(tiny_tokenizer):
    ids = tti.initializer_token_ids(tiny_tokenizer, "teddy bear")
    w = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(0))
    teddy, bear = w[ids[0]], w[ids[1]]
    assert torch.equal(tti.initial_vectors(w, ids, 4), torch.stack([teddy, teddy, bear, bear]))


def test_initial_vectors_fewer_vectors_than_tokens_average_neighbours(weight):
    a, b, c, d = weight[[1, 2, 3, 4]]
    torch.testing.assert_close(tti.initial_vectors(weight, [1, 2, 3, 4], 2), torch.stack([(a + b) / 2, (c + d) / 2]))
    # k=3, N=2: shares [0, 2) and [1, 3) per the documented rule.
    torch.testing.assert_close(tti.initial_vectors(weight, [1, 2, 3], 2), torch.stack([(a + b) / 2, (b + c) / 2]))


def test_initial_vectors_float32_from_bf16_and_detached(weight):
    bf16 = weight.to(torch.bfloat16).requires_grad_(True)
    out = tti.initial_vectors(bf16, [1, 2], 3)
    assert out.dtype == torch.float32 and out.shape == (3, 6)
    assert not out.requires_grad and out.grad_fn is None
    before = bf16.detach().clone()
    out.add_(100)
    assert torch.equal(bf16.detach(), before)


def test_expand_placeholder():
    assert tti.expand_placeholder("a photo of <x>", "<x>", 1) == "a photo of <x>"
    assert tti.expand_placeholder("a photo of <x>", "<x>", 3) == "a photo of <x> <x>_1 <x>_2"
    assert tti.expand_placeholder("<x> and <x>", "<x>", 2) == "<x> <x>_1 and <x> <x>_1"


@pytest.fixture
def embedding() -> tti.PlaceholderEmbedding:
    gen = torch.Generator().manual_seed(0)
    frozen = torch.nn.Embedding(12, 4)
    with torch.no_grad():
        frozen.weight.copy_(torch.randn(12, 4, generator=gen))
    return tti.PlaceholderEmbedding(frozen, 7, torch.randn(3, 4, generator=gen))  # ids 7, 8, 9 are learned


def test_placeholder_embedding_forward_uses_frozen_rows_and_learned_vectors(embedding):
    ids = torch.tensor([[1, 7, 8, 9, 0, 6, 10, 11]])
    out = embedding(ids)
    frozen, vectors = embedding.frozen.weight, embedding.vectors
    expected = torch.stack([frozen[1], vectors[0], vectors[1], vectors[2], frozen[0], frozen[6], frozen[10],
                            frozen[11]]).unsqueeze(0)
    assert torch.equal(out, expected)


def test_placeholder_embedding_gradient_reaches_only_the_vectors(embedding):
    ids = torch.tensor([[1, 8, 2, 8, 6, 10]])
    upstream = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(1))
    (embedding(ids) * upstream).sum().backward()
    assert embedding.frozen.weight.grad is None
    assert [n for n, p in embedding.named_parameters() if p.requires_grad] == ["vectors"]
    grad = embedding.vectors.grad
    assert grad.shape == (3, 4)
    torch.testing.assert_close(grad[1], upstream[0, 1] + upstream[0, 3])
    assert torch.equal(grad[[0, 2]], torch.zeros(2, 4))


def test_placeholder_embedding_keeps_fp32_vectors_over_a_bf16_matrix(embedding):
    embedding.frozen.to(torch.bfloat16)
    out = embedding(torch.tensor([[1, 7]]))
    assert embedding.vectors.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(out[0, 1], embedding.vectors[0].to(torch.bfloat16))


def test_placeholder_ids_past_the_end_of_the_base_matrix():
    """The real case: the base vocabulary is not resized, the placeholder ids come right after it."""
    frozen = torch.nn.Embedding(5, 4)
    embedding = tti.PlaceholderEmbedding(frozen, 5, torch.randn(2, 4))
    out = embedding(torch.tensor([[0, 5, 4, 6]]))
    assert torch.equal(out[0], torch.stack([frozen.weight[0], embedding.vectors[0], frozen.weight[4],
                                            embedding.vectors[1]]))
    merged = embedding.merged_weight()
    assert merged.shape == (7, 4) and torch.equal(merged[:5], frozen.weight) and torch.equal(merged[5:], embedding.vectors)


def test_merged_weight_writes_the_rows_and_leaves_others_bit_identical(embedding):
    before = embedding.frozen.weight.detach().clone()
    with torch.no_grad():
        embedding.vectors.add_(1.0)
    merged = embedding.merged_weight()
    assert torch.equal(merged[7:10], embedding.vectors.detach())
    assert torch.equal(merged[:7], before[:7]) and torch.equal(merged[10:], before[10:])
    assert torch.equal(embedding.frozen.weight, before)  # the frozen matrix itself is untouched


# --------------------------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------------------------


def test_builtin_templates_have_the_paper_counts_and_one_slot_each():
    assert len(templates.imagenet_templates_small) == 27
    assert len(templates.imagenet_style_templates_small) == 19
    for t in templates.imagenet_templates_small + templates.imagenet_style_templates_small:
        assert t.count("{}") == 1 and t.count("{") == 1, t


def test_load_templates_builtin_style_and_object():
    assert tti.load_templates(None, "style") == templates.imagenet_style_templates_small
    assert tti.load_templates(None) == templates.imagenet_templates_small
    assert tti.load_templates(None, "style") is not templates.imagenet_style_templates_small  # a copy


def test_load_templates_user_file_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# my templates\n\na photo of {}\n   \n  {} on a beach  \n# {} commented\n")
    assert tti.load_templates(str(f)) == ["a photo of {}", "{} on a beach"]


def test_load_templates_names_the_line_without_slot(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# header\na photo of {}\n\na photo of nothing\n")
    with pytest.raises(UsageError, match=r"--templates .*line 4") as e:
        tti.load_templates(str(f))
    assert "a photo of nothing" in str(e.value)


@pytest.mark.parametrize("line", ["a {} next to another {}", "a {} in the style of {artist}"])
def test_user_template_is_either_refused_or_usable(tmp_path, tiny_tokenizer, line):
    f = tmp_path / "t.txt"
    f.write_text(line + "\n")
    try:
        accepted = tti.load_templates(str(f))
    except UsageError as e:
        assert "--templates" in str(e)
        return
    ids = tti.tokenize_templates(tiny_tokenizer, accepted, "<x>", 1)
    assert ids.shape == (1, tiny_tokenizer.model_max_length)


@pytest.mark.parametrize("content", ["", "# only a comment\n\n"])
def test_load_templates_refuses_a_file_without_templates(tmp_path, content):
    f = tmp_path / "t.txt"
    f.write_text(content)
    with pytest.raises(UsageError, match="--templates"):
        tti.load_templates(str(f))


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def test_list_image_files_sorted_and_skips_folders_hidden_and_other_files(tmp_path):
    for name in ["b.png", "a.JPG", "c.webp", ".hidden.png", "notes.txt", "model.safetensors"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    images, skipped = tti.list_image_files(tmp_path)
    assert [p.name for p in images] == ["a.JPG", "b.png", "c.webp"]
    assert sorted(p.name for p in skipped) == [".hidden.png", "folder.png", "model.safetensors", "notes.txt"]


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    assert image.mode == "RGB"
    return [tuple(px) for px in np.asarray(image).reshape(-1, 3).tolist()]


def test_to_rgb_grey_l():
    assert pixels(tti.to_rgb(Image.new("L", (1, 1), 77))) == [(77, 77, 77)]


def test_to_rgb_palette_without_and_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 0), 1)
    assert pixels(tti.to_rgb(image)) == [(10, 20, 30), (200, 100, 50)]
    image.info["transparency"] = 1  # index 1 is transparent: onto white
    assert pixels(tti.to_rgb(image)) == [(10, 20, 30), (255, 255, 255)]


def test_to_rgb_rgba_transparent_pixel_becomes_white():
    image = Image.new("RGBA", (2, 1))
    image.putdata([(10, 20, 30, 0), (10, 20, 30, 255)])
    assert pixels(tti.to_rgb(image)) == [(255, 255, 255), (10, 20, 30)]


def test_to_rgb_cmyk():
    image = Image.new("CMYK", (2, 1))
    image.putdata([(0, 0, 0, 0), (0, 255, 255, 0)])
    assert pixels(tti.to_rgb(image)) == [(255, 255, 255), (255, 0, 0)]


def test_to_rgb_16_bit_is_scaled_not_clipped():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    assert pixels(tti.to_rgb(image)) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_to_rgb_float_f():
    image = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert image.mode == "F"
    assert pixels(tti.to_rgb(image)) == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_prepare_image_applies_exif_orientation(tmp_path):
    # 40x20 landscape, left half red, right half blue; Orientation=6 means "rotate 90 degrees clockwise to view",
    # so upright it is 20x40 portrait with red on top and blue at the bottom.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, "JPEG", exif=exif.tobytes(), quality=95)

    with Image.open(path) as image:
        out = tti.prepare_image(image, 16, center_crop=True)
        by_hand = Image.fromarray(np.rot90(np.asarray(image.convert("RGB")), k=-1).copy())  # no EXIF on this one
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    assert torch.equal(out, tti.prepare_image(by_hand, 16, center_crop=True))
    top_left, bottom_left = out[:, 1, 1].tolist(), out[:, 14, 1].tolist()
    assert top_left[0] > 200 and top_left[2] < 60, top_left  # red on top: rotated, and clockwise
    assert bottom_left[2] > 200 and bottom_left[0] < 60, bottom_left


def test_prepare_image_center_crop_keeps_the_middle():
    array = np.zeros((10, 30, 3), dtype=np.uint8)
    array[:, :10], array[:, 10:20], array[:, 20:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    cropped = tti.prepare_image(Image.fromarray(array), 8, center_crop=True)
    squashed = tti.prepare_image(Image.fromarray(array), 8, center_crop=False)
    assert cropped.dtype == torch.uint8 and cropped.shape == squashed.shape == (3, 8, 8)
    assert torch.equal(cropped, torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    assert squashed[:, 4, 0].tolist() == [255, 0, 0] and squashed[:, 4, 7].tolist() == [0, 0, 255]


def test_load_training_images_stacks_uint8(tmp_path):
    paths = []
    for i, size in enumerate([(20, 10), (7, 9)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", size, (i * 100, 0, 0)).save(paths[-1])
    loaded = tti.load_training_images(paths, 8, center_crop=False)
    images = torch.stack(loaded.pixels)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8)
    assert images[1, 0, 0, 0] == 100
    assert loaded.original_sizes == [(10, 20), (9, 7)]  # (height, width) as found, before resizing
    assert loaded.masks is None and loaded.crops_top_left == [(0, 0), (0, 0)]


def test_load_training_images_names_a_truncated_file(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "truncated.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UsageError, match="--train_data_dir") as e:
        tti.load_training_images([good, bad], 8, False)
    assert str(bad) in str(e.value)


def test_load_training_images_names_a_zero_byte_png(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="--train_data_dir") as e:
        tti.load_training_images([empty], 8, False)
    assert str(empty) in str(e.value)


def test_load_training_images_refuses_no_images():
    with pytest.raises(UsageError, match="--train_data_dir has no images"):
        tti.load_training_images([], 8, False)


# --------------------------------------------------------------------------------------------------------------------
# Dataset and batch plan
# --------------------------------------------------------------------------------------------------------------------


def make_dataset(num_images=2, repeats=5, num_templates=5, seed=0) -> tti.TextualInversionDataset:
    template_ids = torch.arange(num_templates * 6).view(num_templates, 6)  # distinct rows
    return tti.TextualInversionDataset(num_images, template_ids, repeats, seed)


def test_dataset_len_is_images_times_repeats():
    assert len(make_dataset(num_images=3, repeats=7)) == 21


def test_dataset_same_key_gives_the_same_item():
    a, b = make_dataset(), make_dataset()
    for key in [(0, 0), (3, 7), (12, 9)]:
        x, y, z = a[key], a[key], b[key]
        assert x["image_index"] == y["image_index"] == z["image_index"] == key[1] % 2
        assert x["flip"] == y["flip"] == z["flip"]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["input_ids"], z["input_ids"])


def test_pixel_values_are_in_minus_one_to_one_and_flip_per_item():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, :, 0, 0], images[:, :, 0, 1] = 0, 255  # extremes, and no image is left-right symmetric
    pixels = tti.pixel_values(images, torch.tensor([1, 0, 1]), torch.tensor([False, False, True]))
    upright = images.float() / 127.5 - 1
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 3, 4, 4)
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert torch.equal(pixels[0], upright[1]) and torch.equal(pixels[1], upright[0])
    assert torch.equal(pixels[2], upright[1].flip(-1)) and not torch.equal(pixels[2], pixels[0])


def test_dataset_flips_and_templates_vary_independently():
    ds = make_dataset(num_images=1, repeats=200)
    seen = set()
    for index in range(200):
        item = ds[(0, index)]
        assert item["image_index"] == 0 and isinstance(item["flip"], bool)
        seen.add((int(item["input_ids"][0]) // 6, item["flip"]))
    assert {t for t, f in seen if f} == {t for t, f in seen if not f} == set(range(5))
    # And one sample is drawn afresh each epoch, not fixed by its index.
    per_epoch = {(int(ds[(epoch, 3)]["input_ids"][0]) // 6, ds[(epoch, 3)]["flip"]) for epoch in range(40)}
    assert len({t for t, _ in per_epoch}) > 1 and len({f for _, f in per_epoch}) == 2


def all_keys(batches) -> list[tuple[int, int]]:
    return [key for batch in batches for key in batch]


def test_plan_one_process_sees_every_sample_once_per_epoch():
    plan = tti.BatchPlan(num_samples=11, batch_size=3, gradient_accumulation_steps=1, num_processes=1,
                         process_index=0, seed=0)
    for epoch in range(3):
        batches = plan.epoch_batches(epoch)
        assert len(batches) == plan.batches_per_epoch == 4
        assert [len(b) for b in batches] == [3, 3, 3, 2]
        assert sorted(all_keys(batches)) == [(epoch, i) for i in range(11)]


def test_plan_two_processes_cover_every_sample_with_equal_batches():
    ranks = [tti.BatchPlan(9, 4, 1, 2, rank, seed=0) for rank in (0, 1)]
    for epoch in range(3):
        b0, b1 = (plan.epoch_batches(epoch) for plan in ranks)
        assert [len(b) for b in b0] == [len(b) for b in b1] == [4, 1]  # last global batch of 2 split evenly
        assert len(b0) == ranks[0].batches_per_epoch
        assert set(all_keys(b0)) | set(all_keys(b1)) == {(epoch, i) for i in range(9)}
        assert len(set(all_keys(b0)) & set(all_keys(b1))) <= 1  # only the padding sample may be seen twice


def test_plan_epochs_have_different_orders():
    plan = tti.BatchPlan(20, 4, 1, 1, 0, seed=0)
    orders = [[i for _, i in all_keys(plan.epoch_batches(epoch))] for epoch in range(3)]
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert all_keys(plan.epoch_batches(1)) == all_keys(tti.BatchPlan(20, 4, 1, 1, 0, seed=0).epoch_batches(1))


def test_plan_fewer_samples_than_half_the_processes_still_trains():
    ranks = [tti.BatchPlan(num_samples=1, batch_size=2, gradient_accumulation_steps=1, num_processes=3,
                           process_index=rank, seed=0) for rank in range(3)]
    assert [plan.epoch_batches(0) for plan in ranks] == [[[(0, 0)]]] * 3


def test_steps_per_epoch_with_gradient_accumulation():
    ds = make_dataset(num_images=2, repeats=5)  # 10 samples, batch 1 -> 10 micro-batches
    plan = tti.BatchPlan(len(ds), 1, 4, 1, 0, seed=0)
    assert plan.batches_per_epoch == 10 and plan.steps_per_epoch == 3
    steps = list(tti.iterate_steps(ds, plan, 0, 3, num_workers=0))
    assert [(step, len(mbs)) for step, mbs in steps] == [(0, 4), (1, 4), (2, 2)]


def micro_batches_by_step(ds, plan, first_step, max_steps):
    return {step: mbs for step, mbs in tti.iterate_steps(ds, plan, first_step, max_steps, num_workers=0)}


@pytest.mark.parametrize("first_step", [1, 2, 4])
def test_iterate_steps_resumed_matches_the_uninterrupted_run(first_step):
    ds = make_dataset(num_images=2, repeats=5)
    plan = tti.BatchPlan(len(ds), 2, 2, 1, 0, seed=3)  # 5 batches -> 3 steps per epoch, the last one short
    full = micro_batches_by_step(ds, plan, 0, 8)
    resumed = micro_batches_by_step(ds, plan, first_step, 8)
    assert list(full) == list(range(8)) and list(resumed) == list(range(first_step, 8))
    for step, mbs in resumed.items():
        assert len(mbs) == len(full[step])
        for got, want in zip(mbs, full[step]):
            for key in ("input_ids", "image_index", "flip"):
                assert torch.equal(got[key], want[key])


def test_iterate_steps_stops_before_max_train_steps():
    ds = make_dataset(num_images=2, repeats=1)
    plan = tti.BatchPlan(len(ds), 1, 1, 1, 0, seed=0)  # 2 steps per epoch
    assert [step for step, _ in tti.iterate_steps(ds, plan, 0, 5, 0)] == [0, 1, 2, 3, 4]
    assert list(tti.iterate_steps(ds, plan, 5, 5, 0)) == []
    assert list(tti.iterate_steps(ds, plan, 7, 5, 0)) == []


def test_scaled_learning_rate():
    assert tti.scaled_learning_rate(5e-3, 1, 4, 2) == pytest.approx(0.04, rel=1e-12)  # the paper's number
    assert tti.scaled_learning_rate(1e-4, 4, 16, 1) == pytest.approx(6.4e-3, rel=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints and saving
# --------------------------------------------------------------------------------------------------------------------


def make_checkpoint_dirs(root: Path, names, complete=True):
    for name in names:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "training_state.json").write_text("{}")


def test_list_checkpoints_numeric_order_and_only_complete_ones(tmp_path):
    make_checkpoint_dirs(tmp_path, ["checkpoint-9", "checkpoint-10", "checkpoint-2", ".checkpoint-11.tmp",
                                    "checkpoint-x", "checkpoints-12", "checkpoint-"])
    make_checkpoint_dirs(tmp_path, ["checkpoint-5"], complete=False)
    assert tti.list_checkpoints(tmp_path) == [(n, tmp_path / f"checkpoint-{n}") for n in (2, 9, 10)]
    assert tti.list_checkpoints(tmp_path / "missing") == []


def test_checkpoints_to_remove_keeps_limit_including_the_new_one():
    cps = [(n, Path(f"checkpoint-{n}")) for n in (1, 2, 3)]
    assert tti.checkpoints_to_remove(cps, None) == []
    assert tti.checkpoints_to_remove(cps, 4) == []
    assert tti.checkpoints_to_remove(cps, 3) == [Path("checkpoint-1")]
    assert tti.checkpoints_to_remove(cps, 2) == [Path("checkpoint-1"), Path("checkpoint-2")]
    assert tti.checkpoints_to_remove(cps, 1) == [p for _, p in cps]


def test_resolve_resume_checkpoint(tmp_path):
    assert tti.resolve_resume_checkpoint(None, tmp_path) is None
    assert tti.resolve_resume_checkpoint("latest", tmp_path) is None
    make_checkpoint_dirs(tmp_path, ["checkpoint-9", "checkpoint-10"])
    make_checkpoint_dirs(tmp_path, ["checkpoint-11"], complete=False)
    assert tti.resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert tti.resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path) == tmp_path / "checkpoint-9"
    # diffusers' form: a bare name, looked up in --output_dir (here from another working directory)
    assert tti.resolve_resume_checkpoint("checkpoint-9", tmp_path) == tmp_path / "checkpoint-9"
    assert not tti.resolve_resume_checkpoint("checkpoint-8", tmp_path).is_dir()


def test_validation_epochs_converts_as_diffusers_does(caplog):
    assert tti.validation_every(100, None, 400) == 100
    with caplog.at_level("WARNING", logger="textual_inversion"):
        assert tti.validation_every(100, 2, 400) == 800  # epochs x images x repeats, --validation_steps overridden
    assert "--validation_epochs is deprecated" in caplog.text and "--validation_steps 800" in caplog.text


def test_save_learned_embeds_safetensors_round_trip(tmp_path):
    vectors = torch.randn(2, 8).to(torch.bfloat16)
    path = tmp_path / "learned_embeds.safetensors"
    tti.save_learned_embeds({"<x>": vectors}, path, metadata={"step": "7"})
    loaded = safetensors.torch.load_file(str(path))
    assert list(loaded) == ["<x>"]
    assert loaded["<x>"].dtype == torch.float32 and torch.equal(loaded["<x>"], vectors.float())
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_learned_embeds_bin_round_trip(tmp_path):
    vectors = torch.randn(3, 8)
    path = tmp_path / "learned_embeds.bin"
    tti.save_learned_embeds({"<x>": vectors}, path, safe_serialization=False)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["<x>"] and torch.equal(loaded["<x>"], vectors)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # torch's legacy format, not a zip: AUTOMATIC1111's safe unpickler refuses torch >= 2.1's zip entries
    import zipfile

    assert not zipfile.is_zipfile(path)


IDENTITY = {"placeholder_token": "<x>", "num_vectors": 2, "pretrained_model_name_or_path": "some/model"}
RUN = {**IDENTITY, "seed": 0}  # what main() records besides the identity
STATE = {"optimizer": {}, "lr_scheduler": {}}


def optimizer_state(vectors: torch.nn.Parameter) -> dict:
    optimizer = torch.optim.AdamW([vectors], lr=0.1)
    vectors.grad = torch.ones_like(vectors)
    optimizer.step()
    return {"optimizer": optimizer.state_dict(), "lr_scheduler": {"last_epoch": 3}, "scaler": None}


def test_save_and_load_checkpoint_round_trip(tmp_path):
    vectors = torch.nn.Parameter(torch.randn(2, 8))
    state = optimizer_state(vectors)
    path = tti.save_checkpoint(tmp_path, 4, {"<x>": vectors}, state, {**IDENTITY, "seed": 11}, total_limit=None)
    assert path == tmp_path / "checkpoint-4"
    training_state, loaded_embeds, loaded_state = tti.load_checkpoint(path, IDENTITY)
    assert training_state == {**IDENTITY, "seed": 11, "step": 4}
    assert list(loaded_embeds) == ["<x>"] and torch.equal(loaded_embeds["<x>"], vectors.detach())
    assert torch.equal(loaded_state["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded_state["lr_scheduler"] == {"last_epoch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]  # no hidden temp folder left


def test_save_checkpoint_prunes_to_total_limit(tmp_path):
    vectors = torch.zeros(2, 8)
    for step in (1, 2, 3, 4):
        tti.save_checkpoint(tmp_path, step, {"<x>": vectors + step}, STATE, RUN, total_limit=2)
    assert [n for n, _ in tti.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert torch.equal(tti.load_checkpoint(tmp_path / "checkpoint-4", IDENTITY)[1]["<x>"], vectors + 4)


@pytest.mark.parametrize("key", sorted(IDENTITY))
def test_load_checkpoint_refuses_another_run(tmp_path, key):
    path = tti.save_checkpoint(tmp_path, 1, {"<x>": torch.zeros(2, 8)}, STATE, RUN, total_limit=None)
    other = {**IDENTITY, key: {"placeholder_token": "<y>", "num_vectors": 3}.get(key, "other/model")}
    with pytest.raises(UsageError, match=f"--resume_from_checkpoint .*{key}=") as e:
        tti.load_checkpoint(path, other)
    assert repr(other[key]) in str(e.value)


def test_load_checkpoint_refuses_a_folder_that_is_no_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="--resume_from_checkpoint"):
        tti.load_checkpoint(tmp_path, IDENTITY)


def test_load_checkpoint_refuses_a_corrupt_embeds_file(tmp_path):
    path = tti.save_checkpoint(tmp_path, 1, {"<x>": torch.zeros(2, 8)}, STATE, RUN, total_limit=None)
    (path / "learned_embeds.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="--resume_from_checkpoint"):
        tti.load_checkpoint(path, IDENTITY)


# --------------------------------------------------------------------------------------------------------------------
# Diffusion target
# --------------------------------------------------------------------------------------------------------------------


def target_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 900])


def test_diffusion_target_epsilon_is_the_noise():
    from diffusers import DDPMScheduler

    latents, noise, timesteps = target_inputs()
    assert torch.equal(tti.diffusion_target(DDPMScheduler(prediction_type="epsilon"), latents, noise, timesteps), noise)


def test_diffusion_target_v_prediction_is_the_velocity():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise, timesteps = target_inputs()
    target = tti.diffusion_target(scheduler, latents, noise, timesteps)
    assert torch.equal(target, scheduler.get_velocity(latents, noise, timesteps))
    assert not torch.allclose(target, noise)


def test_diffusion_target_refuses_sample_prediction():
    from diffusers import DDPMScheduler

    with pytest.raises(UsageError, match="prediction_type 'sample'"):
        tti.diffusion_target(DDPMScheduler(prediction_type="sample"), *target_inputs())


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def required(tmp_path) -> list[str]:
    return ["--pretrained_model_name_or_path", "some-org/some-model", "--train_data_dir", str(tmp_path),
            "--placeholder_token", "<x>", "--initializer_token", "toy"]


def test_parse_args_defaults_match_diffusers_example(required):
    args = tti.parse_args(required)
    expected = dict(train_batch_size=16, max_train_steps=5000, learning_rate=1e-4, lr_scheduler="constant",
                    lr_warmup_steps=500, repeats=100, resolution=512, adam_weight_decay=1e-2, save_steps=500,
                    checkpointing_steps=500, num_vectors=1, output_dir="text-inversion-model", report_to="tensorboard",
                    validation_steps=100, num_validation_images=4, logging_dir="logs", mixed_precision="no",
                    learnable_property="object", gradient_accumulation_steps=1, adam_beta1=0.9, adam_beta2=0.999,
                    adam_epsilon=1e-8, lr_num_cycles=1, num_train_epochs=100, center_crop=False, scale_lr=False,
                    checkpoints_total_limit=None, resume_from_checkpoint=None, seed=None, templates=None)
    assert {k: getattr(args, k) for k in expected} == expected


def test_validate_args_accepts_a_good_command_line(required):
    assert tti.validate_args(tti.build_parser().parse_args(required)) is None


@pytest.mark.parametrize("flag, value", [("--num_vectors", "0"), ("--lr_warmup_steps", "-1"),
                                         ("--checkpoints_total_limit", "0"), ("--learning_rate", "0"),
                                         ("--learning_rate", "nan")])
def test_validate_args_names_the_bad_flag(required, flag, value):
    assert flag in tti.validate_args(tti.build_parser().parse_args([*required, flag, value]))


@pytest.mark.parametrize("flag, value", [("--adam_beta1", "1.5"), ("--adam_epsilon", "-1"),
                                         ("--adam_weight_decay", "-0.1")])
def test_validate_args_checks_adam_hyperparameters(required, flag, value):
    problem = tti.validate_args(tti.build_parser().parse_args([*required, flag, value]))
    assert problem is not None and flag in problem


def test_validate_args_refuses_an_unknown_report_to(required):
    problem = tti.validate_args(tti.build_parser().parse_args([*required, "--report_to", "foo"]))
    assert problem is not None and "--report_to" in problem


def test_validate_args_refuses_a_missing_relative_model_folder(required, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    required[1] = "./does-not-exist"
    problem = tti.validate_args(tti.build_parser().parse_args(required))
    assert problem is not None and "--pretrained_model_name_or_path" in problem


def test_load_checkpoint_refuses_a_corrupt_optimizer_state(tmp_path):
    path = tti.save_checkpoint(tmp_path, 1, {"<x>": torch.zeros(2, 8)}, STATE, RUN, total_limit=None)
    (path / "optimizer.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UsageError, match="--resume_from_checkpoint .*cannot be loaded"):
        tti.load_checkpoint(path, IDENTITY)


def test_images_smaller_than_the_resolution_are_named_in_a_warning(tmp_path, caplog):
    from PIL import Image

    Image.new("RGB", (20, 30), "red").save(tmp_path / "small.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "big.png")
    with caplog.at_level("WARNING", logger="textual_inversion"):
        images = tti.load_training_images(sorted(tmp_path.iterdir()), 32, center_crop=False)
    assert [tuple(p.shape) for p in images.pixels] == [(3, 32, 32)] * 2
    assert "small.png is 20x30" in caplog.text and "big.png" not in caplog.text


def test_pruning_never_leaves_a_half_deleted_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    """A kill while an old checkpoint is being deleted: whatever rmtree managed, `latest` must not pick it."""
    make_checkpoint_dirs(tmp_path, ["checkpoint-1", "checkpoint-2"])
    (tmp_path / "checkpoint-1" / "learned_embeds.safetensors").write_bytes(b"x")

    rmtree = tti.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file of the pruned checkpoint, then the process "dies"
        if "checkpoint-1" not in str(path) or not Path(path).exists():
            return rmtree(path, *args, **kwargs)
        next(p for p in Path(path).iterdir() if p.name != "training_state.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(tti.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        tti.save_checkpoint(tmp_path, 3, {"<x>": torch.zeros(1, 4)}, {"optimizer": {}, "lr_scheduler": {}},
                            {"seed": 0}, total_limit=2)
    assert [n for n, _ in tti.list_checkpoints(tmp_path)] == [2, 3]  # checkpoint-1 is out of sight, not half there
