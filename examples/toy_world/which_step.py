"""Does the trainer keep the right step? Its validation scores against the judge, over concepts and seeds.

For each (concept, seed) it trains the `make demo` recipe (captions, 2 vectors, lr 1e-2, batch 4) for 1,000 steps,
saving learned_embeds-steps-N and validating every 100 steps with the toy CLIP (examples/toy_world/clip) on the
judge's own two edits (pink background, small). Then it judges every saved step with evaluate.py's protocol (the
same prompts, seeded noises and guidance as `make demo`'s evaluation), and compares:

    judged best     the highest judged reconstruction (and, separately, editability) over the 10 saves
    chosen          the step the trainer saved as learned_embeds-best (its rule over CLIP-I and CLIP-T)
    early stop      the same run with --early_stopping_patience P, replayed from report.json (training is a pure
                    function of the seed and step, and validation draws from its own generators, so a run stopped
                    early is this run's prefix; tests/test_validation.py checks it): steps saved, and what its best
                    file is judged at

    python examples/toy_world/which_step.py --out out/which_step --seeds 0 1 --threads 1
    python examples/toy_world/which_step.py --out out/which_step --report_only

Runs whose files exist are skipped, so an interrupted run resumes. Results: <out>/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "examples"), str(ROOT)]
import world  # noqa: E402
from recipes import DEFAULT_CONCEPTS, PLACEHOLDER  # noqa: E402

TRAINER = ROOT / "train_textual_inversion.py"
PIPELINE = HERE / "pipeline"
CLIP = HERE / "clip"
STEPS, EVERY = 1000, 100
EDITS = [f"a photo of a {PLACEHOLDER} on a pink background", f"a photo of a small {PLACEHOLDER}"]
# `make demo`'s recipe (the Makefile), run longer, with a save and a validation every 100 steps.
RECIPE = ["--num_vectors", "2", "--resolution", "32", "--train_batch_size", "4", "--learning_rate", "1e-2",
          "--lr_warmup_steps", "0", "--templates", str(HERE / "caption_templates.txt"), "--caption_extension", ".txt",
          "--max_train_steps", str(STEPS), "--save_steps", str(EVERY), "--validation_steps", str(EVERY),
          "--checkpointing_steps", str(STEPS), "--report_to", "none",
          "--validation_guidance_scale", "5.0", *[w for e in EDITS for w in ("--validation_prompt", e)]]
PATIENCES = (2, 3)


def concept_dir(out: Path, concept: dict[str, str]) -> Path:
    if concept == world.HELD_OUT:
        return ROOT / "examples" / "toy_concept"
    path = out / "concepts" / world.concept_name(concept)
    if not (path / "masks").is_dir():
        world.write_concept(path, concept)
    return path


def train(out: Path, concept: dict[str, str], seed: int, threads: int, trainer: Path = TRAINER,
          clip: Path = CLIP) -> Path:
    run = out / "runs" / world.concept_name(concept) / f"seed{seed}"
    if (run / "report.json").exists() and (run / "learned_embeds.safetensors").exists():
        return run
    command = [sys.executable, str(trainer), "--pretrained_model_name_or_path", str(PIPELINE),
               "--train_data_dir", str(concept_dir(out, concept)), "--placeholder_token", PLACEHOLDER,
               "--initializer_token", concept["shape"], *RECIPE, "--clip_model_name_or_path", str(clip),
               "--seed", str(seed), "--output_dir", str(run)]
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    started = time.time()
    with open(run / "train.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    (run / "timing.json").write_text(json.dumps({"train_s": time.time() - started}))
    return run


def judge_steps(run: Path, concept: dict[str, str], num_images: int) -> dict:
    """evaluate.py's reconstruction and editability of every learned_embeds-steps-N, in one process."""
    path = run / f"judged-n{num_images}.json"
    if path.exists():
        return json.loads(path.read_text())
    import judge as judge_lib
    import torch
    from evaluate import evaluate, load_pipeline
    from generate import load_learned_embeds, read_embeddings

    pipeline, judge = load_pipeline(PIPELINE), judge_lib.load_judge()
    steps = list(range(EVERY, STEPS + 1, EVERY))
    token = load_learned_embeds(pipeline, run / f"learned_embeds-steps-{steps[0]}.safetensors")[0]
    names = [token] + [f"{token}_{i}" for i in range(1, 2)]
    ids = pipeline.tokenizer.convert_tokens_to_ids(names)
    weight = pipeline.text_encoder.get_input_embeddings().weight
    judged = {}
    for step in steps:
        vectors = read_embeddings(run / f"learned_embeds-steps-{step}.safetensors")[token]
        with torch.no_grad():
            weight[ids] = vectors.reshape(len(ids), -1).to(weight.dtype)
        result = evaluate(pipeline, judge, token, concept["shape"], concept, [], num_images=num_images,
                          subjects=["learned"], num_vectors=len(ids))
        judged[str(step)] = {"reconstruction": result["reconstruction"]["learned"],
                             "editability": result["editability"]["learned"]}
        print(f"{run.relative_to(run.parents[2])} step {step}: {judged[str(step)]}", flush=True)
    path.write_text(json.dumps(judged, indent=1))
    return judged


