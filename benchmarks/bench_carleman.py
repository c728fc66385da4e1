"""Benchmark of the distributed Carleman assembly and time stepping.

Driver (no MPI):   python benchmarks/bench_carleman.py [--quick] [--scale] [--out FILE.json]
  launches itself under ``mpirun -n 1`` and ``-n 2`` (override the launcher with $MPIEXEC) and
  prints one table:
  * compare: same sparse instance (n, N, T below), scipy reference (rank 0 of the 1-rank run)
    vs PETSc assembly of A and M, 1 vs 2 ranks, KSP solve vs forward iteration (PETSc MatMult
    and serial scipy); time and peak memory (tracemalloc for scipy/numpy, RSS growth and
    PETSc's MatInfo for PETSc);
  * --scale: n = 100, N = 3 (Delta = 1,010,100) and T = 9 ((T+1) Delta = 10,101,000 unknowns)
    on 2 ranks: assembly of A and M, KSP solve, forward iteration, memory per rank.
Worker:            mpirun -n P python benchmarks/bench_carleman.py --worker compare|scale ...
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(mode: str, n: int, N: int, T: int, f2: int) -> None:
    from mpi4py import MPI

    from hpcqml.carleman import generators as gen
    from hpcqml.carleman import petsc_assembly as pa
    from hpcqml.carleman import reference as ref
    from hpcqml.carleman import timestepping as ts
    from hpcqml.carleman.instance import lift

    comm = MPI.COMM_WORLD
    ode = gen.scale_step(gen.sparse_quadratic(n, 1.0, 0, f2_per_row=f2), 0.25)
    out: dict = {"mode": mode, "ranks": comm.size, "n": n, "N": N, "T": T}
    b = ref.carleman_rhs(ode, N)
    y0 = lift(ode.u_in, N)

    if mode == "compare" and comm.size == 1:
        tracemalloc.start()
        t0 = time.perf_counter()
        A_ref = ref.carleman_matrix(ode, N)
        out["scipy_A_s"] = time.perf_counter() - t0
        out["scipy_A_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        M_ref, _ = ref.block_system(A_ref, ode, N, T)
        out["scipy_M_s"] = time.perf_counter() - t0
        out["scipy_M_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t0 = time.perf_counter()
        Y_ref = ref.forward_iteration(A_ref, b, y0, T)
        out["scipy_forward_s"] = time.perf_counter() - t0
        del M_ref

    warm, _ = pa.assemble_carleman(gen.logistic(1.0, 1.0, 0.1), 2, comm)  # first-call (import/setup) costs
    warm.destroy()
    comm.Barrier()
    rss0 = _rss()
    A, stA = pa.assemble_carleman(ode, N, comm)
    out.update(Delta=stA.rows, nnz_A=stA.nnz, petsc_A_s=stA.seconds,
               petsc_A_rss_growth_bytes=comm.allgather(_rss() - rss0), petsc_A_mat_bytes=stA.mat_bytes_per_rank)
    comm.Barrier()
    rss0 = _rss()
    M, B, stM = pa.assemble_block_system(ode, N, T, comm)
    out.update(unknowns=stM.rows, nnz_M=stM.nnz, petsc_M_s=stM.seconds,
               petsc_M_rss_growth_bytes=comm.allgather(_rss() - rss0), petsc_M_mat_bytes=stM.mat_bytes_per_rank)
    comm.Barrier()
    x, its, reason, kt, pt, res, sec = ts.solve_ksp(M, B)
    out.update(ksp_s=comm.allreduce(sec, op=MPI.MAX), ksp_iterations=its, ksp_reason=reason, ksp=f"{kt}+{pt}")
    # forward iteration with distributed MatMult, keeping only y(T) (no gather per step)
    comm.Barrier()
    t0 = time.perf_counter()
    y = A.createVecRight()
    r0, r1 = y.getOwnershipRange()
    y.setArray(y0[r0:r1])
    bl = y.duplicate()
    bl.setArray(b[r0:r1])
    tmp = y.duplicate()
    for _ in range(T):
        A.mult(y, tmp)
        y.axpy(1.0, tmp)
        y.axpy(1.0, bl)
    out["petsc_forward_s"] = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    # compare y(T) with the last block of the KSP solution
    D = stA.rows
    yT = pa.to_numpy_all(y)
    X = pa.to_numpy_all(x)
    out["ksp_vs_forward_rel"] = float(np.linalg.norm(X[T * D:] - yT) / np.linalg.norm(yT))
    if mode == "compare" and comm.size == 1:
        out["petsc_vs_scipy_forward_rel"] = float(np.linalg.norm(yT - Y_ref[-1]) / np.linalg.norm(Y_ref[-1]))
    out["peak_rss_bytes_per_rank"] = comm.allgather(_peak())
    if comm.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def launch(ranks: int, args: list[str], timeout: float) -> dict:
    launcher = shlex.split(os.environ.get("MPIEXEC", "mpirun --allow-run-as-root --oversubscribe"))
    cmd = [*launcher, "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--worker", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker failed ({res.returncode}): {res.stderr[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=("compare", "scale"))
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--N", type=int, default=3)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--f2", type=int, default=4, help="nonzeros per row of F2")
    p.add_argument("--quick", action="store_true", help="small compare case only (seconds)")
    p.add_argument("--scale", action="store_true", help="also the Delta >= 1e6, (T+1)Delta >= 1e7 run on 2 ranks")
    p.add_argument("--out", default="", help="write all results as JSON here")
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.n, a.N, a.T, a.f2)
        return
    n = 10 if a.quick else a.n
    rows = []
    for ranks in (1, 2):
        rows.append(launch(ranks, ["compare", "--n", str(n), "--N", str(a.N), "--T", str(a.T), "--f2", str(a.f2)],
                           a.timeout))
    if a.scale:
        rows.append(launch(2, ["scale", "--n", "100", "--N", "3", "--T", "9", "--f2", str(a.f2)], a.timeout))
    mib = 1 / 2**20
    one = rows[0]
    print(f"instance: sparse_quadratic n={one['n']} N={one['N']} T={one['T']} Delta={one['Delta']} "
          f"nnz(A)={one['nnz_A']} unknowns={one['unknowns']} nnz(M)={one['nnz_M']}")
    print(f"scipy reference (1 rank): A {one['scipy_A_s']:.3f} s, peak {one['scipy_A_peak_bytes'] * mib:.1f} MiB; "
          f"M {one['scipy_M_s']:.3f} s, peak {one['scipy_M_peak_bytes'] * mib:.1f} MiB; "
          f"forward iteration {one['scipy_forward_s']:.3f} s")
    print(f"{'mode':8} {'ranks':>5} {'Delta':>9} {'unknowns':>10} {'A s':>7} {'M s':>7} {'KSP s':>7} {'its':>4} "
          f"{'fwd s':>7} {'M MiB/rank':>11} {'peakRSS MiB/rank':>17} {'|KSP-fwd|/|fwd|':>15}")
    for r in rows:
        print(f"{r['mode']:8} {r['ranks']:>5} {r['Delta']:>9} {r['unknowns']:>10} {r['petsc_A_s']:>7.3f} "
              f"{r['petsc_M_s']:>7.3f} {r['ksp_s']:>7.3f} {r['ksp_iterations']:>4} {r['petsc_forward_s']:>7.3f} "
              f"{'/'.join(f'{v * mib:.0f}' for v in r['petsc_M_mat_bytes']):>11} "
              f"{'/'.join(f'{v * mib:.0f}' for v in r['peak_rss_bytes_per_rank']):>17} "
              f"{r['ksp_vs_forward_rel']:>15.2e}")
    two = rows[1]
    print(f"ratios: PETSc/scipy assembly time A {one['petsc_A_s'] / one['scipy_A_s']:.2f}, "
          f"M {one['petsc_M_s'] / one['scipy_M_s']:.2f}; "
          f"1->2 ranks speed-up A {one['petsc_A_s'] / two['petsc_A_s']:.2f}, "
          f"M {one['petsc_M_s'] / two['petsc_M_s']:.2f}, KSP {one['ksp_s'] / two['ksp_s']:.2f}; "
          f"KSP/forward time (1 rank) {one['ksp_s'] / one['petsc_forward_s']:.2f}, (2 ranks) "
          f"{two['ksp_s'] / two['petsc_forward_s']:.2f}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import record

    record("carleman", [{k: (v if not isinstance(v, list) else json.dumps(v)) for k, v in r.items()} for r in rows],
           "PETSc assembly/KSP vs the scipy reference and forward iteration, same instance, 1 and 2 ranks")


if __name__ == "__main__":
    main()
