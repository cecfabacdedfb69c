"""Write a diffusers pipeline's weights as one single-file checkpoint in the original (non-diffusers) layout.

The layouts are the ones people download: an SD 1.x/2.x checkpoint as the CompVis/LDM code and AUTOMATIC1111 save it
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`), an SDXL one
(`conditioner.embedders.0.transformer.text_model.*` for CLIP-L, `conditioner.embedders.1.model.*` in OpenCLIP's
layout for bigG), a Flux.1 transformer
as Black Forest Labs release it (`double_blocks.*`, `single_blocks.*`, ...) and an SD 3 transformer as Stability's
MMDiT code saves it (`model.diffusion_model.joint_blocks.*`, ...). Made from the project's tiny pipelines, they give
the tests the same weights twice, as a folder and as a file; diffusers' `from_single_file` turns each back into the
folder's state dicts bit for bit (tests/test_original_layout.py).

    python examples/original_layout.py sd tiny-sd15 tiny-sd15.safetensors      # or .ckpt
    python examples/original_layout.py sdxl tiny-sdxl tiny-sdxl.safetensors
    python examples/original_layout.py flux tiny-flux flux-tiny.safetensors --dtype float8_e4m3fn
    python examples/original_layout.py sd3 tiny-sd3 sd3-tiny.safetensors

Every converter here maps each diffusers key to exactly one original key and fails on a key it does not know, so a
model with parts this file has not seen (an SDXL UNet's label_emb aside) is refused rather than written incomplete.

Two things about loading the files back (diffusers 0.42):
* Flux: diffusers' converter splits `single_blocks.N.linear1` with Flux.1's own widths written in (3072, mlp ratio 4),
  so a narrower Flux in this layout only loads inside `flux_single_file_any_width()`, which makes that one split use
  the config's widths. Flux.1-sized files (every real one) load without it.
* `infer_diffusers_model_type` (what diffusers fetches configs by when no `config=` is given) calls the tiny SD 3 and
  SDXL files "v1": it goes by SD 3's widths (a 9216-wide adaLN, a 192x192 pos_embed) and by SDXL's bigG having a
  10th layer (resblocks.9). Give `config=` (a diffusers folder) when loading, as one has to offline anyway; with it,
  the detection plays no part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch

SD_UNET_PREFIX = "model.diffusion_model."
SD_VAE_PREFIX = "first_stage_model."
SD_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SD3_PREFIX = "model.diffusion_model."  # as in sd3_medium.safetensors; BFL's flux1-dev.safetensors has no prefix


# ---- Reading a diffusers component -------------------------------------------------------------------------------
def load_component(source, subfolder: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """`(state_dict, config)` of one diffusers component: a model instance, its folder (config.json and
    *.safetensors, sharded or not), or a pipeline folder with `subfolder`. Read straight from the files, so nothing is
    instantiated."""
    if hasattr(source, "state_dict"):
        return dict(source.state_dict()), dict(source.config)
    from safetensors.torch import load_file

    folder = Path(source)
    if subfolder and not (folder / "config.json").is_file():
        folder = folder / subfolder
    config = json.loads((folder / "config.json").read_text())
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        files = [folder / shard for shard in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights (only safetensors folders are read here)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state, config


def save_checkpoint(state_dict: dict[str, torch.Tensor], out_file: str | Path, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write `state_dict` (floating tensors cast to `dtype` if given) as .safetensors, or as a .ckpt/.pt/.pth the way
    the LDM code saves one: `torch.save({"state_dict": ...})`, plain tensors only, so `torch.load(weights_only=True)`
    (what diffusers uses) reads it."""
    import torch

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in state_dict.items()}
    if out_file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out_file), metadata={"format": "pt", **(metadata or {})})
    elif out_file.suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": state}, out_file)
    else:
        raise ValueError(f"{out_file}: write a .safetensors or a .ckpt")
    return out_file


