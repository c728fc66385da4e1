"""Every row of BENCHMARKS.md's GPU tables, measured in one run on one CUDA device.

    PYTHONPATH=. python benchmarks/gpu_all.py            # or: make bench-gpu
    PYTHONPATH=. python benchmarks/gpu_all.py --smoke    # tiny sizes on the CPU (checks the script)

Random CIFAR-shaped data (fixed seed), TF32 on unless a row says otherwise, cuDNN benchmark
mode.  Times are medians of 3 after a warm-up; peak memory is the device's peak allocation
during the row.  Rows, in order:

1. gradient of the mean loss (resnet32-w4, B = 2048, micro-batch 1024);
2. one H.v by each route (double backward, func, compiled; the compile time apart) and a
   block product of 8 columns on the func route (vmap over tangents, micro-batch 256 so the
   batched activations fit), per column;
3. lockstep: 8 probes x 10 Lanczos steps advanced together (one block product per step)
   against the same probes one after another (func route, micro-batch 256);
4. SLQ, one probe, m = 100 Lanczos steps, full reorthogonalisation, basis on the device;
5. resnet56-w11 (103.7 M parameters): one H.v on the func route, micro-batch 128, and its
   peak memory;
6. TF32 against strict fp32 on a spectrum: SLQ m = 40 from the same probe with each, the
   extreme Ritz values and the quadratic form compared, and the time of each.

A row that runs out of memory is recorded as such; a row that would exceed the time budget
(``--budget``, default 540 s) is skipped and named.  Records go to ``results/bench.h5``
(:func:`benchmarks.common.record`) and, when ``$OUT`` is set, to ``$OUT/gpu_all.json``.
Nothing here needs petsc4py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import record
from hpcqml.hessian.hvp import HessianLinearOperator, compile_available
from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.hessian.lockstep import lanczos_lockstep
from hpcqml.models import build

SIZES = {
    "full": {"model": "resnet32-w4", "big": "resnet56-w11", "batch": 2048, "micro": 1024, "big_micro": 128,
             "classes": 100, "width": 8, "probes": 8, "lock_steps": 10, "slq_steps": 100, "tf32_steps": 40,
             "repeats": 3, "block_micro": 256},
    "smoke": {"model": "resnet8-w1", "big": "resnet8-w1", "batch": 4, "micro": 4, "big_micro": 2,
              "classes": 10, "width": 2, "probes": 2, "lock_steps": 2, "slq_steps": 3, "tf32_steps": 2, "repeats": 1,
              "block_micro": 2},
}


class Clock:
    """Wall time since the start, the budget left, and progress lines with flush."""

    def __init__(self, budget: float) -> None:
        self.t0 = time.perf_counter()
        self.budget = budget

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.budget - (time.perf_counter() - self.t0)

    def log(self, msg: str) -> None:
        """Print a progress line."""
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak device memory allocated since :func:`peak_reset` (nan on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of ``repeats`` calls after one warm-up, and their spread (max - min)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times) - min(times)


def set_tf32(on: bool) -> None:
    """TF32 tensor-core arithmetic for matmuls and convolutions on or off."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def data(size: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random CIFAR-shaped inputs and labels (seed 0) on ``device``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size["batch"], 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, size["classes"], (size["batch"],), generator=g).to(device)
    return x, y


def operator(name: str, size: dict[str, Any], device: torch.device, route: str, micro: int,
             x: torch.Tensor, y: torch.Tensor) -> HessianLinearOperator:
    """The Hessian operator of a fresh model (seed 0) on the mean cross-entropy of (x, y)."""
    torch.manual_seed(0)
    model = build(name, size["classes"]).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return HessianLinearOperator(model, (x, y), torch.nn.CrossEntropyLoss(), route=route, micro_batch=micro,
                                 check_finite=False)


def row(what: str, seconds: float, spread: float, memory: float, note: str = "") -> dict[str, object]:
    """One table row."""
    return {"what": what, "seconds": seconds, "spread s": spread, "peak GiB": memory, "note": note}


