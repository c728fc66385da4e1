"""What a Lanczos step costs besides the product, on one rank with one thread.

The step of :func:`hpcqml.hessian.lanczos.lanczos` is: one product H v, then the three-term
update, full reorthogonalisation against the stored basis (two Gram-Schmidt passes), norms,
and the basis store.  Its non-product cost is measured by running the same ``lanczos`` on a
product that costs almost nothing (a diagonal matrix, one elementwise multiply) with
``reorth = full`` and ``none``; the real product's time is measured on its own.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lanczos_overhead.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import record
from hpcqml.hessian.hvp import HessianLinearOperator
from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.models import build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet8-w1")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(args.model, 10).eval()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    op = HessianLinearOperator(model, (x, y), torch.nn.CrossEntropyLoss(), route="double-backward",
                               micro_batch=args.batch)
    n = op.n
    v = torch.randn(n)
    op.matvec(v)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        op.matvec(v)
        times.append(time.perf_counter() - t0)
    product = statistics.median(times)
    diag = torch.linspace(-1.0, 3.0, n)
    z = rademacher_slice(n, 0, n, seed=0, probe=0)
    rows = []
    for steps in args.steps:
        for reorth in ("full", "none"):
            lanczos(lambda w: diag * w, n, None, z, steps=2, reorth=reorth)
            t0 = time.perf_counter()
            lanczos(lambda w: diag * w, n, None, z, steps=steps, reorth=reorth)
            per_step = (time.perf_counter() - t0) / steps
            rows.append({"model": args.model, "n": n, "B": args.batch, "steps m": steps, "reorth": reorth,
                         "non-product s per step": per_step, "H.v s": product,
                         "non-product / H.v": per_step / product})
    record("lanczos step overhead", rows, notes=f"threads {torch.get_num_threads()}, 1 rank (no reduction)")


if __name__ == "__main__":
    main()
