"""diffusers' own example tests (examples/textual_inversion/test_textual_inversion.py and
test_textual_inversion_sdxl.py, three each), pointed at this script: their command lines as written there, their
assertions.

Only what cannot travel is replaced: the hub's tiny pipelines by ours (built from configs; no hub here) and
docs/source/en/imgs by examples/concept. The command lines run in-process through main(parse_args(...)), which is
what `accelerate launch` runs; one of them also runs through `accelerate launch --config_file` with the basic config
diffusers' test base class writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import train_textual_inversion as tti

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_textual_inversion.py"
CONCEPT = ROOT / "examples" / "concept"

# The arguments shared by the three tests of each file, as diffusers writes them (f-string, then .split()).
COMMON = """
    --pretrained_model_name_or_path {model}
    --train_data_dir {data}
    --learnable_property object
    --placeholder_token <cat-toy>
    --initializer_token a
    --save_steps 1
    --num_vectors 2
    --resolution 64
    --train_batch_size 1
    --gradient_accumulation_steps 1
    --max_train_steps {steps}
    --learning_rate 5.0e-04
    --scale_lr
    --lr_scheduler constant
    --lr_warmup_steps 0
    --output_dir {tmpdir}
"""


def command_line(model: Path, tmpdir: Path, steps: int, extra: str = "") -> list[str]:
    return (COMMON.format(model=model, data=CONCEPT, steps=steps, tmpdir=tmpdir) + extra).split()


def run_main(argv: list[str]) -> None:
    try:
        tti.main(tti.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def checkpoints(tmpdir: Path) -> set[str]:
    return {x for x in os.listdir(tmpdir) if "checkpoint" in x}


@pytest.fixture(params=["sd", "sdxl"])
def model(request, tiny_pipeline, tiny_sdxl_pipeline) -> Path:
    """hf-internal-testing/tiny-stable-diffusion-pipe and tiny-sdxl-pipe, in their place."""
    return tiny_pipeline if request.param == "sd" else tiny_sdxl_pipeline


def test_textual_inversion(model, tmp_path):
    run_main(command_line(model, tmp_path, 2))
    # save_pretrained smoke test
    assert os.path.isfile(os.path.join(tmp_path, "learned_embeds.safetensors"))


def test_textual_inversion_checkpointing(model, tmp_path):
    run_main(command_line(model, tmp_path, 3, "--checkpointing_steps=1 --checkpoints_total_limit=2"))
    assert checkpoints(tmp_path) == {"checkpoint-2", "checkpoint-3"}


def test_textual_inversion_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(model, tmp_path):
    run_main(command_line(model, tmp_path, 2, "--checkpointing_steps=1"))
    assert checkpoints(tmp_path) == {"checkpoint-1", "checkpoint-2"}
    step_2 = load_file(tmp_path / "checkpoint-2" / "learned_embeds.safetensors")

    run_main(command_line(model, tmp_path, 2, """
        --checkpointing_steps=1
        --resume_from_checkpoint=checkpoint-2
        --checkpoints_total_limit=2
    """))
    # diffusers asserts {"checkpoint-2", "checkpoint-3"} here. Its loop tests `global_step >= max_train_steps` only
    # after a step, so resuming at step 2 of --max_train_steps 2 trains a third step, saves checkpoint-3 and prunes
    # checkpoint-1. Here a resume never trains past --max_train_steps: no step, no save, nothing pruned, and the
    # result is step 2's vectors, resolved from the bare name inside --output_dir as diffusers resolves it.
    assert checkpoints(tmp_path) == {"checkpoint-1", "checkpoint-2"}
    final = load_file(tmp_path / "learned_embeds.safetensors")
    assert all(torch.equal(final[key], step_2[key]) for key in step_2)


def test_a_diffusers_command_line_through_accelerate_launch(tiny_pipeline, tmp_path):
    """As diffusers' ExamplesTestsAccelerate runs it: `accelerate launch --config_file <write_basic_config>`."""
    from accelerate.utils import write_basic_config

    config = tmp_path / "default_config.yml"
    write_basic_config(save_location=str(config))
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(SCRIPT)]
    subprocess.run(launch + command_line(tiny_pipeline, out, 2), check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    vectors = load_file(out / "learned_embeds.safetensors")["<cat-toy>"]
    assert vectors.shape == (2, 32) and torch.isfinite(vectors).all()
