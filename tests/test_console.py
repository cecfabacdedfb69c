"""What a run prints: the tqdm bar, the summary block and one line per save or validation; no library chatter."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT, notices_in, train_argv


def test_a_run_prints_its_own_lines_and_no_library_notices(tiny_pipeline, concept_dir, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(tiny_pipeline, concept_dir, out, "--save_steps", "2", "--checkpointing_steps", "2",
                      "--validation_prompt", "a photo of <cat-toy>", "--validation_steps", "2",
                      "--num_validation_images", "1", "--gradient_checkpointing", "--save_as_full_pipeline")
    proc = subprocess.run([sys.executable, "train_textual_inversion.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert notices_in(output) == []
    assert "Traceback" not in output and "Warning" not in output, output
    lines = [line for line in re.split(r"[\r\n]", output) if line.strip()]
    logged = [line for line in lines if " - INFO - " in line or " - WARNING - " in line]
    # One line for the processes, the memory plan, the latent cache, the summary, each of the two saving steps, the
    # result, and where the vectors ended up (a multi-line block).
    assert [line.split(" - ", 3)[-1].split(" ")[0] for line in logged] == [
        "1", "Memory", "Cached", "*****", "Step", "Step", "Saved", "Vectors"]
    assert re.search(r"Step 2: saved learned_embeds-steps-2.safetensors and cat-toy-steps-2.safetensors \(nearest "
                     r"words: vector 0: \S+, \S+, \S+, \S+, \S+\), checkpoint-2, validation/step-2.png \(val loss "
                     r"[0-9.]+; best so far\)", output), output
    assert any(line.startswith("Steps: 100%") for line in lines)
    assert "the prompt word there is 'cat-toy'" in output
