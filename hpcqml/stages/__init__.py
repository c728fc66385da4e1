"""Stage registry and the context a stage runs in.

A stage is one module in this package that calls :func:`register` at import time
(see ``docs/stage-api.md``). :func:`load_all` imports every module here, so adding a
stage is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, TypeVar

from hpcqml.config import Field, RunConfig, Schema
from hpcqml.perf import StagePerf
from hpcqml.protocols import Comm, Store

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: what a stage reads: a function of the validated config sections (section name -> values)
#: returning the names of the stages whose results the stage reads directly
Reads = Callable[[Mapping[str, Mapping[str, Any]]], tuple[str, ...]]


@dataclass(frozen=True)
class Stage:
    """A registered stage: its name, config schema, entry point and one-line description.

    ``checks`` are the stage's pre-run checks: each takes the context the stage would run
    in and raises a one-line UserError for anything that would make the run fail (an
    input missing, a size out of range). The runner calls them before it touches the
    results file, on every rank (same calls on every rank: a check may read the store).
    """
    name: str
    schema: Mapping[str, Field]
    run: Callable[["StageContext"], None]
    doc: str = ""
    checks: tuple[Callable[["StageContext"], None], ...] = ()
    #: resource estimate for ``validate`` and ``run``: ``estimate(config, ranks,
    #: memory_per_rank, found)`` appends lines to ``found.estimates`` and, above
    #: ``hpcqml.preflight.MEMORY_WARN_FRACTION`` of the memory a rank has, to ``found.warnings``
    estimate: Callable[..., None] | None = None
    #: the stages whose results this stage reads, as a function of the config (see
    #: :data:`Reads`); its fingerprint covers their result-changing settings too. None: reads none
    reads: Reads | None = None
    #: place in the pipeline (``hpcqml info``, ``validate --explain``, the results file's
    #: stage order): stages are listed by ascending ``order``, then name
    order: int = 1000


REGISTRY: dict[str, Stage] = {}


def fixed_reads(*names: str) -> Reads:
    """The :attr:`Stage.reads` of a stage that reads ``names`` whatever the config says."""
    def reads(_sections: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
        return names
    return reads


def register(stage: Stage) -> Stage:
    """Add ``stage`` to the registry (a second, different stage of the same name is an error)."""
    if stage.name in REGISTRY and REGISTRY[stage.name] is not stage:
        raise RuntimeError(f"stage {stage.name!r} registered twice")
    REGISTRY[stage.name] = stage
    return stage


def load_all() -> dict[str, Stage]:
    """Import every stage module of this package and return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


def schemas() -> dict[str, Schema]:
    """Every registered stage's config schema, by stage name."""
    return {name: stage.schema for name, stage in load_all().items()}


def reads() -> dict[str, Reads]:
    """Every registered stage's :attr:`Stage.reads`, by stage name (for ``load_config``)."""
    return {name: stage.reads for name, stage in load_all().items() if stage.reads is not None}


def estimates() -> dict[str, Callable[..., None]]:
    """Every registered stage's :attr:`Stage.estimate`, by stage name (for ``hpcqml.preflight``)."""
    return {name: stage.estimate for name, stage in load_all().items() if stage.estimate is not None}


def pipeline() -> tuple[str, ...]:
    """The registered stages in pipeline order (:attr:`Stage.order`, then name)."""
    return tuple(sorted(load_all(), key=lambda name: (REGISTRY[name].order, name)))


def __getattr__(name: str) -> Any:
    """``PIPELINE``: :func:`pipeline`, computed when asked (the stages register on import)."""
    if name == "PIPELINE":
        return pipeline()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class StageContext:
    """What a stage sees: its config, the communicator, the store, perf and progress."""

    name: str
    cfg: dict[str, Any]
    config: RunConfig
    comm: Comm
    store: Store  # a hpcqml.store.ResultsStore
    workdir: Path
    perf: StagePerf
    quiet: bool = False
    #: hex digest of the stage inputs that change its results (this stage's result-relevant
    #: keys and those of the stages it reads); stamped on every work-directory artifact.
    fingerprint: str = ""
    #: True when the runner discarded this stage's earlier results because its settings
    #: changed: the stage's own work-directory artifacts with another fingerprint may be
    #: replaced (recomputed) instead of refused.
    fresh: bool = False
    #: stages that run before this one in this invocation: a pre-run check skips the
    #: inputs they produce (those may not exist yet), and checks everything else.
    pending: frozenset[str] = frozenset()

    @property
    def run_cfg(self) -> dict[str, Any]:
        return self.config.run

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def section(self, name: str) -> dict[str, Any]:
        """Another stage's validated section (e.g. the train stage reading ``[data]``)."""
        return self.config.sections[name]

    def device(self) -> torch.device:
        """The torch device of this rank: GPU ``local_rank % device_count`` or CPU."""
        import torch

        from hpcqml.parallel import local_rank

        choice = self.run_cfg["device"]
        if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            from hpcqml.errors import UserError

            raise UserError("[run] device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank(self.comm) % torch.cuda.device_count())

    def log(self, message: str) -> None:
        if self.rank == 0 and not self.quiet:
            from tqdm import tqdm

            tqdm.write(f"[{self.name}] {message}", file=sys.stderr)  # never on a progress bar's line

    def progress(self, iterable: Iterable[T], total: int | None = None, desc: str | None = None) -> Iterator[T]:
        """Iterate with a progress bar on rank 0 (none elsewhere, none with --quiet)."""
        if self.rank != 0 or self.quiet:
            yield from iterable
            return
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        yield from tqdm(iterable, total=total, desc=desc or self.name, file=sys.stderr,
                        mininterval=0.5 if interactive else 10.0, dynamic_ncols=interactive,
                        leave=True)
