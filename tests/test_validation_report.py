"""validation_report.py: CLIP scores on a tiny random CLIP, and report.png drawn from synthetic report.json content.

`write_example(path)` draws the realistic example (10 validations, 3 prompts x 4 images of 32 px):
    OMP_NUM_THREADS=1 .venv/bin/python -c "import sys; sys.path[:0] = ['.', 'tests']; \
        from test_validation_report import write_example; write_example('/tmp/report_example.png')"
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import validation_report as vr

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a <cat-toy>", "a photo of a <cat-toy> on a pink background", "a photo of a small <cat-toy>"]


# ---- A tiny random CLIP ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A CLIPModel with 2-layer, 32-wide towers on 32 px images, saved with its processor (the real CLIP tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "examples" / "toy_world" / "pipeline" / "tokenizer")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(clip_folder) -> vr.ClipScorer:
    return vr.ClipScorer(str(clip_folder))


def blobs(seed: int, n: int, color: tuple[int, int, int], size: int = 32) -> list[Image.Image]:
    """n images of one kind: a coloured disc on a noisy background; `seed` varies the noise and the disc's place."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.3) ** 2
        pixels = rng.normal(128, 25, (size, size, 3))
        pixels[disc] = np.array(color) + rng.normal(0, 10, (disc.sum(), 3))
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    return images


