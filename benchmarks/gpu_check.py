#!/usr/bin/env python
"""The GPU check's driver; run it through benchmarks/gpu_check.sh, which first installs the carried wheels.

    bash benchmarks/gpu_check.sh [--dry-run] [--budget PART=SECONDS ...] [OUT_DIR]

Parts, each in a process of its own: preflight (versions, the GPU, imports), tests (`pytest -m cuda`), build_sd15 and
build_sdxl (random pipelines of SD 1.5's and SDXL's shapes, made on the machine: nothing is downloaded), then five
rows of benchmarks/bench_step.py, the compiled one last. Each part has a time budget; one that overruns is killed
with its children and recorded as `overrun`, with what it had measured so far, and the next part starts. The exit
status is 1 only where the check found something wrong: a part that failed, or a correctness part (preflight, tests)
that did not finish; an overrun or skipped measurement is reported, not fatal. OUT_DIR/gpu_check.json and
gpu_check.md are rewritten after every part, so whatever ran is on disk even if the whole command is stopped; the
children's output is in gpu_check.log.

Dry mode (--dry-run, or no CUDA) runs the same parts on the CPU with tiny pipelines and shapes, in under 8 minutes
(2-3 with an empty compile cache, 2 with a warm one, on 2 idle cores).
This file imports only the standard library at the top: torch and the rest load in the parts' own processes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One bench_step.py row: which built pipeline, in which precision, with which extra trainer flags."""

    name: str
    family: str  # "sd15" or "sdxl"
    precision: str
    variant: str


# The compiled row last: how long its compile takes is known only afterwards (see STRETCHES).
ROWS = [Row("sd15_bf16", "sd15", "bf16", ""), Row("sd15_fp16", "sd15", "fp16", ""),
        Row("sdxl_bf16", "sdxl", "bf16", ""), Row("sdxl_bf16_gc", "sdxl", "bf16", "--gradient_checkpointing"),
        # 8- and 4-bit frozen weights: peak CUDA memory against the memory plan (nf4 where bitsandbytes is there)
        Row("sdxl_fp8_gc", "sdxl", "bf16", "--base_weight_dtype fp8 --gradient_checkpointing"),
        Row("sdxl_nf4_gc", "sdxl", "bf16", "--base_weight_dtype nf4 --gradient_checkpointing"),
        Row("sd15_bf16_compile", "sd15", "bf16", "--compile_unet")]
PART_NAMES = ["preflight", "tests", "build_sd15", "build_sdxl", *(row.name for row in ROWS)]
# What the check is for: a failure, or a verdict missing because the part overran, fails the whole check. The builds
# and rows measure: one that overruns or is skipped is reported with what it got, and the exit status stays 0.
CORRECTNESS = ("preflight", "tests")

# Seconds per part, (GPU, dry), adding up to TOTAL_S, which is counted from gpu_check.sh's start (GPU_CHECK_START, the
# wheel install included) and cuts the last parts short, so the whole command stays under 8 minutes on a GPU.
# GPU: estimates (no GPU was lent when they were set). The compiled row's 140 s are for a cold compile, which a lent
# machine always has (a fresh copy of the working tree, no caches): Inductor compiles the SD-1.5-shaped UNet's forward
# and backward in the first step, then the forward again without grad for the final validation loss. On this CPU
# that shape's compile took 2.5 minutes; the GPU's is not measured yet, hence STRETCHES.
# Dry: what a dry run checks is the machinery, not the CPU's speed, so its budgets are caps that no healthy part
# should meet on a slow or busy machine: about 3x what each part took on the slowest 2-core machine seen (an AVX2-only
# EPYC: a row 12-15 s, almost all of it importing diffusers, bitsandbytes and dynamo; CI's machine was slower still
# and cut the fp8 and nf4 rows at the old 15 s). An unused budget costs nothing. The tiny compiled row took 80 s on
# an older machine with an empty compile cache (71 s of it compiling: 42 s in its first step, most of the rest
# recompiling the forward without grad for the final validation loss; 102 s with vectorized kernels, see Check.env)
# and 16 s with a warm one; stretched, it gets whatever the parts before it left of the total.
BUDGETS = {"preflight": (20, 25), "tests": (80, 45), "build_sd15": (30, 40), "build_sdxl": (40, 40),
           "sd15_bf16": (30, 45), "sd15_fp16": (30, 45), "sdxl_bf16": (40, 45), "sdxl_bf16_gc": (40, 45),
           "sdxl_fp8_gc": (35, 45), "sdxl_nf4_gc": (35, 45), "sd15_bf16_compile": (90, 60)}
