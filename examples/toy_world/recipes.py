"""Compare ways to tell the trainer what the concept is, over several toy-world concepts and training seeds.

Four recipes, each on top of the `make demo` training run (200 steps, lr 1e-2, 2 vectors, batch 4, resolution 32,
initializer = the concept's shape word):

    templates   examples/toy_world/templates.txt ("a photo of a {}"): today's `make demo` recipe
    captions    examples/toy_world/caption_templates.txt ("a photo of a {caption}") with --caption_extension .txt:
                each image's caption names what is incidental ("large {} on a white background")
    masks       templates.txt, with --mask_dir: the loss only on the object
    both        captions and masks

and, by name (--recipes), the background options and kohya-style whole captions (issue 24; BACKGROUND_RECIPES and
WHOLE_CAPTION_RECIPES): masks-held, masks-prior, whole, whole-masks, whole-prior, whole-dropout. The mask recipes pass
their --masked_prior_preservation_weight (0 unless named), since the trainer's default with masks is 1.

For every (recipe, concept, seed) cell it writes the concept folder (make_concept.py's; the held-out concept's images
are examples/toy_concept's), trains, and judges the learned word with evaluate.py (--words: the concept written in words
is judged with the same prompts, noises and scoring). The baselines (the initializer word and the words) do not depend
on the learned word, so they are judged once per concept, in its first cell, and kept in baselines/ (--baselines
every_cell judges them in every cell). Cells whose eval.json exists are skipped, so an interrupted run resumes where it
stopped. Then it writes results.json and results.md (all cells found under --out_dir).

    python examples/toy_world/recipes.py                              # 4 recipes x 4 concepts x seeds 0 1 2
    python examples/toy_world/recipes.py --recipes templates --seeds 0 1 2
    python examples/toy_world/recipes.py --recipes captions masks both --dry_run   # print the commands only
    python examples/toy_world/recipes.py --report_only                # rebuild results.json/.md from what is there
    python examples/toy_world/recipes.py --report_only --earlier_results examples/toy_world/recipes_results.json

Layout under --out_dir (default out/recipes): concepts/<colour_pattern_shape>/ and
runs/<recipe>/<colour_pattern_shape>/seed<S>/ (learned_embeds.safetensors, eval.json, eval.png, train.log, eval.log,
timing.json), baselines/<colour_pattern_shape>-n<samples>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import world  # noqa: E402

TRAINER = ROOT / "train_textual_inversion.py"
EVALUATOR = HERE / "evaluate.py"
DEFAULT_PIPELINE = HERE / "pipeline"
TEMPLATES = HERE / "templates.txt"
CAPTION_TEMPLATES = HERE / "caption_templates.txt"
PLACEHOLDER = "<toy-concept>"

# The held-out concept of `make demo`, then three more that differ from it and from each other in every attribute
# (shape, colour and pattern). Unlike the held-out one, pretraining has seen these three, captioned.
DEFAULT_CONCEPTS = (
    dict(world.HELD_OUT),
    {"shape": "square", "colour": "red", "pattern": "dotted"},
    {"shape": "circle", "colour": "blue", "pattern": "checked"},
    {"shape": "cross", "colour": "orange", "pattern": "plain"},
)
RECIPES = ("templates", "captions", "masks", "both")
# What the loss does outside the mask (issue 24), run by name: --recipes masks-held masks-prior.
BACKGROUND_RECIPES = {
    "masks-held": ["--unmasked_weight", "0.1", "--unmasked_probability", "0.1", "--no-normalize_masked_area_loss"],
    "masks-prior": ["--masked_prior_preservation_weight", "1"],
}
# Whole captions as kohya users write them (the .caption files, "a photo of a large {} on a white background"), no
# templates around them; whole-dropout puts a template with the word alone in place of one caption in two.
WHOLE_CAPTION_RECIPES = {
    "whole": ["--caption_extension", ".caption"],
    "whole-masks": ["--caption_extension", ".caption", "--mask_dir", "{masks}"],
    "whole-prior": ["--caption_extension", ".caption", "--mask_dir", "{masks}", "--masked_prior_preservation_weight", "1"],
    "whole-dropout": ["--caption_extension", ".caption", "--templates", "{templates}", "--caption_dropout_rate", "0.5"],
}
RECIPE_ABOUT = {
    "templates": "templates only (make demo)",
    "captions": "captions name size and background",
    "masks": "loss only on the object (masks)",
    "both": "captions and masks",
    "masks-held": "masks, the background at 0.1 and one sample in ten unmasked (OneTrainer's defaults)",
    "masks-prior": "masks, the background pulled to the frozen model's prediction",
    "whole": "whole captions, no templates (kohya's way)",
    "whole-masks": "whole captions and masks",
    "whole-prior": "whole captions, masks and the prior outside them",
    "whole-dropout": "whole captions, half of them replaced by a template with the word alone",
}
ALL_RECIPES = (*RECIPES, *BACKGROUND_RECIPES, *WHOLE_CAPTION_RECIPES)

# `make demo`'s training flags (the Makefile's demo target), less its checkpoints and validation images, which change
# nothing that is learned; the recipe adds its own, and the cell its --seed.
DEMO_FLAGS = ["--num_vectors", "2", "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "200",
              "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--report_to", "none"]


def recipe_flags(recipe: str, concept_dir: Path) -> list[str]:
    """The trainer flags that make `recipe`, for the concept folder `concept_dir` (captions beside the images, masks
    in masks/)."""
    if recipe not in ALL_RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (one of {', '.join(ALL_RECIPES)})")
    if recipe in WHOLE_CAPTION_RECIPES:
        flags = [f.format(masks=concept_dir / "masks", templates=TEMPLATES) for f in WHOLE_CAPTION_RECIPES[recipe]]
    else:
        captions = recipe in ("captions", "both")
        flags = ["--templates", str(CAPTION_TEMPLATES if captions else TEMPLATES)]
        if captions:
            flags += ["--caption_extension", ".txt"]
        if recipe in ("masks", "both", *BACKGROUND_RECIPES):
            flags += ["--mask_dir", str(concept_dir / "masks"), *BACKGROUND_RECIPES.get(recipe, [])]
    # The trainer holds the background with the prior by default when masks are given (issue 24); these recipes
    # name the masked loss they measured, so the object-only ones say so.
    if "--mask_dir" in flags and "--masked_prior_preservation_weight" not in flags:
        flags += ["--masked_prior_preservation_weight", "0"]
    return flags


def missing_trainer_flags(recipe: str, trainer: Path = TRAINER) -> list[str]:
    """The recipe's flags that the trainer does not define yet (a quick look at its source, not a run)."""
    source = trainer.read_text()
    # A --no-X flag is argparse's (BooleanOptionalAction): the source spells X.
    flags = [f.replace("--no-", "--", 1) for f in recipe_flags(recipe, Path("x")) if f.startswith("--")]
    return [f for f in flags if f'"{f}"' not in source and f"'{f}'" not in source]


