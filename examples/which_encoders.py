"""Which text encoders to train on SD3 and Flux: the validation-loss drop each choice buys, on the tiny pipelines.

    python examples/which_encoders.py [--steps 300] [--seeds 0 1]

For each family (tiny SD3, tiny Flux-dev from make_tiny_pipeline.py), each --text_encoders choice (all of them, the
CLIP encoders only, T5 only) and each seed, trains --steps steps and reports how far the validation loss fell below
the initializer's vectors (the same run at a learning rate of 1e-12). The tiny pipelines have random weights, so
this measures how much each encoder's vectors can move the denoiser's prediction in that architecture, not how
real SD3 or Flux weights respond. Each run prints a line; the table comes at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_pipeline import build_tiny_flux_pipeline, build_tiny_sd3_pipeline  # noqa: E402

CHOICES = {"sd3": ["clip_l,clip_g,t5", "clip_l,clip_g", "t5"], "flux": ["clip_l,t5", "clip_l", "t5"]}


def validation_losses(pipeline: Path, out: Path, seed: int, steps: int, extra: list[str]) -> list[float]:
    """Train once (1 thread, quiet) and return the validation losses, every steps // 6 steps."""
    command = [sys.executable, str(ROOT / "train_textual_inversion.py"), "--pretrained_model_name_or_path",
               str(pipeline), "--train_data_dir", str(ROOT / "examples" / "concept"), "--placeholder_token",
               "<cat-toy>", "--initializer_token", "toy", "--output_dir", str(out), "--resolution", "32",
               "--train_batch_size", "4", "--max_train_steps", str(steps), "--learning_rate", "5e-3",
               "--lr_warmup_steps", "0", "--validation_steps", str(max(1, steps // 6)), "--seed", str(seed),
               "--report_to", "none", "--checkpointing_steps", "100000", "--save_steps", "100000", *extra]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads((out / "report.json").read_text())
    return [v["validation_loss"] for v in report["validations"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipelines = {"sd3": build_tiny_sd3_pipeline(tmp / "sd3"), "flux": build_tiny_flux_pipeline(tmp / "flux")}
        for family, pipeline in pipelines.items():
            for seed in args.seeds:
                start = validation_losses(pipeline, tmp / f"{family}-start-{seed}", seed, 1,
                                          ["--learning_rate", "1e-12", "--t5_learning_rate", "1e-12"])[0]
                for choice in CHOICES[family]:
                    losses = validation_losses(pipeline, tmp / f"{family}-{choice}-{seed}", seed, args.steps,
                                               ["--text_encoders", choice])
                    rows.append((family, choice, seed, start - min(losses), start - losses[-1]))
                    print(f"{family} {choice:16s} seed {seed}: start {start:.4f}, best drop {rows[-1][3]:.4f}, "
                          f"last drop {rows[-1][4]:.4f}", flush=True)
    print("\n| family | --text_encoders | validation-loss drop, best step | at the last step |\n|---|---|---|---|")
    for family in CHOICES:
        for choice in CHOICES[family]:
            mine = [r for r in rows if r[:2] == (family, choice)]
            best, last = (statistics.mean(r[i] for r in mine) for i in (3, 4))
            print(f"| {family} | {choice} | {best:.4f} | {last:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
