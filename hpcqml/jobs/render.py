"""Batch job scripts (SLURM ``sbatch`` / PBS ``qsub``) for one hpcqml run config.

A rendered script

* requests nodes, MPI ranks, CPU cores per rank, GPUs, memory and wall time;
* activates the environment the way ``env/`` documents it (optional ``module load``,
  then ``source .venv/bin/activate``; the venv's ``.pth`` file sets PETSC_DIR/SLEPC_DIR);
* runs ``hpcqml run CONFIG --output results/...`` under ``srun`` or ``mpirun``
  (``$LAUNCH`` overrides the choice);
* asks for a warning signal before the wall time (SLURM ``--signal=B:USR1@LEAD``; on
  PBS, which has no such directive, a timer in the script raises the same signal) and
  forwards it to the ranks, which checkpoint and stop; the script then requeues itself
  (``scontrol requeue`` / ``qsub`` of the same script), and because hpcqml resumes when
  the same config meets an existing results file, the next run continues where this
  one stopped;
* treats SIGTERM (``scancel``, ``qdel``) as a cancel: forwarded to the ranks, which
  checkpoint and stop, and never followed by a requeue;
* prints one line at the end saying what stopped the run, what was saved and whether
  the job was requeued; leaves no helper process behind (the PBS timer is stopped on
  exit); on PBS each resubmitted segment writes its own log;
* with ``HPCQML_DRY_RUN=1`` prints the launch command instead of running it.

Nothing here touches MPI: rendering is plain text generation, usable on a login node.
"""
from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from hpcqml.errors import UserError