def guarded(rows: list[dict[str, object]], clock: Clock, what: str, need: float,
            fn: Callable[[], list[dict[str, object]]]) -> None:
    """Run one part when the budget allows; out-of-memory and skips become rows."""
    if clock.left() < need:
        clock.log(f"skip {what}: {clock.left():.0f} s left, needs about {need:.0f} s")
        rows.append(row(what, float("nan"), float("nan"), float("nan"), "skipped: time budget"))
        return
    clock.log(f"start {what}")
    try:
        rows.extend(fn())
    except torch.cuda.OutOfMemoryError as exc:
        rows.append(row(what, float("nan"), float("nan"), float("nan"), f"out of memory: {str(exc)[:80]}"))
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    clock.log(f"done {what}")


def part_products(size: dict[str, Any], device: torch.device, compile_too: bool) -> list[dict[str, object]]:
    """Gradient, H.v by each route, and the vmap block product per column."""
    x, y = data(size, device)
    rows = []
    op = operator(size["model"], size, device, "double-backward", size["micro"], x, y)
    peak_reset(device)
    g, gs = timed(op.gradient, device, size["repeats"])
    rows.append(row(f"{size['model']} gradient, mb {size['micro']}", g, gs, peak_gib(device)))
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(1)).to(device)
    routes = ["double-backward", "func"] + (["compiled"] if compile_too else [])
    want = None
    for route in routes:
        op = operator(size["model"], size, device, route, size["micro"], x, y)
        peak_reset(device)
        t, ts = timed(lambda op=op: op.matvec(v), device, size["repeats"])
        got = op.matvec(v)
        want = got if want is None else want
        diff = float((got - want).norm() / want.norm())
        note = f"{t / g:.2f}x gradient; rel. diff to double backward {diff:.1e}"
        if route == "compiled":
            note += f"; compile {op.compile_seconds:.1f} s (apart)"
        rows.append(row(f"H.v {route}", t, ts, peak_gib(device), note))
    # The block product holds the activations of every column of a vmap chunk: a smaller
    # micro-batch keeps it in memory; the single product at that micro-batch is the baseline.
    mb = size["block_micro"]
    what = f"H.V func vmap, mb {mb}, per column of {size['width']}"
    try:
        op = operator(size["model"], size, device, "func", mb, x, y)
        V = torch.randn(op.n, size["width"], generator=torch.Generator().manual_seed(2)).to(device)
        one, _ = timed(lambda: op.matvec(V[:, 0]), device, size["repeats"])
        peak_reset(device)
        t, ts = timed(lambda: op.matmat(V), device, size["repeats"])
        k = size["width"]
        rows.append(row(what, t / k, ts / k, peak_gib(device),
                        f"{t / k / g:.2f}x gradient; {t / k / one:.2f}x one H.v at mb {mb}"))
    except torch.cuda.OutOfMemoryError:
        rows.append(row(what, float("nan"), float("nan"), float("nan"), "out of memory"))
    return rows


def part_lockstep(size: dict[str, Any], device: torch.device) -> list[dict[str, object]]:
    """8 probes in lockstep against one after another, and SLQ with m = 100."""
    x, y = data(size, device)
    op = operator(size["model"], size, device, "func", size["block_micro"], x, y)
    n, steps, k = op.n, size["lock_steps"], size["probes"]
    starts = [rademacher_slice(n, 0, n, seed=0, probe=p) for p in range(k)]
    sync(device)
    t0 = time.perf_counter()
    alone = [lanczos(op.matvec, n, None, z, steps=steps, probe=p, device=device) for p, z in enumerate(starts)]
    sync(device)
    sequential = time.perf_counter() - t0
    peak_reset(device)
    t0 = time.perf_counter()
    together = lanczos_lockstep(op.matmat, n, None, starts, list(range(k)), steps=steps, device=device)
    sync(device)
    lock = time.perf_counter() - t0
    diff = max(float(np.max(np.abs(a.nodes - b.nodes)) / max(float(np.max(np.abs(a.nodes))), 1e-30))
               for a, b in zip(alone, together, strict=True))
    rows = [row(f"SLQ {k} probes x {steps} steps, sequential", sequential, float("nan"), float("nan")),
            row(f"SLQ {k} probes x {steps} steps, lockstep", lock, float("nan"), peak_gib(device),
                f"{lock / sequential:.2f}x sequential; max rel. Ritz difference {diff:.1e}")]
    peak_reset(device)
    t0 = time.perf_counter()
    res = lanczos(op.matvec, n, None, starts[0], steps=size["slq_steps"], device=device)
    sync(device)
    rows.append(row(f"SLQ one probe, m = {size['slq_steps']}, func route", time.perf_counter() - t0,
                    float("nan"), peak_gib(device), f"Ritz range [{res.nodes.min():.3g}, {res.nodes.max():.3g}]"))
    return rows


