"""In-process runs of main() on the tiny pipeline: what trains, what stays frozen, what gets written and loaded."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import train_textual_inversion as tti
from conftest import watch_frozen_rows

VOCAB = 49408


def base_embedding(pipeline) -> torch.Tensor:
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").get_input_embeddings().weight.detach()


def test_frozen_rows_bit_identical_after_every_step_with_weight_decay(run_training, tiny_pipeline, monkeypatch):
    checks = watch_frozen_rows(monkeypatch, base_embedding(tiny_pipeline).clone())
    result = run_training("--adam_weight_decay", "0.5", "--max_train_steps", "3")
    assert checks == [True, True, True]
    assert result.history and len(result.history) == 3


def test_only_placeholder_vectors_are_trainable_and_they_move(run_training, tiny_pipeline, monkeypatch):
    seen = {}
    make = tti.make_optimizer_and_schedule

    def spy(args, embedding, *rest):
        optimizer, scheduler = make(args, embedding, *rest)
        seen["params"] = [p for g in optimizer.param_groups for p in g["params"]]
        return optimizer, scheduler

    monkeypatch.setattr(tti, "make_optimizer_and_schedule", spy)
    result = run_training("--num_vectors", "2")
    (param,) = seen["params"]
    assert param.shape == (2, 32) and param.dtype == torch.float32  # num_vectors x dim, not vocab x dim
    toy_id = 5988  # "toy</w>" in the CLIP vocabulary
    start = base_embedding(tiny_pipeline)[toy_id]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    for row in result.vectors:
        assert not torch.allclose(row, start), "placeholder vector did not move"


def test_learned_embeds_round_trip_in_diffusers(run_training, tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    for n in (1, 3):
        out = run_training("--num_vectors", str(n), out=tmp_path / f"n{n}").output_path.parent
        saved = load_file(out / "learned_embeds.safetensors")
        assert list(saved) == ["<cat-toy>"] and saved["<cat-toy>"].shape == (n, 32)
        assert saved["<cat-toy>"].dtype == torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
        pipe.load_textual_inversion(out)
        ids = pipe.tokenizer.convert_tokens_to_ids(tti.placeholder_token_names("<cat-toy>", n))
        assert ids == list(range(VOCAB, VOCAB + n))
        torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[VOCAB:].detach(),
                                   saved["<cat-toy>"])
        image = pipe("a photo of <cat-toy> on the beach", num_inference_steps=2, height=32, width=32,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        assert image.shape == (32, 32, 3) and (image >= 0).all() and (image <= 1).all()


def test_multi_vector_prompts_carry_every_token(tokenizer):
    ids = tti.add_placeholder_tokens(tokenizer, "<cat-toy>", 3)
    batch = tti.tokenize_templates(tokenizer, ["a photo of a {}"], "<cat-toy>", 3)
    assert [i for i in batch[0].tolist() if i >= VOCAB] == ids


def test_checkpoints_are_small_pruned_and_resumable(run_training, tmp_path):
    result = run_training("--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
    out = result.output_path.parent
    assert [step for step, _ in tti.list_checkpoints(out)] == [4, 6]
    size = sum(f.stat().st_size for f in (out / "checkpoint-6").iterdir())
    assert size < 20_000, f"a checkpoint should hold vectors and optimizer state only, not {size} bytes"
    state = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=False)
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.shape == (1, 32)  # AdamW state is num_vectors x dim


def test_resume_at_max_trains_nothing(run_training, tmp_path):
    out = run_training("--max_train_steps", "4", "--checkpointing_steps", "4").output_path.parent
    again = run_training("--max_train_steps", "4", "--resume_from_checkpoint", "latest", out=out)
    assert again.first_step == 4 and again.history == []
    assert torch.equal(again.vectors, load_file(out / "checkpoint-4" / "learned_embeds.safetensors")["<cat-toy>"])
    shorter = run_training("--max_train_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-4"), out=out)
    assert shorter.history == []


def test_resume_refuses_checkpoint_of_another_placeholder(run_training, tmp_path):
    out = run_training("--max_train_steps", "2", "--checkpointing_steps", "2").output_path.parent
    with pytest.raises(tti.UsageError, match="placeholder_token"):
        run_training("--placeholder_token", "<other>", "--resume_from_checkpoint", "latest", out=out)


def test_scale_lr_and_lr_schedule(run_training):
    result = run_training("--scale_lr", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2",
                          "--max_train_steps", "2")
    assert result.learning_rate == pytest.approx(1e-3 * 2 * 2 * 1)
    assert [h["lr"] for h in result.history] == pytest.approx([4e-3, 4e-3])


def test_gradient_checkpointing_gives_the_same_vectors(run_training, tmp_path):
    plain = run_training(out=tmp_path / "plain")
    checkpointed = run_training("--gradient_checkpointing", out=tmp_path / "ckpt")
    torch.testing.assert_close(checkpointed.vectors, plain.vectors, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_averages_micro_batches(run_training, tmp_path):
    # batch 2 x accumulation 2 sees the same 4 samples as batch 4 once the epoch plan is the same size.
    accumulated = run_training("--gradient_accumulation_steps", "2", "--max_train_steps", "2", out=tmp_path / "a")
    assert len(accumulated.history) == 2 and all(math.isfinite(h["loss"]) for h in accumulated.history)
    assert not torch.equal(accumulated.vectors, run_training("--max_train_steps", "2", out=tmp_path / "b").vectors)


def test_intermediate_saves_bin_format_and_full_pipeline(run_training, tiny_pipeline):
    from diffusers import StableDiffusionPipeline

    result = run_training("--save_steps", "2", "--no_safe_serialization", "--save_as_full_pipeline")
    out = result.output_path.parent
    final = torch.load(out / "learned_embeds.bin", weights_only=True)["<cat-toy>"]
    step2 = torch.load(out / "learned_embeds-steps-2.bin", weights_only=True)["<cat-toy>"]
    assert final.shape == step2.shape == (1, 32) and not torch.equal(final, step2)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    weight = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert pipe.tokenizer.convert_tokens_to_ids("<cat-toy>") == VOCAB
    assert torch.equal(weight[:VOCAB], base_embedding(tiny_pipeline))
    assert torch.equal(weight[VOCAB:], final)


def test_validation_grid_and_tensorboard_logs(run_training):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_training("--validation_prompt", "a photo of <cat-toy>", "--validation_steps", "2",
                          "--num_validation_images", "2", "--report_to", "tensorboard")
    out = result.output_path.parent
    from PIL import Image

    grid = Image.open(out / "validation" / "step-4.png")
    assert grid.size == (64, 64)  # a row per prompt (the reconstruction prompt first), 2 images of 32 px each
    events = EventAccumulator(str(out / "logs" / "textual_inversion"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert len(events.Images("validation")) >= 2


def test_style_templates_and_user_templates(run_training, tmp_path, monkeypatch):
    seen = []
    tokenize = tti.tokenize_prompts
    monkeypatch.setattr(tti, "tokenize_prompts", lambda tok, prompts, *a: seen.append(prompts) or
                        tokenize(tok, prompts, *a))
    run_training("--learnable_property", "style", "--max_train_steps", "1", out=tmp_path / "s")
    user = tmp_path / "templates.txt"
    user.write_text("# mine\na sketch of {}\n\n{} in a garden\n")
    run_training("--templates", str(user), "--max_train_steps", "1", out=tmp_path / "u")
    assert seen[0] == [t.format("<cat-toy>") for t in __import__("templates").imagenet_style_templates_small]
    assert seen[1] == ["a sketch of <cat-toy>", "<cat-toy> in a garden"]


def test_v_prediction_model_trains(tmp_path_factory, concept_dir, tmp_path):
    from make_tiny_pipeline import build_tiny_pipeline

    from conftest import train_argv

    pipe = build_tiny_pipeline(tmp_path_factory.mktemp("v") / "pipe", seed=1, prediction_type="v_prediction")
    result = tti.main(tti.parse_args(train_argv(pipe, concept_dir, tmp_path / "out")))
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_bf16_mixed_precision_keeps_fp32_vectors(run_training):
    result = run_training("--mixed_precision", "bf16", "--max_train_steps", "2")
    saved = load_file(result.output_path)["<cat-toy>"]
    assert saved.dtype == torch.float32 and torch.isfinite(saved).all()
    assert all(math.isfinite(h["loss"]) for h in result.history)
