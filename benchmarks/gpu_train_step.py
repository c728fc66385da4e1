"""One-GPU timing of a training step for resnet32-w4 and resnet56-w11 at B = 2048.

    python benchmarks/gpu_train_step.py        # figures also to $OUT/gpu_train_step.json

resnet32-w4 runs the exact global-batch step of the train stage; resnet56-w11 is
micro-batched (ghost-batch BN, see bench_train_step.py) so that it fits on one card.
Runs without mpirun: a single-rank communicator stands in where mpi4py has no MPI.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from bench_train_step import time_train_step


class SingleRank:
    """The few communicator calls a one-rank step makes, without an MPI library."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py naming
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def Barrier(self) -> None:  # noqa: N802
        pass


def main() -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    smoke = not cuda
    torch.backends.cudnn.benchmark = True
    runs = [("resnet8-w1", 32, 0), ("resnet14-w1", 32, 8)] if smoke else \
        [("resnet32-w4", 2048, 0), ("resnet56-w11", 2048, int(os.environ.get("R56_TRAIN_MICRO", "128")))]
    figures = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", "torch": torch.__version__}
    t0 = time.time()
    for name, batch, micro in runs:
        try:
            rec = time_train_step(name, batch, SingleRank(), device, steps=2, warmup=1, micro_batch=micro)
            figures[name] = {k: rec[k] for k in ("parameters", "batch", "micro_batch", "step_seconds_median",
                                                 "step_seconds", "peak_memory_bytes")}
            print(f"[{time.time() - t0:6.1f}s] {name}: step {rec['step_seconds_median']:.3f} s, "
                  f"peak {rec['peak_memory_bytes'] / 2**30:.1f} GiB", flush=True)
        except torch.cuda.OutOfMemoryError:
            figures[name] = {"error": f"out of memory at micro-batch {micro}"}
            print(f"{name}: out of memory", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_train_step.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
