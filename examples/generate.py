"""Generate an image grid from a base Stable Diffusion (1.x, 2.x, XL or 3) or Flux.1 pipeline plus learned embeddings.

    python examples/generate.py --pretrained_model_name_or_path examples/tiny-sd \\
        --learned_embeds out/learned_embeds.safetensors --prompt "a photo of <my-toy>"

A single-file SD 1.x/2.x/XL checkpoint works as the base too (with `--single_file_config` naming the diffusers
folder its configs come from, when offline), and an SD3/Flux transformer file with `--transformer_file`, as in
training. For Flux.1-dev pass `--guidance_scale 3.5`, and for SD3 and Flux a `--resolution` that is a multiple of 16.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The same grid as the trainer's validation images, and the same CLIP pooling as in training.
from train_textual_inversion import image_grid, placeholder_token_names, pool_at_end_of_text  # noqa: E402
# The reader of every embedding format, shared with the trainer's --initial_embeddings.
from embedding_files import read_embeddings  # noqa: E402,F401

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


SINGLE = "single"  # the one text encoder of SD 1.x/2.x, whose files hold a bare tensor per token
FAMILIES = {  # the encoders a file holds vectors for (and a pipeline has), in read_embeddings' keys
    (SINGLE,): "single-text-encoder (SD 1.x/2.x)",
    ("clip_l", "clip_g"): "SDXL (clip_l/clip_g)",
    ("clip_l", "clip_g", "t5"): "SD3 (clip_l/clip_g/t5)",
    ("clip_l", "t5"): "Flux.1 (clip_l/t5)",
}


def encoder_slots(pipeline: DiffusionPipeline) -> dict[str, tuple[torch.nn.Module | None, object]]:
    """`{key: (text_encoder, tokenizer)}` of a pipeline, keyed like read_embeddings' dicts.

    An encoder may be None: SD3 loaded without T5 (`text_encoder_3=None`) still takes SD3 files, whose T5 vectors
    then have nowhere to go, and the SDXL refiner has only the second (CLIP-G) encoder.
    """
    first = (getattr(pipeline, "text_encoder", None), getattr(pipeline, "tokenizer", None))
    second = getattr(pipeline, "text_encoder_2", None)
    if second is None and not hasattr(pipeline, "text_encoder_3"):
        return {SINGLE: first}
    slots = {"clip_l": first}
    if second is not None:  # SDXL's and SD3's second encoder is CLIP-G; Flux's is T5
        slots["clip_g" if is_clip(second) else "t5"] = (second, pipeline.tokenizer_2)
    if hasattr(pipeline, "text_encoder_3"):
        slots["t5"] = (pipeline.text_encoder_3, pipeline.tokenizer_3)
    return slots


def is_clip(text_encoder: torch.nn.Module) -> bool:
    """Whether a text encoder is CLIP (CLIPTextModel, ...WithProjection; SD 2.x's OpenCLIP too), not T5.

    By the config's model_type: transformers 5's CLIPTextModel no longer has the `text_model` attribute that
    ...WithProjection (and transformers 4's CLIPTextModel) keep the transformer in.
    """
    return getattr(text_encoder.config, "model_type", None) == "clip_text_model"


def family_name(keys: Iterable[str]) -> str:
    keys = tuple(sorted(keys, key=(SINGLE, "clip_l", "clip_g", "t5").index))
    return FAMILIES.get(keys, "/".join(keys))


def check_fits(file: Path, token: str, vectors: dict[str, torch.Tensor],
               slots: dict[str, tuple[torch.nn.Module | None, object]]) -> None:
    """Raise ValueError unless `vectors` (one token's, per encoder) can be loaded into the pipeline's encoders."""
    if set(vectors) != set(slots):
        kind = family_name(vectors)
        article = "an" if kind.startswith("SD") else "a"  # "an SDXL", "an SD3", "a Flux.1", "a single-..."
        raise ValueError(f"{file} is {article} {kind} embedding, but this pipeline has {len(slots)} text "
                         f"encoder(s): {family_name(slots)}")
    for key, (text_encoder, tokenizer) in slots.items():
        if text_encoder is None:
            continue
        # Checked here because diffusers 0.42's own shape error prints unformatted placeholders.
        dim = text_encoder.get_input_embeddings().weight.shape[-1]
        if vectors[key].shape[-1] != dim:
            raise ValueError(f"{token!r} has {vectors[key].shape[-1]}-dim {key} vectors but this text encoder uses "
                             f"{dim}")
        # Before anything is added, so that a refused file leaves the pipeline as it was.
        vocab = tokenizer.get_vocab()
        for name in placeholder_token_names(token, num_vectors(vectors[key])):
            if name in vocab:
                raise ValueError(f"token {name!r} is already in the {key} tokenizer's vocabulary; rename the file's "
                                 "token or load it into a fresh pipeline")


def num_vectors(vectors: torch.Tensor) -> int:
    return vectors.shape[0] if vectors.ndim > 1 else 1  # old diffusers files hold one [dim] vector


def add_token_rows(text_encoder: torch.nn.Module, tokenizer, token: str, vectors: torch.Tensor) -> list[int]:
    """Add `token` (`tok`, `tok_1`, ... for n vectors, as diffusers names them) to the tokenizer and its vectors
    to the encoder's input embedding; return the new ids. For pipelines without load_textual_inversion (SD3)."""
    vectors = vectors.reshape(-1, vectors.shape[-1])
    names = placeholder_token_names(token, len(vectors))
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    # Grow only when the new ids do not fit: T5's table is padded past its tokenizer (32,128 rows for 32,100
    # tokens), and shrinking it to len(tokenizer), as load_textual_inversion's resize does, would drop rows.
    if max(ids) >= text_encoder.get_input_embeddings().num_embeddings:
        # mean_resizing=False: the new rows are overwritten below, so transformers' mean/covariance init is wasted.
        text_encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = vectors.to(dtype=weight.dtype, device=weight.device)
    return ids


def load_learned_embeds(pipeline: DiffusionPipeline, path: str | Path) -> list[str]:
    """Add the tokens of an embeddings file (any format read_embeddings knows) to an SD 1.x/2.x, SDXL, SD3 or Flux.1
    pipeline; return those tokens. Copy this function and the helpers above into your own code if you like.

    A token whose tensor has n > 1 rows is registered as `tok`, `tok_1`, ..., `tok_{n-1}`. SD 1.x/2.x, SDXL and Flux
    pipelines expand `tok` in prompts to all n of them; SD3's does not, so pass SD3 prompts through write_out_tokens.
    Multi-encoder files load into each encoder (SDXL: clip_l/clip_g; SD3: clip_l/clip_g/t5; Flux: clip_l/t5), and
    only into a pipeline with exactly those encoders. As in training, CLIP then pools at the end-of-text token (see
    pool_at_end_of_text in the trainer).
    """
    file = resolve_embeds_path(path)
    embeds = read_embeddings(file)
    if not embeds:
        raise ValueError(f"{file} holds no embeddings")
    slots = encoder_slots(pipeline)
    per_token = {token: value if isinstance(value, dict) else {SINGLE: value} for token, value in embeds.items()}
    for token, vectors in per_token.items():
        check_fits(file, token, vectors, slots)
    for token, vectors in per_token.items():
        for key, (text_encoder, tokenizer) in slots.items():
            if text_encoder is None:
                continue
            # CLIP's tokenizer lowercases prompts before matching added tokens, so the `tok` -> `tok tok_1 ...`
            # expansion misses a token with capitals and silently uses only its first vector. T5 keeps case.
            if is_clip(text_encoder) and token != token.lower() and num_vectors(vectors[key]) > 1:
                warnings.warn(f"multi-vector token {token!r} has upper-case letters; only its first vector is used")
            if hasattr(pipeline, "load_textual_inversion"):  # TextualInversionLoaderMixin: SD, SDXL, Flux
                pipeline.load_textual_inversion(vectors[key], token=token, text_encoder=text_encoder,
                                                tokenizer=tokenizer)
            else:  # SD3's pipeline has no loader
                add_token_rows(text_encoder, tokenizer, token, vectors[key])
    for text_encoder, tokenizer in slots.values():
        if text_encoder is not None:  # the trainer's function leaves T5 alone (it pools nothing)
            pool_at_end_of_text(text_encoder, tokenizer)
    return list(embeds)


def write_out_tokens(pipeline: DiffusionPipeline, prompt: str) -> str:
    """`prompt` with each loaded multi-vector token `tok` written out as `tok tok_1 ... tok_{n-1}`.

    For pipelines without diffusers' maybe_convert_prompt (SD3), which would otherwise feed only the first vector;
    the others expand prompts themselves and get `prompt` back unchanged.
    """
    if hasattr(pipeline, "maybe_convert_prompt"):
        return prompt
    counts: dict[str, int] = {}
    for _, tokenizer in encoder_slots(pipeline).values():
        added = set(getattr(tokenizer, "added_tokens_encoder", ()))
        for token in added:
            n = 1
            while f"{token}_{n}" in added:
                n += 1
            counts[token] = max(n, counts.get(token, 1))
    for token, n in counts.items():
        if n > 1:
            written_out = " ".join(placeholder_token_names(token, n))
            # Not inside a `tok_1` name, nor where `tok tok_1 ...` is already written out: that would repeat vectors
            # (and makes this idempotent). A function as the replacement, so a backslash in a name stays literal.
            pattern = re.escape(token) + r"(?!_\d)(?! " + re.escape(f"{token}_1") + ")"
            prompt = re.sub(pattern, lambda _: written_out, prompt)
    return prompt


def uses_flow_transformer(class_name: str) -> bool:
    """SD3's MMDiT and Flux's transformer: 2x2 latent patches (sizes in multiples of 16), flow-matching schedules."""
    return class_name.startswith(("StableDiffusion3", "Flux"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="base pipeline folder or hub id, or a single-file SD 1.x/2.x/XL checkpoint")
    parser.add_argument("--single_file_config", default=None,
                        help="with a single file: the diffusers folder or hub id its configs come from")
    parser.add_argument("--transformer_file", default=None,
                        help="SD 3/3.5 or Flux.1: a transformer file in place of the pipeline's (as in training)")
    parser.add_argument("--learned_embeds", required=True,
                        help="embeddings file, or a folder containing learned_embeds.safetensors/.bin")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5,
                        help="classifier-free guidance for SD 1.x/2.x/XL/3 (default 7.5); Flux.1-dev takes its "
                             "distilled guidance here instead, usually ~3.5 (Flux.1-schnell ignores it)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="square side in px, a multiple of 8 (16 for SD3 and Flux.1); default: the pipeline's")
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

    from diffusers import DPMSolverMultistepScheduler

    from frozen_models import UsageError, find_model_source, load_pipeline
    from train_textual_inversion import quiet_libraries

    quiet_libraries()
    # Where the weights are and the family (from model_index.json or a file's keys), before the (slow) load: it sets
    # the size rule and the dtype. The same checks as the trainer's, so a model it trained on loads here.
    try:
        source = find_model_source(args.pretrained_model_name_or_path, single_file_config=args.single_file_config,
                                   transformer_file=args.transformer_file)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flow = uses_flow_transformer(source.pipeline)
    if flow and args.resolution is not None and args.resolution % 16:
        # The VAE's 8x, then the transformer's 2x2 patches (SD3) or 2x2 latent packing (Flux).
        print(f"error: --resolution {args.resolution}: SD3 and Flux.1 need a multiple of 16", file=sys.stderr)
        return 2
    # fp16 halves GPU memory and is how SD-1.x is normally run; CPUs lack fast fp16. SD3 and Flux run in bf16, as
    # Flux's and SD3.5's model cards do: T5 v1.1 is known to overflow fp16. Embedding rows are written in this dtype.
    dtype = torch.float32
    if args.device.startswith("cuda"):
        dtype = torch.bfloat16 if flow else torch.float16
    pipeline = load_pipeline(source, dtype)
    if not flow:
        # Same sampler as diffusers' textual-inversion example: good images in ~25 steps. from_config keeps the
        # model's prediction_type and beta schedule. SD3 and Flux keep their flow-matching scheduler: DPM-Solver
        # from its config would neither predict flow nor take Flux's resolution-dependent shift.
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    try:
        tokens = load_learned_embeds(pipeline, args.learned_embeds)
    except ValueError as e:  # wrong size, token already in the vocabulary, file for another family, ...
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
        write_out_tokens(pipeline, args.prompt),  # SD3 does not expand multi-vector tokens itself
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,  # None: the pipeline's default (Flux's is 1024 px whatever the model)
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
