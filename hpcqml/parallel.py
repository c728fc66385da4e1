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
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from hpcqml.protocols import Comm, PerfTimer

T = TypeVar("T")


def world() -> Comm:
    """``MPI.COMM_WORLD`` (imports mpi4py, which initialises MPI)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def node_rank_and_size(comm: Comm) -> tuple[int, int]:
    """This process's rank among the ranks on its node, and how many ranks the node has."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def local_rank(comm: Comm) -> int:
    """Rank of this process among the ranks on the same node."""
    return node_rank_and_size(comm)[0]


def _timed(perf: PerfTimer | None) -> AbstractContextManager[Any]:
    return perf.comm_timer() if perf is not None else nullcontext()


def allreduce_sum(comm: Comm | None, data: T, perf: PerfTimer | None = None) -> T:
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


def bcast(comm: Comm, value: T, root: int = 0, perf: PerfTimer | None = None) -> T:
    """Broadcast a picklable value from ``root``."""
    if comm.Get_size() == 1:
        return value
    with _timed(perf):
        return comm.bcast(value, root=root)


def decide_on_root(comm: Comm | None, decide: Callable[[], T]) -> T:
    """Run ``decide()`` on rank 0 only and give every rank its answer.

    For choices that read the shared file system (does a checkpoint exist? which
    snapshots are there?): ranks on other nodes may see a stale directory, and ranks that
    decide differently then enter different collectives and hang. A UserError raised by
    ``decide`` is raised on every rank.
    """
    from hpcqml.errors import UserError

    outcome: tuple[bool, Any] | None = None
    if comm is None or comm.Get_rank() == 0:
        try:
            outcome = (True, decide())
        except UserError as exc:
            outcome = (False, str(exc))
    if comm is not None and comm.Get_size() > 1:
        outcome = bcast(comm, outcome)
    if outcome is None:  # rank 0 always decides, and bcast hands its outcome to every rank
        raise RuntimeError("decide_on_root: no outcome reached this rank")
    ok, value = outcome
    if not ok:
        raise UserError(str(value))
    return value  # the Callable[[], T] result broadcast from rank 0


