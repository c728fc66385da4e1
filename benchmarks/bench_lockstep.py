"""Probes in lockstep against probes one after another, in one run on one machine.

For each model: the gradient of the mean loss over B samples (the unit of cost), one H.v,
a block product H V with k columns (per column), and SLQ with P probes x m Lanczos steps run
sequentially (one product per step and probe) and in lockstep (one block product per step
for k probes at a time).  The lockstep Ritz values must equal the sequential ones to 1e-6
relative (they differ only by the rounding of the product); the table gives the wall-time
ratio lockstep / sequential and the per-column cost of a product in gradients.

Equality is checked twice.  In the float32 run the nodes differ by the rounding of the block
product against the single product (the column "product rel. diff" measures it on one vector:
about 1e-7..1e-6 in float32), which the Lanczos recurrence carries into the Ritz values: the
extreme ones move by at most about that relative difference times ||H|| per step, and the
interior ones more, so a few 1e-6 relative is the expected size, not an error.  The float64
check repeats ``--check-probes`` probes with float64 products (model and vectors in float64),
where the same comparison must come out near 1e-12: that is the test that the recurrences are
the same.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lockstep.py --models resnet8-w1 resnet20-w1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lockstep.py --models resnet20-w1   # the resnet20 row
"""
from __future__ import annotations

import argparse
import sys
import time
from math import nan
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def _node_diff(a: list, b: list) -> float:
    return max(float(np.max(np.abs(x.nodes - y.nodes)) / max(float(np.max(np.abs(x.nodes))), 1e-30))
               for x, y in zip(a, b, strict=True))


def float64_check(model_name: str, batch: int, probes: int, steps: int, route: str) -> float:
    """Largest relative Ritz-value difference, lockstep against one at a time, with float64 products."""
    torch.manual_seed(0)
    model = build(model_name, 10).eval().double()
    x = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    op = HessianLinearOperator(model, (x, y), torch.nn.CrossEntropyLoss(), route=route, micro_batch=batch)
    starts = [rademacher_slice(op.n, 0, op.n, seed=0, probe=p) for p in range(probes)]
    alone = [lanczos(op.matvec, op.n, None, z, steps=steps, probe=p, state_dtype=torch.float64)
             for p, z in enumerate(starts)]
    together = lanczos_lockstep(block_product(op), op.n, None, starts, list(range(probes)), steps=steps,
                                state_dtype=torch.float64)
    return _node_diff(alone, together)


def measure(model_name: str, batch: int, probes: int, steps: int, width: int, route: str,
            check_probes: int = 2) -> dict[str, object]:
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
    diff = _node_diff(alone, together)
    single = op.matvec(V[:, 0])
    prod_diff = float(torch.linalg.norm(op.matmat(V)[:, 0] - single) / torch.linalg.norm(single))
    diff64 = float64_check(model_name, batch, min(check_probes, width), steps, route) if check_probes else nan
    return {"model": model_name, "params": n, "B": batch, "route": route, "gradient s": g,
            "H.v / gradient": hv / g, f"H.V per column / gradient (k={width})": hV / g,
            f"SLQ {probes}x{steps} sequential s": sequential, "lockstep s": lockstep,
            "lockstep / sequential": lockstep / sequential, "product rel. diff (fp32)": prod_diff,
            "max rel. node difference (fp32)": diff, "max rel. node difference (fp64)": diff64}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet8-w1", "resnet20-w1"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--width", type=int, default=8, help="probes per block product")
    p.add_argument("--route", default="double-backward", choices=("double-backward", "func"))
    p.add_argument("--check-probes", type=int, default=2,
                   help="probes of the float64 equality check (0 = skip it)")
    args = p.parse_args()
    rows = [measure(m, args.batch, args.probes, args.steps, args.width, args.route, args.check_probes)
            for m in args.models]
    record("lockstep probes", rows, notes=f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
