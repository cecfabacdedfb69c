"""examples/original_layout.py: the tiny pipelines written as single files in the original layouts, and diffusers'
from_single_file giving the folders' weights back bit for bit (offline: config= is the local folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from original_layout import (flux_single_file_any_width, flux_transformer_to_original, load_component,
                             sd3_transformer_to_original, sd_pipeline_to_original, sdxl_pipeline_to_original)
from safetensors import safe_open


def assert_same_weights(model, folder: Path, subfolder: str, cast=None):
    """`model` holds exactly the folder component's tensors: the same keys, dtypes and values (after `cast`)."""
    expected, _ = load_component(folder, subfolder)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(expected), f"{subfolder}: {sorted(set(loaded) ^ set(expected))[:5]}"
    for key, tensor in expected.items():
        want = cast(tensor) if cast else tensor
        assert loaded[key].dtype == want.dtype and torch.equal(loaded[key], want), f"{subfolder}: {key}"


def file_keys(path: Path) -> dict[str, tuple]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in torch.load(path, weights_only=True)["state_dict"].items()}


def model_type(path: Path) -> str:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    return infer_diffusers_model_type(load_single_file_checkpoint(str(path)))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd_checkpoint_loads_back_bit_for_bit(suffix, tiny_sd15_layout_pipeline, tmp_path):
    """An SD 1.5-layout file (AUTOMATIC1111's keys) of the tiny pipeline: from_single_file with the folder as config
    gives its UNet, VAE and CLIP exactly; a .ckpt is a plain {"state_dict": ...} that weights_only loading reads."""
    from diffusers import StableDiffusionPipeline

    path = sd_pipeline_to_original(tiny_sd15_layout_pipeline, tmp_path / f"tiny-sd15{suffix}")
    keys = file_keys(path)  # a .ckpt through torch.load(weights_only=True)
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)
    for key in ("model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # diffusers' "v1" key
                "model.diffusion_model.input_blocks.9.0.op.weight",
                "model.diffusion_model.output_blocks.8.2.conv.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.post_quant_conv.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in keys, key
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert model_type(path) == "v1"

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd15_layout_pipeline))
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), tiny_sd15_layout_pipeline, name)


def test_sd_checkpoint_of_the_two_level_tiny_pipeline(tiny_pipeline, tmp_path):
    """The trainer tests' own tiny pipeline (a 2-level UNet) converts too: the layout follows the config."""
    from diffusers import StableDiffusionPipeline

    path = sd_pipeline_to_original(tiny_pipeline, tmp_path / "tiny-sd.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_pipeline))
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), tiny_pipeline, name)


def test_sdxl_checkpoint_loads_back_bit_for_bit(tiny_sdxl_pipeline, tmp_path):
    """SDXL's layout: CLIP-L under conditioner.embedders.0 (HF keys), bigG under conditioner.embedders.1.model in
    OpenCLIP's (fused in_proj, text_projection transposed). Read as "v1" (diffusers wants bigG's resblocks.9)."""
    from diffusers import StableDiffusionXLPipeline

    path = sdxl_pipeline_to_original(tiny_sdxl_pipeline, tmp_path / "tiny-sdxl.safetensors")
    keys = file_keys(path)
    g = "conditioner.embedders.1.model."
    assert keys[g + "transformer.resblocks.1.attn.in_proj_weight"] == (3 * 48, 48)
    assert keys[g + "positional_embedding"] == (77, 48) and keys[g + "text_projection"] == (48, 48)
    for key in ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",  # clip_sdxl
                g + "token_embedding.weight", g + "ln_final.weight", g + "transformer.resblocks.0.mlp.c_proj.bias",
                "model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight"):
        assert key in keys, key
    assert model_type(path) == "v1"

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl_pipeline))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(pipe, name), tiny_sdxl_pipeline, name)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor(g + "text_projection"), pipe.text_encoder_2.text_projection.weight.detach().T)


