#!/usr/bin/env python
"""How close a training step of train_textual_inversion.py comes to its compute floor, and what it costs.

    python benchmarks/bench_step.py --pipeline tiny --resolution 64 --batch_size 4
    python benchmarks/bench_step.py --pipeline sd15 --resolution 128 --batch_size 1 --variant= --variant=--no_cache_latents

Each variant (extra trainer flags) runs in a fresh process, so start-up and peak memory are its own. The process
runs the real `main()` on examples/concept and timestamps every step as the training loop receives it (data, forward,
backward, all-reduce, optimizer, logging: the step as the script runs it). Afterwards, in the same process and with the
same models, it times the compute floor: text encoder + UNet forward and backward alone, same shapes.

Columns: step = median step time after warm-up; floor = median floor time; ratio = step / floor; start-up = process
start to the first step; first step = its time (compilation happens there); compile = Dynamo's and Inductor's own
wall time in the process, every compile and recompile (the final validation's no-grad forward is one), 0 without
--compile_unet; peak = peak resident memory (CPU) or allocated memory (CUDA) while training, with the peak
while loading in brackets; base = what the process held just before loading the models (on a CPU, ~0.5 GB of
Python and libraries); weights = bytes of the frozen text encoder, VAE and UNet; grad/step = bytes of the
trainable parameters, which is what DDP all-reduces each step; ckpt = one checkpoint-N folder.

`--pipeline sd15` builds a pipeline with Stable Diffusion 1.5's layer sizes and random weights (4.3 GB, once) under
benchmarks/models/ (git-ignored); `tiny` is examples/tiny-sd; anything else is a pipeline folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="tiny", help="tiny, sd15, or a pipeline folder")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed steps, after --warmup_steps")
    p.add_argument("--warmup_steps", type=int, default=3, help="untimed first steps (allocator, compile)")
    p.add_argument("--floor_repeats", type=int, default=None, help="floor timings (default: --steps)")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--variant", action="append", default=None,
                   help='extra trainer flags, e.g. --variant=--no_cache_latents; repeat for more rows (default: one, "")')
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--progress", default=None,
                   help="rewrite this JSON file with what is measured so far, after every step (for a caller that may "
                        "kill this run: benchmarks/gpu_check.py)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: the measuring child process
    return p.parse_args(argv)


def pipeline_folder(name: str) -> Path:
    """The pipeline to benchmark, built on first use."""
    from make_tiny_pipeline import build_sd15_shaped_pipeline, build_tiny_flux_pipeline, build_tiny_pipeline

    builders = {"tiny": (ROOT / "examples" / "tiny-sd", build_tiny_pipeline),
                "sd15": (ROOT / "benchmarks" / "models" / "sd15-shaped", build_sd15_shaped_pipeline),
                "tiny-flux": (ROOT / "benchmarks" / "models" / "tiny-flux", build_tiny_flux_pipeline)}
    if name not in builders:
        return Path(name)
    folder, build = builders[name]
    if not (folder / "model_index.json").is_file():
        print(f"building {folder} ...", file=sys.stderr)
        build(folder)
    return folder


def trainer_argv(args: argparse.Namespace, pipeline: Path, out: Path, variant: str) -> list[str]:
    total = args.warmup_steps + args.steps
    return ["--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(ROOT / "examples" / "concept"),
            "--placeholder_token", "<bench>", "--initializer_token", "toy", "--output_dir", str(out),
            "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
            "--max_train_steps", str(total), "--checkpointing_steps", str(total), "--save_steps", str(10 * total),
            "--learning_rate", "5e-3", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none",
            "--mixed_precision", args.mixed_precision, *shlex.split(variant)]


# ---- The measuring child ---------------------------------------------------------------------------------------------
def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def compile_seconds() -> float:
    """Dynamo's and Inductor's wall time so far in this process, every compile and recompile; 0 if none ran. From
    torch's private timing table: one that has moved or changed reads as 0, the step times are unaffected."""
    utils = sys.modules.get("torch._dynamo.utils")  # imported by the first compile: nothing to import here otherwise
    try:
        return float(utils.calculate_time_spent().get("total_wall_time", 0.0)) if utils else 0.0
    except Exception:  # noqa: BLE001 - a private API; the benchmark must not fail on it
        return 0.0


