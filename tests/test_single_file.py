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
