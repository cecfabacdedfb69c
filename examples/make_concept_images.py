"""Regenerate examples/concept/: four 128x128 pictures of one made-up toy.

The "concept" is a teal robot head with a red antenna, two eyes and an orange
zigzag band: simple enough to draw with PIL, distinctive enough that a learned
embedding has something to latch onto, and top-heavy (antenna) so a wrongly
rotated training image is obvious at a glance.

    python examples/make_concept_images.py [--output_dir examples/concept]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 4  # draw large then downscale: PIL's draw has no anti-aliasing
EXIF_ORIENTATION = 0x0112

# (centre x, centre y, scale, background): hand-picked rather than random so the
# set is identical on every machine and every PIL version's RNG.
VIEWS: list[tuple[float, float, float, tuple[int, int, int]]] = [
    (0.50, 0.52, 1.00, (245, 240, 225)),
    (0.42, 0.55, 0.85, (230, 238, 245)),
    (0.58, 0.50, 0.92, (240, 232, 240)),
    (0.50, 0.56, 0.78, (235, 245, 232)),
]


def draw_toy(cx: float, cy: float, scale: float, background: tuple[int, int, int]) -> Image.Image:
    """Draw the toy upright, centred at (cx, cy) in [0, 1] image coordinates."""
    big = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    d = ImageDraw.Draw(img)
    u = big * 0.30 * scale  # half-width of the head; everything is relative to it
    x, y = cx * big, cy * big

    # Antenna first so the head covers the stalk's base.
    d.line([(x, y - 0.9 * u), (x, y - 1.45 * u)], fill=(60, 60, 60), width=max(1, int(0.08 * u)))
    r = 0.18 * u
    d.ellipse([x - r, y - 1.45 * u - r, x + r, y - 1.45 * u + r], fill=(215, 40, 40))

    d.rounded_rectangle([x - u, y - u, x + u, y + u], radius=0.3 * u, fill=(30, 150, 150), outline=(20, 90, 90), width=int(0.06 * u))
    for ex in (-0.42, 0.42):
        er = 0.2 * u
        d.ellipse([x + ex * u - er, y - 0.35 * u - er, x + ex * u + er, y - 0.35 * u + er], fill=(250, 250, 250))
        pr = 0.09 * u
        d.ellipse([x + ex * u - pr, y - 0.3 * u - pr, x + ex * u + pr, y - 0.3 * u + pr], fill=(20, 20, 20))

    # Orange zigzag band across the lower half: the concept's "signature".
    n = 6
    pts = [(x - 0.8 * u + i * 1.6 * u / n, y + (0.25 if i % 2 == 0 else 0.55) * u) for i in range(n + 1)]
    d.line(pts, fill=(245, 140, 20), width=int(0.14 * u), joint="curve")

    return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "concept"))
    out = Path(parser.parse_args(argv).output_dir)
    out.mkdir(parents=True, exist_ok=True)

    for i, view in enumerate(VIEWS[:-1]):
        draw_toy(*view).save(out / f"toy_{i}.png", optimize=True)

    # The last one is a JPEG stored the way a phone would: pixels rotated 90 deg
    # counter-clockwise plus EXIF Orientation=6 ("rotate 90 CW to view"). A loader
    # that ignores EXIF would train on a sideways toy; exif_transpose fixes it.
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    sideways = draw_toy(*VIEWS[-1]).transpose(Image.Transpose.ROTATE_90)
    sideways.save(out / f"toy_{len(VIEWS) - 1}_exif_rotated.jpg", quality=90, exif=exif.tobytes())
    print(f"wrote {len(VIEWS)} images to {out}")


if __name__ == "__main__":
    main()
