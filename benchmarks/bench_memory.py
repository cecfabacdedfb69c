#!/usr/bin/env python
"""Peak memory per --base_weight_dtype mode, against the memory plan's prediction, and what each mode costs in time.

    python benchmarks/bench_memory.py                       # SD-1.5 shape, 64 px, bf16 / fp8 / nf4 x checkpointing
    python benchmarks/bench_memory.py --resolution 256 --pipeline sd15
    python benchmarks/bench_memory.py --pipeline tiny-flux --resolution 64

Each mode runs the real `main()` in a fresh process for a few steps. On a CPU the peak is *allocated* memory:
RssAnon of /proc/self/status, polled every 2 ms by a thread (max RSS would also count the model files' pages mapped
while loading, which the kernel can drop), with glibc told to return freed memory at once (otherwise RssAnon
counts what malloc keeps for reuse: every layer's freed fp8 upcast, say). On CUDA it is torch.cuda.max_memory_allocated(). The plan is the one the
run logs (memory_plan.py, from the configs on the meta device), for the same device.

`--pipeline sd15` is Stable Diffusion 1.5's layer sizes with random weights, built once under benchmarks/models/
(git-ignored) and stored in fp32, so that in every mode the bf16 weights are allocated, as on a GPU (a bf16 file
loaded in bf16 would stay mapped from the file and not count). `tiny-flux` is examples/make_tiny_pipeline.py's.

Columns: mode; plan = the plan's peak; measured = the peak while training (the steps, not the
validation); error = (plan - measured) / measured; loading = the peak
before the first step (on a CPU, loading's own transients); validation = the peak while validating (the
validation loss and images, each vector's nearest words over the vocabulary); base = RssAnon just before the plan (Python and libraries; the plan's `runtime` line assumes 0.45 GB); step = median step time
after the first; vs bf16 = that over bf16's with the same checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")]

from bench_step import pipeline_folder  # noqa: E402  (sd15, tiny-flux or a folder; built on first use)

MODES = ["", "--gradient_checkpointing", "--base_weight_dtype fp8", "--base_weight_dtype fp8 --gradient_checkpointing",
         "--base_weight_dtype nf4", "--base_weight_dtype nf4 --gradient_checkpointing"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="sd15", help="sd15, tiny-flux, or a pipeline folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="training steps per mode (the first is not timed)")
    p.add_argument("--modes", nargs="*", default=MODES, help="extra trainer flags per mode ('' is plain bf16)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--plain_malloc", action="store_true",
                   help="glibc's usual allocator, which keeps freed memory (step times as users see them on a CPU)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def trainer_argv(args: argparse.Namespace, pipeline: Path, out: Path, mode: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(ROOT / "examples" / "concept"),
            "--placeholder_token", "<bench>", "--initializer_token", "toy", "--output_dir", str(out),
            "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
            "--max_train_steps", str(args.steps), "--checkpointing_steps", str(10 * args.steps),
            "--save_steps", str(10 * args.steps), "--learning_rate", "5e-3", "--lr_warmup_steps", "0", "--seed", "0",
            "--report_to", "none", "--mixed_precision", "bf16", "--num_validation_images", "1",
            "--validation_inference_steps", "2", *mode.split()]


# ---- The measuring child ---------------------------------------------------------------------------------------------
def anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon"))


class PeakPoller(threading.Thread):
    """RssAnon's maximum, read every 2 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(0.002)


