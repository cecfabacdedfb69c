"""Write a toy-world concept folder: 5 large images of one shape+colour+pattern, with captions and object masks.

The folder has the layout of examples/toy_concept: `{i}_{background}.png` on the backgrounds world.CONCEPT_BACKGROUNDS
(white, gray, black, teal, white; pink is kept back for the editing prompt), a caption `{i}_{background}.txt` beside each
image ("large {} on a white background", {} for the learned word; for --caption_extension .txt), the whole caption
`{i}_{background}.caption` as a kohya user writes it ("a photo of a large {} on a white background"; for
--caption_extension .caption with no templates) and the object's mask `masks/{i}_{background}.png` (grayscale, 255 = object, 0 = background, anti-aliased edges; for --mask_dir). For the
held-out concept (the default) and the default --seed, the images are examples/toy_concept's, bit for bit.

    python examples/toy_world/make_concept.py --out out/red_dotted_square --concept shape=square,colour=red,pattern=dotted
    python examples/toy_world/make_concept.py --out examples/toy_concept --no_images   # captions and masks only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import world  # noqa: E402


def parse_concept(text: str) -> dict[str, str]:
    """evaluate.py's --concept form, 'shape=triangle,colour=purple,pattern=striped' (without importing torch)."""
    concept = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or key not in ("shape", "colour", "pattern") or key in concept:
            raise argparse.ArgumentTypeError(f"{part!r}: give shape=S,colour=C,pattern=P, each once")
        if value not in world.ATTRIBUTES[key]:
            raise argparse.ArgumentTypeError(f"{key} {value!r} is not one of {', '.join(world.ATTRIBUTES[key])}")
        concept[key] = value
    if len(concept) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give all of shape, colour and pattern")
    return concept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the concept folder to write (created if needed)")
    parser.add_argument("--concept", type=parse_concept, default=dict(world.HELD_OUT),
                        metavar="shape=S,colour=C,pattern=P", help="default: the held-out concept (toy_concept's)")
    parser.add_argument("--seed", type=int, default=world.CONCEPT_SEED, help="the jitter's seed (default %(default)s)")
    parser.add_argument("--no_images", action="store_true", help="write only the captions and masks")
    args = parser.parse_args(argv)
    paths = world.write_concept(args.out, args.concept, args.seed, images=not args.no_images)
    what = "captions and masks" if args.no_images else "images, captions and masks"
    print(f"wrote {world.concept_words(args.concept)} ({len(paths)} {what}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
