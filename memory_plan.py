"""The memory plan: what a run will hold at its peak, computed before any weight loads.

Every component is built from its config on the meta device (shapes, no storage), stored as the run would store it
(compute dtype, fp8 or nf4), and the training step is traced there once: what autograd keeps for the backward pass
is what costs memory, and a meta forward pass shows exactly that, per family, resolution, batch and mode, in well
under a minute even for Flux. Attention is counted as fused attention (PyTorch's flash or memory-efficient kernels,
on CUDA and on CPU), which keeps its inputs, output and log-sum-exp, not the attention matrix.

Read by train_textual_inversion.py (the start-up log, the CUDA free-memory check, --plan_memory) and by
benchmarks/bench_memory.py (plan against measured peaks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from frozen_models import cast_to_fp8, large_frozen_models, skip_patterns

GB = 1e9
# nf4 bytes per weight: two 4-bit codes per byte, plus a uint8 absmax per block of 64 and an fp32 absmax per 256
# blocks (bitsandbytes' double quantization, Params4bit's default).
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# The units diffusers and transformers recompute under gradient checkpointing; with it, only their inputs stay.
CHECKPOINTED_UNITS = ("ResnetBlock2D", "Transformer2DModel", "JointTransformerBlock", "FluxTransformerBlock",
                      "FluxSingleTransformerBlock", "CLIPEncoderLayer", "T5Block")
# Beyond the tensors: the CUDA caching allocator's rounding and fragmentation (a share of the peak), and on a CPU
# the runtime itself (torch, diffusers and transformers imported: measured ~0.45 GB of anonymous memory here).
ALLOCATOR_MARGIN = 0.05
CPU_RUNTIME_BYTES = int(0.45 * GB)


@dataclass(frozen=True)
class ComponentPlan:
    name: str  # the pipeline's subfolder, e.g. "unet", "text_encoder_2"
    parameters: int
    storage: str  # "bf16", "fp8", "nf4", "fp32", ...
    bytes: int


@dataclass(frozen=True)
class PlanRequest:
    """What decides a run's memory: the model's configs, the family's adapter, and the flags that size a step."""

    config: str  # a diffusers pipeline folder or hub id (configs only are read)
    family: object  # the training script's adapter (text encoders, denoiser, encode, predict)
    resolution: int
    batch_size: int
    compute_dtype: torch.dtype
    base_weight_dtype: str | None = None  # None, "fp8" or "nf4"
    gradient_checkpointing: bool = False
    sequence_lengths: tuple[int, ...] = ()  # per text encoder; empty: CLIP's 77 and the family's T5 length
    conditions: torch.Tensor | None = None  # the family's per-image conditions for `batch_size` images
    num_vectors: int = 1
    revision: str | None = None
    device_type: str = "cuda"  # where the run will compute: "cuda" (allocated memory) or "cpu" (plus the runtime)


