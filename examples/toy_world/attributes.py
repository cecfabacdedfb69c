"""What the judge reads per attribute in the learned word's pictures: why a recipe's score is what it is.

    python examples/toy_world/attributes.py --concept purple_striped_triangle --out attrs.json \
        RUN_DIR [RUN_DIR ...]      # each a folder with learned_embeds.safetensors (recipes.py's cells)

For each run it draws `--num_images` pictures of "a photo of a S*" and of "a photo of a S* on a pink background"
(evaluate.py's noises and sampler), and reports, per attribute (shape, colour, pattern, size, background), the share
the judge reads as the concept's value, and the distribution of sizes and backgrounds (the training images' sizes and
backgrounds are incidental: a word that learned them draws them always). It also writes a picture per run, the first
row per prompt, to look at.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import evaluate as ev  # noqa: E402
import judge as judge_lib  # noqa: E402

PROMPTS = {"plain": "a photo of a {}", "pink": "a photo of a {} on a pink background"}


def read(pipeline, judge, token: str, concept: dict[str, str], num_images: int, seed: int) -> tuple[dict, dict]:
    """Per prompt: the share of each attribute read as the concept's, and the size and background counts."""
    reads, pictures = {}, {}
    for name, template in PROMPTS.items():
        images = ev.draw(pipeline, template.format(token), num_images, seed, 5.0, 25)
        judged = judge_lib.predict(judge, images)
        shares = {k: sum(a[k] == v for a in judged) / len(judged) for k, v in concept.items()}
        reads[name] = {"concept_attributes": shares,
                       "size": dict(Counter(a["size"] for a in judged)),
                       "background": dict(Counter(a["background"] for a in judged)),
                       "colour": dict(Counter(a["colour"] for a in judged))}
        pictures[name] = images[:8]
    return reads, pictures


def main(argv: list[str] | None = None) -> int:
    from generate import load_learned_embeds

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--concept", required=True, help="colour_pattern_shape, e.g. purple_striped_triangle")
    p.add_argument("--num_images", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="JSON of every run's reads; a PNG per run beside it")
    args = p.parse_args(argv)
    colour, pattern, shape = args.concept.split("_")
    concept = {"shape": shape, "colour": colour, "pattern": pattern}
    judge = judge_lib.load_judge()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for run in args.runs:
        pipeline = ev.load_pipeline()
        (token,) = load_learned_embeds(pipeline, run / "learned_embeds.safetensors")[:1]
        results[str(run)], pictures = read(pipeline, judge, token, concept, args.num_images, args.seed)
        rows = [(f"{'/'.join(run.parts[-3:])} {name}", images, None) for name, images in pictures.items()]
        ev.labelled_rows(rows).save(args.out.with_name(f"{args.out.stem}-{'-'.join(run.parts[-3:])}.png"))
        print(run, json.dumps(results[str(run)]))
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
