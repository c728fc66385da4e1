"""Benchmark one data-parallel training step (global-batch BN, gradient allreduce, SGD).

Usage
  one configuration (any launcher):
    mpirun -n 2 python benchmarks/bench_train_step.py --model resnet32-w4 --batch 2048
  1 vs 2 ranks with the ratio (the default when not started by mpirun; spawns mpirun
  itself, prints a table and appends it to results/bench.h5 via benchmarks/common.py):
    python benchmarks/bench_train_step.py --model resnet32-w4 --batch 64 --compare 1,2
  on a GPU, micro-batched so that a large model fits (timing only, see below):
    python benchmarks/bench_train_step.py --model resnet56-w11 --batch 2048 --micro-batch 64 --device cuda

Each rank gets its shard of a batch of random CIFAR-sized images.  Reported: median
wall time per step over ``--steps`` timed steps after ``--warmup`` untimed ones, and the
peak memory per rank (CPU: peak RSS of the process, VmHWM; CUDA: peak allocated).

``--micro-batch m`` processes the rank's shard in chunks of m samples with ordinary
per-chunk BatchNorm statistics (ghost batches) and accumulates gradients before the one
allreduce: this is what fits a 103M-parameter model at B = 2048 on one GPU; its numbers
are a timing of the same amount of work, not the global-BN step the training stage runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpcqml.models import build, count_parameters
from hpcqml.parallel import allreduce_sum, block_bounds
from hpcqml.perf import _reset_peak_rss, peak_rss_bytes
from hpcqml.training.loop import train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _micro_step(model, comm, x, y, batch, opt, micro: int) -> None:
    opt.zero_grad(set_to_none=False)
    model.train()
    for s in range(0, x.shape[0], micro):
        out = model(x[s:s + micro])
        (F.cross_entropy(out, y[s:s + micro], reduction="sum") / batch).backward()
    params = [p for p in model.parameters()]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    allreduce_sum(comm, flat)
    off = 0
    for p in params:
        p.grad.copy_(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    opt.step()


def time_train_step(model_name: str, batch: int, comm, device: torch.device, steps: int = 3,
                    warmup: int = 1, micro_batch: int = 0, num_classes: int = 100) -> dict:
    """Time ``steps`` data-parallel SGD steps of ``model_name`` at global batch ``batch``.

    Collective over ``comm``; returns this rank's figures (seconds, bytes).
    """
    torch.manual_seed(0)
    model = build(model_name, num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    a, b = block_bounds(batch, comm.Get_rank(), comm.Get_size())
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(batch, 3, 32, 32, generator=g)
    y_all = torch.randint(0, num_classes, (batch,), generator=g)
    x, y = x_all[a:b].to(device), y_all[a:b].to(device)
    del x_all, y_all
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    times = []
    for i in range(warmup + steps):
        comm.Barrier()
        _sync(device)
        t0 = time.perf_counter()
        if micro_batch:
            _micro_step(model, comm, x, y, batch, opt, micro_batch)
        else:
            train_step(model, comm, x, y, batch, opt)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return {"model": model_name, "parameters": count_parameters(model), "batch": batch,
            "ranks": comm.Get_size(), "rank": comm.Get_rank(), "device": str(device),
            "micro_batch": micro_batch, "step_seconds_median": statistics.median(times),
            "step_seconds": times, "peak_memory_bytes": int(peak),
            "torch_threads": torch.get_num_threads()}


def _device(arg: str, comm) -> torch.device:
    if arg == "cpu" or (arg == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    from hpcqml.parallel import local_rank
    return torch.device("cuda", local_rank(comm) % torch.cuda.device_count())


def _under_mpirun() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def compare(args: argparse.Namespace, passthrough: list[str]) -> list[dict]:
    """Run this script under mpirun for each rank count in ``args.compare``; one row each."""
    rows, base = [], None
    for n in [int(v) for v in args.compare.split(",")]:
        cmd = ["mpirun", "--oversubscribe", "-n", str(n)]
        if os.geteuid() == 0:
            cmd.insert(1, "--allow-run-as-root")
        cmd += [sys.executable, __file__, *passthrough]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        step = max(r["step_seconds_median"] for r in recs)
        base = base or step
        rows.append({"model": args.model, "batch": args.batch, "ranks": n, "device": recs[0]["device"],
                     "threads_per_rank": recs[0]["torch_threads"], "step_s": step,
                     "speedup_vs_first": base / step,
                     "peak_mem_per_rank_MiB": max(r["peak_memory_bytes"] for r in recs) / 2**20})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet32-w4")
    p.add_argument("--batch", type=int, default=0,
                   help="global batch (default: 2048 with CUDA, 64 on CPU where 2048 takes minutes a step)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = cores / ranks)")
    p.add_argument("--compare", default="",
                   help="rank counts to run under mpirun, e.g. 1,2 (default when not started by mpirun)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not args.batch:
        args.batch = 2048 if cuda else 64
    if not _under_mpirun():
        args.compare = args.compare or "1,2"
        passthrough = ["--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch),
                       "--device", args.device, "--threads", str(args.threads)]
        rows = compare(args, passthrough)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import record
        note = ("train-step time (global-batch BN, gradient allreduce, SGD) at 1 vs 2 ranks on the same "
                "cores; peak memory per rank = peak RSS (CPU) or peak CUDA allocation")
        if not cuda and args.batch < 2048:
            note += f"; B = {args.batch} instead of the paper's 2048 because a CPU step at 2048 takes minutes"
        record("train_step", rows, note)
        return 0
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    threads = args.threads or max(1, (os.cpu_count() or 1) // comm.Get_size())
    torch.set_num_threads(threads)
    rec = time_train_step(args.model, args.batch, comm, _device(args.device, comm), args.steps,
                          args.warmup, args.micro_batch)
    for r in comm.gather(rec, root=0) or []:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
