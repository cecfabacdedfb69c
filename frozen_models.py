"""The frozen models of a textual-inversion run: where their weights are, which family they are, how each form loads,
the tokenizers, and freezing and placing them. The training script asks this module for them and keeps the method.

Three forms of weights, each found without loading a weight:
- a diffusers pipeline folder or hub id (`from_pretrained`), the family from its model_index.json;
- an original-layout single file of SD 1.x/2.x/XL (`model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.*` / `conditioner.*`), as AUTOMATIC1111, ComfyUI and kohya keep them; the family from its keys,
  its configs and tokenizers from --single_file_config (diffusers' `config=`) or the hub folder diffusers picks;
- a transformer file of SD 3/3.5 or Flux.1 (Black Forest Labs' or Stability's layout, fp8 too) in place of the
  transformer of a pipeline folder or hub id (--transformer_file).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint

logger = logging.getLogger("textual_inversion")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Key prefixes of the original layouts, and what a file holding them is.
SD_UNET, SD_VAE = "model.diffusion_model.input_blocks.", "first_stage_model."
PIPELINE_OF_KIND = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
KIND_WORDS = {"sd": "an SD 1.x/2.x checkpoint", "sdxl": "an SDXL checkpoint", "sd3": "an SD 3/3.5 transformer",
              "flux": "a Flux.1 transformer", "lora": "a LoRA", "embedding": "a textual-inversion embedding",
              "vae": "a VAE", "unknown": "no Stable Diffusion checkpoint"}
# Where diffusers takes each family's configs from when no --single_file_config is given (its own defaults).
DEFAULT_CONFIGS = {"sd": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                   "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


# ---- Reading a single file's keys -------------------------------------------------------------------------------------
class _Shapes(dict):
    """`{key: meta tensor of the key's shape}`: what diffusers' infer_diffusers_model_type reads, with no data."""


