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

import dataclasses
import functools
import os
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, cast

from hpcqml.config import RunConfig, compare_inputs, dependency_closure, dumps_toml
from hpcqml.errors import InputFileError, StoppedBySignal, UserError
from hpcqml.io import DiskFullError, disk_full_error, is_disk_full
from hpcqml.parallel import node_rank_and_size, unused_petsc_options
from hpcqml.perf import StagePerf, gather_records, write_records
from hpcqml.protocols import Comm
from hpcqml.stages import REGISTRY, StageContext, estimates, load_all, pipeline, reads, schemas
from hpcqml.store import ResultsStore, provenance, stage_groups
from hpcqml.training.signals import STOP_STATUS, leave_after_stop, stop_status
from hpcqml.verify import damage_summary, verify_groups


def _positive_int(text: str | None) -> int:
    try:
        value = int(str(text).strip())
    except (TypeError, ValueError):
        return 0
    return max(value, 0)


def choose_threads(comm: Comm, threads: int, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
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


def configure_threads(comm: Comm, threads: int) -> tuple[int, str]:
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
    #: completed stage rerun to extend its stored work -> its extendable settings that changed
    extend: dict[str, list[str]] = field(default_factory=dict)


def _inputs(text: str) -> dict:
    try:
        return tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError:
        return {}


def plan_stages(config: RunConfig, names: Sequence[str], records: Mapping[str, Mapping],
                path: Path, extended: Mapping[str, str | None] | None = None) -> StagePlan:
    """Compare each stage's stored fingerprint with the config's (same answer on every rank).

    A requested stage whose result-changing settings differ (or that is stale) is
    recomputed. A stage a requested stage reads, that is not requested itself and whose
    stored settings differ, is refused with the differing keys: its results would no
    longer match the config. Stages that read a recomputed stage are marked stale.
    A completed requested stage whose extendable settings differ from those stored with
    its performance record (``extended``: stage -> TOML, None when not recorded) is rerun
    to extend its stored work; requested stages that read it are recomputed, others marked stale.
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
        elif name in (extended or {}):
            grown = _extendable_changes(config, name, (extended or {})[name], sch)
            if grown:
                plan.extend[name] = grown
    for grown_stage, why in plan.extend.items():
        for other in records:
            if other not in plan.recompute and other != grown_stage and \
                    grown_stage in dependency_closure(other, config) and other in names:
                plan.recompute[other] = [f"{grown_stage} extended ({'; '.join(why)})"]
    for changed, why in plan.recompute.items():
        for other in records:
            if other not in plan.recompute and other != changed and changed in dependency_closure(other, config):
                plan.stale.setdefault(other, f"{changed} recomputed ({'; '.join(why)})")
    for grown_stage, why in plan.extend.items():
        for other in records:
            if other not in plan.recompute and other != grown_stage and \
                    grown_stage in dependency_closure(other, config):
                plan.stale.setdefault(other, f"{grown_stage} extended ({'; '.join(why)})")
    return plan


def _extendable_changes(config: RunConfig, name: str, stored: str | None, sch: Mapping) -> list[str]:
    """``section.key old -> new`` for the extendable keys of ``name`` that differ from ``stored``."""
    now = config.extendable_keys(name, sch.get(name))
    if not now:
        return []
    if stored is None:
        return [f"{name}: no record of its extendable settings ({', '.join(sorted(now))})"]
    return compare_inputs(_inputs(stored), {name: now})


def stored_extendable(store: ResultsStore) -> dict[str, str | None]:
    """Stage -> the extendable settings (TOML) recorded with its completed performance
    record (None when that record has none); stages without a completed record are absent.
    """
    def body(fh: Any) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name, group in fh.get("perf", {}).items():
            if group.attrs.get("complete", False):
                value = group.attrs.get("extendable")
                out[name] = None if value is None else (value.decode() if isinstance(value, bytes) else str(value))
        return out
    return store.read(body, default={})


def _restore_previous(plan: StagePlan, config: RunConfig, store: ResultsStore,
                      log: Callable[[str], None]) -> bool:
    """Swap back the results a recomputation set aside when the settings that made them
    are the config's again (nothing is lost either way). Returns whether any was restored.
    """
    sch = schemas()
    restored = False
    for name, changes in plan.recompute.items():
        if store.restore_previous(name, config.stage_fingerprint(name, sch)):
            log(f"[{name}] settings changed ({'; '.join(changes)}), back to those of the results kept in "
                f"/previous/{name}: restored them")
            restored = True
    return restored


def _apply_plan(plan: StagePlan, config: RunConfig, store: ResultsStore, log: Callable[[str], None]) -> None:
    """Announce the plan. A recomputed stage's results are not deleted here: they are set
    aside by its first new commit (see ResultsStore.replace_stage), which also marks the
    stages reading it stale.
    """
    sch = schemas()
    for name, changes in plan.recompute.items():
        stale = sorted(other for other in plan.stale if name in dependency_closure(other, config))
        store.replace_stage(name, config.stage_fingerprint(name, sch), dumps_toml(config.stage_inputs(name, sch)),
                            stale, f"{name} recomputed ({'; '.join(changes)})")
        log(f"[{name}] settings changed ({'; '.join(changes)}): recomputing it; its results stay in the file "
            "until the new ones commit")
    for name, changes in plan.extend.items():
        log(f"[{name}] {'; '.join(changes)}: extending its stored results (finished work is kept)")
    extended_only = {k: v for k, v in plan.stale.items()
                     if not any(r in dependency_closure(k, config) for r in plan.recompute)}
    for name, why in plan.stale.items():
        log(f"[{name}] marked stale: {why}; rerun it to bring it up to date")
    store.mark_stale(sorted(extended_only), "; ".join(sorted(set(extended_only.values()))))


def agree(comm: Comm, check: Callable[[], object]) -> None:
    """Run ``check`` on every rank; if it raised a UserError on any rank, raise the first
    such message on all of them (so a refusal never leaves ranks waiting on each other).
    """
    try:
        check()
        message = None
    except UserError as exc:
        message = str(exc)
    messages = comm.allgather(message) if comm.Get_size() > 1 else [message]
    first = next((m for m in messages if m), None)
    if first is not None:
        raise UserError(first)


def check_before_running(name: str, config: RunConfig, comm: Comm, store: ResultsStore, workdir: Path,
                         fresh: bool = False, pending: frozenset[str] = frozenset()) -> None:
    """Every check stage ``name`` can make before it runs (collective): a GPU for
    ``device = "cuda"``, then the stage's declared pre-run checks (``Stage.checks``:
    inputs present, sizes). Raises the first refusal as one UserError; touches nothing.
    """
    stage = REGISTRY[name]
    ctx = StageContext(name=name, cfg=config.sections[name], config=config, comm=comm, store=store,
                       workdir=workdir, perf=StagePerf(name), quiet=True,
                       fingerprint=config.stage_fingerprint(name, schemas()), fresh=fresh, pending=pending)
    if config.run["device"] == "cuda":
        agree(comm, ctx.device)
    for check in getattr(stage, "checks", ()):
        agree(comm, functools.partial(check, ctx))


def _preflight(config: RunConfig, comm: Comm, names: Sequence[str], log: Callable[[str], None]) -> None:
    """What ``hpcqml validate`` checks, for the stages run now (rank 0 decides, all raise)."""
    from hpcqml.preflight import preflight

    found = preflight(config, ranks=comm.Get_size(), stages=list(names), estimates=estimates()) \
        if comm.Get_rank() == 0 else None
    if comm.Get_size() > 1:
        found = comm.bcast(found, root=0)
    assert found is not None   # rank 0's findings, on every rank
    for line in found.warnings:
        log(f"warning: {line}")
    if found.errors:
        raise UserError(f"config {config.source}: " + "; ".join(found.errors))


def _check_all_before_running(names: Sequence[str], plan: StagePlan, config: RunConfig, comm: Comm,
                              store: ResultsStore, workdir: Path, warn: Callable[[str], None]) -> set[str]:
    """What ``validate`` checks, then the pre-run checks of every stage to run, before
    anything is replaced. A stage reading one run earlier in this invocation is told so
    (``ctx.pending``) and is checked again, fully, just before it starts. Stages complete
    and kept are not checked.

    Returns:
        The stages checked with none of their inputs pending (not checked again).
    """
    todo = [name for name in names
            if name in plan.recompute or name in plan.extend or not store.is_complete(f"perf/{name}")]
    if todo:
        _preflight(config, comm, todo, warn)
    complete: set[str] = set()
    for i, name in enumerate(todo):
        pending = frozenset(todo[:i])
        check_before_running(name, config, comm, store, workdir, fresh=name in plan.recompute, pending=pending)
        if not pending & dependency_closure(name, config):
            complete.add(name)
    return complete


def record_pipeline(store: ResultsStore, order: Sequence[str]) -> None:
    """Store the registered stages' pipeline order as the root attribute ``pipeline`` (the
    order readers list the stages in); rewrites the file only when the stored order differs.
    """
    stored = store.read(lambda fh: [v.decode() if isinstance(v, bytes) else str(v)
                                    for v in fh.attrs.get("pipeline", [])], default=[])
    if list(stored) != list(order):
        store.set_root_attrs({"pipeline": list(order)})


def bind_reads(config: RunConfig) -> RunConfig:
    """``config`` with the registered stages' declared reads (those it names itself win)."""
    return dataclasses.replace(config, reads={**reads(), **config.reads})