def rescore(run: Path, concept: dict[str, str], out: Path, clip: Path) -> list[dict]:
    """The run's validations with CLIP-I/CLIP-T recomputed by another CLIP model from the saved validation images
    (validation/step-N.png: a row per prompt), exactly as the trainer computes them."""
    from PIL import Image
    from validation_report import ClipScorer, clip_scores

    scorer = ClipScorer(str(clip))
    training = [Image.open(p).convert("RGB") for p in sorted(concept_dir(out, concept).glob("*.png"))]
    reference = scorer.image_features(training)
    validations = json.loads((run / "report.json").read_text())["validations"]
    for record in validations:
        grid = Image.open(run / record["images"]).convert("RGB")
        rows, cols = record["grid"]["rows"], record["grid"]["cols"]
        w, h = grid.width // cols, grid.height // rows
        cells = [[grid.crop((x * w, y * h, (x + 1) * w, (y + 1) * h)) for x in range(cols)] for y in range(rows)]
        record.update(clip_scores(scorer, reference, list(zip(record["prompts"], cells)), [PLACEHOLDER]))
    return validations


def early_stop(validations: list[dict], patience: int) -> tuple[int, int]:
    """(the step a run with this patience stops at, the best step it keeps): the trainer's own ScoreHistory, fed the
    run's validations one by one."""
    import torch
    from validation_report import ScoreHistory

    history = ScoreHistory()
    for record in validations:
        history.add(dict(record), {"vectors": torch.zeros(1)})  # the vectors do not matter to the choice
        if history.patience_spent(patience) and record["step"] < STEPS:
            break
    return history.validations[-1]["step"], history.best["step"]


def cell(run: Path, concept: dict[str, str], seed: int, judged: dict, validations: list[dict]) -> dict:
    recon = {int(s): v["reconstruction"] for s, v in judged.items()}
    edit = {int(s): v["editability"] for s, v in judged.items()}
    chosen = early_stop(validations, len(validations) + 1)[1]  # the trainer's rule (step_score) over every step
    by_loss = min(validations, key=lambda r: r["validation_loss"])["step"]
    row = {"concept": world.concept_words(concept), "seed": seed, "chosen": chosen,
           "judged_best_reconstruction": max(recon.values()), "judged_best_editability": max(edit.values()),
           "chosen_reconstruction": recon[chosen], "chosen_editability": edit[chosen],
           "by_validation_loss": by_loss, "by_validation_loss_reconstruction": recon[by_loss],
           "by_validation_loss_editability": edit[by_loss],
           "last_reconstruction": recon[STEPS], "last_editability": edit[STEPS],
           "validation_seconds": sum(r.get("seconds", 0) for r in validations),
           "per_step": {s: {"judged": judged[str(s)], "clip_i": r.get("clip_i"), "clip_t": r.get("clip_t"),
                            "validation_loss": r["validation_loss"],
                            "norm_ratio": max(max(v) for v in r["norm_ratio"].values())}
                        for r in validations for s in [r["step"]]}}
    row["within_0.1"] = (row["judged_best_reconstruction"] - row["chosen_reconstruction"] <= 0.1 + 1e-9
                         and row["judged_best_editability"] - row["chosen_editability"] <= 0.1 + 1e-9)
    best_mean = max((recon[s] + edit[s]) / 2 for s in recon)
    for patience in PATIENCES:
        stop, kept = early_stop(validations, patience)
        quality = (recon[kept] + edit[kept]) / 2
        full = (recon[chosen] + edit[chosen]) / 2
        row[f"patience_{patience}"] = {"stop": stop, "kept": kept, "saved": 1 - stop / STEPS,
                                       "reconstruction": recon[kept], "editability": edit[kept],
                                       "judged_loss_vs_full_run": full - quality,
                                       "judged_loss_vs_judged_best": best_mean - quality}
    return row