def part_big(size: dict[str, Any], device: torch.device) -> list[dict[str, object]]:
    """The resnet56-w11 product and its peak memory."""
    x, y = data(size, device)
    op = operator(size["big"], size, device, "func", size["big_micro"], x, y)
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(1)).to(device)
    peak_reset(device)
    t, ts = timed(lambda: op.matvec(v), device, min(2, size["repeats"]))
    return [row(f"{size['big']} H.v func, mb {size['big_micro']} ({op.n} parameters)", t, ts, peak_gib(device))]


def part_tf32(size: dict[str, Any], device: torch.device) -> list[dict[str, object]]:
    """SLQ from one probe with TF32 and with strict fp32: extreme Ritz values, quadratic form."""
    x, y = data(size, device)
    out = {}
    for on in (True, False):
        set_tf32(on)
        op = operator(size["model"], size, device, "func", size["micro"], x, y)
        z = rademacher_slice(op.n, 0, op.n, seed=0, probe=0)
        sync(device)
        t0 = time.perf_counter()
        out[on] = (lanczos(op.matvec, op.n, None, z, steps=size["tf32_steps"], device=device),
                   time.perf_counter() - t0)
    set_tf32(True)
    (a, ta), (b, tb) = out[True], out[False]
    lo = abs(a.nodes.min() - b.nodes.min()) / max(abs(b.nodes).max(), 1e-30)
    hi = abs(a.nodes.max() - b.nodes.max()) / max(abs(b.nodes).max(), 1e-30)
    quad = abs(a.quad_form - b.quad_form) / max(abs(b.quad_form), 1e-30)
    note = (f"rel. diff: largest Ritz {hi:.1e}, smallest {lo:.1e} (of max |Ritz|), quadratic form {quad:.1e}; "
            f"untrained model")
    return [row(f"SLQ m = {size['tf32_steps']} TF32", ta, float("nan"), float("nan"), note),
            row(f"SLQ m = {size['tf32_steps']} strict fp32", tb, float("nan"), float("nan"),
                f"TF32 {tb / ta:.2f}x faster")]


def main(argv: list[str] | None = None) -> int:
    """Run every part and record the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    p.add_argument("--compile", choices=("yes", "no", "auto"), default="auto",
                   help="time the compiled route (auto: on a GPU, not in --smoke)")
    args = p.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_all.py: no CUDA device; use --smoke for a CPU check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        set_tf32(True)
        torch.backends.cudnn.benchmark = True
    compile_too = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    compile_too = compile_too and compile_available()
    clock = Clock(args.budget)
    rows: list[dict[str, object]] = []
    scale = 0.05 if args.smoke else 1.0
    guarded(rows, clock, "products", 60 * scale + (60 if compile_too else 0),
            lambda: part_products(size, device, compile_too))
    guarded(rows, clock, "lockstep and SLQ", 120 * scale, lambda: part_lockstep(size, device))
    guarded(rows, clock, "resnet56-w11 product", 60 * scale, lambda: part_big(size, device))
    guarded(rows, clock, "TF32 vs fp32", 90 * scale, lambda: part_tf32(size, device))
    notes = (f"{'smoke (tiny sizes, CPU)' if args.smoke else 'full'}; B = {size['batch']}; torch {torch.__version__}; "
             f"threads {torch.get_num_threads()}; wall {time.perf_counter() - clock.t0:.0f} s")
    record("gpu all", rows, notes=notes)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_all.json").write_text(json.dumps({"notes": notes, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
