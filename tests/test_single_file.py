"""The model and the embedding a user already has: single-file checkpoints, a transformer file, a starting embedding.

The single files are written here from the tiny pipelines in the original layouts (examples/original_layout.py), so
the same weights exist as a folder and as a file, and a run on each must give the same vectors bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import train_argv
from safetensors import safe_open

import train_textual_inversion as tti


def without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def short_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


# ---- --initial_embeddings -------------------------------------------------------------------------------------------
def a1111_pt(vectors: torch.Tensor, path: Path) -> Path:
    """An AUTOMATIC1111 embedding file: string_to_param under '*'."""
    torch.save({"string_to_param": {"*": vectors.clone()}, "name": path.stem, "step": 4}, path)
    return path


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_initial_embeddings_start_from_the_file(family, tiny_pipeline, tiny_sdxl_pipeline, concept_dir, tmp_path,
                                                watch_steps):
    """The vectors start as the file's (any app's format), --num_vectors comes from it, and the telemetry's and
    --embedding_reg_weight's reference (`initial`) is the file's vectors; the result records where it started."""
    pipeline = tiny_pipeline if family == "sd" else tiny_sdxl_pipeline
    first = tti.main(tti.parse_args(train_argv(pipeline, concept_dir, tmp_path / "first", "--num_vectors", "2")))
    if family == "sd":
        start_file = a1111_pt(first.vectors, tmp_path / "my-word.pt")
    else:  # the trainer's own SDXL app file (clip_l/clip_g)
        start_file = tmp_path / "first" / "cat-toy.safetensors"
    argv = without(train_argv(pipeline, concept_dir, tmp_path / "second", "--initial_embeddings", str(start_file),
                              "--embedding_reg_weight", "0.1", "--max_train_steps", "2"), "--initializer_token")
    second = tti.main(tti.parse_args(argv))
    starts = list(first.embeds.values())
    assert [s.shape[0] for s in starts] == [2] * len(starts)
    assert all(torch.equal(seen.cpu(), start) for seen, start in zip(watch_steps["initial"], starts))
    embeddings = watch_steps["run"].models.embeddings
    assert all(torch.equal(e.initial, start) for e, start in zip(embeddings, starts))
    assert not torch.equal(second.vectors, first.vectors)  # and it trains on from there
    saved = metadata(second.output_path)
    assert saved["initial_embeddings"] == start_file.name and "initializer_token" not in saved
    assert saved["num_vectors"] == "2"


# ---- Single-file SD 1.x/XL checkpoints --------------------------------------------------------------------------------
VALIDATION = ["--validation_prompt", "a photo of <cat-toy>", "--validation_steps", "4", "--num_validation_images", "1",
              "--validation_inference_steps", "2"]


def test_single_file_trains_the_same_vectors_as_its_folder(tiny_sd15_layout_pipeline, concept_dir, tmp_path):
    """The same seed on the file (.safetensors and .ckpt) and on the folder it was written from gives the same
    vectors bit for bit; validation images, checkpoints and --save_as_full_pipeline work on the file; the outputs
    record the file's name and short hash; resuming on a changed file is refused."""
    from original_layout import sd_pipeline_to_original

    folder = tiny_sd15_layout_pipeline
    file = sd_pipeline_to_original(folder, tmp_path / "my-model.safetensors")
    ckpt = sd_pipeline_to_original(folder, tmp_path / "my-model.ckpt")
    config = ["--single_file_config", str(folder)]
    from_folder = tti.main(tti.parse_args(train_argv(folder, concept_dir, tmp_path / "folder")))
    out = tmp_path / "file"
    from_file = tti.main(tti.parse_args(train_argv(file, concept_dir, out, *config, *VALIDATION, "--save_as_full_pipeline",
                                                   "--checkpointing_steps", "2")))
    from_ckpt = tti.main(tti.parse_args(train_argv(ckpt, concept_dir, tmp_path / "ckpt", *config)))
    assert torch.equal(from_file.vectors, from_folder.vectors) and torch.equal(from_ckpt.vectors, from_folder.vectors)

    saved = metadata(from_file.output_path)
    assert saved["base_model"] == "my-model.safetensors" and saved["base_model_hash"] == short_sha256(file)
    assert metadata(out / "cat-toy.safetensors")["base_model_hash"] == short_sha256(file)  # the apps' file too
    report = json.loads((out / "report.json").read_text())
    assert (out / report["validations"][-1]["images"]).is_file()
    from diffusers import StableDiffusionPipeline

    full = StableDiffusionPipeline.from_pretrained(out)  # a diffusers folder of the user's checkpoint, with the word
    token_id = full.tokenizer.convert_tokens_to_ids("<cat-toy>")
    assert torch.equal(full.text_encoder.get_input_embeddings().weight[token_id], from_file.vectors[0])

    # The same file resumes; a changed one at the same path (another fine-tune) is refused before anything loads.
    resumed = tti.main(tti.parse_args(train_argv(file, concept_dir, out, *config, "--max_train_steps", "5",
                                                 "--resume_from_checkpoint", "latest")))
    assert resumed.first_step == 4
    from safetensors.torch import load_file, save_file

    weights = load_file(file)
    weights["model.diffusion_model.out.2.bias"] += 1
    save_file(weights, str(file))
    with pytest.raises(tti.UsageError, match="base_model_hash"):
        tti.main(tti.parse_args(train_argv(file, concept_dir, out, *config, "--max_train_steps", "6",
                                           "--resume_from_checkpoint", "latest")))


