"""Embedding files in every app's format: reading them (examples/generate.py's load_learned_embeds, and the trainer's
--initial_embeddings, which starts from an embedding a user already has)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_embeddings(file: Path) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """`{token: tensor[n, dim]}`, or for the multi-encoder families `{token: {"clip_l": T, "clip_g": T, "t5": T}}`
    (SDXL without "t5", Flux.1 without "clip_g"), from every common format.

    diffusers `{token: T}`; AUTOMATIC1111 `.pt` (`string_to_param`); kohya/InvokeAI `{"emb_params": T}`; OneTrainer
    `{"emp_params": T}`; SDXL `{"clip_l": T, "clip_g": T}` (kohya, AUTOMATIC1111, ComfyUI, InvokeAI and this
    project's trainer); SD3 `{"clip_l", "clip_g", "t5"}` and Flux.1 `{"clip_l", "t5"}`, with the T5 vectors under
    "t5" (OneTrainer, diffusers' Flux script) and/or "t5xxl" (ComfyUI); "t5" wins when both are there. Files
    without a usable token name take it from the `placeholder_token` our trainer writes into a .safetensors'
    metadata or else, as in every app, from the file name ("my-toy.pt" -> "my-toy").
    """
    # Read the file ourselves (rather than handing load_textual_inversion the path) so we know the token names and
    # can accept files with several tokens; weights_only keeps a .pt/.bin from running arbitrary pickled code.
    metadata = {}
    if file.suffix == ".safetensors":
        state = load_file(file)
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {}
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    token = metadata.get("placeholder_token", file.stem)
    if "string_to_param" in state:
        return {file.stem: next(iter(state["string_to_param"].values())).float()}
    for key in ("emb_params", "emp_params"):
        if key in state:  # kohya's and InvokeAI's layout, also this trainer's <word> files
            return {token: state[key].float()}
    t5 = state.get("t5", state.get("t5xxl"))
    if "clip_l" in state and t5 is not None:  # SD3 (with clip_g) or Flux.1 (without)
        clips = {key: state[key].float() for key in ("clip_l", "clip_g") if key in state}
        return {token: {**clips, "t5": t5.float()}}
    if {"clip_l", "clip_g"} <= set(state):
        return {token: {"clip_l": state["clip_l"].float(), "clip_g": state["clip_g"].float()}}
    return state


def embedding_vectors(file: Path, encoder_names: tuple[str, ...]) -> list[torch.Tensor]:
    """One file's vectors per text encoder, in `encoder_names`' order (a one-encoder family's single name takes the
    bare tensor), each `[num_vectors, dim]` float32. ValueError, worded for the user, when the file holds several
    tokens, or another family's encoders, or unequal numbers of vectors."""
    embeds = read_embeddings(file)
    if len(embeds) != 1:
        raise ValueError(f"holds {len(embeds)} tokens ({', '.join(list(embeds)[:4])}); give a file with one")
    (token, value), = embeds.items()
    if not isinstance(value, (torch.Tensor, dict)):
        raise ValueError(f"holds no embedding vectors under {token!r}")
    if isinstance(value, torch.Tensor):
        value = {encoder_names[0]: value} if len(encoder_names) == 1 else {"one encoder": value}
    if set(value) != set(encoder_names):
        raise ValueError(f"has vectors for {'/'.join(value)}, but this model's text encoders are "
                         f"{'/'.join(encoder_names)}: an embedding for another model family")
    vectors = [value[name].float().reshape(-1, value[name].shape[-1]) for name in encoder_names]
    if len({len(v) for v in vectors}) > 1:
        raise ValueError(f"has {'/'.join(str(len(v)) for v in vectors)} vectors per encoder; they must be equal")
    return vectors


def embedding_rows(file: Path) -> int:
    """How many vectors the file's (first) token has: the --num_vectors it implies."""
    value = next(iter(read_embeddings(file).values()))
    tensor = next(iter(value.values())) if isinstance(value, dict) else value
    return tensor.shape[0] if tensor.ndim > 1 else 1
