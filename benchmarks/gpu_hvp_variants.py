"""One-GPU follow-up to gpu_spectrum.py: H.v of resnet32-w4 at B = 2048 by route and
micro-batch size, and with channels-last memory format (the route and micro-batch choice).

    python benchmarks/gpu_hvp_variants.py     # figures also to $OUT/gpu_hvp_variants.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from hpcqml.hessian.hvp import HessianLinearOperator
from hpcqml.models import build


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 100, (2048,), generator=g).to(dev)
    out = {}
    for fmt in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = build("resnet32-w4", 100).to(dev).eval()
        xx = x
        if fmt == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
        grad_op = HessianLinearOperator(model, (xx, y), num_data=2048, micro_batch=512, route="double-backward")
        tg, mg = timed(grad_op.gradient)
        out[f"{fmt}/gradient_mb512"] = {"s": tg, "peak_gib": mg}
        print(f"{fmt} gradient mb512: {tg:.3f} s {mg:.1f} GiB", flush=True)
        v = torch.randn(grad_op.n, device=dev)
        for route, micros in (("func", (512, 1024, 2048)), ("double-backward", (512, 1024))):
            for mb in micros:
                op = HessianLinearOperator(model, (xx, y), num_data=2048, micro_batch=mb, route=route)
                try:
                    t, m = timed(lambda op=op, v=v: op.matvec(v))
                except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                    if "out of memory" not in str(exc):
                        raise
                    torch.cuda.empty_cache()
                    out[f"{fmt}/{route}_mb{mb}"] = {"error": "out of memory"}
                    print(f"{fmt} {route} mb{mb}: OOM", flush=True)
                    continue
                out[f"{fmt}/{route}_mb{mb}"] = {"s": t, "peak_gib": m, "over_gradient": t / tg}
                save(out)
                print(f"{fmt} {route} mb{mb}: {t:.3f} s ({t / tg:.2f}x gradient) {m:.1f} GiB", flush=True)
        del model, grad_op
    save(out)
    return 0


def save(out: dict) -> None:
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_hvp_variants.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