TOTAL_S = {"gpu": 470, "dry": 480}
# Parts that may run on into whatever the parts before them left of the total, their budget being the least they get
# when those kept to theirs: a cold compile's length varies with the machine more than anything else here. Last only.
STRETCHES = ("sd15_bf16_compile",)
HEARTBEAT_S = {"gpu": 30, "dry": 10}
# (resolution, batch) per pipeline: the shapes on a GPU, tiny ones on a CPU.
SHAPES = {"gpu": {"sd15": (512, 4), "sdxl": (1024, 1)}, "dry": {"sd15": (32, 2), "sdxl": (32, 1)}}
STEPS = {"gpu": 10, "dry": 3}  # timed steps, and as many floor repeats
WARMUP = {"gpu": 3, "dry": 1}
# The compiled row warms up longer: after the compile in step 1, steps 2 and 3 were still slow on a CPU (5 s, 2 s).
COMPILE_WARMUP = 3
PACKAGES = ["torch", "diffusers", "transformers", "huggingface_hub", "accelerate", "safetensors", "tokenizers",
            "open_clip_torch", "pytest"]
STATUSES = ("ok", "failed", "overrun", "skipped")


# ---- Which carried wheels to install ---------------------------------------------------------------------------------
def wheel_name_version(path: str) -> tuple[str, str]:
    name, version = Path(path).name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wheels_needed(paths: list[str], installed=installed_version) -> list[str]:
    """The wheels whose package this machine lacks or has older than the wheel; a newer one there is kept."""
    from packaging.version import Version

    needed = []
    for path in paths:
        name, version = wheel_name_version(path)
        have = installed(name)
        if have is None or Version(have) < Version(version):
            needed.append(path)
    return needed


# ---- The parts that run in a child process of this file --------------------------------------------------------------
def preflight() -> dict:
    """Versions, the device, and whether everything the other parts import imports and fits together."""
    import platform

    info: dict = {"python": platform.python_version(), "packages": {}, "problems": []}
    for name in PACKAGES:  # the carried wheels' versions where they were installed: they come first on the path
        info["packages"][name] = installed_version(name)
    import torch

    info["cuda"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
    else:
        info["device"] = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    info["problems"] += unmet_requirements(["diffusers", "transformers", "accelerate", "huggingface_hub"])
    sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
    for module in ("diffusers", "transformers", "accelerate", "train_textual_inversion", "make_tiny_pipeline"):
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - every failing import is worth reporting, whatever it raised
            info["problems"].append(f"import {module}: {type(e).__name__}: {e}")
    try:  # the tiny and shaped pipelines' tokenizers are built from this file (open_clip_torch's wheel)
        from make_tiny_pipeline import _open_clip_bpe_path

        _open_clip_bpe_path()
    except Exception as e:  # noqa: BLE001
        info["problems"].append(f"CLIP BPE file: {e}")
    return info


def unmet_requirements(names: list[str]) -> list[str]:
    """What `pip check` would say about these distributions, limited to them: their own installed requirements."""
    from importlib import metadata

    from packaging.requirements import Requirement

    problems = []
    for name in names:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra, or another platform's
            have = installed_version(req.name)
            if have is None:
                problems.append(f"{name} needs {req}, which is not installed")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}, but {req.name} {have} is installed")
    return problems


# SDXL 1.0 base's layer sizes ("full": UNet 2.57 B, CLIP-L 123 M, OpenCLIP-bigG 695 M, VAE 84 M parameters), and the
# tiny ones of examples/make_tiny_pipeline.py's SDXL, which dry mode builds through the same code.
SDXL_SHAPES = {
    "full": {
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     hidden_act="quick_gelu"),
        "text_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu"),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024),
        "unet": dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                     transformer_layers_per_block=(1, 2, 10)),
        "time_embed_dim": 256,
    },
    "tiny": {
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     hidden_act="gelu"),
        "text_2": dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       hidden_act="gelu"),
        "vae": dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
        "unet": dict(sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                     layers_per_block=1, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2)),
        "time_embed_dim": 8,
    },
}