def parse_concept(text: str) -> dict[str, str]:
    """'shape=square,colour=red,pattern=dotted', or a folder name 'red_dotted_square', or 'held_out'."""
    if text == "held_out":
        return dict(world.HELD_OUT)
    if "=" in text:
        pairs = dict(part.split("=", 1) for part in text.split(","))
    else:
        parts = text.split("_")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"{text!r}: give shape=S,colour=C,pattern=P or colour_pattern_shape")
        pairs = dict(zip(("colour", "pattern", "shape"), parts))
    concept = {}
    for key in ("shape", "colour", "pattern"):
        value = pairs.pop(key, None)
        if value not in world.ATTRIBUTES[key]:
            raise argparse.ArgumentTypeError(f"{text!r}: {key} must be one of {', '.join(world.ATTRIBUTES[key])}")
        concept[key] = value
    if pairs:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown {', '.join(pairs)} (give shape, colour and pattern)")
    return concept


def concept_spec(concept: dict[str, str]) -> str:
    """evaluate.py's --concept form."""
    return ",".join(f"{k}={concept[k]}" for k in ("shape", "colour", "pattern"))


def run_dir(out_dir: Path, recipe: str, concept: dict[str, str], seed: int) -> Path:
    return out_dir / "runs" / recipe / world.concept_name(concept) / f"seed{seed}"


