"""The toy world: a deterministic generator of small captioned images.

Every image shows one object on a plain background and is fully described by five attributes, each named by a
single CLIP word:

    shape       circle, square, triangle, cross
    colour      red, green, blue, yellow, purple, orange
    pattern     plain, striped, dotted, checked      (stripes/dots/checks in a darker shade of the colour)
    size        small, large
    background  white, gray, black, pink, teal

Caption: "a photo of a large red striped circle on a gray background". Position and exact colours jitter a little.
Every attribute is left-right symmetric, so the trainer's random horizontal flip keeps captions true.

HELD_OUT is a colour+pattern+shape combination that no single word names; the pretraining data never contains it
(in any size or background), so the pretrained model can only draw it by composing words it learned separately.

    python examples/toy_world/world.py --out /tmp/world_samples --n 16     # writes PNGs + captions.txt
    python examples/toy_world/world.py --concept examples/toy_concept     # the held-out concept's 5 images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RESOLUTION = 32
SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered: anti-aliased edges

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange"),
    "pattern": ("plain", "striped", "dotted", "checked"),
    "size": ("small", "large"),
    "background": ("white", "gray", "black", "pink", "teal"),
}
NAMES = tuple(ATTRIBUTES)

OBJECT_RGB = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230),
    "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
BACKGROUND_RGB = {
    "white": (235, 235, 235), "gray": (128, 128, 128), "black": (25, 25, 25),
    "pink": (250, 180, 200), "teal": (20, 120, 120),
}
PATTERN_SHADE = 0.45  # the pattern's colour is the object's colour times this

# The concept of the textual-inversion demo: never drawn, never captioned during pretraining.
HELD_OUT = {"shape": "triangle", "colour": "purple", "pattern": "striped"}

# The demo's training images: the held-out concept, large, on four of the five backgrounds (pink is kept back for
# the editing prompt "... on a pink background").
CONCEPT_BACKGROUNDS = ("white", "gray", "black", "teal", "white")
CONCEPT_SEED = 2024

# Caption openings; the learned word goes where the noun phrase goes ("a photo of a <S*>").
PREFIXES = ("a photo of a", "a picture of a", "an image of a", "a rendering of a")


def is_held_out(attrs: dict[str, str]) -> bool:
    return all(attrs[k] == v for k, v in HELD_OUT.items())


def caption(attrs: dict[str, str], prefix: str = PREFIXES[0], keep: dict[str, bool] | None = None) -> str:
    """'a photo of a large red striped circle on a gray background'; `keep[name]=False` leaves that attribute out.

    Leaving the shape out says "shape" instead; leaving the background out drops the "on a ... background" clause.
    """
    keep = keep or {}
    words = [attrs[k] for k in ("size", "colour", "pattern") if keep.get(k, True)]
    words.append(attrs["shape"] if keep.get("shape", True) else "shape")
    text = f"{prefix} {' '.join(words)}"
    if keep.get("background", True):
        text += f" on a {attrs['background']} background"
    return text


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` centred at the origin with 'radius' r (x right, y down)."""
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if shape == "triangle":  # upright, apex at the top, centroid at the origin
        top, bottom, half_base = -1.05 * r, 0.75 * r, 1.05 * r
        width_at_y = half_base * (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(x) <= width_at_y)
    if shape == "cross":
        arm, half_width = 1.0 * r, 0.36 * r
        return ((np.abs(x) <= arm) & (np.abs(y) <= half_width)) | ((np.abs(y) <= arm) & (np.abs(x) <= half_width))
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the darker pattern colour goes, in object-centred pixel coordinates (left-right symmetric)."""
    if pattern == "plain":
        return np.zeros(x.shape, dtype=bool)
    if pattern == "striped":  # horizontal bands, 3 px on / 3 px off
        return np.mod(y + 1.5, 6.0) < 3.0
    if pattern == "dotted":  # dots of radius 1.5 px on a 6 px grid
        dx, dy = np.mod(x + 3.0, 6.0) - 3.0, np.mod(y + 3.0, 6.0) - 3.0
        return dx * dx + dy * dy <= 1.5 * 1.5 + 0.6
    if pattern == "checked":  # 4 px checks
        return (np.floor((x + 2.0) / 4.0) + np.floor((y + 2.0) / 4.0)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


_GRID = (np.arange(RESOLUTION * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres, in pixel units


def _render(attrs: dict[str, str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image, coverage): render()'s image and the object's anti-aliased coverage, float [RESOLUTION, RESOLUTION] in
    [0, 1] (the share of the pixel's SUPERSAMPLE x SUPERSAMPLE sub-pixels inside the shape)."""
    r = 11.5 if attrs["size"] == "large" else 7.0
    room = RESOLUTION / 2 - 1.15 * r - 0.5  # how far the centre may move and keep the object inside
    cx, cy = RESOLUTION / 2 + rng.uniform(-room, room, size=2)
    colour = np.clip(np.array(OBJECT_RGB[attrs["colour"]], float) + rng.uniform(-12, 12, 3), 0, 255)
    background = np.clip(np.array(BACKGROUND_RGB[attrs["background"]], float) + rng.uniform(-10, 10, 3), 0, 255)
    x, y = np.meshgrid(_GRID - cx, _GRID - cy)
    inside = _shape_mask(attrs["shape"], x, y, r)
    dark = _pattern_mask(attrs["pattern"], x, y)
    fine = np.where(inside[..., None], np.where(dark[..., None], colour * PATTERN_SHADE, colour), background)
    s = SUPERSAMPLE
    pixels = fine.reshape(RESOLUTION, s, RESOLUTION, s, 3).mean(axis=(1, 3))
    coverage = inside.reshape(RESOLUTION, s, RESOLUTION, s).mean(axis=(1, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), coverage


def render(attrs: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """One image, uint8 [RESOLUTION, RESOLUTION, 3]; `rng` draws the jitter (position, exact colours)."""
    return _render(attrs, rng)[0]


def render_with_mask(attrs: dict[str, str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask): the image render() draws from the same `rng` state (and leaving `rng` in the same state), and
    the object's mask, uint8 [RESOLUTION, RESOLUTION]: the anti-aliased share of the pixel the object covers, 0-255
    (same supersampling and box filter as the image; 0 = background only, 255 = object only)."""
    image, coverage = _render(attrs, rng)
    return image, np.clip(np.rint(coverage * 255), 0, 255).astype(np.uint8)


def random_attributes(rng: np.random.Generator, allow_held_out: bool = False) -> dict[str, str]:
    """Uniform over every attribute; the held-out combination is redrawn unless allowed."""
    while True:
        attrs = {k: v[rng.integers(len(v))] for k, v in ATTRIBUTES.items()}
        if allow_held_out or not is_held_out(attrs):
            return attrs


def sample(n: int, seed: int, allow_held_out: bool = False) -> tuple[np.ndarray, list[dict[str, str]]]:
    """`n` images (uint8 [n, 32, 32, 3]) and their attributes; the same (n, seed) always gives the same images."""
    rng = np.random.default_rng(seed)
    attrs = [random_attributes(rng, allow_held_out) for _ in range(n)]
    images = np.stack([render(a, rng) for a in attrs]) if n else np.zeros((0, RESOLUTION, RESOLUTION, 3), np.uint8)
    return images, attrs


def concept_images(seed: int = CONCEPT_SEED) -> tuple[np.ndarray, list[dict[str, str]]]:
    """The held-out concept's example images (one per CONCEPT_BACKGROUNDS entry), uint8 [n, 32, 32, 3]."""
    rng = np.random.default_rng(seed)
    attrs = [{**HELD_OUT, "size": "large", "background": b} for b in CONCEPT_BACKGROUNDS]
    return np.stack([render(a, rng) for a in attrs]), attrs


def labels(attrs: list[dict[str, str]]) -> np.ndarray:
    """Attribute values as class indices, int64 [n, len(NAMES)] in NAMES order."""
    return np.array([[ATTRIBUTES[k].index(a[k]) for k in NAMES] for a in attrs], dtype=np.int64).reshape(-1, len(NAMES))


def concept_name(concept: dict[str, str]) -> str:
    """'purple_striped_triangle': a concept's colour, pattern and shape, as a folder name."""
    return f"{concept['colour']}_{concept['pattern']}_{concept['shape']}"


def concept_words(concept: dict[str, str]) -> str:
    """'purple striped triangle': the concept in words, in the order the captions use (colour, pattern, shape)."""
    return f"{concept['colour']} {concept['pattern']} {concept['shape']}"


CONCEPT_CAPTION = "large {{}} on a {background} background"  # {} is where the learned word goes
# The same caption as a kohya user writes it: the whole prompt, no templates around it (for --caption_extension
# .caption, kohya's default extension).
WHOLE_CAPTION = f"{PREFIXES[0]} {CONCEPT_CAPTION}"


def concept_examples(concept: dict[str, str] = HELD_OUT, seed: int = CONCEPT_SEED,
                     backgrounds: tuple[str, ...] = CONCEPT_BACKGROUNDS) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(images uint8 [n, 32, 32, 3], masks uint8 [n, 32, 32], attrs): `concept` (shape, colour, pattern), large, once
    per background, drawn as concept_images() draws the held-out concept (for HELD_OUT and the defaults, the same
    images)."""
    for name in ("shape", "colour", "pattern"):
        if concept.get(name) not in ATTRIBUTES[name]:
            raise ValueError(f"concept {name} must be one of {', '.join(ATTRIBUTES[name])} (got {concept.get(name)!r})")
    rng = np.random.default_rng(seed)
    attrs = [{**{k: concept[k] for k in ("shape", "colour", "pattern")}, "size": "large", "background": b}
             for b in backgrounds]
    pairs = [render_with_mask(a, rng) for a in attrs]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), attrs


def write_concept(out: str | Path, concept: dict[str, str] = HELD_OUT, seed: int = CONCEPT_SEED,
                  backgrounds: tuple[str, ...] = CONCEPT_BACKGROUNDS, images: bool = True) -> list[Path]:
    """Write a concept folder like examples/toy_concept: `{i}_{background}.png` (large `concept`, one per background),
    a caption `{i}_{background}.txt` beside each ("large {} on a white background", {} for the learned word), the
    whole caption `{i}_{background}.caption` ("a photo of a large {} on a white background") and the object's mask `masks/{i}_{background}.png` (grayscale, 255 = object, 0 = background, anti-aliased edges).

    `images=False` writes only the captions and masks (for a folder whose images exist). Returns the image paths."""
    from PIL import Image

    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    pictures, masks, attrs = concept_examples(concept, seed, backgrounds)
    paths = []
    for i, (image, mask, a) in enumerate(zip(pictures, masks, attrs)):
        stem = f"{i}_{a['background']}"
        if images:
            Image.fromarray(image).save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(CONCEPT_CAPTION.format(background=a["background"]) + "\n")
        (out / f"{stem}.caption").write_text(WHOLE_CAPTION.format(background=a["background"]) + "\n")
        Image.fromarray(mask).save(out / "masks" / f"{stem}.png")
        paths.append(out / f"{stem}.png")
    return paths


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write --n random world images and captions.txt here")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concept", help="write the held-out concept's example images here")
    args = parser.parse_args(argv)
    if args.concept:
        out = Path(args.concept)
        out.mkdir(parents=True, exist_ok=True)
        for i, (image, a) in enumerate(zip(*concept_images())):
            Image.fromarray(image).save(out / f"{i}_{a['background']}.png")
        print(f"wrote the concept {HELD_OUT} to {out}")
    if not args.out:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, attrs = sample(args.n, args.seed)
    lines = []
    for i, (image, a) in enumerate(zip(images, attrs)):
        Image.fromarray(image).save(out / f"{i:04d}.png")
        lines.append(f"{i:04d}.png\t{caption(a)}")
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.n} images and captions.txt to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
