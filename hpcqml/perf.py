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
from typing import Iterator

import numpy as np


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

    def record(self) -> dict:
        return {"wall_seconds": self.wall_seconds, "comm_seconds": self.comm_seconds,
                "peak_host_bytes": self.peak_host_bytes, "peak_gpu_bytes": self.peak_gpu_bytes,
                "counters": dict(self.counters)}


def gather_records(comm, perf: StagePerf) -> list[dict] | None:
    """Per-rank records on rank 0 (None elsewhere)."""
    return comm.gather(perf.record(), root=0)


def write_records(group, records: list[dict], peak_is_stage_local: bool) -> None:
    """Write gathered per-rank records into an HDF5 group (schema: docs/results-schema.md)."""
    from hpcqml.store import write_dataset

    def column(key: str, dtype) -> np.ndarray:
        return np.array([r[key] for r in records], dtype=dtype)

    scope = "this stage" if peak_is_stage_local else "the process so far"
    write_dataset(group, "wall_seconds", column("wall_seconds", np.float64), "s",
                  "wall-clock time of the stage on each rank (index = rank)")
    write_dataset(group, "comm_seconds", column("comm_seconds", np.float64), "s",
                  "time each rank spent in timed MPI reductions and broadcasts")
    write_dataset(group, "peak_host_bytes", column("peak_host_bytes", np.int64), "bytes",
                  f"peak resident host memory of each rank during {scope} (VmHWM)")
    write_dataset(group, "peak_gpu_bytes", column("peak_gpu_bytes", np.int64), "bytes",
                  "peak GPU memory allocated by torch on each rank (0 without a GPU)")
    names = sorted({k for r in records for k in r["counters"]})
    counters = group.create_group("counters")
    counters.attrs["description"] = "work done by each rank, one dataset per kind of work"
    for name in names:
        write_dataset(counters, name, np.array([r["counters"].get(name, 0) for r in records], dtype=np.float64),
                      "count", f"'{name}' work units counted on each rank (index = rank)")
    group.attrs["ranks"] = len(records)
    group.attrs["peak_host_scope"] = "stage" if peak_is_stage_local else "process"
    group.attrs["description"] = "performance record of one stage: per-rank time, memory and work counts"