def machine_memory_bytes() -> int:
    """Physical memory of this machine in bytes (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def memory_per_rank(comm: Comm | None, device: Any) -> tuple[int, str]:
    """Bytes of memory one rank may use on ``device``, and what that memory is (words).

    The single rule for every memory-based choice of the engine (the lockstep width, the
    basis warning): on CUDA the device's free memory now (``torch.cuda.mem_get_info``),
    shared by the ranks of this node that use the same device (ranks go to devices as
    ``local rank % device count``); elsewhere the machine's physical memory divided by the
    ranks on this node.  ``comm`` None (or of one rank) counts this process alone; with more
    ranks the call is collective over ``comm``.  0 bytes means unknown.
    """
    import torch

    dev = torch.device(device)
    rank, ranks = (0, 1) if comm is None or comm.Get_size() == 1 else node_rank_and_size(comm)
    if dev.type == "cuda":
        count = max(1, torch.cuda.device_count())
        index = dev.index if dev.index is not None else rank % count
        sharing = max(1, sum(1 for r in range(ranks) if r % count == index % count))
        free = int(torch.cuda.mem_get_info(dev)[0])
        return free // sharing, f"free {torch.cuda.get_device_name(dev)} memory / {sharing} rank(s)"
    return machine_memory_bytes() // max(1, ranks), f"host memory / {ranks} rank(s) on this node"


#: the largest block width chosen automatically: a block product's cost per column stops
#: falling at about 8 columns on a CPU (BENCHMARKS.md, lockstep probes)
MAX_AUTO_WIDTH = 8


def auto_width(probes: int, steps: int, n: int, shards: int, itemsize: int, available: int,
               fraction: float = 0.5) -> int:
    """Block width chosen from memory: as many probes (at most :data:`MAX_AUTO_WIDTH` and
    ``probes``) as have Krylov bases of ``steps`` vectors of ``ceil(n / shards)`` values that
    fit in ``fraction`` of ``available`` bytes; at least 1.  ``available = 0`` (unknown)
    gives the largest width.
    """
    per_probe = max(1, int(steps) * -(-int(n) // max(1, int(shards))) * int(itemsize))
    fit = MAX_AUTO_WIDTH if available <= 0 else int(fraction * available // per_probe)
    return max(1, min(MAX_AUTO_WIDTH, int(probes), fit))


def block_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[lo, hi)`` of ``rank``'s contiguous near-equal block of ``range(n)`` over ``size``
    ranks (the first ``n % size`` blocks are one longer). Used to shard batches and the
    Krylov basis alike.
    """
    base, extra = divmod(int(n), int(size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def init_petsc(options: Sequence[str]) -> None:
    """Initialise PETSc (and SLEPc) with command-line ``options`` (``["-ksp_type", "gmres"]``).

    Must run before the first ``from petsc4py import PETSc``; when PETSc is already
    initialised the options are inserted into its database instead.
    """
    options = list(options)
    if "petsc4py.PETSc" in sys.modules:
        if options:
            sys.modules["petsc4py.PETSc"].Options().insertString(" ".join(options))
        return
    import petsc4py

    petsc4py.init(["hpcqml", *options])
    try:
        import slepc4py
    except ImportError:
        return
    slepc4py.init(["hpcqml", *options])


def unused_petsc_options() -> list[str]:
    """Options in PETSc's database that no object queried (``-options_left`` semantics).

    Empty when PETSc was never initialised or its library cannot be asked.
    """
    petsc = sys.modules.get("petsc4py.PETSc")
    if petsc is None:
        return []
    import ctypes

    try:
        used = ctypes.CDLL(petsc.__file__).PetscOptionsUsed
    except (OSError, AttributeError):
        return []
    left = []
    for name, value in sorted(petsc.Options().getAll().items()):
        flag = ctypes.c_int(0)
        if used(None, name.encode(), ctypes.byref(flag)) == 0 and not flag.value:
            left.append(f"-{name}" + (f" {value}" if value not in ("", None) else ""))
    return left


def petsc_error_message(exc: BaseException, options: Sequence[str]) -> str | None:
    """A one-line message for a PETSc error caused by a command-line option, else None.

    PETSc error 86 (unknown type) and 62/63 (wrong or out-of-range argument) raised by
    ``setFromOptions`` mean an option value PETSc does not accept.
    """
    code = getattr(exc, "ierr", None)
    if type(exc).__name__ != "Error" or code not in (62, 63, 86):
        return None
    pairs = _option_pairs(options)
    suspects = [p for p in pairs if code != 86 or p.split()[0].endswith("_type")] or pairs
    what = "unknown type" if code == 86 else "invalid value"
    given = "; options given: " + ", ".join(suspects) if suspects else " (no PETSc option on the command line)"
    return f"PETSc rejected an option value ({what}, PETSc error {code}){given}"


def is_number_token(token: str) -> bool:
    """True for a numeric literal PETSc takes as an option value ("-5", "-0.5", "1e-3"),
    so that a negative value is never mistaken for the next option.
    """
    try:
        float(token)
    except ValueError:
        return False
    return token.strip().lower().lstrip("+-") not in ("nan", "inf", "infinity")


def _option_pairs(options: Sequence[str]) -> list[str]:
    pairs: list[str] = []
    for token in options:
        if (token.startswith("-") and not is_number_token(token)) or not pairs:
            pairs.append(token)
        else:
            pairs[-1] += f" {token}"
    return pairs


def report_error_and_abort(comm: Comm | None, exc: BaseException, debug: bool = False, code: int = 1) -> None:
    """Print ``exc`` as one line (the traceback with ``debug``) and take every rank down.

    With one rank this exits the interpreter; with several it calls ``MPI_Abort`` so
    ranks blocked in a collective do not wait for ever. Ranks other than 0 wait a moment
    first, so that when every rank fails the same way the message appears once (rank 0's
    abort ends them before they print). A stop by signal reaches every rank together and
    is reported by rank 0 alone: the other ranks never print it.
    """
    from hpcqml.errors import UserError
    from hpcqml.io import DiskFullError
    from hpcqml.errors import StoppedBySignal

    size = comm.Get_size() if comm is not None else 1
    rank = comm.Get_rank() if comm is not None else 0
    if rank != 0:
        time.sleep(2.0)  # longer than rank 0's wait below: a failure on every rank prints once
        if isinstance(exc, StoppedBySignal) and comm is not None:
            comm.Abort(code)   # rank 0 says what was saved; reached only if it has not aborted yet
            os._exit(code)
    where = f" (rank {rank} of {size})" if size > 1 else ""
    message = str(exc) or type(exc).__name__

    if isinstance(exc, DiskFullError):
        message = exc.strerror or message
    elif not isinstance(exc, UserError):
        message = f"{type(exc).__name__}: {message}"
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    line = f"hpcqml: error{where}: {message.splitlines()[0] if message else ''}\n"
    os.write(2, line.encode(errors="replace"))  # unbuffered: nothing left behind in Python
    if comm is not None and size > 1:
        # Let the launcher forward the line before the abort tears its I/O down; ranks
        # spinning in a collective can slow it on an oversubscribed node.
        time.sleep(1.0)
        comm.Abort(code)
    os._exit(code)


def run_on_all_ranks(fn: Callable[..., T], comm: Comm | None, *args: Any, debug: bool = False,
                     code: int = 1, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on this rank; an exception on any rank aborts all ranks."""
    try:
        return fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as exc:
        report_error_and_abort(comm, exc, debug=debug, code=code)
        raise  # unreachable