def sdxl_models(shape: str, seed: int = 0) -> dict:
    """SDXL's text encoders, VAE and UNet at these sizes, random, on torch's current default device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sizes = SDXL_SHAPES[shape]
    legacy_ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # as in SDXL's published configs

    def text_config(config: dict) -> CLIPTextConfig:
        return CLIPTextConfig(**config, vocab_size=49408, max_position_embeddings=77,
                              projection_dim=config["hidden_size"], **legacy_ids)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(sizes["text"]))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(sizes["text_2"]))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**sizes["vae"], down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, scaling_factor=0.13025,
                        force_upcast=True)
    width, width_2, time_dim = sizes["text"]["hidden_size"], sizes["text_2"]["hidden_size"], sizes["time_embed_dim"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sizes["unet"], in_channels=4, out_channels=4, use_linear_projection=True,
                                cross_attention_dim=width + width_2, addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim,
                                # six size/crop numbers, each embedded to time_dim, plus the pooled text projection
                                projection_class_embeddings_input_dim=6 * time_dim + width_2)
    return {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae, "unet": unet}


def build(family: str, dest: Path, tiny: bool, device: str) -> dict:
    """A random pipeline of SD 1.5's or SDXL's shape (or the tiny one), constructed on `device` and saved to `dest`.
    On a GPU the random init of 3.5 B parameters is quick; a CPU draws its random numbers serially."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
    shutil.rmtree(dest, ignore_errors=True)
    if family == "sd15":
        from make_tiny_pipeline import build_sd15_shaped_pipeline, build_tiny_pipeline

        with torch.device(device):
            (build_tiny_pipeline if tiny else build_sd15_shaped_pipeline)(dest)
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
        from make_tiny_pipeline import build_clip_tokenizer

        with torch.device(device):
            models = sdxl_models("tiny" if tiny else "full")
        # bf16 on disk: half the bytes to write and read (7 GB, not 14); the trainer casts to its compute dtype anyway.
        models = {name: model.to(torch.bfloat16) for name, model in models.items()}
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
        StableDiffusionXLPipeline(**models, tokenizer=build_clip_tokenizer(dest / "tokenizer"),
                                  tokenizer_2=build_clip_tokenizer(dest / "tokenizer_2", pad_token="!"),
                                  scheduler=scheduler).save_pretrained(dest)
    weights = [f for f in dest.rglob("*.safetensors")]
    return {"path": str(dest), "device": device, "bytes": sum(f.stat().st_size for f in weights),
            "params": sum(safetensors_numel(f) for f in weights)}


def safetensors_numel(path: Path) -> int:
    """Parameter count from the file's JSON header, without loading the tensors."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total = 0
    for key, entry in header.items():
        if key != "__metadata__":
            n = 1
            for d in entry["shape"]:
                n *= d
            total += n
    return total


def build_part(family: str, dest: Path, tiny: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        return build(family, dest, tiny, "cpu")
    try:
        return build(family, dest, tiny, "cuda")
    except Exception as e:  # noqa: BLE001 - building on the GPU is an optimisation; the CPU always works, slower
        print(f"building on the GPU failed ({type(e).__name__}: {e}); building on the CPU", file=sys.stderr)
        return {**build(family, dest, tiny, "cpu"), "note": f"GPU build failed: {type(e).__name__}: {e}"}


# ---- Running the parts -----------------------------------------------------------------------------------------------
def allowance(budget: float, left: float, stretches: bool) -> float:
    """Seconds a part may run: its budget, cut to what is left of the total; a stretching part gets all that is left."""
    return left if stretches else min(budget, left)


def verdict(parts: list[dict]) -> tuple[list[str], list[str]]:
    """(failing, not_fatal): the parts that fail the check (one that failed, or a correctness part that did not finish
    ok, so that its verdict is missing), and the other parts that are not ok (overrun, skipped), which do not."""
    failing = [p["name"] for p in parts if p["status"] == "failed" or (p["name"] in CORRECTNESS
                                                                       and p["status"] != "ok")]
    return failing, [p["name"] for p in parts if p["status"] != "ok" and p["name"] not in failing]


def is_cold(folder: Path) -> bool:
    """Whether a compile cache holds nothing yet: every kernel will be compiled, as on a lent machine."""
    return not folder.is_dir() or not any(path.is_file() for path in folder.rglob("*"))


def measured_so_far(progress: dict | None, killed_at: float) -> dict:
    """What an overrun row's bench_step.py had measured when it was killed, from its --progress file."""
    if not progress:
        return {"phase": "starting"}  # killed before the measuring process wrote anything (importing, say)
    times, warmup = progress["step_times"], progress["warmup_steps"]
    done = {"phase": progress["phase"], "steps_done": len(times), "total_steps": progress["total_steps"],
            "phase_s": round(killed_at - progress["wall"], 1)}  # in the phase, or the step, that was cut
    if progress["startup_s"] is not None:
        done["startup_s"] = progress["startup_s"]
    if times:
        done["first_step_s"] = times[0]
    if times[warmup:]:
        done["step_s"] = statistics.median(times[warmup:])
    if progress.get("compile_s"):
        done["compile_s"] = progress["compile_s"]
    return done


