"""benchmarks/gpu_check.sh in its dry mode (the CPU, tiny shapes), and the pieces it relies on on a lent GPU machine:
the choice of wheels to install, the compile cache's repair after an overrun, the SDXL-shaped pipeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

FORCED_OVERRUN = "sd15_bf16_compile"  # also the slowest part on a CPU: cutting it keeps this test short


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the real command, with one part's budget cut to 2 s so that it overruns."""
    out = tmp_path_factory.mktemp("gpu_check")
    start = time.time()
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--budget", f"{FORCED_OVERRUN}=2",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})  # this interpreter, wherever it is
    wall = time.time() - start
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, wall, report, (out / "gpu_check.md").read_text()


def parts(report: dict) -> dict:
    return {p["name"]: p for p in report["parts"]}


def test_dry_run_runs_every_part_within_its_budget_and_two_minutes(dry_run):
    proc, wall, report, _ = dry_run
    assert wall < 120, proc.stdout
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not ok: one part overran
    assert report["mode"] == "dry" and not report["ok"]
    assert [p["name"] for p in report["parts"]] == gpu_check.PART_NAMES
    for part in report["parts"]:
        assert part["status"] in gpu_check.STATUSES
        assert 0 < part["elapsed_s"] <= part["budget_s"] + 1, part
    assert {name: p["status"] for name, p in parts(report).items() if p["status"] != "ok"} == {
        FORCED_OVERRUN: "overrun"}, proc.stdout


def test_an_overrun_part_is_recorded_and_the_parts_after_it_still_run(dry_run):
    proc, _, report, _ = dry_run
    names = gpu_check.PART_NAMES
    overrun = parts(report)[FORCED_OVERRUN]
    assert overrun["budget_s"] == 2 and 2 <= overrun["elapsed_s"] < 6 and "result" not in overrun
    assert f"{FORCED_OVERRUN}: OVERRUN" in proc.stdout
    after = report["parts"][names.index(FORCED_OVERRUN) + 1:]
    assert after and all(p["status"] == "ok" and p["result"]["step_s"] > 0 for p in after)


def test_every_part_prints_where_it_is(dry_run):
    proc, _, report, _ = dry_run
    total = gpu_check.TOTAL_S["dry"]
    for part in report["parts"]:  # a line as it starts and one as it ends, each with the time against the total
        budget = f"{part['budget_s']:g} s"
        title = re.escape(part["title"])
        assert re.search(rf"s of {total} s\] {part['name']}: {title}; budget {budget}\n", proc.stdout)
        assert re.search(rf"s of {total} s\] {part['name']}: (done|FAILED|OVERRUN) in [\d.]+ s of {budget}\n",
                         proc.stdout)


def test_cuda_tests_are_collected_and_skipped_on_the_cpu(dry_run):
    _, _, report, _ = dry_run
    counts = parts(report)["tests"]["result"]
    assert counts["passed"] == counts["failed"] == counts["errors"] == 0
    assert counts["skipped"] >= 10  # tests/test_cuda.py's, found through the marker


def test_each_row_reports_step_floor_ratio_peak_memory_and_startup(dry_run):
    _, _, report, _ = dry_run
    for row in gpu_check.ROWS:
        part = parts(report)[row.name]
        resolution, batch = gpu_check.SHAPES["dry"][row.family]
        assert (part["config"]["resolution"], part["config"]["batch_size"]) == (resolution, batch)
        assert part["config"]["variant"] == row.variant
        if row.name == FORCED_OVERRUN:
            continue
        r = part["result"]
        assert r["step_s"] > 0 and r["floor_s"] > 0 and r["ratio"] == pytest.approx(r["step_s"] / r["floor_s"])
        assert r["peak_bytes"] > r["weights_bytes"] > 0 and r["startup_s"] > 0
    fp16 = parts(report)["sd15_fp16"]
    assert fp16["config"]["mixed_precision"] == "no" and "fp16 needs CUDA" in fp16["note"]
    for family in ("sd15", "sdxl"):
        built = parts(report)[f"build_{family}"]["result"]
        assert built["params"] > 1e6 and built["bytes"] > built["params"]  # 2 bytes each at least (bf16)


def test_markdown_report_shows_every_part_and_the_numbers(dry_run):
    _, _, report, md = dry_run
    assert md.startswith("# GPU check, dry run")
    assert f"Machine: {report['machine']['device']}" in md
    for part in report["parts"]:
        assert f"| {part['name']} | {part['title']} | **{part['status']}** |" in md
    step = parts(report)["sdxl_bf16_gc"]["result"]["step_s"]
    assert f"| sdxl | 32 | 1 | bf16 | --gradient_checkpointing | {step:.3f} s |" in md
    assert "| sd15 | 32 | 2 | bf16 | --compile_unet | - |" in md and "overrun" in md


def test_only_the_wheels_the_machine_lacks_or_has_older_are_installed():
    installed = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "open-clip-torch": "3.4.0"}.get
    wheels = [".whl/diffusers-0.42.1-py3-none-any.whl", ".whl/transformers-5.24.0-py3-none-any.whl",
              ".whl/huggingface_hub-1.33.0-py3-none-any.whl", ".whl/open_clip_torch-3.3.0-py3-none-any.whl"]
    assert gpu_check.wheels_needed(wheels, installed) == wheels[:2]  # missing, older; not the same or newer


def test_after_an_overrun_only_libraries_cut_off_by_the_kill_leave_the_compile_cache(tmp_path):
    import numpy._core._umath_tests as extension  # any real shared library

    library = Path(extension.__file__).read_bytes()
    since = time.time() - 10
    files = {"whole": library, "cut": library[: len(library) // 2], "empty": b"", "older_cut": library[:100]}
    (tmp_path / "ab").mkdir()  # Inductor's layout: a folder per key prefix
    for name, data in files.items():
        (tmp_path / "ab" / f"{name}.so").write_bytes(data)
    os.utime(tmp_path / "ab" / "older_cut.so", (since - 60, since - 60))  # not this part's: left alone
    found = gpu_check.truncated_libraries(tmp_path, since)
    assert sorted(path.name for path in found) == ["cut.so", "empty.so"]


def test_sdxl_shaped_pipeline_has_sdxl_base_sizes():
    with torch.device("meta"):  # sizes without the 14 GB
        models = gpu_check.sdxl_models("full")
    sizes = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert sizes == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863,
                     "unet": 2_567_463_684}  # stable-diffusion-xl-base-1.0's components


def test_a_mistyped_budget_is_refused_before_anything_runs():
    with pytest.raises(SystemExit, match="PART=SECONDS"):
        gpu_check.main(["--budget", "sd15_bf16_compil=30"])