def checkpoint_shapes(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """Every key of a single file with a meta tensor of its shape. A .ckpt/.pt is read with weights_only=True (no
    pickled code runs) and memory-mapped where its format allows, so only the header is read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return _Shapes({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{flag} {path}: the file needs pickled code to load, which this script does not run "
                         f"({str(e).splitlines()[0][:120]}); use the model's .safetensors release") from None
    except Exception as e:  # random bytes, a truncated download, not a tensor file at all
        raise UsageError(f"{flag} {path} cannot be read as a {path.suffix} checkpoint ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else 'no detail'})") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"{flag} {path} holds a {type(state).__name__}, not a checkpoint's tensors")
    return _Shapes({k: torch.empty(v.shape, device="meta") for k, v in state.items() if isinstance(v, torch.Tensor)}
                   | {k: None for k, v in state.items() if not isinstance(v, torch.Tensor)})


def checkpoint_kind(keys) -> str:
    """What a file's keys are: "sd", "sdxl" (whole original-layout checkpoints), "sd3", "flux" (transformers),
    else "lora", "embedding", "vae" or "unknown"."""
    keys = list(keys)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("double_blocks.", "model.diffusion_model.double_blocks."):
        return "flux"
    if has("joint_blocks.", "model.diffusion_model.joint_blocks."):
        return "sd3"
    if has(SD_UNET) and has(SD_VAE):
        if has("conditioner.embedders.1."):
            return "sdxl"
        if has("cond_stage_model."):
            return "sd"
    if any("lora" in k.lower() for k in keys):
        return "lora"
    if has("string_to_param", "emb_params", "emp_params", "clip_l", "clip_g", "t5"):
        return "embedding"
    if has("encoder.down.", "decoder.up.", "encoder.down_blocks.", "first_stage_model."):
        return "vae"
    return "unknown"


def short_hash(path: Path) -> str:
    """The first 10 hex digits of the file's SHA-256: AUTOMATIC1111's short checkpoint hash (Civitai's AutoV2).
    Computed once per file version: every saved result records it."""
    stat = path.stat()
    return _short_hash(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _short_hash(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def default_config(shapes: dict, kind: str, name: str) -> str:
    """The hub folder diffusers takes a file's configs from (its infer_diffusers_model_type): SD 1.5's or 2.1's
    (v-prediction), SDXL base's. Inpainting and refiner checkpoints are refused: their UNets take other inputs."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    try:
        model_type = infer_diffusers_model_type(shapes)
    except Exception:  # a key it reads holds no tensor: keep the family's default
        model_type = None
    if model_type in ("inpainting", "inpainting_v2", "xl_inpaint", "xl_refiner", "upscale"):
        raise UsageError(f"--pretrained_model_name_or_path {name} is a {model_type.replace('_', ' ')} checkpoint "
                         "(diffusers' reading of its keys); train the word on the base model's checkpoint")
    usable = {"sd": ("v1", "v2"), "sdxl": ("xl_base", "playground-v2-5")}[kind]
    if model_type in usable:
        return DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    return DEFAULT_CONFIGS[kind]


# ---- Where the weights are --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """Where a run's frozen weights and configs come from."""

    name: str  # --pretrained_model_name_or_path as given
    config: str  # a diffusers pipeline folder or hub id: model_index.json, configs, scheduler, tokenizers
    pipeline: str  # its model_index.json's _class_name, e.g. "StableDiffusionPipeline"
    checkpoint: Path | None = None  # an original-layout file holding every weight (SD 1.x/2.x/XL)
    transformer_file: Path | None = None  # replaces the config's transformer (SD 3/3.5, Flux.1)
    revision: str | None = None  # of a hub pipeline (not of a single file's configs)
    variant: str | None = None
    config_flag: str = "--pretrained_model_name_or_path"  # the flag that named `config`, for errors

    def provenance(self) -> dict[str, str]:
        """What the outputs record about the base model: a file's name and short hash (as AUTOMATIC1111 records
        `sd_checkpoint`), else the folder or hub id."""
        if self.checkpoint is None:
            record = {"base_model": self.name}
        else:
            record = {"base_model": self.checkpoint.name, "base_model_hash": short_hash(self.checkpoint.resolve()),
                      "base_model_config": self.config}
        if self.transformer_file is not None:
            record.update(transformer_file=self.transformer_file.name,
                          transformer_file_hash=short_hash(self.transformer_file.resolve()))
        return record

    def identity(self) -> dict[str, str]:
        """What a checkpoint must share with a run that resumes it: the same weights. Keys only where a file is
        given, so checkpoints of folder runs keep matching."""
        model = Path(self.name).expanduser()
        # "./pipe", "pipe/" and the absolute path are the same local model
        identity = {"pretrained_model_name_or_path": str(model.resolve()) if model.exists() else model.as_posix()}
        record = self.provenance()
        identity.update({k: record[k] for k in ("base_model_hash", "transformer_file_hash") if k in record})
        return identity


def model_load_error(source: ModelSource, what: str, error: Exception) -> UsageError:
    """A loading failure as one line naming the flag that most likely caused it (--variant, --revision,
    --single_file_config or the model itself) and what to do; the library's own first line says which file."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    if source.variant and f".{source.variant}." in str(error):
        return UsageError(f"--variant {source.variant}: {source.name} has no {source.variant} weights for {what} "
                          f"({detail}); drop --variant or name a variant the model has")
    if source.revision:
        return UsageError(f"--revision {source.revision}: {source.name}: cannot load {what} at that revision "
                          f"({detail}); check the revision (a branch, tag or commit of the model) or drop --revision")
    if source.checkpoint is not None and source.config_flag == "--pretrained_model_name_or_path":
        return UsageError(f"--pretrained_model_name_or_path {source.name}: cannot load {what} from {source.config}, "
                          f"where diffusers takes this file's configs ({detail}); give --single_file_config, a "
                          "local diffusers folder (or a hub id this machine can reach) of the same model type")
    return UsageError(f"{source.config_flag} {source.config}: cannot load {what} ({detail}); give a diffusers "
                      "pipeline folder or a hub id this machine can reach")


def pipeline_class_name(source: ModelSource) -> str:
    """The config's model_index.json _class_name."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source.config, revision=source.revision).get("_class_name")
    except (OSError, ValueError) as e:
        raise model_load_error(source, "its model_index.json", e) from None


def find_model_source(name: str, revision: str | None = None, variant: str | None = None,
                      single_file_config: str | None = None, transformer_file: str | None = None) -> ModelSource:
    """Where the weights are, checked from the files' keys and the configs alone: a pipeline folder or hub id, or a
    single file with the folder its configs come from, plus an optional transformer file."""
    path = Path(name).expanduser()
    source = ModelSource(name, name, "", revision=revision, variant=variant)
    if path.is_file():
        shapes = checkpoint_shapes(path, "--pretrained_model_name_or_path")
        kind = checkpoint_kind(shapes)
        if kind in ("sd3", "flux"):
            raise UsageError(f"--pretrained_model_name_or_path {name} is {KIND_WORDS[kind]} alone: give it as "
                             "--transformer_file, with --pretrained_model_name_or_path the diffusers folder or hub id "
                             "its text encoders and VAE come from")
        if kind not in ("sd", "sdxl"):
            raise UsageError(f"--pretrained_model_name_or_path {name} is {KIND_WORDS[kind]}: give an SD 1.x/2.x/XL "
                             "checkpoint (model.diffusion_model.*, first_stage_model.*, cond_stage_model.* or "
                             "conditioner.*) or a diffusers pipeline folder")
        config = single_file_config or default_config(shapes, kind, name)
        flag = "--single_file_config" if single_file_config else "--pretrained_model_name_or_path"
        source = ModelSource(name, config, "", checkpoint=path, config_flag=flag)
        class_name = pipeline_class_name(source)
        if class_name != PIPELINE_OF_KIND[kind]:
            raise UsageError(f"--single_file_config {config} is a {class_name}, but {name} is {KIND_WORDS[kind]}: "
                             f"give the configs of a {PIPELINE_OF_KIND[kind]}")
    else:
        class_name = pipeline_class_name(source)
    source = ModelSource(**{**source.__dict__, "pipeline": class_name})
    if transformer_file is not None:
        source = with_transformer_file(source, Path(transformer_file).expanduser())
    return source


def with_transformer_file(source: ModelSource, file: Path) -> ModelSource:
    """`source` with its transformer taken from `file`, which must be that family's."""
    wanted = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}.get(source.pipeline)
    if wanted is None:
        raise UsageError(f"--transformer_file is for SD 3/3.5 and Flux.1; {source.name} is a {source.pipeline}: "
                         "drop the flag")
    kind = checkpoint_kind(checkpoint_shapes(file, "--transformer_file"))
    if kind != wanted:
        raise UsageError(f"--transformer_file {file} is {KIND_WORDS[kind]}, but {source.name} is a "
                         f"{source.pipeline}: give {KIND_WORDS[wanted]} file")
    return ModelSource(**{**source.__dict__, "transformer_file": file})


# ---- Loading ----------------------------------------------------------------------------------------------------------
def load_models(source: ModelSource, adapter, tokenizers: list, weight_dtype: torch.dtype):
    """Scheduler, text encoder(s), VAE and denoiser (UNet or transformer), from the source's form of weights, each
    loaded in the compute dtype: no full fp32 copy on the way (a bf16 file stays memory-mapped, not copied), which
    would double the host memory of a bf16 model (Flux.1-dev: ~67 GB for the transformer and T5 in fp32)."""
    import diffusers
    import transformers

    what = "its scheduler"
    try:
        noise_scheduler = getattr(diffusers, adapter.scheduler).from_pretrained(source.config, subfolder="scheduler",
                                                                                 revision=source.revision)
        if source.checkpoint is not None:
            what = f"the single file {source.checkpoint.name}"
            text_encoders, vae, denoiser = load_single_file(source, adapter, tokenizers, noise_scheduler,
                                                            weight_dtype)
        else:
            text_encoders, where = [], dict(revision=source.revision, variant=source.variant)
            for what, class_name in adapter.text_encoders:
                text_encoders.append(getattr(transformers, class_name).from_pretrained(
                    source.config, subfolder=what, dtype=weight_dtype, **where))
            what = "vae"
            # fp16 VAEs overflow (vae_dtype_for): they load in fp32 and freeze_and_place decides.
            vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
            vae = diffusers.AutoencoderKL.from_pretrained(source.config, subfolder=what, torch_dtype=vae_dtype, **where)
            what = adapter.denoiser[0]
            denoiser = None if source.transformer_file else getattr(diffusers, adapter.denoiser[1]).from_pretrained(
                source.config, subfolder=what, torch_dtype=weight_dtype, **where)
    except (OSError, ValueError) as e:  # a missing variant or revision, a hub id out of reach, a damaged file
        raise model_load_error(source, f"{what}", e) from None
    if source.transformer_file is not None:
        denoiser = load_transformer_file(source, adapter, weight_dtype)
    return noise_scheduler, text_encoders, vae, denoiser


def load_single_file(source: ModelSource, adapter, tokenizers: list, noise_scheduler,
                     weight_dtype: torch.dtype) -> tuple[list, object, object]:
    """The text encoder(s), VAE and UNet of an original-layout checkpoint, through diffusers' from_single_file with
    the source's configs; the tokenizers and scheduler already loaded are passed in, so nothing else is fetched."""
    import diffusers

    parts = {name: tokenizer for (name, _), tokenizer in zip(adapter.tokenizers, tokenizers)}
    parts.update(adapter.pipeline_extras, scheduler=noise_scheduler)
    try:
        # In the compute dtype (fp16 too: single files store the VAE in fp16 or fp32; under fp16 it is upcast again
        # by freeze_and_place, as its config asks).
        pipeline = getattr(diffusers, adapter.pipeline).from_single_file(str(source.checkpoint), config=source.config,
                                                                          torch_dtype=weight_dtype, **parts)
    except (KeyError, RuntimeError, AttributeError, TypeError) as e:  # keys or shapes that do not fit the configs
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"--pretrained_model_name_or_path {source.checkpoint}: its weights do not fit the configs of "
                         f"{source.config} ({detail}); give --single_file_config, the diffusers folder of this "
                         "model's type") from None
    text_encoders = [getattr(pipeline, name) for name, _ in adapter.text_encoders]
    return text_encoders, pipeline.vae, getattr(pipeline, adapter.denoiser[0])


