"""benchmarks/gpu_check.sh in its dry mode (the CPU, tiny shapes), and the pieces it relies on on a lent GPU machine:
the choice of wheels to install, the compile cache's repair after an overrun, an overrun row's measurements so far,
the exit status, the SDXL-shaped pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_step  # noqa: E402
import gpu_check  # noqa: E402

# Cut to 2 s each, so that they overrun: a row in the middle (the parts after it must still run), and the compiled
# row, last and the slowest on a CPU (80 s with an empty cache, 16 s warm: cutting it keeps this test short).
FORCED_OVERRUNS = ("sd15_bf16", "sd15_bf16_compile")


class DryRun:
    """One dry run of the real command with an empty compile cache, as on a fresh clone or a lent machine. It is
    ~2 minutes of child processes, mostly importing: conftest starts it when the tests that read it are collected,
    so it runs beside the rest of the suite rather than after it (its budgets leave room for a busy machine)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="gpu_check_dry_"))
        self.out, self.cache = self.folder / "out", self.folder / "compile_cache"
        self.cache.mkdir(parents=True)
        budgets = [arg for name in FORCED_OVERRUNS for arg in ("--budget", f"{name}=2")]
        self.start = time.time()
        self.proc = subprocess.Popen(
            ["bash", "benchmarks/gpu_check.sh", "--dry-run", *budgets, "--compile-cache", str(self.cache),
             str(self.out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHON": sys.executable})  # this interpreter, wherever it is

    def stop(self) -> None:
        """For a session that collected the tests reading it and then ran none of them: the parts run in sessions
        of their own, so the whole tree is killed, found through /proc (again, until none is left)."""
        while tree := self.tree():
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.poll()
            time.sleep(0.05)
        self.proc.communicate()
        shutil.rmtree(self.folder, ignore_errors=True)

    def tree(self) -> list[int]:
        """The live processes of the run: its own, if still running, and their descendants."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":  # a zombie is dead already, waiting for its parent
                    children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        tree = [self.proc.pid] if self.proc.poll() is None else []
        pending = [self.proc.pid]
        while pending:
            kids = children.get(pending.pop(), [])
            tree += kids
            pending += kids
        return tree

    def result(self):
        stdout, stderr = self.proc.communicate(timeout=gpu_check.TOTAL_S["dry"] + 60)
        wall = time.time() - self.start
        proc = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, stdout, stderr)
        report = json.loads((self.out / "gpu_check.json").read_text())
        return proc, wall, report, (self.out / "gpu_check.md").read_text(), self.cache


started: DryRun | None = None  # set by conftest's pytest_collection_modifyitems


@pytest.fixture(scope="module")
def dry_run():
    global started
    run = started or DryRun()
    started = None
    yield run.result()
    shutil.rmtree(run.folder, ignore_errors=True)


def parts(report: dict) -> dict:
    return {p["name"]: p for p in report["parts"]}


@pytest.mark.slow
def test_dry_run_with_an_empty_compile_cache_passes_within_its_time_though_rows_overran(dry_run):
    proc, wall, report, _, cache = dry_run
    assert wall < gpu_check.TOTAL_S["dry"] + 10, proc.stdout  # the check's own cap holds (wheel install included)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # overrun rows are measurements cut short, not failures
    assert report["compile_cache"] == {"path": str(cache), "cold": True}
    assert "compile cache cold (empty)" in proc.stdout
    assert report["mode"] == "dry" and report["passed"] and not report["ok"]
    assert report["failing"] == [] and report["not_fatal"] == list(FORCED_OVERRUNS)
    assert [p["name"] for p in report["parts"]] == gpu_check.PART_NAMES
    for part in report["parts"]:
        assert part["status"] in gpu_check.STATUSES
        assert 0 < part["elapsed_s"] <= part["budget_s"] + 1, part
    assert {name: p["status"] for name, p in parts(report).items() if p["status"] != "ok"} == {
        name: "overrun" for name in FORCED_OVERRUNS}, proc.stdout
    assert "finished: passed; not ok, not fatal: sd15_bf16, sd15_bf16_compile;" in proc.stdout


@pytest.mark.slow
def test_an_overrun_part_is_recorded_and_the_parts_after_it_still_run(dry_run):
    proc, _, report, _, _ = dry_run
    names = gpu_check.PART_NAMES
    for name in FORCED_OVERRUNS:
        overrun = parts(report)[name]
        assert overrun["budget_s"] == 2 and 2 <= overrun["elapsed_s"] < 6 and "result" not in overrun
        assert f"{name}: OVERRUN" in proc.stdout
        # 2 s is before the measuring process has loaded anything: what it measured so far is nothing, said so
        assert overrun["measured"]["phase"] in ("starting", "loading"), overrun
        assert overrun["summary"].endswith("nothing measured yet") and f"{name}: cut while" in proc.stdout
    after = report["parts"][names.index(FORCED_OVERRUNS[0]) + 1:-1]
    assert after and all(p["status"] == "ok" and p["result"]["step_s"] > 0 for p in after)


@pytest.mark.slow
def test_every_part_prints_where_it_is(dry_run):
    proc, _, report, _, _ = dry_run
    total = gpu_check.TOTAL_S["dry"]
    for part in report["parts"]:  # a line as it starts and one as it ends, each with the time against the total
        budget = f"{part['budget_s']:g} s"
        title = re.escape(part["title"])
        assert re.search(rf"s of {total} s\] {part['name']}: {title}; budget {budget}( \(what is left.*\))?\n",
                         proc.stdout)
        assert re.search(rf"s of {total} s\] {part['name']}: (done|FAILED|OVERRUN) in [\d.]+ s of {budget}\n",
                         proc.stdout)


@pytest.mark.slow
def test_cuda_tests_are_collected_and_skipped_on_the_cpu(dry_run):
    _, _, report, _, _ = dry_run
    counts = parts(report)["tests"]["result"]
    assert counts["passed"] == counts["failed"] == counts["errors"] == 0
    assert counts["skipped"] >= 10  # tests/test_cuda.py's, found through the marker


@pytest.mark.slow
def test_each_row_reports_step_floor_ratio_peak_memory_and_startup(dry_run):
    _, _, report, _, _ = dry_run
    for row in gpu_check.ROWS:
        part = parts(report)[row.name]
        resolution, batch = gpu_check.SHAPES["dry"][row.family]
        assert (part["config"]["resolution"], part["config"]["batch_size"]) == (resolution, batch)
        assert part["config"]["variant"] == row.variant
        if row.name in FORCED_OVERRUNS:
            continue
        r = part["result"]
        assert r["step_s"] > 0 and r["floor_s"] > 0 and r["ratio"] == pytest.approx(r["step_s"] / r["floor_s"])
        assert r["peak_bytes"] > r["weights_bytes"] > 0 and r["startup_s"] > 0
        assert r["plan_bytes"] > r["weights_bytes"]  # the memory plan the run logged
        assert r["compile_s"] == 0  # nothing compiled: the column is the compiled row's
    fp16 = parts(report)["sd15_fp16"]
    assert fp16["config"]["mixed_precision"] == "no" and "fp16 needs CUDA" in fp16["note"]
    for family in ("sd15", "sdxl"):
        built = parts(report)[f"build_{family}"]["result"]
        assert built["params"] > 1e6 and built["bytes"] > built["params"]  # 2 bytes each at least (bf16)


@pytest.mark.slow
def test_markdown_report_shows_every_part_and_the_numbers(dry_run):
    _, _, report, md, cache = dry_run
    assert md.startswith("# GPU check, dry run")
    assert f"Machine: {report['machine']['device']}" in md
    assert f"Compile cache: cold (empty at the start), `{cache}`" in md
    assert "passed; not ok, not fatal: sd15_bf16, sd15_bf16_compile." in md
    for part in report["parts"]:
        assert f"| {part['name']} | {part['title']} | **{part['status']}** |" in md
    step = parts(report)["sdxl_bf16_gc"]["result"]["step_s"]
    assert f"| sdxl | 32 | 1 | bf16 | --gradient_checkpointing | {step:.3f} s |" in md
    assert "| sd15 | 32 | 2 | bf16 | --compile_unet | - | - | - | - | - | - | - | - | - | overrun |" in md


def test_an_overrun_row_is_reported_with_what_it_measured_and_the_check_still_passes(tmp_path, monkeypatch):
    """A row cut in its third step (a fake bench_step.py that reports through the real progress writer and then
    hangs, as a cold compile does): its start-up, first step, compile and step times so far reach the report."""
    fake = tmp_path / "fake_bench.py"
    fake.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        from bench_step import write_progress
        write_progress(sys.argv[sys.argv.index("--progress") + 1],
                       {{"phase": "training", "startup_s": 4.5, "step_times": [30.0, 0.25], "warmup_steps": 1,
                        "total_steps": 4}})
        time.sleep(60)
    """))
    real = gpu_check.bench_command
    monkeypatch.setattr(gpu_check, "bench_command", lambda *a: [sys.executable, str(fake), *real(*a)[2:]])
    args = gpu_check.parse_args(["--dry-run", "--budget", "sd15_bf16=2", "--compile-cache", str(tmp_path / "cache"),
                                 str(tmp_path / "out")])
    check = gpu_check.Check(args)
    shutil.rmtree(check.tmp)  # a folder the driver's main would remove; the row's files go to tmp_path instead
    check.tmp = tmp_path
    check.add({"name": "tests", "title": "pytest -m cuda", "budget_s": 30, "status": "ok", "elapsed_s": 1.0})
    gpu_check.run_row(check, gpu_check.ROWS[0], {"name": "build_sd15", "status": "ok", "result": {"path": "x"}})
    (entry,) = [p for p in check.report["parts"] if p["name"] == "sd15_bf16"]
    assert entry["status"] == "overrun" and 2 <= entry["elapsed_s"] < 5
    measured = entry["measured"]
    assert {k: measured[k] for k in ("phase", "steps_done", "total_steps", "startup_s", "first_step_s", "step_s")} == {
        "phase": "training", "steps_done": 2, "total_steps": 4, "startup_s": 4.5, "first_step_s": 30.0,
        "step_s": 0.25}
    assert 0 < measured["phase_s"] < 5  # how far into step 3 it was cut
    assert entry["summary"].startswith("cut in step 3 of 4, ") and "start-up 4.5 s, first step 30.0 s" in entry[
        "summary"]
    assert check.report["passed"] and check.report["not_fatal"] == ["sd15_bf16"]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| sd15 | 32 | 2 | bf16 | (default) | 0.250 s | - | - | - | - | 4.5 s | 30.0 s | - | - | overrun |" in md


def test_only_a_failure_or_a_correctness_part_that_did_not_finish_fails_the_check():
    def outcome(**statuses):
        return gpu_check.verdict([{"name": name, "status": status} for name, status in statuses.items()])

    everything_ok = {name: "ok" for name in gpu_check.PART_NAMES}
    assert outcome(**everything_ok) == ([], [])
    assert outcome(**{**everything_ok, "sd15_bf16_compile": "overrun", "build_sdxl": "overrun",
                      "sdxl_bf16": "skipped"}) == ([], ["build_sdxl", "sdxl_bf16", "sd15_bf16_compile"])
    assert outcome(**{**everything_ok, "tests": "overrun"}) == (["tests"], [])  # its verdict is missing
    assert outcome(**{**everything_ok, "preflight": "failed", "sd15_fp16": "failed", "sdxl_bf16": "overrun"}) == (
        ["preflight", "sd15_fp16"], ["sdxl_bf16"])


def test_the_compiled_row_runs_last_and_may_use_what_the_others_left():
    assert gpu_check.PART_NAMES[-1] == "sd15_bf16_compile" and gpu_check.STRETCHES == ("sd15_bf16_compile",)
    assert gpu_check.allowance(140, 300, stretches=True) == 300
    assert gpu_check.allowance(140, 300, stretches=False) == 140
    assert gpu_check.allowance(140, 90, stretches=False) == 90
    for mode, column in (("gpu", 0), ("dry", 1)):  # with every budget spent in full, the last still gets its own
        assert sum(budgets[column] for budgets in gpu_check.BUDGETS.values()) <= gpu_check.TOTAL_S[mode]
    assert gpu_check.TOTAL_S["gpu"] <= 8 * 60


def test_compile_time_is_dynamos_own_count():
    before = bench_step.compile_seconds()
    torch.compile(lambda x: torch.sin(x) + 1, backend="eager")(torch.ones(3))  # traced, nothing to generate
    assert bench_step.compile_seconds() > before


def test_a_cache_folder_with_no_file_in_it_is_cold(tmp_path):
    assert gpu_check.is_cold(tmp_path / "absent") and gpu_check.is_cold(tmp_path)
    (tmp_path / "inductor" / "ab").mkdir(parents=True)
    assert gpu_check.is_cold(tmp_path)
    (tmp_path / "inductor" / "ab" / "kernel.so").write_bytes(b"\x7fELF")
    assert not gpu_check.is_cold(tmp_path)


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
