"""Checks ``hpcqml validate`` makes so that a run does not fail after its queue wait.

Problems that would stop the run (an unknown model name, missing CIFAR-100 files, no GPU
for ``device = "cuda"``) are errors; resource estimates are printed, with a warning when
one exceeds :data:`MEMORY_WARN_FRACTION` of the memory a rank gets. Each stage declares
its own checks and estimates (``Stage.estimate``); the caller hands them in, so this
module knows no stage.

The memory a rank gets is that of the node the run is meant for, not of the machine
``validate`` runs on (on a cluster, a login node): :func:`memory_target` takes it from,
in order, an explicit ``--memory-per-rank``, the job's allocation (SLURM_MEM_PER_NODE,
SLURM_MEM_PER_CPU x SLURM_CPUS_PER_TASK, or the PBS script's ``HPCQML_NODE_MEMORY``),
``[run] node_memory_gib``, and only then this machine, and says which it used.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from hpcqml.config import RunConfig
from hpcqml.parallel import auto_width, machine_memory_bytes

#: warn when an estimate exceeds this fraction of the memory per rank
MEMORY_WARN_FRACTION = 0.5


@dataclass
class Preflight:
    """What validate found: estimates (info lines), warnings and errors."""

    estimates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: where the memory per rank that the estimates are compared with came from
    memory_source: str = ""


@dataclass(frozen=True)
class MemoryTarget:
    """The memory one rank gets, in bytes, and where that number came from (words)."""

    per_rank: float
    source: str


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNIT = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """A scheduler's memory size in bytes: ``"64G"``, ``"4000M"``, ``"64gb"``, or a plain
    number of MiB (SLURM's unit); 0 when ``text`` is not such a size.
    """
    m = _SIZE.match(text or "")
    if m is None:
        return 0
    return int(float(m.group(1)) * _UNIT[m.group(2).upper()])


def _ranks_on_node(ranks: int, env: Mapping[str, str]) -> tuple[int, str]:
    """Ranks sharing one node's memory, and the variable that said so (all ``ranks``
    when nothing does: the smaller share, so that warnings come early rather than late).
    """
    for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "HPCQML_RANKS_PER_NODE"):
        m = re.match(r"^\s*(\d+)", env.get(name, ""))   # SLURM_TASKS_PER_NODE: "4(x2),3"
        if m and int(m.group(1)) > 0:
            return min(int(m.group(1)), max(ranks, 1)), name
    return max(ranks, 1), ""


def memory_target(cfg: RunConfig, ranks: int = 1, memory_per_rank: float = 0.0,
                  environ: Mapping[str, str] | None = None) -> MemoryTarget:
    """The memory a rank of the run gets, and its source, for the 50 % warning.

    In order: ``memory_per_rank`` (``validate --memory-per-rank``); the job's allocation
    when running inside one (``SLURM_MEM_PER_CPU`` x ``SLURM_CPUS_PER_TASK`` per rank,
    ``SLURM_MEM_PER_NODE`` or the PBS script's ``HPCQML_NODE_MEMORY`` per node); ``[run]
    node_memory_gib``; this machine's physical memory.  A node's memory is shared by the
    ranks on it (``SLURM_NTASKS_PER_NODE``, ``SLURM_TASKS_PER_NODE``,
    ``HPCQML_RANKS_PER_NODE``; all ``ranks`` when none is set).

    Args:
        cfg: the validated configuration.
        ranks: MPI ranks of the run.
        memory_per_rank: bytes per rank given explicitly (0: not given).
        environ: the environment to read the scheduler's variables from (default: this process's).

    Returns:
        The bytes per rank (0 when unknown) and a phrase naming their source.
    """
    env = os.environ if environ is None else environ
    if memory_per_rank > 0:
        return MemoryTarget(float(memory_per_rank), "--memory-per-rank")
    per_cpu = parse_size(env.get("SLURM_MEM_PER_CPU", ""))
    if per_cpu:
        text = env.get("SLURM_CPUS_PER_TASK", "").strip()
        cpus = max(int(text), 1) if text.isdigit() else 1
        return MemoryTarget(float(per_cpu * cpus),
                            f"SLURM_MEM_PER_CPU = {gib(per_cpu)} x {cpus} CPU(s) per rank (this job's allocation)")
    share, said = _ranks_on_node(ranks, env)
    ranks_text = f"{share} rank(s) on a node" + (f" ({said})" if said else "")
    for name, what in (("SLURM_MEM_PER_NODE", "this job's allocation"),
                       ("HPCQML_NODE_MEMORY", "the job script's memory request")):
        node = parse_size(env.get(name, ""))   # SLURM_MEM_PER_NODE=0 (--mem=0, the whole node) is no number
        if node:
            return MemoryTarget(node / share, f"{name} = {gib(node)} per node ({what}) / {ranks_text}")
    node_gib = float(cfg.run.get("node_memory_gib", 0.0) or 0.0)
    if node_gib > 0:
        return MemoryTarget(node_gib * 2**30 / share, f"[run] node_memory_gib = {node_gib:g} / {ranks_text}")
    machine = machine_memory_bytes()
    return MemoryTarget(machine / share, f"this machine's memory, {gib(machine)}, / {ranks_text} (not the "
                        "target node's: set [run] node_memory_gib when validating on a login node)")


def gib(nbytes: float) -> str:
    """``nbytes`` in GiB with two decimals, e.g. ``"1.50 GiB"``."""
    return f"{nbytes / 2**30:.2f} GiB"


def check_device(cfg: RunConfig, found: Preflight) -> None:
    """``device = "cuda"`` needs a GPU on the machine that runs ``validate``."""
    if cfg.run["device"] != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        found.errors.append("run.device = 'cuda' but torch sees no CUDA device here (validate on a GPU node, "
                            "or use device = 'auto')")


#: bytes per value of the model state the spectrum stage builds its Krylov basis in
#: (float32: the models' parameter dtype)
STATE_ITEMSIZE = 4


def krylov_basis_bytes(steps: int, n: int, shards: int, itemsize: int = STATE_ITEMSIZE) -> int:
    """Bytes per rank of a fully reorthogonalised Lanczos basis: ``steps`` vectors of the
    ``ceil(n / shards)`` parameters a rank holds, ``itemsize`` bytes each.

    Args:
        steps: Lanczos steps m (vectors kept).
        n: parameters of the model state.
        shards: ranks the basis is split over (a probe group's size).
        itemsize: bytes per value (the state dtype's element size).

    Returns:
        The bytes one rank holds.
    """
    return int(steps) * (-(-int(n) // max(int(shards), 1))) * int(itemsize)


@dataclass(frozen=True)
class BasisPlan:
    """How many Krylov bases one rank of a spectrum run holds at once (:func:`basis_plan`)."""

    #: probes advanced together in lockstep
    width: int
    #: every probe's recurrence is kept so that a step growth extends it
    keep: bool
    #: bases held at once per rank: ``width``, or a group's probes when they are kept
    bases: int
    #: bytes of one basis per rank
    per_basis: int
    #: bytes per rank that keeping every probe of a group would need (0: no step growth)
    keep_bytes: int

    @property
    def total(self) -> int:
        """Bytes of all bases held at once per rank."""
        return self.bases * self.per_basis


def basis_plan(probes_per_group: int, steps: int, max_steps: int, n: int, shards: int, itemsize: int,
               available: float, lockstep: int = 0, reorth: str = "full",
               fraction: float = MEMORY_WARN_FRACTION) -> BasisPlan:
    """The Krylov bases a spectrum run holds per rank; the one rule of the stage and of ``validate``.

    The lockstep width is ``lockstep``, or with 0 as many probes as have bases of
    ``max_steps`` vectors fitting in ``fraction`` of ``available``
    (:func:`hpcqml.parallel.auto_width`), at most a group's probes.  When the steps
    may grow (``max_steps > steps``) every probe of a group is kept for extension if all
    their bases fit in that fraction (or ``available`` is unknown, 0); the bases held at
    once are then ``max(width, probes_per_group)``, else ``width``.

    Args:
        probes_per_group: probes one group runs at most (``ceil(max_probes / groups)``).
        steps: starting Lanczos steps.
        max_steps: step budget (each basis holds up to this many vectors).
        n: operator dimension.
        shards: ranks one basis is split over (a group's size).
        itemsize: bytes per value of the basis.
        available: bytes a rank may use (0: unknown).
        lockstep: ``[spectrum] lockstep`` (0 = from memory).
        reorth: ``full`` (a basis of ``max_steps`` vectors) or ``none`` (two vectors).
        fraction: share of ``available`` the bases may take.
    """
    per_group = max(1, int(probes_per_group))
    vectors = int(max_steps) if reorth == "full" else 2
    per_basis = krylov_basis_bytes(vectors, n, shards, itemsize)
    width = int(lockstep) or auto_width(per_group, vectors, n, shards, itemsize, int(available), fraction)
    width = max(1, min(width, per_group))
    keep = int(max_steps) > int(steps)
    keep_bytes = per_group * per_basis if keep else 0
    if keep and available > 0 and keep_bytes > fraction * available:
        keep = False
    bases = max(width, per_group) if keep else width
    return BasisPlan(width, keep, bases, per_basis, keep_bytes)


#: a stage's declared validate-time hook (``Stage.estimate``): ``(config, ranks,
#: memory_per_rank, found)``, appending to ``found.errors``, ``.warnings`` and ``.estimates``
Estimate = Callable[[RunConfig, int, float, Preflight], None]


def preflight(cfg: RunConfig, ranks: int = 1, memory_per_rank: float = 0.0,
              stages: list[str] | None = None, estimates: Mapping[str, Estimate] | None = None) -> Preflight:
    """Run every check for ``stages`` (default: those ``[run] stages`` names).

    Args:
        cfg: the validated configuration.
        ranks: MPI ranks the run will use.
        memory_per_rank: bytes a rank may use; 0 = as :func:`memory_target` finds it.
        stages: the stages to check (``hpcqml run`` passes those it is about to run).
        estimates: stage name -> its declared checks and estimates (``Stage.estimate``),
            as the caller's stage registry holds them; a stage without one is not checked.

    Returns:
        The findings (each line once); the caller turns errors into a UserError.
    """
    found = Preflight()
    stages = cfg.stages if stages is None else stages
    target = memory_target(cfg, ranks, memory_per_rank)
    memory_per_rank = target.per_rank
    found.memory_source = target.source
    found.estimates.append(f"memory per rank: {gib(memory_per_rank)} from {target.source}; "
                           f"an estimate above {MEMORY_WARN_FRACTION:.0%} of it is warned about")
    check_device(cfg, found)
    for name in stages:
        estimate = (estimates or {}).get(name)
        if estimate is not None:
            estimate(cfg, ranks, memory_per_rank, found)
    for lines in (found.estimates, found.warnings, found.errors):
        lines[:] = dict.fromkeys(lines)  # stages sharing an input report it once
    return found