def test_features_are_normalised_and_deterministic(scorer, clip_folder):
    images = blobs(0, 5, (230, 120, 40))
    features = scorer.image_features(images)
    assert features.shape == (5, 16) and features.dtype == torch.float32 and features.device.type == "cpu"
    assert torch.allclose(features.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.equal(features, scorer.image_features(images))
    # Batching does not change a feature, and a second load of the folder gives the same model.
    assert torch.allclose(vr.ClipScorer(str(clip_folder), batch_size=2).image_features(images), features, atol=1e-5)
    texts = scorer.text_features(["a photo of a cat", "a photo of a dog"])
    assert texts.shape == (2, 16) and torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(texts[0], texts[1])
    assert scorer.image_features([]).shape == (0, 16)


def test_long_text_is_truncated_not_an_error(scorer):
    assert scorer.text_features(["a photo of a cat " * 60]).shape == (1, 16)


def test_mean_cosine():
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert vr.mean_cosine(a[:1], a[:1]) == pytest.approx(1.0)
    assert vr.mean_cosine(a, a) == pytest.approx(float((a @ a.T).mean()))
    assert vr.mean_cosine(a[:1], -a[:1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        vr.mean_cosine(a[:0], a)


def test_identical_images_give_cosine_one(scorer):
    image = blobs(1, 1, (40, 90, 200))
    assert vr.mean_cosine(scorer.image_features(image * 3), scorer.image_features(image)) == pytest.approx(1.0)


@pytest.mark.parametrize("prompt, names, expected", [
    ("a photo of a <S*> on a pink background", ["<S*>"], "a photo of a on a pink background"),
    ("a photo of a <S*>", ["<S*>"], "a photo of a"),
    ("<S*> in the snow", ["<S*>"], "in the snow"),
    ("a photo of a <S*> <S*>_1 <S*>_2 at the beach", ["<S*>", "<S*>_1", "<S*>_2"], "a photo of a at the beach"),
    ("a photo of a <S*>_1 <S*>", ["<S*>", "<S*>_1"], "a photo of a"),  # longest first: no "_1" left over
    ("a painting of a dog", ["<S*>"], "a painting of a dog"),
    ("  a  <cat-toy>   toy ", ["<cat-toy>"], "a toy"),
])
def test_without_placeholder(prompt, names, expected):
    assert vr.without_placeholder(prompt, names) == expected


class StubScorer:
    """Image features from each image's mean colour, text features from a fixed table: exact expected scores."""

    def __init__(self, texts: dict[str, list[float]]):
        self.texts = texts
        self.asked: list[str] = []

    def image_features(self, images):
        rows = torch.tensor(np.array([np.asarray(i, dtype=np.float32).mean((0, 1)) for i in images])).reshape(-1, 3)
        return torch.nn.functional.normalize(rows, dim=-1)

    def text_features(self, texts):
        self.asked += texts
        rows = torch.tensor([self.texts[t] for t in texts], dtype=torch.float32).reshape(-1, 3)
        return torch.nn.functional.normalize(rows, dim=-1)


def solid(*colors) -> list[Image.Image]:
    return [Image.new("RGB", (4, 4), c) for c in colors]


def test_clip_scores_arithmetic():
    stub = StubScorer({"a photo of a on a pink background": [1, 0, 0], "a photo of a small": [0, 0, 1]})
    scores = vr.clip_scores(stub, solid((255, 0, 0)), [
        ("a photo of a <S*>", solid((255, 0, 0), (0, 255, 0))),  # cosines 1 and 0 with the red reference
        ("a photo of a <S*> on a pink background", solid((255, 0, 0))),  # 1 with its text
        ("a photo of a small <S*>", solid((255, 0, 0), (0, 0, 255))),  # 0 and 1
    ], ["<S*>"])
    assert scores["clip_i"] == pytest.approx(0.5)
    assert scores["clip_t_per_prompt"] == {"a photo of a <S*> on a pink background": pytest.approx(1.0),
                                           "a photo of a small <S*>": pytest.approx(0.5)}
    assert scores["clip_t"] == pytest.approx(0.75)
    assert stub.asked == ["a photo of a on a pink background", "a photo of a small"]
    # Precomputed reference features give the same scores.
    again = vr.clip_scores(stub, stub.image_features(solid((255, 0, 0))), [("a photo of a <S*>", solid((255, 0, 0)))],
                           ["<S*>"])
    assert again == {"clip_i": pytest.approx(1.0), "clip_t": None, "clip_t_per_prompt": {}}


def test_clip_scores_on_a_real_clip(scorer):
    reference, others = blobs(2, 4, (230, 120, 40)), blobs(3, 4, (20, 200, 230))
    edit = [("a photo of a <S*> on a pink background", blobs(4, 2, (250, 160, 200))),
            ("a photo of a small <S*>", blobs(5, 2, (230, 120, 40), size=48))]
    same = vr.clip_scores(scorer, reference, [("a photo of a <S*>", reference), *edit], ["<S*>"])
    other = vr.clip_scores(scorer, reference, [("a photo of a <S*>", others), *edit], ["<S*>"])
    assert set(same) == {"clip_i", "clip_t", "clip_t_per_prompt"}
    for value in [same["clip_i"], same["clip_t"], *same["clip_t_per_prompt"].values(), other["clip_i"]]:
        assert -1.0 <= value <= 1.0
    assert list(same["clip_t_per_prompt"]) == [p for p, _ in edit]
    # CLIP-I compares the reconstruction images with the reference: the reference itself scores higher than images
    # of another kind. The edit prompts are the same on both sides, so CLIP-T is too.
    assert same["clip_i"] > other["clip_i"]
    assert same["clip_t"] == pytest.approx(other["clip_t"], abs=1e-6)
    # Swapping which images follow the reconstruction prompt changes CLIP-I, not CLIP-T.
    swapped = vr.clip_scores(scorer, reference, [("a photo of a <S*>", edit[0][1]), *edit], ["<S*>"])
    assert swapped["clip_i"] != pytest.approx(same["clip_i"], abs=1e-4)


# ---- rows_to_show ----------------------------------------------------------------------------------------------------
def test_rows_to_show_keeps_everything_under_the_limit():
    assert vr.rows_to_show([300, 100, 200], 200, 20) == [100, 200, 300]
    assert vr.rows_to_show([], None, 20) == []


@pytest.mark.parametrize("best", [100, 3700, 4100, 9900, 10000, None, 555])
def test_rows_to_show_subsamples_evenly_with_first_best_last(best):
    steps = list(range(100, 10001, 100))  # 100 validations
    shown = vr.rows_to_show(steps, best, 20)
    assert len(shown) == 20 and shown == sorted(set(shown)) and set(shown) <= set(steps)
    assert shown[0] == 100 and shown[-1] == 10000
    if best in steps:
        assert best in shown
    gaps = np.diff(shown)
    assert gaps.max() <= 2 * (len(steps) - 1) / 19 * 100 + 100  # evenly spread, give or take the swapped-in best


def test_rows_to_show_tiny_limits():
    steps = list(range(10))
    assert vr.rows_to_show(steps, 4, 1) == [4]
    assert vr.rows_to_show(steps, 4, 2) == [4, 9]
    assert vr.rows_to_show(steps, None, 2) == [0, 9]
    assert vr.rows_to_show(steps, 4, 3) == [0, 4, 9]


# ---- The report picture ----------------------------------------------------------------------------------------------
def cell_color(index: int, prompt: int) -> tuple[int, int, int]:
    """A colour per (validation, prompt), distinct from every colour the report draws with."""
    return (10 + 4 * index % 240, 30 + 60 * prompt, 250 - 3 * index % 200)


def write_grid(path: Path, colors: list[tuple[int, int, int]], cols: int, cell: int) -> None:
    """A validation grid: one row per prompt, each row's cells one flat colour."""
    grid = Image.new("RGB", (cols * cell, len(colors) * cell))
    for r, color in enumerate(colors):
        grid.paste(Image.new("RGB", (cols * cell, cell), color), (0, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def flat_report(folder: Path, n: int, best_index: int | None, cell: int = 32, cols: int = 4, clip: bool = True,
                prompts: list[str] = PROMPTS, train_steps: int = 1000) -> dict:
    """A report with n validations whose grids are flat colours (cell_color), so tests can find each row."""
    validations = []
    for i in range(n):
        step = (i + 1) * 100
        name = f"validation/step-{step}.png"
        write_grid(folder / name, [cell_color(i, p) for p in range(len(prompts))], cols, cell)
        validations.append({
            "step": step, "validation_loss": 0.2 - 0.001 * i,
            "clip_i": 0.7 + 0.01 * i if clip else None, "clip_t": 0.3 - 0.005 * i if clip else None,
            "clip_t_per_prompt": {p: 0.3 - 0.005 * i for p in prompts[1:]} if clip else None,
            "score": 0.5 + 0.001 * i if clip else None,
            "norm_ratio": {"<cat-toy>": [1.0 + 0.01 * i]}, "cosine_to_init": {"<cat-toy>": [1.0 - 0.01 * i]},
            "nearest_words": {"<cat-toy>": [["toy", "cat", "plush", "doll", "kitten"]]},
            "images": name, "grid": {"rows": len(prompts), "cols": cols}, "prompts": prompts,
        })
    best = validations[best_index]["step"] if best_index is not None else None
    return {
        "placeholder_token": "<cat-toy>", "rule": "highest score = CLIP-I + CLIP-T",
        "best": {"step": best, "why": "highest score"} if best is not None else None, "stopped_early": None,
        "train_loss": [[s, 0.3 + 0.1 * math.sin(s)] for s in range(1, train_steps + 1)],
        "validations": validations,
    }


def read(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def find(picture: np.ndarray, color: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.nonzero((picture == np.array(color, dtype=np.uint8)).all(-1))


def test_report_picture_size_and_atomic_write(tmp_path):
    report = flat_report(tmp_path, 5, 2)
    path = vr.draw_report(report, tmp_path)
    assert path == tmp_path / "report.png"
    pixels = read(path)
    assert 1000 <= pixels.shape[1] <= 2500 and 500 <= pixels.shape[0] <= 2500
    # 32 px cells are drawn NEAREST at 64 px: each prompt's 4 cells span 4 x 64 plus the gaps between them.
    ys, xs = find(pixels, cell_color(0, 0))
    assert ys.max() - ys.min() + 1 == 64 and xs.max() - xs.min() + 1 == 4 * 64 + 3 * 2
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["report.png"]  # no temporary file left
    other = vr.draw_report(report, tmp_path, tmp_path / "elsewhere" / "r.png")
    assert other.is_file() and other.parent.name == "elsewhere"


def test_best_row_is_framed(tmp_path):
    report = flat_report(tmp_path, 6, 3)
    report["stopped_early"] = {"step": 600, "why": "no better score in 2 validations"}
    pixels = read(vr.draw_report(report, tmp_path))
    strip_top = find(pixels, cell_color(0, 0))[0].min() - 10  # charts, above it, have a best line of their own
    rows = {i: find(pixels, cell_color(i, 0))[0] for i in range(6)}
    best_ys = find(pixels[strip_top:], vr.BEST_COLOR)[0] + strip_top
    assert len(best_ys) > 500  # a frame, not a stray pixel
    # All of it around row 3's images: below row 2's, above row 4's (a row is taller than its images: the label).
    assert rows[2].max() < best_ys.min() <= rows[3].min() and rows[3].max() <= best_ys.max() < rows[4].min()
    stop_ys = find(pixels[strip_top:], vr.STOP_COLOR)[0] + strip_top
    assert len(stop_ys) > 500 and rows[4].max() < stop_ys.min() <= rows[5].min() <= rows[5].max() <= stop_ys.max()


def test_missing_images_and_null_scores_do_not_crash(tmp_path):
    report = flat_report(tmp_path, 4, None, clip=False)
    (tmp_path / report["validations"][1]["images"]).unlink()
    (tmp_path / report["validations"][2]["images"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    del report["validations"][3]["images"]
    pixels = read(vr.draw_report(report, tmp_path))
    assert len(find(pixels, vr.MISSING_GRAY)[0]) > 3 * 1000  # three gray placeholders
    assert len(find(pixels, cell_color(0, 0))[0]) > 0  # the one good row is still drawn


def test_validations_without_images_draw_no_strip_of_missing_cells(tmp_path):
    """No prompts and no CLIP model: the validations have scores but no images, which is not a file gone missing."""
    report = flat_report(tmp_path, 3, 1, clip=False)
    with_strip = read(vr.draw_report(report, tmp_path)).shape[0]
    for validation in report["validations"]:
        for key in ("images", "grid", "prompts"):
            del validation[key]
    pixels = read(vr.draw_report(report, tmp_path))
    assert len(find(pixels, vr.MISSING_GRAY)[0]) < 1000 and pixels.shape[0] < with_strip - 3 * 64  # no gray cells


def test_empty_report_draws(tmp_path):
    report = {"placeholder_token": "<x>", "rule": "", "best": None, "stopped_early": None, "train_loss": [],
              "validations": []}
    assert vr.draw_report(report, tmp_path).is_file()
    report["train_loss"] = [[1, 0.5]]
    report["validations"] = [{"step": 1, "validation_loss": None, "clip_i": None, "clip_t": None, "images": "x.png"}]
    assert vr.draw_report(report, tmp_path).is_file()


def test_old_pillow_bitmap_font(tmp_path, monkeypatch):
    """Pillow < 10.1 (or one without FreeType) has a single bitmap font: the picture is still drawn."""
    from PIL import ImageFont

    monkeypatch.setattr(vr, "font", lambda size: ImageFont.load_default_imagefont())
    report = flat_report(tmp_path, 3, 1)
    report["stopped_early"] = {"step": 300, "why": "stalled"}
    assert vr.draw_report(report, tmp_path).is_file()


def test_many_validations_keep_first_best_last(tmp_path):
    report = flat_report(tmp_path, 60, 37, cols=2)
    pixels = read(vr.draw_report(report, tmp_path))
    drawn_colors = set(np.unique(pixels.astype(np.int64) @ [1 << 16, 1 << 8, 1]).tolist())  # each as 0xRRGGBB
    drawn = [i for i in range(60) if int.from_bytes(bytes(cell_color(i, 0)), "big") in drawn_colors]
    assert len(drawn) == vr.ROW_LIMIT and {0, 37, 59} <= set(drawn)
    assert max(pixels.shape[:2]) <= 2500


def test_large_images_are_scaled_down_and_the_page_stays_in_budget(tmp_path):
    prompts = [f"a photo of a <cat-toy> number {i} with a long description that must be wrapped" for i in range(6)]
    report = flat_report(tmp_path, 3, 0, cell=256, cols=8, prompts=prompts)
    pixels = read(vr.draw_report(report, tmp_path))
    assert max(pixels.shape[:2]) <= 2500
    ys, _ = find(pixels, cell_color(0, 0))
    assert 16 <= ys.max() - ys.min() + 1 <= 128


def test_long_training_loss_is_fast(tmp_path):
    report = flat_report(tmp_path, 10, 4, train_steps=20_000)
    vr.draw_report(report, tmp_path)  # warm: fonts load once
    start = time.perf_counter()
    vr.draw_report(report, tmp_path)
    assert time.perf_counter() - start < 1.0


# ---- The example picture ---------------------------------------------------------------------------------------------
def example_images(rng: np.random.Generator, step_index: int, prompt: int, n: int) -> list[Image.Image]:
    """32 px stand-ins for generated images: an orange toy that sharpens with training; the edit prompts change the
    background (pink) or its size (small), and late steps forget the edit (overfitting)."""
    size, sharp = 32, min(1.0, 0.2 + step_index / 6)
    forget = max(0.0, (step_index - 6) / 4)  # the edits fade after the best step
    images = []
    for _ in range(n):
        yy, xx = np.mgrid[:size, :size]
        radius = size * (0.18 if prompt == 2 and forget < 0.5 else 0.3)
        cy, cx = rng.uniform(13, 19, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
        background = np.array([240, 150, 200]) * (1 - forget) + np.array([120, 120, 120]) * forget \
            if prompt == 1 else np.array([110, 120, 110])
        pixels = background + rng.normal(0, 40 * (1 - sharp) + 8, (size, size, 3))
        toy = np.array([235, 130, 30]) * sharp + np.array([128, 128, 128]) * (1 - sharp)
        pixels[disc] = toy + rng.normal(0, 12, (disc.sum(), 3))
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    return images


def drift(i: int) -> list[str]:
    """The nearest words of the first vector: "orange" creeps in as training goes on."""
    return ["toy", "cat", "plush", "kitten", "doll"][:5 - i // 3] + ["orange"] * (i // 3)


def realistic_report(folder: Path) -> dict:
    """10 validations every 100 steps over 1000 noisy training steps; CLIP-I rises, CLIP-T falls after step 600."""
    rng = np.random.default_rng(0)
    steps = np.arange(1, 1001)
    train = 0.12 + 0.08 * np.exp(-steps / 250) + rng.gamma(2.0, 0.03, len(steps))
    validations = []
    for i in range(10):
        step = (i + 1) * 100
        grid = Image.new("RGB", (4 * 32, 3 * 32))
        for p in range(3):
            for c, image in enumerate(example_images(rng, i, p, 4)):
                grid.paste(image, (c * 32, p * 32))
        (folder / "validation").mkdir(parents=True, exist_ok=True)
        grid.save(folder / "validation" / f"step-{step}.png")
        clip_i = 0.62 + 0.2 * (1 - math.exp(-i / 3)) + rng.normal(0, 0.01)
        per_prompt = {PROMPTS[1]: 0.29 - 0.02 * max(0, i - 5) + rng.normal(0, 0.004),
                      PROMPTS[2]: 0.27 - 0.015 * max(0, i - 6) + rng.normal(0, 0.004)}
        clip_t = sum(per_prompt.values()) / 2
        validations.append({
            "step": step, "validation_loss": 0.2 - 0.03 * (1 - math.exp(-i / 2)) + 0.004 * max(0, i - 6),
            "clip_i": clip_i, "clip_t": clip_t, "clip_t_per_prompt": per_prompt, "score": clip_i + 2 * clip_t,
            "norm_ratio": {"<cat-toy>": [1.0 + 0.03 * i, 1.0 + 0.045 * i]},
            "cosine_to_init": {"<cat-toy>": [1 - 0.04 * i, 1 - 0.05 * i]},
            "nearest_words": {"<cat-toy>": [drift(i), ["toy", "figurine", "orange", "statue", "ornament"]]},
            "images": f"validation/step-{step}.png", "grid": {"rows": 3, "cols": 4}, "prompts": PROMPTS,
        })
    best = max(validations, key=lambda v: v["score"])
    return {
        "placeholder_token": "<cat-toy>",
        "rule": "the validation with the highest score = CLIP-I + 2 x CLIP-T (reconstruction and editability, "
                "as in the paper's figure 7 trade-off); ties go to the earlier step",
        "best": {"step": best["step"], "why": f"highest score {best['score']:.3f} (CLIP-I {best['clip_i']:.3f}, "
                                              f"CLIP-T {best['clip_t']:.3f})"},
        "stopped_early": {"step": 1000, "why": "the score did not improve for 3 validations"},
        "train_loss": [[int(s), float(v)] for s, v in zip(steps, train)],
        "validations": validations,
    }


def write_example(path: str | Path = "/tmp/report_example.png") -> Path:
    folder = Path(path).parent / "report_example_run"
    return vr.draw_report(realistic_report(folder), folder, Path(path))


def test_example_report_draws(tmp_path):
    path = write_example(tmp_path / "example.png")
    with Image.open(path) as picture:
        assert max(picture.size) <= 2500
