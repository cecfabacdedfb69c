"""Every flag of `--help`, once each, in a short in-process run on the tiny pipeline.

The flags come from the parser itself, so a flag added later is tried without editing this file: a store_true flag
is switched on, a flag with a value gets the one in VALUES or, failing that, its default (never None). The flags only
SD 3 and Flux.1 take run on the tiny Flux.1 pipeline. Each run must train (finite losses, learned_embeds that loads)
unless the flag is one this machine cannot honour (REFUSED_HERE), in which case it must stop with exit code 2 and
one `error:` line naming the flag, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import train_argv
from generate import read_embeddings

import train_textual_inversion as tti

STEPS = 2  # two steps: the second one sees what the first one's optimizer step and saves did


def captions(ctx: dict) -> list[str]:
    for image in ctx["data"].iterdir():
        image.with_suffix(".txt").write_text("a photo of a {} on a table")
    return [".txt"]


def metadata(ctx: dict) -> list[str]:
    rows = [f'{{"file_name": "{p.name}", "caption": "a photo of a {{}}"}}' for p in sorted(ctx["data"].iterdir())]
    (ctx["data"] / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return ["caption"]


def masks(ctx: dict) -> list[str]:
    from PIL import Image, ImageOps

    folder = ctx["tmp"] / "masks"
    folder.mkdir()
    for image in ctx["data"].iterdir():
        with Image.open(image) as opened:
            Image.new("L", ImageOps.exif_transpose(opened).size, 255).save(folder / f"{image.stem}.png")
    return [str(folder)]


def half_masks(ctx: dict) -> list[str]:
    """--mask_dir with each mask white on its left half only: the loss options outside a mask have a background."""
    from PIL import Image, ImageOps

    folder = ctx["tmp"] / "half_masks"
    folder.mkdir()
    for image in ctx["data"].iterdir():
        with Image.open(image) as opened:
            mask = Image.new("L", ImageOps.exif_transpose(opened).size, 0)
            mask.paste(255, (0, 0, mask.width // 2, mask.height))
            mask.save(folder / f"{image.stem}.png")
    return ["--mask_dir", str(folder)]


BUCKETS = ["--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8"]


def values(ctx: dict) -> dict[str, object]:
    """A sensible value (and any companion flags it needs to matter in a 2-step run) per flag; a callable makes the
    files it needs first."""
    templates = ctx["tmp"] / "templates.txt"
    templates.write_text("a photo of {}\na drawing of a {}\n")
    flux = ["--pretrained_model_name_or_path", str(ctx["flux"])]
    return {
        "--pretrained_model_name_or_path": [str(ctx["pipe"])],
        "--train_data_dir": [str(ctx["data"])],
        "--placeholder_token": ["<my-thing>"],
        "--initializer_token": ["teddy bear"],
        "--revision": ["main"],
        "--variant": ["fp16"],
        "--tokenizer_name": [str(ctx["pipe"] / "tokenizer")],
        "--num_vectors": ["3"],
        "--learnable_property": ["style"],
        "--templates": [str(templates)],
        "--caption_extension": captions,
        "--caption_column": metadata,
        "--caption_dropout_rate": lambda c: ["0.5", "--caption_extension", *captions(c)],
        "--mask_dir": masks,
        "--unmasked_weight": lambda c: ["0.1", *half_masks(c)],
        "--unmasked_probability": lambda c: ["0.5", *half_masks(c)],
        "--normalize_masked_area_loss": half_masks,
        "--masked_prior_preservation_weight": lambda c: ["0.5", *half_masks(c)],
        "--enable_bucket": BUCKETS[1:],
        "--min_bucket_reso": BUCKETS[2:] + ["--enable_bucket"],
        "--max_bucket_reso": BUCKETS[4:] + BUCKETS[:3],
        "--bucket_reso_steps": BUCKETS[6:] + BUCKETS[:5],
        "--repeats": ["1"],
        "--resolution": ["64"],
        "--train_batch_size": ["1"],
        "--num_train_epochs": ["1", "--max_train_steps", "0", "--repeats", "1", "--train_batch_size", "4"],
        "--max_train_steps": ["1"],
        "--gradient_accumulation_steps": ["2"],
        "--learning_rate": ["1e-3"],
        "--lr_scheduler": ["cosine_with_restarts"],
        "--lr_warmup_steps": ["1"],
        "--lr_num_cycles": ["2", "--lr_scheduler", "cosine_with_restarts"],
        "--dataloader_num_workers": ["1"],
        "--adam_beta1": ["0.8"],
        "--adam_beta2": ["0.99"],
        "--adam_weight_decay": ["0.1"],
        "--adam_epsilon": ["1e-6"],
        "--max_grad_norm": ["1e-4"],
        "--snr_gamma": ["5.0"],
        # SD 1.x has one text encoder; the flow-matching flags are refused on it, so they run on the tiny Flux.1.
        "--text_encoders": ["clip"],
        "--t5_learning_rate": ["1e-3", *flux],
        "--max_sequence_length": ["32", *flux],
        "--weighting_scheme": ["logit_normal", *flux],
        "--logit_mean": ["0.5", "--weighting_scheme", "logit_normal", *flux],
        "--logit_std": ["0.5", "--weighting_scheme", "logit_normal", *flux],
        "--mode_scale": ["1.0", "--weighting_scheme", "mode", *flux],
        "--guidance_scale": ["2.0", *flux],
        "--noise_offset": ["0.05"],
        "--seed": ["7"],
        "--mixed_precision": ["bf16"],
        "--base_weight_dtype": ["nf4" if tti._importable("bitsandbytes") else "fp8", "--mixed_precision", "bf16"],
        "--local_rank": ["0"],
        "--output_dir": [str(ctx["tmp"] / "elsewhere")],
        "--save_steps": ["1"],
        "--checkpointing_steps": ["1"],
        "--checkpoints_total_limit": ["1", "--checkpointing_steps", "1"],
        "--resume_from_checkpoint": ["latest"],
        "--logging_dir": ["tb"],
        "--report_to": ["tensorboard"],
        "--validation_prompt": ["a photo of <cat-toy>", "--validation_steps", "2", "--num_validation_images", "1"],
        "--num_validation_images": ["1", "--validation_prompt", "a photo of <cat-toy>", "--validation_steps", "2"],
        "--validation_steps": ["1", "--validation_prompt", "a photo of <cat-toy>", "--num_validation_images", "1"],
        "--validation_epochs": ["1", "--validation_prompt", "a photo of <cat-toy>", "--num_validation_images", "1"],
        "--reconstruction_prompt": ["a <cat-toy> up close", "--validation_steps", "2", "--num_validation_images", "1"],
        "--validation_guidance_scale": ["3", "--validation_prompt", "a photo of <cat-toy>", "--num_validation_images",
                                        "1"],
        "--clip_model_name_or_path": [str(Path(tti.__file__).parent / "examples" / "toy_world" / "clip"),
                                      "--validation_steps", "2", "--num_validation_images", "1"],
        "--early_stopping_patience": ["1", "--validation_steps", "1", "--max_train_steps", "3"],
        "--embedding_reg_weight": ["0.1"],
        "--validation_inference_steps": ["3", "--validation_prompt", "a photo of <cat-toy>", "--num_validation_images",
                                         "1"],
        "--hub_token": ["hf_x"],
        "--hub_model_id": ["me/my-concept"],
    }


# Flags this machine cannot honour, with why; each must be refused in one line that names it.
REFUSED_HERE = {
    "--variant": "the tiny pipeline has no fp16 weights",
    "--push_to_hub": "no hub upload",
    "--hub_token": "no hub upload",
    "--hub_model_id": "no hub upload",
}
if not tti._importable("xformers"):
    REFUSED_HERE["--enable_xformers_memory_efficient_attention"] = "xformers is not installed"
# Exercised by a dedicated test instead (named here, and checked to exist): compiling takes minutes on a CPU.
ELSEWHERE = {"--compile_unet": ("test_speed.py", "test_compiled_unet_trains_to_the_same_vectors"),
             # Each needs a file in another model's layout, or replaces --initializer_token.
             "--single_file_config": ("test_single_file.py", "test_single_file_trains_the_same_vectors_as_its_folder"),
             "--transformer_file": ("test_single_file.py", "test_transformer_file_trains_like_the_folder"),
             "--initial_embeddings": ("test_single_file.py", "test_initial_embeddings_start_from_the_file"),
             # Prints the plan and trains nothing.
             "--plan_memory": ("test_memory_plan.py", "test_plan_memory_prints_the_plan_and_trains_nothing")}


def flags() -> list[argparse.Action]:
    return [a for a in tti.build_parser()._actions
            if a.option_strings and a.dest != "help" and a.option_strings[0] not in ELSEWHERE]


@pytest.fixture(scope="module")
def shared_models():
    """The tiny pipeline's models, loaded once and handed out as fresh copies (each run mutates its own)."""
    cache, load = {}, tti.load_models

    def load_once(source, family, tokenizers, weight_dtype):
        key = (source, family.name, weight_dtype)
        if key not in cache:
            cache[key] = load(source, family, tokenizers, weight_dtype)
        return copy.deepcopy(cache[key])

    tti.load_models = load_once
    yield
    tti.load_models = load


