"""Checks ``hpcqml validate`` makes so that a run does not fail after its queue wait.

Problems that would stop the run (an unknown model name, missing CIFAR-100 files, no GPU
for ``device = "cuda"``) are errors; resource estimates are printed, with a warning when
one exceeds :data:`MEMORY_WARN_FRACTION` of the memory a rank gets. Each stage declares
its own checks and estimates (``Stage.estimate``); the caller hands them in, so this
module knows no stage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

from hpcqml.config import RunConfig

#: warn when an estimate exceeds this fraction of the memory per rank
MEMORY_WARN_FRACTION = 0.5


@dataclass
class Preflight:
    """What validate found: estimates (info lines), warnings and errors."""

    estimates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def machine_memory_bytes() -> int:
    """Physical memory of this machine in bytes (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


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


#: a stage's declared validate-time hook (``Stage.estimate``): ``(config, ranks,
#: memory_per_rank, found)``, appending to ``found.errors``, ``.warnings`` and ``.estimates``
Estimate = Callable[[RunConfig, int, float, Preflight], None]


def preflight(cfg: RunConfig, ranks: int = 1, memory_per_rank: float = 0.0,
              stages: list[str] | None = None, estimates: Mapping[str, Estimate] | None = None) -> Preflight:
    """Run every check for ``stages`` (default: those ``[run] stages`` names).

    Args:
        cfg: the validated configuration.
        ranks: MPI ranks the run will use.
        memory_per_rank: bytes a rank may use; 0 = this machine's memory / ranks.
        stages: the stages to check (``hpcqml run`` passes those it is about to run).
        estimates: stage name -> its declared checks and estimates (``Stage.estimate``),
            as the caller's stage registry holds them; a stage without one is not checked.

    Returns:
        The findings (each line once); the caller turns errors into a UserError.
    """
    found = Preflight()
    stages = cfg.stages if stages is None else stages
    memory_per_rank = memory_per_rank or machine_memory_bytes() / max(ranks, 1)
    check_device(cfg, found)
    for name in stages:
        estimate = (estimates or {}).get(name)
        if estimate is not None:
            estimate(cfg, ranks, memory_per_rank, found)
    for lines in (found.estimates, found.warnings, found.errors):
        lines[:] = dict.fromkeys(lines)  # stages sharing an input report it once
    return found
