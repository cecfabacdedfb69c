"""Run main() under `accelerate launch` and save what each rank ended with, for tests/test_multiprocess.py.

    accelerate launch ... tests/launch_main.py RESULT_DIR <train_textual_inversion.py flags>

Each rank writes RESULT_DIR/rank<i>.pt with its final vectors, world size, learning rate, loss history and the sizes
of the gradient buckets DDP all-reduced (recorded by a comm hook), so a test can check what crossed the wire.
"""

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_textual_inversion as tti  # noqa: E402

synced_numels: list[int] = []
prepare = Accelerator.prepare


def prepare_and_watch(self, *objects, **kwargs):
    prepared = prepare(self, *objects, **kwargs)
    for obj in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                synced_numels.append(bucket.buffer().numel())
                return allreduce_hook(state, bucket)

            obj.register_comm_hook(None, hook)
    return prepared


Accelerator.prepare = prepare_and_watch

# TEST_FAIL_RANK=i makes rank i crash at its second step, to check that the other ranks go down too.
if os.environ.get("TEST_FAIL_RANK") == os.environ.get("RANK", "0"):
    accumulate = tti.accumulate_step

    def failing_step(accelerator, models, micro_batches, step, seed):
        if step == 1:
            raise RuntimeError(f"injected failure on rank {os.environ.get('RANK')}")
        return accumulate(accelerator, models, micro_batches, step, seed)

    tti.accumulate_step = failing_step
# TEST_SCORE_BY_STEP=1: every validation scores worse than the one before (the first stays the best), so that
# --early_stopping_patience stops at a known step.
if os.environ.get("TEST_SCORE_BY_STEP"):
    import validation_report

    validation_report.step_score = lambda record: -record["step"]
result_dir = Path(sys.argv[1])
result = tti.main(tti.parse_args(sys.argv[2:]))
rank = int(os.environ.get("RANK", 0))  # the process group is gone after end_training()
torch.save({"vectors": result.vectors, "embeds": result.embeds, "num_processes": result.num_processes, "learning_rate": result.learning_rate,
            "history": result.history, "synced_numels": synced_numels}, result_dir / f"rank{rank}.pt")
