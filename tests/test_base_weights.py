"""Frozen weights in the compute dtype, and in 8 or 4 bits (--base_weight_dtype): what is stored how, that only the
vectors change, exact resume, and the gradient's agreement with bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import train_argv

import frozen_models
import train_textual_inversion as tti

needs_bnb = pytest.mark.skipif(not tti._importable("bitsandbytes"), reason="bitsandbytes is not installed")
MODES = ["fp8", pytest.param("nf4", marks=needs_bnb)]
BF16 = ["--mixed_precision", "bf16"]


def resident_anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon"))


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8")
def test_fp8_keeps_no_upcast_weights_for_the_backward_pass():
    """Layerwise casting alone keeps every layer's upcast weight until the backward pass (the whole model in bf16
    again); store_in_fp8 keeps references and upcasts again in backward, with the same gradient bit for bit."""
    from diffusers.hooks import apply_layerwise_casting

    def held_and_gradient(store):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(6)]).to(torch.bfloat16)
        store(model.requires_grad_(False))
        x = torch.randn(2, 4096, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        before = resident_anonymous_bytes()
        y = model(x)
        held = resident_anonymous_bytes() - before
        y.float().square().sum().backward()
        return held, x.grad

    copies = 6 * 4096 * 4096 * 2  # bytes; allocations this large are mapped and unmapped at once
    held, gradient = held_and_gradient(lambda m: frozen_models.store_in_fp8(m, torch.bfloat16))
    held_plain, gradient_plain = held_and_gradient(
        lambda m: apply_layerwise_casting(m, torch.float8_e4m3fn, torch.bfloat16))
    assert held_plain > 0.9 * copies and held < 0.3 * copies, (held_plain, held)
    assert torch.equal(gradient, gradient_plain)


def test_frozen_models_load_in_the_compute_dtype(tiny_flux_pipeline, monkeypatch):
    """No fp32 copy on the way: every floating weight comes out of loading already in bf16."""
    source = frozen_models.find_model_source(str(tiny_flux_pipeline))
    adapter = tti.model_family(source)
    tokenizers = frozen_models.load_tokenizers(source, adapter, None, None)
    cast = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: cast.append(self) or self)  # nothing casts
    _, encoders, vae, transformer = frozen_models.load_models(source, adapter, tokenizers, torch.bfloat16)
    dtypes = {p.dtype for model in (*encoders, vae, transformer) for p in model.parameters()}
    assert dtypes == {torch.bfloat16}, dtypes


@pytest.mark.parametrize("mode", MODES)
def test_base_weights_are_stored_in_8_or_4_bits_and_only_the_vectors_change(mode, tiny_flux_pipeline, concept_dir,
                                                                            tmp_path, watch_steps):
    """The transformer's and T5's linear layers are stored in fp8 or nf4; T5's and CLIP's token tables, the norms
    and the VAE stay bf16; every frozen row is bit-identical after every step; validation draws."""
    argv = train_argv(tiny_flux_pipeline, concept_dir, tmp_path / "out", *BF16, "--base_weight_dtype", mode,
                      "--resolution", "32", "--max_train_steps", "3", "--validation_prompt", "a photo of <cat-toy>",
                      "--validation_steps", "3", "--num_validation_images", "1", "--validation_inference_steps", "2")
    result = tti.main(tti.parse_args(argv))
    models = watch_steps["run"].models
    transformer, (clip, t5) = models.denoiser, [e.frozen for e in models.embeddings]
    q = transformer.transformer_blocks[0].attn.to_q
    t5_layer = watch_steps["run"].accelerator.unwrap_model(models.prompt_encoder).text_encoders[1]
    t5_q = t5_layer.encoder.block[0].layer[0].SelfAttention.q
    if mode == "fp8":
        assert q.weight.dtype == torch.float8_e4m3fn and t5_q.weight.dtype == torch.float8_e4m3fn
    else:
        import bitsandbytes as bnb

        assert isinstance(q, bnb.nn.Linear4bit) and isinstance(t5_q, bnb.nn.Linear4bit)
        assert q.weight.quant_type == "nf4" and q.weight.dtype == torch.uint8
    assert clip.weight.dtype == t5.weight.dtype == torch.bfloat16  # the token tables are never quantized
    # nor T5's feed-forward output, whose input T5 casts to that weight's dtype
    assert t5_layer.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    assert {p.dtype for p in models.vae.parameters()} == {torch.bfloat16}
    assert all(e.vectors.dtype == torch.float32 for e in models.embeddings)
    for step in watch_steps["frozen"]:
        for before, after in zip([e.frozen.weight for e in models.embeddings], step):
            assert torch.equal(before, after)
    assert len(watch_steps["frozen"]) == 3 and all(torch.isfinite(v).all() for v in result.embeds.values())
    assert (tmp_path / "out" / "validation" / "step-3.png").is_file()


@pytest.mark.parametrize("mode", MODES)
def test_resume_is_exact_in_each_mode(mode, tiny_pipeline, concept_dir, tmp_path):
    flags = [*BF16, "--base_weight_dtype", mode, "--checkpointing_steps", "2"]
    whole = tti.main(tti.parse_args(train_argv(tiny_pipeline, concept_dir, tmp_path / "whole", *flags)))
    tti.main(tti.parse_args(train_argv(tiny_pipeline, concept_dir, tmp_path / "cut", *flags, "--max_train_steps", "2")))
    resumed = tti.main(tti.parse_args(train_argv(tiny_pipeline, concept_dir, tmp_path / "cut", *flags,
                                                 "--resume_from_checkpoint", "latest")))
    assert resumed.first_step == 2 and torch.equal(resumed.vectors, whole.vectors)


@pytest.mark.parametrize("mode", MODES)
def test_the_vectors_move_as_in_bf16(mode, tiny_pipeline, concept_dir, tmp_path):
    """The change of the vectors after a few steps points the way bf16's does: what 8 or 4 bits cost in the
    gradient, as the cosine of the two changes."""
    steps = ["--max_train_steps", "4", "--learning_rate", "1e-3"]
    bf16 = tti.main(tti.parse_args(train_argv(tiny_pipeline, concept_dir, tmp_path / "bf16", *BF16, *steps)))
    low = tti.main(tti.parse_args(train_argv(tiny_pipeline, concept_dir, tmp_path / mode, *BF16, *steps,
                                             "--base_weight_dtype", mode)))
    initial = initial_vectors(tiny_pipeline)
    cosine = torch.nn.functional.cosine_similarity((bf16.vectors - initial).flatten(),
                                                   (low.vectors - initial).flatten(), dim=0)
    assert cosine > 0.85, cosine  # measured here: fp8 0.962, nf4 0.908


def initial_vectors(pipeline) -> torch.Tensor:
    """The initializer's ("toy") vector as the bf16 run starts from it."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder", dtype=torch.bfloat16)
    ids = tti.initializer_token_ids(tokenizer, "toy")
    return tti.initial_vectors(encoder.get_input_embeddings().weight, ids, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_gradient_checkpointing_recomputes_through_8_and_4_bit_layers(mode, family, tiny_pipeline, tiny_flux_pipeline,
                                                                      concept_dir, tmp_path):
    """Recomputed through fp8's layerwise casting or bitsandbytes' layers, the vectors are what a run without
    checkpointing gives: a UNet (convs keep their weights themselves) and Flux with T5 (fp8's T5 once trained far
    from it: its `wo` rounded its input to fp8). Measured here: bit-identical for fp8, within bf16's rounding for
    nf4."""
    pipeline = tiny_pipeline if family == "sd" else tiny_flux_pipeline
    flags = [*BF16, "--base_weight_dtype", mode, "--resolution", "32", "--max_train_steps", "2"]
    plain = tti.main(tti.parse_args(train_argv(pipeline, concept_dir, tmp_path / "plain", *flags)))
    recomputed = tti.main(tti.parse_args(train_argv(pipeline, concept_dir, tmp_path / "gc", *flags,
                                                    "--gradient_checkpointing")))
    for key in plain.embeds:
        if mode == "fp8":
            assert torch.equal(recomputed.embeds[key], plain.embeds[key])
        else:
            torch.testing.assert_close(recomputed.embeds[key], plain.embeds[key], rtol=0, atol=5e-3)


def test_base_weight_dtype_flags_are_checked(tiny_pipeline, concept_dir, tmp_path, monkeypatch):
    base = train_argv(tiny_pipeline, concept_dir, tmp_path / "out")
    parse = tti.build_parser().parse_args
    assert "contradict" in tti.validate_args(parse([*base, "--fp8_base", "--base_weight_dtype", "nf4"]))
    assert "--save_as_full_pipeline" in tti.validate_args(parse([*base, "--fp8_base", "--save_as_full_pipeline"]))
    assert tti.validate_args(parse([*base, "--fp8_base", "--gradient_checkpointing"])) is None
    args = parse([*base, "--fp8_base"])
    assert tti.validate_args(args) is None and args.base_weight_dtype == "fp8"
    monkeypatch.setattr(tti, "_importable", lambda module: module != "bitsandbytes")
    assert "pip install bitsandbytes" in tti.validate_args(parse([*base, "--base_weight_dtype", "nf4"]))
    monkeypatch.delattr(torch, "float8_e4m3fn")
    assert "float8" in tti.validate_args(parse([*base, "--base_weight_dtype", "fp8"]))