class _KeyMap:
    """Moves tensors from a diffusers state dict to original keys; every diffusers key must be used exactly once."""

    def __init__(self, state_dict: dict[str, torch.Tensor], what: str):
        self.left = dict(state_dict)
        self.out: dict[str, torch.Tensor] = {}
        self.what = what

    def take(self, key: str) -> torch.Tensor:
        try:
            return self.left.pop(key)
        except KeyError:
            raise KeyError(f"{self.what}: no {key!r} (already used, or this model is not laid out as expected)") \
                from None

    def has(self, key: str) -> bool:
        return key in self.left

    def put(self, original: str, tensor: torch.Tensor) -> None:
        if original in self.out:
            raise KeyError(f"{self.what}: two tensors for {original!r}")
        self.out[original] = tensor

    def move(self, diffusers: str, original: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        tensor = self.take(diffusers)
        self.put(original, fn(tensor) if fn else tensor)

    def move_prefix(self, diffusers: str, original: str, rename: Callable[[str], str] = lambda s: s) -> None:
        """Every key under `diffusers.` to `original.` + rename(rest)."""
        keys = [k for k in self.left if k.startswith(diffusers + ".")]
        if not keys:
            raise KeyError(f"{self.what}: nothing under {diffusers!r}")
        for k in keys:
            self.move(k, f"{original}.{rename(k[len(diffusers) + 1:])}")

    def move_weight_and_bias(self, diffusers: str, original: str) -> None:
        for part in ("weight", "bias"):
            if self.has(f"{diffusers}.{part}") or part == "weight":
                self.move(f"{diffusers}.{part}", f"{original}.{part}")

    def cat(self, diffusers: list[str], original: str) -> None:
        """Fused projections (qkv, linear1): the diffusers weights (and biases, if any) stacked along the outputs."""
        import torch

        for part in ("weight", "bias"):
            keys = [f"{d}.{part}" for d in diffusers]
            present = [self.has(k) for k in keys]
            if any(present) and not all(present):
                raise KeyError(f"{self.what}: only some of {keys} exist")
            if all(present):
                self.put(f"{original}.{part}", torch.cat([self.take(k) for k in keys], dim=0))

    def done(self, prefix: str = "") -> dict[str, torch.Tensor]:
        if self.left:
            raise KeyError(f"{self.what}: no original-layout key for {sorted(self.left)[:8]} "
                           f"({len(self.left)} in all)")
        return {prefix + k: v for k, v in self.out.items()}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """Original AdaLN-continuous layers put (shift, scale) where diffusers puts (scale, shift); the swap is its own
    inverse."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ---- SD 1.x / 2.x (and SDXL's UNet and VAE): the LDM layout --------------------------------------------------------
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _rename(rest: str, pairs) -> str:
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(f"unexpected key part {rest!r}")


def unet_to_original(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel's state dict in the LDM layout (keys without `model.diffusion_model.`):
    input_blocks (conv_in, then per level `layers_per_block` x [resnet, transformer], then the downsampler's `op`),
    middle_block (resnet, transformer, resnet), output_blocks (per level `layers_per_block + 1` x [resnet,
    transformer], the upsampler after them), time_embed, label_emb (SDXL) and out."""
    m = _KeyMap(state_dict, "UNet")
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise ValueError("per-level layers_per_block has no LDM layout")
    resnet = lambda rest: _rename(rest, _UNET_RESNET)  # noqa: E731
    m.move_weight_and_bias("time_embedding.linear_1", "time_embed.0")
    m.move_weight_and_bias("time_embedding.linear_2", "time_embed.2")
    if m.has("add_embedding.linear_1.weight"):  # SDXL's size/crop + pooled-text embedding
        m.move_weight_and_bias("add_embedding.linear_1", "label_emb.0.0")
        m.move_weight_and_bias("add_embedding.linear_2", "label_emb.0.2")
    m.move_weight_and_bias("conv_in", "input_blocks.0.0")
    for level in range(len(config["down_block_types"])):
        for layer in range(per_level):
            block = 1 + level * (per_level + 1) + layer
            m.move_prefix(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{block}.0", resnet)
            if m.has(f"down_blocks.{level}.attentions.{layer}.proj_in.weight"):
                m.move_prefix(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{block}.1")
        if m.has(f"down_blocks.{level}.downsamplers.0.conv.weight"):
            m.move_weight_and_bias(f"down_blocks.{level}.downsamplers.0.conv",
                                   f"input_blocks.{1 + level * (per_level + 1) + per_level}.0.op")
    m.move_prefix("mid_block.resnets.0", "middle_block.0", resnet)
    m.move_prefix("mid_block.attentions.0", "middle_block.1")
    m.move_prefix("mid_block.resnets.1", "middle_block.2", resnet)
    for level in range(len(config["up_block_types"])):
        attention = False
        for layer in range(per_level + 1):
            block = level * (per_level + 1) + layer
            m.move_prefix(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{block}.0", resnet)
            if m.has(f"up_blocks.{level}.attentions.{layer}.proj_in.weight"):
                m.move_prefix(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{block}.1")
                attention = True
        if m.has(f"up_blocks.{level}.upsamplers.0.conv.weight"):
            m.move_weight_and_bias(f"up_blocks.{level}.upsamplers.0.conv",
                                   f"output_blocks.{level * (per_level + 1) + per_level}.{2 if attention else 1}.conv")
    m.move_weight_and_bias("conv_norm_out", "out.0")
    m.move_weight_and_bias("conv_out", "out.2")
    return m.done()


def vae_to_original(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's state dict in the LDM layout (keys without `first_stage_model.`): encoder.down.N.block.M,
    .downsample, mid.block_1/attn_1/block_2 (the attention's q/k/v/proj_out as 1x1 convolutions), norm_out; the
    decoder's up.N counted from the bottom (diffusers' up_blocks.0 is the original up.3); quant convs if any."""
    m = _KeyMap(state_dict, "VAE")
    conv1x1 = lambda t: t[:, :, None, None] if t.ndim == 2 else t  # noqa: E731
    resnet = lambda rest: rest.replace("conv_shortcut", "nin_shortcut")  # noqa: E731
    levels = len(config["down_block_types"])
    for coder in ("encoder", "decoder"):
        m.move_weight_and_bias(f"{coder}.conv_in", f"{coder}.conv_in")
        m.move_weight_and_bias(f"{coder}.conv_out", f"{coder}.conv_out")
        m.move_weight_and_bias(f"{coder}.conv_norm_out", f"{coder}.norm_out")
        for i in (0, 1):
            m.move_prefix(f"{coder}.mid_block.resnets.{i}", f"{coder}.mid.block_{i + 1}", resnet)
        if m.has(f"{coder}.mid_block.attentions.0.to_q.weight"):
            for new, old in _VAE_ATTENTION:
                m.move(f"{coder}.mid_block.attentions.0.{new}.weight", f"{coder}.mid.attn_1.{old}.weight", conv1x1)
                m.move(f"{coder}.mid_block.attentions.0.{new}.bias", f"{coder}.mid.attn_1.{old}.bias")
    for level in range(levels):
        for layer in range(config["layers_per_block"]):
            m.move_prefix(f"encoder.down_blocks.{level}.resnets.{layer}", f"encoder.down.{level}.block.{layer}",
                          resnet)
        if m.has(f"encoder.down_blocks.{level}.downsamplers.0.conv.weight"):
            m.move_weight_and_bias(f"encoder.down_blocks.{level}.downsamplers.0.conv",
                                   f"encoder.down.{level}.downsample.conv")
    for level in range(len(config["up_block_types"])):
        original = len(config["up_block_types"]) - 1 - level
        for layer in range(config["layers_per_block"] + 1):
            m.move_prefix(f"decoder.up_blocks.{level}.resnets.{layer}", f"decoder.up.{original}.block.{layer}",
                          resnet)
        if m.has(f"decoder.up_blocks.{level}.upsamplers.0.conv.weight"):
            m.move_weight_and_bias(f"decoder.up_blocks.{level}.upsamplers.0.conv",
                                   f"decoder.up.{original}.upsample.conv")
    for conv in ("quant_conv", "post_quant_conv"):
        if m.has(f"{conv}.weight"):
            m.move_weight_and_bias(conv, conv)
    return m.done()


def clip_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's state dict as SD 1.x checkpoints hold it under `cond_stage_model.transformer.`: every key
    under `text_model.`. transformers 5 names the flattened CLIPTextModel's keys without that prefix
    (`embeddings.token_embedding.weight`); older versions, and CLIPTextModelWithProjection, with it."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()
            if not k.endswith("position_ids")}


def sd_state_dict_to_original(pipeline_dir: str | Path) -> dict[str, torch.Tensor]:
    """The unet, vae and text_encoder of an SD 1.x/2.x diffusers folder as one LDM-layout state dict. SD 2.x's
    OpenCLIP encoder is stored here in the HF CLIP layout SD 1.x uses (cond_stage_model.transformer.*), which
    diffusers reads for either; SD 2.x's own files use OpenCLIP's (cond_stage_model.model.*)."""
    unet, unet_config = load_component(pipeline_dir, "unet")
    vae, vae_config = load_component(pipeline_dir, "vae")
    text, _ = load_component(pipeline_dir, "text_encoder")
    if unet_config.get("addition_embed_type") == "text_time":
        raise ValueError(f"{pipeline_dir} is an SDXL pipeline: an SDXL file holds two text encoders (conditioner.*)")
    state = {SD_UNET_PREFIX + k: v for k, v in unet_to_original(unet, unet_config).items()}
    state |= {SD_VAE_PREFIX + k: v for k, v in vae_to_original(vae, vae_config).items()}
    state |= {"cond_stage_model.transformer." + k: v for k, v in clip_to_original(text).items()}
    return state


def sd_pipeline_to_original(pipeline_dir: str | Path, out_file: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an SD 1.x pipeline folder's unet, vae and text_encoder as one original-layout checkpoint (what
    AUTOMATIC1111 and the CompVis code load), as .safetensors or .ckpt by `out_file`'s suffix. diffusers reads it back
    with `StableDiffusionPipeline.from_single_file(out_file, config=pipeline_dir)`."""
    return save_checkpoint(sd_state_dict_to_original(pipeline_dir), out_file, dtype)


# ---- SDXL: conditioner.embedders.0 (CLIP-L, HF layout) and .1 (OpenCLIP bigG, OpenCLIP's own layout) -------------
_OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def open_clip_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's state dict in OpenCLIP's layout (SDXL's `conditioner.embedders.1.model.*`):
    token_embedding, positional_embedding, transformer.resblocks.N (ln_1, attn.in_proj_weight/bias = q, k, v
    stacked, attn.out_proj, ln_2, mlp.c_fc/c_proj), ln_final, and text_projection as OpenCLIP multiplies by it
    (x @ P, so the transpose of the Linear's weight)."""
    state = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    m = _KeyMap(state, "OpenCLIP text encoder")
    m.move("embeddings.token_embedding.weight", "token_embedding.weight")
    m.move("embeddings.position_embedding.weight", "positional_embedding")
    m.move_weight_and_bias("final_layer_norm", "ln_final")
    m.move("text_projection.weight", "text_projection", lambda t: t.T.contiguous())
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        d, o = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        q, k, v = (f"{d}.self_attn.{x}_proj" for x in "qkv")
        m.cat([q, k, v], f"{o}.attn.in_proj")
        for part in ("weight", "bias"):  # cat names them in_proj.weight/.bias; OpenCLIP's are in_proj_weight/_bias
            m.out[f"{o}.attn.in_proj_{part}"] = m.out.pop(f"{o}.attn.in_proj.{part}")
        for new, old in _OPEN_CLIP_LAYER:
            m.move_weight_and_bias(f"{d}.{new}", f"{o}.{old}")
    return m.done()


def sdxl_state_dict_to_original(pipeline_dir: str | Path) -> dict[str, torch.Tensor]:
    """An SDXL diffusers folder as one original-layout state dict (sd_xl_base_1.0.safetensors): the UNet (with
    label_emb) and VAE as in SD 1.x, CLIP-L under conditioner.embedders.0.transformer.text_model.*, OpenCLIP bigG under
    conditioner.embedders.1.model.*."""
    unet, unet_config = load_component(pipeline_dir, "unet")
    vae, vae_config = load_component(pipeline_dir, "vae")
    clip_l, _ = load_component(pipeline_dir, "text_encoder")
    clip_g, _ = load_component(pipeline_dir, "text_encoder_2")
    state = {SD_UNET_PREFIX + k: v for k, v in unet_to_original(unet, unet_config).items()}
    state |= {SD_VAE_PREFIX + k: v for k, v in vae_to_original(vae, vae_config).items()}
    state |= {"conditioner.embedders.0.transformer." + k: v for k, v in clip_to_original(clip_l).items()}
    state |= {"conditioner.embedders.1.model." + k: v for k, v in open_clip_to_original(clip_g).items()}
    return state


def sdxl_pipeline_to_original(pipeline_dir: str | Path, out_file: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an SDXL pipeline folder as one original-layout checkpoint; diffusers reads it back with
    `StableDiffusionXLPipeline.from_single_file(out_file, config=pipeline_dir)`. The two text encoders must differ in
    width (as 768 and 1280 do, and the tiny 32 and 48): diffusers tells them apart by it."""
    return save_checkpoint(sdxl_state_dict_to_original(pipeline_dir), out_file, dtype)


# ---- Flux.1: Black Forest Labs' layout ------------------------------------------------------------------------------
def flux_state_dict_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel's state dict in Black Forest Labs' layout (flux1-dev.safetensors): fused qkv and
    linear1 (q, k, v, mlp), RMSNorm scales, modulations, and final_layer.adaLN_modulation.1 with (shift, scale)."""
    m = _KeyMap(state_dict, "Flux transformer")
    for new, old in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                     ("guidance_embedder", "guidance_in")):
        if m.has(f"time_text_embed.{new}.linear_1.weight"):  # no guidance_in in Flux-schnell
            m.move_weight_and_bias(f"time_text_embed.{new}.linear_1", f"{old}.in_layer")
            m.move_weight_and_bias(f"time_text_embed.{new}.linear_2", f"{old}.out_layer")
    m.move_weight_and_bias("context_embedder", "txt_in")
    m.move_weight_and_bias("x_embedder", "img_in")
    double = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks.")})
    for i in double:
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        m.move_weight_and_bias(f"{d}.norm1.linear", f"{o}.img_mod.lin")
        m.move_weight_and_bias(f"{d}.norm1_context.linear", f"{o}.txt_mod.lin")
        m.cat([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{o}.img_attn.qkv")
        m.cat([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{o}.txt_attn.qkv")
        for new, old in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            m.move(f"{d}.attn.{new}.weight", f"{o}.{old}.scale")
        m.move_weight_and_bias(f"{d}.attn.to_out.0", f"{o}.img_attn.proj")
        m.move_weight_and_bias(f"{d}.attn.to_add_out", f"{o}.txt_attn.proj")
        for new, old in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
            m.move_weight_and_bias(f"{d}.{new}.net.0.proj", f"{o}.{old}.0")
            m.move_weight_and_bias(f"{d}.{new}.net.2", f"{o}.{old}.2")
    single = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("single_transformer_blocks.")})
    for i in single:
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        m.move_weight_and_bias(f"{d}.norm.linear", f"{o}.modulation.lin")
        m.cat([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{o}.linear1")
        m.move(f"{d}.attn.norm_q.weight", f"{o}.norm.query_norm.scale")
        m.move(f"{d}.attn.norm_k.weight", f"{o}.norm.key_norm.scale")
        m.move_weight_and_bias(f"{d}.proj_out", f"{o}.linear2")
    m.move_weight_and_bias("proj_out", "final_layer.linear")
    m.move("norm_out.linear.weight", "final_layer.adaLN_modulation.1.weight", _swap_halves)
    m.move("norm_out.linear.bias", "final_layer.adaLN_modulation.1.bias", _swap_halves)
    return m.done()


def flux_transformer_to_original(transformer_dir_or_model, out_file: str | Path, dtype: torch.dtype | None = None,
                                 prefix: str = "") -> Path:
    """Write a Flux transformer (a FluxTransformer2DModel, its folder, or a Flux pipeline folder) in Black Forest
    Labs' layout; dtype=torch.float8_e4m3fn gives an fp8 file like the community's flux1-dev-fp8. prefix
    "model.diffusion_model." gives ComfyUI's saved layout. Load it back with
    `FluxTransformer2DModel.from_single_file(out_file, config=pipeline_dir, subfolder="transformer")`, inside
    `flux_single_file_any_width()` unless the transformer has Flux.1's widths."""
    state, _ = load_component(transformer_dir_or_model, "transformer")
    original = flux_state_dict_to_original(state)
    return save_checkpoint({prefix + k: v for k, v in original.items()}, out_file, dtype)


@contextlib.contextmanager
def flux_single_file_any_width() -> Iterator[None]:
    """Let diffusers' from_single_file load BFL-layout Flux files of any width while inside.

    diffusers' convert_flux_transformer_checkpoint_to_diffusers splits `single_blocks.N.linear1` (q, k, v, mlp) with
    Flux.1's widths written in (3072 and 4 x 3072), which fails on any other width. Inside this block the converter
    is handed zero-width stand-ins of those sizes for linear1 and the real tensors are then split with the config's
    widths (num_attention_heads x attention_head_dim, mlp ratio 4 as in FluxTransformer2DModel); everything else is
    diffusers' own conversion. For Flux.1-sized files the result is the same as without it."""
    import torch
    from diffusers.loaders import single_file_model
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    hard_coded = (3072, 3072, 3072, 4 * 3072)

    def convert_any_width(checkpoint, config=None, **kwargs):
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        sizes = (inner, inner, inner, 4 * inner)
        checkpoint = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items()}
        fused = {k: checkpoint[k] for k in checkpoint if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)}
        for k, v in fused.items():
            checkpoint[k] = v.new_empty((sum(hard_coded),) + ((0,) if v.ndim == 2 else ()))
        converted = convert(checkpoint, config=config, **kwargs)
        for k, v in fused.items():
            block, part = f"single_transformer_blocks.{k.split('.')[1]}", k.rsplit(".", 1)[1]
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            for name, piece in zip(names, torch.split(v, sizes, dim=0)):
                converted[f"{block}.{name}.{part}"] = piece
        return converted

    saved = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = convert_any_width
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"] = saved


# ---- SD 3 / 3.5: the MMDiT layout ---------------------------------------------------------------------------------
def sd3_state_dict_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel's state dict in the layout of Stability's MMDiT code (keys without
    `model.diffusion_model.`): joint_blocks.N.x_block/context_block (fused qkv, proj, adaLN_modulation.1, mlp.fc1/2,
    ln_q/ln_k with qk_norm, SD 3.5's attn2), x_embedder, t_embedder, y_embedder, context_embedder, pos_embed,
    final_layer. The last block's text half only conditions (no proj, no mlp) and its modulation, like the final
    layer's, is (shift, scale)."""
    m = _KeyMap(state_dict, "SD3 transformer")
    m.move("pos_embed.pos_embed", "pos_embed")
    m.move_weight_and_bias("pos_embed.proj", "x_embedder.proj")
    m.move_weight_and_bias("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    m.move_weight_and_bias("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    m.move_weight_and_bias("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    m.move_weight_and_bias("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    m.move_weight_and_bias("context_embedder", "context_embedder")
    blocks = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks.")})
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        last = i == blocks[-1]
        m.cat([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{x}.attn.qkv")
        m.cat([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{c}.attn.qkv")
        for new, old in (("norm_q", f"{x}.attn.ln_q"), ("norm_k", f"{x}.attn.ln_k"),
                         ("norm_added_q", f"{c}.attn.ln_q"), ("norm_added_k", f"{c}.attn.ln_k")):
            if m.has(f"{d}.attn.{new}.weight"):
                m.move(f"{d}.attn.{new}.weight", f"{old}.weight")
        m.move_weight_and_bias(f"{d}.attn.to_out.0", f"{x}.attn.proj")
        if m.has(f"{d}.attn2.to_q.weight"):  # SD 3.5 medium's second image self-attention
            m.cat([f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"], f"{x}.attn2.qkv")
            for new, old in (("norm_q", "ln_q"), ("norm_k", "ln_k")):
                if m.has(f"{d}.attn2.{new}.weight"):
                    m.move(f"{d}.attn2.{new}.weight", f"{x}.attn2.{old}.weight")
            m.move_weight_and_bias(f"{d}.attn2.to_out.0", f"{x}.attn2.proj")
        m.move_weight_and_bias(f"{d}.norm1.linear", f"{x}.adaLN_modulation.1")
        m.move_weight_and_bias(f"{d}.ff.net.0.proj", f"{x}.mlp.fc1")
        m.move_weight_and_bias(f"{d}.ff.net.2", f"{x}.mlp.fc2")
        if last:  # context_pre_only: an AdaLayerNormContinuous, (scale, shift) in diffusers
            if m.has(f"{d}.ff_context.net.0.proj.weight") or m.has(f"{d}.attn.to_add_out.weight"):
                raise KeyError(f"SD3 transformer: the last block {d} has a text output, which the layout has not")
            m.move(f"{d}.norm1_context.linear.weight", f"{c}.adaLN_modulation.1.weight", _swap_halves)
            m.move(f"{d}.norm1_context.linear.bias", f"{c}.adaLN_modulation.1.bias", _swap_halves)
        else:
            m.move_weight_and_bias(f"{d}.attn.to_add_out", f"{c}.attn.proj")
            m.move_weight_and_bias(f"{d}.norm1_context.linear", f"{c}.adaLN_modulation.1")
            m.move_weight_and_bias(f"{d}.ff_context.net.0.proj", f"{c}.mlp.fc1")
            m.move_weight_and_bias(f"{d}.ff_context.net.2", f"{c}.mlp.fc2")
    m.move_weight_and_bias("proj_out", "final_layer.linear")
    m.move("norm_out.linear.weight", "final_layer.adaLN_modulation.1.weight", _swap_halves)
    m.move("norm_out.linear.bias", "final_layer.adaLN_modulation.1.bias", _swap_halves)
    return m.done()


def sd3_transformer_to_original(transformer_dir_or_model, out_file: str | Path, dtype: torch.dtype | None = None,
                                prefix: str = SD3_PREFIX) -> Path:
    """Write an SD 3 transformer (an SD3Transformer2DModel, its folder, or an SD 3 pipeline folder) in the original
    MMDiT layout under `prefix`. Load it back with
    `SD3Transformer2DModel.from_single_file(out_file, config=pipeline_dir, subfolder="transformer")`."""
    state, _ = load_component(transformer_dir_or_model, "transformer")
    original = sd3_state_dict_to_original(state)
    return save_checkpoint({prefix + k: v for k, v in original.items()}, out_file, dtype)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=["sd", "sdxl", "flux", "sd3"])
    parser.add_argument("pipeline_dir")
    parser.add_argument("out_file", help=".safetensors, or .ckpt")
    parser.add_argument("--dtype", default=None, help="e.g. float16, bfloat16, float8_e4m3fn (default: as stored)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    write = {"sd": sd_pipeline_to_original, "sdxl": sdxl_pipeline_to_original, "flux": flux_transformer_to_original,
             "sd3": sd3_transformer_to_original}[args.family]
    print(write(args.pipeline_dir, args.out_file, dtype=dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