def test_sdxl_single_file_trains_the_same_vectors_as_its_folder(tiny_sdxl_pipeline, concept_dir, tmp_path):
    from original_layout import sdxl_pipeline_to_original

    file = sdxl_pipeline_to_original(tiny_sdxl_pipeline, tmp_path / "my-xl.safetensors")
    from_folder = tti.main(tti.parse_args(train_argv(tiny_sdxl_pipeline, concept_dir, tmp_path / "folder")))
    from_file = tti.main(tti.parse_args(train_argv(file, concept_dir, tmp_path / "file", "--single_file_config",
                                                   str(tiny_sdxl_pipeline))))
    assert from_file.embeds.keys() == {"clip_l", "clip_g"}
    assert all(torch.equal(from_file.embeds[k], from_folder.embeds[k]) for k in from_file.embeds)


def test_generate_takes_a_single_file(tiny_sd15_layout_pipeline, concept_dir, tmp_path):
    import generate
    from original_layout import sd_pipeline_to_original

    file = sd_pipeline_to_original(tiny_sd15_layout_pipeline, tmp_path / "my-model.safetensors")
    result = tti.main(tti.parse_args(train_argv(file, concept_dir, tmp_path / "out", "--single_file_config",
                                                str(tiny_sd15_layout_pipeline))))
    grid = tmp_path / "grid.png"
    assert generate.main(["--pretrained_model_name_or_path", str(file), "--single_file_config",
                          str(tiny_sd15_layout_pipeline), "--learned_embeds", str(result.output_path), "--prompt",
                          "a photo of <cat-toy>", "--num_images", "1", "--num_inference_steps", "2", "--resolution",
                          "32", "--output", str(grid), "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(grid).size == (32, 32)


# ---- --transformer_file (SD 3/3.5, Flux.1) ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_transformer_file_trains_like_the_folder(family, tiny_flux_pipeline, tiny_sd3_pipeline, concept_dir, tmp_path):
    """The transformer from a file in the original layout gives the folder's vectors bit for bit; the outputs
    record the file; a file of the other family is refused."""
    from original_layout import flux_single_file_any_width, flux_transformer_to_original, sd3_transformer_to_original

    pipeline, to_original = {"flux": (tiny_flux_pipeline, flux_transformer_to_original),
                             "sd3": (tiny_sd3_pipeline, sd3_transformer_to_original)}[family]
    file = to_original(pipeline / "transformer", tmp_path / f"{family}-transformer.safetensors")
    argv = ["--resolution", "32", "--max_train_steps", "2"]
    from_folder = tti.main(tti.parse_args(train_argv(pipeline, concept_dir, tmp_path / "folder", *argv)))
    with flux_single_file_any_width():  # diffusers' Flux converter assumes Flux.1's width; the tiny one is narrower
        from_file = tti.main(tti.parse_args(train_argv(pipeline, concept_dir, tmp_path / "file", *argv,
                                                       "--transformer_file", str(file))))
    assert all(torch.equal(from_file.embeds[k], from_folder.embeds[k]) for k in from_folder.embeds)
    saved = metadata(from_file.output_path)
    assert saved["transformer_file"] == file.name and saved["transformer_file_hash"] == short_sha256(file)

    other = tiny_sd3_pipeline if family == "flux" else tiny_flux_pipeline
    with pytest.raises(tti.UsageError, match="--transformer_file .* is an? (SD 3|Flux)"):
        tti.main(tti.parse_args(train_argv(other, concept_dir, tmp_path / "other", *argv, "--transformer_file",
                                           str(file))))
    assert not (tmp_path / "other").exists()


def test_fp8_transformer_file_loads_as_its_rounded_weights(tiny_flux_pipeline, concept_dir, tmp_path, watch_steps):
    """A Flux file stored in float8_e4m3fn (as many are) trains, with the transformer holding the fp8 values in the
    compute dtype."""
    from original_layout import flux_single_file_any_width, flux_transformer_to_original

    file = flux_transformer_to_original(tiny_flux_pipeline / "transformer", tmp_path / "fp8.safetensors",
                                        dtype=torch.float8_e4m3fn)
    with flux_single_file_any_width():
        result = tti.main(tti.parse_args(train_argv(tiny_flux_pipeline, concept_dir, tmp_path / "out",
                                                    "--resolution", "32", "--max_train_steps", "2",
                                                    "--transformer_file", str(file))))
    assert all(torch.isfinite(v).all() for v in result.embeds.values())
    from diffusers import FluxTransformer2DModel

    folder = FluxTransformer2DModel.from_pretrained(tiny_flux_pipeline, subfolder="transformer").state_dict()
    trained = watch_steps["run"].models.denoiser.state_dict()
    key = "transformer_blocks.0.attn.to_q.weight"
    assert trained[key].dtype == torch.float32
    assert torch.equal(trained[key], folder[key].to(torch.float8_e4m3fn).float())
    assert not torch.equal(trained[key], folder[key])


def test_an_fp8_file_with_fp8_base_weights_keeps_the_files_values(tiny_flux_pipeline, concept_dir, tmp_path,
                                                                  watch_steps):
    """--transformer_file stored in fp8 and --base_weight_dtype fp8: the transformer is stored in fp8 again, holding
    exactly the file's values (fp8 -> bf16 -> fp8 is exact), and trains."""
    from original_layout import flux_single_file_any_width, flux_transformer_to_original
    from safetensors.torch import load_file

    file = flux_transformer_to_original(tiny_flux_pipeline / "transformer", tmp_path / "fp8.safetensors",
                                        dtype=torch.float8_e4m3fn)
    with flux_single_file_any_width():
        result = tti.main(tti.parse_args(train_argv(tiny_flux_pipeline, concept_dir, tmp_path / "out",
                                                    "--resolution", "32", "--max_train_steps", "2",
                                                    "--mixed_precision", "bf16", "--base_weight_dtype", "fp8",
                                                    "--transformer_file", str(file))))
    assert all(torch.isfinite(v).all() for v in result.embeds.values())
    stored = watch_steps["run"].models.denoiser.transformer_blocks[0].attn.to_q.weight
    in_file = load_file(file)["double_blocks.0.img_attn.qkv.weight"]  # q, k and v stacked, q first
    assert stored.dtype == torch.float8_e4m3fn
    assert torch.equal(stored.view(torch.uint8), in_file[: stored.shape[0]].view(torch.uint8))


@pytest.mark.skipif(not tti._importable("bitsandbytes"), reason="bitsandbytes is not installed")
def test_a_single_file_trains_with_nf4_base_weights(tiny_sd15_layout_pipeline, concept_dir, tmp_path, watch_steps):
    import bitsandbytes as bnb
    from original_layout import sd_pipeline_to_original

    file = sd_pipeline_to_original(tiny_sd15_layout_pipeline, tmp_path / "my-model.safetensors")
    result = tti.main(tti.parse_args(train_argv(file, concept_dir, tmp_path / "out", "--single_file_config",
                                                str(tiny_sd15_layout_pipeline), "--mixed_precision", "bf16",
                                                "--base_weight_dtype", "nf4", *VALIDATION)))
    assert torch.isfinite(result.vectors).all()
    unet = watch_steps["run"].models.denoiser
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in unet.modules())
    assert (tmp_path / "out" / "validation" / "step-4.png").is_file()


def test_a_file_takes_the_configs_diffusers_names_for_its_model_type(tmp_path):
    """Without --single_file_config, an SD 2.x file (1024-wide cross-attention) is configured from SD 2.1's hub
    folder, SD 1.x from SD 1.5's; offline, the one line names the folder and --single_file_config. An inpainting
    file is refused."""
    from safetensors.torch import save_file

    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
          "first_stage_model.encoder.conv_in.weight": torch.zeros(2, 2),
          "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}
    v2 = {**sd, "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}
    inpainting = {**sd, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}
    for name, tensors, expected in (("v1", sd, "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                    ("v2", v2, "stabilityai/stable-diffusion-2-1"),
                                    ("inpaint", inpainting, "inpainting checkpoint")):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(tti.UsageError) as refused:
            tti.find_model_source(str(tmp_path / f"{name}.safetensors"))
        assert expected in str(refused.value)
        assert name == "inpaint" or "--single_file_config" in str(refused.value)
