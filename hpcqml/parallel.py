"""The thin MPI layer: communicator helpers, timed reductions, all-ranks-or-none errors.

Kernels receive a communicator as an argument; only the CLI asks for ``world()``.
Reductions accept numpy arrays or torch tensors (CPU or CUDA; CUDA tensors are staged
through host memory) and can charge their time to a :class:`~hpcqml.perf.StagePerf`.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


def world():
    """``MPI.COMM_WORLD`` (imports mpi4py, which initialises MPI)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def local_rank(comm) -> int:
    """Rank of this process among the ranks on the same node."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank()
    finally:
        node.Free()


def _timed(perf):
    return perf.comm_timer() if perf is not None else nullcontext()


def allreduce_sum(comm, data: Any, perf=None) -> Any:
    """Sum ``data`` over all ranks of ``comm`` (None = one process) in place and return it.

    ``data`` is a numpy array or a torch tensor. Contiguous CPU tensors are reduced in
    place through a numpy view; other tensors through a host copy.
    """
    if comm is None or comm.Get_size() == 1:
        return data
    from mpi4py import MPI

    with _timed(perf):
        if isinstance(data, np.ndarray):
            buf = data if data.flags.c_contiguous else np.ascontiguousarray(data)
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if buf is not data:
                data[...] = buf
            return data
        import torch

        if isinstance(data, torch.Tensor):
            if data.device.type == "cpu" and data.is_contiguous():
                comm.Allreduce(MPI.IN_PLACE, data.numpy(), op=MPI.SUM)
                return data
            host = data.detach().to("cpu").contiguous()
            comm.Allreduce(MPI.IN_PLACE, host.numpy(), op=MPI.SUM)
            data.copy_(host)
            return data
        return comm.allreduce(data, op=MPI.SUM)


def bcast(comm, value: T, root: int = 0, perf=None) -> T:
    """Broadcast a picklable value from ``root``."""
    if comm.Get_size() == 1:
        return value
    with _timed(perf):
        return comm.bcast(value, root=root)


def decide_on_root(comm, decide: Callable[[], T], perf=None) -> T:
    """Run ``decide()`` on rank 0 only and give every rank its answer.

    For choices that read the shared file system (does a checkpoint exist? which
    snapshots are there?): ranks on other nodes may see a stale directory, and ranks that
    decide differently then enter different collectives and hang. A UserError raised by
    ``decide`` is raised on every rank.
    """
    from hpcqml.errors import UserError

    outcome: tuple[bool, object] | None = None
    if comm is None or comm.Get_rank() == 0:
        try:
            outcome = (True, decide())
        except UserError as exc:
            outcome = (False, str(exc))
    if comm is not None and comm.Get_size() > 1:
        outcome = bcast(comm, outcome, perf=perf)
    ok, value = outcome
    if not ok:
        raise UserError(str(value))
    return value  # type: ignore[return-value]


def block_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``rank``'s contiguous near-equal block of ``range(n)`` over ``size``
    ranks (the first ``n % size`` blocks are one longer). Used to shard batches and the
    Krylov basis alike."""
    base, extra = divmod(int(n), int(size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def report_error_and_abort(comm, exc: BaseException, debug: bool = False, code: int = 1) -> None:
    """Print ``exc`` as one line (the traceback with ``debug``) and take every rank down.

    With one rank this exits the interpreter; with several it calls ``MPI_Abort`` so
    ranks blocked in a collective do not wait for ever. Ranks other than 0 wait a moment
    first, so that when every rank fails the same way the message appears once (rank 0's
    abort ends them before they print).
    """
    size = comm.Get_size() if comm is not None else 1
    rank = comm.Get_rank() if comm is not None else 0
    if rank != 0:
        time.sleep(2.0)  # longer than rank 0's wait below: a failure on every rank prints once
    where = f" (rank {rank} of {size})" if size > 1 else ""
    message = str(exc) or type(exc).__name__
    from hpcqml.errors import UserError

    if not isinstance(exc, UserError):
        message = f"{type(exc).__name__}: {message}"
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    line = f"hpcqml: error{where}: {message.splitlines()[0] if message else ''}\n"
    os.write(2, line.encode(errors="replace"))  # unbuffered: nothing left behind in Python
    if size > 1:
        # Let the launcher forward the line before the abort tears its I/O down; ranks
        # spinning in a collective can slow it on an oversubscribed node.
        time.sleep(1.0)
        comm.Abort(code)
    os._exit(code)


def run_on_all_ranks(fn: Callable[..., T], comm, *args: Any, debug: bool = False,
                     code: int = 1, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on this rank; an exception on any rank aborts all ranks."""
    try:
        return fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end all ranks
        report_error_and_abort(comm, exc, debug=debug, code=code)
        raise  # unreachable


@contextmanager
def abort_on_error(comm, debug: bool = False) -> Iterator[None]:
    """Context-manager form of :func:`run_on_all_ranks`."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001
        report_error_and_abort(comm, exc, debug=debug)