def run(argv: list[str]) -> tuple[int, str, tti.TrainResult | None]:
    """What `cli(argv)` does (exit code, stderr), keeping main()'s result."""
    err, result = io.StringIO(), None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            result, code = tti.main(tti.parse_args(argv)), 0
        except SystemExit as e:
            code = e.code
        except tti.UsageError as e:
            print(f"error: {e}", file=err)
            code = 2
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
    return code, err.getvalue(), result


def test_the_dedicated_tests_exist():
    for file, test in ELSEWHERE.values():
        assert f"def {test}(" in (Path(__file__).parent / file).read_text()


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        tti.parse_args(["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    hidden = {"--push_to_hub", "--hub_token", "--hub_model_id"}  # accepted only to be refused clearly
    assert all(a.option_strings[0] in shown for a in flags() if a.option_strings[0] not in hidden)


@pytest.mark.parametrize("action", flags(), ids=lambda a: a.option_strings[0])
def test_flag(action, shared_models, tiny_pipeline, tiny_flux_pipeline, concept_dir, tmp_path):
    flag = action.option_strings[0]
    ctx = {"pipe": tiny_pipeline, "flux": tiny_flux_pipeline, "data": concept_dir, "tmp": tmp_path}
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction)):
        given = values(ctx).get(flag, [])
        extra = [flag, *given]
    else:
        given = values(ctx).get(flag)
        given = given(ctx) if callable(given) else given
        # A default of None means "unset" and has no spelling on the command line ("None" is no value).
        assert given or action.default is not None, f"{flag} defaults to None: give it a value in values()"
        extra = [flag, *given] if given else [flag, str(action.default)]
    out = tmp_path / "out"
    argv = train_argv(tiny_pipeline, concept_dir, out, "--max_train_steps", str(STEPS), *extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stderr, result = run(argv)
    assert "Traceback" not in stderr, stderr[-3000:]
    # transformers >= 5 deprecates the old name; the script uses the new one where it exists.
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
    if flag in REFUSED_HERE:
        last = stderr.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and flag in last, stderr[-2000:]
        return
    assert code == 0, stderr[-3000:]
    assert result.history and all(math.isfinite(h["loss"]) for h in result.history)
    saved = read_embeddings(result.output_path)  # as a user's pipeline would read it
    assert saved and all(torch.isfinite(v).all() for v in result.embeds.values())
    if str(tiny_flux_pipeline) in extra:  # the flag did reach a Flux.1 run: one set of vectors per text encoder
        (vectors,) = saved.values()
        assert set(vectors) == {"clip_l", "t5"} and set(result.embeds) == {"clip_l", "t5"}


def test_validation_prompt_without_the_placeholder_warns_once(shared_models, tiny_pipeline, concept_dir, tmp_path):
    argv = train_argv(tiny_pipeline, concept_dir, tmp_path / "out", "--max_train_steps", "2", "--validation_steps", "1",
                      "--num_validation_images", "1", "--validation_prompt", "a photo of a toy")
    code, stderr, _ = run(argv)
    assert code == 0, stderr[-3000:]
    warned = [line for line in stderr.splitlines() if "WARNING" in line and "--validation_prompt" in line]
    assert len(warned) == 1 and "<cat-toy>" in warned[0]
    code, stderr, _ = run(argv[:-1] + ["a photo of a <cat-toy>"])
    assert code == 0 and "--validation_prompt" not in stderr
