"""Knowing which step to keep: telemetry, norm controls, validation scores, the best step, early stopping, report."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_textual_inversion as tti
import validation_report
from conftest import watch_frozen_rows
from test_training import base_embedding

TOY_ID = 5988  # "toy</w>" in the CLIP vocabulary: the tests' initializer


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, tiny_pipeline):
    """A random-weight transformers CLIPModel with its processor, saved as a hub model is."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def read_report(out) -> dict:
    return json.loads((out / "report.json").read_text())


# ---- helpers ---------------------------------------------------------------------------------------------------------
def embedding_with_rows(rows: torch.Tensor, vectors: torch.Tensor) -> tti.PlaceholderEmbedding:
    frozen = torch.nn.Embedding.from_pretrained(rows, freeze=True)
    return tti.PlaceholderEmbedding(frozen, len(rows), vectors)


def test_norm_ratio_is_over_the_median_of_the_rows_in_use_and_cosine_is_to_the_initializer():
    rows = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [100.0, 0, 0]])
    embedding = embedding_with_rows(rows, torch.tensor([[0.0, 4.0, 0], [3.0, 4.0, 0]]))
    embedding.set_reference_norm([0, 1, 2])  # row 3 (norm 100) is not in use: median of 1, 2, 3
    assert embedding.reference_norm == 2.0
    telemetry = embedding.telemetry()
    assert telemetry["norm_ratio"] == pytest.approx([2.0, 2.5])
    assert telemetry["cosine_to_init"] == pytest.approx([1.0, 1.0])
    with torch.no_grad():
        embedding.vectors[0] = torch.tensor([0.0, -4.0, 0])
        embedding.vectors[1] = torch.tensor([4.0, -3.0, 0])
    assert embedding.telemetry()["cosine_to_init"] == pytest.approx([-1.0, 0.0])


def test_vocabulary_ids_in_use_leave_out_specials_and_the_placeholder():
    ids = torch.tensor([[49406, 320, 1125, 539, 49408, 49409, 49407, 49407]])
    assert tti.vocabulary_ids_in_use(ids, [49406, 49407], 49408) == [320, 539, 1125]


def test_restoring_the_initial_norms_keeps_each_direction():
    start = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    embedding = embedding_with_rows(torch.eye(2), start)
    with torch.no_grad():
        embedding.vectors.copy_(torch.tensor([[6.0, 0.0], [1.0, 1.0]]))
    embedding.restore_initial_norms()
    torch.testing.assert_close(embedding.vectors.detach(), torch.tensor([[5.0, 0.0], [2 ** 0.5, 2 ** 0.5]]))


def test_pull_to_initial_is_the_mean_squared_distance_and_has_the_right_gradient():
    embedding = embedding_with_rows(torch.eye(2), torch.zeros(2, 2))
    with torch.no_grad():
        embedding.vectors.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    pull = embedding.pull_to_initial()
    assert pull.item() == pytest.approx((25 + 1) / 2)
    pull.backward()
    torch.testing.assert_close(embedding.vectors.grad, torch.tensor([[3.0, 4.0], [1.0, 0.0]]))  # 2 (v - v0) / 2


def test_nearest_words_reads_the_vocabulary(tiny_pipeline, tiny_tokenizer):
    weight = base_embedding(tiny_pipeline)
    red = tiny_tokenizer.convert_tokens_to_ids("red</w>")
    words = tti.nearest_words(torch.stack([weight[TOY_ID], weight[red] * 3]), weight, tiny_tokenizer)
    assert [row[0] for row in words] == ["toy", "red"] and all(len(row) == 5 for row in words)


