"""Run the stages a config names, in order, against one results file.

This is where a run's life cycle lives: take the results file's writer lock, open (or
resume) the file, decide per stage from its fingerprint whether to skip, resume or
recompute it, record provenance, run each stage inside its performance record, and close
the run with an honest status. A stage whose ``/perf/<stage>`` group is complete and whose
fingerprint matches is skipped; a stage interrupted part-way resumes through its own
completed units; a stage whose result-changing settings differ is recomputed, and the
stages that read it are marked stale.
"""
from __future__ import annotations

import os
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hpcqml.config import RunConfig, compare_inputs, dependency_closure, dumps_toml
from hpcqml.errors import UserError
from hpcqml.io import DiskFullError, disk_full_error, is_disk_full
from hpcqml.parallel import node_rank_and_size, unused_petsc_options
from hpcqml.perf import StagePerf, gather_records, write_records
from hpcqml.stages import REGISTRY, StageContext, load_all, schemas
from hpcqml.store import ResultsStore, provenance


def _positive_int(text: str | None) -> int:
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return 0
    return max(value, 0)


def choose_threads(comm, threads: int, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Torch intra-op threads per rank and where the number came from.

    In order: ``[run] threads`` when positive; ``OMP_NUM_THREADS`` (per process, as set
    by the user or the launcher); ``SLURM_CPUS_PER_TASK`` (per task); PBS ``NCPUS``
    (per chunk, shared by the ranks on this node); else the cores in this process's
    affinity mask shared by the ranks on this node.

    Returns:
        ``(threads, source)``, e.g. ``(4, "SLURM_CPUS_PER_TASK")``.
    """
    env = os.environ if environ is None else environ
    if threads > 0:
        return threads, "[run] threads"
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = _positive_int(env.get(name))
        if value:
            return value, name
    ncpus = _positive_int(env.get("NCPUS") or env.get("ncpus"))
    if ncpus and env.get("PBS_JOBID"):
        return max(1, ncpus // node_rank_and_size(comm)[1]), "PBS NCPUS / ranks on the node"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // node_rank_and_size(comm)[1]), "affinity mask / ranks on the node"


def configure_threads(comm, threads: int) -> tuple[int, str]:
    """Set torch's intra-op threads as :func:`choose_threads` says; returns its answer."""
    import torch

    chosen = choose_threads(comm, threads)
    torch.set_num_threads(chosen[0])
    return chosen


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


@dataclass
class StagePlan:
    """What the runner does with the stages already in the results file."""

    #: stage -> the settings that changed (``section.key old -> new``): results discarded
    recompute: dict[str, list[str]] = field(default_factory=dict)
    #: stage kept but computed from inputs that are recomputed now -> why
    stale: dict[str, str] = field(default_factory=dict)


def _inputs(text: str) -> dict:
    try:
        return tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError:
        return {}


def plan_stages(config: RunConfig, names: Sequence[str], records: Mapping[str, Mapping],
                path: Path) -> StagePlan:
    """Compare each stage's stored fingerprint with the config's (same answer on every rank).

    A requested stage whose result-changing settings differ (or that is stale) is
    recomputed. A stage a requested stage reads, that is not requested itself and whose
    stored settings differ, is refused with the differing keys: its results would no
    longer match the config. Stages that read a recomputed stage are marked stale.
    """
    sch = schemas()
    plan = StagePlan()
    for name in names:
        for up in sorted(dependency_closure(name, config) - {name} - set(names)):
            rec = records.get(up)
            if rec and rec["sha256"] and rec["sha256"] != config.stage_fingerprint(up, sch):
                changes = compare_inputs(_inputs(rec["inputs"]), config.stage_inputs(up, sch))
                raise UserError(f"stage {name} reads stage {up}, whose results in {path} were made with other "
                                f"settings ({'; '.join(changes) or 'stale inputs'}); add {up} to --stages to "
                                "recompute it, or undo the change")
        rec = records.get(name)
        if rec is None:
            continue
        if not rec["sha256"]:
            raise UserError(f"results file {path}: stage {name} has no record of the settings that made it "
                            "(written by an older hpcqml); use --overwrite or another output")
        if rec["sha256"] != config.stage_fingerprint(name, sch) or rec["stale"]:
            changes = compare_inputs(_inputs(rec["inputs"]), config.stage_inputs(name, sch))
            plan.recompute[name] = changes or [f"inputs stale: {rec['stale_because']}"]
    for changed, why in plan.recompute.items():
        for other in records:
            if other not in plan.recompute and other != changed and changed in dependency_closure(other, config):
                plan.stale.setdefault(other, f"{changed} recomputed ({'; '.join(why)})")
    return plan


def _apply_plan(plan: StagePlan, store: ResultsStore, log: Callable[[str], None]) -> None:
    for name, changes in plan.recompute.items():
        log(f"[{name}] settings changed ({'; '.join(changes)}): recomputing it")
        store.discard_stage(name)
    for name, why in plan.stale.items():
        log(f"[{name}] marked stale: {why}; rerun it to bring it up to date")
    store.mark_stale(sorted(plan.stale), "; ".join(sorted(set(plan.stale.values()))))


def run_pipeline(config: RunConfig, comm, stages: Sequence[str] | None = None, *,
                 overwrite: bool = False, quiet: bool = False, argv: Sequence[str] = (),
                 petsc_options: Sequence[str] = ()) -> Path:
    """Run ``stages`` (default: ``[run] stages``) and return the results path.

    Args:
        config: the validated run configuration.
        comm: the communicator of all ranks.
        stages: subset of stages to run, in order.
        overwrite: delete the results file and its work directory first.
        quiet: no progress bars or info lines.
        argv: the command line, recorded in provenance.
        petsc_options: PETSc options given on the command line (recorded; unused ones warned about).

    Returns:
        The results file path.
    """
    load_all()
    names = list(stages) if stages is not None else config.stages
    if not names:
        raise UserError(f"config {config.source}: [run] stages is empty; nothing to run")
    for name in names:
        if name not in REGISTRY:
            raise UserError(f"unknown stage {name!r} (available: {', '.join(sorted(REGISTRY))})")
    threads = configure_threads(comm, config.run["threads"])
    path = config.output_path()
    workdir = config.workdir()

    def log(line: str) -> None:
        if comm.Get_rank() == 0 and not quiet:
            warn(line)

    def warn(line: str) -> None:  # warnings are printed with --quiet too
        if comm.Get_rank() == 0:
            print(f"hpcqml: {line}", file=sys.stderr, flush=True)

    store = ResultsStore(path, comm)
    prov = provenance(comm, list(argv) or sys.argv, {"run.seed": config.run["seed"]},
                      petsc_options=petsc_options, threads=threads)
    # --overwrite deletes only once the lock is held: never a live run's file
    prepare = (lambda: remove_previous_run(path, workdir)) if overwrite else None
    state = store.open_run(config.resolved_toml(), config.sha256(), prov, log=log, prepare=prepare)
    try:
        plan = plan_stages(config, names, store.stage_records(), path)
        _apply_plan(plan, store, log)
        if comm.Get_rank() == 0 and not workdir.exists():
            workdir.mkdir(parents=True)
            (workdir / WORKDIR_MARK).write_text("created by hpcqml for " + str(path) + "\n")
        log(f"{state} {path} ({comm.Get_size()} rank(s), {threads[0]} thread(s) each from {threads[1]}); "
            f"stages: {', '.join(names)}")
        comm.Barrier()
        for name in names:
            run_stage(name, config, comm, store, workdir, quiet=quiet, fresh=name in plan.recompute)
    except BaseException as exc:
        _close_after_failure(store, comm, exc)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(getattr(exc, "filename", None) or workdir) from exc
        raise
    _warn_unused_petsc_options(comm, petsc_options, warn)
    store.close_run("completed")
    return path


def _warn_unused_petsc_options(comm, given: Sequence[str], log: Callable[[str], None]) -> None:
    unused = unused_petsc_options() if comm.Get_rank() == 0 and given else []
    if unused:
        log("warning: PETSc option(s) given but used by no solver: " + " ".join(unused)
            + " (misspelt, or for a stage that did not run; prefixes: -qcm_, -qcm_inv_, -hhl_)")


def _close_after_failure(store: ResultsStore, comm, exc: BaseException) -> None:
    """Record why the invocation ended (rank 0 only: the caller aborts all ranks next)."""
    if comm.Get_rank() != 0 or store.invocation is None:
        return
    local = ResultsStore(store.path, _SelfComm())
    local.invocation = store.invocation
    local.lock = store.lock
    status = "interrupted" if type(exc).__name__ == "StoppedBySignal" else "failed"
    try:
        local.close_run(status, message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except Exception:  # noqa: BLE001 - the original error matters more than this record
        local.lock.release()


class _SelfComm:
    """Stand-in communicator of one rank, for rank-0-only bookkeeping after a failure."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py naming
        return 0

    def Get_size(self) -> int:  # noqa: N802 - mpi4py naming
        return 1


def run_stage(name: str, config: RunConfig, comm, store: ResultsStore, workdir: Path,
              quiet: bool = False, fresh: bool = False) -> None:
    """Run one stage unless its performance record says it already completed.

    ``fresh`` tells the stage that its earlier results were discarded because its
    settings changed (its own work-directory artifacts may then be replaced).
    """
    stage = REGISTRY[name]
    perf_key = f"perf/{name}"
    if store.is_complete(perf_key):
        if comm.Get_rank() == 0 and not quiet:
            print(f"[{name}] already complete in {store.path}; skipped", file=sys.stderr, flush=True)
        return
    sch = schemas()
    fingerprint = config.stage_fingerprint(name, sch)
    # A stage that left groups behind in an earlier invocation is resumed: its timings
    # then cover only this invocation, which scaling studies must not mix with full runs.
    resumed = bool(store.read(lambda fh: any(k == name or k.startswith(name + "_") for k in fh), default=False))
    store.record_fingerprint(name, fingerprint, dumps_toml(config.stage_inputs(name, sch)))
    perf = StagePerf(name)
    ctx = StageContext(name=name, cfg=config.sections[name], config=config, comm=comm, store=store,
                       workdir=workdir, perf=perf, quiet=quiet, fingerprint=fingerprint, fresh=fresh)
    comm.Barrier()
    perf.start()
    stage.run(ctx)
    perf.stop()
    records = gather_records(comm, perf)
    store.commit(perf_key, lambda g: write_records(g, records, perf.peak_host_is_stage_local),
                 attrs={"invocation": store.invocation or "", "resumed": resumed})
    ctx.log(f"done in {perf.wall_seconds:.1f} s")
