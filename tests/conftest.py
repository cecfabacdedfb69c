"""Shared fixtures: a tiny SD pipeline (real CLIP tokenizer, random weights) and a small concept folder, built once."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Tests never reach a model hub: offline, a hub id fails at once instead of after ~20 s of retries. Set before
# huggingface_hub is first imported, which reads it then.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import train_textual_inversion as tti  # noqa: E402
from make_tiny_pipeline import build_tiny_pipeline  # noqa: E402


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what they will
def pytest_collection_modifyitems(config, items):
    """Start the GPU check's dry run (minutes of child processes) now if a test to run reads it: see DryRun."""
    if not config.option.collectonly and any("dry_run" in getattr(item, "fixturenames", ()) for item in items):
        import test_gpu_check

        test_gpu_check.started = test_gpu_check.DryRun()


def pytest_sessionfinish(session, exitstatus):
    test_gpu_check = sys.modules.get("test_gpu_check")
    if test_gpu_check is not None and test_gpu_check.started is not None:
        test_gpu_check.started.stop()


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny SD-1.x pipeline folder (epsilon prediction); treat as read-only."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_pipeline(tmp_path_factory) -> Path:
    """A tiny SD-2.x pipeline (OpenCLIP-style text encoder, v-prediction); treat as read-only."""
    from make_tiny_pipeline import build_tiny_sd2_pipeline

    return build_tiny_sd2_pipeline(tmp_path_factory.mktemp("tiny-sd2") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline (text encoders of width 32 and 48, legacy eos_token_id 2); treat as read-only."""
    from make_tiny_pipeline import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_sd15_layout_pipeline(tmp_path_factory) -> Path:
    """A tiny SD-1.x pipeline with SD 1.5's block layout (4-level UNet and VAE, 2 layers per level), which the
    original single-file layout assumes; read-only."""
    from make_tiny_pipeline import build_tiny_sd15_layout_pipeline

    return build_tiny_sd15_layout_pipeline(tmp_path_factory.mktemp("tiny-sd15") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_pipeline):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")


@pytest.fixture
def tokenizer(tiny_pipeline):
    """A fresh tokenizer per test: adding tokens mutates it."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory) -> Path:
    """A tiny SD-3-architecture pipeline (CLIP-L, CLIP-G and a tiny T5; flow matching); treat as read-only."""
    from make_tiny_pipeline import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tmp_path_factory) -> Path:
    """A tiny Flux.1-dev-architecture pipeline (CLIP-L pooled, a tiny T5, guidance embedding); treat as read-only."""
    from make_tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipe", seed=0)


@pytest.fixture
def concept_dir(tmp_path) -> Path:
    """A copy of the example concept images, safe to add files to."""
    folder = tmp_path / "concept"
    shutil.copytree(ROOT / "examples" / "concept", folder)
    return folder


@pytest.fixture
def watch_steps(monkeypatch):
    """What the runs that follow did, from the optimizer's side: each embedding's frozen matrix after every optimizer
    step ("frozen"), the initial vectors ("initial"), the AdamW groups' learning rates ("rates") and the Run ("run")."""
    seen = {"frozen": [], "initial": None, "rates": None, "run": None}
    make, train = tti.make_optimizer_and_schedule, tti.train

    def spy(args, embeddings, *rest):
        optimizer, scheduler = make(args, embeddings, *rest)
        seen["initial"] = [e.vectors.detach().clone() for e in embeddings]
        seen["rates"] = [group["lr"] for group in optimizer.param_groups]
        step = optimizer.step

        def step_and_record(*a, **k):
            out = step(*a, **k)
            seen["frozen"].append([e.frozen.weight.detach().clone() for e in embeddings])
            return out

        optimizer.step = step_and_record
        return optimizer, scheduler

    def keep_run(run, *rest):
        seen["run"] = run
        return train(run, *rest)

    monkeypatch.setattr(tti, "make_optimizer_and_schedule", spy)
    monkeypatch.setattr(tti, "train", keep_run)
    return seen


def watch_frozen_rows(monkeypatch, original) -> list[bool]:
    """After every optimizer step of the runs that follow: whether each text encoder's frozen embedding matrix still
    equals `original` bit for bit (one bool per step)."""
    import torch

    checks = []
    make = tti.make_optimizer_and_schedule

    def make_checked(args, embeddings, *rest):
        optimizer, scheduler = make(args, embeddings, *rest)
        step = optimizer.step

        def step_and_check(*a, **k):
            out = step(*a, **k)
            checks.append(all(torch.equal(e.frozen.weight, original) for e in embeddings))
            return out

        optimizer.step = step_and_check
        return optimizer, scheduler

    monkeypatch.setattr(tti, "make_optimizer_and_schedule", make_checked)
    return checks


def train_argv(pipeline: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A fast, deterministic command line for the tiny pipeline; `extra` overrides earlier flags."""
    return [
        "--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(data),
        "--placeholder_token", "<cat-toy>", "--initializer_token", "toy", "--output_dir", str(out),
        "--resolution", "32", "--train_batch_size", "2", "--repeats", "2", "--max_train_steps", "4",
        "--learning_rate", "5e-2", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none",
        *extra,
    ]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run must start from a clean slate."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def run_training(tiny_pipeline, concept_dir, tmp_path):
    """Run main() in-process; returns its TrainResult (`.output_path.parent` is the output folder)."""

    def run(*extra: str, out: Path | None = None) -> tti.TrainResult:
        return tti.main(tti.parse_args(train_argv(tiny_pipeline, concept_dir, out or tmp_path / "out", *extra)))

    return run


# Library notices seen in this project's runs that say nothing to its users (issue: "a quiet console"). Written out
# here rather than imported from the script, so that a change there cannot quietly loosen the test.
LIBRARY_NOTICES = (
    "requires torchvision",  # transformers' image processors
    "should be kept in float32",  # diffusers' ModelMixin.to() with an empty fp32 list
    "Loading weights",  # transformers' loading bar
    "Loading pipeline components",  # diffusers' loading bar (validation, generate.py)
    "multivariate normal distribution",  # transformers' mean resizing (load_textual_inversion)
    "local_dir_use_symlinks",  # huggingface_hub
    "Writing model shards",  # transformers' save bar (--save_as_full_pipeline)
    "gradient_checkpointing_enable",  # transformers' deprecation
    "Distributed environment:",  # accelerate's multi-line state dump
)


def notices_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(notice in line for notice in LIBRARY_NOTICES)]