def markdown(rows: list[dict], num_images: int) -> str:
    lines = [f"Judged with {num_images} samples per prompt (evaluate.py: DPM-Solver++ 25 steps, guidance 5). "
             "Reconstruction / editability of: the judged best save (each maximised separately), the step the "
             "trainer chose (learned_embeds-best), the lowest validation loss, and the last step.", "",
             "| concept | seed | judged best | chosen step | chosen judged | within 0.1 "
             "| lowest val loss: step, judged "
             "| last step judged |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concept']} | {r['seed']} | {r['judged_best_reconstruction']:.2f} / "
                     f"{r['judged_best_editability']:.2f} | {r['chosen']} | {r['chosen_reconstruction']:.2f} / "
                     f"{r['chosen_editability']:.2f} | {'yes' if r['within_0.1'] else 'no'} | "
                     f"{r['by_validation_loss']}: "
                     f"{r['by_validation_loss_reconstruction']:.2f} / {r['by_validation_loss_editability']:.2f} | "
                     f"{r['last_reconstruction']:.2f} / {r['last_editability']:.2f} |")
    def mean(key, sub=None):
        return sum(r[key] if sub is None else r[key][sub] for r in rows) / len(rows)

    lines += ["", f"Means over the {len(rows)} runs: judged best {mean('judged_best_reconstruction'):.2f} / "
              f"{mean('judged_best_editability'):.2f}; chosen {mean('chosen_reconstruction'):.2f} / "
              f"{mean('chosen_editability'):.2f} (within 0.1 of the best on both in "
              f"{sum(r['within_0.1'] for r in rows)} of {len(rows)}); lowest validation loss "
              f"{mean('by_validation_loss_reconstruction'):.2f} / {mean('by_validation_loss_editability'):.2f}; last "
              f"step {mean('last_reconstruction'):.2f} / {mean('last_editability'):.2f}."]
    lines += ["", "Early stopping (replayed from report.json): where it stops, the share of the 1,000 steps saved, and "
              "how much lower its best file is judged (mean of reconstruction and editability) than the full run's "
              "chosen step, and than the run's best judged save.", "",
              "| concept | seed | " + " | ".join(f"patience {p}: stop, saved, judged loss vs chosen, vs best"
                                                 for p in PATIENCES) + " |",
              "|---|---|" + "---|" * len(PATIENCES)]
    for r in rows:
        cells = [f"{r[f'patience_{p}']['stop']}, {r[f'patience_{p}']['saved']:.0%}, "
                 f"{r[f'patience_{p}']['judged_loss_vs_full_run']:+.3f}, "
                 f"{r[f'patience_{p}']['judged_loss_vs_judged_best']:+.3f}" for p in PATIENCES]
        lines.append(f"| {r['concept']} | {r['seed']} | " + " | ".join(cells) + " |")
    for p in PATIENCES:
        runs = [r[f"patience_{p}"] for r in rows]
        lines.append(f"\nPatience {p}: mean saved {sum(x['saved'] for x in runs) / len(runs):.0%} (at least 40% in "
                     f"{sum(x['saved'] >= 0.4 for x in runs)} of {len(runs)} runs); judged loss vs the full run's "
                     f"chosen step at most {max(x['judged_loss_vs_full_run'] for x in runs):+.3f}, vs the best judged "
                     f"save at most {max(x['judged_loss_vs_judged_best'] for x in runs):+.3f}.")
    lines += ["", "Per step (judged reconstruction / editability; CLIP-I, CLIP-T; validation loss; largest norm "
              "ratio):", ""]
    for r in rows:
        lines.append(f"- **{r['concept']}, seed {r['seed']}**: " + "; ".join(
            f"{s}: {v['judged']['reconstruction']:.2f}/{v['judged']['editability']:.2f} "
            f"({v['clip_i']:.3f}, {v['clip_t']:.3f}; {v['validation_loss']:.4f}; {v['norm_ratio']:.1f}x)"
            for s, v in r["per_step"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "which_step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--concepts", type=int, nargs="+", default=list(range(len(DEFAULT_CONCEPTS))),
                        help="indices into recipes.DEFAULT_CONCEPTS (0 is the demo's)")
    parser.add_argument("--num_images", type=int, default=32, help="judged samples per prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--clip", type=Path, default=CLIP, help="the CLIP model that scores validations")
    parser.add_argument("--rescore_clip", type=Path, default=None,
                        help="recompute CLIP-I/CLIP-T with this CLIP from the saved validation images")
    parser.add_argument("--trainer", type=Path, default=TRAINER,
                        help="the trainer to run (e.g. a snapshot beside its templates.py and validation_report.py)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for index in args.concepts:
        concept = DEFAULT_CONCEPTS[index]
        for seed in args.seeds:
            run = args.out / "runs" / world.concept_name(concept) / f"seed{seed}"
            if not args.report_only:
                run = train(args.out, concept, seed, args.threads, args.trainer, args.clip)
                judge_steps(run, concept, args.num_images)
            judged_file = run / f"judged-n{args.num_images}.json"
            if judged_file.exists() and (run / "report.json").exists():
                validations = json.loads((run / "report.json").read_text())["validations"]
                if args.rescore_clip:
                    validations = rescore(run, concept, args.out, args.rescore_clip)
                rows.append(cell(run, concept, seed, json.loads(judged_file.read_text()), validations))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text(markdown(rows, args.num_images))
    print(markdown(rows, args.num_images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
