"""Structural types of the two seams every stage and most kernels share: the communicator and the store.

These are :class:`typing.Protocol` classes, so nothing has to inherit from them:

* :class:`Comm` is the part of an mpi4py intracommunicator that the package calls.  An
  ``mpi4py.MPI.Intracomm`` (``MPI.COMM_WORLD``, a ``Split`` of it) satisfies it as it is;
  ``None`` is the usual way to say "one process" where an argument is ``Comm | None``.
* :class:`Store` is the part of :class:`hpcqml.store.ResultsStore` that the stages use:
  collective reads of the results file, the atomic commit of one group, and the questions
  a stage asks before it recomputes a unit (is the group complete, is the stage being
  replaced).
* :class:`PerfTimer` is what a kernel charges work counts and MPI time to
  (:class:`hpcqml.perf.StagePerf`).

This module imports nothing from the package (layer 0), so any module may name these types.
Methods whose mpi4py arguments are buffers or reduction operations keep ``Any`` for those:
mpi4py accepts many buffer forms, and the types of its ``Op`` constants come from a
compiled module.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Comm(Protocol):
    """The mpi4py intracommunicator methods the package calls (names and keywords as mpi4py's)."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py name
        """This process's rank."""
        ...

    def Get_size(self) -> int:  # noqa: N802 - mpi4py name
        """How many ranks the communicator has."""
        ...

    def Barrier(self) -> None:  # noqa: N802 - mpi4py name
        """Wait until every rank arrives."""
        ...

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a picklable object from ``root``."""
        ...

    def allreduce(self, sendobj: Any, op: Any = ...) -> Any:
        """Reduce picklable objects over every rank and hand every rank the result."""
        ...

    def allgather(self, sendobj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank."""
        ...

    def gather(self, sendobj: Any, root: int = 0) -> list[Any] | None:
        """Every rank's object on ``root`` (None elsewhere)."""
        ...

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = ...) -> None:  # noqa: N802 - mpi4py name
        """Reduce a buffer over every rank (``MPI.IN_PLACE`` as ``sendbuf`` reduces in place)."""
        ...

    def Bcast(self, buf: Any, root: int = 0) -> None:  # noqa: N802 - mpi4py name
        """Broadcast a buffer from ``root`` in place."""
        ...

    def Split(self, color: int = 0, key: int = 0) -> Comm:  # noqa: N802 - mpi4py name
        """Sub-communicators of the ranks with equal ``color``, ordered by ``key``."""
        ...

    def Split_type(self, split_type: int, key: int = 0, info: Any = ...) -> Comm:  # noqa: N802 - mpi4py name
        """Sub-communicators by a type of split (``MPI.COMM_TYPE_SHARED``: one per node)."""
        ...

    def Free(self) -> None:  # noqa: N802 - mpi4py name
        """Release a communicator this process created."""
        ...

    def Abort(self, errorcode: int = 0) -> Any:  # noqa: N802 - mpi4py name
        """End every process of the job."""
        ...


class PerfTimer(Protocol):
    """What a kernel charges its work and its MPI time to (:class:`hpcqml.perf.StagePerf`)."""

    def count(self, name: str, amount: float = 1) -> None:
        """Add ``amount`` to the work counter ``name``."""
        ...

    def comm_timer(self) -> AbstractContextManager[Any]:
        """A block whose wall time is charged to MPI communication."""
        ...


class Store(Protocol):
    """The results-store methods the stages call (:class:`hpcqml.store.ResultsStore`).

    Every method is collective over the store's communicator: rank 0 touches the file and
    every rank gets its answer.  ``read`` and ``commit`` hand an open ``h5py.File`` or
    ``h5py.Group`` to the callback (typed ``Any`` here, so this module needs no h5py).
    """

    path: Path
    invocation: str | None

    def read(self, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """``fn(file)`` on rank 0, its answer broadcast; ``default`` when the file is absent."""
        ...

    def is_complete(self, key: str) -> bool:
        """Whether the group ``key`` exists and is marked complete."""
        ...

    def commit(self, key: str, write: Callable[[Any], None] | None = None,
               attrs: Mapping[str, Any] | None = None) -> None:
        """Write the group ``key`` atomically (copy, write, mark complete, rename)."""
        ...

    def is_replacing(self, stage: str) -> bool:
        """Whether the stage's earlier results are being replaced by a recomputation."""
        ...

    def decide_once(self, key: str, decide: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
        """A choice stored once, before the results that depend on it."""
        ...

    def set_root_attrs(self, attrs: Mapping[str, Any], group: str = "/") -> None:
        """Set attributes of a group (the root by default)."""
        ...

    def mark_stale(self, stages: Sequence[str], because: str) -> None:
        """Mark the results of ``stages`` as stale, saying why."""
        ...


class StageRun(Protocol):
    """What the kernels below the stages read of a running stage (:class:`hpcqml.stages.StageContext`).

    The training kernels (checkpoint origins, resume decisions) take the stage's context
    through this type, so they need not import the stages layer above them.
    """

    name: str
    cfg: dict[str, Any]
    comm: Comm
    store: Store
    workdir: Path
    fingerprint: str
    fresh: bool

    def log(self, message: str) -> None:
        """One progress line on rank 0."""
        ...