def write_progress(path: str | None, progress: dict) -> None:
    """What is measured so far, replaced whole (never half-written): the caller reads it after killing this process."""
    if path:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps({**progress, "compile_s": compile_seconds(), "wall": time.time()}))
        os.replace(tmp, path)


def measure(args: argparse.Namespace, process_start: float, progress_path: str | None = None) -> dict:
    import torch

    import train_textual_inversion as tti

    seen: dict = {"stamps": []}
    total_steps = args.warmup_steps + args.steps
    progress = {"phase": "loading", "startup_s": None, "step_times": [], "warmup_steps": args.warmup_steps,
                "total_steps": total_steps}
    write_progress(progress_path, progress)
    excluded = 0.0  # time spent writing progress, kept out of the step times

    def stamp() -> None:
        nonlocal excluded
        seen["stamps"].append(time.perf_counter() - excluded)
        began = time.perf_counter()
        progress["step_times"] = [b - a for a, b in zip(seen["stamps"], seen["stamps"][1:])]
        write_progress(progress_path, progress)
        excluded += time.perf_counter() - began

    cuda = torch.cuda.is_available()
    load, iterate = tti.load_frozen_models, tti.iterate_steps

    def load_and_keep(*a, **k):
        seen["baseline"] = torch.cuda.memory_allocated() if cuda else rss_kib("VmRSS") * 1024
        seen["models"] = load(*a, **k)
        return seen["models"]

    def timed_steps(*a, **k):
        for item in iterate(*a, **k):
            if not seen["stamps"]:  # first step: loading is over, start the training-only peak
                seen["first_step_wall"] = time.time()
                seen["load_peak"] = torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024
                torch.cuda.reset_peak_memory_stats() if cuda else reset_peak_rss()
                progress.update(phase="training", startup_s=seen["first_step_wall"] - process_start)
            stamp()
            yield item
        progress["phase"] = "after training"  # the final validation and checkpoint, then the floor
        stamp()

    plan_run_memory = tti.plan_run_memory

    def plan_and_keep(*a, **k):
        seen["plan"] = plan_run_memory(*a, **k)
        return seen["plan"]

    tti.load_frozen_models, tti.iterate_steps, tti.plan_run_memory = load_and_keep, timed_steps, plan_and_keep
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        tti.main(tti.parse_args(trainer_argv(args, pipeline_folder(args.pipeline), out, args.worker)))
        train_peak = torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024
        checkpoint_bytes = sum(f.stat().st_size for f in next(out.glob("checkpoint-*")).iterdir())
    models = seen["models"]
    steps = [b - a for a, b in zip(seen["stamps"], seen["stamps"][1:])][args.warmup_steps:]
    write_progress(progress_path, {**progress, "phase": "floor"})
    floor = floor_times(models, args.batch_size, args.resolution, args.floor_repeats or args.steps)
    weights = sum(t.numel() * t.element_size() for m in (models.prompt_encoder, models.vae, models.denoiser)
                  for t in [*m.parameters(), *m.buffers()])
    return {"step_s": statistics.median(steps), "floor_s": statistics.median(floor),
            "first_step_s": seen["stamps"][1] - seen["stamps"][0], "compile_s": compile_seconds(),
            "startup_s": seen["first_step_wall"] - process_start, "peak_bytes": train_peak,
            "load_peak_bytes": seen["load_peak"], "plan_bytes": seen["plan"].peak, "baseline_bytes": seen["baseline"], "weights_bytes": weights,
            "grad_bytes": sum(p.numel() * p.element_size() for p in models.prompt_encoder.parameters()
                              if p.requires_grad),
            "checkpoint_bytes": checkpoint_bytes, "device": device_name(), "threads": torch.get_num_threads()}


