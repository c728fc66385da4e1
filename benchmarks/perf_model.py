"""A performance model of the spectrum stage, calibrated here and projected to many ranks.

One Lanczos step of one probe on P data-parallel ranks costs

    T_step(P) = (B / P) * h                                   compute: H.v over this rank's samples
              + allreduce(n * s)                              the product's sum over ranks
              + allgatherv(n * s)                             the sharded basis vector, made whole
              + 2 * allreduce(j * 8) + 4 * allreduce(8)       Gram-Schmidt coefficients, norms
              + (n / P) * j * s * 2 / bw_mem                  reorthogonalisation against j vectors

with B the Hessian batch, h the product's seconds per sample (``hpcqml calibrate``), n the
parameters, s the bytes per value (4 for float32), j the step number (averaged over m steps)
and bw_mem the memory bandwidth.  Collectives follow the usual latency-bandwidth (alpha-beta)
forms for ring algorithms: ``allreduce(x) = 2 log2(P) alpha + 2 (P-1)/P x beta`` and
``allgatherv(x) = log2(P) alpha + (P-1)/P x beta``.

``--measure`` (run under ``mpirun -n 2``) fits alpha and beta of this machine's MPI from
timed Allreduce and Allgatherv calls; ``--check`` sets the model's 2-rank prediction of the
spectrum stage beside the measured one (``benchmarks/bench_spectrum_scaling.py``), with the
two effects of ranks sharing one machine measured by ``benchmarks/bench_corun.py``: the
product's cost per sample at B/2 against B, and the slowdown of two products computed at
once; ``--project`` prints the strong-scaling projection for resnet32-w4 and resnet56-w11
on a stated interconnect.  Projections are a model, not a measurement, and BENCHMARKS.md
labels them so.

    mpirun --allow-run-as-root -n 2 .venv/bin/python benchmarks/perf_model.py --measure
    .venv/bin/python benchmarks/perf_model.py --check --alpha 2.2e-6 --beta 9.0e-10
    .venv/bin/python benchmarks/perf_model.py --project --alpha 2e-6 --beta 4e-11 --h 2.5e-4
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Network:
    """Latency ``alpha`` (s) and inverse bandwidth ``beta`` (s/byte) of the collectives."""

    alpha: float
    beta: float

    def allreduce(self, nbytes: float, ranks: int) -> float:
        if ranks == 1:
            return 0.0
        return 2 * math.log2(ranks) * self.alpha + 2 * (ranks - 1) / ranks * nbytes * self.beta

    def allgatherv(self, nbytes: float, ranks: int) -> float:
        if ranks == 1:
            return 0.0
        return math.log2(ranks) * self.alpha + (ranks - 1) / ranks * nbytes * self.beta


@dataclass(frozen=True)
class Workload:
    """One spectrum: parameters n, Hessian batch B, Lanczos steps m, probes, bytes per value."""

    name: str
    n: int
    batch: int
    steps: int = 100
    probes: int = 4
    value_bytes: int = 4


def step_seconds(w: Workload, h: float, net: Network, ranks: int, mem_bw: float = 2e10) -> dict[str, float]:
    """The parts of one average Lanczos step on ``ranks`` ranks (module docstring)."""
    j = (w.steps + 1) / 2
    return {
        "compute": w.batch / ranks * h,
        "allreduce": net.allreduce(w.n * w.value_bytes, ranks) + 2 * net.allreduce(j * 8, ranks)
        + 4 * net.allreduce(8, ranks),
        "allgatherv": net.allgatherv(w.n * w.value_bytes, ranks),
        "reorth": w.n / ranks * j * w.value_bytes * 2 / mem_bw,
    }


def spectrum_seconds(w: Workload, h: float, net: Network, ranks: int, mem_bw: float = 2e10) -> float:
    """One spectrum's wall time: probes x steps average steps."""
    return w.probes * w.steps * sum(step_seconds(w, h, net, ranks, mem_bw).values())


def fit_alpha_beta(sizes: np.ndarray, seconds: np.ndarray, factor: float, ranks: int) -> Network:
    """Least-squares alpha, beta from timings of a collective whose model is
    ``log2(P) alpha * factor + (P-1)/P * bytes * beta * factor`` (factor 2 for allreduce).
    """
    a = np.column_stack([np.full(sizes.shape, factor * math.log2(ranks)), factor * (ranks - 1) / ranks * sizes])
    # relative residuals: small messages (latency) count as much as large ones (bandwidth)
    coef, *_ = np.linalg.lstsq(a / seconds[:, None], np.ones_like(seconds), rcond=None)
    return Network(alpha=max(float(coef[0]), 0.0), beta=max(float(coef[1]), 0.0))