def so_far_text(done: dict) -> str:
    """One line for the report: where the row was cut, and the numbers it had."""
    phase = done["phase"]
    if phase == "training":
        where = f"in step {done['steps_done'] + 1} of {done['total_steps']}, {done['phase_s']:g} s into it"
    else:
        where = {"starting": "while starting", "loading": "while loading the pipeline",
                 "after training": "after its last step (final validation, checkpoint)",
                 "floor": "while timing the floor"}[phase]
        where += f", {done['phase_s']:g} s in" if "phase_s" in done else ""
    numbers = [f"{label} {done[key]:.{digits}f} s" for key, label, digits in
               [("startup_s", "start-up", 1), ("first_step_s", "first step", 1), ("compile_s", "compile", 1),
                ("step_s", "step", 3)] if key in done]
    return f"cut {where}" + (f"; so far: {', '.join(numbers)}" if numbers else "; nothing measured yet")


class Check:
    """The run's state: mode, budgets, clock, log and the report rewritten after every part."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = float(os.environ.get("GPU_CHECK_START") or time.time())
        self.out = Path(args.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "gpu_check.log"
        self.log.write_text("")
        self.mode = "dry" if args.dry_run else "gpu"  # until preflight has looked for a GPU
        self.overrides = dict(parse_budget(b) for b in args.budget)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        # Inductor's C++ compiler writes a kernel library in place: a part killed mid-compile can leave a truncated
        # .so, which every later compile of that kernel then fails to load ("file too short"). So the parts compile
        # into a cache of their own (git-ignored, kept between runs, so a dry run's compile is warm the next time),
        # cleaned of truncated libraries after an overrun; the user's own cache is never at risk.
        # --compile-cache: another folder, an empty one for a cold run like a lent machine's (tests/test_gpu_check.py).
        self.compile_cache = Path(args.compile_cache).resolve()
        cold = is_cold(self.compile_cache)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start))
        self.report: dict = {"mode": self.mode, "started": started,
                             "command": shlex.join(["bash", "benchmarks/gpu_check.sh", *sys.argv[1:]]),
                             "wheels_installed": os.environ.get("GPU_CHECK_WHEELS", "").split(), "machine": {},
                             "compile_cache": {"path": str(self.compile_cache), "cold": cold}, "parts": []}

    @property
    def total(self) -> float:
        return TOTAL_S[self.mode]

    def budget(self, name: str) -> float:
        return self.overrides.get(name, BUDGETS[name][self.mode == "dry"])

    def elapsed(self) -> float:
        return time.time() - self.start

    def say(self, message: str) -> None:
        print(f"[gpu_check {self.elapsed():5.0f} s of {self.total} s] {message}", flush=True)

    def env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(self.compile_cache / "inductor"),
               "TRITON_CACHE_DIR": str(self.compile_cache / "triton")}
        if self.mode == "dry":
            env["CUDA_VISIBLE_DEVICES"] = ""  # dry means the CPU, also on a machine with a GPU
            # Tiny shapes gain nothing from threads, and on a busy machine OpenMP's waiting threads made a 4 s row
            # take 20 s (2 cores, another test suite running).
            env["OMP_NUM_THREADS"] = "1"
            # Scalar C++ kernels, not vectorized ones: they compile faster (the tiny compiled row with an empty cache:
            # 80 s, not 102; -O0 gained nothing more), and a dry run checks the machinery, not the CPU's speed.
            env["TORCHINDUCTOR_VEC_ISA_OK"] = "0"
        return env

    def run(self, name: str, cmd: list[str], title: str) -> dict:
        """Run one part's command within its budget (and what is left of the total); return its report entry."""
        left = self.start + self.total - time.time()
        stretches = name in STRETCHES and name not in self.overrides  # a --budget is meant exactly
        timeout = allowance(self.budget(name), left, stretches)
        budget = float(int(timeout)) if stretches else self.budget(name)  # what it was allowed, as reported
        entry = {"name": name, "title": title, "budget_s": budget, "command": shlex.join(cmd)}
        if timeout < 1:
            self.say(f"{name}: skipped, {self.total} s used up")
            return {**entry, "status": "skipped", "elapsed_s": 0.0,
                    "detail": f"the total budget ({self.total} s) was used up"}
        rest = f" (what is left of the {self.total} s; {self.budget(name):g} s planned)" if stretches else ""
        self.say(f"{name}: {title}; budget {budget:g} s{rest}")
        offset = self.log.stat().st_size
        began = time.time()
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {shlex.join(cmd)}\n")
            log.flush()
            # A session of its own: an overrun kills the whole group, bench_step's measuring child too.
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                    start_new_session=True)
            beat, overrun = began + HEARTBEAT_S[self.mode], False
            try:
                while proc.poll() is None:
                    now = time.time()
                    if now - began > timeout:
                        kill(proc)
                        for lib in truncated_libraries(self.compile_cache, since=began):
                            lib.unlink()
                        overrun = True
                        break
                    if now >= beat:
                        self.say(f"{name}: {now - began:.0f} s of {budget:g} s")
                        beat += HEARTBEAT_S[self.mode]
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:  # this driver is stopping (Ctrl-C, an error); in its own session, the part
                    kill(proc)  # would not have seen the signal
        entry["elapsed_s"] = round(time.time() - began, 1)
        entry["rc"] = proc.returncode
        with open(self.log, errors="replace") as log:
            log.seek(offset)
            tail = log.read().strip().splitlines()[-15:]
        if overrun:
            cut = "budget" if timeout == budget and not stretches else f"what was left of the total {self.total} s"
            entry.update(status="overrun", detail=f"killed after {entry['elapsed_s']:g} s ({cut})")
        elif proc.returncode:
            entry.update(status="failed", detail=f"exit code {proc.returncode}", log_tail=tail)
        else:
            entry["status"] = "ok"
        word = {"ok": "done", "failed": "FAILED", "overrun": "OVERRUN"}[entry["status"]]
        self.say(f"{name}: {word} in {entry['elapsed_s']:g} s of {budget:g} s")
        if entry["status"] == "failed":
            print("    " + "\n    ".join(tail), flush=True)
        return entry

    def add(self, entry: dict) -> dict:
        self.report["parts"].append(entry)
        self.write()
        return entry

    def write(self) -> None:
        failing, not_fatal = verdict(self.report["parts"])
        self.report.update(mode=self.mode, total_budget_s=self.total, elapsed_s=round(self.elapsed(), 1),
                           ok=all(p["status"] == "ok" for p in self.report["parts"]), passed=not failing,
                           failing=failing, not_fatal=not_fatal)
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.report))


