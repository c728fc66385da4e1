"""Hessian, GGN and Hessian - GGN spectra of one pipeline snapshot (docs/science.md numbers).

Usage::

    python benchmarks/hessian_ggn_split.py WORKDIR STEP [--batch 128] [--probes 3] [--steps 15]

``WORKDIR`` is a run's work directory (``<output>.work``: ``snapshots/step_XXXXXX.pt`` and
``data/``); the fixed batch is the spectrum stage's (``batch_indices(N, B, seed, step)``).
Prints, per operator, n, the SLQ extremes, the trace, the negative mass and, with the
[train] learning rate, the dissipative fraction (eq. II.28) and the error proxy (eq. III.12)
at t = 10 and 100, each with its standard error over probes.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    """Run the three spectra and print one line per quantity."""
    import hpcqml
    from hpcqml.data.batches import batch_indices, to_tensor
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.hessian.curvature import build_curvature
    from hpcqml.training.checkpoint import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("step", type=int)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--micro", type=int, default=64)
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eta", type=float, default=0.01, help="learning rate of a = -eta*lambda ([train] lr)")
    ap.add_argument("--cutoff", type=float, default=0.4)
    ap.add_argument("--kinds", default="hessian,ggn,hessian-minus-ggn")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(args.workdir / "snapshots" / f"step_{args.step:06d}.pt")
    data = load_cifar100(args.workdir / "data")
    idx = batch_indices(len(data.train_y), args.batch, args.seed, ck.step)
    x = to_tensor(data.train_x[idx]).to(dtype=next(ck.model.parameters()).dtype)
    y = torch.from_numpy(data.train_y[idx])
    ops = build_curvature(args.kinds.split(","), ck.model, (x, y), wrt="support", mask=ck.mask,
                          micro_batch=args.micro, route="double-backward")
    print(f"snapshot step {ck.step}, B = {args.batch}, dtype {x.dtype}, probes {args.probes}, "
          f"Lanczos steps {args.steps}, eta {args.eta}, cutoff {args.cutoff}")
    for name, op in ops.items():
        t0 = time.perf_counter()
        spec = hpcqml.slq(op, probes=args.probes, steps=args.steps, seed=1)
        (lo, rlo), (hi, rhi) = spec.extremes()
        print(f"{name}: n = {op.n}, {time.perf_counter() - t0:.0f} s")
        print(f"  lambda_min = {lo:.4g} (residual {rlo:.2g}), lambda_max = {hi:.4g} (residual {rhi:.2g})")
        print(f"  trace = {spec.trace().text()}")
        print(f"  negative mass = {spec.negative_mass().text()}")
        print(f"  dissipative fraction = "
              f"{spec.dissipative_fraction('eta', eta=args.eta, cutoff=args.cutoff).text()}")
        for t in (10, 100):
            print(f"  E(t={t}) = {spec.error_proxy(t, 'eta', eta=args.eta, cutoff=args.cutoff).text()}")


if __name__ == "__main__":
    main()
