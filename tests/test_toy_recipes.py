"""The toy world's concept folders (images, captions, masks), evaluate.py's --concept and the recipes driver; no
training and no sampling here (a few seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy_world"
CONCEPT_DIR = ROOT / "examples" / "toy_concept"
sys.path[:0] = [str(TOY)]

import world  # noqa: E402

import train_textual_inversion as tti  # noqa: E402


def _render_pair(attrs, seed):
    rng = np.random.default_rng(seed)
    image, mask = world.render_with_mask(attrs, rng)
    return image, mask, rng


@pytest.mark.parametrize("seed", range(12))
def test_render_with_mask_draws_render_s_image_and_the_object_s_coverage(seed):
    attrs = world.random_attributes(np.random.default_rng(100 + seed), allow_held_out=True)
    image, mask, rng = _render_pair(attrs, seed)
    reference_rng = np.random.default_rng(seed)
    assert np.array_equal(image, world.render(attrs, reference_rng))  # render() unchanged, same jitter
    assert rng.random() == reference_rng.random()  # and the generator left in the same state
    assert mask.shape == (world.RESOLUTION, world.RESOLUTION) and mask.dtype == np.uint8
    assert mask.max() == 255 and (mask == 0).any() and ((mask > 0) & (mask < 255)).any()  # anti-aliased edge

    # The same object on another background (the jitter draws do not depend on the background's name): pixels
    # the mask gives wholly to the object do not change, pixels it gives wholly to the background all change, and
    # mask > 0 exactly where the object reaches. The background is one flat colour wherever the mask is 0.
    other = dict(attrs, background="black" if attrs["background"] != "black" else "white")
    image2, mask2, _ = _render_pair(other, seed)
    assert np.array_equal(mask, mask2)
    changed = (image != image2).any(axis=-1)
    assert not changed[mask == 255].any()
    assert changed[mask == 0].all()
    assert changed[(mask > 0) & (mask < 255)].mean() > 0.9  # partial pixels blend both (a few may round alike)
    background_pixels = image[mask == 0]
    assert (background_pixels == background_pixels[0]).all()
    # A small object covers less.
    small, small_mask, _ = _render_pair(dict(attrs, size="small"), seed)
    large_mask = _render_pair(dict(attrs, size="large"), seed)[1]
    assert small_mask.astype(int).sum() < large_mask.astype(int).sum()


def test_render_is_unchanged_by_the_mask_code():
    """The world draws what it drew before render_with_mask existed (the pretrained pipeline and the judge were made
    from it): the digest was taken with world.py as committed before the mask code."""
    import hashlib

    from PIL import Image

    images, _ = world.sample(64, seed=0)
    concept, _ = world.concept_images()
    held, _ = world.sample(32, seed=5, allow_held_out=True)
    digest = hashlib.sha256(images.tobytes() + concept.tobytes() + held.tobytes()).hexdigest()
    assert digest == "7de924283ad9c7ff353a3c704506d4e808848dd9895b17d0c556ddcf8060aa98"
    files = sorted(CONCEPT_DIR.glob("*.png"))
    assert np.array_equal(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), concept)


def test_concept_writer_reproduces_toy_concept_with_captions_and_masks(tmp_path):
    from PIL import Image

    paths = world.write_concept(tmp_path)
    assert [p.name for p in paths] == sorted(p.name for p in CONCEPT_DIR.glob("*.png"))
    for path in paths:
        stem = path.stem
        background = stem.split("_", 1)[1]
        assert path.read_bytes() == (CONCEPT_DIR / path.name).read_bytes()  # the images, byte for byte
        caption = (tmp_path / f"{stem}.txt").read_text()
        assert caption == f"large {{}} on a {background} background\n"
        assert (CONCEPT_DIR / f"{stem}.txt").read_text() == caption  # the committed captions match
        whole = (tmp_path / f"{stem}.caption").read_text()
        assert whole == f"a photo of a large {{}} on a {background} background\n"
        assert (CONCEPT_DIR / f"{stem}.caption").read_text() == whole
        mask_file = tmp_path / "masks" / f"{stem}.png"
        assert mask_file.read_bytes() == (CONCEPT_DIR / "masks" / f"{stem}.png").read_bytes()
        with Image.open(mask_file) as mask_image:
            assert mask_image.mode == "L" and mask_image.size == (world.RESOLUTION, world.RESOLUTION)
            mask = np.asarray(mask_image)
        with Image.open(path) as image_file:
            image = np.asarray(image_file.convert("RGB"))
        background_pixels = image[mask == 0]
        assert len(background_pixels) > 100 and (background_pixels == background_pixels[0]).all()
        assert 0.15 < (mask == 255).mean() < 0.7  # a large triangle: about a fifth of the image
    images, masks, attrs = world.concept_examples()
    assert [a["background"] for a in attrs] == list(world.CONCEPT_BACKGROUNDS)
    assert masks.shape == images.shape[:3]


def test_concept_writer_for_another_concept_and_make_concept_cli(tmp_path):
    from PIL import Image

    import make_concept

    concept = {"shape": "square", "colour": "red", "pattern": "dotted"}
    assert make_concept.main(["--out", str(tmp_path / "a"), "--concept", "shape=square,colour=red,pattern=dotted"]) == 0
    images, masks, attrs = world.concept_examples(concept)
    assert all(a["size"] == "large" and a["shape"] == "square" for a in attrs)
    for i, a in enumerate(attrs):
        stem = f"{i}_{a['background']}"
        with Image.open(tmp_path / "a" / f"{stem}.png") as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), images[i])
        with Image.open(tmp_path / "a" / "masks" / f"{stem}.png") as mask:
            assert np.array_equal(np.asarray(mask), masks[i])
    # Same jitter as the held-out concept's images: the same places, another object.
    held_images, held_masks, _ = world.concept_examples()
    assert not np.array_equal(images, held_images)
    # Captions and masks only, for a folder whose images exist.
    assert make_concept.main(["--out", str(tmp_path / "b"), "--no_images"]) == 0
    assert not list((tmp_path / "b").glob("*.png")) and len(list((tmp_path / "b").glob("*.txt"))) == 5
    with pytest.raises(SystemExit):
        make_concept.main(["--out", str(tmp_path / "c"), "--concept", "shape=hexagon,colour=red,pattern=plain"])
    with pytest.raises(ValueError, match="shape"):
        world.write_concept(tmp_path / "d", {"shape": "hexagon", "colour": "red", "pattern": "plain"})


def test_evaluate_parses_concept_and_words(capsys):
    import evaluate as ev

    assert ev.parse_concept("shape=triangle,colour=purple,pattern=striped") == world.HELD_OUT
    assert ev.parse_concept(" pattern=dotted, shape=square ,colour=red") == {
        "shape": "square", "colour": "red", "pattern": "dotted"}
    for bad, reason in [("shape=triangle,colour=purple", "missing pattern"),
                        ("shape=hexagon,colour=purple,pattern=striped", "hexagon"),
                        ("shape=triangle,colour=purple,pattern=striped,size=large", "size"),
                        ("shape=triangle,shape=circle,colour=red,pattern=plain", "twice"),
                        ("triangle", "name=value")]:
        with pytest.raises(ValueError, match=reason):
            ev.parse_concept(bad)
    assert ev.format_concept(world.HELD_OUT) == "shape=triangle,colour=purple,pattern=striped"
    assert world.concept_words(world.HELD_OUT) == "purple striped triangle"
    assert world.concept_name(world.HELD_OUT) == "purple_striped_triangle"
    with pytest.raises(SystemExit):
        ev.main(["--output_json", "x.json", "--learned_embeds", "x", "--concept", "shape=blob"])
    assert "--concept" in capsys.readouterr().err


def test_recipes_driver_commands_and_report(tmp_path, capsys):
    import evaluate as ev
    import recipes

    # The driver's copy of the edits' templates is evaluate.py's.
    assert [(e["name"], e["template"]) for e in ev.edits()] == recipes.edit_names()
    assert recipes.parse_concept("red_dotted_square") == recipes.parse_concept("shape=square,colour=red,pattern=dotted")
    assert recipes.parse_concept("held_out") == world.HELD_OUT
    names = [world.concept_name(c) for c in recipes.DEFAULT_CONCEPTS]
    assert len(set(names)) == 4
    for name, values in zip(("shape", "colour", "pattern"), zip(*[(c["shape"], c["colour"], c["pattern"])
                                                                   for c in recipes.DEFAULT_CONCEPTS])):
        assert len(set(values)) == 4, (name, values)  # the concepts differ in every attribute
    concept_dir = tmp_path / "c"
    assert recipes.recipe_flags("templates", concept_dir) == ["--templates", str(recipes.TEMPLATES)]
    assert recipes.recipe_flags("captions", concept_dir) == ["--templates", str(recipes.CAPTION_TEMPLATES),
                                                             "--caption_extension", ".txt"]
    # The object-only masked loss, said out loud now that the trainer's default with masks holds the background.
    assert recipes.recipe_flags("masks", concept_dir)[-4:] == ["--mask_dir", str(concept_dir / "masks"),
                                                               "--masked_prior_preservation_weight", "0"]
    both = recipes.recipe_flags("both", concept_dir)
    assert "--caption_extension" in both and "--mask_dir" in both
    prior_weights = {"masks-held": 0.0, "masks-prior": 1.0, "whole": None, "whole-masks": 0.0, "whole-prior": 1.0,
                     "whole-dropout": None}
    for recipe, prior in prior_weights.items():  # the masks, and flags the trainer parses (a --no- flag included)
        flags = recipes.recipe_flags(recipe, concept_dir)
        assert recipes.missing_trainer_flags(recipe) == []
        parsed = tti.build_parser().parse_args(["--pretrained_model_name_or_path", "p", "--train_data_dir", "d",
                                                "--placeholder_token", "<t>", "--initializer_token", "toy", *flags])
        assert parsed.mask_dir == (None if prior is None else str(concept_dir / "masks"))
        assert parsed.masked_prior_preservation_weight == prior
    assert parsed.caption_extension == ".caption" and parsed.caption_dropout_rate == 0.5  # whole-dropout
    templates = [line for line in recipes.CAPTION_TEMPLATES.read_text().splitlines() if not line.startswith("#")]
    assert templates == [f"{prefix} {{caption}}" for prefix in world.PREFIXES]

    # The training command holds make demo's training flags (the Makefile's demo target).
    args = recipes.build_parser().parse_args(["--out_dir", str(tmp_path)])
    command = recipes.train_command(args, "templates", world.HELD_OUT, concept_dir, 2, tmp_path / "run")
    pairs = dict(zip(command[2::2], command[3::2]))
    assert pairs["--num_vectors"] == "2" and pairs["--max_train_steps"] == "200" and pairs["--seed"] == "2"
    assert pairs["--learning_rate"] == "1e-2" and pairs["--train_batch_size"] == "4" and pairs["--resolution"] == "32"
    assert pairs["--initializer_token"] == "triangle" and pairs["--report_to"] == "none"
    assert "--validation_prompt" not in command
    evaluation = recipes.eval_command(args, {"shape": "cross", "colour": "orange", "pattern": "plain"}, concept_dir,
                                      tmp_path / "run")
    assert "--words" in evaluation and "shape=cross,colour=orange,pattern=plain" in evaluation

    # A dry run prints the commands and runs nothing.
    assert recipes.main(["--out_dir", str(tmp_path), "--dry_run", "--seeds", "0", "--concepts", "held_out"]) == 0
    assert "--mask_dir" in capsys.readouterr().out and not (tmp_path / "runs").exists()

    # The report from finished cells (fake eval.json files), and resuming skips them.
    for recipe, seed, learned in [("templates", 0, 0.9), ("templates", 1, 0.7), ("masks", 0, 1.0)]:
        out = recipes.run_dir(tmp_path, recipe, world.HELD_OUT, seed)
        out.mkdir(parents=True)
        placeholder = recipes.PLACEHOLDER
        (out / "eval.json").write_text(json.dumps({
            "reconstruction": {"learned": learned, "initializer": 0.0, "random": 0.0, "words": 0.5},
            "editability": {"learned": learned / 2, "initializer": 0.0, "random": 0.0, "words": 0.25},
            "per_prompt": {f"a photo of a {placeholder} on a pink background": {"score": learned},
                           f"a photo of a small {placeholder}": {"score": 0.0}},
            "concept": world.HELD_OUT, "settings": {"num_images": 32, "placeholder": placeholder}}))
        (out / "timing.json").write_text(json.dumps({"train_s": 10.0, "eval_s": 40.0}))
    assert recipes.main(["--out_dir", str(tmp_path), "--recipes", "templates", "--seeds", "0", "1",
                         "--concepts", "held_out"]) == 0
    assert "2 done already, 0 to run" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["cells"]) == 3
    row = next(r for r in results["summary"]["rows"] if r["recipe"] == "templates")
    assert row["reconstruction"]["mean"] == pytest.approx(0.8)
    assert row["reconstruction"]["learned_over_words"] == pytest.approx(1.6)
    assert row["learned_edits_mean"]["background=pink"] == pytest.approx(0.8)
    table = (tmp_path / "results.md").read_text()
    assert "| templates | purple striped triangle | 0.900 | 0.700 | **0.800** | 0.500 | 1.600 |" in table
    assert "| masks | purple striped triangle | 1.000 |  | **1.000** |" in table


@pytest.fixture
def one_thread():
    """Tiny tensors: on a busy machine, 2+ threads are ~100 times slower here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_evaluate_subjects_do_not_change_each_other(monkeypatch, one_thread):
    """Judging only the learned word gives the learned word's images of a fuller evaluation: every prompt draws from
    the same seeded noises (what lets recipes.py judge the baselines once per concept). Tiny: 1 image, 1 step."""
    import torch

    import evaluate as ev
    import judge as judge_lib

    pipeline = ev.load_pipeline(TOY / "pipeline")
    pipeline.load_textual_inversion([torch.randn(2, pipeline.text_encoder.config.hidden_size,
                                                 generator=torch.Generator().manual_seed(0))], token=["<toy-concept>"])
    judge = judge_lib.load_judge()
    real_draw = ev.draw
    blank = world.render({**world.HELD_OUT, "size": "large", "background": "white"}, np.random.default_rng(0))

    # Without `words` and `subjects`, the summary is what it always was (images stubbed: only the keys matter here).
    monkeypatch.setattr(ev, "draw", lambda *args, **kwargs: [__import__("PIL.Image").Image.fromarray(blank)])
    plain = ev.evaluate(pipeline, judge, "<toy-concept>", "triangle", world.HELD_OUT, [], num_images=1, num_vectors=2)
    assert set(plain["reconstruction"]) == set(plain["editability"]) == {"learned", "initializer", "random"}
    assert "words" not in plain["settings"] and "subjects" not in plain["settings"]

    drawn = []

    def recording_draw(pipe, prompt, *args, **kwargs):
        images = real_draw(pipe, prompt, *args, **kwargs)
        drawn.append((prompt, np.stack([np.asarray(i) for i in images])))
        return images

    monkeypatch.setattr(ev, "draw", recording_draw)
    common = dict(num_images=1, seed=0, steps=1, num_vectors=2, words="purple striped triangle")
    full = ev.evaluate(pipeline, judge, "<toy-concept>", "triangle", world.HELD_OUT, [],
                       subjects=["learned", "initializer", "words"], **common)
    full_images = dict(drawn)
    drawn.clear()
    learned = ev.evaluate(pipeline, judge, "<toy-concept>", "triangle", world.HELD_OUT, [], subjects=["learned"],
                          **common)
    assert set(full["reconstruction"]) == {"learned", "initializer", "words"}
    assert set(learned["reconstruction"]) == {"learned"} and learned["settings"]["subjects"] == ["learned"]
    assert [p for p, _ in drawn] == [p for p in full_images if "<toy-concept>" in p]
    for prompt, images in drawn:
        assert np.array_equal(images, full_images[prompt]), prompt
    assert learned["reconstruction"]["learned"] == full["reconstruction"]["learned"]
    assert "a photo of a purple striped triangle" in full["per_prompt"]
    with pytest.raises(ValueError, match="subjects"):
        ev.evaluate(pipeline, judge, "<toy-concept>", "triangle", world.HELD_OUT, [], subjects=["words"], num_images=1)