def measure(repeats: int = 20) -> None:
    """Time Allreduce and Allgatherv of 8 B .. 32 MiB here and fit alpha, beta (rank 0 prints)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    p = comm.Get_size()
    sizes = np.array([2 ** k for k in range(3, 26, 2)], dtype=np.float64)
    results: dict[str, list[float]] = {"allreduce": [], "allgatherv": []}

    def timed(call) -> float:
        comm.Barrier()
        call()
        times = []
        for _ in range(repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return comm.allreduce(float(np.median(times)), op=MPI.MAX)

    for nbytes in sizes:
        count = max(int(nbytes) // 4, 1)
        send = np.ones(count, dtype=np.float32)
        recv = np.empty_like(send)
        local = max(count // p, 1)
        gathered = np.empty(local * p, dtype=np.float32)
        results["allreduce"].append(timed(lambda s=send, r=recv: comm.Allreduce(s, r)))
        results["allgatherv"].append(
            timed(lambda s=send[:local], g=gathered, k=local: comm.Allgatherv(s, [g, [k] * p])))
    if comm.Get_rank() == 0:
        ar = fit_alpha_beta(sizes, np.array(results["allreduce"]), 2.0, p)
        ag = fit_alpha_beta(sizes * 1.0, np.array(results["allgatherv"]), 1.0, p)
        rate = 1 / max(ar.beta, 1e-30) / 1e9
        print(f"ranks {p}: allreduce alpha {ar.alpha:.3g} s, beta {ar.beta:.3g} s/B ({rate:.2f} GB/s); "
              f"allgatherv alpha {ag.alpha:.3g} s, beta {ag.beta:.3g} s/B")
        for nbytes, t_ar, t_ag in zip(sizes, results["allreduce"], results["allgatherv"], strict=True):
            print(f"  {int(nbytes):>10} B  allreduce {t_ar * 1e6:10.1f} us  allgatherv {t_ag * 1e6:10.1f} us")


def two_rank_check(stage_1: float, measured_2: float, products: int, n: int, steps: int, batch_effect: float,
                   corun: float, net: Network) -> dict[str, float]:
    """The model's 2-rank spectrum stage from the 1-rank one, beside the measured time.

    Args:
        stage_1: the 1-rank stage's seconds (all of it compute: no communication there).
        measured_2: the 2-rank stage's measured seconds (slowest rank).
        products: products (block products in lockstep) per rank.
        n: parameters; the product and the Lanczos vector are ``n`` float32 values.
        steps: Lanczos steps per probe (sets the Gram-Schmidt reductions' length).
        batch_effect: ``2 T(B/2) / T(B)``, the product's cost per sample at half the batch.
        corun: ``T_co(B/2) / T(B/2)``, the slowdown of two products computed at once.
        net: alpha-beta of the collectives.

    Returns:
        Predicted compute and communication seconds, their sum, and both efficiencies
        ``stage_1 / (2 T_2)``.
    """
    compute = stage_1 / 2 * batch_effect * corun
    parts = step_seconds(Workload("check", n, batch=0, steps=steps), 0.0, net, 2)
    comm = products * (parts["allreduce"] + parts["allgatherv"])
    return {"compute": compute, "communication": comm, "predicted": compute + comm,
            "predicted efficiency": stage_1 / (2 * (compute + comm)), "measured": measured_2,
            "measured efficiency": stage_1 / (2 * measured_2)}


def project(h: dict[str, float], net: Network, ranks: list[int], batch: int, mem_bw: float) -> None:
    """Print the projected strong scaling of one spectrum for the paper's two models."""
    models = [Workload("resnet32-w4", 7_451_044, batch), Workload("resnet56-w11", 103_703_700, batch)]
    print(f"PROJECTION (model, not measured): alpha {net.alpha:.3g} s, beta {net.beta:.3g} s/B "
          f"({1 / net.beta / 1e9:.1f} GB/s), memory bandwidth {mem_bw / 1e9:.0f} GB/s, B = {batch}")
    print("| model | ranks | spectrum s | efficiency | compute | allreduce | allgatherv | reorth |")
    print("|---|---|---|---|---|---|---|---|")
    for w in models:
        base = spectrum_seconds(w, h[w.name], net, 1, mem_bw)
        for p in ranks:
            parts = step_seconds(w, h[w.name], net, p, mem_bw)
            total = spectrum_seconds(w, h[w.name], net, p, mem_bw)
            eff = base / (p * total)
            share = {k: v / sum(parts.values()) for k, v in parts.items()}
            print(f"| {w.name} | {p} | {total:.4g} | {eff:.2f} | {share['compute']:.0%} | {share['allreduce']:.0%} "
                  f"| {share['allgatherv']:.0%} | {share['reorth']:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="fit alpha, beta of this machine (run under mpirun)")
    ap.add_argument("--project", action="store_true", help="print the projection for 8..1024 ranks")
    ap.add_argument("--alpha", type=float, default=2e-6, help="latency s (default: an HDR InfiniBand fabric)")
    ap.add_argument("--beta", type=float, default=1 / 20e9, help="s per byte (default: 20 GB/s per rank)")
    ap.add_argument("--h32", type=float, default=0.514 / 2048,
                    help="resnet32-w4 H.v s/sample (default: the H100 figure of BENCHMARKS.md)")
    ap.add_argument("--h56", type=float, default=2.5 * 2.17 / 2048,
                    help="resnet56-w11 H.v s/sample (default: 2.5 H100 gradients of BENCHMARKS.md)")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--mem-bw", type=float, default=2e12, help="bytes/s for reorthogonalisation (GPU HBM default)")
    ap.add_argument("--check", action="store_true",
                    help="the model's 2-rank spectrum stage against the measured one (defaults: the quiet "
                         "2-core VM run of BENCHMARKS.md)")
    ap.add_argument("--stage1", type=float, nargs=2, default=(192.2, 136.9), metavar=("SEQ", "LOCKSTEP"),
                    help="1-rank stage seconds, probes one at a time and 4 in lockstep")
    ap.add_argument("--stage2", type=float, nargs=2, default=(122.3, 84.92), metavar=("SEQ", "LOCKSTEP"),
                    help="2-rank stage seconds, measured")
    ap.add_argument("--batch-effect", type=float, default=2 * 1.046 / 2.311,
                    help="2 T(B/2) / T(B) from bench_corun.py")
    ap.add_argument("--corun", type=float, default=1.374 / 1.046, help="T_co(B/2) / T(B/2) from bench_corun.py")
    ap.add_argument("--n", type=int, default=78_042, help="parameters of the checked run (resnet8-w1)")
    ap.add_argument("--steps", type=int, default=20, help="Lanczos steps per probe of the checked run")
    ap.add_argument("--products", type=int, nargs=2, default=(80, 20), metavar=("SEQ", "LOCKSTEP"),
                    help="products per rank of the checked runs (block products in lockstep)")
    args = ap.parse_args()
    if args.measure:
        measure()
    if args.check:
        net = Network(args.alpha, args.beta)
        print(f"2-rank check: n = {args.n:,}, {args.steps} steps, {args.products[0]} / {args.products[1]} products "
              f"per rank, batch effect {args.batch_effect:.3f}, co-run {args.corun:.3f}, alpha {net.alpha:.3g} s, "
              f"beta {net.beta:.3g} s/B")
        print("| probes | predicted compute s | predicted communication s | predicted 2-rank s | measured 2-rank s "
              "| predicted efficiency | measured efficiency |")
        print("|---|---|---|---|---|---|---|")
        for mode, t1, t2, products in (("one at a time", args.stage1[0], args.stage2[0], args.products[0]),
                                       ("in lockstep", args.stage1[1], args.stage2[1], args.products[1])):
            r = two_rank_check(t1, t2, products, args.n, args.steps, args.batch_effect, args.corun, net)
            print(f"| {mode} | {r['compute']:.1f} | {r['communication']:.3f} | {r['predicted']:.1f} "
                  f"| {r['measured']:.1f} | {r['predicted efficiency']:.2f} | {r['measured efficiency']:.2f} |")
    if args.project:
        project({"resnet32-w4": args.h32, "resnet56-w11": args.h56}, Network(args.alpha, args.beta),
                 [1, 8, 16, 32, 64, 128, 256, 512, 1024], args.batch, args.mem_bw)


if __name__ == "__main__":
    main()
