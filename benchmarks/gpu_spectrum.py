"""One-H100 benchmark of the Hessian spectrum kernels.  Run from the repo root:

    python benchmarks/gpu_spectrum.py          # figures also go to $OUT/gpu_spectrum.json if $OUT is set

Random CIFAR-shaped data (B = 2048, fixed seed), TF32 convolutions/matmuls, one GPU:
  A. resnet32-w4 (7,451,044 parameters), micro-batches of 512: gradient time and peak memory;
     one H.v by double backward and by torch.func forward-over-reverse; PyHessian 0.1's
     data-loader product (chunks of 512) and its single-batch product; then SLQ with m = 100
     Lanczos steps, full reorthogonalisation, one Rademacher probe, end to end, with the
     faster route (basis on the GPU).
Environment: R32_MICRO (micro-batch of part A, default B/4), R32_CHANNELS_LAST=1 (channels-last
layout in part A), SKIP_PYHESSIAN=1, PARTS=a|b|ab (default ab).
  B. resnet56-w11 (103,703,700 parameters): one gradient, then 2 Lanczos steps (= 2 H.v)
     by double backward at a smaller micro-batch with the Krylov basis in host memory;
     time per H.v and peak GPU memory.
Progress lines are printed with flush; every part is guarded (OOM is recorded, not fatal)
and skipped when the time budget (env GPU_BUDGET_S, default 330 s) would be exceeded.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

T0 = time.time()
BUDGET = float(os.environ.get("GPU_BUDGET_S", "330"))
FIG: dict = {}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def left() -> float:
    return BUDGET - (time.time() - T0)


def save() -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_spectrum.json").write_text(json.dumps(FIG, indent=1, default=str) + "\n")


def gib(b: int) -> float:
    return b / 2**30


# Smoke mode for CPU checks of this script (SMOKE_CPU=1): tiny models, small batch.
SMOKE = os.environ.get("SMOKE_CPU") == "1"
R32 = "resnet8-w1" if SMOKE else "resnet32-w4"
R56 = "resnet14-w1" if SMOKE else "resnet56-w11"
BATCH = 32 if SMOKE else 2048
M_STEPS = 5 if SMOKE else 100
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak() -> float:
    """Peak GPU memory allocated by torch since the last reset, in GiB."""
    return gib(torch.cuda.max_memory_allocated()) if CUDA else float("nan")


def measure(name: str, fn, repeats: int = 2, warmup: int = 1) -> float | None:
    """Median seconds of ``fn`` and its peak GPU memory (GiB) into FIG[name]."""
    reset_peak()
    try:
        for _ in range(warmup):
            fn()
        sync()
        reset_peak()
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        FIG[name] = {"s": s, "peak_gib": peak(), "repeats": repeats}
        log(f"{name}: {s:.3f} s, peak {FIG[name]['peak_gib']:.1f} GiB")
        return s
    except torch.cuda.OutOfMemoryError:
        FIG[name] = {"error": "out of memory", "peak_gib": peak()}
        log(f"{name}: out of memory")
        return None
    finally:
        reset_peak()
        save()


def random_batch(B: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, 32, 32, generator=g).to(dev), torch.randint(0, 100, (B,), generator=g).to(dev)


def part_a(dev: torch.device) -> None:
    from hpcqml.hessian.hvp import HessianLinearOperator
    from hpcqml.hessian.lanczos import lanczos, rademacher_slice
    from hpcqml.models import build, count_parameters

    B = BATCH
    micro = int(os.environ.get("R32_MICRO", BATCH // 4))
    layout = torch.channels_last if os.environ.get("R32_CHANNELS_LAST") == "1" else torch.contiguous_format
    torch.manual_seed(0)
    model = build(R32, 100).to(dev).eval().to(memory_format=layout)
    x, y = random_batch(B, dev)
    x = x.contiguous(memory_format=layout)
    FIG["resnet32_w4"] = {"parameters": count_parameters(model), "batch": B, "micro_batch": micro,
                          "layout": str(layout).replace("torch.", "")}
    log(f"{R32}: {count_parameters(model)} parameters, B = {B}, micro-batch {micro}")
    ops = {r: HessianLinearOperator(model, (x, y), num_data=B, micro_batch=micro, route=r)
           for r in ("double-backward", "func")}
    n = ops["func"].n
    v = torch.from_numpy(rademacher_slice(n, 0, n, 0, 0)).float().to(dev)
    tg = measure("r32_gradient", ops["double-backward"].gradient)
    times = {}
    for r, op in ops.items():
        times[r] = measure(f"r32_hvp_{r}", lambda op=op: op.matvec(v))
        if tg and times[r]:
            FIG[f"r32_hvp_{r}"]["over_gradient"] = times[r] / tg
    try:
        if os.environ.get("SKIP_PYHESSIAN") == "1":
            raise ImportError("skipped (SKIP_PYHESSIAN=1)")
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        crit = torch.nn.CrossEntropyLoss()
        vp = [t.detach().clone() for t in ops["func"].space.to_params(v)]
        chunks = [(x[s:s + micro], y[s:s + micro]) for s in range(0, B, micro)]
        hl = PyHessian(model, crit, dataloader=chunks, cuda=CUDA)
        measure("r32_pyhessian_dataloader", lambda hl=hl: hl.dataloader_hv_product(vp), repeats=1)
        del hl
        model.zero_grad(set_to_none=True)
        if left() > 200:
            reset_peak()
            try:
                hs = PyHessian(model, crit, data=(x, y), cuda=CUDA)
                measure("r32_pyhessian_single_batch", lambda: hessian_vector_product(hs.gradsH, hs.params, vp),
                        repeats=1)
                del hs
            except torch.cuda.OutOfMemoryError:
                FIG["r32_pyhessian_single_batch"] = {"error": "out of memory"}
                log("pyhessian single batch: out of memory")
            model.zero_grad(set_to_none=True)
            reset_peak()
    except Exception as exc:  # noqa: BLE001 - a benchmark records and goes on
        FIG["r32_pyhessian_error"] = repr(exc)
        log(f"pyhessian failed: {exc!r}")
    save()
    ok = {r: t for r, t in times.items() if t}
    if not ok:
        return
    route = min(ok, key=ok.get)
    est = M_STEPS * ok[route] * 1.15 + 10
    if left() < est + 60:
        log(f"SLQ skipped: needs ~{est:.0f} s, {left():.0f} s left")
        FIG["r32_slq"] = {"skipped": f"time budget (needs ~{est:.0f} s)"}
        save()
        return
    log(f"SLQ m = {M_STEPS}, one probe, route {route} (est. {est:.0f} s)")
    reset_peak()
    sync()
    t = time.perf_counter()
    steps_done = [0]

    def mv(w: torch.Tensor, op: HessianLinearOperator = ops[route]) -> torch.Tensor:
        steps_done[0] += 1
        if steps_done[0] % 20 == 0:
            log(f"  Lanczos step {steps_done[0]}")
        return op.matvec(w)

    res = lanczos(mv, n, None, rademacher_slice(n, 0, n, 1, 0), steps=M_STEPS, reorth="full",
                  state_dtype=torch.float32, device=dev, basis_device=dev)
    sync()
    s = time.perf_counter() - t
    FIG["r32_slq"] = {"s": s, "route": route, "m": M_STEPS, "steps_done": res.steps, "breakdown": res.breakdown,
                      "peak_gib": peak(),
                      "lambda_max": float(res.nodes.max()), "lambda_min": float(res.nodes.min()),
                      "lambda_max_residual": float(res.residuals[np.argmax(res.nodes)]),
                      "trace_sample": res.quad_form}
    log(f"SLQ: {s:.1f} s for {res.steps} steps, peak {FIG['r32_slq']['peak_gib']:.1f} GiB, "
        f"lambda in [{res.nodes.min():.4g}, {res.nodes.max():.4g}]")
    save()
    del ops, mv, model, x, y, res
    reset_peak()


def part_b(dev: torch.device) -> None:
    from hpcqml.hessian.hvp import HessianLinearOperator
    from hpcqml.hessian.lanczos import lanczos, rademacher_slice
    from hpcqml.models import build, count_parameters

    B = BATCH
    micro_g = int(os.environ.get("R56_GRAD_MICRO", "256"))
    micro_h = int(os.environ.get("R56_HVP_MICRO", "64"))
    torch.manual_seed(0)
    model = build(R56, 100).to(dev).eval()
    x, y = random_batch(B, dev)
    n_par = count_parameters(model)
    FIG["resnet56_w11"] = {"parameters": n_par, "batch": B, "grad_micro_batch": micro_g, "hvp_micro_batch": micro_h}
    log(f"{R56}: {n_par} parameters")
    og = HessianLinearOperator(model, (x, y), num_data=B, micro_batch=micro_g, route="double-backward")
    tg = measure("r56_gradient", og.gradient, repeats=1)
    if left() < 90:
        log("resnet56-w11 H.v skipped: time budget")
        FIG["r56_hvp"] = {"skipped": "time budget"}
        save()
        return
    oh = HessianLinearOperator(model, (x, y), num_data=B, micro_batch=micro_h, route="double-backward")
    n = oh.n
    reset_peak()
    stamps = []

    def mv(w: torch.Tensor) -> torch.Tensor:
        sync()
        t = time.perf_counter()
        out = oh.matvec(w)
        sync()
        stamps.append(time.perf_counter() - t)
        log(f"  r56 H.v {len(stamps)}: {stamps[-1]:.2f} s")
        return out

    try:
        t = time.perf_counter()
        res = lanczos(mv, n, None, rademacher_slice(n, 0, n, 2, 0), steps=2, reorth="full",
                      state_dtype=torch.float32, device=dev, basis_device="cpu")
        FIG["r56_hvp"] = {"s_per_hvp": stamps, "lanczos_2_steps_s": time.perf_counter() - t,
                          "peak_gib": peak(), "basis": "host memory",
                          "alpha": res.alpha.tolist()}
        if tg:
            FIG["r56_hvp"]["over_gradient"] = min(stamps) / tg
        hv = min(stamps)
        FIG["r56_projection"] = {
            "note": "H.v compute per rank scales with the batch shard B/P; the allreduce moves "
                    "2*n*4 bytes per product (ring) at an assumed 25 GB/s",
            **{f"P{P}_s": hv / P + 2 * n * 4 / 25e9 for P in (1, 2, 4, 8)},
            "basis_gib_per_rank_m100": {f"P{P}": 100 * n * 4 / P / 2**30 for P in (1, 2, 4, 8)}}
        log(f"resnet56-w11 H.v {hv:.2f} s, peak {FIG['r56_hvp']['peak_gib']:.1f} GiB")
    except torch.cuda.OutOfMemoryError:
        FIG["r56_hvp"] = {"error": f"out of memory at micro-batch {micro_h}",
                          "peak_gib": peak()}
        log("resnet56-w11 H.v: out of memory")
    save()


def main() -> int:
    if not CUDA and not SMOKE:
        print("no CUDA device (SMOKE_CPU=1 runs a tiny CPU check of this script)", flush=True)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda" if CUDA else "cpu")
    FIG.update({"device": torch.cuda.get_device_name(dev) if CUDA else "cpu (smoke)", "torch": torch.__version__,
                "tf32": True, "budget_s": BUDGET})
    log(f"device {FIG['device']}, torch {torch.__version__}")
    parts = {"a": part_a, "b": part_b}
    for part in (parts[p] for p in os.environ.get("PARTS", "ab")):
        try:
            part(dev)
        except Exception:  # noqa: BLE001 - record, continue with the next part
            FIG[f"{part.__name__}_error"] = traceback.format_exc()
            log(f"{part.__name__} failed:\n{traceback.format_exc()}")
        reset_peak()
        save()
    FIG["total_s"] = time.time() - T0
    save()
    log("done")
    print(json.dumps(FIG, indent=1, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
