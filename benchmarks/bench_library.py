"""CPU benchmark of the library Hessian operator against curvlinops and PyHessian, and of start-up.

Run (one rank, one thread):

    OMP_NUM_THREADS=1 python benchmarks/bench_library.py --model resnet8-w1 --batch 64

Measures, in one run on the same model, batch and vectors (float32, eval-mode BatchNorm):
  * ``HessianLinearOperator`` products by double backward and by torch.func, one micro-batch;
  * curvlinops 3.0.1 ``HessianLinearOperator`` on the same batch;
  * PyHessian 0.1's data-loader product on the same batch;
  * relative differences of every product to our double-backward product;
  * wall time of ``hpcqml --help``, ``hpcqml validate jobs/configs/demo.toml`` and ``python -c
    'import torch'`` as child processes (median of 5), so the start-up can be read as a ratio.
Medians of ``--repeats`` interleaved products after one warm-up each.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record

REPO = Path(__file__).resolve().parent.parent


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child_seconds(args: list[str], repeats: int = 5) -> float:
    """Median wall seconds of a child process (start-up included)."""
    def run() -> None:
        subprocess.run(args, check=True, capture_output=True, cwd=REPO, timeout=120)
    return median_seconds(run, repeats)


def products(model_name: str, batch: int, repeats: int) -> list[dict]:
    """Time the products of the three libraries and compare them with ours."""
    import curvlinops
    from pyhessian import hessian as pyhessian

    from hpcqml.hessian.hvp import HessianLinearOperator
    from hpcqml.models import build

    torch.manual_seed(0)
    model = build(model_name, num_classes=100).eval()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 100, (batch,))
    loss = torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = {route: HessianLinearOperator(model, (x, y), loss, route=route)
            for route in ("double-backward", "func")}
    v = torch.randn(ours["func"].n)
    theirs = curvlinops.HessianLinearOperator(model, loss, params, [(x, y)], check_deterministic=False)
    ph = pyhessian(model, loss, dataloader=[(x, y)], cuda=False)
    v_list = [t.reshape_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params, strict=True)]

    def pyhessian_product() -> torch.Tensor:
        _, hv = ph.dataloader_hv_product(v_list)
        return torch.cat([h.reshape(-1) for h in hv])

    runs = {"hpcqml double backward": lambda: ours["double-backward"] @ v,
            "hpcqml torch.func": lambda: ours["func"] @ v,
            "curvlinops 3.0.1": lambda: theirs @ v,
            "PyHessian 0.1 data-loader": pyhessian_product}
    reference = runs["hpcqml double backward"]()
    rows = []
    for name, fn in runs.items():
        seconds = median_seconds(fn, repeats)
        diff = float((fn() - reference).norm() / reference.norm())
        rows.append({"product": name, "seconds": round(seconds, 4), "relative difference": f"{diff:.1e}"})
    base = next(r["seconds"] for r in rows if r["product"] == "curvlinops 3.0.1")
    for r in rows:
        r["x curvlinops time"] = round(r["seconds"] / base, 2)
    return rows


def startup() -> list[dict]:
    """Start-up of the CLI paths that must not import torch, beside torch's own import."""
    hpcqml = [sys.executable, "-m", "hpcqml"]
    rows = [{"command": "hpcqml --help", "seconds": child_seconds([*hpcqml, "--help"])},
            {"command": "hpcqml validate jobs/configs/demo.toml",
             "seconds": child_seconds([*hpcqml, "validate", "jobs/configs/demo.toml"])},
            {"command": "python -c 'import torch'", "seconds": child_seconds([sys.executable, "-c", "import torch"])}]
    for r in rows:
        r["seconds"] = round(r["seconds"], 3)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8-w1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    record("library_products", products(args.model, args.batch, args.repeats),
           notes=f"{args.model}, B = {args.batch}, float32, 1 thread, one micro-batch")
    record("cli_startup", startup(), notes="child processes, median of 5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
