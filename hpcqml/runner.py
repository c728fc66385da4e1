"""Run the stages a config names, in order, against one results file.

This is where a run's life cycle lives: open (or resume) the results file, record
provenance, run each stage inside its performance record, and close the run. A stage
whose ``/perf/<stage>`` group is complete is skipped on resume; a stage interrupted
part-way resumes through its own completed units.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from hpcqml.config import RunConfig
from hpcqml.errors import UserError
from hpcqml.parallel import decide_on_root
from hpcqml.perf import StagePerf, gather_records, write_records
from hpcqml.stages import REGISTRY, StageContext, load_all
from hpcqml.store import ResultsStore, provenance


def configure_threads(comm, threads: int) -> int:
    """Set torch's intra-op threads: ``threads``, or cores per rank on this node when 0."""
    import torch

    if threads <= 0:
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        per_node = node.Get_size()
        node.Free()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // per_node)
    torch.set_num_threads(threads)
    return threads


#: file that marks a work directory hpcqml created, and so may delete on --overwrite
WORKDIR_MARK = ".hpcqml-workdir"


def remove_previous_run(path: Path, workdir: Path) -> None:
    """``--overwrite``: delete the results file and the work directory hpcqml made for it.

    A work directory without the marker (one the user named and that existed before, such
    as a shared data folder) is never deleted: that is refused with a UserError.
    """
    if workdir.exists() and not (workdir / WORKDIR_MARK).exists():
        raise UserError(f"--overwrite: {workdir} was not created by hpcqml (no {WORKDIR_MARK}); "
                        "delete its old checkpoints by hand or choose another workdir")
    if path.exists():
        path.unlink()
    if workdir.exists():
        shutil.rmtree(workdir)


def run_pipeline(config: RunConfig, comm, stages: Sequence[str] | None = None, *,
                 overwrite: bool = False, quiet: bool = False, argv: Sequence[str] = ()) -> Path:
    """Run ``stages`` (default: ``[run] stages``) and return the results path."""
    load_all()
    names = list(stages) if stages is not None else config.stages
    if not names:
        raise UserError(f"config {config.source}: [run] stages is empty; nothing to run")
    for name in names:
        if name not in REGISTRY:
            raise UserError(f"unknown stage {name!r} (available: {', '.join(sorted(REGISTRY))})")
    configure_threads(comm, config.run["threads"])
    path = config.output_path()
    workdir = config.workdir()
    if overwrite:
        decide_on_root(comm, lambda: remove_previous_run(path, workdir))
    store = ResultsStore(path, comm)
    prov = provenance(comm, list(argv) or sys.argv, {"run.seed": config.run["seed"]})
    state = store.open_run(config.resolved_toml(), config.sha256(), prov, overwrite=False)
    if comm.Get_rank() == 0:
        if not workdir.exists():
            workdir.mkdir(parents=True)
            (workdir / WORKDIR_MARK).write_text("created by hpcqml for " + str(path) + "\n")
        if not quiet:
            print(f"hpcqml: {state} {path} ({comm.Get_size()} rank(s)); stages: {', '.join(names)}",
                  file=sys.stderr, flush=True)
    comm.Barrier()
    try:
        for name in names:
            run_stage(name, config, comm, store, workdir, quiet=quiet)
    except BaseException:
        # Best effort from rank 0 only: the caller aborts all ranks right after.
        if comm.Get_rank() == 0:
            local = ResultsStore(path, _SelfComm())
            local.invocation = store.invocation
            try:
                local.close_run("failed")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    store.close_run("completed")
    return path


class _SelfComm:
    """Stand-in communicator of one rank, for rank-0-only bookkeeping after a failure."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py naming
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1


def run_stage(name: str, config: RunConfig, comm, store: ResultsStore, workdir: Path,
              quiet: bool = False) -> None:
    """Run one stage unless its performance record says it already completed."""
    stage = REGISTRY[name]
    perf_key = f"perf/{name}"
    if store.is_complete(perf_key):
        if comm.Get_rank() == 0 and not quiet:
            print(f"[{name}] already complete in {store.path}; skipped", file=sys.stderr, flush=True)
        return
    # A stage that left groups behind in an earlier invocation is resumed: its timings
    # then cover only this invocation, which scaling studies must not mix with full runs.
    resumed = bool(store.read(lambda fh: any(k == name or k.startswith(name + "_") for k in fh), default=False))
    perf = StagePerf(name)
    ctx = StageContext(name=name, cfg=config.sections[name], config=config, comm=comm, store=store,
                       workdir=workdir, perf=perf, quiet=quiet)
    comm.Barrier()
    perf.start()
    stage.run(ctx)
    perf.stop()
    records = gather_records(comm, perf)
    store.commit(perf_key, lambda g: write_records(g, records, perf.peak_host_is_stage_local),
                 attrs={"invocation": store.invocation or "", "resumed": resumed})
    ctx.log(f"done in {perf.wall_seconds:.1f} s")
