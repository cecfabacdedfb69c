#!/usr/bin/env python
"""What validating costs next to training: measured in the toy world, counted for the SD-1.5 shape.

    python benchmarks/bench_validation.py --threads 1
    python benchmarks/bench_validation.py --threads 1 --steps 1000 --validation_steps 100 --num_validation_images 4

Runs the real `main()` in this process on the `make demo` recipe (the toy-world pipeline and concept, captions),
with validation every --validation_steps: the validation loss, --num_validation_images images for the reconstruction
prompt and each edit prompt (25 DPM-Solver++ steps), and CLIP-I/CLIP-T with the toy CLIP (examples/toy_world/clip).
It times the training loop, every validation (`validate`) and the rest of each step's saving, and prints:

    training      the loop's time less validations and saves
    validation    the sum over validations, and its share of training (the issue's target: at most 10%)

Then the same validation counted in UNet image-forwards for the SD-1.5 shape, where the UNet is nearly all the cost:
a training step at batch B is a forward and a backward through the UNet (about 3 forwards) of B images; a validation
is (1 + edits) prompts x N images x 25 sampling steps x 2 (classifier-free guidance) forwards, plus the validation
loss (images x 5 timesteps forwards), the VAE decode and CLIP, which are small next to them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
TOY = ROOT / "examples" / "toy_world"
EDITS = ["a photo of a <toy-concept> on a pink background", "a photo of a small <toy-concept>"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--num_validation_images", type=int, default=4)
    p.add_argument("--no_clip", action="store_true", help="validate without CLIP scores")
    p.add_argument("--inference_steps", type=int, default=25, help="--validation_inference_steps")
    p.add_argument("--batch_size", type=int, default=4, help="--train_batch_size (the demo's 4; the default is 16)")
    p.add_argument("--clip", default=str(TOY / "clip"), help="the CLIP model (default: the toy CLIP)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sd15_batch_size", type=int, default=16, help="the SD-1.5 training batch for the count")
    return p.parse_args(argv)


def timed(module, name: str, seconds: list[float]):
    """Wrap module.name so that each call's duration is appended to `seconds`."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(module, name, wrapper)


def sd15_count(prompts: int, images: int, batch: int, every: int, steps: int, num_images: int = 5) -> str:
    validation = prompts * images * steps * 2 + num_images * 5
    training = every * 3 * batch
    return (f"SD-1.5 shape, count: a validation is {prompts} prompts x {images} images x {steps} steps x 2 (CFG) + "
            f"{num_images} images x 5 timesteps = {validation} UNet image-forwards; {every} training steps at batch "
            f"{batch} are {every} x 3 x {batch} = {training}: validation adds {validation / training:.0%}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import train_textual_inversion as tti

    loop, validations, saves = [], [], []
    timed(tti, "train", loop)
    timed(tti, "validate", validations)
    timed(tti, "save_step_outputs", saves)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--pretrained_model_name_or_path", str(TOY / "pipeline"), "--train_data_dir",
                str(ROOT / "examples" / "toy_concept"), "--placeholder_token", "<toy-concept>",
                "--initializer_token", "triangle", "--num_vectors", "2", "--templates",
                str(TOY / "caption_templates.txt"), "--caption_extension", ".txt", "--resolution", "32",
                "--train_batch_size", str(args.batch_size), "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
                "--seed", "0",
                "--max_train_steps", str(args.steps), "--validation_steps", str(args.validation_steps),
                "--save_steps", str(args.steps), "--checkpointing_steps", str(args.steps), "--report_to", "none",
                "--num_validation_images", str(args.num_validation_images), "--validation_guidance_scale", "5",
                "--validation_inference_steps", str(args.inference_steps),
                "--output_dir", out, *[w for e in EDITS for w in ("--validation_prompt", e)]]
        if not args.no_clip:
            argv += ["--clip_model_name_or_path", args.clip]
        tti.main(tti.parse_args(argv))
    training = loop[0] - sum(saves)
    validation = sum(validations)
    print(f"toy world, {args.steps} steps at batch {args.batch_size}, validation every {args.validation_steps} "
          f"({len(validations)} validations, {1 + len(EDITS)} prompts x {args.num_validation_images} images x "
          f"{args.inference_steps} sampling steps{', no CLIP' if args.no_clip else ''}; "
          f"torch threads {torch.get_num_threads()}):")
    print(f"  training {training:.1f} s ({1000 * training / args.steps:.1f} ms/step), validation {validation:.1f} s "
          f"({1000 * validation / len(validations):.0f} ms each) = {validation / training:.1%} of training; "
          f"other saving {sum(saves) - validation:.1f} s")
    for edits in (len(EDITS), 3):
        print("  " + sd15_count(1 + edits, args.num_validation_images, args.sd15_batch_size, args.validation_steps,
                                args.inference_steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
