#!/usr/bin/env python
"""Textual inversion for Stable Diffusion 1.x, 2.x, XL, 3/3.5 and Flux.1: learn a new pseudo-word from 3-5 images.

    accelerate launch train_textual_inversion.py --pretrained_model_name_or_path=<folder or hub id> \
        --train_data_dir=./my_concept --placeholder_token="<cat-toy>" --initializer_token=toy --output_dir=out

Only the placeholder vectors train (Gal et al., 2022). They live in a small `num_vectors x dim` parameter of their
own (one per text encoder: CLIP and, for SD3 and Flux, T5), spliced into the frozen token embedding, so the optimizer
state, the gradient and the data-parallel all-reduce are that size, and every other embedding row stays bit-identical
to the base model. The training images go through the VAE once, at start-up. Flags, defaults and outputs follow
diffusers' examples/textual_inversion/textual_inversion.py (and its SD3/Flux scripts for the flow-matching flags); the
model family comes from the pipeline's model_index.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from embedding_files import embedding_rows, embedding_vectors
from frozen_models import (BASE_WEIGHT_DTYPES, SINGLE_FILE_SUFFIXES, ModelSource, UsageError, check_vae_factor, find_model_source,
                           freeze_and_place, load_models, load_tokenizers, pool_at_end_of_text, vae_factor,
                           weight_dtype_for)
from memory_plan import DTYPE_NAMES, MemoryPlan, PlanRequest, cached_plan, does_not_fit
from templates import TEMPLATES
from validation_report import (SELECTION_RULE, SELECTION_RULE_WITHOUT_CLIP, ScoreHistory,
                               describe_validation, write_report)

__version__ = "0.1.0"

logger = logging.getLogger("textual_inversion")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
CHECKPOINT_PREFIX = "checkpoint-"
# --report_to choices and the module each needs (accelerate's trackers).
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
             "clearml": "clearml", "dvclive": "dvclive", "aim": "aim", "all": None, "none": None}
# diffusers.training_utils' timestep densities (logit_normal, mode, else uniform) and loss weightings (sigma_sqrt,
# cosmap, else 1).
FLOW_WEIGHTING_SCHEMES = ["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]


# ---- Command line ----------------------------------------------------------------------------------------------------
AddArgument = Callable[..., argparse.Action]  # a parser's add_argument: each *_flags function adds its own


def model_flags(a: AddArgument) -> None:
    """Where the frozen model comes from: a pipeline folder or hub id, a single file, a transformer file."""
    a("--pretrained_model_name_or_path", required=True,
      help="Diffusers pipeline folder or hub id, or a single-file SD 1.x/2.x/XL checkpoint (.safetensors, .ckpt).")
    a("--single_file_config", default=None,
      help="With a single-file checkpoint: the diffusers folder or hub id its configs and tokenizers come from "
           "(diffusers' config=; default: the hub folder diffusers picks for the file's model type).")
    a("--transformer_file", default=None,
      help="SD 3/3.5 or Flux.1: a transformer file (original layout, fp8 too) used in place of the pipeline's.")
    a("--revision", default=None, help="Revision of the hub model.")
    a("--variant", default=None, help="Weight variant, e.g. fp16.")
    a("--tokenizer_name", default=None, help="Tokenizer folder or id, if not the pipeline's own.")


def concept_flags(a: AddArgument) -> None:
    """The concept: its images, the new word, how it starts, the prompts around it, how the images are cropped and
    masked."""
    a("--train_data_dir", required=True, help="Folder with the 3-5 (or more) images of the concept.")
    a("--placeholder_token", required=True, help='The new pseudo-word, e.g. "<cat-toy>". Must be new to the tokenizer.')
    a("--initializer_token", default=None,
      help='A coarse word or phrase for the concept ("toy", "teddy bear"); not with --initial_embeddings.')
    a("--initial_embeddings", default=None,
      help="Start from an existing embedding file (diffusers, AUTOMATIC1111, kohya, OneTrainer, SDXL/SD3/Flux keys) "
           "instead of --initializer_token: to train a word longer, or carry it over to another checkpoint.")
    a("--num_vectors", type=int, default=None,
      help="Embedding vectors for the concept (<tok>, <tok>_1, ...); default 1, or --initial_embeddings' count.")
    a("--learnable_property", default="object", help="'object' or 'style': picks the prompt templates.")
    a("--templates", default=None,
      help="Text file of your own templates, one per line: {} marks the token, {caption} an image's caption.")
    a("--caption_extension", default=None,
      help="Read a caption per image from the file beside it with this extension, e.g. .txt (kohya's flag).")
    a("--caption_dropout_rate", type=float, default=0.0,
      help="The share of samples whose caption gives way to a template with the word alone (--templates' lines "
           "without {caption}, or the built-in ones), so the word also stands without the caption's other words. "
           "kohya's name; there a dropped caption is empty, which here would drop the word too.")
    a("--caption_column", default="text",
      help="The caption field of --train_data_dir/metadata.jsonl (Hugging Face imagefolder), if that file exists.")
    a("--repeats", type=int, default=100, help="How many times each image appears per epoch.")
    a("--resolution", type=int, default=512, help="Training images are resized to resolution x resolution.")
    a("--center_crop", action="store_true", help="Center-crop images to a square before resizing.")
    a("--alpha_mask", action="store_true", help="Weight the loss by each image's alpha channel (kohya's flag).")
    a("--mask_dir", default=None,
      help="Folder of grayscale masks, one per image with its file stem: white counts in the loss, black does not.")


def masked_loss_flags(a: AddArgument) -> None:
    """What the loss does outside a mask, with OneTrainer's names (None: masked_loss_options fills the default)."""
    a("--unmasked_weight", type=float, default=None,
      help="Loss weight outside the mask, 0-1 (OneTrainer's name; default 0: the background is not trained on).")
    a("--unmasked_probability", type=float, default=None,
      help="Share of samples trained without their mask, 0-1, drawn per step from the seed (default 0).")
    a("--normalize_masked_area_loss", action=argparse.BooleanOptionalAction, default=None,
      help="Divide each sample's loss by its mask's area, so a small object trains as hard as a large one "
           "(default on; --no-normalize_masked_area_loss averages over the whole image).")
    a("--masked_prior_preservation_weight", type=float, default=None,
      help="Outside the mask, pull the prediction towards the frozen model's with the initializer in place of the "
           "word, with this weight, 0-1 (default 1 with masks; 0 is the object alone; one extra forward pass "
           "without gradient per masked sample).")


def bucket_flags(a: AddArgument) -> None:
    """Aspect-ratio buckets, with kohya's names."""
    a("--enable_bucket", action="store_true",
      help="Aspect-ratio buckets: each image keeps its shape (about --resolution^2 pixels) instead of a square.")
    a("--min_bucket_reso", type=int, default=256, help="Smallest bucket side (with --enable_bucket).")
    a("--max_bucket_reso", type=int, default=1024, help="Largest bucket side (with --enable_bucket).")
    a("--bucket_reso_steps", type=int, default=64, help="Bucket sides are multiples of this (with --enable_bucket).")


