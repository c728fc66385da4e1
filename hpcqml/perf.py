"""Per-stage performance records: wall time, MPI time, peak memory and work counts.

Every stage runs inside a :class:`StagePerf`; at the end the per-rank figures are
gathered to rank 0 and stored under ``/perf/<stage>`` so any run doubles as a benchmark
record (strong/weak scaling is read off runs at different rank counts).
"""
from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from hpcqml.protocols import Comm

if TYPE_CHECKING:
    import h5py


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last reset (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gpu_peak_bytes() -> int:
    try:
        import torch
    except ImportError:
        return 0
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.max_memory_allocated())


def _gpu_reset() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


@dataclass
class StagePerf:
    """Timers and counters of one stage on one rank."""

    stage: str
    counters: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    comm_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_host_bytes: int = 0
    peak_gpu_bytes: int = 0
    peak_host_is_stage_local: bool = False
    _start: float = 0.0

    def start(self) -> None:
        self.peak_host_is_stage_local = _reset_peak_rss()
        _gpu_reset()
        self._start = time.perf_counter()

    def stop(self) -> None:
        self.wall_seconds = time.perf_counter() - self._start
        self.peak_host_bytes = peak_rss_bytes()
        self.peak_gpu_bytes = _gpu_peak_bytes()

    def count(self, name: str, amount: float = 1) -> None:
        """Add ``amount`` to the work counter ``name`` (e.g. ``hvp_products``)."""
        self.counters[name] += amount

    @contextmanager
    def comm_timer(self) -> Iterator[None]:
        """Charge the enclosed block to MPI communication time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.comm_seconds += time.perf_counter() - t0

    def record(self) -> dict[str, Any]:
        """This rank's figures as a plain dict (picklable, for the gather to rank 0)."""
        return {"wall_seconds": self.wall_seconds, "comm_seconds": self.comm_seconds,
                "peak_host_bytes": self.peak_host_bytes, "peak_gpu_bytes": self.peak_gpu_bytes,
                "counters": dict(self.counters)}


@dataclass
class PerfRecord:
    """Per-rank performance of one stage, as stored in ``/perf/<stage>``; index = rank.

    The layout of ``/perf/<stage>`` is defined here once: :meth:`to_group` writes it and
    :meth:`from_group` reads it back (``hpcqml.results`` uses it; docs/results-schema.md).
    ``resumed`` and ``invocation`` are attributes the runner's commit sets on the group.
    """

    stage: str
    wall_seconds: np.ndarray
    comm_seconds: np.ndarray
    peak_host_bytes: np.ndarray
    peak_gpu_bytes: np.ndarray
    counters: dict[str, np.ndarray]
    resumed: bool = False
    invocation: str = ""
    #: ``stage`` when the peak host memory was reset at the stage's start, else ``process``
    peak_host_scope: str = "process"

    @property
    def ranks(self) -> int:
        """How many ranks ran the stage."""
        return int(self.wall_seconds.size)

    @classmethod
    def from_ranks(cls, stage: str, records: Sequence[Mapping[str, Any]], peak_is_stage_local: bool) -> PerfRecord:
        """Assemble the per-rank dicts of :meth:`StagePerf.record` (rank order) into one record."""
        def column(key: str, dtype: type) -> np.ndarray:
            return np.array([r[key] for r in records], dtype=dtype)

        names = sorted({k for r in records for k in r["counters"]})
        counters = {name: np.array([r["counters"].get(name, 0) for r in records], dtype=np.float64)
                    for name in names}
        return cls(stage=stage, wall_seconds=column("wall_seconds", np.float64),
                   comm_seconds=column("comm_seconds", np.float64),
                   peak_host_bytes=column("peak_host_bytes", np.int64),
                   peak_gpu_bytes=column("peak_gpu_bytes", np.int64), counters=counters,
                   peak_host_scope="stage" if peak_is_stage_local else "process")

    def to_group(self, group: h5py.Group) -> None:
        """Write the record into ``group`` (datasets with units and descriptions, and attributes)."""
        from hpcqml.store import write_dataset

        scope = "this stage" if self.peak_host_scope == "stage" else "the process so far"
        write_dataset(group, "wall_seconds", np.asarray(self.wall_seconds, dtype=np.float64), "s",
                      "wall-clock time of the stage on each rank (index = rank)")
        write_dataset(group, "comm_seconds", np.asarray(self.comm_seconds, dtype=np.float64), "s",
                      "time each rank spent in timed MPI reductions and broadcasts")
        write_dataset(group, "peak_host_bytes", np.asarray(self.peak_host_bytes, dtype=np.int64), "bytes",
                      f"peak resident host memory of each rank during {scope} (VmHWM)")
        write_dataset(group, "peak_gpu_bytes", np.asarray(self.peak_gpu_bytes, dtype=np.int64), "bytes",
                      "peak GPU memory allocated by torch on each rank (0 without a GPU)")
        counters = group.create_group("counters")
        counters.attrs["description"] = "work done by each rank, one dataset per kind of work"
        for name in sorted(self.counters):
            write_dataset(counters, name, np.asarray(self.counters[name], dtype=np.float64),
                          "count", f"'{name}' work units counted on each rank (index = rank)")
        group.attrs["ranks"] = self.ranks
        group.attrs["peak_host_scope"] = self.peak_host_scope
        group.attrs["description"] = "performance record of one stage: per-rank time, memory and work counts"

    @classmethod
    def from_group(cls, stage: str, group: h5py.Group) -> PerfRecord:
        """Read a record written by :meth:`to_group` (files without ``counters`` or
        ``peak_host_scope``, written before those existed, read with empty/``process`` values).
        """
        counters = {k: v[()] for k, v in group["counters"].items()} if "counters" in group else {}
        return cls(stage=stage, wall_seconds=group["wall_seconds"][()], comm_seconds=group["comm_seconds"][()],
                   peak_host_bytes=group["peak_host_bytes"][()], peak_gpu_bytes=group["peak_gpu_bytes"][()],
                   counters=counters, resumed=bool(group.attrs.get("resumed", False)),
                   invocation=_text(group.attrs.get("invocation", "")),
                   peak_host_scope=_text(group.attrs.get("peak_host_scope", "process")))


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def gather_records(comm: Comm, perf: StagePerf) -> list[dict[str, Any]] | None:
    """Per-rank records on rank 0 (None elsewhere)."""
    return comm.gather(perf.record(), root=0)


def write_records(group: h5py.Group, records: Sequence[Mapping[str, Any]] | None, peak_is_stage_local: bool) -> None:
    """Write gathered per-rank records into an HDF5 group (:meth:`PerfRecord.to_group`).

    ``records`` is what :func:`gather_records` returned; the store's writers run on rank 0,
    where it is never None.
    """
    if records is None:
        raise RuntimeError("performance records are gathered on rank 0 only; write them there")
    stage = str(group.name).rsplit("/", 1)[-1]
    PerfRecord.from_ranks(stage, records, peak_is_stage_local).to_group(group)
