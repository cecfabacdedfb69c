"""Build a tiny, randomly initialised Stable-Diffusion-1.x pipeline, fully offline.

The pipeline has the real SD-1.x *architecture* (CLIP text encoder, 4-level VAE
with an 8x downscale, cross-attention UNet, SD's noise schedule) and the real
49,408-token CLIP tokenizer, but tiny widths, so the trainer and examples can be
exercised end to end on a laptop CPU in seconds. Its images are noise: it is a
plumbing fixture, not a model.

    python examples/make_tiny_pipeline.py --output_dir examples/tiny-sd
    python examples/make_tiny_pipeline.py --family sd3 --output_dir examples/tiny-sd3   # or --family flux
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import re
import string
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# torch/diffusers/transformers are imported inside the functions: importing them
# costs ~8 s on a small CPU box, and the CLI's "already built" path needs none.
if TYPE_CHECKING:
    from transformers import CLIPTokenizer, T5EncoderModel, T5TokenizerFast

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


def build_tiny_sd15_layout_pipeline(output_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SD-1.x pipeline with SD 1.5's *block layout*: a UNet of four levels (three cross-attention levels and
    one plain, mirrored on the way up, two layers per level, 8 heads) and a VAE of four levels with two layers each,
    at tiny widths. Unlike build_tiny_pipeline's two-level UNet, it has every key an original-layout (LDM) checkpoint
    has, in the same places (input_blocks 0-11, output_blocks 0-11, decoder.up.0-3 ...), so it converts to and from a
    single-file SD 1.5 checkpoint (examples/original_layout.py). ~17 MB (a third of it the CLIP token table)."""
    vae = dict(TINY_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=2)
    unet = dict(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=16,
        attention_head_dim=8,
        cross_attention_dim=TEXT_HIDDEN,
    )
    return save_sd1_pipeline(output_dir, TINY_TEXT_ENCODER, vae, unet, seed)


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


# ---------------------------------------------------------------------------------------------------------------------
# Flow-matching families: SD 3/3.5 (MMDiT) and Flux.1. Both add a T5 encoder next to CLIP, and a 16-channel VAE.
# ---------------------------------------------------------------------------------------------------------------------