def load_transformer_file(source: ModelSource, adapter, weight_dtype: torch.dtype):
    """The SD3 or Flux transformer from --transformer_file (fp8 files too: upcast to the compute dtype as they load),
    configured by the pipeline's transformer/config.json."""
    import diffusers

    try:
        return getattr(diffusers, adapter.denoiser[1]).from_single_file(
            str(source.transformer_file), config=source.config, subfolder=adapter.denoiser[0],
            config_revision=source.revision, torch_dtype=weight_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"--transformer_file {source.transformer_file}: it does not load into the transformer of "
                         f"{source.config} ({detail}); give the transformer file of that model") from None


def load_tokenizers(source: ModelSource, adapter, tokenizer_name: str | None,
                    max_sequence_length: int | None) -> list:
    """The pipeline's tokenizer(s), one per text encoder; --tokenizer_name replaces a one-tokenizer pipeline's.
    A T5 tokenizer's window becomes --max_sequence_length (or the family's default)."""
    import transformers

    if tokenizer_name and len(adapter.tokenizers) > 1:
        raise UsageError("--tokenizer_name is for SD 1.x/2.x pipelines; the tokenizers of SDXL, SD3 and Flux come "
                         "from the pipeline")
    try:
        if tokenizer_name:
            return [transformers.CLIPTokenizer.from_pretrained(tokenizer_name)]
        tokenizers = [getattr(transformers, class_name).from_pretrained(source.config, subfolder=sub,
                                                                        revision=source.revision)
                      for sub, class_name in adapter.tokenizers]
    except (OSError, ValueError) as e:  # not found, offline, no tokenizer folder: say which, without a traceback
        if tokenizer_name:
            raise UsageError(f"--tokenizer_name {tokenizer_name}: cannot load it ({str(e).splitlines()[0]})") from None
        raise model_load_error(source, "its tokenizer", e) from None
    for (_, class_name), tokenizer in zip(adapter.tokenizers, tokenizers):
        if class_name.startswith("T5"):
            tokenizer.model_max_length = max_sequence_length or adapter.max_sequence_length
    return tokenizers