def kill(proc: subprocess.Popen) -> None:
    """The part and everything it started. SIGKILL, not SIGTERM: on SIGTERM the trainer finishes its step and saves."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def truncated_libraries(folder: Path, since: float) -> list[Path]:
    """The shared libraries written since `since` that end before their own ELF section table: cut off by a kill."""
    cut = []
    for lib in folder.rglob("*.so") if folder.is_dir() else []:
        if lib.stat().st_mtime < since:
            continue
        data = lib.read_bytes()
        number = lambda start, size: int.from_bytes(data[start:start + size], "little")  # noqa: E731
        table_end = number(0x28, 8) + number(0x3A, 2) * number(0x3C, 2)  # e_shoff + e_shentsize * e_shnum
        whole = len(data) >= 64 and data[:4] == b"\x7fELF" and table_end <= len(data)
        if not whole:
            cut.append(lib)
    return cut


def parse_budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in BUDGETS or not seconds:
        raise SystemExit(f"--budget {text!r}: expected PART=SECONDS with PART one of {', '.join(BUDGETS)}")
    return name, float(seconds)


def child(part: str, result: Path, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--part", part, "--result", str(result), *extra]


def run_preflight(check: Check) -> None:
    result = check.tmp / "preflight.json"
    entry = check.run("preflight", child("preflight", result), "versions, device, imports")
    if entry["status"] == "ok":
        info = json.loads(result.read_text())
        check.report["machine"] = info
        if info["problems"]:
            entry.update(status="failed", detail="; ".join(info["problems"]))
        versions = info["packages"]
        entry["summary"] = f"{info['device']}; torch {versions['torch']}, diffusers {versions['diffusers']}"
        if not info["cuda"] and check.mode == "gpu":
            check.mode = "dry"
            check.say("no CUDA device: dry run (CPU, tiny shapes)")
    elif check.mode == "gpu":
        check.mode = "dry"  # without a preflight there is no telling that a GPU is there
    check.add(entry)


def run_tests(check: Check) -> None:
    junit = check.tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE",
           "--continue-on-collection-errors",  # an unrelated module failing to import must not hide the CUDA results
           f"--junitxml={junit}"]
    entry = check.run("tests", cmd, "pytest -m cuda")
    if entry["status"] != "overrun" and junit.is_file():
        counts = junit_counts(junit)
        entry["result"] = counts
        entry["summary"] = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if counts[k])
        if counts["failed"] or counts["errors"]:
            entry.update(status="failed", detail="failing: " + ", ".join(counts["failures"]))
        elif check.mode == "gpu" and not counts["passed"]:
            entry.update(status="failed", detail="every CUDA test was skipped: pytest saw no GPU")
    if entry.get("rc") == 5:  # pytest's "no tests collected"
        entry.update(status="failed", detail="no test is marked cuda")
    check.add(entry)


def junit_counts(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        counts[{"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]] += 1
        if outcome in ("failure", "error"):
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def run_build(check: Check, family: str, models: Path) -> dict:
    result = check.tmp / f"build_{family}.json"
    dest = models / f"{family}-shaped" if check.mode == "gpu" else models / f"{family}-tiny"
    what = {"sd15": "SD-1.5", "sdxl": "SDXL"}[family]
    title = f"random {what}-shaped pipeline" if check.mode == "gpu" else f"tiny random {what} pipeline"
    extra = ["--family", family, "--dest", str(dest)] + (["--tiny"] if check.mode == "dry" else [])
    entry = check.run(f"build_{family}", child("build", result, *extra), title)
    if entry["status"] == "ok":
        entry["result"] = built = json.loads(result.read_text())
        entry["summary"] = (f"{built['params'] / 1e6:,.1f} M parameters, {built['bytes'] / 2**20:,.0f} MiB, "
                            f"built on {built['device']}")
    return check.add(entry)


def bench_command(pipeline: Path, config: dict, result: Path, progress: Path) -> list[str]:
    """bench_step.py for one row: its rows to `result` at the end, what it measured so far to `progress` as it goes."""
    c = config
    return [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--pipeline", str(pipeline),
            "--resolution", str(c["resolution"]), "--batch_size", str(c["batch_size"]),
            "--mixed_precision", c["mixed_precision"], "--steps", str(c["steps"]),
            "--warmup_steps", str(c["warmup_steps"]), "--floor_repeats", str(c["steps"]), f"--variant={c['variant']}",
            "--json", str(result), "--progress", str(progress)]


def run_row(check: Check, row: Row, build: dict) -> None:
    resolution, batch = SHAPES[check.mode][row.family]
    precision = row.precision
    note = None
    if check.mode == "dry" and precision == "fp16":
        precision, note = "no", "fp16 needs CUDA: this dry row ran in fp32"
    warmup = COMPILE_WARMUP if "--compile_unet" in row.variant else WARMUP[check.mode]
    steps = STEPS[check.mode]
    config = {"family": row.family, "resolution": resolution, "batch_size": batch, "mixed_precision": precision,
              "variant": row.variant, "steps": steps, "warmup_steps": warmup}
    title = f"{row.family} {resolution} px batch {batch} {row.precision} {row.variant}".strip()
    if build["status"] != "ok":
        check.add({"name": row.name, "title": title, "budget_s": check.budget(row.name), "status": "skipped",
                   "elapsed_s": 0.0, "config": config, "detail": f"no pipeline: {build['name']} {build['status']}"})
        return
    if "nf4" in row.variant and importlib.util.find_spec("bitsandbytes") is None:
        check.add({"name": row.name, "title": title, "budget_s": check.budget(row.name), "status": "skipped",
                   "elapsed_s": 0.0, "config": config, "detail": "bitsandbytes is not installed"})
        return
    result, progress = check.tmp / f"{row.name}.json", check.tmp / f"{row.name}.progress.json"
    cmd = bench_command(Path(build["result"]["path"]), config, result, progress)
    entry = {**check.run(row.name, cmd, title), "config": config}
    if note:
        entry["note"] = note
    if entry["status"] == "ok":
        (bench,) = json.loads(result.read_text())
        entry["result"] = {**bench, "ratio": bench["step_s"] / bench["floor_s"]}
        compiled = f", compile {bench['compile_s']:.1f} s" if bench.get("compile_s") else ""
        entry["summary"] = (f"step {bench['step_s']:.3f} s, ratio {entry['result']['ratio']:.3f}, "
                            f"peak {size(bench['peak_bytes'])} (plan {size(bench['plan_bytes'])}), start-up {bench['startup_s']:.1f} s{compiled}")
    elif entry["status"] == "overrun":
        entry["measured"] = measured_so_far(json.loads(progress.read_text()) if progress.is_file() else None,
                                            time.time())  # within milliseconds of the kill
        entry["summary"] = so_far_text(entry["measured"])
        check.say(f"{row.name}: {entry['summary']}")
    check.add(entry)


# ---- The report ------------------------------------------------------------------------------------------------------
def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def outcome_text(parts: list[dict]) -> str:
    """The check's verdict in words: passed or FAILED, and the parts that are not ok without failing it."""
    failing, not_fatal = verdict(parts)
    text = f"FAILED: {', '.join(failing)}" if failing else "passed"
    if not_fatal:
        return f"{text}; not ok, not fatal: {', '.join(not_fatal)}"
    return text if failing else f"{text}, every part ok"