SCHEDULERS = ("slurm", "pbs")
SUFFIX = {"slurm": ".sbatch", "pbs": ".pbs"}
_TIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
_MEM = re.compile(r"^(\d+)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SAFE = re.compile(r"^[A-Za-z0-9_./+:,=@%-]+$")     # paths and module names put into the script


@dataclass(frozen=True)
class JobSpec:
    """Everything a job script needs; ``ranks`` is the total number of MPI ranks."""

    config: str
    scheduler: str
    nodes: int
    ranks_per_node: int
    time: str
    output: str
    name: str
    ranks: int = 0                      # 0 = nodes * ranks_per_node
    gpus_per_node: int = 0
    cpus_per_rank: int = 1
    mem: str = ""                       # per node, e.g. "64G"; "" = scheduler default
    signal_lead: int = 300              # seconds of warning before the wall time
    partition: str = ""                 # SLURM partition / PBS queue
    account: str = ""
    modules: str = ""                   # space-separated modules to load before the venv
    overrides: tuple[str, ...] = ()     # hpcqml run --set values
    stages: str = ""                    # hpcqml run --stages value
    script_path: str = ""               # where the script is written (for PBS resubmission)
    comments: tuple[str, ...] = ()      # extra header lines (e.g. where the sizes come from)

    @property
    def total_ranks(self) -> int:
        return self.ranks or self.nodes * self.ranks_per_node


def parse_time(text: str) -> int:
    """``"HH:MM:SS"`` (hours may exceed 24) -> seconds; UserError otherwise."""
    m = _TIME.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise UserError(f"--time {text!r}: expected HH:MM:SS, e.g. 02:00:00")
    seconds = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
    if seconds <= 0:
        raise UserError(f"--time {text!r}: must be longer than zero")
    return seconds


def parse_mem(text: str) -> tuple[int, str]:
    """``"64G"``, ``"64GB"``, ``"64GiB"``, ``"4000M"`` or ``"4000"`` (MB) -> (amount, unit letter)."""
    m = _MEM.match(text.strip()) if isinstance(text, str) else None
    if m is None or int(m.group(1)) <= 0:
        raise UserError(f"--mem {text!r}: expected a positive size such as 4000M, 64G or 1T")
    return int(m.group(1)), (m.group(2) or "M").upper()


def parse_scaling(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]`` (distinct positive rank counts, in the given order)."""
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--scaling {text!r}: expected comma-separated rank counts, e.g. 1,2,4,8") from None
    if not counts or any(c < 1 for c in counts):
        raise UserError(f"--scaling {text!r}: rank counts must be positive integers")
    if len(set(counts)) != len(counts):
        raise UserError(f"--scaling {text!r}: rank counts repeat")
    return counts


def check_spec(spec: JobSpec) -> None:
    """Raise UserError naming the first bad field of ``spec``."""
    if spec.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler {spec.scheduler!r}: not one of {', '.join(SCHEDULERS)}")
    for flag, value, low in (("--nodes", spec.nodes, 1), ("--ranks-per-node", spec.ranks_per_node, 1),
                             ("--gpus-per-node", spec.gpus_per_node, 0),
                             ("--cpus-per-rank", spec.cpus_per_rank, 1),
                             ("--signal-lead", spec.signal_lead, 1)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"{flag} {value!r}: must be an integer >= {low}")
    if spec.ranks and not (1 <= spec.ranks <= spec.nodes * spec.ranks_per_node):
        raise UserError(f"{spec.ranks} ranks do not fit {spec.nodes} node(s) x {spec.ranks_per_node} ranks")
    wall = parse_time(spec.time)
    if spec.signal_lead >= wall:
        raise UserError(f"--time {spec.time}: not longer than the {spec.signal_lead} s checkpoint warning "
                        f"(raise --time or lower --signal-lead)")
    if spec.mem:
        parse_mem(spec.mem)
    if not _NAME.match(spec.name):
        raise UserError(f"--name {spec.name!r}: use letters, digits, '_', '-', '.' only")
    for flag, path in (("config", spec.config), ("--output", spec.output)):
        if not _SAFE.match(str(path)):
            raise UserError(f"{flag} {path!r}: use a path without spaces, quotes or shell characters")
    if spec.modules and not all(_SAFE.match(m) for m in spec.modules.split()):
        raise UserError(f"--modules {spec.modules!r}: module names without quotes or shell characters")
    if not str(spec.output).endswith((".h5", ".hdf5")):
        raise UserError(f"--output {spec.output!r}: must end in .h5 or .hdf5")
    from hpcqml.config import parse_override

    for item in spec.overrides:
        parse_override(item)


def read_config_sections(config: str | Path, validate: bool = True,
                     overrides: Sequence[str] = ()) -> dict:
    """The config's sections as a dict (validated against the registered stages unless
    ``validate`` is False, in which case only TOML syntax and the file's presence are checked).
    """
    from hpcqml.config import load_config, read_toml

    if not validate:
        return read_toml(config)
    from hpcqml.stages import schemas

    return load_config(config, schemas(), overrides).sections


# --------------------------------------------------------------------------- rendering


def _q(text: str) -> str:
    return shlex.quote(str(text))


def _slurm_mem(mem: str) -> str:
    amount, unit = parse_mem(mem)
    return f"{amount}{unit}"


def _pbs_mem(mem: str) -> str:
    amount, unit = parse_mem(mem)
    return f"{amount}{unit.lower()}b"


def _header(spec: JobSpec, lines: list[str]) -> list[str]:
    out = ["#!/bin/bash"]
    out += lines
    out.append(f"# hpcqml job: {spec.name} -- rendered by 'hpcqml jobs render' (docs/cluster.md)")
    out.append(f"# config {spec.config}; {spec.total_ranks} MPI rank(s) on {spec.nodes} node(s); "
               f"results in {spec.output}")
    out += [f"# {c}" if c else "#" for c in spec.comments]
    out.append("# Environment: HPCQML_ROOT (repository; default the submission directory), HPCQML_VENV")
    out.append("# (default $HPCQML_ROOT/.venv), HPCQML_MODULES (modules to load first), LAUNCH (MPI")
    out.append("# launcher), HPCQML_REQUEUE=0 (do not requeue after the warning signal),")
    out.append("# HPCQML_DRY_RUN=1 (print the launch command instead of running it).")
    out.append("# Signals: SIGUSR1 (the wall-time warning) checkpoints and requeues; SIGTERM (scancel,")
    out.append("# qdel) checkpoints and stops without requeue.")
    return out


def _slurm_directives(spec: JobSpec) -> list[str]:
    rpn = min(spec.ranks_per_node, spec.total_ranks)
    d = [f"#SBATCH --job-name={spec.name}",
         f"#SBATCH --nodes={spec.nodes}",
         f"#SBATCH --ntasks={spec.total_ranks}",
         f"#SBATCH --ntasks-per-node={rpn}",
         f"#SBATCH --cpus-per-task={spec.cpus_per_rank}"]
    if spec.gpus_per_node:
        # one GPU per task where there are enough (ranks sharing a GPU only when there are more
        # ranks than GPUs on the node): srun binds each rank to its own device
        d.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
        d.append(f"#SBATCH --gpu-bind=single:{math.ceil(rpn / spec.gpus_per_node)}")
    if spec.mem:
        d.append(f"#SBATCH --mem={_slurm_mem(spec.mem)}")
    d += [f"#SBATCH --time={spec.time}",
          f"#SBATCH --signal=B:USR1@{spec.signal_lead}",
          "#SBATCH --requeue",
          "#SBATCH --open-mode=append",
          f"#SBATCH --output=results/{spec.name}-%j.out"]
    if spec.partition:
        d.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        d.append(f"#SBATCH --account={spec.account}")
    return d


def _pbs_directives(spec: JobSpec) -> list[str]:
    rpn = min(spec.ranks_per_node, spec.total_ranks)
    chunk = f"{spec.nodes}:ncpus={rpn * spec.cpus_per_rank}:mpiprocs={rpn}:ompthreads={spec.cpus_per_rank}"
    if spec.gpus_per_node:
        chunk += f":ngpus={spec.gpus_per_node}"
    if spec.mem:
        chunk += f":mem={_pbs_mem(spec.mem)}"
    d = [f"#PBS -N {spec.name}",
         f"#PBS -l select={chunk}",
         "#PBS -l place=scatter:excl" if spec.nodes > 1 else "#PBS -l place=pack",
         f"#PBS -l walltime={spec.time}",
         "#PBS -r y",
         "#PBS -j oe",
         f"#PBS -o {_pbs_log(spec, 1)}"]
    if spec.partition:
        d.append(f"#PBS -q {spec.partition}")
    if spec.account:
        d.append(f"#PBS -A {spec.account}")
    return d


def _pbs_log(spec: JobSpec, segment: int | str) -> str:
    """The log of PBS segment ``segment`` (1 = the first submission, then one per resubmission)."""
    return f"results/{spec.name}-seg{segment}.pbs.log"


_COMMON_BODY = r'''
set -uo pipefail
log() { echo "[hpcqml-job $(date -u +%H:%M:%S)] $*"; }

# --- environment (env/install.sh builds .venv; its .pth sets PETSC_DIR/SLEPC_DIR) ----------
cd "$HPCQML_ROOT" || { echo "cannot cd to HPCQML_ROOT=$HPCQML_ROOT" >&2; exit 2; }
HPCQML_MODULES="${HPCQML_MODULES-__MODULES__}"
if [ -n "$HPCQML_MODULES" ]; then
  if command -v module >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    module load $HPCQML_MODULES || { echo "module load $HPCQML_MODULES failed" >&2; exit 2; }
  else
    log "no 'module' command here; not loading: $HPCQML_MODULES"
  fi
fi
HPCQML_VENV="${HPCQML_VENV:-$HPCQML_ROOT/.venv}"
if [ -f "$HPCQML_VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$HPCQML_VENV/bin/activate"
elif [ "${HPCQML_DRY_RUN:-0}" = 1 ]; then
  log "no virtual environment at $HPCQML_VENV (dry run: continuing)"
else
  echo "no virtual environment at $HPCQML_VENV: run 'make install' (env/install.sh) first" >&2
  exit 2
fi
# threads per rank: OMP_NUM_THREADS when set, else the scheduler's cores per rank
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-__THREADS__}" PYTHONUNBUFFERED=1

# --- the run ----------------------------------------------------------------------------
CMD=(hpcqml run __CMD__)
mkdir -p "$(dirname __OUTPUT__)"
'''

_LAUNCH_BODY = r'''
launch_cmd=($LAUNCH -n "$NRANKS" "${CMD[@]}")
if [ "${HPCQML_DRY_RUN:-0}" = 1 ]; then
  echo "HPCQML_DRY_RUN: ${launch_cmd[*]}"
  exit 0
fi

# Signals.  SIGUSR1 is the wall-time warning: the ranks checkpoint and stop, and the job
# is requeued afterwards.  SIGTERM is a cancel (scancel, qdel): the ranks checkpoint and
# stop, and the job is not requeued, even after a warning.  The batch shell asks the
# ranks with SIGUSR1 in both cases (srun and mpirun pass it on to every rank; Open MPI's
# mpirun kills its ranks at once on a second SIGTERM, and a cancel sends it one itself)
# and writes which signal it was to HPCQML_STOP_NOTE, where the ranks read it, as they
# read HPCQML_BATCH/HPCQML_REQUEUE, to say in their last line whether a requeue follows.
export HPCQML_BATCH=__SCHEDULER__ HPCQML_REQUEUE="${HPCQML_REQUEUE:-1}"
HPCQML_STOP_NOTE="$(mktemp "${TMPDIR:-/tmp}/hpcqml-stop.XXXXXX")" || exit 2
export HPCQML_STOP_NOTE
# mpirun (Open MPI) leaves its ranks 1 s between SIGTERM and SIGKILL: too short for a checkpoint
export OMPI_MCA_odls_base_sigkill_timeout="${OMPI_MCA_odls_base_sigkill_timeout:-30}"
# After a checkpointing stop the ranks leave in order with status 0 (this script knows from
# the signal what follows): a non-zero status would make mpirun kill them with the sequence
# above, SIGCONT, 30 s, SIGTERM, 30 s, SIGKILL, and return a minute late.
export HPCQML_STOP_STATUS=0
SIGNALLED=""
launcher_pid=""
timer_pid=""
forward() {
  if [ "$1" = TERM ] || [ -z "$SIGNALLED" ]; then SIGNALLED="$1"; fi
  echo "$SIGNALLED" > "$HPCQML_STOP_NOTE"
  if [ "$1" = USR1 ]; then
    log "got SIGUSR1 (wall-time warning): asking the ranks to checkpoint and stop"
  else
    log "got SIG$1 (cancel): asking the ranks to checkpoint and stop; no requeue"
  fi
  [ -n "$launcher_pid" ] && kill -s USR1 "$launcher_pid" 2>/dev/null
  return 0
}
cleanup() {
  if [ -n "$timer_pid" ]; then
    kill "$timer_pid" 2>/dev/null
    wait "$timer_pid" 2>/dev/null
    timer_pid=""
  fi
  rm -f "$HPCQML_STOP_NOTE"
  return 0
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap cleanup EXIT
log "job ${JOBID:-?}: ${launch_cmd[*]} (OMP_NUM_THREADS=$OMP_NUM_THREADS)"
"${launch_cmd[@]}" &
launcher_pid=$!
__TIMER__
rc=0
while :; do
  wait "$launcher_pid"; rc=$?
  # wait returns early (status > 128) when a trapped signal arrives; keep waiting.
  if [ "$rc" -gt 128 ] && kill -0 "$launcher_pid" 2>/dev/null; then continue; fi
  break
done
# the ranks write "stopped" to the note when they left unfinished (their status is 0 then)
stopped=""
grep -qx stopped "$HPCQML_STOP_NOTE" 2>/dev/null && stopped=1
cleanup
log "launcher exited with status $rc"
SAVED="the checkpoints in __OUTPUT__ and its work directory"
case "$SIGNALLED" in
  USR1)
    if [ "$HPCQML_REQUEUE" = 1 ]; then
      log "stopped at the wall-time warning; saved $SAVED; requeueing: the next run resumes from them"
      requeue
      stopped=""                  # a later segment finishes the work
    else
      log "stopped at the wall-time warning; saved $SAVED; not requeued (HPCQML_REQUEUE=0): submit again to resume"
    fi ;;
  TERM)
    log "cancelled (SIGTERM); saved $SAVED; not requeued: submit again to resume" ;;
esac
# unfinished and not requeued: fail the job, so that afterok dependencies do not start
if [ -n "$stopped" ] && [ "$rc" = 0 ]; then rc=2; fi
exit "$rc"
'''


def _body(spec: JobSpec) -> str:
    cmd = [spec.config, "--output", spec.output]
    if spec.stages:
        cmd += ["--stages", spec.stages]
    for item in spec.overrides:
        cmd += ["--set", item]
    body = _COMMON_BODY.replace("__MODULES__", spec.modules.replace('"', ""))
    threads = str(spec.cpus_per_rank)
    if spec.scheduler == "slurm":
        threads = f"${{SLURM_CPUS_PER_TASK:-{spec.cpus_per_rank}}}"
    body = body.replace("__THREADS__", threads)
    body = body.replace("__CMD__", " ".join(_q(c) for c in cmd))
    return body.replace("__OUTPUT__", _q(spec.output))


def render_slurm(spec: JobSpec) -> str:
    """The ``sbatch`` script of ``spec``."""
    check_spec(replace(spec, scheduler="slurm"))
    lines = _header(spec, _slurm_directives(spec))
    pre = r'''
HPCQML_ROOT="${HPCQML_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
JOBID="${SLURM_JOB_ID:-}"
NRANKS="${HPCQML_RANKS:-${SLURM_NTASKS:-__RANKS__}}"
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-__CPUS__}"   # srun >= 22.05 does not inherit it
requeue() { scontrol requeue "$JOBID"; }'''.replace("__RANKS__", str(spec.total_ranks)).replace(
        "__CPUS__", str(spec.cpus_per_rank))
    launcher = r'''
# srun starts the ranks itself when SLURM has PMIx for this MPI (Debian's slurm-wlm does:
# 'srun --mpi=pmix'); otherwise mpirun inside the allocation reads it from SLURM.
if [ -z "${LAUNCH:-}" ]; then
  if command -v srun >/dev/null 2>&1 && srun --mpi=list 2>&1 | grep -qw pmix; then
    LAUNCH="srun --mpi=pmix"
  else
    LAUNCH="mpirun"
    [ "$(id -u)" = 0 ] && LAUNCH="$LAUNCH --allow-run-as-root"
    LAUNCH="$LAUNCH $(map_and_bind "${SLURM_CPUS_PER_TASK:-__CPUS__}" __RPN__)"
  fi
fi'''.replace("__CPUS__", str(spec.cpus_per_rank)).replace("__RPN__", str(min(spec.ranks_per_node, spec.total_ranks)))
    tail = _LAUNCH_BODY.replace("__TIMER__", "").replace("__OUTPUT__", spec.output)
    tail = tail.replace("__SCHEDULER__", "slurm")
    return "\n".join(lines) + "\n" + pre + _body(spec) + _MAP_AND_BIND + launcher + "\n" + tail


#: Shell function of the mpirun fallback: Open MPI maps each rank onto its own block of cores
#: (``PE`` = threads per rank) and binds it there; other MPIs get no flags (their launchers
#: spell binding differently), and neither does a machine with fewer cores than that asks.
_MAP_AND_BIND = r'''
map_and_bind() {  # threads per rank, ranks per node
  local pe="$1" rpn="$2"
  if mpirun --version 2>&1 | grep -q "Open MPI" && [ "$(nproc --all)" -ge $((pe * rpn)) ]; then
    echo "--map-by slot:PE=$pe --bind-to core"
  fi
}'''


def _portable_script_path(path: str) -> str:
    """The script's path for resubmission: relative to the repository (the working directory
    at render time) when it lies inside, so a copied or moved checkout still finds it.
    """
    if not path:
        return ""
    p = Path(path)
    if p.is_absolute():
        try:
            return str(p.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(p)
    return str(p)


def render_pbs(spec: JobSpec) -> str:
    """The ``qsub`` script of ``spec`` (PBS Pro ``select`` syntax)."""
    check_spec(replace(spec, scheduler="pbs"))
    wall = parse_time(spec.time)
    lines = _header(spec, _pbs_directives(spec))
    resubmit = _portable_script_path(spec.script_path)
    pre = r'''
HPCQML_ROOT="${HPCQML_ROOT:-${PBS_O_WORKDIR:-$PWD}}"
JOBID="${PBS_JOBID:-}"
NRANKS="${HPCQML_RANKS:-__RANKS__}"
HPCQML_JOB_SCRIPT="${HPCQML_JOB_SCRIPT:-__SCRIPT__}"
HPCQML_SEGMENT="${HPCQML_SEGMENT:-1}"
# PBS gives a job no variable with its memory request: the memory estimates of the ranks'
# pre-run check read these two instead (SLURM's own variables serve under SLURM)
export HPCQML_NODE_MEMORY="${HPCQML_NODE_MEMORY-__MEM__}" HPCQML_RANKS_PER_NODE="${HPCQML_RANKS_PER_NODE:-__RPN__}"
# PBS has no 'signal before the wall time' directive: resubmit this script (qrerun needs
# operator rights on many sites); the new job resumes from the results file and writes
# its own log (segment N+1) instead of overwriting this one's.
requeue() {
  if [ -n "$HPCQML_JOB_SCRIPT" ]; then
    local next=$((HPCQML_SEGMENT + 1))
    qsub -W depend=afterany:"$JOBID" -v HPCQML_SEGMENT="$next" -o "__LOG__" "$HPCQML_JOB_SCRIPT"
  else
    log "HPCQML_JOB_SCRIPT unset: resubmit this script by hand to resume"
  fi
}'''.replace("__RANKS__", str(spec.total_ranks)).replace("__SCRIPT__", resubmit.replace('"', ""))
    pre = pre.replace("__MEM__", _slurm_mem(spec.mem) if spec.mem else "").replace(
        "__RPN__", str(min(spec.ranks_per_node, spec.total_ranks)))
    pre = pre.replace("__LOG__", _pbs_log(spec, "${next}"))
    launcher = r'''
if [ -z "${LAUNCH:-}" ]; then
  LAUNCH="mpirun"
  [ "$(id -u)" = 0 ] && LAUNCH="$LAUNCH --allow-run-as-root"
  [ -n "${PBS_NODEFILE:-}" ] && LAUNCH="$LAUNCH --hostfile $PBS_NODEFILE"
  LAUNCH="$LAUNCH $(map_and_bind "${OMP_NUM_THREADS:-__CPUS__}" __RPN__)"
fi'''.replace("__CPUS__", str(spec.cpus_per_rank)).replace("__RPN__", str(min(spec.ranks_per_node, spec.total_ranks)))
    timer = _PBS_TIMER.replace("__LEAD__", str(spec.signal_lead)).replace("__WALL__", str(wall))
    timer = timer.replace("__TIME__", spec.time)
    tail = _LAUNCH_BODY.replace("__TIMER__", timer).replace("__OUTPUT__", spec.output)
    tail = tail.replace("__SCHEDULER__", "pbs")
    return "\n".join(lines) + "\n" + pre + _body(spec) + _MAP_AND_BIND + launcher + "\n" + tail


_PBS_TIMER = r'''# the warning signal, __LEAD__ s before the __TIME__ wall time; the timer's sleep is stopped
# with it (cleanup, on exit), so no helper process outlives the job
WALL_SECONDS="${HPCQML_WALL_SECONDS:-__WALL__}"
(
  sleep_pid=""
  trap '[ -n "$sleep_pid" ] && kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  sleep "$((WALL_SECONDS - __LEAD__))" &
  sleep_pid=$!
  wait "$sleep_pid" && kill -s USR1 $$
) &
timer_pid=$!'''


def render(spec: JobSpec) -> str:
    """The job script of ``spec`` for its scheduler."""
    if spec.scheduler == "slurm":
        return render_slurm(spec)
    if spec.scheduler == "pbs":
        return render_pbs(spec)
    raise UserError(f"--scheduler {spec.scheduler!r}: not one of {', '.join(SCHEDULERS)}")


# --------------------------------------------------------------------------- scaling studies


@dataclass(frozen=True)
class ScalingJob:
    """One job script of a scaling series: its total rank count, spec and output path."""
    ranks: int
    spec: JobSpec
    path: Path


def _weak_override(sections: dict, key: str, factor: float) -> str:
    if "." not in key:
        raise UserError(f"--weak {key!r}: expected section.key, e.g. spectrum.batch_size")
    section, name = key.split(".", 1)
    value = sections.get(section, {}).get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"--weak {key}: the config has no numeric value there (got {value!r})")
    scaled = value * factor
    if isinstance(value, int):
        if abs(scaled - round(scaled)) > 1e-9:
            raise UserError(f"--weak {key} = {value}: not an integer multiple for rank ratio {factor:g}")
        return f"{key}={int(round(scaled))}"
    return f"{key}={scaled!r}"


def scaling_jobs(base: JobSpec, counts: Sequence[int], out_dir: Path,
                 weak: Sequence[str] = (), sections: dict | None = None) -> list[ScalingJob]:
    """One job per total rank count: ``ceil(n / R)`` nodes of ``min(n, R)`` ranks, results
    ``<stem>-n<n>.h5``.  ``weak`` keys are multiplied by ``n / counts[0]`` (weak scaling).
    """
    out_dir = Path(out_dir)
    stem = Path(base.output).stem
    parent = Path(base.output).parent
    jobs = []
    for n in counts:
        rpn = min(base.ranks_per_node, n)
        nodes = math.ceil(n / base.ranks_per_node)
        extra = tuple(_weak_override(sections or {}, k, n / counts[0]) for k in weak)
        name = f"{base.name}-n{n}"
        path = out_dir / f"{name}{SUFFIX[base.scheduler]}"
        spec = replace(base, nodes=nodes, ranks_per_node=rpn, ranks=n, name=name,
                       output=str(parent / f"{stem}-n{n}.h5"), overrides=base.overrides + extra,
                       script_path=str(path),
                       comments=base.comments + (f"scaling study: {n} of ranks {','.join(map(str, counts))}"
                                                 + (f"; weak: {' '.join(extra)}" if extra else "; strong"),))
        jobs.append(ScalingJob(n, spec, path))
    return jobs


def submit_all_script(jobs: Sequence[ScalingJob], scheduler: str) -> str:
    """A shell script submitting every job of a scaling study."""
    submit = "sbatch" if scheduler == "slurm" else "qsub"
    lines = ["#!/bin/bash", "# Submit every job of this scaling study (run from the repository root).",
             "set -euo pipefail"]
    lines += [f"{submit} {_q(str(j.path))}" for j in jobs]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- standard jobs


@dataclass(frozen=True)
class Standard:
    """A checked-in job (jobs/slurm/<name>.sbatch, jobs/pbs/<name>.pbs)."""

    name: str
    config: str
    output: str
    nodes: int
    ranks_per_node: int
    time: str
    mem: str
    gpus_per_node: int = 0
    cpus_per_rank: int = 1
    comments: tuple[str, ...] = field(default_factory=tuple)
    stages: str = ""                                   # hpcqml run --stages (default: the config's)
    overrides: tuple[str, ...] = field(default_factory=tuple)


_ESTIMATE = "Sizes are estimates until measured on the target cluster: adjust --time/--mem after a first run."

#: The checked-in job scripts and where their sizes come from.
STANDARD: tuple[Standard, ...] = (
    Standard("demo", "jobs/configs/demo.toml", "results/demo.h5", 1, 2, "00:30:00", "4G",
             comments=("The built-in demo (make demo): 1 node, 2 ranks, CPU only.",
                       "Sizing: small instances that run in minutes on a 2-core machine; 4G covers two ranks",
                       "of PyTorch + PETSc (about 250 MiB peak each for the data stage, measured on that machine).",
                       )),
    Standard("fig2-resnet32-w4", "jobs/configs/resnet32-w4-cifar100.toml", "results/resnet32-w4-cifar100.h5",
             1, 4, "12:00:00", "128G", gpus_per_node=4, cpus_per_rank=4,
             comments=("Paper Fig. 2 protocol: resnet32-w4 (7,451,044 parameters) pretrained 200 epochs, pruned",
                       "to 10%, 1000 steps of sparse training, spectra of the snapshots every 10 steps for the",
                       "first 200 steps and at/10 steps after each later download (B = 2048, m = 100, 4 probes).",
                       "Sizing: the H100 figures of BENCHMARKS.md, resnet32-w4 H.v 0.65-1.24 s at B = 2048 ->",
                       "<= 400 products x 1.24 s = 8.3 min per spectrum on one GPU; 37 snapshots = 5 h on one",
                       "GPU, ~1.5 h on 4 ranks/GPUs. Pretraining, taking a gradient as ~half an H.v (0.6 s per 2048",
                       "samples): 200 epochs ~ 40 min on one GPU, <= 1 h here; sparse training ~10 min.",
                       "Total ~5-6 h; 12 h leaves margin and requeue covers the rest. Host memory: 4 ranks x",
                       "(PyTorch + CIFAR-100, a few GB) plus a 100-vector float32 Krylov basis of 7.45e6",
                       "entries (3 GB): 128G is generous.",
                       _ESTIMATE)),
    Standard("fig3-resnet56-w11", "jobs/configs/resnet56-w11-cifar100.toml", "results/resnet56-w11-cifar100.h5",
             2, 4, "12:00:00", "192G", gpus_per_node=4, cpus_per_rank=4,
             comments=("Paper Fig. 3: spectrum of resnet56-w11 (103,703,700 parameters) pretrained 200 epochs",
                       "and pruned to 10%, without further training (spectrum source = pruned).",
                       "Sizing: the H100 figures of BENCHMARKS.md, gradient 2.17 s and 36.9 GiB GPU memory at",
                       "micro-batch 256 -> pretraining 196 micro-batches x 2.17 s = 7 min per epoch, 200 epochs",
                       "= 24 h on one GPU, ~3-4 h on 8 ranks/GPUs; one H.v (~2.5 gradients) at B = 2048 ~",
                       "8 x 5.4 s = 43 s on one GPU, 400 products ~ 40 min on 8. Total ~5 h; 12 h with requeue",
                       "(pretraining checkpoints every 200 steps). Memory: the 100-vector float32 Krylov basis",
                       "of 1.04e8 entries is 41 GB per probe group, sharded over its ranks (5 GB per GPU next",
                       "to the 36.9 GiB of the products; 21 GB per node if kept on the host): 192G per node.",
                       _ESTIMATE)),
    Standard("fig4", "jobs/configs/fig4.toml", "results/fig4.h5", 1, 4, "00:30:00", "8G",
             comments=("Paper Fig. 4: Carleman linearisation error vs t for N = 1..4 and f in {1, 0.9, 0.7, 0.5}",
                       "(qcm stage, PETSc/SLEPc, CPU only; n = 4, N up to N_ref = 6, T = 200 steps).",
                       "Sizing: measured on the 2-core development machine (shared with other work), 2 ranks:",
                       "qcm stage 267 s wall, peak host memory 359 MiB per rank. 30 min on 4 ranks leaves a",
                       "margin of 5x or more; 8G covers 4 ranks with room to spare.",
                       _ESTIMATE)),
    Standard("hhl-reduced", "jobs/configs/hhl-reduced.toml", "results/hhl-reduced.h5", 1, 4, "00:30:00", "16G",
             comments=("Simulated HHL and truncated HHL on the reduced Carleman instances: fidelity vs clock",
                       "qubits and kappa_a (hhl stage, CPU only).",
                       "Sizing: measured on the 2-core development machine (shared with other work), 2 ranks:",
                       "hhl stage 32 s wall, peak host memory 1,465 MiB per rank. 30 min and 16G for 4 ranks",
                       "leave a wide margin (larger clock registers grow the state vector as 2^c).",
                       _ESTIMATE)),
)


def standard_specs(scheduler: str) -> list[tuple[Path, JobSpec]]:
    """(path, spec) of every checked-in job for ``scheduler``."""
    out = []
    for s in STANDARD:
        path = Path("jobs") / scheduler / f"{s.name}{SUFFIX[scheduler]}"
        out.append((path, JobSpec(config=s.config, scheduler=scheduler, nodes=s.nodes,
                                  ranks_per_node=s.ranks_per_node, time=s.time, output=s.output,
                                  name=s.name, gpus_per_node=s.gpus_per_node, cpus_per_rank=s.cpus_per_rank,
                                  mem=s.mem, script_path=str(path), comments=s.comments, stages=s.stages,
                                  overrides=s.overrides)))
    return out