T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in every T5 checkpoint
T5_VOCAB_SIZE = 1000  # SentencePiece pieces, specials included (T5 v1.1: 32,000)
T5_EXTRA_IDS = 20  # <extra_id_0> ... after the pieces, as T5's 100 sentinels (ids 32,000-32,099)
# The encoder's token table is padded past the tokenizer, as T5's 32,128 rows for 32,100 tokens: the first new
# (placeholder) ids land on spare rows, later ones past the table.
T5_EMBEDDING_ROWS = 1024
PRINTABLE_ASCII = string.digits + string.ascii_letters + string.punctuation
# SD3 zero-pads the concatenated CLIP-L + CLIP-G penultimate states (32 + 48 = 80 here, 768 + 1280 = 2048 for real)
# up to T5's width (4096 for real) and stacks them with the T5 states, so T5 must be at least as wide as both CLIPs
# together: with a narrower T5 the pad amount is negative and torch.nn.functional.pad silently *crops* CLIP features.
T5_HIDDEN = 128
TINY_T5 = dict(d_model=T5_HIDDEN, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               # T5 v1.1 (what SD3 and Flux ship): gated-GELU feed-forward, untied embeddings
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# SD3's and Flux's VAE: SD's 8x-downscaling layout with 16 latent channels and no quant convs; only the latent
# normalisation (shift/scale, applied by the pipelines as (z - shift) * scale) differs between the two.
TINY_FLOW_VAE = dict(TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
SD3_LATENT_SHIFT, SD3_LATENT_SCALE = 0.0609, 1.5305
FLUX_LATENT_SHIFT, FLUX_LATENT_SCALE = 0.1159, 0.3611

# The corpus the tiny T5 tokenizer is trained on: captions about things, colours, places and styles, like the
# prompts textual inversion sees. Generated from these lists, so nothing is downloaded.
_T5_WORDS = {
    "thing": "toy cat dog car house tree flower bird horse boat chair table lamp cup bottle book clock apple banana "
             "orange robot bear ball hat shoe bag guitar piano bicycle train plane castle bridge mountain river lake "
             "forest city street garden window door bed sofa mirror vase candle kettle teapot mug plate spoon fork "
             "knife pumpkin cake cookie pizza sandwich fish frog rabbit fox wolf lion tiger elephant giraffe monkey "
             "owl duck penguin turtle dragon unicorn statue backpack umbrella kite balloon camera phone laptop "
             "keyboard helmet jacket dress scarf glove sock ring necklace watch crown sword shield lantern basket "
             "bucket barrel box blanket pillow carpet curtain painting poster sign fence gate tower temple church "
             "lighthouse windmill tractor truck bus motorcycle rocket spaceship submarine ship canoe tent cabin hut "
             "igloo skyscraper squirrel hedgehog mouse hamster parrot eagle swan goose chicken cow pig sheep goat deer "
             "zebra panda koala kangaroo octopus crab shark whale dolphin jellyfish butterfly bee spider snail "
             "dinosaur knight wizard princess pirate astronaut chef farmer doctor teacher child woman man girl boy "
             "baby family friend",
    "colour": "red green blue yellow purple pink brown black white grey golden silver beige turquoise teal violet "
              "crimson cyan magenta navy olive maroon lavender amber emerald ivory",
    "quality": "small large tiny huge old new shiny fluffy wooden plastic metal glass ceramic soft cute happy sad "
               "sleepy colorful bright dark wet dry furry vintage modern antique broken painted striped spotted round "
               "square smooth rough heavy light tall short long wide narrow empty full clean dirty quiet loud warm "
               "cold hot frozen rusty dusty sparkling glowing transparent knitted woven plush rubber paper cardboard "
               "velvet leather marble stone sleek curious playful grumpy friendly fierce gentle elegant strange "
               "magical ancient futuristic detailed blurry sharp beautiful ugly famous favourite lonely busy peaceful "
               "stormy",
    "place": "beach table grass floor shelf street kitchen garden desk bed sofa snow sand rock road bridge window "
             "field forest park river lake mountain moon city rooftop desert jungle ocean island village farm market "
             "library museum classroom office bedroom bathroom attic basement balcony porch playground stadium station "
             "airport harbor cave volcano glacier meadow valley canyon waterfall swamp hill cliff shore pier alley "
             "square palace castle studio",
    "style": "painting watercolor sketch drawing cartoon anime photograph oil pencil charcoal pixel digital render "
             "illustration poster mosaic origami sculpture comic impressionist cubist surrealist minimalist realistic "
             "abstract baroque renaissance gothic psychedelic vaporwave steampunk cyberpunk pastel chalk crayon ink "
             "woodcut engraving etching lithograph collage graffiti mural stained embroidery claymation isometric "
             "lowpoly voxel polaroid cinematic documentary editorial portrait landscape",
    "light": "sunset sunrise morning evening night daylight studio moonlight neon candlelight twilight dawn dusk noon "
             "midnight fog mist rain snowfall thunderstorm rainbow shadow backlight spotlight bokeh",
    "action": "sitting standing running jumping sleeping eating drinking reading writing playing singing dancing "
              "swimming flying climbing walking riding driving floating hiding smiling laughing looking waiting "
              "holding carrying painting cooking fishing skating surfing skiing camping hugging waving",
}
_T5_TEMPLATES = (
    "a photo of a {quality} {colour} {thing} on the {place}", "a {style} of a {colour} {thing}",
    "a {quality} {thing} in the style of {style}", "the {thing} next to a {colour} {thing} at {light}",
    "a close-up photo of the {quality} {thing}", "two {colour} {thing}s and a {thing} in the {place}",
    "an {style} painting of a {thing} with a {colour} background", "a high quality photo of my {thing}, {light}",
    "A {Colour} {Thing} {action} on a {place}.", "a rendering of a {quality} {thing}; {style} style!",
    "a {thing} {action} near the {place} during {light}", "there is a {quality} {thing} {action} in the {place}",
    "my {thing} is {colour} and {quality}", "{Style} art: {quality} {thing}s {action} by the {place}",
    "a cropped photo of the {thing}", "a bright photo of a {quality} {thing}", "a dark photo of the {thing}",
    "a good photo of a {thing}, {style}", "an embroidered {thing}", "a plushie {thing} in a {colour} {place}",
)


def t5_corpus(n_sentences: int = 1000, seed: int = 0) -> list[str]:
    """The tiny T5 tokenizer's training text: the word lists, a line of all printable ASCII, and templated captions."""
    rng = random.Random(seed)
    words = {kind: text.split() for kind, text in _T5_WORDS.items()}

    def fill(match: re.Match) -> str:  # {thing} -> "toy", {Thing} -> "Toy"
        word = rng.choice(words[match.group(1).lower()])
        return word.capitalize() if match.group(1)[0].isupper() else word

    lines = ["a photo of a toy cat dog on the beach painting style", " ".join(PRINTABLE_ASCII)]
    lines += [" ".join(w) for w in words.values()]
    for i in range(n_sentences):
        lines.append(re.sub(r"\{(\w+)\}", fill, rng.choice(_T5_TEMPLATES)))
        if i % 3 == 0:  # numbers, so digits form pieces of their own as in a real vocabulary
            lines.append(f"photo number {rng.randint(0, 2025)} of {rng.randint(2, 99)} {rng.choice(words['thing'])}s")
    return lines


def _canonical_unigram_scores(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Make a trained Unigram vocabulary the same on every run: sorted by score, then text.

    The trainer always keeps the same pieces, but it re-adds the alphabet characters that pruning dropped with
    made-up scores 1e-4 apart (the lowest ones in the vocabulary) in hash-map order, which differs per process.
    Those characters are dealt the same scores in text order instead.
    """
    pieces = [(p, round(s, 6)) for p, s in pieces]
    chars = [(p, s) for p, s in pieces if len(p) == 1]
    floor = min(s for _, s in pieces) + 1e-4 * len(chars) + 1e-7
    readded = {p for p, s in chars if s <= floor}
    scores = sorted((s for p, s in chars if p in readded), reverse=True)
    dealt = dict(zip(sorted(readded), scores))
    return sorted(((p, dealt.get(p, s)) for p, s in pieces), key=lambda ps: (-ps[1], ps[0]))


def build_t5_tokenizer(save_dir: str | Path, vocab_size: int = T5_VOCAB_SIZE,
                       extra_ids: int = T5_EXTRA_IDS) -> T5TokenizerFast:
    """Train a tiny SentencePiece-style (Unigram) T5 tokenizer on `t5_corpus()` and save it to `save_dir`.

    A stand-in for the 32,100-token T5 v1.1 tokenizer of SD3/Flux, which has no offline source here; real users
    load the real one with T5TokenizerFast.from_pretrained(<sd3 or flux repo>, subfolder="tokenizer_3"/"tokenizer_2").
    It keeps what the pipelines and textual inversion rely on: <pad>=0, </s>=1, <unk>=2, an </s> appended to every
    text, "▁"-prefixed word pieces, and add_tokens() giving a new token one id after the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import Unigram
    from transformers import AutoTokenizer, T5TokenizerFast

    # Exactly T5Tokenizer's own pipeline (transformers 5, models/t5/tokenization_t5.py): from_pretrained rebuilds the
    # backend from tokenizer.json's vocabulary and re-applies these fixed pre-tokenizer/decoder settings (keeping only
    # a "Precompiled" normalizer), so anything else here would be lost on reload.
    def pipeline_of(model: Unigram) -> Tokenizer:
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        return tokenizer

    backend = pipeline_of(Unigram())
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(T5_SPECIAL_TOKENS), unk_token="<unk>", show_progress=False,
        # every printable ASCII character is a piece, so ASCII text never turns into <unk>
        initial_alphabet=list(PRINTABLE_ASCII))
    backend.train_from_iterator(t5_corpus(), trainer)

    specials = [(t, 0.0) for t in T5_SPECIAL_TOKENS]
    rest = _canonical_unigram_scores([(p, s) for p, s in json.loads(backend.to_str())["model"]["vocab"]
                                      if p not in T5_SPECIAL_TOKENS])
    backend = pipeline_of(Unigram(specials + rest, unk_id=2, byte_fallback=False))
    backend.post_processor = processors.TemplateProcessing(  # T5 appends </s> and no BOS
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])

    # T5's <extra_id_N> sentinels are for span-corruption pretraining and no diffusion pipeline uses them, but they
    # are tokens the real tokenizer already knows (and a placeholder must not be one of them).
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=extra_ids, model_max_length=512)
    save_dir = Path(save_dir)
    tokenizer.save_pretrained(save_dir)

    # Like the CLIP check: what the pipelines rely on, and that from_pretrained gives back the same tokenizer.
    text = "a photo of a toy"
    ids, specials = tokenizer(text).input_ids, [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    reloaded = AutoTokenizer.from_pretrained(save_dir)
    reloaded_ids = reloaded(text).input_ids
    if (specials != [0, 1, 2] or ids[-1] != 1 or 2 in ids
            or not isinstance(reloaded, T5TokenizerFast) or reloaded_ids != ids):
        raise RuntimeError(f"T5 tokenizer self-check failed: pad/eos/unk ids {specials}, {text!r} -> {ids}, "
                           f"reloaded as {type(reloaded).__name__} -> {reloaded_ids}")
    return tokenizer


def _t5_encoder(vocab_size: int, seed: int) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel
    import torch

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                   **TINY_T5))