def train_command(args, recipe: str, concept: dict[str, str], concept_dir: Path, seed: int, out: Path) -> list[str]:
    launcher = [sys.executable]
    if args.launcher == "accelerate":  # as `make demo` launches it
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launcher + [
        str(args.trainer), "--pretrained_model_name_or_path", str(args.pipeline), "--train_data_dir", str(concept_dir),
        "--placeholder_token", PLACEHOLDER, "--initializer_token", concept["shape"], *DEMO_FLAGS,
        *recipe_flags(recipe, concept_dir), "--seed", str(seed), "--output_dir", str(out)]


def eval_command(args, concept: dict[str, str], concept_dir: Path, out: Path, learned_only: bool = False) -> list[str]:
    """evaluate.py for one cell: the learned word and the baselines (initializer, words; the random vector too with
    --random_baseline), or with `learned_only` the learned word alone (the baselines do not depend on it: they come
    from the concept's baselines file)."""
    command = [sys.executable, str(EVALUATOR), "--pretrained_model_name_or_path", str(args.pipeline),
               "--learned_embeds", str(out), "--output_json", str(out / "eval.json"), "--images", str(out / "eval.png"),
               "--concept", concept_spec(concept), "--initializer_token", concept["shape"],
               "--train_data_dir", str(concept_dir), "--words", "--num_images", str(args.num_images)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if learned_only:
        command += ["--subjects", "learned"]
    elif not args.random_baseline:
        command += ["--subjects", "learned,initializer,words"]
    return command


BASELINE_SUBJECTS = ("initializer", "random", "words")  # the random vector's only with --random_baseline
REQUIRED_BASELINES = ("initializer", "words")


def baselines_path(out_dir: Path, concept_name: str, num_images: int) -> Path:
    return out_dir / "baselines" / f"{concept_name}-n{num_images}.json"


def save_baselines(out_dir: Path, eval_json: Path) -> Path | None:
    """Keep the baselines of a full evaluation (every subject) as its concept's, unless the concept has them; they
    do not depend on the learned word (same prompts, same seeded noises), so one evaluation per concept serves every
    recipe and seed."""
    result = json.loads(eval_json.read_text())
    if not all(s in result["reconstruction"] for s in REQUIRED_BASELINES):
        return None
    settings = result["settings"]
    path = baselines_path(out_dir, world.concept_name(result["concept"]), settings["num_images"])
    if path.exists():
        return path
    placeholder = settings["placeholder"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "source": str(eval_json), "concept": result["concept"], "settings": settings,
        "reconstruction": {s: result["reconstruction"][s] for s in BASELINE_SUBJECTS if s in result["reconstruction"]},
        "editability": {s: result["editability"][s] for s in BASELINE_SUBJECTS if s in result["editability"]},
        "per_prompt": {k: v for k, v in result["per_prompt"].items() if placeholder not in k}}, indent=2) + "\n")
    return path


