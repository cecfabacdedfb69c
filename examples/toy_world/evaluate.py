"""Measure a learned toy-world concept with the judge: reconstruction and editability, against two baselines.

For a fixed, seeded set of starting noises, the pretrained toy-world pipeline draws

    "a photo of a S*"                              reconstruction: the judge reads shape, colour and pattern,
                                                   and all three must be the concept's
    "a photo of a S* on a pink background"         editability: the background must be the new one and the
    "a photo of a small S*"                        concept kept (the training images are all large, on other
                                                   backgrounds), averaged over the two prompts

with S* = the learned token, the initializer word, and a random vector (the norm of a world word); with --words,
also the concept written in words ("purple striped triangle"), judged the same way. The same noises are used for
every prompt. It writes a JSON summary and one picture: training images | initializer samples |
S* samples | edited samples.

    python examples/toy_world/evaluate.py --learned_embeds out/toy/learned_embeds.safetensors \\
        --output_json out/toy/eval.json
    python examples/toy_world/evaluate.py --learned_embeds out/red/ --output_json out/red/eval.json \\
        --concept shape=square,colour=red,pattern=dotted --train_data_dir out/red_dotted_square --words
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import judge as judge_lib  # noqa: E402
import world  # noqa: E402

DEFAULT_PIPELINE = HERE / "pipeline"
DEFAULT_CONCEPT_DIR = HERE.parent / "toy_concept"
CONCEPT = world.HELD_OUT  # shape, colour, pattern of examples/toy_concept
RANDOM_TOKEN = "<random-baseline>"
CONCEPT_KEYS = ("shape", "colour", "pattern")
SUBJECTS = ("learned", "initializer", "random", "words")


def parse_concept(text: str) -> dict[str, str]:
    """'shape=triangle,colour=purple,pattern=striped' -> {"shape": ..., "colour": ..., "pattern": ...} (world.HELD_OUT's
    form), checked against the world's words; raises ValueError with the reason."""
    concept = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"{part!r} is not name=value (e.g. shape=triangle,colour=purple,pattern=striped)")
        if key not in CONCEPT_KEYS:
            raise ValueError(f"{key!r} is not one of {', '.join(CONCEPT_KEYS)}")
        if key in concept:
            raise ValueError(f"{key} is given twice")
        if value not in world.ATTRIBUTES[key]:
            raise ValueError(f"{key} {value!r} is not one of {', '.join(world.ATTRIBUTES[key])}")
        concept[key] = value
    missing = [k for k in CONCEPT_KEYS if k not in concept]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (give shape, colour and pattern)")
    return {k: concept[k] for k in CONCEPT_KEYS}


def format_concept(concept: dict[str, str]) -> str:
    """parse_concept's inverse: 'shape=triangle,colour=purple,pattern=striped'."""
    return ",".join(f"{k}={concept[k]}" for k in CONCEPT_KEYS)


def edits(concept_background: str = "pink") -> list[dict]:
    """The editing prompts: what each adds to the concept, and what the judge must then read."""
    return [
        {"name": f"background={concept_background}",
         "template": f"a photo of a {{}} on a {concept_background} background",
         "expect": {"background": concept_background}},
        {"name": "size=small", "template": "a photo of a small {}", "expect": {"size": "small"}},
    ]


RECONSTRUCTION_TEMPLATE = "a photo of a {}"


def load_pipeline(path: str | Path = DEFAULT_PIPELINE):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def world_word_norm(pipeline) -> float:
    """Mean norm of the input embeddings of the words the toy world's captions use."""
    words = sorted({w for values in world.ATTRIBUTES.values() for w in values})
    ids = pipeline.tokenizer.convert_tokens_to_ids([w + "</w>" for w in words])
    weight = pipeline.text_encoder.get_input_embeddings().weight.detach()
    return float(weight[ids].norm(dim=1).mean())


def add_random_token(pipeline, num_vectors: int, seed: int) -> str:
    """A baseline token: gaussian vectors scaled to the mean norm of the world's words."""
    dim = pipeline.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(num_vectors, dim, generator=torch.Generator().manual_seed(seed + 12345))
    vectors = vectors / vectors.norm(dim=1, keepdim=True) * world_word_norm(pipeline)
    pipeline.load_textual_inversion([vectors], token=[RANDOM_TOKEN])
    return RANDOM_TOKEN


