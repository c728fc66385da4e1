"""How much ranks sharing one machine slow each other down: the ceiling on strong scaling here.

Strong scaling of the spectrum stage from 1 to P ranks on one node is limited by two things
the code does not control: the product's cost per sample at a smaller batch (B/P instead of
B), and the slowdown of each rank when P of them compute at once (shared caches and memory
bandwidth).  This script measures both for the double-backward H.v of one model, 1 thread
per process:

- ``T(B)``: one process alone at the whole batch B;
- ``T(B/P)``: one process alone at the rank's batch B/P;
- ``T_co(B/P)``: P processes started together, each at B/P (the slowest one's median).

It prints the co-run slowdown ``T_co(B/P) / T(B/P)``, the batch-size effect
``P T(B/P) / T(B)``, and the strong-scaling efficiency the products alone allow,
``T(B) / (P T_co(B/P))``: a run of the spectrum stage on P ranks of this machine cannot
scale better than that, whatever its communication costs.

    .venv/bin/python benchmarks/bench_corun.py [--model resnet8-w1] [--batch 128] [--ranks 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def product_seconds(model_name: str, batch: int, repeats: int, wait: bool = False) -> float:
    """Median seconds of one double-backward H.v of ``model_name`` at ``batch`` random samples
    (``wait``: after the warm-up, print ``ready`` and wait for a line on stdin, so that several
    processes start their timed products together)."""
    import torch

    from hpcqml.hessian.hvp import HessianLinearOperator
    from hpcqml.models import build

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(model_name, 10)
    x = torch.randn(batch, 3, 32, 32, dtype=torch.float32)
    y = torch.randint(0, 10, (batch,))
    op = HessianLinearOperator(model, (x, y), torch.nn.CrossEntropyLoss(), route="double-backward")
    v = torch.randn(op.n, dtype=torch.float32)
    op.matvec(v)  # warm-up
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        op.matvec(v)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def in_children(model_name: str, batch: int, repeats: int, count: int) -> list[float]:
    """``count`` processes timing ``batch`` together: each builds and warms up its product,
    then all are released at once; their medians."""
    cmd = [sys.executable, __file__, "--child", "--model", model_name, "--batch", str(batch),
           "--repeats", str(repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(count)]
    for p in procs:  # every child warmed up ...
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise SystemExit("bench_corun: a child failed before its timed products")
    for p in procs:  # ... then all start their timed products at once
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"bench_corun: a child exited with {p.returncode}")
        out.append(float(json.loads(stdout.strip().splitlines()[-1])["seconds"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet8-w1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ranks < 1 or args.batch < 1 or args.repeats < 1:
        raise SystemExit("bench_corun: --ranks, --batch and --repeats must be >= 1")
    if args.batch % args.ranks:
        raise SystemExit(f"bench_corun: --batch {args.batch} is not a multiple of --ranks {args.ranks}")
    if args.child:
        print(json.dumps({"seconds": product_seconds(args.model, args.batch, args.repeats, wait=True)}))
        return
    from benchmarks.common import record

    part = args.batch // args.ranks
    whole = in_children(args.model, args.batch, args.repeats, 1)[0]
    alone = in_children(args.model, part, args.repeats, 1)[0]
    each = in_children(args.model, part, args.repeats, args.ranks)
    together = max(each)
    record("corun", [{
        "model": args.model, "B": args.batch, "P": args.ranks,
        "T(B) s": whole, "T(B/P) s": alone, "T_co(B/P) s": together,
        "co-run slowdown": together / alone, "batch-size effect": args.ranks * alone / whole,
        "efficiency ceiling": whole / (args.ranks * together),
        "spread of T_co over the processes": (max(each) - min(each)) / max(each),
    }], notes="double-backward H.v, 1 thread per process, medians of --repeats products; the ceiling is "
              "T(B) / (P T_co(B/P)); one run: repeat it for the run-to-run spread")


if __name__ == "__main__":
    main()