def pool_at_end_of_text(text_encoder, tokenizer) -> None:
    """Pool CLIP's output at the end-of-text token, not at the largest token id.

    Configs older than transformers' fix (eos_token_id 2, as in SD and SDXL) make CLIP pool at the largest id, which
    is a placeholder's once one is added. SDXL's UNet is conditioned on that pooled vector; SDXL was trained with it
    taken at end-of-text, and AUTOMATIC1111, ComfyUI and kohya take it there. SD 1.x/2.x do not use it.
    """
    if not text_encoder.config.model_type.startswith("clip"):  # T5 pools nothing
        return
    pooling_module = getattr(text_encoder, "text_model", text_encoder)  # where the model keeps its copy of the id
    text_encoder.config.eos_token_id = pooling_module.eos_token_id = tokenizer.eos_token_id


def vae_factor(config) -> int:
    """How much the VAE downsamples: 2 per block after the first (8 for every Stable Diffusion VAE)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_vae_factor(source: ModelSource, resolution: int, bucket_reso_steps: int | None,
                     latent_patch: int = 1) -> None:
    """--resolution must divide by the VAE's downsampling factor times the denoiser's patch (SD3's and Flux's 2x2);
    read from the VAE's config, before any weights load. `bucket_reso_steps`: with --enable_bucket only."""
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(source.config, subfolder="vae", revision=source.revision)
    except (OSError, ValueError) as e:
        raise model_load_error(source, "its vae config", e) from None
    factor = vae_factor(config) * latent_patch
    what = "the VAE's factor" if latent_patch == 1 else f"the VAE's factor x the {latent_patch}x{latent_patch} patches,"
    if resolution % factor:
        raise UsageError(f"--resolution {resolution} is not a multiple of {what} {factor}; "
                         f"use e.g. {max(resolution // factor, 1) * factor}")
    if bucket_reso_steps is not None and bucket_reso_steps % factor:
        raise UsageError(f"--bucket_reso_steps {bucket_reso_steps} is not a multiple of {what} {factor}")


