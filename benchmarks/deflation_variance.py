"""Probe-to-probe variance of the error proxy E(t) with and without deflating the top-k eigenpairs.

Run (one rank, one thread, about a minute on 2 CPU cores):

    OMP_NUM_THREADS=1 python benchmarks/deflation_variance.py --k 8 --probes 20 --steps 30

A small convolutional network (Conv2d + BatchNorm + Tanh + Linear, float64) is trained a
few SGD steps on a synthetic, learnable 5-class image set; its exact Hessian at the final
weights is the operator.  The same Rademacher probes (numbers 0..probes-1) then run plain
SLQ (:func:`hpcqml.slq`) and deflated SLQ (:func:`hpcqml.hessian.eigenpairs.deflated_slq`
after :func:`~hpcqml.hessian.eigenpairs.top_eigenpairs` with ``--which``).  For E(10) and
E(100) (eq. III.12/III.13) in the paper convention (a = -lambda, cutoff |lambda| >= 0.4 and 0.1)
and in the eta convention (a = -eta lambda, eta the training learning rate, no cutoff), the table gives
the standard deviation of the per-probe values, the jackknife standard error of the pooled
estimate, the exact value from the dense Hessian's eigenvalues (``torch.func.hessian``) and
the probe-exact value of each method (the same probes, the spectral measure integrated
exactly with the dense eigenvectors: what the estimate would be without quadrature error).
Products are counted for both runs, the eigenpair solve included.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record

import hpcqml
from hpcqml.hessian.eigenpairs import deflated_slq, top_eigenpairs
from hpcqml.hessian.hvp import HessianLinearOperator
from hpcqml.hessian.lanczos import rademacher_slice
from hpcqml.hessian.proxy import error_proxy, modes


def snapshot(steps: int, lr: float, seed: int = 0):
    """The trained network and its data (synthetic classes with distinct mean images)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).double()
    g = torch.Generator().manual_seed(seed + 1)
    means = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (128,), generator=g)
    x = means[y] + 0.7 * torch.randn(128, 3, 6, 6, dtype=torch.float64, generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, x, y


def dense_eigh(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the Hessian formed densely (eval-mode BatchNorm, as the operator)."""
    names = [k for k, _ in net.named_parameters()]
    params = [p.detach() for p in net.parameters()]
    flat0 = torch.cat([p.reshape(-1) for p in params])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        ps, o = [], 0
        for p in params:
            ps.append(flat[o:o + p.numel()].view_as(p))
            o += p.numel()
        out = torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    net.eval()
    H = torch.func.hessian(loss)(flat0).numpy()
    return np.linalg.eigh(0.5 * (H + H.T))


def probe_exact(Q: np.ndarray, starts: np.ndarray, atoms: tuple[float, float], keep: np.ndarray,
                growth: np.ndarray) -> float:
    """E(t) of the probes with no quadrature error: ratio of the pooled exact numerators and masses.

    Probe l contributes ``(sum_atoms f + y_l^T f(H) y_l)/n`` with ``y_l`` the (projected) probe and
    ``f`` the kept-mode indicator times ``|1 + a|^t`` (numerator) or the indicator alone (mass).
    """
    c2 = (starts @ Q) ** 2                                     # (probes, n) squared coordinates
    f_num, f_den = np.where(keep, growth, 0.0), keep.astype(np.float64)
    a_num, a_den = atoms
    return float((a_num + c2 @ f_num).mean() / (a_den + c2 @ f_den).mean())


class Counted:
    """An operator wrapper counting products."""

    def __init__(self, op: HessianLinearOperator) -> None:
        self.op, self.n, self.dtype, self.device, self.count = op, op.n, op.dtype, op.device, 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.op.matvec(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--which", default="largest_magnitude", help="which eigenpairs to deflate")
    ap.add_argument("--no-record", action="store_true", help="print only (no results/bench.h5 entry)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    net, x, y = snapshot(args.train_steps, args.lr)
    ev, Q = dense_eigh(net, x, y)
    op = HessianLinearOperator(net, (x, y), torch.nn.functional.cross_entropy)
    plain_op, defl_op = Counted(op), Counted(op)
    plain = hpcqml.slq(plain_op, probes=args.probes, steps=args.steps, seed=0)
    pairs = top_eigenpairs(defl_op, args.k, args.which)
    solve = defl_op.count
    # the same probe budget of Lanczos steps per probe as the plain run
    deflated = deflated_slq(defl_op, pairs, probes=args.probes, steps=args.steps, seed=0).spectrum()
    n = op.n
    Z = np.stack([rademacher_slice(n, 0, n, 0, probe) for probe in range(args.probes)])
    U = pairs.gather_vectors()
    Y = Z - (Z @ U.T) @ U                                      # the projected probes P z
    settings = [("paper", None, 0.4), ("paper", None, 0.1), ("eta", args.lr, 0.0)]
    rows = []
    for convention, eta, cutoff in settings:
        for t in (10, 100):
            exact = float(error_proxy(ev, np.ones_like(ev), np.array([t]), cutoff, convention, eta or 1.0)[0])
            row = {"convention": convention, "eta": eta or "-", "cutoff": cutoff, "t": t, "exact": exact}
            keep = np.abs(ev) >= cutoff
            growth = np.abs(1.0 + modes(ev, convention, eta or 1.0)) ** t
            akeep = np.abs(pairs.values) >= cutoff
            agrowth = np.abs(1.0 + modes(pairs.values, convention, eta or 1.0)) ** t
            atoms = (float(np.sum(np.where(akeep, agrowth, 0.0))), float(np.sum(akeep)))
            row["plain probe-exact"] = probe_exact(Q, Z, (0.0, 0.0), keep, growth)
            row["deflated probe-exact"] = probe_exact(Q, Y, atoms, keep, growth)
            for name, spec in (("plain", plain), ("deflated", deflated)):
                est = spec.error_proxy(t, convention=convention, eta=eta, cutoff=cutoff)
                row[f"{name} value"] = est.value
                row[f"{name} probe std"] = float(np.std(est.per_probe, ddof=1))
                row[f"{name} stderr"] = est.stderr
            row["std ratio plain/deflated"] = (row["plain probe std"] / row["deflated probe std"]
                                               if row["deflated probe std"] > 0 else float("inf"))
            rows.append(row)
    notes = (f"n = {op.n} parameters, {args.train_steps} SGD steps (lr {args.lr}); k = {args.k} "
             f"({args.which}: {np.array2string(pairs.values, precision=3)}, max residual "
             f"{pairs.residuals.max():.2g}); {args.probes} probes x {args.steps} Lanczos steps; products: "
             f"plain {plain_op.count}, deflated {defl_op.count} (eigenpairs {solve}); exact spectrum "
             f"[{ev[0]:.3g}, {ev[-1]:.3g}]")
    if args.no_record:
        print(notes)
        for r in rows:
            print(r)
    else:
        record("deflation_variance", rows, notes)


if __name__ == "__main__":
    main()