@dataclass(frozen=True)
class MemoryPlan:
    components: tuple[ComponentPlan, ...]
    activations: int  # what the training step keeps for its backward pass, plus its largest transient tensors
    overhead: int  # the allocator margin (CUDA) or the runtime (CPU)
    device_type: str

    @property
    def weights(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def peak(self) -> int:
        return self.weights + self.activations + self.overhead

    def lines(self) -> list[str]:
        """The plan as the start-up log and --plan_memory print it; the last line is the summary."""
        rows = [f"  {c.name:<16} {c.parameters / 1e6:9.1f} M parameters  {c.storage:>5}  {c.bytes / GB:6.2f} GB"
                for c in self.components]
        rows.append(f"  {'activations':<16} {'':>22}  {'':>5}  {self.activations / GB:6.2f} GB")
        what = "allocator margin" if self.device_type == "cuda" else "runtime"
        rows.append(f"  {what:<16} {'':>22}  {'':>5}  {self.overhead / GB:6.2f} GB")
        rows.append(self.summary())
        return rows

    def summary(self) -> str:
        return (f"memory plan: peak ~{self.peak / GB:.2f} GB on {self.device_type} (weights {self.weights / GB:.2f} "
                f"GB, activations {self.activations / GB:.2f} GB)")


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8"}


# ---- Components on the meta device ------------------------------------------------------------------------------------
def meta_components(request: PlanRequest) -> tuple[list, object, object]:
    """The text encoders, VAE and denoiser built from their configs, with no storage: (text encoders, vae,
    denoiser), each `.plan_name` set to its subfolder."""
    import diffusers
    import transformers

    text_encoders = []
    with torch.device("meta"):
        for subfolder, class_name in request.family.text_encoders:
            model_class = getattr(transformers, class_name)
            config = model_class.config_class.from_pretrained(request.config, subfolder=subfolder,
                                                              revision=request.revision)
            text_encoders.append(model_class._from_config(config, dtype=request.compute_dtype))
        vae_class = diffusers.AutoencoderKL
        vae = vae_class.from_config(vae_class.load_config(request.config, subfolder="vae", revision=request.revision))
        subfolder, class_name = request.family.denoiser
        denoiser_class = getattr(diffusers, class_name)
        denoiser = denoiser_class.from_config(denoiser_class.load_config(request.config, subfolder=subfolder,
                                                                         revision=request.revision))
    for (name, _), model in zip(request.family.text_encoders, text_encoders):
        model.plan_name = name
    vae.plan_name, denoiser.plan_name = "vae", subfolder
    vae_dtype = torch.float32 if request.compute_dtype == torch.float16 and vae.config.get("force_upcast", True) \
        else request.compute_dtype
    torch.nn.Module.to(vae, vae_dtype)  # nn.Module.to: diffusers' own would warn about fp32 modules on every plan
    torch.nn.Module.to(denoiser, request.compute_dtype)
    for model in (*text_encoders, vae, denoiser):
        model.requires_grad_(False)
    return text_encoders, vae, denoiser


def nf4_weights(model: torch.nn.Module) -> set[int]:
    """The ids of the weights store_in_nf4 would replace: every nn.Linear's, but the skipped ones."""
    skipped = skip_patterns(model)
    return {id(child.weight) for module in model.modules() for name, child in module.named_children()
            if isinstance(child, torch.nn.Linear) and not any(p in name for p in skipped)}


def component_plan(model: torch.nn.Module, nf4: bool) -> ComponentPlan:
    """Parameters and bytes as stored (after fp8's cast; nf4 counted from its block layout)."""
    in_nf4 = nf4_weights(model) if nf4 else set()
    size = sum(p.numel() * NF4_BYTES_PER_WEIGHT if id(p) in in_nf4 else p.numel() * p.element_size()
               for p in model.parameters())
    dtypes = {p.dtype for p in model.parameters()}
    storage = "nf4" if nf4 else "fp8" if torch.float8_e4m3fn in dtypes else DTYPE_NAMES.get(
        max(dtypes, key=lambda d: torch.empty((), dtype=d).element_size()), str(dtypes))
    return ComponentPlan(model.plan_name, sum(p.numel() for p in model.parameters()), storage, int(size))


# ---- The training step, traced ----------------------------------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """What PyTorch's fused attention keeps for backward (q, k, v, the output and the fp32 log-sum-exp): meta
    tensors of those shapes, so the trace counts them and never an L x L attention matrix."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("the plan only traces the forward pass")


def fused_attention(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


@dataclass
class _Trace:
    """Bytes autograd saves, split into checkpointable units (CHECKPOINTED_UNITS) and the rest."""

    parameters: set
    outside: int = 0
    unit_inputs: int = 0
    units: list = field(default_factory=list)  # bytes saved inside each unit
    largest: int = 0
    seen: set = field(default_factory=set)
    kept: list = field(default_factory=list)
    depth: int = 0

    def pack(self, tensor: torch.Tensor):
        # A view holds its base: a frozen layer keeps `weight.t()` for the input's gradient, which costs nothing
        # (the weight's own storage), unless fp8's layerwise casting made that weight an upcast copy.
        base = tensor if tensor._base is None else tensor._base
        if id(base) in self.parameters or id(base) in self.seen:
            return tensor
        self.seen.add(id(base))  # a tensor saved by several ops (q, k and v's input) is held once
        self.kept.append(base)  # alive until the trace ends, so no other tensor takes its id
        size = base.numel() * base.element_size()
        self.largest = max(self.largest, size)
        if self.depth:
            self.units[-1] += size
        else:
            self.outside += size
        return tensor

    def enter(self, module, inputs):
        if self.depth == 0:
            self.units.append(0)
            self.unit_inputs += sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
        self.depth += 1

    def leave(self, module, inputs, output):
        self.depth -= 1

    def activations(self, checkpointing: bool) -> int:
        """Kept for backward, plus the largest saved tensor twice over (its gradient and the next one's, in
        flight); under checkpointing only the units' inputs stay, and one unit is recomputed at a time."""
        if checkpointing:
            kept = self.outside + self.unit_inputs + max(self.units, default=0)
        else:
            kept = self.outside + sum(self.units)
        return kept + 2 * self.largest


@contextlib.contextmanager
def traced(models: list[torch.nn.Module], trace: _Trace):
    handles = [m.register_forward_pre_hook(trace.enter) for model in models for m in model.modules()
               if type(m).__name__ in CHECKPOINTED_UNITS]
    handles += [m.register_forward_hook(trace.leave) for model in models for m in model.modules()
                if type(m).__name__ in CHECKPOINTED_UNITS]
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(trace.pack, lambda t: t):
            yield
    finally:
        F.scaled_dot_product_attention = sdpa
        for handle in handles:
            handle.remove()


def sequence_lengths(request: PlanRequest, text_encoders) -> list[int]:
    if request.sequence_lengths:
        return list(request.sequence_lengths)
    return [request.family.max_sequence_length or 77 if getattr(e.config, "model_type", "") == "t5"
            else e.config.max_position_embeddings for e in text_encoders]


def training_step_activations(request: PlanRequest, text_encoders, vae, denoiser) -> int:
    """One forward pass of the prompt through the text encoders (the vectors' gradient flows back through them)
    and of a noisy latent through the denoiser, on the meta device, with every saved tensor counted."""
    batch, meta = request.batch_size, torch.device("meta")
    side = request.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    noisy = torch.empty(batch, vae.config.latent_channels, side, side, device=meta)
    models = (*text_encoders, denoiser)
    trace = _Trace({id(p) for m in models for p in m.parameters()})
    hooks = [e.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
             for e in text_encoders]  # the placeholder rows are trained: the gradient starts at the embeddings
    ids = [torch.zeros(batch, n, dtype=torch.long, device=meta) for n in sequence_lengths(request, text_encoders)]
    conditions = None if request.conditions is None else request.conditions.to(meta)
    try:
        with traced([*text_encoders, denoiser], trace):
            hidden, pooled = request.family.encode(text_encoders, ids)
            timesteps = torch.zeros(batch, device=meta)
            request.family.predict(denoiser, noisy, timesteps, hidden, pooled, conditions, request.compute_dtype)
    finally:
        for hook in hooks:
            hook.remove()
    return trace.activations(request.gradient_checkpointing)


def plan_memory(request: PlanRequest) -> MemoryPlan:
    """The plan for one run: components as stored, the traced step's activations, and the margin."""
    text_encoders, vae, denoiser = meta_components(request)
    mode = request.base_weight_dtype
    large = {id(m) for m in large_frozen_models(text_encoders, denoiser)} if mode else set()
    for model in (*text_encoders, denoiser):
        if mode == "fp8" and id(model) in large:
            # Without store_in_fp8's saved-weight hooks, which would hide the trace; they keep only the fp8
            # weights themselves, as the trace counts them (parameters: weights, not activations).
            cast_to_fp8(model, request.compute_dtype)
    components = [component_plan(m, mode == "nf4" and id(m) in large) for m in (*text_encoders, vae, denoiser)]
    activations = training_step_activations(request, text_encoders, vae, denoiser)
    vectors = 4 * 4 * request.num_vectors * sum(e.get_input_embeddings().embedding_dim for e in text_encoders)
    activations += vectors  # fp32 vectors, their gradient and AdamW's two moments: kilobytes, for completeness
    tensors = sum(c.bytes for c in components) + activations
    overhead = int(ALLOCATOR_MARGIN * tensors) if request.device_type == "cuda" else CPU_RUNTIME_BYTES
    return MemoryPlan(tuple(components), activations, overhead, request.device_type)


_PLANS: dict[tuple, MemoryPlan] = {}


def cached_plan(request: PlanRequest) -> MemoryPlan:
    """plan_memory, once per request and config version in a process (tests and sweeps call main many times)."""
    index = Path(request.config, "model_index.json")
    version = index.stat().st_mtime_ns if index.is_file() else None
    shape = None if request.conditions is None else tuple(request.conditions.shape)
    key = (request.config, version, request.family.name, request.resolution, request.batch_size,
           request.compute_dtype, request.base_weight_dtype, request.gradient_checkpointing,
           request.sequence_lengths, shape, request.num_vectors, request.revision, request.device_type)
    if key not in _PLANS:
        _PLANS[key] = plan_memory(request)
    return _PLANS[key]


# ---- What fits --------------------------------------------------------------------------------------------------------
def remedies(request: PlanRequest) -> list[tuple[str, PlanRequest]]:
    """Flag changes that shrink a run, cheapest in quality and speed first: checkpointing (recompute, ~30% slower),
    8-bit then 4-bit frozen weights, then one image per step, each added to the ones before."""
    from dataclasses import replace

    steps, flags, current = [], [], request
    if not request.gradient_checkpointing:
        flags, current = [*flags, "--gradient_checkpointing"], replace(current, gradient_checkpointing=True)
        steps.append((" ".join(flags), current))
    if request.base_weight_dtype is None:
        steps.append((" ".join(["--base_weight_dtype fp8", *flags]), replace(current, base_weight_dtype="fp8")))
    if request.base_weight_dtype != "nf4":
        flags, current = ["--base_weight_dtype nf4", *flags], replace(current, base_weight_dtype="nf4")
        steps.append((" ".join(flags), current))
    if request.batch_size > 1:
        steps.append((" ".join([*flags, "--train_batch_size 1"]), replace(current, batch_size=1,
                                                                          conditions=_first(current.conditions))))
    return steps


def _first(conditions: torch.Tensor | None) -> torch.Tensor | None:
    return None if conditions is None else conditions[:1]


def does_not_fit(plan: MemoryPlan, request: PlanRequest, free_bytes: int, device: str) -> str | None:
    """None if the plan fits `free_bytes`; otherwise one line naming the flags that would make it fit."""
    if plan.peak <= free_bytes:
        return None
    line = (f"this run will not fit: its memory plan needs ~{plan.peak / GB:.1f} GB, {device} has "
            f"{free_bytes / GB:.1f} GB free")
    for flags, smaller in remedies(request):
        smaller_plan = cached_plan(smaller)
        if smaller_plan.peak <= free_bytes:
            return f"{line}; add {flags} (plan ~{smaller_plan.peak / GB:.1f} GB), or see --plan_memory"
    return (f"{line}, and no --gradient_checkpointing / --base_weight_dtype / --train_batch_size change fits: "
            "lower --resolution, or use a larger card (see --plan_memory)")
