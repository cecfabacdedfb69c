"""Nothing lost: interruption, SIGKILL at any moment, exact resume, numerical faults, failing ranks."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_textual_inversion as tti
from conftest import ROOT, train_argv
from test_multiprocess import ACCELERATE, two_ranks


def start_cli(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train_textual_inversion.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` (a glob pattern allowed in its name) exists, failing if the process dies first."""
    deadline = time.time() + timeout
    while not list(path.parent.glob(path.name)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def all_outputs_load(out: Path) -> int:
    """Every learned_embeds file and every checkpoint that resume could pick loads; returns how many were checked."""
    checked = 0
    for path in out.glob("learned_embeds*.safetensors"):
        assert torch.isfinite(load_file(path)["<cat-toy>"]).all()
        checked += 1
    identity = {"placeholder_token": "<cat-toy>", "num_vectors": 1}
    for _, path in tti.list_checkpoints(out):
        tti.load_checkpoint(path, identity)
        checked += 1
    return checked


@pytest.mark.parametrize("extra", [
    ("--lr_scheduler", "cosine", "--lr_warmup_steps", "3"),  # mid-epoch, warmup + cosine
    ("--gradient_accumulation_steps", "3", "--lr_scheduler", "linear"),  # 4 batches/epoch: steps of 3 and 1
    ("--repeats", "3", "--train_batch_size", "5", "--adam_weight_decay", "0.3"),  # short last batch
], ids=["cosine-warmup", "accumulation", "repeats-short-batch"])
def test_resume_from_any_checkpoint_is_bit_identical(run_training, tmp_path, extra):
    args = ("--max_train_steps", "7", "--checkpointing_steps", "1", *extra)
    whole = run_training(*args, out=tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", cut / "checkpoint-3")
    resumed = run_training(*args, "--resume_from_checkpoint", "latest", out=cut)
    assert resumed.first_step == 3
    assert torch.equal(resumed.vectors, whole.vectors)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history[3:]]


def test_sigkill_then_resume_latest_equals_the_run_left_alone(tiny_pipeline, concept_dir, tmp_path, run_training):
    argv = train_argv(tiny_pipeline, concept_dir, tmp_path / "killed", "--max_train_steps", "8",
                      "--checkpointing_steps", "3")
    proc = start_cli(argv)
    wait_for(tmp_path / "killed" / "checkpoint-3", proc)
    proc.kill()
    proc.wait()
    resumed = tti.main(tti.parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    assert resumed.first_step in (3, 6)
    whole = run_training("--max_train_steps", "8", "--checkpointing_steps", "3", out=tmp_path / "whole")
    assert torch.equal(resumed.vectors, whole.vectors)


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_only_loadable_files(tiny_pipeline, concept_dir, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(tiny_pipeline, concept_dir, out, "--max_train_steps", "100000", "--save_steps", "1",
                      "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    checked = 0
    for delay in (0.0, 0.019, 0.041):  # each round is a fresh process (~9 s here)
        proc = start_cli([*argv, "--resume_from_checkpoint", "latest"])
        wait_for(out / "learned_embeds-steps-*.safetensors", proc)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        checked += all_outputs_load(out)
        for stale in out.glob("learned_embeds-steps-*"):
            stale.unlink()  # so the next round waits for fresh saves
    assert checked > 6


def test_sigint_saves_prints_the_resume_command_and_resumes_exactly(tiny_pipeline, concept_dir, tmp_path,
                                                                     run_training):
    out = tmp_path / "out"
    proc = start_cli(train_argv(tiny_pipeline, concept_dir, out, "--max_train_steps", "100000", "--save_steps", "1"))
    wait_for(out / "learned_embeds-steps-2.safetensors", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    (step,) = [n for n, _ in tti.list_checkpoints(out)]
    final = load_file(out / "learned_embeds.safetensors")["<cat-toy>"]
    assert torch.equal(final, load_file(out / f"checkpoint-{step}" / "learned_embeds.safetensors")["<cat-toy>"])
    command = stderr[stderr.index("Resume with:"):].splitlines()[1].strip()
    words = shlex.split(command)
    assert words[:3] == ["accelerate", "launch", "train_textual_inversion.py"]
    assert words[-2:] == ["--resume_from_checkpoint", "latest"]
    resumed = tti.main(tti.parse_args([*words[3:], "--max_train_steps", str(step + 2)]))
    whole = run_training("--max_train_steps", str(step + 2), out=tmp_path / "whole")
    assert resumed.first_step == step and torch.equal(resumed.vectors, whole.vectors)


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tiny_pipeline, concept_dir, tmp_path):
    out = tmp_path / "out"
    # 64 micro-batches a step (--repeats fills the epoch), so the second signal lands while the step still runs.
    proc = start_cli(train_argv(tiny_pipeline, concept_dir, out, "--max_train_steps", "100000", "--save_steps", "1",
                                "--gradient_accumulation_steps", "64", "--repeats", "64"))
    wait_for(out / "learned_embeds-steps-1.safetensors", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Resume with" not in stderr  # it did not wait for the step to finish and save
    all_outputs_load(out)


def test_nan_loss_stops_keeps_last_good_vectors_and_says_what_to_do(run_training, tmp_path, monkeypatch):
    real = tti.training_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(tti, "training_loss", poisoned)
    with pytest.raises(tti.TrainingStopped, match="--learning_rate") as stopped:
        run_training("--max_train_steps", "6")
    assert stopped.value.exit_code == 1
    out = tmp_path / "out"
    assert not (out / "learned_embeds.safetensors").exists()  # a diverged run is never saved as a result
    kept = load_file(out / "learned_embeds-steps-2.safetensors")["<cat-toy>"]
    assert torch.isfinite(kept).all()


@pytest.mark.slow
def test_a_failing_rank_takes_the_others_down(tiny_pipeline, concept_dir, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    start = time.time()
    proc = subprocess.run(
        [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "tests/launch_main.py", str(results),
         *train_argv(tiny_pipeline, concept_dir, tmp_path / "out", "--max_train_steps", "50")],
        cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "1", "TEST_FAIL_RANK": "1"}, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert time.time() - start < 120, "the healthy rank hung instead of going down"
    assert not list(results.iterdir())


def concept_with_captions_masks_and_sizes(folder: Path) -> list[str]:
    """The example concept given captions, masks (left half) and three shapes of image: flags that use them all."""
    from PIL import Image, ImageOps

    masks = folder.parent / "masks"
    masks.mkdir()
    for i, image in enumerate(sorted(folder.iterdir())):
        with Image.open(image) as opened:
            upright = ImageOps.exif_transpose(opened).convert("RGB")
        upright = upright.crop((0, 0, upright.width, upright.height // (1 + i % 3)))  # 1:1, 2:1, 3:1
        image.unlink()
        upright.save(folder / f"{image.stem}.png")
        mask = Image.new("L", upright.size, 0)
        mask.paste(255, (0, 0, upright.width // 2, upright.height))
        mask.save(masks / f"{image.stem}.png")
        (folder / f"{image.stem}.txt").write_text(f"{{}} number {i}")
    return ["--caption_extension", ".txt", "--mask_dir", str(masks), "--enable_bucket", "--resolution", "32",
            "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8", "--snr_gamma", "5",
            "--noise_offset", "0.1", "--max_grad_norm", "1.0", "--unmasked_weight", "0.1", "--unmasked_probability",
            "0.3", "--masked_prior_preservation_weight", "0.5",
            "--caption_dropout_rate", "0.5"]


def test_two_process_resume_is_bit_identical(tiny_pipeline, concept_dir, tmp_path):
    """With every input feature on (the plain path's resume is the in-process tests'; each launch costs ~15 s)."""
    extra_flags = concept_with_captions_masks_and_sizes(concept_dir)

    def run(out: Path, results: Path, *extra: str) -> dict:
        rank0, rank1 = two_ranks(results, train_argv(tiny_pipeline, concept_dir, out, "--max_train_steps", "5",
                                                     "--checkpointing_steps", "2", "--lr_scheduler", "cosine",
                                                     "--lr_warmup_steps", "2", *extra_flags, *extra))
        assert torch.equal(rank0["vectors"], rank1["vectors"])
        return rank0

    whole = run(tmp_path / "whole", tmp_path / "r1")
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    resumed = run(tmp_path / "cut", tmp_path / "r2", "--resume_from_checkpoint", "latest")
    assert torch.equal(resumed["vectors"], whole["vectors"])
    assert len(resumed["history"]) == 3 and all(math.isfinite(h["loss"]) for h in resumed["history"])
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"][2:]]


def test_resume_with_captions_masks_buckets_and_snr_is_bit_identical(run_training, concept_dir, tmp_path):
    extra = concept_with_captions_masks_and_sizes(concept_dir)
    args = ("--max_train_steps", "6", "--checkpointing_steps", "1", "--repeats", "3", *extra)
    whole = run_training(*args, out=tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", cut / "checkpoint-4")
    resumed = run_training(*args, "--resume_from_checkpoint", "checkpoint-4", out=cut)
    assert resumed.first_step == 4 and torch.equal(resumed.vectors, whole.vectors)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history[4:]]


@pytest.mark.slow
def test_ctrl_c_in_a_two_process_run_stops_both_at_one_step_with_one_checkpoint(tiny_pipeline, concept_dir, tmp_path):
    """Ctrl-C reaches the launcher and both ranks (the terminal signals the whole process group)."""
    import re

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "train_textual_inversion.py",
         *train_argv(tiny_pipeline, concept_dir, out, "--max_train_steps", "100000", "--save_steps", "3",
                     "--checkpointing_steps", "100000")],
        cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    wait_for(out / "learned_embeds-steps-3.safetensors", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    stops = re.findall(r"stopped by signal 2 after step (\d+)", stderr)
    assert len(stops) == 2 and len(set(stops)) == 1, stderr[-3000:]  # both ranks, the same step
    step = int(stops[0])
    assert [path.name for path in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    state, embeds, _ = tti.load_checkpoint(out / f"checkpoint-{step}", {"placeholder_token": "<cat-toy>"})
    assert state["step"] == step
    assert torch.equal(load_file(out / "learned_embeds.safetensors")["<cat-toy>"], embeds["<cat-toy>"])
