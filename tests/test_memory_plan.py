"""The memory plan (memory_plan.py): components as stored in each mode, the traced step's activations, what fits,
and --plan_memory. The configs in benchmarks/configs carry the public models' shapes (no weights)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import train_argv

import memory_plan
import train_textual_inversion as tti

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"
GB = 1e9


def plan(config: str, family: str, resolution: int, mode=None, checkpointing=False, batch=1) -> memory_plan.MemoryPlan:
    adapter = tti.FAMILY_NAMES[family]
    images = tti.TrainingImages([torch.empty(3, resolution, resolution, dtype=torch.uint8)] * batch, None,
                                [(resolution, resolution)] * batch, [(0, 0)] * batch)
    request = memory_plan.PlanRequest(str(CONFIGS / config), adapter, resolution, batch, torch.bfloat16, mode,
                                      checkpointing, conditions=adapter.conditions(images, 3.5))
    return memory_plan.plan_memory(request)


def test_components_have_the_public_models_sizes():
    """SD 1.5: UNet 859.5 M, CLIP-L 123.1 M, VAE 83.7 M parameters; Flux.1-dev: transformer 11.9 B, T5-XXL 4.76 B;
    bf16 bytes are two per parameter."""
    sd = {c.name: c for c in plan("sd15", "sd", 512).components}
    assert round(sd["unet"].parameters / 1e6, 1) == 859.5 and round(sd["text_encoder"].parameters / 1e6, 1) == 123.1
    assert round(sd["vae"].parameters / 1e6, 1) == 83.7
    assert all(c.bytes == 2 * c.parameters and c.storage == "bf16" for c in sd.values())
    flux = {c.name: c for c in plan("flux1-dev", "flux", 512).components}
    assert round(flux["transformer"].parameters / 1e9, 2) == 11.90
    assert round(flux["text_encoder_2"].parameters / 1e9, 2) == 4.76


def test_8_and_4_bits_shrink_the_large_weights_only():
    """fp8 and nf4 store the transformer and T5 in about 1 and 0.52 bytes per weight, but for what is never stored
    so: norms, biases, token tables, T5's `wo`, and in fp8 what diffusers' layerwise casting skips (every module
    named `norm*`: in Flux the adaptive norms' modulation layers, 28% of its weights); CLIP and the VAE keep bf16."""
    bf16, fp8, nf4 = ({c.name: c for c in plan("flux1-dev", "flux", 512, mode).components}
                      for mode in (None, "fp8", "nf4"))
    for name in ("text_encoder", "vae"):
        assert bf16[name] == fp8[name] == nf4[name]
    transformer = [c["transformer"] for c in (bf16, fp8, nf4)]
    assert [c.storage for c in transformer] == ["bf16", "fp8", "nf4"]
    assert 0.62 < transformer[1].bytes / transformer[0].bytes < 0.65  # measured: 0.636
    assert 0.25 < transformer[2].bytes / transformer[0].bytes < 0.28  # ~0.52 of 2 bytes
    t5 = [c["text_encoder_2"].bytes for c in (bf16, fp8, nf4)]
    assert t5[0] > t5[1] > t5[2]
    unet = {mode: {c.name: c for c in plan("sd15", "sd", 512, mode).components}["unet"] for mode in (None, "fp8")}
    assert 0.5 < unet["fp8"].bytes / unet[None].bytes < 0.52  # ~1 of 2 bytes


def test_activations_grow_with_resolution_and_batch_and_checkpointing_cuts_them():
    low, high = plan("sd15", "sd", 256), plan("sd15", "sd", 512)
    assert 3 < high.activations / low.activations < 5  # 4x the latent cells (attention counted as fused, not L^2)
    assert 1.8 < plan("sd15", "sd", 256, batch=2).activations / low.activations < 2.2
    assert plan("sd15", "sd", 512, checkpointing=True).activations < high.activations / 3
    # fp8 keeps no upcast copies (frozen_models.Fp8SavedWeights): bf16's activations, to a few bytes
    assert abs(plan("sd15", "sd", 512, "fp8").activations - high.activations) < 1e-6 * high.activations


def test_the_summary_line_and_the_sum():
    result = plan("sdxl-base-1.0", "sdxl", 1024, "fp8", True)
    assert result.peak == result.weights + result.activations + result.overhead
    assert re.fullmatch(r"memory plan: peak ~\d+\.\d\d GB on cuda \(weights \d+\.\d\d GB, activations \d+\.\d\d GB\)",
                        result.lines()[-1])


def test_a_run_that_does_not_fit_names_the_flags_that_would():
    adapter = tti.FAMILY_NAMES["flux"]
    request = memory_plan.PlanRequest(str(CONFIGS / "flux1-dev"), adapter, 1024, 1, torch.bfloat16,
                                      conditions=torch.full((1,), 3.5))
    full = memory_plan.plan_memory(request)
    assert memory_plan.does_not_fit(full, request, int(full.peak) + 1, "cuda:0") is None
    line = memory_plan.does_not_fit(full, request, 24 * 1024**3, "cuda:0")  # a 24 GB card
    assert line.startswith("this run will not fit") and "24" in line
    smallest = memory_plan.plan_memory(memory_plan.PlanRequest(
        request.config, adapter, 1024, 1, torch.bfloat16, "nf4", True, conditions=request.conditions))
    # fp8 with checkpointing fits 24 GB when nf4 is not needed: the cheapest change that fits is named
    fp8 = memory_plan.plan_memory(memory_plan.PlanRequest(
        request.config, adapter, 1024, 1, torch.bfloat16, "fp8", True, conditions=request.conditions))
    expected = "--base_weight_dtype fp8 --gradient_checkpointing" if fp8.peak <= 24 * 1024**3 else \
        "--base_weight_dtype nf4 --gradient_checkpointing"
    assert f"add {expected} " in line
    nothing = memory_plan.does_not_fit(full, request, int(smallest.peak) - 1, "cuda:0")
    assert "no --gradient_checkpointing" in nothing and "--resolution" in nothing


def test_plan_memory_prints_the_plan_and_trains_nothing(tiny_flux_pipeline, concept_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny_flux_pipeline, concept_dir, out, "--mixed_precision", "bf16", "--resolution", "32",
                      "--base_weight_dtype", "fp8", "--plan_memory")
    assert tti.main(tti.parse_args(argv)) is None
    printed = capsys.readouterr().out.strip().splitlines()
    names = [line.split()[0] for line in printed[1:-3]]
    assert names == ["text_encoder", "text_encoder_2", "vae", "transformer"], printed
    assert "fp8" in printed[2] and "fp8" in printed[4] and "bf16" in printed[1]  # T5 and the transformer
    assert re.fullmatch(r"memory plan: peak ~\d+\.\d\d GB on cpu \(weights \d\.\d\d GB, activations \d\.\d\d GB\)",
                        printed[-1])
    assert not any(out.glob("*.safetensors")) and not (out / "checkpoint-1").exists()


def test_every_run_logs_its_plan(tiny_pipeline, concept_dir, tmp_path, capsys):
    tti.main(tti.parse_args(train_argv(tiny_pipeline, concept_dir, tmp_path / "out", "--max_train_steps", "1")))
    logged = capsys.readouterr().err
    assert len(re.findall(r"Memory plan: peak ~\d+\.\d\d GB on cpu \(weights \d\.\d\d GB, activations \d\.\d\d GB\) "
                          r"per process, from the configs\n", logged)) == 1, logged


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_too_large_for_the_gpu_stops_before_loading(tiny_pipeline, concept_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024**2, 80 * 1024**3))  # 1 MiB free
    with pytest.raises(tti.UsageError, match="will not fit"):
        tti.main(tti.parse_args(train_argv(tiny_pipeline, concept_dir, tmp_path / "out")))
    assert not (tmp_path / "out").exists()
