"""A catalogue of bad command lines and what train_textual_inversion.py must answer to each.

Every one must end with exit code 2 and a one-line "error: ..." naming the flag or file, no traceback, and no
output folder. Mistakes found while parsing print nothing else; those found inside main() (after the tokenizer or
the models load) may follow INFO lines, so there the error must be the last line of stderr.

A fresh interpreter costs 2.6-8 s of imports, so most cases run through cli() in this process (same parsing,
messages and exit codes); the cases marked `fresh` run as a real `python train_textual_inversion.py ...`.
TTI_FRESH_PROCESSES=1 runs every case that way.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import train_argv

import train_textual_inversion as tti

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_textual_inversion.py"


@dataclass
class Ctx:
    pipe: Path  # the tiny pipeline (read-only)
    data: Path  # a concept folder this case may change
    ws: Path  # this case's own folder
    out: Path  # --output_dir; must not be created


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    expect: str | tuple[str, ...]  # must all appear in the error line
    late: bool = False  # raised inside main(), after INFO logging may have started
    marks: list = field(default_factory=list)
    fresh: bool = False  # always run as a new `python train_textual_inversion.py` (see the module docstring)


def base(ctx: Ctx, *extra: str) -> list[str]:
    return train_argv(ctx.pipe, ctx.data, ctx.out, *extra)


def without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def data_with(ctx: Ctx, name: str, content: bytes) -> Path:
    write(ctx.data / name, content)
    return ctx.data


def only_text_data(ctx: Ctx) -> list[str]:
    folder = ctx.ws / "no-images"
    write(folder / "readme.txt", "no images here")
    return base(ctx, "--train_data_dir", str(folder))


def pipeline_without_index(ctx: Ctx) -> list[str]:
    (ctx.ws / "not-a-pipeline" / "unet").mkdir(parents=True)
    return base(ctx, "--pretrained_model_name_or_path", str(ctx.ws / "not-a-pipeline"))


def pipeline_of_class(ctx: Ctx, class_name: str) -> str:
    folder = ctx.ws / class_name
    write(folder / "model_index.json", json.dumps({"_class_name": class_name}))
    return str(folder)


OUTPUT_FILE_CONTENT = b"precious results, do not overwrite\n"


def captioned(ctx: Ctx, text_of: Callable[[str], str | None], *extra: str) -> list[str]:
    """Caption files for the concept's images (None: no file for that image)."""
    for image in list(ctx.data.iterdir()):
        text = text_of(image.stem)
        if text is not None:
            write(image.with_suffix(".txt"), text)
    return base(ctx, "--caption_extension", ".txt", *extra)


def metadata_naming(ctx: Ctx, extra_row: str) -> list[str]:
    rows = [json.dumps({"file_name": p.name, "text": "a photo of {}"}) for p in sorted(ctx.data.iterdir())]
    write(ctx.data / "metadata.jsonl", "\n".join(rows + [extra_row]) + "\n")
    return base(ctx)


def with_masks(ctx: Ctx, make: Callable[[Path, tuple[int, int]], None]) -> list[str]:
    """A mask per image, 255 everywhere, except what `make` writes for the first image (by path and size)."""
    from PIL import Image, ImageOps

    masks = ctx.ws / "masks"
    masks.mkdir()
    for i, image in enumerate(sorted(ctx.data.iterdir())):
        with Image.open(image) as opened:
            size = ImageOps.exif_transpose(opened).size
        path = masks / f"{image.stem}.png"
        make(path, size) if i == 0 else Image.new("L", size, 255).save(path)
    return base(ctx, "--mask_dir", str(masks))


def png(mode: str, size_of: Callable[[tuple[int, int]], tuple[int, int]], value: int):
    from PIL import Image

    return lambda path, size: Image.new(mode, size_of(size), value).save(path)


# ---- Files that are no SD checkpoint, or for another model: keys alone decide, so a few tiny tensors stand in.
SD_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
           "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")


def tensor_file(ctx: Ctx, name: str, keys: tuple[str, ...] | dict, shape: tuple[int, ...] = (2, 2)) -> Path:
    from safetensors.torch import save_file

    tensors = keys if isinstance(keys, dict) else {key: torch.zeros(shape) for key in keys}
    path = ctx.ws / name
    save_file(tensors, str(path))
    return path


class NotATensor:
    """Pickled as a class reference: loading it needs this module's code, which weights_only refuses."""


def pickled_code_ckpt(ctx: Ctx) -> Path:
    path = ctx.ws / "needs-code.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": NotATensor()}}, path)
    return path


def as_model(ctx: Ctx, path: Path, *extra: str) -> list[str]:
    return base(ctx, "--pretrained_model_name_or_path", str(path), *extra)