def test_validation_prompts_from_flags_files_and_defaults(tmp_path):
    listed = tmp_path / "prompts.txt"
    listed.write_text("a <t> in the snow\n\n# a comment\na <t> on the moon\n")
    assert tti.read_validation_prompts(["a <t> at sea", str(listed)]) == [
        "a <t> at sea", "a <t> in the snow", "a <t> on the moon"]
    with pytest.raises(tti.UsageError, match="--validation_prompt .*missing.txt is not a file"):
        tti.read_validation_prompts([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(tti.UsageError, match="has no prompts"):
        tti.read_validation_prompts([str(tmp_path / "empty.txt")])
    assert tti.validation_prompts([], None, "<t>", "object", scored=False) == []
    assert tti.validation_prompts(["a <t> at sea"], None, "<t>", "object", False) == ["a photo of a <t>",
                                                                                        "a <t> at sea"]
    defaults = tti.validation_prompts([], "a <t> close up", "<t>", "style", scored=True)
    assert defaults[0] == "a <t> close up" and len(defaults) == 4 and all("<t>" in p for p in defaults)


def test_score_history_keeps_the_best_and_counts_validations_since():
    history = validation_report.ScoreHistory("rule")
    scores = [0.5, 0.7, 0.6, 0.7]
    changed = [history.add({"step": 100 * (i + 1), "clip_i": s, "clip_t": 0.0, "validation_loss": 0.1},
                           {"<t>": torch.full((1, 2), float(i))}) for i, s in enumerate(scores)]
    assert changed == [True, True, False, False]  # a tie is not an improvement: the earlier step stays
    assert history.best["step"] == 200 and history.validations_since_best() == 2
    assert torch.equal(history.best_embeds["<t>"], torch.full((1, 2), 1.0))
    again = validation_report.ScoreHistory.from_json(json.loads(json.dumps(history.to_json())), history.embeds)
    assert again.to_json() == history.to_json() and again.best_embeds is history.best_embeds


def test_the_rule_adds_clip_i_and_clip_t_and_falls_back_to_the_validation_loss():
    assert validation_report.step_score({"clip_i": 0.8, "clip_t": 0.3, "validation_loss": 0.2}) == pytest.approx(1.1)
    assert validation_report.step_score({"clip_i": None, "clip_t": None, "validation_loss": 0.2}) == -0.2


# ---- runs ------------------------------------------------------------------------------------------------------------
def test_norm_controls_keep_the_frozen_rows_and_do_what_they_say(run_training, tiny_pipeline, tmp_path, monkeypatch):
    original = base_embedding(tiny_pipeline).clone()
    start = original[TOY_ID]
    frozen_checks = watch_frozen_rows(monkeypatch, original)
    args = ("--max_train_steps", "8", "--num_vectors", "2")
    free = run_training(*args, out=tmp_path / "free")
    kept = run_training(*args, "--preserve_embedding_norm", out=tmp_path / "kept")
    pulled = run_training(*args, "--embedding_reg_weight", "1000", out=tmp_path / "pulled")
    assert frozen_checks == [True] * 24
    # Without control the vectors' norms drift; with it every step ends at the initializer's norm.
    assert (free.vectors.norm(dim=1) - start.norm()).abs().max() > 1e-3
    torch.testing.assert_close(kept.vectors.norm(dim=1), start.norm().expand(2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kept.vectors, start.expand(2, -1))  # the direction still learned
    # The pull keeps the vectors much nearer the initializer than the same run without it.
    distance = {name: (r.vectors - start).norm().item() for name, r in (("free", free), ("pulled", pulled))}
    assert distance["pulled"] < 0.5 * distance["free"], distance
    # The pull is not part of the logged loss (which stays comparable across weights): the first steps, before the
    # vectors differ, log the same loss.
    assert pulled.history[0]["loss"] == free.history[0]["loss"]
    # Telemetry per step and vector, for the trackers.
    assert kept.history[-1]["norm_ratio/<cat-toy>/1"] == pytest.approx(kept.history[0]["norm_ratio/<cat-toy>/1"])
    assert set(kept.history[0]) >= {"norm_ratio/<cat-toy>/0", "cosine_to_init/<cat-toy>/0", "loss", "lr"}


def test_the_validation_loss_uses_the_same_draws_at_every_validation(run_training, monkeypatch):
    calls = []
    loss = tti.training_loss

    def spy(batch, models, generator, timesteps=None):
        if timesteps is not None:
            calls.append((timesteps.tolist(), generator.initial_seed(), batch["image_index"].tolist()))
        return loss(batch, models, generator, timesteps)

    monkeypatch.setattr(tti, "training_loss", spy)
    validate_loss = tti.validation_loss

    def twice(models, ids, seed):
        first = validate_loss(models, ids, seed)
        assert validate_loss(models, ids, seed) == first  # deterministic: same vectors, same loss
        return first

    monkeypatch.setattr(tti, "validation_loss", twice)
    result = run_training("--max_train_steps", "4", "--validation_steps", "2")
    n = len(calls) // 4  # two validations, each computed twice
    assert n == 4 and calls[:n] == calls[n:2 * n] == calls[2 * n:3 * n] == calls[3 * n:]  # 4 concept images
    assert [c[2] for c in calls[:n]] == [[i] * 5 for i in range(4)]  # each image at 5 timesteps
    assert calls[0][0] == [100, 300, 500, 700, 900]
    report = read_report(result.output_path.parent)
    assert [v["step"] for v in report["validations"]] == [2, 4]
    assert report["validations"][0]["validation_loss"] != report["validations"][1]["validation_loss"]


def test_clip_scores_pick_a_best_step_whose_files_hold_that_steps_vectors(run_training, tiny_clip):
    result = run_training("--max_train_steps", "6", "--validation_steps", "2", "--save_steps", "2",
                          "--clip_model_name_or_path", str(tiny_clip), "--num_validation_images", "2",
                          "--validation_prompt", "a photo of <cat-toy> on the beach")
    out = result.output_path.parent
    report = read_report(out)
    assert report["rule"] == validation_report.SELECTION_RULE
    records = report["validations"]
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert -1 <= record["clip_i"] <= 1 and -1 <= record["clip_t"] <= 1
        assert record["prompts"] == ["a photo of a <cat-toy>", "a photo of <cat-toy> on the beach"]
        grid = Image.open(out / record["images"])
        assert grid.size == (2 * 32, 2 * 32)  # a row per prompt, an image per column
        assert record["score"] == pytest.approx(validation_report.step_score(record))
        assert len(record["nearest_words"]["<cat-toy>"][0]) == 5
    best = max(records, key=lambda r: r["score"])["step"]
    assert report["best"]["step"] == best
    saved = load_file(out / f"learned_embeds-steps-{best}.safetensors")["<cat-toy>"]
    assert torch.equal(load_file(out / "learned_embeds-best.safetensors")["<cat-toy>"], saved)
    assert torch.equal(load_file(out / "cat-toy-best.safetensors")["emb_params"], saved)  # the apps' copy
    with safe_open(out / "learned_embeds-best.safetensors", "pt") as f:
        assert f.metadata()["step"] == str(best)
    # learned_embeds.safetensors stays the last step, as in diffusers.
    assert torch.equal(load_file(out / "learned_embeds.safetensors")["<cat-toy>"], result.vectors)
    picture = Image.open(out / "report.png")
    assert picture.width > 400 and picture.height > 300


def test_early_stopping_stops_with_a_checkpoint_and_resumes(run_training, tmp_path, monkeypatch):
    # Every validation scores worse than the one before: the first stays the best.
    monkeypatch.setattr(validation_report, "step_score", lambda record: -record["step"])
    args = ("--max_train_steps", "12", "--validation_steps", "2", "--checkpointing_steps", "100")
    stopped = run_training(*args, "--early_stopping_patience", "2")
    out = stopped.output_path.parent
    assert len(stopped.history) == 6  # validations at 2, 4, 6: two without improvement after step 2
    report = read_report(out)
    assert report["best"]["step"] == 2 and report["stopped_early"]["step"] == 6
    assert [step for step, _ in tti.list_checkpoints(out)] == [6]
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        assert f.metadata()["step"] == "6"
    again = run_training(*args, "--early_stopping_patience", "2", "--resume_from_checkpoint", "latest", out=out)
    assert again.first_step == 6 and again.history == []
    longer = run_training(*args, "--early_stopping_patience", "5", "--resume_from_checkpoint", "latest", out=out)
    assert longer.first_step == 6 and len(longer.history) == 6
    report = read_report(out)
    assert [v["step"] for v in report["validations"]] == [2, 4, 6, 8, 10, 12] and report["stopped_early"] is None
    assert [s for s, _ in report["train_loss"]] == list(range(1, 13))


def test_resume_keeps_the_scores_and_rewrites_the_best_file(run_training, tmp_path, monkeypatch):
    monkeypatch.setattr(validation_report, "step_score", lambda record: -abs(record["step"] - 4))  # best: step 4
    args = ("--max_train_steps", "8", "--validation_steps", "2", "--checkpointing_steps", "2")
    whole = run_training(*args, out=tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", cut / "checkpoint-4")
    resumed = run_training(*args, "--resume_from_checkpoint", "latest", out=cut)
    assert resumed.first_step == 4 and torch.equal(resumed.vectors, whole.vectors)

    def without_timing(report):
        for record in report["validations"]:
            record.pop("seconds")
        return report

    assert without_timing(read_report(cut)) == without_timing(read_report(tmp_path / "whole"))
    best = load_file(tmp_path / "whole" / "learned_embeds-best.safetensors")["<cat-toy>"]
    assert torch.equal(load_file(cut / "learned_embeds-best.safetensors")["<cat-toy>"], best)
    # Had the run gone on past a checkpoint and saved another best, resuming puts the checkpoint's best back.
    shutil.rmtree(cut)
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", cut / "checkpoint-6")
    tti.save_learned_embeds({"<cat-toy>": torch.zeros_like(best)}, cut / "learned_embeds-best.safetensors")
    monkeypatch.setattr(tti, "validate", lambda run, step: pytest.fail("no validation is due before step 8"))
    run_training(*args, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", out=cut)
    assert torch.equal(load_file(cut / "learned_embeds-best.safetensors")["<cat-toy>"], best)


def test_bad_clip_model_and_patience_are_one_line_errors(run_training, tmp_path, tiny_pipeline, concept_dir):
    from conftest import train_argv

    with pytest.raises(SystemExit):
        tti.parse_args(train_argv(tiny_pipeline, concept_dir, tmp_path / "o", "--early_stopping_patience", "0"))
    with pytest.raises(tti.UsageError, match="--clip_model_name_or_path .* cannot be loaded as a transformers CLIP"):
        run_training("--clip_model_name_or_path", str(tiny_pipeline))  # a folder, but not a CLIP model


def test_which_step_replays_early_stopping_as_the_trainer_does(monkeypatch):
    """examples/toy_world/which_step.py judges early stopping by replaying report.json: its replay must stop where
    the trainer's ScoreHistory stops, and keep the same step."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "examples" / "toy_world"))
    import which_step

    scores = [0.5, 0.7, 0.6, 0.65, 0.8, 0.7, 0.75, 0.6, 0.9, 0.1]
    records = [{"step": 100 * (i + 1), "clip_i": s, "clip_t": 0.0, "validation_loss": 0.1}
               for i, s in enumerate(scores)]
    for patience in (1, 2, 3, 5):
        history, stop = validation_report.ScoreHistory("rule"), None
        for record in records:
            history.add(record, {"<t>": torch.zeros(1, 2)})
            if history.validations_since_best() >= patience and record["step"] < which_step.STEPS:
                stop = record["step"]
                break
        replayed = which_step.early_stop(records, patience)
        assert replayed == (stop or records[-1]["step"], history.best["step"]), patience


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_validation_prompts_carry_each_placeholder_token_once(request, family, concept_dir, tmp_path, monkeypatch):
    """A multi-vector token reaches the text encoder(s) as its N tokens, once each: the pipeline writes it out
    itself (as after load_textual_inversion), so the trainer must not expand it first."""
    from conftest import train_argv

    pipeline_dir = request.getfixturevalue("tiny_pipeline" if family == "sd" else "tiny_sdxl_pipeline")
    seen = []
    draw = tti.draw_validation_images

    def draw_and_watch(pipeline, *rest):
        encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family == "sdxl" else [])
        hooks = [e.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
            (kwargs.get("input_ids", args[0] if args else None)).tolist()), with_kwargs=True) for e in encoders]
        try:
            return draw(pipeline, *rest)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(tti, "draw_validation_images", draw_and_watch)
    tti.main(tti.parse_args(train_argv(pipeline_dir, concept_dir, tmp_path / "out", "--num_vectors", "3",
                                       "--max_train_steps", "1", "--num_validation_images", "1",
                                       "--validation_prompt", "a photo of a <cat-toy> on the beach")))
    prompt_rows = [row for batch in seen for row in batch if any(i >= 49408 for i in row)]
    assert prompt_rows  # the reconstruction and the edit prompt, in every text encoder
    for row in prompt_rows:
        assert sorted(i for i in row if i >= 49408) == [49408, 49409, 49410]