def run_pipeline(config: RunConfig, comm: Comm, stages: Sequence[str] | None = None, *,
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

    A stop by signal (:class:`StoppedBySignal`) is raised to the caller with one rank. With
    several ranks, or in a job script (``HPCQML_STOP_STATUS`` set), every rank leaves the
    process here in order instead (:func:`hpcqml.training.signals.leave_after_stop`): rank 0
    prints the stop's line and exits last, with status 2 or the one the job script asks.
    """
    load_all()
    config = bind_reads(config)
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
        record_pipeline(store, pipeline())
        plan = plan_stages(config, names, store.stage_records(), path, stored_extendable(store))
        if _restore_previous(plan, config, store, log):
            plan = plan_stages(config, names, store.stage_records(), path, stored_extendable(store))
        checked = _check_all_before_running(names, plan, config, comm, store, workdir, warn)
        _apply_plan(plan, config, store, log)
        if comm.Get_rank() == 0 and not workdir.exists():
            workdir.mkdir(parents=True)
            (workdir / WORKDIR_MARK).write_text("created by hpcqml for " + str(path) + "\n")
        log(f"{state} {path} ({comm.Get_size()} rank(s), {threads[0]} thread(s) each from {threads[1]}); "
            f"stages: {', '.join(names)}")
        comm.Barrier()
        verified: set[str] = set()  # stages whose stored groups were read through their checksums
        for name in names:
            run_stage(name, config, comm, store, workdir, quiet=quiet, fresh=name in plan.recompute,
                      extend=name in plan.extend, verified=verified, checked=name in checked)
    except BaseException as exc:
        _close_after_failure(store, comm, exc)
        if isinstance(exc, StoppedBySignal) and (comm.Get_size() > 1 or stop_status() is not None):
            # every rank stopped together: leave in order, not by MPI_Abort (whose kill
            # sequence under mpirun costs twice odls_base_sigkill_timeout)
            status = stop_status()
            leave_after_stop(comm, exc.final(), STOP_STATUS if status is None else status)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(getattr(exc, "filename", None) or workdir) from exc
        raise
    _warn_unused_petsc_options(comm, petsc_options, warn)
    store.close_run("completed")
    return path


def _warn_unused_petsc_options(comm: Comm, given: Sequence[str], log: Callable[[str], None]) -> None:
    unused = unused_petsc_options() if comm.Get_rank() == 0 and given else []
    if unused:
        log("warning: PETSc option(s) given but used by no solver: " + " ".join(unused)
            + " (misspelt, or for a stage that did not run; prefixes: -qcm_, -qcm_inv_, -hhl_)")


def _close_after_failure(store: ResultsStore, comm: Comm, exc: BaseException) -> None:
    """Record why the invocation ended (rank 0 only: the caller aborts all ranks next)."""
    if comm.Get_rank() != 0 or store.invocation is None:
        return
    local = ResultsStore(store.path, cast(Comm, _SelfComm()))   # rank 0 alone: no collective is called
    local.invocation = store.invocation
    local.lock = store.lock
    status = "interrupted" if isinstance(exc, StoppedBySignal) else "failed"
    text = exc.final() if isinstance(exc, StoppedBySignal) else str(exc)
    try:
        local.close_run(status, message=text.splitlines()[0] if text else type(exc).__name__)
    except Exception:  # noqa: BLE001 - the original error matters more than this record
        local.lock.release()


class _SelfComm:
    """Stand-in communicator of one rank, for rank-0-only bookkeeping after a failure."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py naming
        return 0

    def Get_size(self) -> int:  # noqa: N802 - mpi4py naming
        return 1


def verify_inputs(name: str, config: RunConfig, store: ResultsStore, verified: set[str]) -> None:
    """Read the stored groups of ``name`` and of every stage it reads through their
    checksums (collective), each stage once per invocation (``verified`` collects them);
    a stage being recomputed is left out (its old groups are replaced anyway).

    Raises:
        InputFileError: one line naming the first damaged group.
    """
    todo = sorted(s for s in dependency_closure(name, config) - verified if not store.is_replacing(s))
    if not todo:
        return

    def body(fh: Any) -> list[str]:
        groups = [g for s in todo for g in (*stage_groups(fh, s), f"perf/{s}", f"fingerprints/{s}")]
        return verify_groups(fh, groups)[0]
    problems = store.read(body, default=[])
    verified.update(todo)
    if problems:
        raise InputFileError(damage_summary(store.path, problems))


def run_stage(name: str, config: RunConfig, comm: Comm, store: ResultsStore, workdir: Path,
              quiet: bool = False, fresh: bool = False, extend: bool = False,
              verified: set[str] | None = None, checked: bool = False) -> None:
    """Run one stage unless its performance record says it already completed.

    ``fresh`` tells the stage that its earlier results are being replaced because its
    settings changed (its own work-directory artifacts may then be replaced); ``extend``
    reruns a completed stage whose extendable settings changed (it keeps its stored work).
    Before it skips or runs, the stored groups it depends on are read through their
    checksums (``verified``: stages already read in this invocation); ``checked`` says its
    pre-run checks were made already with all its inputs present.
    """
    stage = REGISTRY[name]
    perf_key = f"perf/{name}"
    verify_inputs(name, config, store, set() if verified is None else verified)
    if store.is_complete(perf_key) and not extend:
        if comm.Get_rank() == 0 and not quiet:
            print(f"[{name}] already complete in {store.path}; skipped", file=sys.stderr, flush=True)
        return
    sch = schemas()
    fingerprint = config.stage_fingerprint(name, sch)
    # A stage that left groups behind in an earlier invocation is resumed: its timings
    # then cover only this invocation, which scaling studies must not mix with full runs.
    if not checked:  # inputs a stage earlier in this invocation produced exist now
        check_before_running(name, config, comm, store, workdir, fresh=fresh)
    replacing = store.is_replacing(name)  # then the first new commit records the fingerprint
    resumed = not replacing and bool(store.read(lambda fh: bool(stage_groups(fh, name)), default=False))
    if not replacing:
        store.record_fingerprint(name, fingerprint, dumps_toml(config.stage_inputs(name, sch)))
    perf = StagePerf(name)
    ctx = StageContext(name=name, cfg=config.sections[name], config=config, comm=comm, store=store,
                       workdir=workdir, perf=perf, quiet=quiet, fingerprint=fingerprint, fresh=fresh)
    comm.Barrier()
    perf.start()
    stage.run(ctx)
    perf.stop()
    records = gather_records(comm, perf)
    attrs = {"invocation": store.invocation or "", "resumed": resumed}
    grown = config.extendable_keys(name, sch.get(name))
    if grown:  # what the stored work now covers (see plan_stages)
        attrs["extendable"] = dumps_toml({name: grown})
    store.commit(perf_key, lambda g: write_records(g, records, perf.peak_host_is_stage_local), attrs=attrs)
    ctx.log(f"done in {perf.wall_seconds:.1f} s")
