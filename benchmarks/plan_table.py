#!/usr/bin/env python
"""The README's "What fits on your card" table: the memory plan (memory_plan.py) of each public model's shape.

    python benchmarks/plan_table.py [--batch_size 1]

The models are benchmarks/configs' config-only pipelines (the public configs of SD 1.5, SDXL base 1.0, SD 3.5
Medium and Large, Flux.1-dev; no weights), planned for CUDA in bf16 compute at batch 1, each in bf16, fp8 and nf4
frozen weights, with and without --gradient_checkpointing. Every cell is computed, none measured: the plan counts
allocated memory (torch.cuda.max_memory_allocated) plus a 5% allocator margin, not the ~0.5 GB CUDA context.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = [("SD 1.5", "sd15", "sd", 512), ("SDXL", "sdxl-base-1.0", "sdxl", 1024),
          ("SD 3.5 Medium", "sd3.5-medium", "sd3", 1024), ("SD 3.5 Large", "sd3.5-large", "sd3", 1024),
          ("Flux.1-dev", "flux1-dev", "flux", 512), ("Flux.1-dev", "flux1-dev", "flux", 1024)]
MODES = [(None, False), (None, True), ("fp8", False), ("fp8", True), ("nf4", False), ("nf4", True)]


def plan(config: str, family_name: str, resolution: int, mode: str | None, checkpointing: bool, batch: int):
    import torch

    import train_textual_inversion as tti
    from memory_plan import PlanRequest, plan_memory

    family = tti.FAMILY_NAMES[family_name]
    images = tti.TrainingImages([torch.empty(3, resolution, resolution, dtype=torch.uint8)] * batch, None,
                                [(resolution, resolution)] * batch, [(0, 0)] * batch)
    return plan_memory(PlanRequest(str(ROOT / "benchmarks" / "configs" / config), family, resolution, batch,
                                   torch.bfloat16, mode, checkpointing,
                                   conditions=family.conditions(images, family.guidance_scale)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=1)
    args = p.parse_args(argv)
    head = [f"{mode or 'bf16'}{' + gc' if gc else ''}" for mode, gc in MODES]
    print("| model | px | weights (bf16 / fp8 / nf4) | " + " | ".join(head) + " |")
    print("|---|---|---|" + "---|" * len(MODES))
    for name, config, family, resolution in MODELS:
        plans = [plan(config, family, resolution, mode, gc, args.batch_size) for mode, gc in MODES]
        weights = " / ".join(f"{plans[i].weights / 1e9:.1f}" for i in (0, 2, 4))
        cells = [f"{p.peak / 1e9:.1f}" for p in plans]
        print(f"| {name} | {resolution} | {weights} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
