"""Generate an image grid from a base Stable Diffusion (1.x, 2.x or XL) pipeline plus learned embeddings.

    python examples/generate.py --pretrained_model_name_or_path examples/tiny-sd \\
        --learned_embeds out/learned_embeds.safetensors --prompt "a photo of <my-toy>"
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The same grid as the trainer's validation images, and the same CLIP pooling as in training.
from train_textual_inversion import image_grid, pool_at_end_of_text  # noqa: E402

# diffusers is imported in main(), after the argument checks: importing it is
# slow and makes transformers log warnings, which would bury a one-line error.
if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

EMBEDS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


def resolve_embeds_path(path: str | Path) -> Path:
    """Return the embeddings file for `path` (a file, or a folder holding learned_embeds.safetensors/.bin)."""
    path = Path(path)
    if path.is_dir():
        for name in EMBEDS_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {' or '.join(EMBEDS_NAMES)} in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"learned embeddings not found: {path}")
    return path


def read_embeddings(file: Path) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """`{token: tensor[n, dim]}`, or for SDXL `{token: {"clip_l": T, "clip_g": T}}`, from every common format.

    diffusers `{token: T}`; AUTOMATIC1111 `.pt` (`string_to_param`); kohya/InvokeAI `{"emb_params": T}`; OneTrainer
    `{"emp_params": T}`; SDXL `{"clip_l": T, "clip_g": T}` (kohya, AUTOMATIC1111, ComfyUI, InvokeAI and this
    project's trainer). Files without a usable token name take it from the `placeholder_token` our trainer writes
    into a .safetensors' metadata or else, as in every app, from the file name ("my-toy.pt" -> "my-toy").
    """
    # Read the file ourselves (rather than handing load_textual_inversion the path) so we know the token names and
    # can accept files with several tokens; weights_only keeps a .pt/.bin from running arbitrary pickled code.
    metadata = {}
    if file.suffix == ".safetensors":
        state = load_file(file)
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {}
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    token = metadata.get("placeholder_token", file.stem)
    if "string_to_param" in state:
        return {file.stem: next(iter(state["string_to_param"].values())).float()}
    for key in ("emb_params", "emp_params"):
        if key in state:  # kohya's and InvokeAI's layout, also this trainer's <word> files
            return {token: state[key].float()}
    if {"clip_l", "clip_g"} <= set(state):
        return {token: {"clip_l": state["clip_l"].float(), "clip_g": state["clip_g"].float()}}
    return state


def load_learned_embeds(pipeline: DiffusionPipeline, path: str | Path) -> list[str]:
    """Add the tokens of an embeddings file (any format read_embeddings knows) to an SD 1.x/2.x or SDXL pipeline;
    return those tokens. Copy this function and read_embeddings into your own code if you like.

    A token whose tensor has n > 1 rows is registered as `tok`, `tok_1`, ..., `tok_{n-1}`, and the pipeline expands
    `tok` in prompts to all n of them, so prompts only ever need the returned names. SDXL files load into both text
    encoders. As in training, CLIP then pools at the end-of-text token (see pool_at_end_of_text in the trainer).
    """
    file = resolve_embeds_path(path)
    embeds = read_embeddings(file)
    if not embeds:
        raise ValueError(f"{file} holds no embeddings")
    encoders = [(pipeline.text_encoder, pipeline.tokenizer)]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        encoders.append((pipeline.text_encoder_2, pipeline.tokenizer_2))
    for token, value in embeds.items():
        per_encoder = [value["clip_l"], value["clip_g"]] if isinstance(value, dict) else [value]
        if len(per_encoder) != len(encoders):
            kind = "an SDXL (clip_l/clip_g)" if isinstance(value, dict) else "a single-text-encoder (SD 1.x/2.x)"
            raise ValueError(f"{file} is {kind} embedding, but this pipeline has {len(encoders)} text encoder(s)")
        for (text_encoder, tokenizer), vectors in zip(encoders, per_encoder):
            # Checked here because diffusers 0.42's own shape error prints unformatted placeholders.
            dim = text_encoder.get_input_embeddings().weight.shape[-1]
            if vectors.shape[-1] != dim:
                raise ValueError(f"{token!r} has {vectors.shape[-1]}-dim vectors but this text encoder uses {dim}")
            # CLIP's tokenizer lowercases prompts before matching added tokens, so the `tok` -> `tok tok_1 ...`
            # expansion misses a token with capitals and silently uses only its first vector.
            if token != token.lower() and vectors.ndim > 1 and vectors.shape[0] > 1:
                warnings.warn(f"multi-vector token {token!r} has upper-case letters; only its first vector is used")
            pipeline.load_textual_inversion(vectors, token=token, text_encoder=text_encoder, tokenizer=tokenizer)
    for text_encoder, tokenizer in encoders:
        pool_at_end_of_text(text_encoder, tokenizer)
    return list(embeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="base pipeline folder or hub id")
    parser.add_argument("--learned_embeds", required=True, help="embeddings file, or a folder containing learned_embeds.safetensors/.bin")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="square side in px (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="grid.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num_images must be at least 1")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        # The VAE downsamples by 8; other sizes fail deep inside the UNet.
        parser.error("--resolution must be a positive multiple of 8")

    # Check the embeddings before loading the base model: that load can take
    # minutes for a real checkpoint, and a typo should not cost that.
    try:
        resolve_embeds_path(args.learned_embeds)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from train_textual_inversion import quiet_libraries

    quiet_libraries()
    # fp16 halves GPU memory and is how SD-1.x is normally run; CPUs lack fast fp16.
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipeline = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype)  # SD or SDXL
    # Same sampler as diffusers' textual-inversion example: good images in ~25
    # steps. from_config keeps the model's prediction_type and beta schedule.
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    try:
        tokens = load_learned_embeds(pipeline, args.learned_embeds)
    except ValueError as e:  # wrong size, token already in the vocabulary, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipeline.to(args.device)
    print(f"loaded token(s): {', '.join(tokens)}")
    if not any(t in args.prompt for t in tokens):
        print(f"warning: the prompt uses none of the learned tokens {tokens}", file=sys.stderr)

    # A CPU generator gives the same starting noise on every device, so a seed
    # reproduces the same grid on CPU and GPU (up to numerics).
    generator = torch.Generator("cpu").manual_seed(args.seed)
    images = pipeline(
        args.prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        generator=generator,
    ).images

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(out)
    print(f"saved {len(images)} image(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
