"""Build a tiny, randomly initialised Stable-Diffusion-1.x pipeline, fully offline.

The pipeline has the real SD-1.x *architecture* (CLIP text encoder, 4-level VAE
with an 8x downscale, cross-attention UNet, SD's noise schedule) and the real
49,408-token CLIP tokenizer, but tiny widths, so the trainer and examples can be
exercised end to end on a laptop CPU in seconds. Its images are noise: it is a
plumbing fixture, not a model.

    python examples/make_tiny_pipeline.py --output_dir examples/tiny-sd
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# torch/diffusers/transformers are imported inside the functions: importing them
# costs ~8 s on a small CPU box, and the CLI's "already built" path needs none.
if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
# Known SD-1.5 ids; checked after every build so a tokenizer regression is loud.
REFERENCE_TEXT = "a photo of a cat"
REFERENCE_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
TEXT_HIDDEN = 32
TEXT_HIDDEN_2 = 48  # SDXL's second text encoder


def _bytes_to_unicode() -> dict[int, str]:
    # Copied from OpenAI CLIP: maps every byte to a printable unicode char so
    # byte-level BPE never sees whitespace/control chars. Order matters: it fixes
    # the first 256 vocabulary ids.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _open_clip_bpe_path() -> Path:
    # find_spec only locates the package; importing open_clip would pull in
    # torchvision, which we neither need nor want as a dependency.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The CLIP BPE vocabulary is taken from the open_clip_torch package, which is not installed. "
            "Install it with: pip install --no-deps open_clip_torch"
        )
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} not found; reinstall with: pip install --no-deps --force-reinstall open_clip_torch")
    return path


def build_clip_tokenizer(save_dir: str | Path, pad_token: str = EOS) -> CLIPTokenizer:
    """Build the real CLIP ViT-L/14 (SD-1.x) tokenizer from open_clip's BPE file and save it to `save_dir`.

    pad_token "!" gives the OpenCLIP variant of SD 2.x and of SDXL's second tokenizer (same vocabulary).
    """
    from transformers import CLIPTokenizer

    lines = gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    # Same slice as OpenAI's SimpleTokenizer: line 0 is a header, and only the
    # first 49152-256-2 merges are used so the vocab lands on exactly 49,408.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # a duplicate would silently shift every later id
        raise RuntimeError(f"derived {len(vocab)} unique tokens, expected {VOCAB_SIZE}")

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    # vocab.json/merges.txt are the classic slow-tokenizer files; keeping them lets
    # older transformers (4.x, slow CLIPTokenizer) load the folder too.
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    # transformers 5's CLIPTokenizer is the tokenizers-backed one; it takes the
    # vocab dict and merge pairs directly (no vocab_file/merges_file arguments).
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split()) for m in merges],
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=77,
    )
    ids = tokenizer(REFERENCE_TEXT).input_ids
    if len(tokenizer) != VOCAB_SIZE or ids != REFERENCE_IDS:
        raise RuntimeError(f"tokenizer self-check failed: len={len(tokenizer)}, {REFERENCE_TEXT!r} -> {ids}")
    tokenizer.save_pretrained(save_dir)
    return tokenizer


TINY_TEXT_ENCODER = dict(hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
TINY_VAE = dict(
    # Four levels like SD so vae_scale_factor is 8 and latent shapes match the
    # real model at any resolution; the widths are what keep it tiny.
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 16, 16),
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=64,
)


def build_tiny_pipeline(output_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build and save a tiny random SD-1.x pipeline; returns `output_dir` (loadable with from_pretrained)."""
    unet = dict(
        sample_size=8,  # 8 latents * 8 = 64 px default resolution
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        attention_head_dim=8,
        cross_attention_dim=TEXT_HIDDEN,
    )
    return save_sd1_pipeline(output_dir, TINY_TEXT_ENCODER, TINY_VAE, unet, seed, prediction_type)