def test_flux_transformer_file_loads_back_bit_for_bit(tiny_flux_pipeline, tmp_path):
    """BFL's layout (flux1-dev.safetensors), recognised as flux-dev; diffusers' converter needs
    flux_single_file_any_width() at tiny widths (it splits single_blocks.N.linear1 at Flux.1's 3072)."""
    from diffusers import FluxTransformer2DModel

    path = flux_transformer_to_original(tiny_flux_pipeline, tmp_path / "flux-tiny.safetensors")
    keys = file_keys(path)
    assert keys["double_blocks.0.img_attn.qkv.weight"] == (96, 32)
    assert keys["single_blocks.0.linear1.weight"] == (3 * 32 + 4 * 32, 32)
    for key in ("double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.txt_mlp.2.weight",
                "double_blocks.0.img_mod.lin.weight", "single_blocks.0.modulation.lin.bias",
                "single_blocks.0.norm.key_norm.scale", "single_blocks.0.linear2.weight", "time_in.in_layer.weight",
                "vector_in.out_layer.bias", "guidance_in.in_layer.bias", "img_in.weight", "txt_in.weight",
                "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"):
        assert key in keys, key
    assert model_type(path) == "flux-dev"

    load = dict(config=str(tiny_flux_pipeline), subfolder="transformer")
    with pytest.raises(RuntimeError, match="split_with_sizes"):  # diffusers 0.42; if this passes, drop the shim
        FluxTransformer2DModel.from_single_file(str(path), **load)
    with flux_single_file_any_width():
        transformer = FluxTransformer2DModel.from_single_file(str(path), **load)
    assert_same_weights(transformer, tiny_flux_pipeline, "transformer")
    # and the swapped halves really are swapped: BFL's final modulation is (shift, scale)
    with safe_open(str(path), "pt") as f:
        final = f.get_tensor("final_layer.adaLN_modulation.1.bias")
    scale, shift = transformer.norm_out.linear.bias.detach().chunk(2)
    assert torch.equal(final, torch.cat([shift, scale]))


def test_flux_fp8_file_loads_as_the_rounded_weights(tiny_flux_pipeline, tmp_path):
    """An fp8 (e4m3fn) file, as the community's flux1-dev-fp8: loaded with torch_dtype=bfloat16 it holds the folder's
    weights rounded to fp8, exactly."""
    from diffusers import FluxTransformer2DModel

    path = flux_transformer_to_original(tiny_flux_pipeline, tmp_path / "flux-tiny-fp8.safetensors",
                                        dtype=torch.float8_e4m3fn)
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float8_e4m3fn}
    with flux_single_file_any_width():
        transformer = FluxTransformer2DModel.from_single_file(str(path), config=str(tiny_flux_pipeline),
                                                              subfolder="transformer", torch_dtype=torch.bfloat16)
    assert_same_weights(transformer, tiny_flux_pipeline, "transformer",
                        cast=lambda t: t.to(torch.float8_e4m3fn).to(torch.bfloat16))


def test_sd3_transformer_file_loads_back_bit_for_bit(tiny_sd3_pipeline, tmp_path):
    """The MMDiT layout under model.diffusion_model. (sd3_medium.safetensors). diffusers' infer_diffusers_model_type
    goes by widths for SD 3 (a 9216-wide adaLN), so the tiny file reads as "v1": config= is what makes it load."""
    from diffusers import SD3Transformer2DModel

    path = sd3_transformer_to_original(tiny_sd3_pipeline, tmp_path / "sd3-tiny.safetensors")
    keys = file_keys(path)
    p = "model.diffusion_model."
    assert keys[p + "joint_blocks.0.x_block.attn.qkv.weight"] == (96, 32)
    assert keys[p + "joint_blocks.1.context_block.adaLN_modulation.1.weight"] == (64, 32)  # last: (shift, scale)
    assert p + "joint_blocks.1.context_block.attn.proj.weight" not in keys  # the last text block only conditions
    for key in ("joint_blocks.0.context_block.adaLN_modulation.1.bias", "joint_blocks.0.context_block.mlp.fc2.weight",
                "x_embedder.proj.weight", "context_embedder.weight", "t_embedder.mlp.0.weight", "y_embedder.mlp.2.bias",
                "pos_embed", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"):
        assert p + key in keys, key
    assert model_type(path) == "v1"

    transformer = SD3Transformer2DModel.from_single_file(str(path), config=str(tiny_sd3_pipeline),
                                                         subfolder="transformer")
    assert_same_weights(transformer, tiny_sd3_pipeline, "transformer")