@torch.no_grad()
def draw(pipeline, prompt: str, num_images: int, seed: int, guidance_scale: float, steps: int):
    """PIL images for `prompt`; the starting noises depend only on `seed`, so prompts are compared image by image."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipeline(prompt, num_images_per_prompt=num_images, num_inference_steps=steps, guidance_scale=guidance_scale,
                    height=world.RESOLUTION, width=world.RESOLUTION, generator=generator).images


def keeps_concept(attrs: dict[str, str], concept: dict[str, str]) -> bool:
    return all(attrs[k] == v for k, v in concept.items())


def score(judged: list[dict[str, str]], concept: dict[str, str], expect: dict[str, str] | None = None) -> float:
    want = {**concept, **(expect or {})}
    return float(np.mean([keeps_concept(a, want) for a in judged])) if judged else 0.0


def labelled_rows(rows: list[tuple[str, list, list | None]], scale: int = 3, per_row: int = 8):
    """One picture: a label column, then up to `per_row` images per row enlarged `scale` times (nearest), each with a
    bar under it when the row has marks: green where the judge passed the image, red where it did not."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)  # the scalable default; the bitmap one drops the spaces between words
    side, bar, pad, label_w = world.RESOLUTION * scale, 5, 5, 250
    width = label_w + per_row * (side + pad) + pad
    height = len(rows) * (side + bar + 2 * pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    for r, (label, images, marks) in enumerate(rows):
        y = pad + r * (side + bar + 2 * pad)
        for i, line in enumerate(textwrap.wrap(label, 38)):
            pen.text((pad, y + 4 + 15 * i), line, fill=(0, 0, 0), font=font)
        for c, image in enumerate(images[:per_row]):
            x = label_w + pad + c * (side + pad)
            canvas.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
            if marks is not None:
                pen.rectangle((x, y + side + 2, x + side - 1, y + side + 1 + bar),
                              fill=(40, 170, 60) if marks[c] else (210, 40, 40))
    return canvas


def world_check(pipeline, judge, num_images: int = 64, seed: int = 0, guidance_scale: float = 5.0,
                steps: int = 25, concept: dict[str, str] = CONCEPT) -> dict:
    """How well the pipeline draws what full captions ask for, read by the judge (the model's own quality).

    `world`: random world captions (never the held-out concept), per-attribute agreement and all-five agreement.
    `held_out_by_words`: the held-out concept described in words, which pretraining never showed it: the share of
    images with its shape, colour and pattern (can the model draw it at all?).
    """
    rng = np.random.default_rng(seed)
    attrs = [world.random_attributes(rng) for _ in range(num_images)]
    images = []
    for i, a in enumerate(attrs):  # one prompt per image; a batch of distinct prompts would need the same per image
        images += draw(pipeline, world.caption(a), 1, seed + i, guidance_scale, steps)
    judged = judge_lib.predict(judge, images)
    per_attribute = {k: float(np.mean([j[k] == a[k] for j, a in zip(judged, attrs)])) for k in world.NAMES}
    all_five = float(np.mean([j == a for j, a in zip(judged, attrs)]))
    words = world.caption({**concept, "size": "large"}, keep={"background": False})
    held = judge_lib.predict(judge, draw(pipeline, words, num_images, seed, guidance_scale, steps))
    return {"world": {"per_attribute": per_attribute, "all_five": all_five, "num_images": num_images},
            "held_out_by_words": {"prompt": words, "score": score(held, concept), "num_images": num_images},
            "guidance_scale": guidance_scale}


def evaluate(pipeline, judge, placeholder: str, initializer: str, concept: dict[str, str], training_images: list,
             num_images: int = 16, seed: int = 0, guidance_scale: float = 5.0, steps: int = 25,
             edit_background: str = "pink", picture: str | Path | None = None, num_vectors: int = 1,
             words: str | None = None, subjects: tuple[str, ...] | list[str] | None = None) -> dict:
    """The JSON summary (and, with `picture`, the picture) for `placeholder`, already loaded into `pipeline`.

    `words` (e.g. world.concept_words(concept), "purple striped triangle") adds a fourth subject, "words": the concept
    written out, in the same prompts, with the same noises and scoring (the picture stays as it is).

    `subjects` (a subset of SUBJECTS, default all but "words", plus "words" when given) judges only those. Every
    prompt draws from the same seeded noises whatever else is judged, so a subject's scores do not depend on the
    others: e.g. the baselines, which do not depend on the learned word, need judging once per concept."""
    requested = subjects
    chosen = list(subjects) if subjects is not None else ["learned", "initializer", "random"] + (["words"] * bool(words))
    unknown = [s for s in chosen if s not in SUBJECTS]
    if unknown or ("words" in chosen and not words):
        raise ValueError(f"subjects must be among {', '.join(SUBJECTS)} (\"words\" needs `words`); got {chosen}")
    subjects = {"learned": placeholder, "initializer": initializer}
    if "random" in chosen:
        subjects["random"] = add_random_token(pipeline, num_vectors, seed)
    if words:
        subjects["words"] = words
    subjects = {name: subjects[name] for name in SUBJECTS if name in chosen}
    prompts = [("reconstruction", RECONSTRUCTION_TEMPLATE, {})] + [(e["name"], e["template"], e["expect"])
                                                                   for e in edits(edit_background)]
    result = {"reconstruction": {}, "editability": {}}
    per_prompt, samples = {}, {}
    for name, subject in subjects.items():
        edit_scores = []
        for kind, template, expect in prompts:
            prompt = template.format(subject)
            images = draw(pipeline, prompt, num_images, seed, guidance_scale, steps)
            judged = judge_lib.predict(judge, images)
            passed = [keeps_concept(a, {**concept, **expect}) for a in judged]  # per image, for the picture
            share = float(np.mean(passed))
            per_prompt[prompt] = {"score": share, "concept_kept": score(judged, concept)}
            if expect:
                per_prompt[prompt]["edit_applied"] = score(judged, {}, expect)
                edit_scores.append(share)
            else:
                result["reconstruction"][name] = share
            samples[name, kind] = (prompt, images, passed)
        result["editability"][name] = float(np.mean(edit_scores))
    result["per_prompt"] = per_prompt
    result["concept"] = concept
    result["settings"] = {"num_images": num_images, "seed": seed, "guidance_scale": guidance_scale,
                          "num_inference_steps": steps, "sampler": "DPMSolverMultistepScheduler",
                          "placeholder": placeholder, "initializer": initializer, "num_vectors": num_vectors}
    if words:
        result["settings"]["words"] = words
    if requested is not None:
        result["settings"]["subjects"] = list(subjects)
    if picture is not None:
        rows = [(f"training images ({len(training_images)})", training_images, None)]
        for label, name, kind in [("initializer", "initializer", "reconstruction"),
                                  ("learned", "learned", "reconstruction")] + [
                                  ("edited", "learned", kind) for kind, _, expect in prompts if expect]:
            if name not in subjects:  # only with `subjects`
                continue
            prompt, images, passed = samples[name, kind]
            rows.append((f'{label}: "{prompt}"  judge: {sum(passed)}/{len(passed)}', images, passed))
        picture = Path(picture)
        picture.parent.mkdir(parents=True, exist_ok=True)
        labelled_rows(rows).save(picture)
        result["images"] = str(picture)
    return result


def concept_arg(text: str) -> dict[str, str]:
    """parse_concept for argparse: a bad --concept is a usage error naming the reason."""
    try:
        return parse_concept(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def subjects_arg(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUBJECTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give some of {', '.join(SUBJECTS)}, comma-separated")
    return names


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learned_embeds", help="learned_embeds.safetensors (or its folder)")
    parser.add_argument("--output_json", required=True)
    parser.add_argument("--images", default=None, help="the picture's path (default: next to --output_json)")
    parser.add_argument("--pretrained_model_name_or_path", default=str(DEFAULT_PIPELINE))
    parser.add_argument("--judge", default=str(judge_lib.DEFAULT_WEIGHTS))
    parser.add_argument("--train_data_dir", default=str(DEFAULT_CONCEPT_DIR), help="shown in the picture's first row")
    parser.add_argument("--concept", type=concept_arg, default=CONCEPT, metavar="shape=S,colour=C,pattern=P",
                        help=f"what the judge must read (default: the held-out concept, {format_concept(CONCEPT)})")
    parser.add_argument("--initializer_token", default=None, help="default: the concept's shape")
    parser.add_argument("--words", action="store_true",
                        help='also judge the concept written in words ("purple striped triangle"), as "words"')
    parser.add_argument("--subjects", type=subjects_arg, default=None, metavar="S,S",
                        help=f"judge only these, among {','.join(SUBJECTS)} (default: learned,initializer,random and "
                        "words with --words)")
    parser.add_argument("--edit_background", default="pink", choices=world.ATTRIBUTES["background"])
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--world_check", type=int, default=0, metavar="N",
                        help="instead: judge N images of random world captions and N of the held-out concept in words")
    args = parser.parse_args(argv)
    if not args.learned_embeds and not args.world_check:
        parser.error("--learned_embeds is required (or --world_check N)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.initializer_token is None:
        args.initializer_token = args.concept["shape"]

    from generate import load_learned_embeds, read_embeddings, resolve_embeds_path
    from train_textual_inversion import quiet_libraries

    quiet_libraries()
    pipeline = load_pipeline(args.pretrained_model_name_or_path)
    if args.world_check:
        result = world_check(pipeline, judge_lib.load_judge(args.judge), args.world_check, args.seed,
                             args.guidance_scale, args.num_inference_steps, args.concept)
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    tokens = load_learned_embeds(pipeline, args.learned_embeds)
    vectors = read_embeddings(resolve_embeds_path(args.learned_embeds))[tokens[0]]
    num_vectors = vectors.reshape(-1, pipeline.text_encoder.config.hidden_size).shape[0]
    training = [Image.open(p).convert("RGB") for p in sorted(Path(args.train_data_dir).glob("*.png"))]
    picture = args.images or str(Path(args.output_json).with_suffix(".png"))
    result = evaluate(pipeline, judge_lib.load_judge(args.judge), tokens[0], args.initializer_token, args.concept,
                      training, args.num_images, args.seed, args.guidance_scale, args.num_inference_steps,
                      args.edit_background, picture, num_vectors,
                      words=world.concept_words(args.concept) if args.words or "words" in (args.subjects or ())
                      else None, subjects=args.subjects)
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("reconstruction", "editability", "images")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