def floor_times(models, batch_size: int, resolution: int, repeats: int) -> list[float]:
    """Text encoder(s) + denoiser forward and backward to the placeholder vectors, nothing else: the irreducible
    step (any family: the prediction goes through its adapter)."""
    import torch
    import torch.nn.functional as F

    import train_textual_inversion as tti

    device = models.embeddings[0].vectors.device
    family = tti.FAMILY_NAMES[models.family]
    text = f"a photo of a {models.tokenizers[0].convert_ids_to_tokens(models.embeddings[0].first_placeholder_id)}"
    input_ids = tti.stack_windows([tokenizer([text] * batch_size, padding="max_length", return_tensors="pt",
                                             max_length=tokenizer.model_max_length).input_ids
                                   for tokenizer in models.tokenizers]).to(device)
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    shape = (batch_size, models.vae.config.latent_channels, resolution // factor, resolution // factor)
    generator = torch.Generator(device).manual_seed(0)
    noisy = torch.randn(shape, generator=generator, device=device)
    target = torch.randn(shape, generator=generator, device=device)
    timesteps = models.process.draw_timesteps(noisy, generator)
    conditions = None if models.conditions is None else models.conditions[[0] * batch_size]
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        hidden, pooled = models.prompt_encoder(input_ids)
        prediction = family.predict(models.denoiser, noisy, timesteps, hidden, pooled, conditions, models.weight_dtype)
        F.mse_loss(prediction.float(), target).backward()
        sync(device)
        times.append(time.perf_counter() - start)
        for embedding in models.embeddings:
            embedding.vectors.grad = None
    return times[1:]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


# ---- The table -------------------------------------------------------------------------------------------------------
def run_variant(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, f"--worker={variant}", "--pipeline", args.pipeline,
           "--resolution", str(args.resolution), "--batch_size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup_steps", str(args.warmup_steps), "--mixed_precision", args.mixed_precision]
    if args.floor_repeats:
        cmd += ["--floor_repeats", str(args.floor_repeats)]
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        env = {**os.environ, "BENCH_RESULT": result.name, "BENCH_START": repr(time.time())}
        if args.progress:
            env["BENCH_PROGRESS"] = args.progress
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"variant {variant!r} failed:\n{proc.stderr[-3000:]}")
        return {"variant": variant or "(default)", **json.loads(Path(result.name).read_text())}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"pipeline {args.pipeline}, {args.resolution} px, batch {args.batch_size}, precision {args.mixed_precision}, "
          f"{rows[0]['device']}, {rows[0]['threads']} torch threads; median of {args.steps} steps")
    head = ["variant", "step", "floor", "ratio", "start-up", "first step", "compile", "peak (load)", "weights",
            "peak/weights", "(peak-base)/weights", "grad/step", "ckpt"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["variant"], f"{r['step_s']:.3f} s", f"{r['floor_s']:.3f} s", f"{r['step_s'] / r['floor_s']:.3f}",
                 f"{r['startup_s']:.1f} s", f"{r['first_step_s']:.1f} s", f"{r['compile_s']:.1f} s",
                 f"{mib(r['peak_bytes'])} ({mib(r['load_peak_bytes'])})", mib(r["weights_bytes"]),
                 f"{r['peak_bytes'] / r['weights_bytes']:.2f}",
                 f"{(r['peak_bytes'] - r['baseline_bytes']) / r['weights_bytes']:.2f}", mib(r["grad_bytes"]),
                 mib(r["checkpoint_bytes"])]
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        result = measure(args, float(os.environ["BENCH_START"]), os.environ.get("BENCH_PROGRESS"))
        Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(result))
        return 0
    pipeline_folder(args.pipeline)  # build once, outside the timed processes
    rows = [run_variant(args, variant) for variant in (args.variant or [""])]
    print_table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