def _clip_text_config(tokenizer: CLIPTokenizer, hidden: int, hidden_act: str):
    from transformers import CLIPTextConfig

    # projection_dim = hidden as in CLIP-L (768) and OpenCLIP-bigG (1280); real token ids, so the pooled output is
    # taken at the first EOS even when a placeholder token (id 49408+) is in the prompt.
    return CLIPTextConfig(**{**TINY_TEXT_ENCODER, "hidden_size": hidden}, vocab_size=VOCAB_SIZE,
                          max_position_embeddings=77, hidden_act=hidden_act, projection_dim=hidden,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def build_tiny_sd3_pipeline(output_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SD-3-architecture pipeline (StableDiffusion3Pipeline): an MMDiT (SD3Transformer2DModel) over a 16-channel
    VAE, CLIP-L- and CLIP-G-like encoders with projections (widths 32 and 48), a tiny T5 (width 128) with the tiny
    T5 tokenizer, and SD3's flow-matching schedule (shift 3.0). Default resolution 64 px; any multiple of 16 renders.

    How SD3 wires the text in (diffusers StableDiffusion3Pipeline.encode_prompt): the two CLIPs' penultimate hidden
    states are concatenated along features (32 + 48 = 80), zero-padded to T5's width and stacked with the T5 states
    along the sequence (77 + 256 tokens) -> the transformer's joint_attention_dim is T5's width. The two CLIPs'
    projected pooled outputs are concatenated -> pooled_projection_dim = 32 + 48.
    """
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    output_dir = Path(output_dir)
    # Same pads as SDXL (and SD3's own reference code): CLIP-L pads with its EOS, CLIP-G with "!".
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(output_dir / "tokenizer_2", pad_token="!")
    tokenizer_3 = build_t5_tokenizer(output_dir / "tokenizer_3")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, TEXT_HIDDEN, "quick_gelu"))  # CLIP-L
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, TEXT_HIDDEN_2, "gelu"))  # bigG
    text_encoder_3 = _t5_encoder(T5_EMBEDDING_ROWS, seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_FLOW_VAE, shift_factor=SD3_LATENT_SHIFT, scaling_factor=SD3_LATENT_SCALE)
    heads, head_dim = 4, 8
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # latents; x8 (VAE) = the pipeline's default 64 px
        patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_HIDDEN,
        # the text tokens join the image tokens in one attention, so they are projected to the same inner width
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=TEXT_HIDDEN + TEXT_HIDDEN_2,
        # a 32x32-patch sincos table (saved with the weights), cropped per resolution: up to 32*2*8 = 512 px.
        # SD3's 192 would cost 192*192*32 floats (4.7 MB) here.
        pos_embed_max_size=32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipeline.save_pretrained(output_dir)
    return output_dir


def build_tiny_flux_pipeline(output_dir: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny Flux.1-architecture pipeline (FluxPipeline): a double+single-stream transformer over 2x2-packed
    16-channel latents, a CLIP-L-like encoder (width 32; only its pooled output is used), a tiny T5 (width 128) with
    the tiny T5 tokenizer, and Flux-dev's resolution-dependent flow-matching schedule.

    guidance_embeds=True is Flux-dev (guidance distilled: guidance_scale goes into the transformer as an embedding);
    False is Flux-schnell's transformer. Height and width must be multiples of 16 (VAE 8x, then 2x2 packing); pass
    them explicitly, since FluxPipeline's default is 1024 px whatever the transformer.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    output_dir = Path(output_dir)
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer")
    tokenizer_2 = build_t5_tokenizer(output_dir / "tokenizer_2")

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, TEXT_HIDDEN, "quick_gelu"))
    text_encoder_2 = _t5_encoder(T5_EMBEDDING_ROWS, seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_FLOW_VAE, shift_factor=FLUX_LATENT_SHIFT, scaling_factor=FLUX_LATENT_SCALE)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 2 * 2,  # the pipeline packs each 2x2 latent patch into one token
        num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
        # rotary embedding over (text/image index, row, column); the parts must add up to attention_head_dim,
        # like Flux's (16, 56, 56) for 128
        axes_dims_rope=(4, 6, 6),
        joint_attention_dim=T5_HIDDEN, pooled_projection_dim=TEXT_HIDDEN, guidance_embeds=guidance_embeds)
    # Flux-dev's scheduler config: the shift mu grows with the number of image tokens (256 -> 0.5 ... 4096 -> 1.15).
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipeline.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="examples/tiny-sd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl", "sd3", "flux"],
                        help="architecture: SD 1.x (--prediction_type applies), SD 2.x (v-prediction), SDXL, "
                             "SD 3 (MMDiT, CLIP-L + CLIP-G + T5) or Flux.1-dev (CLIP-L + T5, guidance embedding)")
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
            builders = {"sd2": build_tiny_sd2_pipeline, "sdxl": build_tiny_sdxl_pipeline,
                        "sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}
            builders[args.family](out, seed=args.seed)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tiny pipeline written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