# The speed table's number columns: key in a row's result (or an overrun row's measurements so far), and its format.
SPEED_COLUMNS = [("step_s", "{:.3f} s"), ("floor_s", "{:.3f} s"), ("ratio", "{:.3f}"), ("peak_bytes", size),
                 ("plan_bytes", size),
                 ("startup_s", "{:.1f} s"), ("first_step_s", "{:.1f} s"), ("compile_s", "{:.1f} s"),
                 ("weights_bytes", size)]


def speed_cells(numbers: dict) -> list[str]:
    """The speed table's number cells; "-" for what was not measured (and for no compile at all)."""
    return ["-" if not numbers.get(key) else show(numbers[key]) if callable(show) else show.format(numbers[key])
            for key, show in SPEED_COLUMNS]


def markdown(report: dict) -> str:
    machine = report.get("machine") or {}
    packages = machine.get("packages", {})
    parts = report["parts"]
    title = "GPU check" if report["mode"] == "gpu" else "GPU check, dry run (CPU, tiny shapes: not GPU numbers)"
    gpu = f" ({machine['memory_gib']} GiB, compute capability {machine['capability']})" if machine.get("cuda") else ""
    cache = report["compile_cache"]
    lines = [f"# {title}", "",
             f"Machine: {machine.get('device', 'unknown')}{gpu}",
             "Software: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v)
             + (f"; Python {machine['python']}" if machine.get("python") else ""),
             f"Carried wheels installed: {', '.join(report['wheels_installed']) or 'none'}",
             f"Compile cache: {'cold (empty at the start)' if cache['cold'] else 'warm'}, `{cache['path']}`",
             f"Started {report['started']}; {report['elapsed_s']:.0f} s of the {report['total_budget_s']} s budget; "
             f"{outcome_text(parts)}.",
             f"Command: `{report['command']}`", "",
             "## Parts", "", "| part | what | status | time / budget | result |", "|---|---|---|---|---|"]
    for p in parts:
        result = p.get("summary") or p.get("detail", "")
        if p.get("summary") and p.get("detail"):
            result += f" ({p['detail']})"
        lines.append(f"| {p['name']} | {p['title']} | **{p['status']}** | {p['elapsed_s']:g} / {p['budget_s']:g} s "
                     f"| {result} |")
    rows = [p for p in parts if "config" in p]
    if rows:
        lines += ["", "## Speed and memory (benchmarks/bench_step.py)", "",
                  "Step and floor: medians; ratio = step / floor; peak: allocated GPU memory while training (on a "
                  "CPU: resident memory); start-up: process start to the first step, which the first-step column "
                  "times (compilation happens there); compile: Dynamo's and Inductor's own time, every compile and "
                  "recompile (the final validation's forward is one), apart from the step; plan: the memory plan's "
                  "peak (memory_plan.py; on a CPU it adds a runtime estimate). An overrun row shows what it had "
                  "measured when it was cut.", "",
                  "| pipeline | px | batch | precision | variant | step | floor | ratio | peak | plan | start-up "
                  "| first step | compile | weights | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in rows:
            c = p["config"]
            cells = [c["family"], str(c["resolution"]), str(c["batch_size"]), c["mixed_precision"],
                     c["variant"] or "(default)", *speed_cells(p.get("result") or p.get("measured") or {})]
            lines.append("| " + " | ".join(cells + [p["status"]]) + " |")
        notes = [f"- {p['name']}: {p['note']}" for p in rows if p.get("note")]
        lines += ["", *notes] if notes else []
    for p in [p for p in parts if p.get("log_tail")]:
        lines += ["", f"## {p['name']}: end of its output", "", "```", *p["log_tail"], "```"]
    lines.append("")
    return "\n".join(lines)


# ---- Entry points ----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default=str(ROOT / "out" / "gpu_check"))
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny shapes (also the default without CUDA)")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                   help=f"override one part's budget; parts: {', '.join(PART_NAMES)}")
    p.add_argument("--compile-cache", default=str(ROOT / "benchmarks" / "models" / "compile_cache"), metavar="DIR",
                   help="the parts' Inductor and Triton caches (default: a git-ignored folder kept between runs; an "
                        "empty one makes the compile cold, as on a lent machine)")
    p.add_argument("--wheels-needed", nargs="*", metavar="WHEEL",
                   help="print which of these wheels this machine lacks or has older, and exit (gpu_check.sh)")
    # internal: one part, run in a child process
    p.add_argument("--part", choices=["preflight", "build"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--family", choices=["sd15", "sdxl"], help=argparse.SUPPRESS)
    p.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.wheels_needed is not None:
        print("\n".join(wheels_needed(args.wheels_needed)))
        return 0
    if args.part:
        result = preflight() if args.part == "preflight" else build_part(args.family, args.dest, args.tiny)
        args.result.write_text(json.dumps(result))
        return 0
    for text in args.budget:
        parse_budget(text)  # a typo fails now, not after minutes of GPU time
    # SIGTERM (a lent machine's session ending, say) as an exception, so that the running part is killed too and the
    # report is written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    check = Check(args)
    models = ROOT / "benchmarks" / "models" / "gpu_check"  # git-ignored; on the GPU machine it is gone afterwards
    try:
        run_preflight(check)
        if check.mode == "dry":
            models = check.tmp / "models"  # tiny and thrown away: a test runs this
        cache = "cold (empty)" if check.report["compile_cache"]["cold"] else "warm"
        check.say(f"mode: {check.mode}; compile cache {cache}, {check.compile_cache}; results in {check.out}")
        run_tests(check)
        builds = {family: run_build(check, family, models) for family in ("sd15", "sdxl")}
        for row in ROWS:
            run_row(check, row, builds[row.family])
    finally:
        shutil.rmtree(check.tmp, ignore_errors=True)
        check.write()
    check.say(f"finished: {outcome_text(check.report['parts'])}; {check.out / 'gpu_check.md'}")
    return 0 if check.report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