def run_logged(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    """Run `command`, its stdout and stderr to `log`; (exit status, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n\n")
        handle.flush()
        status = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    return status, time.perf_counter() - start


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---- Results ---------------------------------------------------------------------------------------------------------
def edit_names(edit_background: str = "pink") -> list[tuple[str, str]]:
    """(name, template) of evaluate.py's edits, without importing it (and torch): kept equal by a test."""
    return [(f"background={edit_background}", f"a photo of a {{}} on a {edit_background} background"),
            ("size=small", "a photo of a small {}")]


def cell_order(cell: dict) -> tuple:
    """Recipes in ALL_RECIPES' order, then concepts in DEFAULT_CONCEPTS' (others after, by name), then seeds."""
    recipes = {r: i for i, r in enumerate(ALL_RECIPES)}
    concepts = {world.concept_name(c): i for i, c in enumerate(DEFAULT_CONCEPTS)}
    return (recipes.get(cell["recipe"], len(recipes)), cell["recipe"], concepts.get(cell["concept"], len(concepts)),
            cell["concept"], cell["seed"])


def collect(out_dir: Path) -> list[dict]:
    """One record per cell with an eval.json under out_dir/runs: recipe, concept, seed, scores and timings."""
    cells = []
    for summary in sorted((out_dir / "runs").glob("*/*/seed*/eval.json")):
        recipe, name, seed = summary.parts[-4], summary.parts[-3], int(summary.parts[-2][4:])
        result = json.loads(summary.read_text())
        baselines_from = None
        if not all(s in result["reconstruction"] for s in REQUIRED_BASELINES):  # a learned-only evaluation
            path = baselines_path(out_dir, name, result["settings"]["num_images"])
            if path.exists():
                baselines = json.loads(path.read_text())
                for metric in ("reconstruction", "editability"):
                    result[metric] = {**result[metric], **baselines[metric]}
                baselines_from = str(path)
        timing_path = summary.parent / "timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        settings = result.get("settings", {})
        edits = {}
        for edit, template in edit_names():
            entry = result.get("per_prompt", {}).get(template.format(settings.get("placeholder", PLACEHOLDER)))
            if entry is not None:
                edits[edit] = entry["score"]
        cells.append({"recipe": recipe, "concept": name, "attributes": result.get("concept"), "seed": seed,
                      "reconstruction": result["reconstruction"], "editability": result["editability"],
                      "learned_edits": edits, "num_images": settings.get("num_images"),
                      "words": settings.get("words"), "train_s": timing.get("train_s"),
                      "eval_s": timing.get("eval_s"), "trainer": timing.get("trainer"),
                      "trainer_sha256": timing.get("trainer_sha256"), "eval_json": str(summary),
                      "baselines_from": baselines_from, "eval_subjects": "learned" if baselines_from else "all"})
    return sorted(cells, key=cell_order)


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(cells: list[dict]) -> dict:
    """Per (recipe, concept): scores per seed, their mean, and the words baseline; per concept: the baselines (the
    same in every cell, since they do not depend on the learned word; `baselines_vary` says if they ever did not)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["recipe"], cell["concept"]), []).append(cell)
    rows = []
    for (recipe, concept), group in groups.items():
        row = {"recipe": recipe, "concept": concept, "seeds": [c["seed"] for c in group]}
        for metric in ("reconstruction", "editability"):
            learned = [c[metric]["learned"] for c in group]
            words = mean([c[metric].get("words") for c in group])
            row[metric] = {"per_seed": dict(zip(row["seeds"], learned)), "mean": mean(learned), "words": words,
                           "learned_over_words": (mean(learned) / words) if words else None}
        row["learned_edits_mean"] = {e: mean([c["learned_edits"].get(e) for c in group]) for e, _ in edit_names()}
        rows.append(row)
    baselines: dict[str, dict] = {}
    for cell in cells:
        entry = baselines.setdefault(cell["concept"], {"values": {}, "baselines_vary": False})
        for metric in ("reconstruction", "editability"):
            for subject in ("words", "initializer", "random"):
                value = cell[metric].get(subject)
                if value is None:
                    continue
                key = f"{metric}/{subject}"
                if key in entry["values"] and abs(entry["values"][key] - value) > 1e-9:
                    entry["baselines_vary"] = True
                entry["values"].setdefault(key, value)
    recipes: dict[str, dict] = {}
    for row in rows:
        entry = recipes.setdefault(row["recipe"], {"reconstruction": [], "editability": [], "concepts": 0, "cells": 0})
        for metric in ("reconstruction", "editability"):
            entry[metric].append(row[metric]["mean"])
        entry["concepts"] += 1
        entry["cells"] += len(row["seeds"])
    recipe_means = {r: {m: (mean(v) if isinstance(v, list) else v) for m, v in e.items()} for r, e in recipes.items()}
    return {"rows": rows, "baselines": baselines, "recipe_means": recipe_means}


def f3(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(cells: list[dict], summary: dict, settings: dict) -> str:
    seeds = sorted({c["seed"] for c in cells})
    recipes = list(dict.fromkeys(c["recipe"] for c in cells))
    lines = [f"# Recipes compared: {', '.join(recipes)}", "",
             f"Training: `make demo`'s run ({settings['training']}), initializer = the concept's shape word, "
             f"one run per seed. Judged by examples/toy_world/evaluate.py on {settings['num_images']} samples per "
             "prompt (same noises for every subject). *words* is the concept written out (\"purple striped "
             "triangle\") in the same prompts; *ratio* = mean over seeds / words.", ""]
    for metric, about in (("reconstruction", '"a photo of a S*" draws the shape, colour and pattern'),
                          ("editability", 'mean of "... on a pink background" and "a photo of a small S*", each '
                                          "passing only if the concept is kept and the edit applied")):
        lines += [f"## {metric.capitalize()}: {about}", "",
                  "| recipe | concept | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | words | ratio |",
                  "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
        for row in summary["rows"]:
            per_seed = row[metric]["per_seed"]
            lines.append(f"| {row['recipe']} | {row['concept'].replace('_', ' ')} | "
                         + " | ".join(f3(per_seed.get(s)) for s in seeds)
                         + f" | **{f3(row[metric]['mean'])}** | {f3(row[metric]['words'])} | "
                         + f"{f3(row[metric]['learned_over_words'])} |")
        lines.append("")
    lines += ["## The two edits of the learned word (mean over seeds)", "",
              "| recipe | concept | " + " | ".join(e for e, _ in edit_names()) + " |",
              "|---|---|" + "---|" * len(edit_names())]
    for row in summary["rows"]:
        lines.append(f"| {row['recipe']} | {row['concept'].replace('_', ' ')} | "
                     + " | ".join(f3(row["learned_edits_mean"][e]) for e, _ in edit_names()) + " |")
    lines += ["", "## Per recipe, mean over concepts (of the per-concept means)", "",
              "| recipe | concepts | cells | reconstruction | editability |", "|---|---|---|---|---|"]
    for recipe, means in summary["recipe_means"].items():
        lines.append(f"| {recipe} | {means['concepts']} | {means['cells']} | {f3(means['reconstruction'])} | "
                     f"{f3(means['editability'])} |")
    lines += ["", "## Baselines per concept (they do not depend on the learned word)", "",
              "| concept | words recon. | words edit. | initializer recon. | initializer edit. | random recon. | "
              "random edit. |", "|---|---|---|---|---|---|---|"]
    for concept, entry in summary["baselines"].items():
        v = entry["values"]
        note = " (varied between cells!)" if entry["baselines_vary"] else ""
        lines.append(f"| {concept.replace('_', ' ')}{note} | "
                     + " | ".join(f3(v.get(f"{m}/{s}")) for s in ("words", "initializer", "random")
                                  for m in ("reconstruction", "editability")) + " |")
    trainers: dict[tuple, list[str]] = {}
    for cell in cells:
        trainers.setdefault((cell.get("trainer"), cell.get("trainer_sha256")), []).append(cell["recipe"])
    lines += ["", "Trainer per cell: " + "; ".join(
        f"{path or 'unrecorded'} (sha256 {(sha or '?')[:12]}): {len(recipes)} cells ({', '.join(sorted(set(recipes)))})"
        for (path, sha), recipes in trainers.items()) + "."]
    timed = [c for c in cells if c["train_s"] is not None]
    if timed:
        evals = {kind: [c["eval_s"] for c in timed if c["eval_subjects"] == kind and c["eval_s"] is not None]
                 for kind in ("all", "learned")}
        lines += ["", f"Time per cell ({len(timed)} timed cells): training {mean([c['train_s'] for c in timed]):.0f} s "
                  f"(min {min(c['train_s'] for c in timed):.0f}, max {max(c['train_s'] for c in timed):.0f}); "
                  + "; ".join(f"evaluation of {'every subject' if k == 'all' else 'the learned word only'} "
                              f"{mean(v):.0f} s ({len(v)} cells)" for k, v in evals.items() if v) + "."]
    return "\n".join(lines) + "\n"


def with_earlier_cells(cells: list[dict], earlier: list[Path]) -> list[dict]:
    """`cells`, plus the cells of earlier results.json files that `cells` lacks (by recipe, concept and seed; the
    first file to hold one wins). Each borrowed cell says which file it came from."""
    have = {(c["recipe"], c["concept"], c["seed"]) for c in cells}
    borrowed = []
    for path in earlier:
        for cell in json.loads(Path(path).read_text())["cells"]:
            key = (cell["recipe"], cell["concept"], cell["seed"])
            if key not in have:
                have.add(key)
                borrowed.append({**cell, "from_results": str(path)})
    return sorted(cells + borrowed, key=cell_order)


def write_results(out_dir: Path, settings: dict, earlier: list[Path] = ()) -> tuple[Path, Path, list[dict]]:
    cells = with_earlier_cells(collect(out_dir), list(earlier))
    summary = summarise(cells)
    results_json, results_md = out_dir / "results.json", out_dir / "results.md"
    results_json.write_text(json.dumps({"settings": settings, "cells": cells, "summary": summary}, indent=2) + "\n")
    results_md.write_text(markdown(cells, summary, settings))
    return results_json, results_md, cells


# ---- Main ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--out_dir", type=Path, default=ROOT / "out" / "recipes")
    parser.add_argument("--concepts", nargs="+", type=parse_concept, default=[dict(c) for c in DEFAULT_CONCEPTS],
                        metavar="CONCEPT", help="shape=S,colour=C,pattern=P, colour_pattern_shape or held_out "
                        "(default: " + ", ".join(world.concept_name(c) for c in DEFAULT_CONCEPTS) + ")")
    parser.add_argument("--recipes", nargs="+", choices=ALL_RECIPES, default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_images", type=int, default=32, help="samples per prompt (evaluate.py's default)")
    parser.add_argument("--pipeline", type=Path, default=DEFAULT_PIPELINE)
    parser.add_argument("--trainer", type=Path, default=TRAINER,
                        help="the training script (default: the repository's); a copy elsewhere, e.g. a committed "
                        "version, imports the repository's modules (PYTHONPATH)")
    parser.add_argument("--launcher", choices=("python", "accelerate"), default="python",
                        help="run the trainer with python (default) or `accelerate launch` (one process) as make demo")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for training (OMP_NUM_THREADS) and evaluation (default: torch's choice). On a "
                        "busy machine 1 is far faster: on 2 shared cores a cell took 33 s with 1 thread, 4-10 min with "
                        "2; the judged scores were the same")
    parser.add_argument("--baselines", choices=("once", "every_cell"), default="once",
                        help="judge the baselines (initializer, words, and with --random_baseline the random vector) "
                        "once per concept, in its first cell, and only the learned word in the others (default: the "
                        "same numbers for a third of the sampling), or in every cell")
    parser.add_argument("--random_baseline", action="store_true",
                        help="also judge evaluate.py's random-vector baseline (with the other baselines)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands of the cells to run, run nothing")
    parser.add_argument("--report_only", action="store_true", help="only rebuild results.json and results.md")
    parser.add_argument("--earlier_results", nargs="+", type=Path, default=[], metavar="RESULTS_JSON",
                        help="add the cells of these results.json files that --out_dir lacks (same recipe, concept "
                        "and seed), e.g. examples/toy_world/recipes_results.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir.absolute()
    settings = {"training": " ".join(DEMO_FLAGS[:-2]), "placeholder": PLACEHOLDER, "num_images": args.num_images,
                "recipes": {r: " ".join(recipe_flags(r, Path("<concept>"))) for r in ALL_RECIPES},
                "launcher": args.launcher}
    if args.report_only:
        results_json, results_md, cells = write_results(out_dir, settings, args.earlier_results)
        print(f"{len(cells)} cells: {results_json}, {results_md}")
        return 0

    # Seed by seed, so that a run stopped early has every concept at the first seeds.
    cells = [(r, c, s) for r in args.recipes for s in args.seeds for c in args.concepts]
    args.trainer = args.trainer.absolute()
    missing = {r: missing_trainer_flags(r, args.trainer) for r in args.recipes}
    for recipe, flags in missing.items():
        if flags and not args.dry_run:
            print(f"recipe {recipe}: the trainer has no {', '.join(flags)} yet; its cells will be skipped")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    trainer = {"trainer": str(args.trainer), "trainer_sha256": hashlib.sha256(args.trainer.read_bytes()).hexdigest()}
    settings["trainer"] = trainer
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    for summary in sorted((out_dir / "runs").glob("*/*/seed*/eval.json")):  # baselines of earlier full evaluations
        if not args.dry_run:
            save_baselines(out_dir, summary)
    concept_dirs = {}
    for concept in args.concepts:
        folder = out_dir / "concepts" / world.concept_name(concept)
        if not args.dry_run:
            world.write_concept(folder, concept)
        concept_dirs[world.concept_name(concept)] = folder

    todo = [cell for cell in cells if not (run_dir(out_dir, *cell) / "eval.json").exists()]
    print(f"{len(cells)} cells ({len(args.recipes)} recipes x {len(args.concepts)} concepts x {len(args.seeds)} seeds), "
          f"{len(cells) - len(todo)} done already, {len(todo)} to run; out: {out_dir}", flush=True)
    # A stopped driver stops its running cell too (subprocess.run kills the child when interrupted).
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if todo and not args.dry_run else None
    try:
        done, failed, skipped_flags = run_cells(args, todo, out_dir, concept_dirs, missing, env, trainer)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if args.dry_run:
        return 0
    results_json, results_md, collected = write_results(out_dir, settings, args.earlier_results)
    print(f"ran {done} cells; {len(collected)} cells in {results_json} and {results_md}", flush=True)
    if skipped_flags:
        print(f"{skipped_flags} cells skipped: the trainer lacks their recipe's flags ({missing})")
    if failed:
        print("failed: " + "; ".join(failed))
        return 1
    return 0


def run_cells(args, todo, out_dir: Path, concept_dirs: dict, missing: dict, env: dict, trainer: dict):
    """Train and judge each (recipe, concept, seed) of `todo`; (cells done, labels of failed cells, cells skipped)."""
    start, done, failed, skipped_flags = time.perf_counter(), 0, [], 0
    for index, (recipe, concept, seed) in enumerate(todo, 1):
        name = world.concept_name(concept)
        label = f"[{index}/{len(todo)}] {recipe} {name} seed {seed}"
        out, concept_dir = run_dir(out_dir, recipe, concept, seed), concept_dirs[name]
        learned_only = args.baselines == "once" and baselines_path(out_dir, name, args.num_images).exists()
        train, evaluate = (train_command(args, recipe, concept, concept_dir, seed, out),
                           eval_command(args, concept, concept_dir, out, learned_only))
        if args.dry_run:
            print(f"{label}\n  {' '.join(train)}\n  {' '.join(evaluate)}")
            continue
        if missing[recipe]:
            skipped_flags += 1
            continue
        timing = {}
        if (out / "learned_embeds.safetensors").exists():  # trained before an interrupted evaluation
            previous = out / "timing.json"
            timing = json.loads(previous.read_text()) if previous.exists() else {}
            print(f"{label}: already trained", flush=True)
        else:
            if out.exists():
                for stale in sorted(out.rglob("*"), reverse=True):  # like make demo's rm -rf of its output
                    stale.rmdir() if stale.is_dir() else stale.unlink()
            out.mkdir(parents=True, exist_ok=True)
            timing.update(trainer, threads=args.threads)
            status, timing["train_s"] = run_logged(train, out / "train.log", env)
            if status != 0 or not (out / "learned_embeds.safetensors").exists():
                print(f"{label}: TRAINING FAILED (exit {status}), see {out / 'train.log'}:\n{tail(out / 'train.log')}",
                      flush=True)
                failed.append(label)
                continue
            (out / "timing.json").write_text(json.dumps(timing) + "\n")
        status, timing["eval_s"] = run_logged(evaluate, out / "eval.log", env)
        if status != 0 or not (out / "eval.json").exists():
            print(f"{label}: EVALUATION FAILED (exit {status}), see {out / 'eval.log'}:\n{tail(out / 'eval.log')}",
                  flush=True)
            failed.append(label)
            continue
        timing["eval_subjects"] = "learned" if learned_only else "all"
        timing["eval_threads"] = args.threads
        (out / "timing.json").write_text(json.dumps(timing) + "\n")
        save_baselines(out_dir, out / "eval.json")
        result = json.loads((out / "eval.json").read_text())
        baselines = baselines_path(out_dir, name, args.num_images)
        if learned_only:
            for metric in ("reconstruction", "editability"):
                result[metric].update(json.loads(baselines.read_text())[metric])
        done += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / index * (len(todo) - index)
        recon, edit = result["reconstruction"], result["editability"]
        train_s = f"{timing['train_s']:.0f} s" if timing.get("train_s") is not None else "earlier"
        print(f"{label}: train {train_s}, eval {timing['eval_s']:.0f} s | reconstruction {recon['learned']:.3f} "
              f"(words {recon.get('words', float('nan')):.3f}), editability {edit['learned']:.3f} "
              f"(words {edit.get('words', float('nan')):.3f}) | elapsed {fmt_time(elapsed)}, "
              f"left ~{fmt_time(eta)}", flush=True)
    if not args.dry_run:
        print(f"ran {done} of {len(todo)} cells in {fmt_time(time.perf_counter() - start)}", flush=True)
    return done, failed, skipped_flags


if __name__ == "__main__":
    raise SystemExit(main())