def embedding_file(ctx: Ctx, tensors: dict) -> Path:
    return tensor_file(ctx, "start.safetensors", tensors)


def with_embedding(ctx: Ctx, tensors: dict, *extra: str) -> list[str]:
    return without(base(ctx, "--initial_embeddings", str(embedding_file(ctx, tensors)), *extra),
                   "--initializer_token")


CASES = [
    Case("missing-required-flag", lambda c: without(base(c), "--placeholder_token"), "--placeholder_token",
         fresh=True),
    Case("learnable-property-foo", lambda c: base(c, "--learnable_property", "foo"), "--learnable_property"),
    Case("lr-scheduler-foo", lambda c: base(c, "--lr_scheduler", "foo"), "--lr_scheduler"),
    Case("mixed-precision-fp8", lambda c: base(c, "--mixed_precision", "fp8"), "--mixed_precision"),
    Case("mixed-precision-fp16-without-cuda", lambda c: base(c, "--mixed_precision", "fp16"), "--mixed_precision fp16",
         marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed with a CUDA GPU")]),
    Case("num-vectors-0", lambda c: base(c, "--num_vectors", "0"), "--num_vectors"),
    Case("train-batch-size-0", lambda c: base(c, "--train_batch_size", "0"), "--train_batch_size"),
    Case("max-train-steps-negative", lambda c: base(c, "--max_train_steps", "-1"), "--max_train_steps"),
    Case("repeats-0", lambda c: base(c, "--repeats", "0"), "--repeats"),
    Case("train-data-dir-missing", lambda c: base(c, "--train_data_dir", str(c.ws / "nope")), "--train_data_dir"),
    Case("train-data-dir-is-a-file", lambda c: base(c, "--train_data_dir", str(c.data / "toy_0.png")),
         "--train_data_dir"),
    Case("output-dir-is-a-file", lambda c: (write(c.out, OUTPUT_FILE_CONTENT), base(c))[1], "--output_dir"),
    Case("templates-line-without-slot",
         lambda c: base(c, "--templates", str(write(c.ws / "my_templates.txt", "a photo of {}\na photo\n"))),
         ("--templates", "line 2")),
    Case("push-to-hub", lambda c: base(c, "--push_to_hub"), "--push_to_hub"),
    Case("model-folder-does-not-exist", lambda c: base(c, "--pretrained_model_name_or_path", "./does-not-exist"),
         "--pretrained_model_name_or_path"),
    Case("model-folder-without-model-index", pipeline_without_index,
         ("--pretrained_model_name_or_path", "model_index.json")),
    Case("resume-from-missing-checkpoint", lambda c: base(c, "--resume_from_checkpoint", "/nope"),
         "--resume_from_checkpoint"),
    Case("placeholder-is-an-existing-word", lambda c: base(c, "--placeholder_token", "cat"), "--placeholder_token",
         late=True, fresh=True),
    Case("placeholder-with-a-space", lambda c: base(c, "--placeholder_token", "two words"), "--placeholder_token"),
    Case("initializer-empty", lambda c: base(c, "--initializer_token", ""), "--initializer_token"),
    Case("data-folder-without-images", only_text_data, "--train_data_dir", late=True),
    Case("data-folder-with-zero-byte-png", lambda c: base(c, "--train_data_dir", str(data_with(c, "empty.png", b""))),
         ("--train_data_dir", "empty.png"), late=True),
    Case("resolution-not-multiple-of-vae-factor", lambda c: base(c, "--resolution", "36"), "--resolution", late=True),
    Case("report-to-unknown-tracker", lambda c: base(c, "--report_to", "foo"), "--report_to"),
    Case("unsupported-pipeline-class",
         lambda c: base(c, "--pretrained_model_name_or_path", pipeline_of_class(c, "PixArtAlphaPipeline")),
         ("--pretrained_model_name_or_path", "PixArtAlphaPipeline"), late=True),
    Case("tokenizer-name-with-sdxl",
         lambda c: base(c, "--pretrained_model_name_or_path", pipeline_of_class(c, "StableDiffusionXLPipeline"),
                        "--tokenizer_name", str(c.pipe / "tokenizer")), "--tokenizer_name", late=True),
    Case("variant-the-model-lacks", lambda c: base(c, "--variant", "fp16"), ("--variant fp16", "drop --variant"),
         late=True),
    Case("revision-of-an-unreachable-hub-model",
         lambda c: base(c, "--pretrained_model_name_or_path", "no-such-user/no-such-model", "--revision", "v9"),
         ("--revision v9", "drop --revision"), late=True),
    Case("hub-model-out-of-reach", lambda c: base(c, "--pretrained_model_name_or_path", "no-such-user/no-such-model"),
         ("--pretrained_model_name_or_path no-such-user/no-such-model", "hub id"), late=True),
    Case("caption-file-missing", lambda c: captioned(c, lambda stem: None if stem == "toy_1" else "a photo of {}"),
         ("--caption_extension", "toy_1.png", "toy_1.txt"), late=True),
    Case("caption-without-placeholder", lambda c: captioned(c, lambda stem: "a photo of a toy"),
         ("toy_0.txt", "does not name the concept", "{}"), late=True),
    Case("caption-too-long", lambda c: captioned(c, lambda stem: "a photo of {} " + "very " * 80),
         ("toy_0.txt", "over the tokenizer's 77"), late=True),
    Case("caption-templates-without-captions",
         lambda c: base(c, "--templates", str(write(c.ws / "t.txt", "a photo of {}, {caption}\n"))),
         ("--templates", "{caption}", "--caption_extension"), late=True),
    Case("caption-dropout-without-captions", lambda c: base(c, "--caption_dropout_rate", "0.5"),
         ("--caption_dropout_rate", "--caption_extension"), late=True),
    Case("caption-dropout-above-1", lambda c: base(c, "--caption_dropout_rate", "2"),
         ("--caption_dropout_rate", "between 0 and 1")),
    Case("metadata-names-a-missing-file",
         lambda c: metadata_naming(c, json.dumps({"file_name": "gone.png", "text": "{}"})),
         ("metadata.jsonl line 5", "gone.png"), late=True),
    Case("mask-dir-missing", lambda c: base(c, "--mask_dir", str(c.ws / "nope")), "--mask_dir"),
    Case("mask-of-another-size", lambda c: with_masks(c, png("L", lambda size: (size[0] + 1, size[1]), 255)),
         ("--mask_dir", "toy_0.png", "give the mask the image's size"), late=True),
    Case("mask-unreadable", lambda c: with_masks(c, lambda path, size: write(path, b"not a png")),
         ("--mask_dir", "cannot read mask", "toy_0.png"), late=True),
    Case("mask-all-zero", lambda c: with_masks(c, png("L", lambda size: size, 0)),
         ("--mask_dir", "toy_0.png", "all zero"), late=True),
    Case("background-option-without-masks", lambda c: base(c, "--masked_prior_preservation_weight", "0.5"),
         ("--masked_prior_preservation_weight", "--alpha_mask or --mask_dir")),
    Case("unmasked-weight-above-1", lambda c: base(c, "--alpha_mask", "--unmasked_weight", "1.5"),
         ("--unmasked_weight", "between 0 and 1")),
    Case("alpha-mask-and-mask-dir", lambda c: base(c, "--alpha_mask", "--mask_dir", str(c.data)),
         ("--alpha_mask", "--mask_dir")),
    Case("bucket-min-above-max", lambda c: base(c, "--enable_bucket", "--min_bucket_reso", "512",
                                                "--max_bucket_reso", "256"), ("--min_bucket_reso", "--max_bucket_reso")),
    Case("bucket-with-center-crop", lambda c: base(c, "--enable_bucket", "--center_crop", "--resolution", "256"),
         ("--center_crop", "--enable_bucket")),
    Case("bucket-resolution-below-min", lambda c: base(c, "--enable_bucket"), ("--resolution 32", "--min_bucket_reso")),
    Case("bucket-steps-not-multiple-of-8", lambda c: base(c, "--enable_bucket", "--bucket_reso_steps", "12"),
         "--bucket_reso_steps"),
    Case("xformers-not-installed", lambda c: base(c, "--enable_xformers_memory_efficient_attention"),
         ("--enable_xformers_memory_efficient_attention", "pip install xformers"),
         marks=[pytest.mark.skipif(tti._importable("xformers"), reason="xformers is installed here")]),
    # Single files and starting embeddings
    Case("single-file-random-bytes", lambda c: as_model(c, write(c.ws / "model.safetensors", os.urandom(4096))),
         ("--pretrained_model_name_or_path", "model.safetensors", "cannot be read"), late=True),
    Case("single-file-is-a-lora", lambda c: as_model(c, tensor_file(c, "lora.safetensors", (
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",))), ("lora.safetensors", "a LoRA"),
         late=True),
    Case("single-file-is-an-embedding", lambda c: as_model(c, tensor_file(c, "emb.safetensors", ("emb_params",))),
         ("emb.safetensors", "a textual-inversion embedding"), late=True),
    Case("single-file-is-a-vae", lambda c: as_model(c, tensor_file(c, "vae.safetensors", (
        "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"))), ("vae.safetensors", "a VAE"),
         late=True),
    Case("ckpt-needs-pickled-code", lambda c: as_model(c, pickled_code_ckpt(c)), ("needs-code.ckpt", "pickled code"),
         late=True),
    Case("flux-file-as-the-model", lambda c: as_model(c, tensor_file(c, "flux1-dev.safetensors", (
        "double_blocks.0.img_attn.qkv.weight",))), ("flux1-dev.safetensors", "--transformer_file"), late=True),
    Case("single-file-configs-offline", lambda c: as_model(c, tensor_file(c, "mine.safetensors", SD_KEYS)),
         ("mine.safetensors", "--single_file_config"), late=True),
    Case("single-file-config-of-another-family", lambda c: as_model(
        c, tensor_file(c, "xl.safetensors", (*SD_KEYS, "conditioner.embedders.1.model.ln_final.weight")),
        "--single_file_config", str(c.pipe)), ("--single_file_config", "StableDiffusionPipeline", "SDXL"), late=True),
    Case("single-file-suffix", lambda c: as_model(c, write(c.ws / "model.onnx", b"x")), "--pretrained_model_name_or_path"),
    Case("single-file-with-revision", lambda c: as_model(c, tensor_file(c, "m.safetensors", SD_KEYS), "--revision",
                                                         "main"), "--revision"),
    Case("single-file-config-without-a-file", lambda c: base(c, "--single_file_config", str(c.pipe)),
         "--single_file_config"),
    Case("transformer-file-on-sd", lambda c: base(c, "--transformer_file", str(tensor_file(c, "t.safetensors", (
        "double_blocks.0.img_attn.qkv.weight",)))), ("--transformer_file", "SD 3/3.5 and Flux.1"), late=True),
    Case("initial-embeddings-of-another-width", lambda c: with_embedding(c, {"<x>": torch.zeros(2, 48)}),
         ("--initial_embeddings", "48-wide", "32 wide"), late=True),
    Case("initial-embeddings-of-another-family", lambda c: with_embedding(
        c, {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)}), ("--initial_embeddings", "another model family"),
         late=True),
    Case("initial-embeddings-and-num-vectors", lambda c: with_embedding(c, {"<x>": torch.zeros(2, 32)}, "--num_vectors",
                                                                        "3"), ("--num_vectors 3", "2 vector(s)")),
    Case("initial-embeddings-and-initializer", lambda c: base(c, "--initial_embeddings", str(embedding_file(
        c, {"<x>": torch.zeros(1, 32)}))), ("--initializer_token", "--initial_embeddings")),
    Case("initial-embeddings-not-an-embedding", lambda c: without(base(
        c, "--initial_embeddings", str(write(c.ws / "e.pt", os.urandom(64)))), "--initializer_token"),
         "--initial_embeddings"),
]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT_S = 300

def run_fresh(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def run_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """What `python train_textual_inversion.py ARGV` would do, via cli(): exit code, stdout, stderr.

    An exception escaping cli() is what would have been a traceback, so it is written to stderr as one.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tti.cli(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def outcomes(request, tiny_pipeline, tmp_path_factory) -> dict[str, tuple[Ctx, subprocess.CompletedProcess]]:
    """Run every selected case at once: the forked ones in the zygote, the fresh ones beside it."""
    params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
              if item.module is request.module]
    selected = [p["case"] for p in params if "case" in p]
    selected = [c for c in selected if not any(m.name == "skipif" and m.args[0] for m in c.marks)]
    contexts, argvs = {}, {}
    for case in selected:
        ws = tmp_path_factory.mktemp(case.id)
        shutil.copytree(ROOT / "examples" / "concept", ws / "concept")
        contexts[case.id] = Ctx(tiny_pipeline, ws / "concept", ws, ws / "out")
        argvs[case.id] = case.argv(contexts[case.id])
    fresh = [c for c in selected if c.fresh or os.environ.get("TTI_FRESH_PROCESSES") == "1"]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        running = pool.map(run_fresh, [argvs[c.id] for c in fresh])
        results = {c.id: run_in_process(argvs[c.id]) for c in selected if c not in fresh}
        results.update(zip([c.id for c in fresh], running))
    return {cid: (contexts[cid], result) for cid, result in results.items()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused_with_one_error_line(outcomes, case):
    ctx, result = outcomes[case.id]
    stderr_lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, result.stderr[-3000:]
    assert stderr_lines, "nothing on stderr"
    error = stderr_lines[-1]
    if not case.late:
        assert stderr_lines == [error], "a parse-time error must be the only line on stderr"
        assert result.stdout == ""
    expected = (case.expect,) if isinstance(case.expect, str) else case.expect
    assert error.startswith("error: ") and all(e in error for e in expected), error
    if case.id == "output-dir-is-a-file":
        assert ctx.out.read_bytes() == OUTPUT_FILE_CONTENT
    else:
        assert not ctx.out.exists(), "--output_dir was created for a run that never started"
    written = [p.name for p in ctx.ws.rglob("*") if p.name.startswith(("learned_embeds", "checkpoint-"))]
    assert written == []