# ---- Freezing and placing ---------------------------------------------------------------------------------------------
def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """Frozen weights run in the compute dtype; only the trainable vectors need fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def vae_dtype_for(weight_dtype: torch.dtype, vae) -> torch.dtype:
    """SD VAEs overflow to NaN in fp16 (their configs say `force_upcast`); bf16 has fp32's range and is safe."""
    return torch.float32 if weight_dtype == torch.float16 and vae.config.get("force_upcast", True) else weight_dtype


def without_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability (T5 has 0.1; CLIP none): a frozen encoder must compute what it computes at
    inference, while in train mode, the only mode in which transformers engages gradient checkpointing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # attention dropout kept as a probability
            module.dropout = 0.0


def enable_activation_checkpointing(text_encoder) -> None:
    """transformers >= 5 renamed gradient_checkpointing_enable (now a deprecated alias that warns); older ones only
    have the old name."""
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)
    (enable or text_encoder.gradient_checkpointing_enable)()


BASE_WEIGHT_DTYPES = ("fp8", "nf4")
# Never stored in 8 or 4 bits: T5's token table (the placeholder rows' neighbours; `shared` and its tied
# `embed_tokens`), its position buckets, every norm, and its feed-forward output `wo` (transformers keeps it out of
# quantization, `_keep_in_fp32_modules`: T5 casts that layer's input to the weight's dtype, which would round the
# activations to fp8, or wreck them as nf4's uint8). CLIP, the VAE and the vectors keep the compute dtype.
T5_SKIP_PATTERNS = ("shared", "embed_tokens", "relative_attention_bias", "norm", "wo")


def skip_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    """The module names --base_weight_dtype leaves alone in `model` (T5's; a denoiser knows its own)."""
    return T5_SKIP_PATTERNS if getattr(getattr(model, "config", None), "model_type", "") == "t5" else ()


def large_frozen_models(text_encoders, denoiser) -> list[torch.nn.Module]:
    """What --base_weight_dtype stores in 8 or 4 bits: the denoiser, and T5 where present."""
    return [denoiser] + [e for e in text_encoders if getattr(e.config, "model_type", "") == "t5"]