def build_sd15_shaped_pipeline(output_dir: str | Path, seed: int = 0) -> Path:
    """Stable Diffusion 1.5's exact layer sizes (1.07 B parameters, ~4.3 GB in fp32) with random weights.

    For benchmarks: its step costs what SD 1.5's does, though its images are noise.
    """
    text_encoder = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    vae = dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=512,
    )
    unet = dict(
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
    )
    return save_sd1_pipeline(output_dir, text_encoder, vae, unet, seed)


def build_tiny_sd2_pipeline(output_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SD-2.x-architecture pipeline: OpenCLIP-style text encoder (GELU, "!" padding), linear-projection
    transformer blocks with per-level head counts, and v-prediction, like stable-diffusion-2-1."""
    text_encoder = dict(TINY_TEXT_ENCODER, hidden_act="gelu")
    unet = dict(sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
                norm_num_groups=32, attention_head_dim=(2, 4), use_linear_projection=True,
                cross_attention_dim=TEXT_HIDDEN)
    return save_sd1_pipeline(output_dir, text_encoder, TINY_VAE, unet, seed, "v_prediction", pad_token="!")


def build_tiny_sdxl_pipeline(output_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL-architecture pipeline: two text encoders of different widths (32 and 48, standing in for CLIP-L's
    768 and OpenCLIP-bigG's 1280), the second with a projection; a UNet with SDXL's added text/time conditioning;
    SDXL's scheduler and VAE scaling. The text encoders keep SDXL's legacy config (eos_token_id 2)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    output_dir = Path(output_dir)
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(output_dir / "tokenizer_2", pad_token="!")
    legacy_ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # as in SDXL's published configs

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(**{**TINY_TEXT_ENCODER, "hidden_size": hidden}, vocab_size=VOCAB_SIZE,
                              max_position_embeddings=77, hidden_act="gelu", projection_dim=hidden, **legacy_ids)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(TEXT_HIDDEN))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(TEXT_HIDDEN_2))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE, latent_channels=4, scaling_factor=0.13025, force_upcast=True)
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six size/crop numbers, each embedded to time_embed_dim, plus the pooled text projection
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN_2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(output_dir)
    return output_dir


def save_sd1_pipeline(output_dir: str | Path, text_encoder_config: dict, vae_config: dict, unet_config: dict,
                      seed: int = 0, prediction_type: str = "epsilon", pad_token: str = EOS) -> Path:
    """An SD-1.x/2.x pipeline of the given sizes, the real CLIP tokenizer and SD's noise schedule, in output_dir."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    output_dir = Path(output_dir)
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer", pad_token)

    # Re-seeding before each component makes each one's weights independent of
    # the others' sizes, so changing one config does not reshuffle the rest.
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=77,
            projection_dim=text_encoder_config["hidden_size"],
            # Real ids, not the legacy 0/1/2 of SD's config: with eos=49407 CLIP
            # pools at the first EOS, which is what a new placeholder token needs.
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **{"hidden_act": "quick_gelu", **text_encoder_config},  # quick_gelu: SD-1.x's CLIP ViT-L
        )
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(latent_channels=4, scaling_factor=0.18215, **vae_config)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_config)

    # SD-1.x's schedule. from_config (not the constructor) keeps set_alpha_to_one
    # in the saved config, so DDIM/PNDM built from it behave like SD's.
    scheduler = DDPMScheduler.from_config(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": prediction_type,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "clip_sample": False,
        }
    )

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="examples/tiny-sd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"],
                        help="architecture: SD 1.x (--prediction_type applies), SD 2.x (v-prediction) or SDXL")
    parser.add_argument("--force", action="store_true", help="rebuild even if output_dir already holds a pipeline")
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    if (out / "model_index.json").is_file() and not args.force:
        print(f"{out} already exists; skipping (use --force to rebuild)")
        return 0
    try:
        if args.family == "sd1":
            build_tiny_pipeline(out, seed=args.seed, prediction_type=args.prediction_type)
        else:
            {"sd2": build_tiny_sd2_pipeline, "sdxl": build_tiny_sdxl_pipeline}[args.family](out, seed=args.seed)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tiny pipeline written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