def optimisation_flags(a: AddArgument) -> None:
    """Steps, batches, the learning rate, the loss weighting."""
    a("--train_batch_size", type=int, default=16, help="Batch size per device.")
    a("--num_train_epochs", type=int, default=100, help="Used only if --max_train_steps is 0.")
    a("--max_train_steps", type=int, default=5000, help="Total optimizer steps; overrides --num_train_epochs.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    a("--gradient_checkpointing", action="store_true", help="Trade compute for memory in UNet and text encoder.")
    a("--learning_rate", type=float, default=1e-4, help="Learning rate (after warmup).")
    a("--scale_lr", action="store_true", help="lr x gradient_accumulation_steps x train_batch_size x processes.")
    a("--lr_scheduler", default="constant", help=f"One of {', '.join(LR_SCHEDULERS)}.")
    a("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the LR schedule.")
    a("--lr_num_cycles", type=int, default=1, help="Hard restarts for cosine_with_restarts.")
    a("--dataloader_num_workers", type=int, default=0, help="Data loader worker processes (0: main process).")
    a("--use_8bit_adam", action="store_true",
      help="Accepted for diffusers' SDXL command lines; changes nothing (the optimizer state is num_vectors x dim).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (on the placeholder vectors only).")
    a("--adam_epsilon", type=float, default=1e-08)
    a("--max_grad_norm", type=float, default=None, help="Clip the placeholder vectors' gradient norm (off by default).")
    a("--snr_gamma", type=float, default=None,
      help="Min-SNR loss weighting with this gamma (5.0 is usual); off by default. SD 1.x/2.x/XL only.")


def flow_flags(a: AddArgument) -> None:
    """SD 3/3.5 and Flux.1 (flow matching); diffusers' flags from its SD3 and Flux training scripts."""
    a("--text_encoders", type=text_encoder_names, default=None,
      help="Which text encoders learn the word, comma-separated: SDXL clip_l,clip_g; SD3 clip_l,clip_g,t5; Flux "
           "clip_l,t5. Default: all of them (the others keep the initializer's vectors). See the README.")
    a("--t5_learning_rate", type=float, default=None,
      help="T5's vectors' learning rate (default: --learning_rate x T5's token-embedding scale over CLIP-L's, "
           "logged at the start: Adam steps are about lr per coordinate whatever the encoder's scale).")
    a("--max_sequence_length", type=int, default=None,
      help="T5's prompt length in tokens (default: 77 for SD3, 512 for Flux, as in diffusers' scripts).")
    a("--weighting_scheme", default=None, choices=FLOW_WEIGHTING_SCHEMES,
      help="Flow matching's timestep density and loss weighting (diffusers' training_utils; default: "
           "logit_normal for SD3, none for Flux, as in diffusers' scripts).")
    a("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal timestep density.")
    a("--logit_std", type=float, default=1.0, help="Std of the logit_normal timestep density.")
    a("--mode_scale", type=float, default=1.29, help="Scale of the 'mode' timestep density.")
    a("--guidance_scale", type=float, default=3.5,
      help="Flux-dev's guidance embedding during training (guidance-distilled models only; diffusers' default).")


def noise_flags(a: AddArgument) -> None:
    """The noise, and the seed that every draw of a run comes from."""
    a("--noise_offset", type=float, default=0.0, help="diffusers' noise offset (e.g. 0.05); 0 is off.")
    a("--seed", type=int, default=None, help="Seed for a reproducible run (a random one is drawn and logged if unset).")


def hardware_flags(a: AddArgument) -> None:
    """Precision, 8- and 4-bit frozen weights, memory and speed options."""
    a("--mixed_precision", default="no", help="no, fp16 or bf16; frozen weights run in it, the vectors stay fp32.")
    a("--base_weight_dtype", default=None, choices=BASE_WEIGHT_DTYPES,
      help="Store the large frozen weights (UNet or transformer, and T5) in 8 bits (fp8: float8_e4m3fn, upcast per "
           "layer) or 4 bits (nf4, needs bitsandbytes); they compute in --mixed_precision. Default: that dtype.")
    a("--fp8_base", action="store_true", help="kohya's name for --base_weight_dtype fp8.")
    a("--plan_memory", action="store_true",
      help="Print the memory plan for these flags (per component, activations, peak; from the configs, no weights) "
           "and exit without training.")
    a("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    a("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention in the UNet.")
    a("--no_cache_latents", action="store_true",
      help="Encode the images with the VAE every step instead of once at start-up (same distribution, slower).")
    a("--compile_unet", action="store_true", help="torch.compile the frozen UNet (slow first steps; see benchmarks/).")
    a("--local_rank", type=int, default=-1, help="Ignored; accepted for torch.distributed.launch compatibility.")


def output_flags(a: AddArgument) -> None:
    """What is written, when, and which step is kept (validation, CLIP scores, early stopping, the norm controls)."""
    a("--output_dir", default="text-inversion-model", help="Where learned_embeds, checkpoints and logs go.")
    a("--save_steps", type=int, default=500, help="Write learned_embeds-steps-N every N steps.")
    a("--save_as_full_pipeline", action="store_true", help="Also save the whole pipeline with the new token.")
    a("--no_safe_serialization", action="store_true", help="Write .bin (torch.save) instead of .safetensors.")
    a("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint-N every N steps.")
    a("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    a("--resume_from_checkpoint", default=None,
      help='A checkpoint-N folder, a checkpoint-N name inside --output_dir, or "latest" there.')
    a("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")
    a("--report_to", default="tensorboard", help='tensorboard (default), wandb, comet_ml, all, or "none".')
    a("--validation_prompt", action="append", default=None,
      help="Edit prompt rendered every --validation_steps, with the placeholder; repeat the flag, or give a .txt "
           "file of prompts, one per line. With --clip_model_name_or_path and none given, a few defaults.")
    a("--reconstruction_prompt", default=None,
      help='The prompt whose images are compared with the training images (default "a photo of a <token>", or '
           '"a painting in the style of <token>" for styles).')
    a("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    a("--validation_inference_steps", type=int, default=25,
      help="DPM-Solver++ steps per validation image; fewer make validation cheaper (see benchmarks/).")
    a("--validation_guidance_scale", type=float, default=None,
      help="Guidance of the validation images (default: the pipeline's, 7.5; SD3 7.0; Flux-dev's distilled 3.5); "
           "use the one you will use.")
    a("--validation_steps", type=int, default=100,
      help="Validate every N steps: validation loss, images and CLIP scores (see report.json).")
    a("--clip_model_name_or_path", default=None,
      help="A transformers CLIPModel (folder or hub id, e.g. openai/clip-vit-large-patch14) that scores each "
           "validation: CLIP-I (looks like the training images) and CLIP-T (follows the edit prompts).")
    a("--early_stopping_patience", type=int, default=None,
      help="Stop when the validation score has not improved for this many validations.")
    a("--preserve_embedding_norm", action="store_true",
      help="After each step, rescale each vector to its initial norm (OneTrainer's option).")
    a("--embedding_reg_weight", type=float, default=0.0,
      help="Weight of an L2 pull of the vectors toward their initial values (the paper's code); 0 is off.")
    a("--validation_epochs", type=int, default=None,
      help="Deprecated (as in diffusers): sets --validation_steps to this x images x --repeats.")


def hub_flags(a: AddArgument) -> None:
    """diffusers' hub flags: accepted so their command lines fail with a clear reason, not "unrecognized argument"."""
    a("--push_to_hub", action="store_true", help=argparse.SUPPRESS)
    a("--hub_token", default=None, help=argparse.SUPPRESS)
    a("--hub_model_id", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Textual inversion: learn a new word for a concept from a few images.")
    for add_flags in (model_flags, concept_flags, masked_loss_flags, bucket_flags, optimisation_flags, flow_flags,
                      noise_flags, hardware_flags, output_flags, hub_flags):  # in --help's order
        add_flags(p.add_argument)
    return p


def text_encoder_names(value: str) -> tuple[str, ...]:
    """--text_encoders "clip_l, t5" -> ("clip_l", "t5"); which of them the model has is checked once it is known."""
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        raise argparse.ArgumentTypeError("give one or more of clip_l, clip_g, t5, comma-separated")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate every flag; nothing here loads a model, so mistakes cost seconds, not minutes."""
    parser = build_parser()
    parser.error = _usage_error  # one line, not argparse's usage dump
    args = parser.parse_args(argv)
    problem = validate_args(args)
    if problem:
        _usage_error(problem)
    return args


def _usage_error(message: str) -> None:
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


MASKED_LOSS_FLAGS = ("unmasked_weight", "unmasked_probability", "normalize_masked_area_loss",
                     "masked_prior_preservation_weight")


def outside_unit_interval(args: argparse.Namespace, names: tuple[str, ...]) -> str | None:
    """The first of these weights or probabilities (None: not given) that is not in [0, 1]."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            return f"--{name} must be between 0 and 1 (got {value})"
    return None


def validate_masked_loss(args: argparse.Namespace) -> str | None:
    """The masked-loss options need masks, and their weights and probability lie in [0, 1]."""
    given = [name for name in MASKED_LOSS_FLAGS if getattr(args, name) is not None]
    if given and not (args.alpha_mask or args.mask_dir):
        return f"--{given[0]} shapes the loss outside a mask, and there are none: add --alpha_mask or --mask_dir"
    return outside_unit_interval(args, ("unmasked_weight", "unmasked_probability", "masked_prior_preservation_weight"))


def validate_args(args: argparse.Namespace) -> str | None:
    """Return the first problem with the flags, as a message naming the flag, or None."""
    problem = validate_model_files(args)  # first: it also fills --num_vectors' default
    if problem:
        return problem
    positive = ["num_vectors", "repeats", "resolution", "train_batch_size", "num_train_epochs",
                "gradient_accumulation_steps", "save_steps", "checkpointing_steps", "validation_steps",
                "num_validation_images", "validation_inference_steps", "lr_num_cycles"]
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1 (got {getattr(args, name)})"
    for name in ("max_grad_norm", "snr_gamma", "logit_std", "t5_learning_rate"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            return f"--{name} must be positive (got {getattr(args, name)})"
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        return f"--max_sequence_length must be at least 1 (got {args.max_sequence_length})"
    if args.noise_offset < 0:
        return f"--noise_offset must be 0 or more (got {args.noise_offset})"
    if args.alpha_mask and args.mask_dir:
        return "--alpha_mask and --mask_dir both give masks: choose one"
    problem = validate_masked_loss(args)
    if problem:
        return problem
    if args.caption_extension is not None and not args.caption_extension.strip("."):
        return f"--caption_extension {args.caption_extension!r} is empty: give e.g. .txt"
    problem = outside_unit_interval(args, ("caption_dropout_rate",)) or validate_buckets(args)
    if problem:
        return problem
    if args.validation_epochs is not None and args.validation_epochs < 1:
        return f"--validation_epochs must be at least 1 (got {args.validation_epochs})"
    for name in ["max_train_steps", "lr_warmup_steps", "dataloader_num_workers"]:
        if getattr(args, name) < 0:
            return f"--{name} must be 0 or more (got {getattr(args, name)})"
    if args.early_stopping_patience is not None and args.early_stopping_patience < 1:
        return f"--early_stopping_patience must be at least 1 (got {args.early_stopping_patience})"
    if not args.embedding_reg_weight >= 0:
        return f"--embedding_reg_weight must be 0 or more (got {args.embedding_reg_weight})"
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        return f"--checkpoints_total_limit must be at least 1 (got {args.checkpoints_total_limit})"
    if not args.learning_rate > 0:
        return f"--learning_rate must be positive (got {args.learning_rate})"
    choices = {"learnable_property": list(TEMPLATES), "lr_scheduler": LR_SCHEDULERS,
               "mixed_precision": ["no", "fp16", "bf16"], "report_to": list(REPORTERS)}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            return f"--{name} must be one of {', '.join(allowed)} (got {getattr(args, name)!r})"
    problem = validate_base_weight_dtype(args)
    if problem:
        return problem
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        return "--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine"
    hub_flags = [f"--{name}" for name in ("push_to_hub", "hub_token", "hub_model_id") if getattr(args, name)]
    if hub_flags:
        return (f"{' and '.join(hub_flags)}: uploading is not supported here; upload --output_dir yourself "
                "(e.g. `hf upload`)")
    if not args.placeholder_token.strip() or any(c.isspace() for c in args.placeholder_token):
        return f"--placeholder_token must be one word without spaces (got {args.placeholder_token!r})"
    if args.placeholder_token != args.placeholder_token.lower():
        # CLIP lowercases prompts, so "<Cat-Toy>" would train as "<cat-toy>" but be saved under a name that
        # diffusers' load_textual_inversion then fails to expand for multi-vector tokens.
        return (f"--placeholder_token {args.placeholder_token!r} has capitals, but CLIP lowercases every prompt; "
                f"use {args.placeholder_token.lower()!r}")
    if args.initial_embeddings is None and args.initializer_token is None:
        return "--initializer_token is missing: give a coarse word for the concept, e.g. 'toy' (or --initial_embeddings)"
    if args.initial_embeddings is not None and args.initializer_token is not None:
        return "--initializer_token and --initial_embeddings both say where the vectors start: choose one"
    if args.initializer_token is not None and not args.initializer_token.strip():
        return "--initializer_token is empty: give a coarse word for the concept, e.g. 'toy'"
    if args.enable_xformers_memory_efficient_attention and not _importable("xformers"):
        return "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers`, or drop the flag"
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            return f"--{name} must be in [0, 1) (got {getattr(args, name)})"
    if args.adam_epsilon < 0 or args.adam_weight_decay < 0:
        return "--adam_epsilon and --adam_weight_decay must be 0 or more"
    module = REPORTERS[args.report_to]
    if module and not _importable(module):
        return f"--report_to {args.report_to} needs {module}: `pip install {module}`, or pass --report_to none"
    return validate_paths(args)


def validate_model_files(args: argparse.Namespace) -> str | None:
    """The single-file flags, and --num_vectors from --initial_embeddings' file (its default is the file's count)."""
    model = Path(args.pretrained_model_name_or_path).expanduser()
    if model.is_file():
        if model.suffix not in SINGLE_FILE_SUFFIXES:
            return (f"--pretrained_model_name_or_path {model} is a {model.suffix or 'suffix-less'} file: give a "
                    f"checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}) or a diffusers pipeline folder")
        for flag in ("revision", "variant"):
            if getattr(args, flag):
                return f"--{flag} is for a hub pipeline, not a single file ({model.name}): drop it"
    elif args.single_file_config:
        return "--single_file_config is for a single-file --pretrained_model_name_or_path: drop it"
    for flag in ("single_file_config", "transformer_file", "initial_embeddings"):
        value = getattr(args, flag)
        if value and flag != "single_file_config" and not Path(value).expanduser().is_file():
            return f"--{flag} {value} is not a file"
    if args.single_file_config and Path(args.single_file_config).expanduser().is_file():
        return f"--single_file_config {args.single_file_config} is a file: give a diffusers folder or hub id"
    if args.initial_embeddings:
        try:
            rows = embedding_rows(Path(args.initial_embeddings).expanduser())
        except Exception as e:
            return f"--initial_embeddings {args.initial_embeddings} cannot be read as an embedding ({type(e).__name__})"
        if args.num_vectors not in (None, rows):
            return (f"--num_vectors {args.num_vectors} differs from --initial_embeddings {args.initial_embeddings}'s "
                    f"{rows} vector(s): drop --num_vectors")
        args.num_vectors = rows  # the flag's default, read from the file (a parse-time default, not a derived value)
    elif args.num_vectors is None:
        args.num_vectors = 1
    return None


def validate_base_weight_dtype(args: argparse.Namespace) -> str | None:
    """--base_weight_dtype / --fp8_base: one mode, its package or dtype present, and nothing it cannot apply to."""
    if args.fp8_base:
        if args.base_weight_dtype not in (None, "fp8"):
            return f"--fp8_base and --base_weight_dtype {args.base_weight_dtype} contradict each other: choose one"
        args.base_weight_dtype = "fp8"  # the alias, resolved as argparse would resolve a second option string
    mode = args.base_weight_dtype
    if mode == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        return f"--base_weight_dtype fp8 needs float8 dtypes, which torch {torch.__version__} lacks: torch >= 2.1"
    if mode == "nf4" and not _importable("bitsandbytes"):
        return "--base_weight_dtype nf4 needs bitsandbytes: `pip install bitsandbytes`, or use fp8"
    if mode and args.save_as_full_pipeline:
        return (f"--base_weight_dtype {mode} and --save_as_full_pipeline: the saved pipeline would hold the "
                f"{mode} weights; save it from a run without --base_weight_dtype")
    if mode == "nf4" and args.compile_unet:
        return "--base_weight_dtype nf4 and --compile_unet: bitsandbytes' 4-bit layers do not compile; drop one"
    return None


def validate_buckets(args: argparse.Namespace) -> str | None:
    """Bucket flags that contradict each other (or --resolution, or --center_crop)."""
    if not args.enable_bucket:
        return None
    low, high, step = args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps
    if step < 8 or step % 8:
        return f"--bucket_reso_steps must be a positive multiple of 8 (got {step})"
    if low < step or low % step or high % step:
        return (f"--min_bucket_reso {low} and --max_bucket_reso {high} must be multiples of --bucket_reso_steps "
                f"{step}, and at least it")
    if low > high:
        return f"--min_bucket_reso {low} is larger than --max_bucket_reso {high}"
    if not low <= args.resolution <= high:
        return (f"--resolution {args.resolution} (the bucket area's side) must lie between --min_bucket_reso {low} "
                f"and --max_bucket_reso {high}")
    if args.center_crop:
        return "--center_crop and --enable_bucket contradict each other: buckets keep each image's shape; drop one"
    return None


def validate_paths(args: argparse.Namespace) -> str | None:
    data_dir = Path(args.train_data_dir)
    if not data_dir.is_dir():
        return f"--train_data_dir {data_dir} is not a folder: point it at a folder of images of the concept"
    output_dir = Path(args.output_dir).absolute()
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output_dir {args.output_dir} is a file: choose a folder"
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        return f"--output_dir {args.output_dir} is not writable ({existing}): choose a folder you can write to"
    if args.templates is not None:
        try:
            load_templates(args.templates)
        except UsageError as e:
            return str(e)
    if args.mask_dir is not None and not Path(args.mask_dir).is_dir():
        return f"--mask_dir {args.mask_dir} is not a folder: point it at the folder of masks"
    name = args.pretrained_model_name_or_path
    model = Path(name).expanduser()
    if model.is_dir() and not (model / "model_index.json").is_file():
        return (f"--pretrained_model_name_or_path {model} has no model_index.json: give a diffusers pipeline folder "
                "or a single-file checkpoint")
    if not model.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):  # a path, not a hub id
        return f"--pretrained_model_name_or_path {name} does not exist"
    clip = args.clip_model_name_or_path
    if clip and not Path(clip).expanduser().exists() and (clip.startswith((".", "/", "~")) or clip.count("/") > 1):
        return f"--clip_model_name_or_path {clip} does not exist"
    resume = args.resume_from_checkpoint
    if resume not in (None, "latest") and not resolve_resume_checkpoint(resume, args.output_dir).is_dir():
        return (f"--resume_from_checkpoint {resume} is neither a folder nor a checkpoint in --output_dir "
                f"{args.output_dir}: give a checkpoint-N folder, its name, or 'latest'")
    return None


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- Tokens and their initial vectors --------------------------------------------------------------------------------
def placeholder_token_names(placeholder_token: str, num_vectors: int) -> list[str]:
    """`<tok>`, `<tok>_1`, ... `<tok>_{N-1}`: the names diffusers' load_textual_inversion gives multi-vector tokens."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]


def add_placeholder_tokens(tokenizer, placeholder_token: str, num_vectors: int, name: str = "tokenizer") -> list[int]:
    """Add the placeholder token(s) to the tokenizer; return their ids, which are consecutive after the vocabulary.

    A token the tokenizer already has, or an existing word ("cat" is one BPE token), is refused: adding it would
    silently change what that word means in every prompt.
    """
    tokens = placeholder_token_names(placeholder_token, num_vectors)
    vocab = tokenizer.get_vocab()
    for token in tokens:
        pieces = tokenizer.tokenize(token)
        if token in vocab or (len(pieces) == 1 and pieces[0] in vocab):
            which = "the tokenizer" if name == "tokenizer" else f"the pipeline's {name} ({type(tokenizer).__name__})"
            raise UsageError(
                f"--placeholder_token {token!r} is already a word of {which}; pick a new one, e.g. '<my-{token}>'")
    first_id = len(tokenizer)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(first_id, first_id + num_vectors)):
        raise UsageError(f"--placeholder_token {placeholder_token!r} could not be added as {num_vectors} new tokens")
    return ids


def initializer_token_ids(tokenizer, initializer_token: str) -> list[int]:
    """Token ids of the initializer word or phrase ("toy" -> 1 id, "teddy bear" -> 2 ids)."""
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    if not ids or any(i in special for i in ids):
        raise UsageError(f"--initializer_token {initializer_token!r} is empty or unknown to the tokenizer; use a word")
    return ids


def initial_vectors(embedding_weight: torch.Tensor, initializer_ids: Sequence[int], num_vectors: int) -> torch.Tensor:
    """Start the placeholder vectors from the initializer's embeddings, float32 `[num_vectors, dim]`.

    The phrase's k tokens are spread over the N vectors in order: vector i is the mean of the tokens in its share
    `[i*k//N, ceil((i+1)*k/N))`. So N == k maps one to one, N == 1 takes the mean of the phrase, N > k repeats each
    token over consecutive vectors ("teddy bear", N=4 -> teddy, teddy, bear, bear), N < k averages neighbours.
    """
    k = len(initializer_ids)
    rows = []
    for i in range(num_vectors):
        start, stop = i * k // num_vectors, max(-(-(i + 1) * k // num_vectors), i * k // num_vectors + 1)
        share = list(initializer_ids[start:stop])
        rows.append(embedding_weight[share].float().mean(dim=0))
    return torch.stack(rows).detach().clone()


def expand_placeholder(text: str, placeholder_token: str, num_vectors: int) -> str:
    """Write all N token names where the user wrote the placeholder once, as load_textual_inversion does."""
    if num_vectors == 1:
        return text
    return text.replace(placeholder_token, " ".join(placeholder_token_names(placeholder_token, num_vectors)))


class PlaceholderEmbedding(torch.nn.Module):
    """The frozen token embedding plus a small trainable `[num_vectors, dim]` tensor for the placeholder rows.

    Looking the placeholder ids up in `vectors` instead of in the big matrix is what keeps the gradient, the AdamW
    state and the DDP all-reduce at num_vectors x dim, and the rest of the vocabulary out of the optimizer's reach.
    The frozen matrix is the base model's own, not resized: no copy of the vocabulary (150 MB for SD 1.5) is made,
    and ids past its end are only ever read from `vectors`.
    """

    def __init__(self, frozen: torch.nn.Embedding, first_placeholder_id: int, vectors: torch.Tensor):
        super().__init__()
        self.frozen = frozen.requires_grad_(False)
        self.first_placeholder_id = first_placeholder_id
        self.vectors = torch.nn.Parameter(vectors.float().clone())  # fp32 even when the encoder runs in fp16/bf16
        # The initializer's vectors, for the telemetry and the norm controls. A plain attribute, not a buffer: DDP
        # would broadcast a buffer at every forward. A resume rebuilds it from the initializer, as here.
        self.initial = vectors.float().detach().clone()
        self.reference_norm = 1.0  # the median norm of the vocabulary rows in use (set_reference_norm)
        self.use_initial = False  # read `initial` instead (initializer_in_place: the frozen model's own prediction)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.frozen(input_ids.clamp(max=self.frozen.num_embeddings - 1))
        offset = input_ids - self.first_placeholder_id
        is_placeholder = (offset >= 0) & (offset < self.vectors.shape[0])
        rows = self.initial.to(self.vectors.device) if self.use_initial else self.vectors
        learned = rows[offset.clamp(0, self.vectors.shape[0] - 1)].to(embeds.dtype)
        # torch.where, not a data-dependent branch: no host sync and DDP always sees `vectors` used.
        return torch.where(is_placeholder.unsqueeze(-1), learned, embeds)

    def merged_weight(self) -> torch.Tensor:
        """The full embedding matrix with the learned rows written in (grown to hold them), for saving a pipeline."""
        frozen = self.frozen.weight.detach()
        end = self.first_placeholder_id + self.vectors.shape[0]
        weight = frozen.new_empty(max(end, len(frozen)), frozen.shape[1])
        weight[: len(frozen)] = frozen
        weight[self.first_placeholder_id : end] = self.vectors.detach().to(weight.dtype)
        return weight

    def set_reference_norm(self, token_ids: Sequence[int]) -> None:
        """What the vectors' norms are compared with: the median norm of these vocabulary rows."""
        rows = self.frozen.weight.detach()[list(token_ids)].float()
        self.reference_norm = rows.norm(dim=1).median().item()

    def telemetry(self) -> dict[str, list[float]]:
        """Per vector: its norm over the vocabulary's (a word's norm is near 1x; a vector that grows far past it
        tends to overpower the rest of the prompt), and its cosine to the initializer (how far it has turned)."""
        with torch.no_grad():
            vectors = self.vectors.float()
            ratio = vectors.norm(dim=1) / self.reference_norm
            cosine = F.cosine_similarity(vectors, self.initial.to(vectors.device), dim=1)
            values = torch.cat([ratio, cosine]).tolist()  # one host sync
        n = len(vectors)
        return {"norm_ratio": values[:n], "cosine_to_init": values[n:]}

    def pull_to_initial(self) -> torch.Tensor:
        """--embedding_reg_weight's term: the squared L2 distance to the initial vectors, averaged over vectors (the
        paper's embedding_to_coarse_loss)."""
        return (self.vectors - self.initial.to(self.vectors.device)).pow(2).sum(dim=1).mean()

    def restore_initial_norms(self) -> None:
        """--preserve_embedding_norm: rescale each vector back to its initial length; only its direction learns."""
        with torch.no_grad():
            initial_norms = self.initial.to(self.vectors.device).norm(dim=1, keepdim=True)
            self.vectors.mul_(initial_norms / self.vectors.norm(dim=1, keepdim=True).clamp_min(1e-12))


def vocabulary_ids_in_use(input_ids: torch.Tensor, special_ids: Sequence[int], vocabulary_size: int) -> list[int]:
    """The vocabulary rows the training prompts use: their token ids without specials and the placeholder's.

    These are the reference for the norm ratio. The whole vocabulary would not do: a model trained on a small world
    (ours) or a vocabulary with unused rows keeps many rows at their random initialisation.
    """
    ids = set(input_ids.unique().tolist()) - set(special_ids)
    return sorted(i for i in ids if i < vocabulary_size)


def nearest_words(vectors: torch.Tensor, embedding_weight: torch.Tensor, tokenizer, k: int = 5) -> list[list[str]]:
    """The k vocabulary words closest (cosine) to each vector: what the vector has come to mean."""
    with torch.no_grad():
        vocabulary = F.normalize(embedding_weight.detach().float(), dim=1)
        similarity = F.normalize(vectors.detach().float().to(vocabulary.device), dim=1) @ vocabulary.T
        top = similarity.topk(k, dim=1).indices.tolist()
    return [[tokenizer.decode([i]).strip() for i in row] for row in top]


def install_placeholder_embedding(text_encoder, placeholder_token_ids: list[int], vectors: torch.Tensor):
    """Route the placeholder ids to trainable vectors inside the text encoder; return the module that holds them."""
    module = PlaceholderEmbedding(text_encoder.get_input_embeddings(), placeholder_token_ids[0], vectors)
    text_encoder.set_input_embeddings(module)
    return module


# ---- Model families --------------------------------------------------------------------------------------------------
# What differs between the families this script trains lives in one small adapter per family: its pipeline class,
# tokenizers, text encoders and denoiser, how the denoiser is conditioned on the prompt, the noise process, and the
# saved keys. The rest of the script asks the adapter and never tests a family's name, so adding a family is adding an
# adapter to FAMILIES.
def unet_prediction(unet, noisy, timesteps, hidden, added_conditions: dict | None, dtype: torch.dtype) -> torch.Tensor:
    return unet(noisy.to(dtype), timesteps, hidden.to(dtype), added_cond_kwargs=added_conditions).sample


class StableDiffusion:
    """SD 1.x and 2.x: one CLIP text encoder, whose last hidden state conditions the UNet (epsilon or v)."""

    name = "sd"
    pipeline = "StableDiffusionPipeline"
    encoder_names = ("clip",)  # what --text_encoders calls them
    tokenizers = (("tokenizer", "CLIPTokenizer"),)  # (subfolder, transformers class), in the encoders' order
    text_encoders = (("text_encoder", "CLIPTextModel"),)
    denoiser = ("unet", "UNet2DConditionModel")  # (subfolder, diffusers class)
    scheduler = "DDPMScheduler"
    flow_matching = False
    latent_patch = 1  # latent cells per side of one denoiser token: --resolution is a multiple of this x the VAE's
    max_sequence_length = None  # no T5
    weighting_scheme = None
    guidance_scale = 7.5  # the pipeline's default, for the validation images
    validation_scheduler = "DPMSolverMultistepScheduler"  # good images in 25 steps (diffusers' TI example)
    expands_placeholder = True  # the pipeline writes out a multi-vector token (TextualInversionLoaderMixin)
    # The inference pipeline's parts this script does not load.
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def keys(self, placeholder_token: str) -> list[str]:
        """Names of the saved tensors, one per text encoder: diffusers' `{token: T}`."""
        return [placeholder_token]

    def encode(self, text_encoders, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per encoder `[batch, 77]` ids -> (the UNet's encoder hidden states, no pooled embedding)."""
        return text_encoders[0](input_ids[0])[0], None

    def conditions(self, images: TrainingImages, guidance_scale: float) -> torch.Tensor | None:
        """Per-image conditions besides the prompt: none."""
        return None

    def predict(self, unet, noisy, timesteps, hidden, pooled, conditions, dtype: torch.dtype) -> torch.Tensor:
        return unet_prediction(unet, noisy, timesteps, hidden, None, dtype)


class StableDiffusionXL:
    """SDXL: two CLIP text encoders side by side, plus the pooled text embedding and each image's size conditions."""

    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    encoder_names = ("clip_l", "clip_g")
    tokenizers = (("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "CLIPTokenizer"))
    # The second one also gives the pooled projection the SDXL UNet is conditioned on.
    text_encoders = (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection"))
    denoiser = ("unet", "UNet2DConditionModel")
    scheduler = "DDPMScheduler"
    flow_matching = False
    latent_patch = 1
    max_sequence_length = None
    weighting_scheme = None
    guidance_scale = 7.5
    validation_scheduler = "DPMSolverMultistepScheduler"
    expands_placeholder = True
    pipeline_extras: dict = {}

    def keys(self, placeholder_token: str) -> list[str]:
        """kohya's, AUTOMATIC1111's, ComfyUI's and InvokeAI's SDXL format."""
        return ["clip_l", "clip_g"]

    def encode(self, text_encoders, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both encoders' penultimate hidden states side by side, and the second encoder's pooled projection (the
        UNet's `text_embeds`), as StableDiffusionXLPipeline.encode_prompt computes them."""
        outputs = [encoder(ids, output_hidden_states=True) for encoder, ids in zip(text_encoders, input_ids)]
        return torch.cat([out.hidden_states[-2] for out in outputs], dim=-1), outputs[-1][0]

    def conditions(self, images: TrainingImages, guidance_scale: float) -> torch.Tensor | None:
        """(original size, crop, target size) per image."""
        return sdxl_time_ids(images)

    def predict(self, unet, noisy, timesteps, hidden, pooled, conditions, dtype: torch.dtype) -> torch.Tensor:
        """The pooled text embedding and the batch's size conditions go in as added conditions."""
        added = {"text_embeds": pooled.to(dtype), "time_ids": conditions.to(dtype)}
        return unet_prediction(unet, noisy, timesteps, hidden, added, dtype)


class StableDiffusion3:
    """SD 3 and 3.5: CLIP-L, CLIP-G and T5-XXL into an MMDiT, trained by flow matching."""

    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    encoder_names = ("clip_l", "clip_g", "t5")
    tokenizers = (("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "CLIPTokenizer"), ("tokenizer_3", "T5TokenizerFast"))
    text_encoders = (("text_encoder", "CLIPTextModelWithProjection"),
                     ("text_encoder_2", "CLIPTextModelWithProjection"), ("text_encoder_3", "T5EncoderModel"))
    denoiser = ("transformer", "SD3Transformer2DModel")
    scheduler = "FlowMatchEulerDiscreteScheduler"
    flow_matching = True
    latent_patch = 2  # the MMDiT's 2x2 patches
    max_sequence_length = 77  # diffusers' train_dreambooth_sd3.py (the pipeline's own default is 256)
    weighting_scheme = "logit_normal"  # diffusers' SD3 script
    guidance_scale = 7.0
    validation_scheduler = None  # the pipeline's own flow-matching Euler sampler
    expands_placeholder = False  # StableDiffusion3Pipeline has no TextualInversionLoaderMixin
    pipeline_extras: dict = {}

    def keys(self, placeholder_token: str) -> list[str]:
        """ComfyUI's and OneTrainer's names (the T5 vectors are also written as ComfyUI's `t5xxl`: KEY_ALIASES)."""
        return ["clip_l", "clip_g", "t5"]

    def encode(self, text_encoders, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """As StableDiffusion3Pipeline.encode_prompt: the CLIPs' penultimate states side by side, zero-padded to
        T5's width and followed by T5's states along the sequence; the CLIPs' pooled projections side by side."""
        clips = [encoder(ids, output_hidden_states=True) for encoder, ids in zip(text_encoders[:2], input_ids[:2])]
        clip_states = torch.cat([out.hidden_states[-2] for out in clips], dim=-1)
        t5_states = text_encoders[2](input_ids[2])[0]
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return torch.cat([clip_states, t5_states], dim=-2), torch.cat([out[0] for out in clips], dim=-1)

    def conditions(self, images: TrainingImages, guidance_scale: float) -> torch.Tensor | None:
        return None

    def predict(self, transformer, noisy, timesteps, hidden, pooled, conditions, dtype: torch.dtype) -> torch.Tensor:
        return transformer(hidden_states=noisy.to(dtype), timestep=timesteps, encoder_hidden_states=hidden.to(dtype),
                           pooled_projections=pooled.to(dtype), return_dict=False)[0]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 packing: `[B, C, h, w]` -> `[B, (h/2)(w/2), 4C]`, one token per 2x2 patch, row by row."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """pack_latents' inverse, for latents of `height` x `width` cells."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype: torch.dtype) -> torch.Tensor:
    """Flux's position of each packed token, `[(h/2)(w/2), 3]`: (0, row, column), for the rotary embedding."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class Flux:
    """Flux.1: T5-XXL's states are the transformer's text tokens, CLIP-L gives only its pooled vector; packed
    latents, flow matching with a resolution-dependent shift, and (dev) a guidance embedding."""

    name = "flux"
    pipeline = "FluxPipeline"
    encoder_names = ("clip_l", "t5")
    tokenizers = (("tokenizer", "CLIPTokenizer"), ("tokenizer_2", "T5TokenizerFast"))
    text_encoders = (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel"))
    denoiser = ("transformer", "FluxTransformer2DModel")
    scheduler = "FlowMatchEulerDiscreteScheduler"
    flow_matching = True
    latent_patch = 2  # the 2x2 packing
    # diffusers' Flux pivotal-tuning script (train_dreambooth_lora_flux_advanced.py, where diffusers trains Flux
    # embeddings) and FluxPipeline
    max_sequence_length = 512
    weighting_scheme = "none"  # diffusers' Flux scripts
    guidance_scale = 3.5  # FluxPipeline's (distilled guidance, no classifier-free guidance)
    validation_scheduler = None
    expands_placeholder = True
    pipeline_extras: dict = {}

    def keys(self, placeholder_token: str) -> list[str]:
        return ["clip_l", "t5"]

    def encode(self, text_encoders, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """As FluxPipeline.encode_prompt: T5's last hidden states, and CLIP's pooled output."""
        pooled = text_encoders[0](input_ids[0], output_hidden_states=False).pooler_output
        return text_encoders[1](input_ids[1], output_hidden_states=False)[0], pooled

    def conditions(self, images: TrainingImages, guidance_scale: float) -> torch.Tensor | None:
        """--guidance_scale for every image (used by guidance-distilled transformers only)."""
        return torch.full((len(images),), float(guidance_scale))

    def predict(self, transformer, noisy, timesteps, hidden, pooled, conditions, dtype: torch.dtype) -> torch.Tensor:
        """Packed in, unpacked out, so the loss (and a mask) stays in the latent grid. Flux takes t in [0, 1]."""
        height, width = noisy.shape[-2:]
        guidance = conditions.to(dtype) if transformer.config.guidance_embeds else None
        text_ids = torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=dtype)
        tokens = transformer(hidden_states=pack_latents(noisy).to(dtype), timestep=timesteps / 1000,
                             guidance=guidance, pooled_projections=pooled.to(dtype),
                             encoder_hidden_states=hidden.to(dtype), txt_ids=text_ids,
                             img_ids=latent_image_ids(height, width, noisy.device, dtype), return_dict=False)[0]
        return unpack_latents(tokens, height, width)


# model_index.json's _class_name -> the adapter this script trains it with.
FAMILIES = {family.pipeline: family for family in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}
FAMILY_NAMES = {family.name: family for family in FAMILIES.values()}
# Keys written twice in the result files, because the apps disagree: OneTrainer and diffusers' Flux script read `t5`,
# ComfyUI reads `t5xxl`; each ignores the other's (README, "SD 3.5 and Flux").
KEY_ALIASES = {"t5": "t5xxl"}


class PromptEncoder(torch.nn.Module):
    """The text encoder(s) as the denoiser consumes them (the family's `encode`); it holds every trainable tensor, so
    DDP wraps this one module."""

    def __init__(self, text_encoders: Sequence[torch.nn.Module], family, lengths: Sequence[int]):
        super().__init__()
        self.text_encoders = torch.nn.ModuleList(text_encoders)
        self.family = family
        self.lengths = list(lengths)  # each tokenizer's window: CLIP's 77, T5's --max_sequence_length

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids `[batch, num_text_encoders, longest window]` -> (encoder hidden states, pooled or None)."""
        per_encoder = [input_ids[:, i, :length] for i, length in enumerate(self.lengths)]
        return self.family.encode(self.text_encoders, per_encoder)


# ---- Noise and target ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Diffusion:
    """DDPM training (SD 1.x/2.x, SDXL): integer timesteps, the scheduler's noising, epsilon or v target."""

    scheduler: object
    snr_gamma: float | None = None  # --snr_gamma: Min-SNR weights

    def draw_timesteps(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                             device=latents.device)

    def timesteps_at(self, fractions: Sequence[float], latent_size: Sequence[int], device) -> torch.Tensor:
        """Fixed timesteps, as fractions of the schedule (the validation loss)."""
        num_train = self.scheduler.config.num_train_timesteps
        return torch.tensor([int(f * num_train) for f in fractions], device=device)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_target(self.scheduler, latents, noise, timesteps)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        return min_snr_weights(self.scheduler, timesteps, self.snr_gamma) if self.snr_gamma else None


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow (SD 3, Flux): x_t = (1 - sigma) x_0 + sigma noise, and the model predicts noise - x_0.

    Timesteps are drawn and weighted with diffusers' training_utils under --weighting_scheme, and looked up in the
    scheduler's sigma table as diffusers' SD3 and Flux scripts do, so SD3's static shift (3.0) applies. A scheduler
    with dynamic shifting (Flux-dev) shifts each draw by the image's size, as its sampler does at inference.
    """

    scheduler: object
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    latent_patch: int = 2

    def sigmas_at(self, u: torch.Tensor, latent_size: Sequence[int]) -> torch.Tensor:
        """u in [0, 1) -> sigma, for latents of this (height, width)."""
        config = self.scheduler.config
        index = (u * config.num_train_timesteps).long().clamp(0, config.num_train_timesteps - 1)
        sigmas = self.scheduler.sigmas.to(u.device)[index].float()
        if config.use_dynamic_shifting:
            tokens = (latent_size[0] // self.latent_patch) * (latent_size[1] // self.latent_patch)
            slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
            mu = config.base_shift + slope * (tokens - config.base_image_seq_len)  # diffusers' calculate_shift
            sigmas = self.scheduler.time_shift(mu, 1.0, sigmas)
        return sigmas

    def draw_timesteps(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, latents.shape[0], self.logit_mean,
                                                  self.logit_std, self.mode_scale, latents.device, generator)
        return self.sigmas_at(u, latents.shape[-2:]) * self.scheduler.config.num_train_timesteps

    def timesteps_at(self, fractions: Sequence[float], latent_size: Sequence[int], device) -> torch.Tensor:
        u = torch.tensor(list(fractions), device=device)
        return self.sigmas_at(u, latent_size) * self.scheduler.config.num_train_timesteps

    def _sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return (timesteps / self.scheduler.config.num_train_timesteps).float()

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self._sigmas(timesteps).view(-1, *[1] * (latents.ndim - 1))
        return (1.0 - sigmas) * latents + sigmas * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):  # the others weight every timestep 1
            return None
        return compute_loss_weighting_for_sd3(self.weighting_scheme, self._sigmas(timesteps))


# ---- Templates and data ----------------------------------------------------------------------------------------------
CAPTION_SLOT = "{caption}"


def load_templates(path: str | None, learnable_property: str = "object") -> list[str]:
    """The built-in templates, or the user's file: one per line, `{}` marks the token, `#` lines are comments.

    A line with `{caption}` takes an image's caption there (AUTOMATIC1111's `[filewords]`); its `{}` may then be in
    the caption instead of the line, so it holds at most one.
    """
    if path is None:
        return list(TEMPLATES[learnable_property])
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--templates {path}: cannot read it ({e.__class__.__name__})") from None
    templates = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rest = line.replace(CAPTION_SLOT, "", 1).replace("{}", "", 1)
        if ("{}" not in line and CAPTION_SLOT not in line) or "{" in rest or "}" in rest:
            raise UsageError(f"--templates {path}: line {number} must hold exactly one {{}} (where the token goes), "
                             f"or {CAPTION_SLOT} and at most one {{}}, and no other braces: {line!r}")
        templates.append(line)
    if not templates:
        raise UsageError(f"--templates {path} holds no templates; write one per line, e.g. 'a photo of a {{}}'")
    return templates


def list_image_files(data_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(images, skipped): image files of the folder sorted by name; folders, hidden and other files are skipped."""
    images, skipped = [], []
    for path in sorted(Path(data_dir).iterdir()):
        is_image = path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
        (images if is_image else skipped).append(path)
    return images, skipped


def read_captions(image_paths: Sequence[Path], data_dir: str | Path, caption_extension: str | None,
                  caption_column: str) -> list[tuple[str, str]] | None:
    """`(caption, where it came from)` per image: the file beside it with --caption_extension, or its row of
    --train_data_dir/metadata.jsonl; None without either. A missing or empty caption is refused, naming the file."""
    if caption_extension:
        extension = caption_extension if caption_extension.startswith(".") else f".{caption_extension}"
        captions = []
        for path in image_paths:
            file = path.with_name(path.stem + extension)
            try:
                text = file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                raise UsageError(f"--caption_extension {caption_extension}: {path.name} has no readable caption; "
                                 f"write one in {file}") from None
            if not text:
                raise UsageError(f"--caption_extension {caption_extension}: {file} is empty; describe the image there")
            captions.append((text, str(file)))
        return captions
    metadata = Path(data_dir) / "metadata.jsonl"
    return read_metadata_captions(metadata, image_paths, caption_column) if metadata.is_file() else None


def read_metadata_captions(metadata: Path, image_paths: Sequence[Path], column: str) -> list[tuple[str, str]]:
    """Captions from a Hugging Face imagefolder `metadata.jsonl`: one JSON object per line, `file_name` + column."""
    rows = {}
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"{metadata} line {number}: needs a JSON object with a file_name "
                             f"({e.__class__.__name__}: {e})") from None
        if column not in row:
            raise UsageError(f"--caption_column {column}: {metadata} line {number} has no such field "
                             f"(it has {', '.join(row)})")
        text = row[column]
        if not (metadata.parent / name).is_file():
            raise UsageError(f"{metadata} line {number} names {name}, which is not in --train_data_dir; "
                             "fix the name or remove the line")
        rows[Path(name).as_posix()] = (str(text).strip(), f"{metadata} line {number}")
    missing = [path.name for path in image_paths if path.name not in rows]
    if missing:
        raise UsageError(f"{metadata} has no caption for {missing[0]}; add a line like "
                         f'{{"file_name": "{missing[0]}", "{column}": "a photo of {{}} ..."}}')
    return [rows[path.name] for path in image_paths]


def caption_prompts(templates: Sequence[str], captions: Sequence[tuple[str, str]], placeholder_token: str,
                    templates_given: bool) -> list[list[str]]:
    """Each image's prompts, with the placeholder written once where the caption or template puts `{}`.

    Without `{caption}` templates a caption is the whole prompt; with them, every template is used, and those with
    `{caption}` take the caption's text there. Either way each prompt must name the concept.
    """
    with_slot = [t for t in templates if CAPTION_SLOT in t]
    if templates_given and not with_slot:
        raise UsageError(f"--templates has no {CAPTION_SLOT} line, so the captions would go unused: add "
                         f"{CAPTION_SLOT} where an image's caption goes, or drop the captions")
    prompts = []
    for caption, where in captions:
        text = caption.replace(placeholder_token, "{}")
        rows = [t.replace(CAPTION_SLOT, text) for t in templates] if with_slot else [text]
        for row in rows:
            if "{}" not in row:
                raise UsageError(f"{where}: the caption {caption!r} does not name the concept"
                                 f"{' (nor does the template ' + repr(row) + ')' if with_slot else ''}: write {{}} "
                                 f"or {placeholder_token} where it goes, e.g. 'a photo of {{}} on a beach'")
        prompts.append([row.replace("{}", placeholder_token) for row in rows])
    return prompts


def check_prompt_lengths(tokenizer, prompts: Sequence[tuple[str, str]]) -> None:
    """Every `(prompt, where it came from)`, with all N placeholder tokens written out, must fit the tokenizer's
    window: a truncated prompt would silently lose its end, possibly the placeholder."""
    for prompt, where in prompts:
        length = len(tokenizer(prompt).input_ids)
        if length > tokenizer.model_max_length:
            raise UsageError(f"{where}: {prompt!r} is {length} tokens with the placeholder's vectors, over the "
                             f"tokenizer's {tokenizer.model_max_length}; shorten it (or use fewer --num_vectors)")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency onto white, 16-bit and float scaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def bucket_sizes(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """kohya's aspect-ratio buckets, as (height, width): multiples of `step` between `min_reso` and `max_reso`, at
    most `resolution`^2 pixels, for each width the tallest that fits; and the square."""
    area = resolution * resolution
    sizes = {(resolution // step * step, resolution // step * step)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest to the image's aspect ratio (in log space: 2:1 and 1:2 are as far from 1:1), the larger
    on a tie."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), -hw[0] * hw[1]))


@dataclass(frozen=True)
class Framing:
    """How an upright image becomes a training image: the box cut from it, and the size it is resized to."""

    box: tuple[int, int, int, int]  # left, top, right, bottom in the upright image
    size: tuple[int, int]  # (height, width) of the training image

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """Where the cut began, measured in the resized image (SDXL's crop condition)."""
        scale = self.size[0] / (self.box[3] - self.box[1])
        return round(self.box[1] * scale), round(self.box[0] * scale)


def framing(width: int, height: int, resolution: int, center_crop: bool,
            buckets: Sequence[tuple[int, int]] | None = None) -> Framing:
    """Squashed to the square (diffusers' default), centre-cropped to a square (--center_crop), or, with buckets,
    scaled to cover the nearest bucket and centre-cropped to it: never squashed, cropped as little as possible."""
    if buckets:
        out_h, out_w = nearest_bucket(height, width, buckets)
        scale = max(out_w / width, out_h / height)
        crop_w, crop_h = min(width, round(out_w / scale)), min(height, round(out_h / scale))
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return Framing((left, top, left + crop_w, top + crop_h), (out_h, out_w))
    if center_crop:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return Framing((left, top, left + side, top + side), (resolution, resolution))
    return Framing((0, 0, width, height), (resolution, resolution))


def frame(image: Image.Image, how: Framing, resample=Image.Resampling.BICUBIC) -> Image.Image:
    return image.crop(how.box).resize(how.size[::-1], resample=resample)


def prepare_image(image: Image.Image, resolution: int, center_crop: bool) -> torch.Tensor:
    """EXIF-upright, RGB, optionally center-cropped square, resized: uint8 `[3, resolution, resolution]`."""
    image = to_rgb(ImageOps.exif_transpose(image))
    return to_tensor(frame(image, framing(image.width, image.height, resolution, center_crop)))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 `[channels, H, W]`."""
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array if array.ndim == 3 else array[..., None]).permute(2, 0, 1).contiguous()


def has_alpha(image: Image.Image) -> bool:
    """Whether the image carries an alpha channel or a transparent colour."""
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def is_transparent(image: Image.Image) -> bool:
    """Whether some pixel of the image is not fully opaque (an alpha channel that is all 255 says nothing)."""
    return has_alpha(image) and image.convert("RGBA").getchannel("A").getextrema()[0] < 255


def read_mask(image_path: Path, upright: Image.Image, alpha_mask: bool, mask_dir: str | None) -> Image.Image | None:
    """An image's loss weight as an 8-bit "L" image of its upright size: its alpha channel (--alpha_mask, full
    weight where it has none) or the same-stem file of --mask_dir, itself upright by its own EXIF. None without
    masks. A missing, unreadable, wrongly sized or all-zero mask is refused, naming the file."""
    if alpha_mask:
        flag, where = "--alpha_mask", image_path
        mask = upright.convert("RGBA").getchannel("A") if has_alpha(upright) else Image.new("L", upright.size, 255)
    elif mask_dir:
        candidates = [p for p in sorted(Path(mask_dir).glob(f"{image_path.stem}.*")) if
                      p.suffix.lower() in IMAGE_EXTENSIONS]
        if not candidates:
            raise UsageError(f"--mask_dir {mask_dir} has no mask for {image_path.name}: add {image_path.stem}.png "
                             "(white where the loss counts, black where it does not)")
        where, flag = candidates[0], "--mask_dir"
        try:
            with Image.open(where) as file:
                mask = ImageOps.exif_transpose(file).convert("L")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UsageError(f"--mask_dir: cannot read mask {where} ({e}); fix or remove it") from None
        if mask.size != upright.size:
            raise UsageError(f"--mask_dir: mask {where} is {mask.width}x{mask.height} but its image {image_path.name} "
                             f"is {upright.width}x{upright.height} (upright); give the mask the image's size")
    else:
        return None
    if mask.getextrema()[1] == 0:
        raise UsageError(f"{flag}: the mask of {image_path.name} ({where}) is all zero, so the image would teach "
                         "nothing; paint the concept white, or leave the image out")
    return mask


@dataclass
class TrainingImages:
    """The decoded training images, each framed as it is trained on, with what goes with it."""

    pixels: list[torch.Tensor]  # uint8 [3, H, W]; (H, W) is --resolution square, or the image's bucket
    masks: list[torch.Tensor] | None  # uint8 [1, H, W] loss weights, framed like `pixels`; None without masks
    original_sizes: list[tuple[int, int]]  # upright (height, width) before framing
    crops_top_left: list[tuple[int, int]]  # in the framed image's scale (SDXL's condition)

    def __len__(self) -> int:
        return len(self.pixels)


def load_training_images(paths: Sequence[Path], resolution: int, center_crop: bool,
                         buckets: Sequence[tuple[int, int]] | None = None, alpha_mask: bool = False,
                         mask_dir: str | None = None) -> TrainingImages:
    """Open and check every image (and mask) before training starts; a bad file is named."""
    if not paths:
        raise UsageError("--train_data_dir has no images (.png, .jpg, .jpeg, .webp, .bmp, .gif, .tif): add 3-5")
    result = TrainingImages([], [] if alpha_mask or mask_dir else None, [], [])
    transparent = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not at step 900
                if min(image.size) < resolution:
                    logger.warning(f"{path.name} is {image.width}x{image.height}, smaller than --resolution "
                                   f"{resolution}: it will be upscaled and look soft")
                upright = ImageOps.exif_transpose(image)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UsageError(f"--train_data_dir: cannot read image {path} ({e}); fix or remove it") from None
        if not alpha_mask and is_transparent(upright):
            transparent.append(path.name)
        how = framing(upright.width, upright.height, resolution, center_crop, buckets)
        result.pixels.append(to_tensor(frame(to_rgb(upright), how)))
        mask = read_mask(path, upright, alpha_mask, mask_dir)
        if mask is not None:
            result.masks.append(to_tensor(frame(mask, how, Image.Resampling.BOX)))
        result.original_sizes.append((upright.height, upright.width))
        result.crops_top_left.append(how.crop_top_left)
    if transparent:  # said out loud: captions naming the real background would otherwise describe a white one
        names = ", ".join(transparent[:3]) + (", ..." if len(transparent) > 3 else "")
        logger.warning(f"{len(transparent)} of {len(paths)} images have transparency ({names}): it is composited onto "
                       "white; --alpha_mask would use it as the loss mask instead")
    return result


def sdxl_time_ids(images: TrainingImages) -> torch.Tensor:
    """SDXL's size conditioning per image, float32 `[N, 6]`: original (h, w), crop top-left (y, x), target (h, w).

    As SDXL's training data was described to it: the crop offset is where --center_crop (or the bucket) cut the
    image, measured in the resized image, so a centred square crop of a landscape photo reads (0, x > 0). Flips
    leave it unchanged.
    """
    rows = [[*size, *crop, *pixels.shape[1:]]
            for size, crop, pixels in zip(images.original_sizes, images.crops_top_left, images.pixels)]
    return torch.tensor(rows, dtype=torch.float32)


def bucket_ids(images: TrainingImages) -> tuple[int, ...] | None:
    """Each image's bucket as a small integer, or None when every image has the same size (no buckets needed)."""
    sizes = [tuple(p.shape[1:]) for p in images.pixels]
    distinct = sorted(set(sizes))
    return tuple(distinct.index(size) for size in sizes) if len(distinct) > 1 else None


def latent_loss_weights(masks: Sequence[torch.Tensor], factor: int) -> list[torch.Tensor]:
    """Each mask averaged over the VAE's `factor` x `factor` cells, for both flips: float32 `[2, 1, h, w]`."""
    weights = []
    for mask in masks:
        cells = F.avg_pool2d(mask.float()[None] / 255.0, factor)[0]
        weights.append(torch.stack([cells, cells.flip(-1)]))
    return weights


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed and a position (step, epoch, rank): randomness that a resume can reproduce."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TextualInversionDataset(torch.utils.data.Dataset):
    """Images x repeats, each with a template and a flip drawn from (seed, epoch, index).

    Items are keyed by `(epoch, index)` so the same key always gives the same sample, whichever worker or process
    draws it, and a resumed run sees exactly what the uninterrupted one would have. An item names its image and flip
    rather than carrying pixels: the step looks the latents up in the cache (see ImageLatents).
    """

    def __init__(self, num_images: int, template_input_ids: torch.Tensor, repeats: int, seed: int,
                 per_image: bool = False, captioned_prompts: int = 0, caption_dropout_rate: float = 0.0):
        self.num_images = num_images
        self.template_input_ids = template_input_ids  # [templates, ...], or [images, templates, ...] if per_image
        self.repeats = repeats
        self.seed = seed
        self.per_image = per_image
        # Per image, the first `captioned_prompts` hold its caption; the rest are what a dropped caption becomes.
        self.captioned_prompts = captioned_prompts
        self.caption_dropout_rate = caption_dropout_rate

    def __len__(self) -> int:
        return self.num_images * self.repeats

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int | bool]:
        epoch, index = key
        rng = random.Random(derived_seed(self.seed, "item", epoch, index))
        prompts = self.template_input_ids[index % self.num_images] if self.per_image else self.template_input_ids
        choices = range(len(prompts))
        if self.caption_dropout_rate > 0:  # the caption's prompts, or (dropped) the word-alone ones after them
            dropped = rng.random() < self.caption_dropout_rate
            choices = choices[self.captioned_prompts:] if dropped else choices[:self.captioned_prompts]
        template = choices[rng.randrange(len(choices))]
        return {"image_index": index % self.num_images, "flip": rng.random() < 0.5, "input_ids": prompts[template]}


def pixel_values(images: Sequence[torch.Tensor], image_index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The VAE's input: uint8 images picked by index (all of one size), in [-1, 1], mirrored left-right where
    `flip` is set."""
    pixels = torch.stack([images[i] for i in image_index.tolist()]).float() / 127.5 - 1.0
    return torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)


def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (float32) of the VAE's diagonal Gaussian posterior for a batch of pixels."""
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


@dataclass
class ImageLatents:
    """Where each step's image latents come from: the VAE posterior of every image in both flip states, computed
    once at start-up (`cache`), or the VAE run on the step's pixels (`--no_cache_latents`).

    Either way a latent is `mean + std * N(0, 1)`, drawn from the step's generator exactly as
    `latent_dist.sample(generator)` would, so the cache changes the cost, not the distribution the UNet sees.
    """

    images: Sequence[torch.Tensor]  # uint8 [3, H, W] each, on the CPU; a batch's images share one size
    vae: torch.nn.Module
    mean: list[torch.Tensor] | None = None  # float32 [2 (flip), C, h, w] per image, on the device, when cached
    std: list[torch.Tensor] | None = None

    def cache(self) -> None:
        both = torch.tensor([False, True])
        pairs = [encode_posterior(self.vae, pixel_values(self.images, torch.tensor([i, i]), both))
                 for i in range(len(self.images))]  # one image at a time: bounded memory at any resolution
        self.mean, self.std = (list(tensors) for tensors in zip(*pairs))

    def sample(self, image_index: torch.Tensor, flip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled float32 latents for a batch, one posterior draw each."""
        if self.mean is None:
            mean, std = encode_posterior(self.vae, pixel_values(self.images, image_index, flip))
        else:
            mean, std = (by_image_and_flip(cached, image_index, flip) for cached in (self.mean, self.std))
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        shift = self.vae.config.get("shift_factor")  # SD3's and Flux's VAEs centre their latents; SD's do not
        return (sample if shift is None else sample - shift) * self.vae.config.scaling_factor


def by_image_and_flip(per_image: Sequence[torch.Tensor], image_index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """A batch from tensors kept per image as `[2 (flip), ...]`: the cached posteriors, the mask weights."""
    return torch.stack([per_image[i][f] for i, f in zip(image_index.tolist(), flip.long().tolist())])


def tokenize_prompts(tokenizer, prompts: Sequence[str], placeholder_token: str, num_vectors: int) -> torch.Tensor:
    """Prompts with the placeholder written once, expanded to its N tokens and tokenized: `[len, model_max_length]`."""
    texts = [expand_placeholder(p, placeholder_token, num_vectors) for p in prompts]
    return tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def stack_windows(per_tokenizer: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each tokenizer's `[len, window]` ids side by side as `[len, num_tokenizers, longest window]`: CLIP's 77 and
    T5's longer window share one tensor, zero-padded past each one's own window (PromptEncoder cuts it back)."""
    longest = max(ids.shape[-1] for ids in per_tokenizer)
    return torch.stack([F.pad(ids, (0, longest - ids.shape[-1])) for ids in per_tokenizer], dim=1)


def tokenize_templates(tokenizer, templates: Sequence[str], placeholder_token: str, num_vectors: int) -> torch.Tensor:
    """Every template with the placeholder filled in, tokenized once: `[num_templates, model_max_length]`."""
    return tokenize_prompts(tokenizer, [t.format(placeholder_token) for t in templates], placeholder_token,
                            num_vectors)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each process sees at each optimizer step: a pure function of the seed and the step."""

    num_samples: int
    batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    process_index: int
    seed: int
    image_buckets: tuple[int, ...] | None = None  # --enable_bucket: each image's bucket (sample i is image i % len)

    def _groups(self, order: list[int]) -> list[list[int]]:
        """The samples that may share a batch: all of them, or those of one bucket each (in `order`'s order)."""
        if self.image_buckets is None:
            return [order]
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(self.image_buckets[i % len(self.image_buckets)], []).append(i)
        return [groups[bucket] for bucket in sorted(groups)]

    def _padded(self, size: int) -> int:
        """A group's size rounded up to a multiple of the process count (it wraps around to fill the rest)."""
        return -(-size // self.num_processes) * self.num_processes

    @property
    def batches_per_epoch(self) -> int:
        global_size = self.batch_size * self.num_processes
        groups = self._groups(list(range(self.num_samples)))
        return sum(-(-self._padded(len(group)) // global_size) for group in groups)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.batches_per_epoch // self.gradient_accumulation_steps)

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This process's micro-batches of one epoch, as dataset keys.

        A seeded permutation is padded (by wrapping around) to a multiple of the process count, so every process gets
        the same number of batches and the last, possibly short, global batch splits evenly. With buckets this is done
        per bucket, so that a batch holds one image size, and the batches are then shuffled.
        """
        order = list(range(self.num_samples))
        random.Random(derived_seed(self.seed, "shuffle", epoch)).shuffle(order)
        global_size = self.batch_size * self.num_processes
        chunks = []
        for group in self._groups(order):
            padded = self._padded(len(group))
            group = (group * -(-padded // len(group)))[:padded]  # wraps as often as needed (1 image, 8 GPUs)
            chunks += [group[start : start + global_size] for start in range(0, padded, global_size)]
        if self.image_buckets is not None:
            random.Random(derived_seed(self.seed, "bucket batches", epoch)).shuffle(chunks)
        batches = []
        for chunk in chunks:
            share = len(chunk) // self.num_processes
            mine = chunk[self.process_index * share : (self.process_index + 1) * share]
            batches.append([(epoch, i) for i in mine])
        return batches


def iterate_steps(dataset, plan: BatchPlan, first_step: int, max_train_steps: int,
                  num_workers: int) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """Yield `(step, micro_batches)` from `first_step` on; the last step of an epoch may have fewer micro-batches."""
    step = first_step
    ga = plan.gradient_accumulation_steps
    while step < max_train_steps:
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        batches = plan.epoch_batches(epoch)[step_in_epoch * ga :]
        loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers))
        for group_start in range(0, len(batches), ga):
            yield step, [next(loader) for _ in batches[group_start : group_start + ga]]
            step += 1
            if step >= max_train_steps:
                return


# ---- Learning rate, checkpoints and saving ---------------------------------------------------------------------------
def scaled_learning_rate(learning_rate: float, gradient_accumulation_steps: int, train_batch_size: int,
                         num_processes: int) -> float:
    """--scale_lr: the paper's base lr times the effective batch (5e-3 x 2 GPUs x 4 = 0.04)."""
    return learning_rate * gradient_accumulation_steps * train_batch_size * num_processes


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete `checkpoint-N` folders, oldest first. Half-written ones (see save_checkpoint) are ignored."""
    root = Path(output_dir)
    paths = root.glob(f"{CHECKPOINT_PREFIX}*") if root.is_dir() else []
    steps = [(path.name[len(CHECKPOINT_PREFIX):], path) for path in paths if (path / "training_state.json").is_file()]
    return sorted((int(step), path) for step, path in steps if step.isascii() and step.isdigit())


def checkpoints_to_remove(checkpoints: Sequence[tuple[int, Path]], total_limit: int | None) -> list[Path]:
    """The oldest checkpoints to delete so that, with the one about to be saved, at most `total_limit` remain."""
    if total_limit is None or len(checkpoints) < total_limit:
        return []
    return [path for _, path in checkpoints[: len(checkpoints) - total_limit + 1]]


def identity_of_run(placeholder_token: str, num_vectors: int, source: ModelSource, text_encoders: Sequence[str] | None,
                    initial_embeddings: str | None) -> dict:
    """What a checkpoint must match to be resumed by this run: the word, its vectors, the model, who learns it."""
    identity = {"placeholder_token": placeholder_token, "num_vectors": num_vectors, **source.identity(),
                # null: all of the model's (also what checkpoints from before the flag hold)
                "text_encoders": ",".join(text_encoders) if text_encoders else None}
    if initial_embeddings:  # only then, so checkpoints from before the flag still match
        identity["initial_embeddings"] = str(Path(initial_embeddings).expanduser().resolve())
    return identity


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """'latest' -> newest complete checkpoint in output_dir (None if there is none); an existing folder -> that
    folder; any other name -> that name inside output_dir, as diffusers resolves
    `--resume_from_checkpoint=checkpoint-2`."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    return path if path.is_dir() else Path(output_dir) / path.name


def embeds_filename(stem: str, safe_serialization: bool) -> str:
    return f"{stem}.safetensors" if safe_serialization else f"{stem}.bin"


def app_word(placeholder_token: str) -> str:
    """The file stem for the apps, which is the word a user types there: "<cat-toy>" -> "cat-toy".

    AUTOMATIC1111/Forge, ComfyUI, kohya and InvokeAI all name an embedding after its file. InvokeAI's prompt syntax
    `<word>` allows only letters, digits and `._-`, so everything else goes. A stem that would collide with
    diffusers' own `learned_embeds*` files gets a suffix.
    """
    word = re.sub(r"[^A-Za-z0-9._-]+", "", placeholder_token).strip("._-") or "embedding"
    return f"{word}-word" if word.startswith("learned_embeds") else word


def app_layout(embeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as every app reads them (README, "Using the result").

    SDXL's `clip_l`/`clip_g` pair already is. One text encoder's `{token: [n, dim]}` is not: InvokeAI takes the
    width of a single unknown key from `shape[0]` (which is n), so it goes under kohya's key `emb_params`, which
    InvokeAI reads width-last and AUTOMATIC1111, ComfyUI and kohya read as the file's one tensor.
    """
    return dict(embeds) if len(embeds) > 1 else {"emb_params": next(iter(embeds.values()))}


def with_key_aliases(embeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The T5 vectors under both names the apps read (KEY_ALIASES): `t5` and `t5xxl`, as separate tensors (a
    .safetensors cannot hold two names for one storage)."""
    aliases = {alias: embeds[key].detach().clone() for key, alias in KEY_ALIASES.items() if key in embeds}
    return {**embeds, **aliases}


def save_learned_embeds(embeds: dict[str, torch.Tensor], path: str | Path, safe_serialization: bool = True,
                        metadata: dict[str, str] | None = None) -> None:
    """Write `{name: float32 [num_vectors, dim]}` (see the families' `keys`), with the run's metadata in a .safetensors.

    Written to a temporary name and renamed, so a crash never leaves a file that exists but does not load.
    """
    import safetensors.torch

    path = Path(path)
    tensors = {name: vectors.detach().float().cpu().contiguous() for name, vectors in embeds.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    if safe_serialization:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    else:
        # torch's legacy format: AUTOMATIC1111's safe unpickler refuses the zip entries (byteorder,
        # .format_version) that torch >= 2.1 writes, and every other loader reads both.
        torch.save(tensors, tmp, _use_new_zipfile_serialization=False)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; results are meant to be shared
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def save_result_files(embeds: dict[str, torch.Tensor], output_dir: Path, suffix: str, placeholder_token: str,
                      safe_serialization: bool, metadata: dict[str, str]) -> list[Path]:
    """`learned_embeds{suffix}` for diffusers and `<word>{suffix}` for the apps (suffix "" or "-steps-N")."""
    paths = [output_dir / embeds_filename(f"learned_embeds{suffix}", safe_serialization),
             output_dir / embeds_filename(f"{app_word(placeholder_token)}{suffix}", safe_serialization)]
    save_learned_embeds(with_key_aliases(embeds), paths[0], safe_serialization, metadata)
    save_learned_embeds(with_key_aliases(app_layout(embeds)), paths[1], safe_serialization, metadata)
    return paths


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never publishes data still in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir: Path, step: int, embeds: dict[str, torch.Tensor], state: dict, training_state: dict,
                    total_limit: int | None, metadata: dict[str, str] | None = None) -> Path:
    """checkpoint-N: vectors, optimizer/LR-scheduler/scaler state and the run's identity; not the text encoder.

    Built in a hidden folder and renamed into place, so `--resume_from_checkpoint latest` never picks a half one.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_learned_embeds(embeds, tmp / "learned_embeds.safetensors", metadata=metadata)
    torch.save(state, tmp / "optimizer.pt")
    (tmp / "training_state.json").write_text(json.dumps({**training_state, "step": step}, indent=2))
    for path in (tmp / "optimizer.pt", tmp / "training_state.json", tmp):
        _fsync(path)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(output_dir)
    # Pruned only once the new one is in place: a failed save never leaves fewer checkpoints than before.
    older = [(n, p) for n, p in list_checkpoints(output_dir) if p != final]
    for old in checkpoints_to_remove(older, total_limit):
        # Renamed out of sight first: a kill during rmtree must not leave a half-deleted checkpoint that still looks
        # complete to --resume_from_checkpoint latest.
        doomed = old.with_name(f".{old.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier kill, if any
        os.replace(old, doomed)
        shutil.rmtree(doomed)
    return final


def load_checkpoint(path: Path, expected: dict) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(training_state, embeds, optimizer state) of a checkpoint, refusing one made for another concept or model."""
    import safetensors.torch

    try:
        training_state = json.loads((path / "training_state.json").read_text())
        embeds = safetensors.torch.load_file(str(path / "learned_embeds.safetensors"))
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        training_state["step"], training_state["seed"], state["optimizer"], state["lr_scheduler"]
    except Exception as e:  # any damage (truncated, unpicklable, missing keys) means: not this checkpoint
        raise UsageError(f"--resume_from_checkpoint {path} cannot be loaded ({e}); pick another checkpoint") from None
    for key, value in expected.items():
        if training_state.get(key) != value:
            raise UsageError(f"--resume_from_checkpoint {path} was made with {key}={training_state.get(key)!r}, "
                             f"this run has {value!r}; resume with the same settings or start a new --output_dir")
    return training_state, embeds, state


# ---- Models and the training step ------------------------------------------------------------------------------------
def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict, per the scheduler's prediction_type."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UsageError(f"--pretrained_model_name_or_path: scheduler prediction_type {prediction_type!r} is not "
                     "supported; textual inversion here trains epsilon or v_prediction models")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR loss weights (Hang et al., 2023) as diffusers' training scripts compute them: min(SNR, gamma) / SNR
    for epsilon, / (SNR + 1) for v-prediction. SNR is clamped above 0 so that a zero-terminal-SNR schedule's last
    step gets the formula's limit (1) instead of 0/0."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float().clamp(min=1e-20)
    weights = torch.clamp(snr, max=snr_gamma)
    return weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, mask_weights: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None, options: LossOptions | None = None,
                   prior: torch.Tensor | None = None) -> torch.Tensor:
    """The MSE. A mask weights each latent cell, at least `options.unmasked_weight`; with
    `normalize_masked_area_loss` each sample's loss is divided by its weights' total, so the loss scale does not
    depend on how much of the image the concept covers. `prior` (masked prior preservation) is the frozen model's
    prediction without the word: outside the mask the prediction is also pulled towards it. `sample_weights`
    (Min-SNR) scale each sample's loss. Without a mask or sample weights, plain `F.mse_loss`."""
    if mask_weights is None and sample_weights is None:
        return F.mse_loss(prediction, target, reduction="mean")
    squared = (prediction - target) ** 2
    if mask_weights is None:
        per_sample = squared.mean(dim=(1, 2, 3))
    else:
        options = options or LossOptions()
        weights = mask_weights.clamp(min=options.unmasked_weight).expand_as(squared)
        per_sample = area_mean(squared * weights, weights, options.normalize_masked_area_loss)
        if prior is not None:
            outside = 1.0 - weights
            pulled = (prediction - prior) ** 2 * outside * options.masked_prior_preservation_weight
            per_sample = per_sample + area_mean(pulled, outside, options.normalize_masked_area_loss)
    return (per_sample if sample_weights is None else per_sample * sample_weights).mean()


def area_mean(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Per sample: the weighted sum over the weights' total (normalized), or the mean over every cell."""
    if not normalize:
        return weighted.mean(dim=(1, 2, 3))
    return weighted.sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp(min=1e-12)


def unmasked_draw(mask_weights: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """--unmasked_probability: each sample's mask replaced by full weight with this probability. Drawn from the
    step's generator after its noise, so a run without the option draws what it always drew, and a resume the same."""
    if not probability:
        return mask_weights
    drop = torch.rand(mask_weights.shape[0], generator=generator, device=generator.device) < probability
    return torch.where(drop.view(-1, 1, 1, 1).to(mask_weights.device), torch.ones_like(mask_weights), mask_weights)


@contextlib.contextmanager
def initializer_in_place(embeddings: Sequence[PlaceholderEmbedding]):
    """The placeholder rows read the initializer's vectors instead of the learned ones, for the frozen model's own
    prediction (--masked_prior_preservation_weight)."""
    for embedding in embeddings:
        embedding.use_initial = True
    try:
        yield
    finally:
        for embedding in embeddings:
            embedding.use_initial = False


def training_loss(batch: dict, models: Models, generator: torch.Generator,
                  timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """The latent-diffusion loss of one micro-batch: noise the image latents, predict, MSE against the target.
    Timesteps are drawn from the generator unless given (the validation loss fixes them, and uses each mask
    whole, without the prior: the same loss at every validation)."""
    device, process, options = generator.device, models.process, models.loss
    latents = models.latents.sample(batch["image_index"], batch["flip"], generator)
    # Noise, noising and target in float32 whatever the compute dtype; only the denoiser's input is cast down.
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    validating = timesteps is not None
    if not validating:
        timesteps = process.draw_timesteps(latents, generator)
    if options.noise_offset:  # diffusers' --noise_offset: a per-channel shift, so the model can learn mean brightness
        noise = noise + options.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                           device=device, dtype=latents.dtype)
    noisy_latents = process.noisy(latents, noise, timesteps)
    input_ids = batch["input_ids"].to(device)
    encoder_hidden_states, pooled = models.prompt_encoder(input_ids)
    conditions = None if models.conditions is None else models.conditions[batch["image_index"].to(device)]
    family = FAMILY_NAMES[models.family]
    model_pred = family.predict(models.denoiser, noisy_latents, timesteps, encoder_hidden_states, pooled, conditions,
                                models.weight_dtype)
    target = process.target(latents, noise, timesteps)
    mask_weights, prior = None, None
    if options.mask_weights is not None:
        mask_weights = by_image_and_flip(options.mask_weights, batch["image_index"], batch["flip"])
        if not validating:
            mask_weights = unmasked_draw(mask_weights, options.unmasked_probability, generator)
            if options.masked_prior_preservation_weight:
                prior = prior_prediction(models, family, (noisy_latents, timesteps, input_ids, conditions),
                                         mask_weights, model_pred)
    return diffusion_loss(model_pred.float(), target.float(), mask_weights, process.weights(timesteps), options,
                          prior)


def prior_prediction(models: Models, family, inputs: tuple, mask_weights: torch.Tensor,
                     model_pred: torch.Tensor) -> torch.Tensor:
    """The frozen model's prediction for the same noisy latents with the initializer's vectors in place of the word,
    without gradient, for the samples that have a mask this step (the others keep their own prediction: no pull)."""
    noisy_latents, timesteps, input_ids, conditions = inputs
    prior = model_pred.detach().float().clone()
    masked = (mask_weights < 1).flatten(1).any(dim=1)
    if not masked.any():
        return prior
    pick = masked.nonzero().flatten()
    # The unwrapped encoder: DDP's forward broadcasts buffers, and ranks with no masked sample skip this pass.
    encoder = getattr(models.prompt_encoder, "module", models.prompt_encoder)
    with torch.no_grad(), initializer_in_place(models.trained):
        states, pooled = encoder(input_ids[pick])
        picked_conditions = None if conditions is None else conditions[pick]
        prior[pick] = family.predict(models.denoiser, noisy_latents[pick], timesteps[pick], states, pooled,
                                     picked_conditions, models.weight_dtype).float()
    return prior


# ---- main, step by step ----------------------------------------------------------------------------------------------
def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    logging_dir = Path(args.output_dir, args.logging_dir)
    report_to = None if args.report_to == "none" else args.report_to
    return Accelerator(mixed_precision=args.mixed_precision, log_with=report_to,
                       project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir))


# Library notices that tell a user of this script nothing, each seen in its runs; other library warnings still show.
LIBRARY_NOISE = (
    "that should be kept in float32",  # diffusers, casting a model whose list of fp32 modules is empty
    "requires torchvision",  # transformers' image processors, which no pipeline here uses
    "multivariate normal distribution",  # transformers' "mean resizing", inside load_textual_inversion
    "local_dir_use_symlinks",  # huggingface_hub, about an argument diffusers passes
    # bitsandbytes (imported by diffusers when installed) asking the hub for CPU kernels it has a fallback for
    "kernels-community/quantization-bitsandbytes",
)


class _DropLibraryNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in LIBRARY_NOISE)


def quiet_libraries(level: int = logging.WARNING) -> None:
    """Library warnings at `level` without LIBRARY_NOISE, and no loading bars (the run's own bar is the one to
    watch; huggingface_hub's download bars stay). Also used by examples/generate.py and evaluate.py."""
    import warnings

    import diffusers
    import transformers

    for library in (transformers, diffusers):
        library.utils.logging.set_verbosity(level)
        library.utils.logging.disable_progress_bar()
        for handler in logging.getLogger(library.__name__).handlers:
            handler.addFilter(_DropLibraryNoise())
    for noise in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(noise)}")


class _AboveTheBar(logging.StreamHandler):
    """Log lines go above the progress bar instead of being glued to its end."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(accelerator) -> None:
    handler = _AboveTheBar(sys.stderr)
    handler.addFilter(_DropLibraryNoise())  # library records that propagate to the root logger land here
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.ERROR, force=True,
                        handlers=[handler])
    # Library chatter only from one process, and only warnings that say something.
    quiet_libraries(logging.WARNING if accelerator.is_local_main_process else logging.ERROR)


def agree_on_seed(accelerator, seed: int | None) -> int:
    """Every process must shuffle and noise alike, so an unset seed is drawn once on rank 0 and shared."""
    from accelerate.utils import broadcast_object_list

    if seed is None:
        seed = [int.from_bytes(os.urandom(4), "little") if accelerator.is_main_process else 0]
        seed = broadcast_object_list(seed)[0]
    return seed


def embedding_scale(embedding: PlaceholderEmbedding) -> float:
    """The typical size of one coordinate of this encoder's words: the median norm of the vocabulary rows in use
    over sqrt(dim)."""
    return embedding.reference_norm / math.sqrt(embedding.vectors.shape[1])


def learning_rates(embeddings: Sequence[PlaceholderEmbedding], names: Sequence[str], learning_rate: float,
                   t5_learning_rate: float | None) -> dict[str, float]:
    """Each learning encoder's rate: --learning_rate for the CLIP encoders, T5's own.

    Adam moves every coordinate by about lr per step, whatever its scale, and T5's token embeddings are far larger
    than CLIP's (std 1 at initialisation; CLIP's 0.02). At CLIP's rate T5's vectors would barely turn, which fits
    users' reports that T5 textual inversion with diffusers' Flux script (one rate for both) barely changes the
    image. So unless --t5_learning_rate is given, T5's rate is --learning_rate x T5's scale over the first (CLIP-L)
    encoder's.
    """
    rates = {}
    for embedding, name in zip(embeddings, names):
        if not embedding.vectors.requires_grad:
            continue
        rates[name] = learning_rate
        if name == "t5":
            scale = embedding_scale(embedding) / embedding_scale(embeddings[0])
            rates[name] = t5_learning_rate or learning_rate * scale
    return rates


def make_optimizer_and_schedule(args, embeddings: list[PlaceholderEmbedding], learning_rate: float,
                                max_train_steps: int, rates: Sequence[float] | None = None):
    """AdamW over the learning vectors, each at its rate (default: all at learning_rate), and the LR schedule."""
    from diffusers.optimization import get_scheduler

    if args.use_8bit_adam:
        size = sum(e.vectors.numel() for e in embeddings)
        logger.info(f"--use_8bit_adam changes nothing here: the optimizer state is num_vectors x dim ({size} values, "
                    f"{size * 8} bytes in fp32), so AdamW keeps it in fp32")
    groups: dict[float, list[torch.Tensor]] = {}
    for embedding, rate in zip(embeddings, rates or [learning_rate] * len(embeddings)):
        groups.setdefault(rate, []).append(embedding.vectors)
    optimizer = torch.optim.AdamW([{"params": vectors, "lr": rate} for rate, vectors in groups.items()],
                                  lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # Stepped once per optimizer step by us, not by accelerate (which would step it once per process).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps, num_cycles=args.lr_num_cycles)
    return optimizer, lr_scheduler


def validation_every(validation_steps: int, validation_epochs: int | None, num_samples: int) -> int:
    """--validation_steps, or what diffusers makes of its deprecated --validation_epochs: that many times the
    dataset's length in samples (images x --repeats; diffusers counts samples there, not optimizer steps)."""
    if validation_epochs is None:
        return validation_steps
    steps = validation_epochs * num_samples
    logger.warning(f"--validation_epochs is deprecated (as in diffusers): validating every {steps} steps "
                   f"({validation_epochs} x {num_samples} samples); use --validation_steps {steps} instead")
    return steps


def log_run_summary(args, inputs: Inputs, num_samples: int, plan: BatchPlan, max_train_steps: int,
                    learning_rates: dict[str, float], first_step: int, seed: int) -> None:
    lines = [
        "***** Running training *****",
        f"  Model family = {inputs.family} ({len(inputs.tokenizers)} text encoder(s))",
        f"  Num images = {len(inputs.images)} (x {args.repeats} repeats = {num_samples} samples per epoch)",
        f"  Num processes = {plan.num_processes}",
        f"  Instantaneous batch size per device = {args.train_batch_size}",
        f"  Gradient accumulation steps = {args.gradient_accumulation_steps}",
        f"  Total batch size (w. parallel, distributed & accumulation) = "
        f"{args.train_batch_size * plan.num_processes * args.gradient_accumulation_steps}",
        f"  Optimizer steps per epoch = {plan.steps_per_epoch}, "
        f"epochs = {math.ceil(max_train_steps / plan.steps_per_epoch)}",
        f"  Total optimization steps = {max_train_steps} (starting at {first_step})",
        (f"  Learning rate = {next(iter(learning_rates.values())):g}" if len(set(learning_rates.values())) == 1 else
         f"  Learning rates = {', '.join(f'{name} {rate:g}' for name, rate in learning_rates.items())}")
        + (" (scaled by --scale_lr)" if args.scale_lr else ""),
        f"  Text encoders learning = {', '.join(learning_rates)}",
        f"  Placeholder token ids = {inputs.placeholder_token_ids[0]}, seed = {seed}",
    ]
    logger.info("\n".join(lines))


# ---- Validation: which step to keep ------------------------------------------------------------------------------
# Fractions of the training timesteps at which the validation loss is taken: the same ones at every validation.
VALIDATION_LOSS_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def read_validation_prompts(values: Sequence[str] | None) -> list[str]:
    """--validation_prompt as given: each value a prompt, or a .txt file of prompts, one per line."""
    prompts = []
    for value in values or []:
        if not value.endswith(".txt"):
            prompts.append(value)
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise UsageError(f"--validation_prompt {value} is not a file: give a prompt, or a .txt file of prompts")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        if not lines:
            raise UsageError(f"--validation_prompt {value} has no prompts: write one per line")
        prompts += lines
    return prompts


def validation_prompts(edits: Sequence[str], reconstruction: str | None, placeholder_token: str,
                       learnable_property: str, scored: bool) -> list[str]:
    """What each validation draws: the reconstruction prompt, then the edit prompts (placeholder written once).

    Empty when there is nothing to look at or score: no edit prompts, no reconstruction prompt, no CLIP model.
    With a CLIP model and no edit prompts, the defaults for objects or styles (templates.py).
    """
    from templates import EDIT_PROMPTS, RECONSTRUCTION_PROMPTS

    if not (edits or reconstruction or scored):
        return []
    if not edits and scored:
        edits = [p.format(placeholder_token) for p in EDIT_PROMPTS[learnable_property]]
    return [reconstruction or RECONSTRUCTION_PROMPTS[learnable_property].format(placeholder_token), *edits]


@dataclass
class Validator:
    """What each validation uses, prepared once (main process)."""

    prompts: list[str]  # validation_prompts(): reconstruction first; empty: no images
    loss_prompt_ids: torch.Tensor  # [num_images, num_text_encoders, 77]: each image's first training prompt
    reference_features: torch.Tensor | None  # CLIP's features of the training images: CLIP-I's reference
    scorer: object | None  # validation_report.ClipScorer, with --clip_model_name_or_path
    pipeline: object | None = None  # the inference pipeline, built at the first validation that draws images


def validation_loss(models: Models, loss_prompt_ids: torch.Tensor, seed: int) -> float:
    """The loss over every training image (unflipped), at fixed timesteps with fixed noise and posterior draws: the
    same draws at each validation, so its curve shows the vectors changing, not the sampling."""
    device, factor = models.denoiser.device, vae_factor(models.vae.config)
    k, losses = len(VALIDATION_LOSS_TIMESTEPS), []
    with torch.no_grad():
        for image in range(len(loss_prompt_ids)):
            latent_size = [side // factor for side in models.latents.images[image].shape[-2:]]
            timesteps = models.process.timesteps_at(VALIDATION_LOSS_TIMESTEPS, latent_size, device)
            generator = torch.Generator(device).manual_seed(derived_seed(seed, "validation loss", image))
            batch = {"image_index": torch.full((k,), image), "flip": torch.zeros(k, dtype=torch.bool),
                     "input_ids": loss_prompt_ids[image].expand(k, *loss_prompt_ids.shape[1:])}
            losses.append(training_loss(batch, models, generator, timesteps).item())
    return sum(losses) / len(losses)


# Pixels drawn per pipeline call at validation: 8 images at 512 px. Several prompts share a call where that fits (small
# images), which is most of the cost saved at small sizes; large images go one prompt at a time, bounding memory.
VALIDATION_PIXELS_PER_CALL = 8 * 512 * 512


def prompts_per_call(num_images: int, resolution: int) -> int:
    return max(1, VALIDATION_PIXELS_PER_CALL // (num_images * resolution * resolution))


def draw_validation_images(pipeline, prompts: Sequence[str], num_images: int, resolution: int, seed: int,
                           weight_dtype: torch.dtype, guidance_scale: float = 7.5,
                           steps: int = 25) -> list[list[Image.Image]]:
    """num_images per prompt, image i of every prompt from the same starting noise (so rows differ only by the
    prompt, and steps only by the vectors)."""
    device = pipeline.device
    chunk = prompts_per_call(num_images, resolution)
    images = []
    for start in range(0, len(prompts), chunk):
        batch = list(prompts[start:start + chunk])
        # The pipeline orders a batch prompt by prompt, num_images each; one generator per image.
        generators = [torch.Generator(device).manual_seed(derived_seed(seed, "validation", i))
                      for _ in batch for i in range(num_images)]
        with torch.autocast(device.type, enabled=weight_dtype != torch.float32, dtype=weight_dtype):
            images += pipeline(batch, num_images_per_prompt=num_images, num_inference_steps=steps,
                               guidance_scale=guidance_scale, height=resolution, width=resolution,
                               generator=generators).images
    return [images[i:i + num_images] for i in range(0, len(images), num_images)]


def image_grid(images: Sequence[Image.Image]) -> Image.Image:
    """A near-square grid, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    return prompt_grid([images[i:i + cols] for i in range(0, len(images), cols)])


def prompt_grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """One row per prompt."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (max(len(r) for r in rows) * w, len(rows) * h), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    return grid


def validation_pipeline(args, accelerator, models: Models):
    """The family's inference pipeline around this run's models (the vectors in place), with DPM-Solver++ for DDPM
    families and the pipeline's own sampler for flow-matching ones."""
    import diffusers

    family = FAMILY_NAMES[models.family]
    pipeline = pipeline_class(models.family).from_pretrained(
        models.source.config, **pipeline_parts(accelerator, models), revision=models.source.revision,
        dtype=models.weight_dtype)
    if family.validation_scheduler:
        pipeline.scheduler = getattr(diffusers, family.validation_scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def nearest_words_by_key(models: Models, placeholder_token: str) -> dict[str, list[list[str]]]:
    """Each vector's 5 nearest vocabulary words, per text encoder (keyed as saved)."""
    keys = FAMILY_NAMES[models.family].keys(placeholder_token)
    # Only the vocabulary: T5's spare rows past it (where its placeholder ids may sit) are no words.
    return {key: nearest_words(e.vectors, e.frozen.weight[:e.first_placeholder_id], tokenizer)
            for key, e, tokenizer in zip(keys, models.embeddings, models.tokenizers)}


def embedding_record(models: Models, placeholder_token: str, with_words: bool) -> dict:
    """The vectors' telemetry per text encoder (keyed as saved), and their nearest words."""
    keys = FAMILY_NAMES[models.family].keys(placeholder_token)
    record = {"norm_ratio": {}, "cosine_to_init": {}}
    for key, embedding in zip(keys, models.embeddings):
        telemetry = embedding.telemetry()
        record["norm_ratio"][key], record["cosine_to_init"][key] = telemetry["norm_ratio"], telemetry["cosine_to_init"]
    if with_words:
        record["nearest_words"] = nearest_words_by_key(models, placeholder_token)
    return record


def validate(run: Run, step: int) -> dict:
    """One validation: loss, telemetry, images and CLIP scores; the record that report.json keeps."""
    from dataclasses import replace

    import time

    started = time.perf_counter()
    args, accelerator, validator = run.args, run.accelerator, run.validator
    # The unwrapped encoder: a DDP forward on one process would wait for the others.
    models = replace(run.models, prompt_encoder=accelerator.unwrap_model(run.models.prompt_encoder))
    models.prompt_encoder.eval()
    record = {"step": step, "validation_loss": validation_loss(models, validator.loss_prompt_ids, run.seed),
              **embedding_record(models, args.placeholder_token, with_words=True)}
    if validator.prompts:
        if validator.pipeline is None:
            validator.pipeline = validation_pipeline(args, accelerator, models)
        # Expanded here only for a pipeline that does not write out a multi-vector token itself (SD3): the others do
        # (TextualInversionLoaderMixin), as they will for users, and expanding twice would turn "<t> <t>_1" into
        # "<t> <t>_1 <t> <t>_1_1".
        family = FAMILY_NAMES[models.family]
        prompts = [p if family.expands_placeholder else expand_placeholder(p, args.placeholder_token, args.num_vectors)
                   for p in validator.prompts]
        guidance_scale = args.validation_guidance_scale
        guidance_scale = family.guidance_scale if guidance_scale is None else guidance_scale
        rows = draw_validation_images(validator.pipeline, prompts, args.num_validation_images, args.resolution,
                                      run.seed, models.weight_dtype, guidance_scale, args.validation_inference_steps)
        path = Path(args.output_dir, "validation", f"step-{step}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        prompt_grid(rows).save(path)
        record.update(images=path.relative_to(args.output_dir).as_posix(), prompts=validator.prompts,
                      grid={"rows": len(rows), "cols": args.num_validation_images})
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(i) for r in rows for i in r]), step,
                                          dataformats="NHWC")
        if validator.scorer is not None:
            from validation_report import clip_scores

            record.update(clip_scores(validator.scorer, validator.reference_features,
                                      list(zip(validator.prompts, rows)), [args.placeholder_token]))
    models.prompt_encoder.train()
    record["seconds"] = round(time.perf_counter() - started, 3)  # what validating costs (benchmarks/)
    return record


def pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, FAMILY_NAMES[family].pipeline)


def pipeline_parts(accelerator, models: Models) -> dict:
    """The components this run has in memory, as from_pretrained keyword arguments (the scheduler is reloaded)."""
    family = FAMILY_NAMES[models.family]
    encoders = accelerator.unwrap_model(models.prompt_encoder).text_encoders
    parts = {family.denoiser[0]: models.denoiser, "vae": models.vae}
    parts.update({name: encoder for (name, _), encoder in zip(family.text_encoders, encoders)})
    parts.update({name: tokenizer for (name, _), tokenizer in zip(family.tokenizers, models.tokenizers)})
    parts.update(family.pipeline_extras)
    return parts


def save_full_pipeline(args, accelerator, models: Models) -> None:
    """The base pipeline with the learned rows written into ordinary embedding matrices."""
    encoders = accelerator.unwrap_model(models.prompt_encoder).text_encoders
    for encoder, embedding in zip(encoders, models.embeddings):
        encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(embedding.merged_weight(), freeze=True))
        encoder.config.vocab_size = encoder.get_input_embeddings().num_embeddings
    try:
        pipeline = pipeline_class(models.family).from_pretrained(
            models.source.config, **pipeline_parts(accelerator, models), revision=models.source.revision)
        pipeline.save_pretrained(args.output_dir, safe_serialization=not args.no_safe_serialization)
    finally:
        for encoder, embedding in zip(encoders, models.embeddings):
            encoder.set_input_embeddings(embedding)
            encoder.config.vocab_size = embedding.frozen.num_embeddings


@dataclass(frozen=True)
class LossOptions:
    """What shapes the loss beyond the MSE (see training_loss)."""

    mask_weights: list[torch.Tensor] | None = None  # per image [2 (flip), 1, h, w], on the device (masks given)
    noise_offset: float = 0.0  # --noise_offset
    embedding_reg_weight: float = 0.0  # --embedding_reg_weight: added to the loss, not part of the logged loss
    # Outside the masks (the --unmasked_weight ... flags): here the object-only loss; masked_loss_options resolves
    # the flags, with MASK_DEFAULTS.
    unmasked_weight: float = 0.0
    unmasked_probability: float = 0.0
    normalize_masked_area_loss: bool = True
    masked_prior_preservation_weight: float = 0.0


# With a mask, the background is held by the frozen model's own prediction unless a flag says otherwise: the object
# alone leaves its outline untaught (colour beyond the edge costs nothing) and the background free to drift. In the
# toy world this beat the object-only loss over 6 concepts x 3 seeds (README, "Evidence in the toy world").
MASK_DEFAULTS = {"masked_prior_preservation_weight": 1.0}


def masked_loss_options(args: argparse.Namespace) -> dict:
    """The masked-loss flags with the defaults for masks filled in (a flag left out is None): MASK_DEFAULTS, then
    LossOptions' own (the object only, over its area)."""
    defaults = {name: MASK_DEFAULTS.get(name, getattr(LossOptions, name)) for name in MASKED_LOSS_FLAGS}
    return {name: defaults[name] if getattr(args, name) is None else getattr(args, name) for name in defaults}


@dataclass
class Models:
    """The frozen pipeline parts and the trainable vectors, as prepared for this process."""

    family: str  # the adapter's name in FAMILY_NAMES: "sd" (SD 1.x/2.x), "sdxl", "sd3" or "flux"
    tokenizers: list  # one per text encoder
    prompt_encoder: torch.nn.Module  # PromptEncoder, DDP-wrapped when there are several processes
    vae: torch.nn.Module
    denoiser: torch.nn.Module  # the UNet (SD, SDXL) or the transformer (SD3, Flux)
    process: Diffusion | FlowMatching  # noise, timesteps, target and their weights
    embeddings: list[PlaceholderEmbedding]  # one per text encoder, in the pipeline's order
    weight_dtype: torch.dtype
    latents: ImageLatents
    conditions: torch.Tensor | None  # per image: SDXL's [N, 6] size conditions, Flux's [N] guidance; else None
    loss: LossOptions
    source: ModelSource  # where the frozen weights came from: the configs the validation pipeline is built on

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under its SD/SDXL name."""
        return self.denoiser

    @property
    def trained(self) -> list[PlaceholderEmbedding]:
        """The embeddings that learn (--text_encoders); the others keep the initializer's vectors."""
        return [embedding for embedding in self.embeddings if embedding.vectors.requires_grad]

    def embeds(self, placeholder_token: str) -> dict[str, torch.Tensor]:
        """The vectors as they are saved: `{token: T}`, or one key per encoder, e.g. SDXL's `clip_l` and `clip_g`."""
        keys = FAMILY_NAMES[self.family].keys(placeholder_token)
        return {key: embedding.vectors for key, embedding in zip(keys, self.embeddings)}


class TrainingStopped(Exception):
    """Training ended early on purpose (signal) or by necessity (non-finite loss); carries the exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def stop_requests() -> Iterator[dict]:
    """While active, SIGINT/SIGTERM ask to stop after the current step (with a save); a second one exits at once."""
    import signal

    stop = {"signal": 0}

    def handle(signum, frame):
        if stop["signal"]:
            os._exit(128 + signum)  # files are written atomically, so leaving mid-write loses nothing saved
        stop["signal"] = signum
        logger.warning("Stopping after this step and saving a checkpoint (press Ctrl-C again to quit at once)")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def accumulate_step(accelerator, models: Models, micro_batches: list[dict], step: int, seed: int) -> torch.Tensor:
    """Forward and backward over one step's micro-batches; return this process's mean loss."""
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        generator = torch.Generator(accelerator.device).manual_seed(
            derived_seed(seed, "noise", step, i, accelerator.process_index))
        last = i == len(micro_batches) - 1
        # Gradients of the accumulation's earlier micro-batches stay local: one all-reduce per step.
        with contextlib.nullcontext() if last else accelerator.no_sync(models.prompt_encoder):
            loss = training_loss(batch, models, generator)
            objective = loss
            if models.loss.embedding_reg_weight:  # in the same backward, so DDP reduces one gradient per step
                pull = sum(embedding.pull_to_initial() for embedding in models.trained)
                objective = loss + models.loss.embedding_reg_weight * pull
            accelerator.backward(objective / len(micro_batches))
        step_loss += loss.detach() / len(micro_batches)
    return step_loss


@dataclass
class Run:
    """What the loop and its saves need, gathered once by main()."""

    args: argparse.Namespace
    accelerator: object
    models: Models
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    seed: int
    run_identity: dict  # what a checkpoint must match to be resumed by this run
    max_train_steps: int
    validation_steps: int  # --validation_steps, or what the deprecated --validation_epochs converts to
    validator: Validator | None  # on the main process
    scores: ScoreHistory


def is_validation_step(run: Run, done: int) -> bool:
    """Every --validation_steps, and the last step (a candidate for the best like any other)."""
    return done % run.validation_steps == 0 or done == run.max_train_steps


def record_validation(run: Run, done: int, embeds: dict[str, torch.Tensor], metadata: dict) -> tuple[dict, bool]:
    """Validate, keep the best step's files (learned_embeds-best and its named copy) and report.json up to date;
    return the validation's record and whether --early_stopping_patience ends the run here."""
    args, scores = run.args, run.scores
    record = validate(run, done)
    run.accelerator.log({f"validation/{key}": record[key] for key in ("validation_loss", "clip_i", "clip_t")
                         if record.get(key) is not None}, step=done)
    changed = scores.add(record, embeds)
    if changed:  # usually to this step; a rule over the whole history may also go back to an earlier one
        save_result_files(scores.best_embeds, Path(args.output_dir), "-best", args.placeholder_token,
                          not args.no_safe_serialization, {**metadata, "step": str(scores.best["step"])})
    patience = args.early_stopping_patience
    stop = scores.patience_spent(patience) and done < run.max_train_steps
    if stop:
        scores.stopped_early = {"step": done, "why": f"no better score ({scores.rule}) in the {patience} "
                                                     f"validation(s) after step {scores.best['step']}"}
    write_report(Path(args.output_dir), scores, args.placeholder_token)
    return record, stop


def words_summary(words: dict[str, list[list[str]]]) -> str:
    """nearest_words_by_key in one line."""
    return "; ".join(f"{key if len(words) > 1 else 'vector'} {i}: {', '.join(row)}"
                     for key, rows in words.items() for i, row in enumerate(rows))


def save_step_outputs(run: Run, done: int, force_checkpoint: bool = False) -> bool:
    """Validation, intermediate learned_embeds and checkpoints due after step `done` (main process), and one line
    saying what was written. Returns whether early stopping ends the run here."""
    args, accelerator = run.args, run.accelerator
    output_dir, safe = Path(args.output_dir), not args.no_safe_serialization
    embeds, metadata = run.models.embeds(args.placeholder_token), embeds_metadata(args, run.models.source, done)
    written, validation, stop_early = [], None, False
    if is_validation_step(run, done) and not force_checkpoint:  # first: the checkpoint keeps its scores
        validation, stop_early = record_validation(run, done, embeds, metadata)
        force_checkpoint = force_checkpoint or stop_early  # an early stop resumes like any other
    if done % args.save_steps == 0:
        paths = save_result_files(embeds, output_dir, f"-steps-{done}", args.placeholder_token, safe, metadata)
        words = validation["nearest_words"] if validation else nearest_words_by_key(run.models, args.placeholder_token)
        written.append(f"{' and '.join(p.name for p in paths)} (nearest words: {words_summary(words)})")
    if done % args.checkpointing_steps == 0 or force_checkpoint:
        state = {"optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict(),
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
                 "validation_embeds": run.scores.embeds}
        training_state = {**run.run_identity, "seed": run.seed, "scores": run.scores.to_json()}
        path = save_checkpoint(output_dir, done, embeds, state, training_state, args.checkpoints_total_limit,
                               metadata)
        written.append(path.name)
    if validation:
        written.append(describe_validation(validation, run.scores.best["step"] == done))
    if written:
        logger.info(f"Step {done}: saved {', '.join(written)}")
    return stop_early


def agree_to_stop(accelerator, stop: bool) -> bool:
    """The main process's early-stop decision, on every process."""
    from accelerate.utils import broadcast

    flag = broadcast(torch.tensor([float(stop)], device=accelerator.device), from_process=0)
    return bool(flag.item())


def step_telemetry(models: Models, placeholder_token: str) -> dict[str, float]:
    """Per text encoder and vector, for the trackers: norm over the vocabulary's, cosine to the initializer."""
    record = embedding_record(models, placeholder_token, with_words=False)
    return {f"{kind}/{key}/{i}": value for kind in ("norm_ratio", "cosine_to_init")
            for key, values in record[kind].items() for i, value in enumerate(values)}


def train(run: Run, dataset, plan: BatchPlan, first_step: int) -> tuple[list[dict[str, float]], int]:
    """The loop: micro-batches -> loss -> agree across processes -> step -> logs, saves, validation.

    Returns the per-step logs and the number of the signal that stopped it early (0 if none).
    """
    from tqdm.auto import tqdm

    accelerator, models, optimizer, lr_scheduler = run.accelerator, run.models, run.optimizer, run.lr_scheduler
    history, stopped_by = [], 0
    if run.scores.patience_spent(run.args.early_stopping_patience):  # a resume of a run that stopped early
        logger.info(f"Stopped early at step {first_step} already ({run.scores.stopped_early['why']}); raise "
                    "--early_stopping_patience or drop it to train on")
        return history, 0
    run.scores.stopped_early = None
    progress = tqdm(total=run.max_train_steps, initial=first_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    with stop_requests() as stop:
        for step, micro_batches in iterate_steps(dataset, plan, first_step, run.max_train_steps,
                                                 run.args.dataloader_num_workers):
            step_loss = accumulate_step(accelerator, models, micro_batches, step, run.seed)
            # One small collective per step: the loss to log, and whether any process was asked to stop.
            flags = torch.stack([step_loss, torch.tensor(float(stop["signal"]), device=step_loss.device)])
            loss_sum, signal_sum = accelerator.reduce(flags, "sum").tolist()
            if not math.isfinite(loss_sum):
                raise diverged(run, step, loss_sum)
            if run.args.max_grad_norm:
                accelerator.clip_grad_norm_([e.vectors for e in models.trained], run.args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if run.args.preserve_embedding_norm:
                for embedding in models.trained:
                    embedding.restore_initial_norms()

            done = step + 1
            logs = {"loss": loss_sum / accelerator.num_processes, "lr": lr_scheduler.get_last_lr()[0],
                    **step_telemetry(models, run.args.placeholder_token)}
            history.append(logs)
            run.scores.train_loss.append([done, logs["loss"]])
            progress.update(1)
            norm = max(value for key, value in logs.items() if key.startswith("norm_ratio/"))
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", norm=f"{norm:.2f}x")
            accelerator.log(logs, step=done)
            if signal_sum:  # this process's signal, or SIGTERM when only another process got one
                stopped_by = stop["signal"] or 15
            stop_early = False
            if accelerator.is_main_process:
                stop_early = save_step_outputs(run, done,
                                               force_checkpoint=bool(stopped_by) and done < run.max_train_steps)
            if accelerator.num_processes > 1 and is_validation_step(run, done):
                stop_early = agree_to_stop(accelerator, stop_early)
            if stopped_by or stop_early:
                break
    progress.close()
    finished = first_step + len(history) >= run.max_train_steps or run.scores.stopped_early is not None
    return history, 0 if finished else stopped_by


def diverged(run: Run, step: int, loss: float) -> TrainingStopped:
    """A non-finite loss: keep the last good vectors (the update was not applied) and say what to change."""
    args = run.args
    embeds = run.models.embeds(args.placeholder_token)
    kept = ""
    if run.accelerator.is_main_process and all(torch.isfinite(v).all() for v in embeds.values()):
        paths = save_result_files(embeds, Path(args.output_dir), f"-steps-{step}", args.placeholder_token,
                                  not args.no_safe_serialization, embeds_metadata(args, run.models.source, step))
        kept = f" The last good vectors (after step {step}) are in {paths[0]} and {paths[1].name}."
    return TrainingStopped(
        f"the loss became {loss} at step {step + 1}; nothing of that step was applied.{kept} Lower --learning_rate, "
        "use --mixed_precision bf16 or no instead of fp16, or check the training images, then start again.", 1)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: every flag that differs from its default, plus resume=latest."""
    import shlex

    words = ["accelerate", "launch", "train_textual_inversion.py"]
    for action in build_parser()._actions:
        name = action.dest
        if not action.option_strings or name in ("help", "resume_from_checkpoint"):
            continue
        value = getattr(args, name)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            words += [flag]
        elif isinstance(value, list):  # an appended flag: once per value
            words += [word for item in value for word in (flag, str(item))]
        elif isinstance(value, tuple):  # a comma-separated flag (--text_encoders)
            words += [flag, ",".join(value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words + ["--resume_from_checkpoint", "latest"])


@dataclass
class TrainResult:
    """What a run did, for callers and tests: `main` is also a library function."""

    embeds: dict[str, torch.Tensor]  # final vectors, float32 on the CPU, as saved: {token: T} or SDXL's clip_l/clip_g
    placeholder_token_ids: list[int]  # in the (first) tokenizer
    learning_rate: float
    num_processes: int
    first_step: int
    history: list[dict[str, float]]  # per optimizer step: loss (mean over processes) and lr
    output_path: Path

    @property
    def vectors(self) -> torch.Tensor:
        """The (first) text encoder's vectors, float32 [num_vectors, dim]."""
        return next(iter(self.embeds.values()))


def memory_plan_request(args: argparse.Namespace, family, source: ModelSource, compute_dtype: torch.dtype,
                        device_type: str) -> PlanRequest:
    """What sizes this run's memory, from the flags: one --resolution square image per batch slot."""
    side = args.resolution
    images = TrainingImages([torch.empty(3, side, side, dtype=torch.uint8)] * args.train_batch_size, None,
                            [(side, side)] * args.train_batch_size, [(0, 0)] * args.train_batch_size)
    t5_length = args.max_sequence_length or family.max_sequence_length
    lengths = tuple(t5_length if "T5" in class_name else 77 for _, class_name in family.text_encoders)
    return PlanRequest(source.config, family, side, args.train_batch_size, compute_dtype, args.base_weight_dtype,
                       args.gradient_checkpointing, lengths, family.conditions(images, args.guidance_scale),
                       args.num_vectors, source.revision, device_type)


def plan_run_memory(args: argparse.Namespace, source: ModelSource, accelerator) -> MemoryPlan | None:
    """The memory plan: printed (--plan_memory) or logged; on CUDA, a run that will not fit the free memory stops
    here, with the flags that would make it fit, instead of an out-of-memory traceback minutes later."""
    device = accelerator.device
    request = memory_plan_request(args, model_family(source), source, weight_dtype_for(accelerator.mixed_precision),
                                  device.type)
    try:
        plan = cached_plan(request)
    except (OSError, ValueError, KeyError) as error:  # a config the plan cannot read: loading names the real problem
        if args.plan_memory:
            raise UsageError(f"--plan_memory: cannot plan {source.name}: {str(error).splitlines()[0]}") from None
        logger.warning(f"No memory plan ({str(error).splitlines()[0]})")
        return None
    if args.plan_memory:
        if accelerator.is_main_process:
            print("\n".join([f"Memory plan for {source.name} ({request.resolution} px, batch {request.batch_size}, "
                              f"{DTYPE_NAMES[request.compute_dtype]}):", *plan.lines()]))
        return plan
    # One line: --plan_memory lists it by component.
    logger.info(f"M{plan.summary()[1:]} per process, from the configs")
    if device.type == "cuda":
        problem = does_not_fit(plan, request, torch.cuda.mem_get_info(device)[0], str(device))
        if problem:
            raise UsageError(problem)
    return plan


def main(args: argparse.Namespace) -> TrainResult | None:
    from accelerate.utils import set_seed

    # 1. Processes, logging, the checkpoint to resume (checked first: it can refuse the run) and the seed.
    accelerator = make_accelerator(args)
    setup_logging(accelerator)
    logger.info(f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
                f"mixed precision {accelerator.mixed_precision}")
    output_dir = Path(args.output_dir)
    # Where the weights are (a folder, hub id or file: read from keys and configs, no weights yet).
    source = find_model_source(args.pretrained_model_name_or_path, args.revision, args.variant,
                               args.single_file_config, args.transformer_file)
    run_identity = identity_of_run(args.placeholder_token, args.num_vectors, source, args.text_encoders,
                                   args.initial_embeddings)
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    resumed = load_checkpoint(resume_path, run_identity) if resume_path else None
    seed = resumed[0]["seed"] if resumed else agree_on_seed(accelerator, args.seed)
    if resumed and args.seed is not None and args.seed != seed:
        logger.warning(f"--seed {args.seed} ignored: resuming continues the checkpoint's run, seed {seed}")
    set_seed(seed)
    # The memory plan, from the configs alone: logged, held against a GPU's free memory, or printed and done.
    plan_run_memory(args, source, accelerator)
    if args.plan_memory:
        return None

    # 2. Model family, tokens, templates and images: the user's input is checked before the big models load.
    inputs = prepare_inputs(args, source)

    # 3. Frozen models in the compute dtype; the placeholder rows become the only trainable tensors; image latents.
    models = load_frozen_models(args, accelerator, inputs)

    # 4. Data plan, learning rate, optimizer; only the text encoder(s) (holding the vectors) go under DDP.
    dataset = TextualInversionDataset(len(inputs.images), inputs.template_input_ids, args.repeats, seed,
                                      inputs.per_image_prompts, inputs.captioned_prompts, args.caption_dropout_rate)
    plan = BatchPlan(len(dataset), args.train_batch_size, args.gradient_accumulation_steps,
                     accelerator.num_processes, accelerator.process_index, seed, bucket_ids(inputs.images))
    max_train_steps = args.max_train_steps or args.num_train_epochs * plan.steps_per_epoch
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate = scaled_learning_rate(learning_rate, args.gradient_accumulation_steps,
                                             args.train_batch_size, accelerator.num_processes)
    rates = learning_rates(models.embeddings, FAMILY_NAMES[models.family].encoder_names, learning_rate,
                           args.t5_learning_rate)
    optimizer, lr_scheduler = make_optimizer_and_schedule(args, models.trained, learning_rate, max_train_steps,
                                                          list(rates.values()))
    models.prompt_encoder, optimizer = accelerator.prepare(models.prompt_encoder, optimizer)
    validation_steps = validation_every(args.validation_steps, args.validation_epochs, len(dataset))
    validator = make_validator(args, accelerator, inputs) if accelerator.is_main_process else None
    scores = ScoreHistory(SELECTION_RULE if args.clip_model_name_or_path else SELECTION_RULE_WITHOUT_CLIP)

    # 5. Resume: vectors, optimizer, schedule, step and scores; the data and noise follow from (seed, step).
    first_step = 0
    if resumed:
        first_step = restore_checkpoint(accelerator, models, optimizer, lr_scheduler, resumed, max_train_steps,
                                        args.placeholder_token)
        scores = restore_scores(args, accelerator, source, resumed, scores.rule)
        logger.info(f"Resuming from {resume_path} at step {first_step}")
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {output_dir}; starting a new run")

    # 6. Train.
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers("textual_inversion", config=tracker_config(args))
    log_run_summary(args, inputs, len(dataset), plan, max_train_steps, rates, first_step, seed)
    run = Run(args, accelerator, models, optimizer, lr_scheduler, seed, run_identity, max_train_steps,
              validation_steps, validator, scores)
    history, stop_signal = train(run, dataset, plan, first_step)

    # 7. Results, written once (also when a signal stopped the run early), and the report of the validations.
    accelerator.wait_for_everyone()
    final_path = output_dir / embeds_filename("learned_embeds", not args.no_safe_serialization)
    last_step = first_step + len(history)
    if accelerator.is_main_process:
        save_results(args, accelerator, models, last_step)
        write_report(output_dir, scores, args.placeholder_token, picture=True)
        log_end_summary(models, scores, args.placeholder_token, last_step)
    accelerator.end_training()
    if stop_signal:
        raise TrainingStopped(f"stopped by signal {stop_signal} after step {last_step}; saved {final_path} and "
                              f"checkpoint-{last_step}. Resume with:\n  {resume_command(args)}", 128 + stop_signal)
    embeds = {key: v.detach().float().cpu().clone() for key, v in models.embeds(args.placeholder_token).items()}
    return TrainResult(embeds, inputs.placeholder_token_ids[0], learning_rate,
                       accelerator.num_processes, first_step, history, final_path)


@dataclass
class Inputs:
    """The user's input, checked and tokenized (once per tokenizer) before any model weights load."""

    family: str  # the adapter's name in FAMILY_NAMES: "sd", "sdxl", "sd3" or "flux"
    source: ModelSource  # where the frozen weights are
    tokenizers: list
    placeholder_token_ids: list[list[int]]  # per tokenizer
    initializer_ids: list[list[int]]  # per tokenizer (none with --initial_embeddings)
    initial_vectors: list[torch.Tensor] | None  # per encoder, from --initial_embeddings
    template_input_ids: torch.Tensor  # [num_templates, num_tokenizers, longest window], or [num_images, ...]
    per_image_prompts: bool  # captions: each image has its own prompts
    captioned_prompts: int  # per image, how many of its prompts (the first) hold its caption; the rest take a drop
    images: TrainingImages  # decoded and framed (square or bucket), with masks and sizes
    validation_prompts: list[str]  # validation_prompts(): the reconstruction prompt first; empty: no images
    trained_encoders: tuple[str, ...]  # the family's encoder_names that learn (--text_encoders)


def model_family(source: ModelSource):
    """The family's adapter, from the pipeline class of the source's configs."""
    if source.pipeline not in FAMILIES:
        raise UsageError(f"--pretrained_model_name_or_path {source.name} is a {source.pipeline}; this script trains "
                         f"{', '.join(FAMILIES)} models (SD 1.x, 2.x, XL, 3/3.5 and Flux.1)")
    return FAMILIES[source.pipeline]


def encoder_widths(source: ModelSource, adapter) -> list[int]:
    """Each text encoder's token-embedding width, from its config (no weights): what an --initial_embeddings file's
    vectors must match."""
    import transformers

    widths = []
    for subfolder, class_name in adapter.text_encoders:
        config = getattr(transformers, class_name).config_class.from_pretrained(source.config, subfolder=subfolder,
                                                                                revision=source.revision)
        widths.append(getattr(config, "hidden_size", None) or config.d_model)
    return widths


def read_initial_embeddings(path: str, adapter, encoder_widths: Sequence[int]) -> list[torch.Tensor]:
    """--initial_embeddings' vectors per text encoder, checked against the family and each encoder's width."""
    try:
        vectors = embedding_vectors(Path(path).expanduser(), adapter.encoder_names)
    except ValueError as e:
        raise UsageError(f"--initial_embeddings {path} {e}") from None
    for name, v, width in zip(adapter.encoder_names, vectors, encoder_widths):
        if v.shape[-1] != width:
            raise UsageError(f"--initial_embeddings {path} has {v.shape[-1]}-wide {name} vectors, but this model's "
                             f"{name} encoder is {width} wide: an embedding for another model")
    return vectors


def prepare_inputs(args: argparse.Namespace, source: ModelSource) -> Inputs:
    """Model family, tokenizer(s) with the new tokens, initializer ids or starting vectors, tokenized templates and
    decoded images."""
    adapter = model_family(source)
    family = adapter.name
    trained_encoders = check_family_flags(args, adapter)
    tokenizers = load_tokenizers(source, adapter, args.tokenizer_name, args.max_sequence_length)
    placeholder_token_ids = [add_placeholder_tokens(t, args.placeholder_token, args.num_vectors, name)
                             for t, (name, _) in zip(tokenizers, adapter.tokenizers)]
    starts = None
    if args.initial_embeddings:
        starts = read_initial_embeddings(args.initial_embeddings, adapter, encoder_widths(source, adapter))
        initializer_ids = [[] for _ in tokenizers]
    else:
        initializer_ids = [initializer_token_ids(t, args.initializer_token) for t in tokenizers]
    edits = read_validation_prompts(args.validation_prompt)
    named = [("--validation_prompt", p) for p in edits] + [("--reconstruction_prompt", args.reconstruction_prompt)]
    for flag, prompt in named:
        if prompt and args.placeholder_token not in prompt:
            logger.warning(f"{flag} {prompt!r} does not contain {args.placeholder_token}: its images will show "
                           "nothing learned; write the placeholder where the concept goes")
    image_paths, skipped = list_image_files(args.train_data_dir)
    # Captions, metadata and a masks folder belong beside the images: only other entries are worth a warning.
    side = {".txt", ".caption", ".jsonl", args.caption_extension or ".txt"}
    skipped = [p for p in skipped if p.suffix not in side and p.name not in ("masks", Path(args.mask_dir or ".").name)]
    if skipped:
        logger.warning(f"Skipping non-image entries of --train_data_dir: {', '.join(p.name for p in skipped)}")
    template_input_ids, per_image, captioned_prompts = tokenized_prompts(args, tokenizers, image_paths)
    buckets = None
    if args.enable_bucket:
        buckets = bucket_sizes(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)
    images = load_training_images(image_paths, args.resolution, args.center_crop, buckets, args.alpha_mask,
                                  args.mask_dir)
    if buckets:
        sizes = sorted({tuple(p.shape[1:]) for p in images.pixels})
        logger.info(f"Buckets (height x width) in use: {', '.join(f'{h}x{w}' for h, w in sizes)}")
    check_vae_factor(source, args.resolution, args.bucket_reso_steps if args.enable_bucket else None,
                     adapter.latent_patch)
    prompts = validation_prompts(edits, args.reconstruction_prompt, args.placeholder_token, args.learnable_property,
                                 bool(args.clip_model_name_or_path))
    return Inputs(family, source, tokenizers, placeholder_token_ids, initializer_ids, starts, template_input_ids,
                  per_image, captioned_prompts, images, prompts, trained_encoders)


def check_family_flags(args: argparse.Namespace, family) -> tuple[str, ...]:
    """The flags that only some families take, checked once the family is known; returns the encoders that learn."""
    names = args.text_encoders or family.encoder_names
    unknown = [name for name in names if name not in family.encoder_names]
    if unknown:
        raise UsageError(f"--text_encoders {','.join(unknown)}: a {family.pipeline} has no such text encoder; choose "
                         f"from {', '.join(family.encoder_names)}")
    if family.flow_matching:
        if args.snr_gamma is not None:
            raise UsageError(f"--snr_gamma is for SD 1.x/2.x/XL (DDPM); a {family.pipeline} trains by flow matching: "
                             "use --weighting_scheme")
        return names
    defaults = build_parser()
    for flag in ("max_sequence_length", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale",
                 "t5_learning_rate"):
        if getattr(args, flag) != defaults.get_default(flag):
            raise UsageError(f"--{flag} is for SD 3/3.5 and Flux (flow matching); a {family.pipeline} does not use "
                             "it: drop the flag")
    return names


def tokenized_prompts(args: argparse.Namespace, tokenizers: list,
                      image_paths: Sequence[Path]) -> tuple[torch.Tensor, bool, int]:
    """The training prompts, checked and tokenized by each tokenizer: the templates, or each image's captions (with
    the templates that take them, then --caption_dropout_rate's templates with the word alone). Returns the ids,
    whether they are per image, and how many of an image's prompts hold its caption."""
    templates = load_templates(args.templates, args.learnable_property)
    captions = read_captions(image_paths, args.train_data_dir, args.caption_extension, args.caption_column)
    if captions is None:
        if any(CAPTION_SLOT in t for t in templates):
            raise UsageError(f"--templates uses {CAPTION_SLOT} but the images have no captions: give "
                             "--caption_extension, or a metadata.jsonl in --train_data_dir")
        if args.caption_dropout_rate > 0:
            raise UsageError("--caption_dropout_rate drops captions, and the images have none: give "
                             "--caption_extension, or a metadata.jsonl in --train_data_dir, or drop the flag")
        per_image = [[t.format(args.placeholder_token) for t in templates]]
        sources = [[f"--templates line {t!r}" for t in templates]]
        captioned = 0
    else:
        source = f"the {args.caption_extension} files beside the images" if args.caption_extension else "metadata.jsonl"
        dropping = args.caption_dropout_rate > 0
        # A dropped caption becomes a template that names the word alone: the file's lines without {caption}, or
        # the built-in ones when the file has none.
        word_alone = [t for t in templates if CAPTION_SLOT not in t] or list(TEMPLATES[args.learnable_property])
        with_caption = [t for t in templates if CAPTION_SLOT in t] if dropping else templates
        use = "inside the templates" if any(CAPTION_SLOT in t for t in with_caption) else "as the prompts"
        per_image = caption_prompts(with_caption, captions, args.placeholder_token,
                                    args.templates is not None and not dropping)
        captioned = len(per_image[0])
        sources = [[where] * captioned for _, where in captions]
        if dropping:
            per_image = [rows + [t.format(args.placeholder_token) for t in word_alone] for rows in per_image]
            sources = [rows + [f"template {t!r}" for t in word_alone] for rows in sources]
            use += (f"; {args.caption_dropout_rate:.0%} of samples (--caption_dropout_rate) take one of "
                    f"{len(word_alone)} templates with the word alone instead")
        logger.info(f"Captions from {source}, {use}")
    expanded = [(expand_placeholder(p, args.placeholder_token, args.num_vectors), w)
                for prompts, wheres in zip(per_image, sources) for p, w in zip(prompts, wheres)]
    for tokenizer in tokenizers:
        check_prompt_lengths(tokenizer, expanded)
    ids = torch.stack([stack_windows([tokenize_prompts(t, prompts, args.placeholder_token, args.num_vectors)
                                      for t in tokenizers]) for prompts in per_image])
    return (ids, True, captioned) if captions is not None else (ids[0], False, captioned)


def noise_process(args, family, noise_scheduler) -> Diffusion | FlowMatching:
    """The family's noise process with the user's loss flags (checked against the family in check_family_flags)."""
    if not family.flow_matching:
        # Refuse an unsupported prediction_type now, not at the first step.
        diffusion_target(noise_scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))
        return Diffusion(noise_scheduler, args.snr_gamma)
    return FlowMatching(noise_scheduler, args.weighting_scheme or family.weighting_scheme, args.logit_mean,
                        args.logit_std, args.mode_scale, family.latent_patch)


def load_frozen_models(args, accelerator, inputs: Inputs) -> Models:
    family = FAMILY_NAMES[inputs.family]
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    noise_scheduler, text_encoders, vae, denoiser = load_models(inputs.source, family, inputs.tokenizers,
                                                                weight_dtype)
    process = noise_process(args, family, noise_scheduler)
    # Each text encoder's vectors start from the initializer in its own embedding space (or from the file's).
    vectors = inputs.initial_vectors or [initial_vectors(encoder.get_input_embeddings().weight, ids, args.num_vectors)
                                         for encoder, ids in zip(text_encoders, inputs.initializer_ids)]
    freeze_and_place(accelerator, args, text_encoders, vae, denoiser, weight_dtype)
    embeddings = []
    for i, (encoder, tokenizer, ids, start) in enumerate(zip(text_encoders, inputs.tokenizers,
                                                             inputs.placeholder_token_ids, vectors)):
        pool_at_end_of_text(encoder, tokenizer)
        # Installed after the cast so the vectors stay fp32 (with fp32 AdamW state) whatever the compute dtype.
        embedding = install_placeholder_embedding(encoder, ids, start.to(accelerator.device))
        # Not learning (--text_encoders): the vectors stay the initializer's, outside the optimizer and DDP.
        embedding.vectors.requires_grad_(family.encoder_names[i] in inputs.trained_encoders)
        # T5's table has spare rows past its vocabulary (32,128 for 32,100 tokens): the placeholder ids can be
        # among them, and are no vocabulary word.
        window = inputs.template_input_ids.select(-2, i)[..., :tokenizer.model_max_length]
        in_use = vocabulary_ids_in_use(window, tokenizer.all_special_ids, min(ids[0], embedding.frozen.num_embeddings))
        embedding.set_reference_norm(in_use + inputs.initializer_ids[i])
        embeddings.append(embedding)
    latents = ImageLatents(inputs.images.pixels, vae)
    if not args.no_cache_latents:
        # The same 3-5 images would otherwise go through the VAE encoder at every step (~15% of an SD step).
        latents.cache()
        logger.info(f"Cached the VAE posterior of {len(inputs.images)} image(s) x 2 flips")
    conditions = family.conditions(inputs.images, args.guidance_scale)
    conditions = None if conditions is None else conditions.to(accelerator.device)
    mask_weights = None
    if inputs.images.masks is not None:
        weights = latent_loss_weights(inputs.images.masks, vae_factor(vae.config))
        mask_weights = [w.to(accelerator.device) for w in weights]
    loss = LossOptions(mask_weights, args.noise_offset, args.embedding_reg_weight, **masked_loss_options(args))
    prompt_encoder = PromptEncoder(text_encoders, family, [t.model_max_length for t in inputs.tokenizers])
    return Models(inputs.family, inputs.tokenizers, prompt_encoder, vae, denoiser, process, embeddings, weight_dtype,
                  latents, conditions, loss, inputs.source)


def make_validator(args, accelerator, inputs: Inputs) -> Validator:
    """Validation prompts, each image's prompt for the validation loss, CLIP and its reference images."""
    ids = inputs.template_input_ids
    loss_prompt_ids = ids[:, 0] if inputs.per_image_prompts else ids[0].expand(len(inputs.images), *ids.shape[1:])
    scorer = references = None
    if args.clip_model_name_or_path:
        from validation_report import ClipScorer

        try:
            scorer = ClipScorer(args.clip_model_name_or_path, accelerator.device)
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--clip_model_name_or_path {args.clip_model_name_or_path} cannot be loaded as a "
                             f"transformers CLIPModel ({first_line}); give a CLIP folder or hub id, e.g. "
                             "openai/clip-vit-large-patch14") from None
        references = scorer.image_features([Image.fromarray(p.permute(1, 2, 0).numpy()) for p in inputs.images.pixels])
    return Validator(inputs.validation_prompts, loss_prompt_ids, references, scorer)


def restore_scores(args, accelerator, source: ModelSource, resumed: tuple, rule: str) -> ScoreHistory:
    """The checkpoint's validations and best step; its best vectors go back into learned_embeds-best (a later
    validation before the interruption may have overwritten it)."""
    training_state, _, state = resumed
    if "scores" not in training_state:  # a checkpoint from before validations were kept
        return ScoreHistory(rule)
    scores = ScoreHistory.from_json(training_state["scores"], state["validation_embeds"])
    if accelerator.is_main_process and scores.best_embeds is not None:
        save_result_files(scores.best_embeds, Path(args.output_dir), "-best", args.placeholder_token,
                          not args.no_safe_serialization, embeds_metadata(args, source, scores.best["step"]))
    return scores


def log_end_summary(models: Models, scores: ScoreHistory, placeholder_token: str, step: int) -> None:
    """Where the vectors ended up, and which step to keep."""
    record = embedding_record(models, placeholder_token, with_words=True)
    lines = [f"Vectors after step {step} (norm over the median of the vocabulary words in use; cosine to the "
             "initializer; nearest words):"]
    for key, ratios in record["norm_ratio"].items():
        for i, ratio in enumerate(ratios):
            lines.append(f"  {key} {i}: {ratio:.2f}x, cosine {record['cosine_to_init'][key][i]:.2f}, "
                         f"{', '.join(record['nearest_words'][key][i])}")
    if scores.stopped_early:
        lines.append(f"Stopped early at step {scores.stopped_early['step']}: {scores.stopped_early['why']}")
    if scores.best:
        lines.append(f"Best step: {scores.best['step']} ({scores.best['why']}), saved as learned_embeds-best "
                     f"and {app_word(placeholder_token)}-best; see report.png")
    logger.info("\n".join(lines))


def restore_checkpoint(accelerator, models: Models, optimizer, lr_scheduler, resumed: tuple,
                       max_train_steps: int, placeholder_token: str) -> int:
    """Load a checkpoint's vectors and optimizer/schedule/scaler state; return the step to continue from."""
    training_state, saved_embeds, state = resumed
    with torch.no_grad():
        for key, vectors in models.embeds(placeholder_token).items():
            vectors.copy_(saved_embeds[key].to(vectors.device))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    return min(training_state["step"], max_train_steps)  # a resume never trains past --max_train_steps


def embeds_metadata(args: argparse.Namespace, source: ModelSource, step: int) -> dict[str, str]:
    """What a saved .safetensors says about itself (loaders read the token name of an SDXL file from it), and which
    base model it was trained on: a file's name and short hash (source.provenance)."""
    start = {"initializer_token": args.initializer_token} if args.initializer_token else {
        "initial_embeddings": Path(args.initial_embeddings).name}
    metadata = {"step": str(step), "placeholder_token": args.placeholder_token, "num_vectors": str(args.num_vectors),
                **start, "learnable_property": args.learnable_property, **source.provenance(),
                "script_version": __version__}
    if args.text_encoders:  # the others hold the initializer's vectors
        metadata["trained_text_encoders"] = ",".join(args.text_encoders)
    return metadata


def save_results(args, accelerator, models: Models, step: int) -> list[Path]:
    """The final learned_embeds (diffusers) and <word> (the apps) files, and the full pipeline if asked for."""
    paths = save_result_files(models.embeds(args.placeholder_token), Path(args.output_dir), "", args.placeholder_token,
                              not args.no_safe_serialization, embeds_metadata(args, models.source, step))
    if args.save_as_full_pipeline:
        save_full_pipeline(args, accelerator, models)
    logger.info(f"Saved {paths[0]} (diffusers) and {paths[1].name} (AUTOMATIC1111/Forge, ComfyUI, kohya, InvokeAI: "
                f"the prompt word there is {app_word(args.placeholder_token)!r})")
    return paths


def tracker_config(args: argparse.Namespace) -> dict:
    """TensorBoard's hparams take only scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


def cli(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}" if e.exit_code == 1 else str(e), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