class Fp8SavedWeights:
    """What autograd keeps of an fp8-stored model's weights for the backward pass: a reference, upcast again when
    the backward pass needs it. Layerwise casting swaps each weight's data for an upcast copy during its layer's
    forward, and a frozen layer saves that weight (or `weight.t()`) for its input's gradient; kept, those copies
    would hold the whole model in the compute dtype until the backward pass, saving nothing over bf16."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {id(p): p for p in model.parameters() if p.dtype == torch.float8_e4m3fn}

    def pack(self, tensor: torch.Tensor):
        base = tensor if tensor._base is None else tensor._base
        weight = self.weights.get(id(base))
        if weight is None:
            return tensor
        return weight, tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        weight, dtype, size, stride, offset = packed
        return weight.to(dtype).as_strided(size, stride, offset)  # the same view, of a fresh upcast copy

    def install(self, model: torch.nn.Module) -> None:
        """Active during `model`'s forward pass only (also when it raises)."""
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        model.register_forward_pre_hook(lambda module, args: hooks.__enter__())
        model.register_forward_hook(lambda module, args, output: hooks.__exit__(None, None, None), always_call=True)


def fp8_recompute(saved: Fp8SavedWeights):
    """Gradient checkpointing for an fp8-stored model: inside a checkpointed block the model's own saved-tensor hooks
    do not reach, so a layer would keep its weight itself, fp8 again by the time its backward runs (a conv then
    fails on CPUs without AVX-512 and on CUDA). The block runs with Fp8SavedWeights' hooks, forward and recompute."""
    def recompute(function, *args, **kwargs):
        def hooked(*inner_args, **inner_kwargs):
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                return function(*inner_args, **inner_kwargs)
        return torch.utils.checkpoint.checkpoint(hooked, *args, use_reentrant=False, determinism_check="none",
                                                 **kwargs)
    return recompute


def cast_to_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """float8_e4m3fn storage, upcast to the compute dtype layer by layer (diffusers' layerwise casting)."""
    from diffusers.hooks import apply_layerwise_casting

    if hasattr(model, "enable_layerwise_casting"):  # a diffusers model knows its own layers to skip
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    else:
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        apply_layerwise_casting(model, torch.float8_e4m3fn, compute_dtype,
                                skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + skip_patterns(model))


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> Fp8SavedWeights:
    """cast_to_fp8, with the backward pass upcasting again instead of keeping the copies; returns the
    Fp8SavedWeights installed, which gradient checkpointing's recompute needs too (fp8_recompute)."""
    cast_to_fp8(model, compute_dtype)
    saved = Fp8SavedWeights(model)
    saved.install(model)
    return saved


