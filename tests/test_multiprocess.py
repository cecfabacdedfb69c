"""Two CPU ranks of data-parallel training under a real `accelerate launch` (the one-process CLI launch is
tests/test_diffusers_examples.py's). Each launch costs ~15 s here, mostly imports: one launch checks several things."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, train_argv

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


def launch(args: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def two_ranks(results: Path, trainer_argv: list[str], **env: str) -> tuple[dict, dict]:
    """tests/launch_main.py on two CPU ranks; what each rank ended with, checked to be two ranks of one run."""
    results.mkdir(parents=True)
    launch([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "tests/launch_main.py", str(results), *trainer_argv],
           ACCELERATE_USE_CPU="1", **env)
    rank0, rank1 = (torch.load(results / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert rank0["num_processes"] == rank1["num_processes"] == 2  # not two world-size-1 runs
    return rank0, rank1


@pytest.mark.slow
def test_two_sdxl_ranks_sync_both_encoders_vectors_in_one_all_reduce(tiny_sdxl_pipeline, concept_dir, tmp_path):
    out = tmp_path / "out"
    rank0, rank1 = two_ranks(tmp_path / "results", train_argv(tiny_sdxl_pipeline, concept_dir, out, "--num_vectors", "2",
                                                              "--max_train_steps", "2"))
    assert rank0["synced_numels"] == [2 * (32 + 48)] * 2  # clip_l and clip_g vectors, nothing else
    saved = load_file(out / "learned_embeds.safetensors")
    for key in ("clip_l", "clip_g"):
        assert torch.equal(rank0["embeds"][key], rank1["embeds"][key]) and torch.equal(saved[key], rank0["embeds"][key])


@pytest.mark.slow
def test_two_flux_ranks_sync_the_learning_vectors_only(tiny_flux_pipeline, concept_dir, tmp_path):
    """CLIP-L's and T5's vectors (two AdamW groups) in one all-reduce, and nothing else."""
    out = tmp_path / "out"
    rank0, rank1 = two_ranks(tmp_path / "results", train_argv(tiny_flux_pipeline, concept_dir, out, "--num_vectors", "2",
                                                              "--max_train_steps", "2", "--text_encoders", "clip_l,t5"))
    assert rank0["synced_numels"] == [2 * (32 + 128)] * 2  # the learning vectors, nothing else, once per step
    saved = load_file(out / "learned_embeds.safetensors")
    for key in ("clip_l", "t5"):
        assert torch.equal(rank0["embeds"][key], rank1["embeds"][key])
        assert torch.equal(saved[key], rank0["embeds"][key])


def test_two_ranks_sync_only_the_vectors_agree_and_stop_early_together(tiny_pipeline, concept_dir, tmp_path):
    """The main process validates and decides; both ranks stop at the same step, having synced only the vectors,
    with the learning rate scaled by the world size and the loss logged as the mean over ranks."""
    out = tmp_path / "out"
    argv = train_argv(tiny_pipeline, concept_dir, out, "--num_vectors", "2", "--max_train_steps", "12", "--scale_lr",
                      "--learning_rate", "1e-3", "--validation_steps", "2", "--early_stopping_patience", "2",
                      "--preserve_embedding_norm", "--embedding_reg_weight", "0.5")
    rank0, rank1 = two_ranks(tmp_path / "results", argv, TEST_SCORE_BY_STEP="1")
    assert rank0["learning_rate"] == rank1["learning_rate"] == 1e-3 * 1 * 2 * 2  # x accumulation x batch x processes
    assert len(rank0["history"]) == len(rank1["history"]) == 6  # validations at 2, 4, 6; patience 2 after step 2
    assert rank0["history"] == rank1["history"]  # the logged loss is the mean over ranks
    assert torch.equal(rank0["vectors"], rank1["vectors"])
    assert rank0["synced_numels"] == [2 * 32] * 6  # one all-reduce per step, num_vectors x dim values
    report = json.loads((out / "report.json").read_text())
    assert report["stopped_early"]["step"] == 6 and report["best"]["step"] == 2


@pytest.mark.slow
def test_two_ranks_on_a_single_file_agree_with_the_file(tiny_sd15_layout_pipeline, concept_dir, tmp_path):
    """Both ranks load the original-layout file (through from_single_file) and train the same vectors."""
    from original_layout import sd_pipeline_to_original

    file = sd_pipeline_to_original(tiny_sd15_layout_pipeline, tmp_path / "my-model.safetensors")
    out = tmp_path / "out"
    rank0, rank1 = two_ranks(tmp_path / "results", train_argv(file, concept_dir, out, "--max_train_steps", "2",
                                                              "--single_file_config", str(tiny_sd15_layout_pipeline)))
    assert rank0["synced_numels"] == [32] * 2
    assert torch.equal(rank0["vectors"], rank1["vectors"])
    assert torch.equal(load_file(out / "learned_embeds.safetensors")["<cat-toy>"], rank0["vectors"])
