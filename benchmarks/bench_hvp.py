"""CPU benchmark of Hessian-vector products and the SLQ basis memory.

Run (one line each; the second gives the 2-rank figures):

    mpirun -n 1 python benchmarks/bench_hvp.py --model resnet20-w1 --batch 64 --micro 32
    mpirun -n 2 python benchmarks/bench_hvp.py --model resnet20-w1 --batch 64 --micro 32

Measures, on the same model and random CIFAR-shaped batch (fixed seed):
  * gradient time; H.v time by double backward and by torch.func forward-over-reverse
    (ratios to the gradient); with several ranks the batch is sharded and the products
    allreduced (wall time per product, max over ranks);
  * PyHessian 0.1 on one rank: its data-loader product (chunks of --micro) and its
    single-batch product (graph of the whole batch kept);
  * SLQ basis memory: ``--basis-n`` x ``--m`` Lanczos on a diagonal stand-in operator of the
    size of resnet32-w4 (7,451,044) so the sharded basis dominates: peak RSS per rank and
    the basis share per rank (m * n / P values of float32).
Prints one JSON object (rank 0); ``--json PATH`` also writes it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import resource
import statistics
import sys
import time

import torch
from mpi4py import MPI


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, repeats: int, comm) -> float:
    """Median wall seconds over ``repeats`` calls (after one warm-up), max over ranks."""
    fn()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return comm.allreduce(statistics.median(times), op=MPI.MAX)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20-w1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--m", type=int, default=100, help="Lanczos steps for the basis-memory run (0 = skip)")
    ap.add_argument("--basis-n", type=int, default=7_451_044, help="operator size for the basis-memory run")
    ap.add_argument("--no-pyhessian", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    from hpcqml.hessian.hvp import HessianLinearOperator
    from hpcqml.hessian.lanczos import lanczos, rademacher_slice
    from hpcqml.parallel import block_bounds
    from hpcqml.models import build, count_parameters

    torch.manual_seed(0)
    model = build(args.model, 100).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (args.batch,), generator=g)
    lo, hi = block_bounds(args.batch, rank, size)
    out: dict = {"machine": "2-core CPU (shared)", "model": args.model, "parameters": count_parameters(model),
                 "batch": args.batch, "micro_batch": args.micro, "ranks": size, "threads_per_rank": args.threads,
                 "torch": torch.__version__}
    ops = {r: HessianLinearOperator(model, (x[lo:hi], y[lo:hi]), num_data=args.batch, comm=comm,
                                    micro_batch=args.micro, route=r)
           for r in ("double-backward", "func")}
    n = ops["func"].n
    v = torch.from_numpy(rademacher_slice(n, 0, n, seed=0, probe=0)).float()
    def emit(tag: str) -> None:
        if rank == 0:
            print(f"# after {tag}: " + json.dumps(out), flush=True)

    out["gradient_s"] = timed(ops["double-backward"].gradient, args.repeats, comm)
    for r, op in ops.items():
        out[f"hvp_{r}_s"] = timed(lambda op=op: op.matvec(v), args.repeats, comm)
        out[f"hvp_{r}_over_gradient"] = out[f"hvp_{r}_s"] / out["gradient_s"]
    out["peak_rss_mib_after_products"] = comm.allreduce(peak_rss_mib(), op=MPI.MAX)
    emit("products")

    if size == 1 and not args.no_pyhessian:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        crit = torch.nn.CrossEntropyLoss()
        chunks = [(x[s:s + args.micro], y[s:s + args.micro]) for s in range(0, args.batch, args.micro)]
        vp = [t.detach().clone() for t in ops["func"].space.to_params(v)]
        hl = PyHessian(model, crit, dataloader=chunks, cuda=False)
        out["pyhessian_dataloader_s"] = timed(lambda: hl.dataloader_hv_product(vp), args.repeats, comm)
        hs = PyHessian(model, crit, data=(x, y), cuda=False)
        out["pyhessian_single_batch_s"] = timed(
            lambda: hessian_vector_product(hs.gradsH, hs.params, vp), args.repeats, comm)
        _, ref = hl.dataloader_hv_product(vp)
        ours = ops["double-backward"].matvec(v)
        ref_flat = torch.cat([t.reshape(-1) for t in ref])
        out["pyhessian_rel_diff"] = float((ours - ref_flat).norm() / ref_flat.norm())
        out["ours_over_pyhessian_dataloader"] = out["hvp_double-backward_s"] / out["pyhessian_dataloader_s"]
        out["peak_rss_mib_after_pyhessian"] = peak_rss_mib()
        del hl, hs
        emit("pyhessian")

    if args.m > 0:
        nb = args.basis_n
        diag = torch.linspace(-1.0, 4.0, nb, dtype=torch.float32)
        blo, bhi = block_bounds(nb, rank, size)
        rss0 = comm.allreduce(peak_rss_mib(), op=MPI.MAX)
        comm.Barrier()
        t0 = time.perf_counter()
        res = lanczos(lambda w: diag * w, nb, comm, rademacher_slice(nb, blo, bhi, 0, 0), steps=args.m,
                      state_dtype=torch.float32)
        out["slq_basis_run"] = {
            "n": nb, "m": args.m, "steps_done": res.steps, "wall_s": time.perf_counter() - t0,
            "basis_share_mib_per_rank": args.m * (bhi - blo) * 4 / 2**20,
            "peak_rss_mib_per_rank": comm.gather(peak_rss_mib(), root=0),
            "peak_rss_mib_before": rss0, "lambda_max": float(res.nodes.max()),
        }
    if rank == 0:
        text = json.dumps(out, indent=1)
        print(text, flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import record

        rows = [{"quantity": k, "value": v} for k, v in out.items() if isinstance(v, (int, float, str))]
        record("hvp", rows, f"{args.model}, B = {args.batch}, micro-batch {args.micro}, {size} rank(s), "
                            f"{args.threads} thread(s) per rank; ratios taken in this one run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