@functools.cache
def nf4_linear_class():
    """bitsandbytes' Linear4bit, answering as nn.Linear does: in the autocast dtype under autocast (the validation
    images), where bitsandbytes would answer in the input's dtype, fp32 after an autocast norm, which then reaches
    layers with bf16 weights. A function, so bitsandbytes is imported only when used."""
    import bitsandbytes as bnb

    class Linear4bitNF4(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            device = x.device.type
            autocast = torch.is_autocast_enabled(device)
            return super().forward(x).to(torch.get_autocast_dtype(device) if autocast else x.dtype)

    return Linear4bitNF4


def store_in_nf4(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Every nn.Linear of `model` replaced by bitsandbytes' Linear4bit (4-bit NormalFloat, blocks of 64, as QLoRA,
    kohya and OneTrainer store it), computing in the compute dtype; returns how many. The same layer runs on a CPU
    and on CUDA (where diffusers' BitsAndBytesConfig would put it too, but that refuses to load without a GPU)."""
    import bitsandbytes as bnb

    replaced, skipped = 0, skip_patterns(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or any(p in child_name for p in skipped):
                continue
            layer = nf4_linear_class()(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.detach().to(compute_dtype), requires_grad=False,
                                             quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.detach().to(compute_dtype), requires_grad=False)
            setattr(module, child_name, layer.to(device))  # quantized as it moves to the device
            replaced += 1
    return replaced


def store_base_weights(model: torch.nn.Module, base_weight_dtype: str, compute_dtype: torch.dtype,
                       device: torch.device) -> Fp8SavedWeights | None:
    """--base_weight_dtype: a large frozen model's weights in 8 or 4 bits, computed in the compute dtype, then on
    the device. Stored so on the host first: moved in the compute dtype first, Flux's transformer would need its
    23.8 GB of bf16 on the GPU for a moment, and not fit the 24 GB card that fp8 and nf4 are for. Returns fp8's
    saved-weight hooks (None for nf4); moving keeps the parameters they hold, only their data moves."""
    saved = None
    if base_weight_dtype == "fp8":
        saved = store_in_fp8(model, compute_dtype)
    else:
        store_in_nf4(model, compute_dtype, device)
    model.to(device)  # dtypes kept: the fp8 weights stay fp8, the nf4 layers are there already
    return saved


def freeze_and_place(accelerator, args, text_encoders, vae, unet, weight_dtype: torch.dtype) -> None:
    """Freeze every model weight, move the models to the device in the compute dtype (T5-XXL too: 9.5 GB in bf16
    instead of 19), the large ones stored in 8 or 4 bits first if asked (--base_weight_dtype), set memory options.
    `unet` is the denoiser, UNet or transformer."""
    base_weight_dtype = getattr(args, "base_weight_dtype", None)
    large = large_frozen_models(text_encoders, unet) if base_weight_dtype else []
    fp8_saved = {}  # id(model): the Fp8SavedWeights it was stored with
    for model in (*text_encoders, vae, unet):
        model.requires_grad_(False)
        dtype = vae_dtype_for(weight_dtype, vae) if model is vae else weight_dtype
        if any(model is m for m in large):
            model.to(dtype=dtype)
            fp8_saved[id(model)] = store_base_weights(model, base_weight_dtype, weight_dtype, accelerator.device)
        else:
            model.to(accelerator.device, dtype=dtype)
    checkpointing = args.gradient_checkpointing
    vae.eval()
    for text_encoder in text_encoders:
        without_dropout(text_encoder)
        text_encoder.train()  # only lets gradient checkpointing engage
        if checkpointing:
            enable_activation_checkpointing(text_encoder)
    if checkpointing:
        # With fp8, the recompute's dtypes are not checked against the forward's (a saved weight is fp8 by reference,
        # bf16 when used): the vectors train bit for bit as without checkpointing (tests/test_base_weights.py).
        saved = fp8_saved.get(id(unet))
        unet.enable_gradient_checkpointing(None if saved is None else fp8_recompute(saved))
        unet.train()
    if args.enable_xformers_memory_efficient_attention:  # otherwise PyTorch SDPA, diffusers' default
        unet.enable_xformers_memory_efficient_attention()
    if args.compile_unet:
        # `from ... import`, not `import torch._inductor.config`: the latter would make `torch` a local name of this
        # whole function and break every other use of it here (it once broke --allow_tf32).
        from torch._inductor import config as inductor_config

        # With its channels-last layout pass, Inductor (torch 2.13, CPU) silently gets the gradient to the text
        # conditioning wrong through the UNet's nearest upsampling; tests/test_speed.py compares with eager.
        inductor_config.layout_optimization = False
        unet.compile()  # in place: the module stays a UNet2DConditionModel for validation and saving
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True


def load_pipeline(source: ModelSource, dtype: torch.dtype):
    """The whole inference pipeline of any source (examples/generate.py): from_pretrained, or from_single_file with
    the source's configs, with a --transformer_file's transformer in place."""
    import diffusers

    parts = {}
    if source.transformer_file is not None:
        class_name = {"StableDiffusion3Pipeline": "SD3Transformer2DModel", "FluxPipeline": "FluxTransformer2DModel"}
        parts["transformer"] = getattr(diffusers, class_name[source.pipeline]).from_single_file(
            str(source.transformer_file), config=source.config, subfolder="transformer",
            config_revision=source.revision, torch_dtype=dtype)
    if source.checkpoint is not None:
        return getattr(diffusers, source.pipeline).from_single_file(str(source.checkpoint), config=source.config,
                                                                     torch_dtype=dtype)
    return diffusers.DiffusionPipeline.from_pretrained(source.config, revision=source.revision,
                                                       variant=source.variant, torch_dtype=dtype, **parts)