def measure(args: argparse.Namespace) -> dict:
    import torch

    import train_textual_inversion as tti

    cuda = torch.cuda.is_available()
    poller, seen = PeakPoller(), {"steps": []}
    poller.start()
    plan_run_memory, training_loss = tti.plan_run_memory, tti.training_loss

    def plan_and_keep(*a, **k):
        seen["baseline"] = anonymous_bytes()
        seen["plan"] = plan_run_memory(*a, **k)
        return seen["plan"]

    def timed_loss(*a, **k):
        if torch.is_grad_enabled():  # training steps, not the validation loss
            if not seen["steps"]:  # loading is over: from here on, the training peak
                seen["load_peak"], poller.peak = poller.peak, 0
            seen["steps"].append(time.perf_counter())
        return training_loss(*a, **k)

    train, validate = tti.train, tti.validate

    def validate_apart(*a, **k):  # its own peak: images, and each vector's nearest words over the whole vocabulary
        seen["train_peak"] = max(seen.get("train_peak", 0), poller.peak)
        poller.peak = 0
        try:
            return validate(*a, **k)
        finally:
            seen["validation_peak"] = max(seen.get("validation_peak", 0), poller.peak)
            poller.peak = 0

    def train_and_stop_the_peak(*a, **k):
        result = train(*a, **k)
        seen["train_peak"], poller.peak = max(seen.get("train_peak", 0), poller.peak), 0  # the rest: saving, report
        return result

    tti.plan_run_memory, tti.training_loss, tti.train = plan_and_keep, timed_loss, train_and_stop_the_peak
    tti.validate = validate_apart
    with tempfile.TemporaryDirectory() as out:
        tti.main(tti.parse_args(trainer_argv(args, pipeline_folder(args.pipeline), Path(out), args.child)))
    poller.running = False
    poller.join()
    gaps = [b - a for a, b in zip(seen["steps"], seen["steps"][1:])]
    plan = seen["plan"]
    return {"mode": args.child or "bf16", "plan": plan.peak, "plan_weights": plan.weights,
            "plan_activations": plan.activations, "measured": torch.cuda.max_memory_allocated() if cuda else seen["train_peak"],
            "after_peak": poller.peak, "validation_peak": seen.get("validation_peak", 0),
            "load_peak": seen["load_peak"], "baseline": seen["baseline"], "step_s": statistics.median(gaps) if gaps else float("nan"),
            "device": "cuda" if cuda else "cpu"}


# ---- The parent ------------------------------------------------------------------------------------------------------
def run_mode(args: argparse.Namespace, mode: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        argv = [sys.executable, __file__, "--pipeline", args.pipeline, "--resolution", str(args.resolution),
                "--batch_size", str(args.batch_size), "--steps", str(args.steps), f"--child={mode}",
                "--json", result.name]
        # glibc keeps freed blocks under its mmap threshold (up to 32 MB) for reuse, so RssAnon would count every
        # layer's freed upcast copy; with allocations over 64 KiB mapped and unmapped at once, it follows what is
        # allocated, as torch.cuda.max_memory_allocated does on a GPU (--plain_malloc: the usual allocator).
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if not args.plain_malloc:
            env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        return json.loads(Path(result.name).read_text())


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    bf16 = {("checkpointing" in r["mode"]): r["step_s"] for r in rows if "base_weight_dtype" not in r["mode"]}
    malloc = "glibc's usual malloc" if args.plain_malloc else "malloc returning freed memory (MALLOC_MMAP_THRESHOLD_)"
    print(f"{args.pipeline}, {args.resolution} px, batch {args.batch_size}, bf16 compute, on {rows[0]['device']}, "
          f"{malloc}")
    print("| mode | plan GB | measured GB | error | loading GB | validation GB | base GB | step s | vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        reference = bf16.get("checkpointing" in r["mode"])
        slower = f"{r['step_s'] / reference:.2f}x" if reference else "-"
        print(f"| {r['mode']} | {r['plan'] / 1e9:.2f} | {r['measured'] / 1e9:.2f} | "
              f"{(r['plan'] - r['measured']) / r['measured']:+.0%} | {r['load_peak'] / 1e9:.2f} | {r['validation_peak'] / 1e9:.2f} | {r['baseline'] / 1e9:.2f} | {r['step_s']:.2f} | "
              f"{slower} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        Path(args.json).write_text(json.dumps(measure(args)))
        return 0
    pipeline_folder(args.pipeline)  # built once, before any mode is timed
    rows = []
    for mode in args.modes:
        rows.append(run_mode(args, mode))
        print(f"{mode or 'bf16'}: {json.dumps(rows[-1])}", file=sys.stderr)
    print_table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
