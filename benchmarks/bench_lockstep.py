"""Probes in lockstep against probes one after another, in one run on one machine.

For each model: the gradient of the mean loss over B samples (the unit of cost), one H.v,
a block product H V with k columns (per column), and SLQ with P probes x m Lanczos steps run
sequentially (one product per step and probe) and in lockstep (one block product per step
for k probes at a time).  The lockstep Ritz values must equal the sequential ones to 1e-6
relative (they differ only by the rounding of the product); the table gives the wall-time
ratio lockstep / sequential and the per-column cost of a product in gradients.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lockstep.py --models resnet8-w1 resnet20-w1
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import record
from hpcqml.hessian.hvp import HessianLinearOperator
from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.hessian.lockstep import block_product, lanczos_lockstep
from hpcqml.models import build


def _seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(model_name: str, batch: int, probes: int, steps: int, width: int, route: str) -> dict[str, object]:
    """One row of the table (see the module docstring)."""
    torch.manual_seed(0)
    model = build(model_name, 10).eval()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    op = HessianLinearOperator(model, (x, y), loss_fn, route=route, micro_batch=batch)
    n = op.n
    v = torch.randn(n)
    V = torch.randn(n, width)
    g = _seconds(gradient)
    hv = _seconds(lambda: op.matvec(v))
    hV = _seconds(lambda: op.matmat(V)) / width
    starts = [rademacher_slice(n, 0, n, seed=0, probe=p) for p in range(probes)]
    t0 = time.perf_counter()
    alone = [lanczos(op.matvec, n, None, z, steps=steps, probe=p) for p, z in enumerate(starts)]
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = []
    for s in range(0, probes, width):
        together += lanczos_lockstep(block_product(op), n, None, starts[s:s + width], list(range(s, s + width)),
                                     steps=steps)
    lockstep = time.perf_counter() - t0
    diff = max(float(np.max(np.abs(a.nodes - b.nodes)) / max(float(np.max(np.abs(a.nodes))), 1e-30))
               for a, b in zip(alone, together, strict=True))
    return {"model": model_name, "params": n, "B": batch, "route": route, "gradient s": g,
            "H.v / gradient": hv / g, f"H.V per column / gradient (k={width})": hV / g,
            f"SLQ {probes}x{steps} sequential s": sequential, "lockstep s": lockstep,
            "lockstep / sequential": lockstep / sequential, "max rel. node difference": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet8-w1", "resnet20-w1"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--width", type=int, default=8, help="probes per block product")
    p.add_argument("--route", default="double-backward", choices=("double-backward", "func"))
    args = p.parse_args()
    rows = [measure(m, args.batch, args.probes, args.steps, args.width, args.route) for m in args.models]
    record("lockstep probes", rows, notes=f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
