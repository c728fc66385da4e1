"""Time and memory of the two HHL simulators against the embedded dimension D, in one run.

Driver:  python benchmarks/bench_hhl_scale.py [--clock 6] [--sv-max-dim 2048] [--kr-max-rows 200000]
         [--out FILE.json]
  For Carleman block systems (random quadratic family, n = 2, N = 2, f = 1, so (T + 1) * 6
  unknowns, dilated: 2 (T + 1) 6 rows of H) it runs, each point in a fresh process on one rank
  so that the peak resident memory (ru_maxrss) belongs to that point alone:
  * statevector: ``embed`` + ``simulate_hhl`` (dense eigen-decomposition, clock register) for
    plain HHL and one kappa_a, up to D = --sv-max-dim;
  * krylov: ``EmbeddedOperator`` + ``simulate_hhl_krylov`` (Chebyshev, same two variants) up to
    --kr-max-rows unknowns;
  and prints one table (D, unknowns, method, seconds, peak MiB, max |difference| of p_success
  between the methods where both ran) and the crossover: the least D from which krylov is faster.
Worker:  python benchmarks/bench_hhl_scale.py --worker METHOD T C
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DELTA = 6  # n + n^2 for n = 2, N = 2


def _system(T: int):
    from hpcqml.carleman.cases import random_instance
    from hpcqml.carleman.reference import block_system, carleman_matrix

    ode = random_instance("random", 2, 1.0, 0, eta=0.25, u_scale=0.1)
    M, B = block_system(carleman_matrix(ode, 2), ode, 2, T)
    return M, np.asarray(B, dtype=np.float64), 2.0 * (T + 1)


def worker(method: str, T: int, c: int) -> dict:
    """One point: build, simulate plain HHL and kappa_a = 2(T+1), report time and peak memory."""
    from mpi4py import MPI
    from petsc4py import PETSc  # noqa: F401 - initialised before the clock starts

    from hpcqml.hhl.krylov import EmbeddedOperator, simulate_hhl_krylov
    from hpcqml.hhl.statevector import embed, simulate_hhl

    M, B, kappa = _system(T)
    start = time.perf_counter()
    if method == "statevector":
        system = embed(M, B)
        runs = [simulate_hhl(system, c), simulate_hhl(system, c, kappa_a=kappa)]
        dim, p = system.dim, [r.p_success for r in runs]
    else:
        with EmbeddedOperator(M, B, MPI.COMM_WORLD) as op:
            runs = simulate_hhl_krylov(op, c, [None, kappa])
            dim, p = op.dim, [r.p_success for r in runs]
    seconds = time.perf_counter() - start
    return {"method": method, "T": T, "unknowns": M.shape[0], "D": dim, "c": c, "seconds": seconds,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "p_success": p}


def _point(method: str, T: int, c: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", method, str(T), str(c)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clock", type=int, default=6)
    ap.add_argument("--sv-max-dim", type=int, default=2048)
    ap.add_argument("--kr-max-rows", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "T", "C"))
    args = ap.parse_args()
    if args.worker:
        method, T, c = args.worker
        print(json.dumps(worker(method, int(T), int(c))))
        return
    # T such that 2 (T + 1) DELTA fills D = 64 ... 4096 up to the last row, then larger systems
    Ts = [int(D // (2 * DELTA)) - 1 for D in (64, 128, 256, 512, 1024, 2048, 4096)]
    Ts += [1666, 16666, 166666]
    rows = []
    for T in Ts:
        unknowns = (T + 1) * DELTA
        dim = 1 << int(np.ceil(np.log2(2 * unknowns)))
        point = {}
        if dim <= args.sv_max_dim:
            point["statevector"] = _point("statevector", T, args.clock)
        if unknowns <= args.kr_max_rows:
            point["krylov"] = _point("krylov", T, args.clock)
        for rec in point.values():
            rows.append(rec)
            print(f"D {rec['D']:>9,}  S {rec['unknowns']:>9,}  {rec['method']:<11}  {rec['seconds']:9.3f} s  "
                  f"{rec['peak_mib']:9.1f} MiB", flush=True)
        if len(point) == 2:
            diff = max(abs(a - b) for a, b in zip(point["statevector"]["p_success"], point["krylov"]["p_success"],
                                                  strict=True))
            print(f"    max |p_success difference| = {diff:.1e}", flush=True)
    both = {}
    for rec in rows:
        both.setdefault(rec["D"], {})[rec["method"]] = rec["seconds"]
    cross = [D for D, t in sorted(both.items()) if len(t) == 2 and t["krylov"] < t["statevector"]]
    print(f"krylov faster from D = {cross[0]:,}" if cross else "krylov not faster at any measured D")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
