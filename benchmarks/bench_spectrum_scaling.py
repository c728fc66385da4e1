"""Strong scaling of the spectrum stage (probes one at a time and in lockstep) and of the train step.

Measures, in one run on one machine:

- the spectrum stage at demo-like settings (resnet8-w1, B = 128, double backward, 4 probes x
  20 Lanczos steps, ``--states`` model states) on 1 rank and on 2 ranks (``mpirun -n 2``), with
  probes one after another (``lockstep = 1``) and in lockstep (``lockstep = 4``);
- one data-parallel train step (resnet8-w1, B = 128) on 1 and on 2 ranks
  (``benchmarks/bench_train_step.py``).

For each spectrum run the table gives the stage's wall time (slowest rank), the strong-scaling
efficiency ``T_1 / (2 T_2)`` against the 1-rank run of the same mode, the lockstep speed-up, and
the time split from the per-rank performance record ``/perf/spectrum`` (largest over the ranks):
Allgatherv of the Lanczos vectors (counter ``allgatherv_seconds``), the other timed
communication (``comm_seconds`` less that: the allreduce of the products and the Lanczos
reductions), results-file I/O of the probes (``commit_seconds``) and the rest (compute: the
products, the recurrences, the estimates).  The Ritz values of the four runs must agree (float32
products summed in another order: about 1e-6 relative of the largest |theta|; the largest
difference is printed).  Every rank uses 1 thread.  It took 12.5 minutes on the shared 2-core
VM under a load average of 3-4 from other work (BENCHMARKS.md); the product time, about 2.5 s
per product there at B = 128, sets it, so ``--steps 10`` roughly halves it.

    .venv/bin/python benchmarks/bench_spectrum_scaling.py [--states 1] [--probes 4] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _mpirun(n: int) -> list[str]:
    cmd = ["mpirun", "--oversubscribe", "-n", str(n)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


def make_workdir(work: Path, states: int, batch: int, results: Path) -> None:
    """Synthetic 10-class data and ``states`` resnet8-w1 snapshots stamped for ``results``."""
    import torch

    from hpcqml.data.synth import write_synthetic
    from hpcqml.models import build
    from hpcqml.training.checkpoint import save_checkpoint

    write_synthetic(work / "data", n_train=max(1000, batch), n_test=10, classes=10, seed=0)
    for s in range(states):
        torch.manual_seed(s)
        save_checkpoint(work / "snapshots" / f"step_{s:06d}.pt", "resnet8-w1", 10, build("resnet8-w1", 10),
                        step=s, results=str(results.resolve()))


def write_config(path: Path, results: Path, work: Path, args: argparse.Namespace, lockstep: int) -> None:
    path.write_text(
        f'[run]\noutput = "{results}"\nworkdir = "{work}"\ndevice = "cpu"\nstages = ["spectrum"]\nseed = 0\n'
        f'threads = 1\n[spectrum]\nbatch_size = {args.batch}\nmicro_batch = {args.batch}\n'
        f'route = "double-backward"\nlanczos_steps = {args.steps}\nprobes = {args.probes}\n'
        f'lockstep = {lockstep}\nt_max = 30\nproxy_t = [10, 100]\n')


def spectrum_run(tmp: Path, ranks: int, lockstep: int, args: argparse.Namespace) -> dict[str, object]:
    """One spectrum stage run under ``mpirun -n ranks``; its row of the table."""
    name = f"r{ranks}_k{lockstep}"
    results, work = tmp / f"{name}.h5", tmp / f"{name}.work"
    make_workdir(work, args.states, args.batch, results)
    cfg = tmp / f"{name}.toml"
    write_config(cfg, results, work, args, lockstep)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(_mpirun(ranks) + [sys.executable, "-m", "hpcqml", "run", str(cfg), "--quiet"],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    launched = time.perf_counter() - t0
    with h5py.File(results, "r") as fh:
        g = fh["perf/spectrum"]
        wall = g["wall_seconds"][()]
        comm = g["comm_seconds"][()]
        counters = {k: v[()] for k, v in g["counters"].items()}
        nodes = np.concatenate([fh[f"spectrum/step_{s:06d}/result/nodes"][()].ravel() for s in range(args.states)])
    zero = np.zeros_like(wall)
    gather = counters.get("allgatherv_seconds", zero)
    io = counters.get("commit_seconds", zero)
    return {"ranks": ranks, "lockstep": lockstep, "stage s": float(wall.max()),
            "products per rank": float(counters.get("hvp_products", zero).max()),
            "compute s": float((wall - comm - io).max()), "allreduce s": float((comm - gather).max()),
            "Allgatherv s": float(gather.max()), "I/O s": float(io.max()), "launch+stage s": launched,
            "_nodes": nodes}


def train_step(ranks: int, batch: int) -> float:
    """Median seconds of one train step (resnet8-w1, ``batch``) on ``ranks`` ranks (slowest rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(_mpirun(ranks) + [sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"),
                                           "--model", "resnet8-w1", "--batch", str(batch), "--steps", "5",
                                           "--warmup", "2", "--device", "cpu", "--threads", "1"],
                         check=True, env=env, cwd=ROOT, capture_output=True, text=True).stdout
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return max(float(r["step_seconds_median"]) for r in recs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--states", type=int, default=1, help="model states measured (the demo has 4)")
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lockstep", type=int, default=4, help="probes per block product in the lockstep runs")
    args = p.parse_args()
    from benchmarks.common import record

    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcqml-scaling-") as d:
        tmp = Path(d)
        for lockstep in (1, args.lockstep):
            for ranks in (1, 2):
                rows.append(spectrum_run(tmp, ranks, lockstep, args))
    base = {r["lockstep"]: r["stage s"] for r in rows if r["ranks"] == 1}
    seq = {r["ranks"]: r["stage s"] for r in rows if r["lockstep"] == 1}
    ref = rows[0]["_nodes"]
    scale = float(np.max(np.abs(ref)))
    for r in rows:
        r["efficiency 1->2"] = base[r["lockstep"]] / (r["ranks"] * r["stage s"]) if r["ranks"] == 2 else 1.0
        r["lockstep / sequential"] = r["stage s"] / seq[r["ranks"]]
        r["max node diff / max|theta|"] = float(np.max(np.abs(r.pop("_nodes") - ref))) / scale
    t1, t2 = train_step(1, args.batch), train_step(2, args.batch)
    rows.append({"ranks": "train step 1 -> 2", "lockstep": "", "stage s": t2, "products per rank": "",
                 "compute s": "", "allreduce s": "", "Allgatherv s": "", "I/O s": "", "launch+stage s": "",
                 "efficiency 1->2": t1 / (2 * t2), "lockstep / sequential": "",
                 "max node diff / max|theta|": ""})
    record("spectrum stage scaling", rows,
           notes=f"resnet8-w1, B = {args.batch}, double backward, {args.probes} probes x {args.steps} steps, "
                 f"{args.states} state(s), 1 thread per rank; train step 1 rank {t1:.3f} s, 2 ranks {t2:.3f} s "
                 "(median of 5)")


if __name__ == "__main__":
    main()
