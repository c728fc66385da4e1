"""Checkpoint-and-stop on SIGUSR1 (the wall-time warning) and SIGTERM (a cancel).

The handler only records the signal; the training loop polls :meth:`StopFlag.requested`,
which is collective (a max-allreduce of the signal code), so every rank stops after the
same step and knows which signal arrived even when only some ranks received it.

The two signals mean different things to a batch job (see docs/cluster.md):

* SIGUSR1 is the warning the job script asks for before the wall time (SLURM
  ``--signal=B:USR1@LEAD``, a timer on PBS): the ranks checkpoint and stop, and the job
  script requeues the job, which resumes from the checkpoint;
* SIGTERM is what ``scancel``/``qdel`` send: the ranks checkpoint and stop, and the job
  is not requeued.

The job scripts export ``HPCQML_BATCH`` (the scheduler) and ``HPCQML_REQUEUE``, from
which :func:`will_requeue` tells the stop message whether a requeue follows.  A job
script asks its ranks to stop with SIGUSR1 for either signal it received (Open MPI's
``mpirun`` kills its ranks at once on a second SIGTERM) and writes the signal it received
to the file ``HPCQML_STOP_NOTE``; :func:`effective_signal` reads it back.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from hpcqml.errors import StoppedBySignal
from hpcqml.io import read_limited
from hpcqml.protocols import Comm

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: bytes the stop note may have (it holds one signal name)
STOP_NOTE_LIMIT = 64

#: collective codes: a larger code wins the max-allreduce, so a cancel beats the warning
_CODE: dict[int, int] = {signal.SIGUSR1: 1, signal.SIGTERM: 2}
_SIGNUM: dict[int, int] = {code: signum for signum, code in _CODE.items()}


def _code(signum: int | None) -> int:
    """The rank of a stop signal (0: none; a cancel outranks a wall-time warning)."""
    return 0 if signum is None else _CODE.get(signum, 0)

#: what each signal means to a batch job
MEANING: dict[int, str] = {signal.SIGUSR1: "wall-time warning", signal.SIGTERM: "cancel"}


class StopFlag:
    """Install with ``with StopFlag() as stop: ... if stop.requested(comm): ...``.

    ``signum`` is the signal that arrived (SIGTERM wins over SIGUSR1 when both do); after
    :meth:`requested` returned True it is the same on every rank.
    """

    def __init__(self, signals: Iterable[int] = SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def flag(self) -> bool:
        """Whether this rank has received a stop signal."""
        return self.signum is not None

    def _handler(self, signum: int, frame: object) -> None:  # noqa: ARG002 - signal handler signature
        if _code(signum) >= _code(self.signum):
            self.signum = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def requested(self, comm: Comm | None) -> bool:
        """True on every rank if any rank has received a stop signal (collective)."""
        if comm is None or comm.Get_size() == 1:
            return self.flag
        from mpi4py import MPI

        buf = np.array([_code(self.signum)], dtype=np.int32)
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        if buf[0]:
            self.signum = _SIGNUM.get(int(buf[0]), signal.SIGTERM)
        return bool(buf[0])


def effective_signal(signum: int | None, env: Mapping[str, str] | None = None) -> int | None:
    """The signal the stop stands for: SIGTERM when the job script noted a cancel it
    forwarded as SIGUSR1 (``HPCQML_STOP_NOTE``), else ``signum``.
    """
    env = os.environ if env is None else env
    note = env.get("HPCQML_STOP_NOTE")
    if note:
        try:
            noted = read_limited(note, STOP_NOTE_LIMIT).decode("ascii", "replace").strip()
        except (OSError, ValueError):
            noted = ""
        if noted == "TERM":
            return signal.SIGTERM
    return signum


def will_requeue(signum: int | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether the job script requeues the job after this stop.

    Only the wall-time warning (SIGUSR1) inside a job script (``HPCQML_BATCH`` set) with
    requeueing on (``HPCQML_REQUEUE`` not ``0``) does.
    """
    env = os.environ if env is None else env
    return (effective_signal(signum, env) == signal.SIGUSR1 and bool(env.get("HPCQML_BATCH"))
            and env.get("HPCQML_REQUEUE", "1") != "0")


def stop_message(signum: int | None, stopped: str, saved: str,
                 env: Mapping[str, str] | None = None) -> str:
    """One line: which signal stopped what, what was saved, and what happens next.

    Args:
        signum: the signal (None: an unknown stop request).
        stopped: where the work stopped, e.g. ``"pretrain after step 12 of 40"``.
        saved: what is on disk, e.g. ``"checkpoint work/pretrain_state.pt (step 12)"``.
        env: the environment to read ``HPCQML_BATCH``/``HPCQML_REQUEUE`` from (default: this process's).

    Returns:
        The message.
    """
    signum = effective_signal(signum, env)
    if signum:
        name = signal.Signals(signum).name
        meaning = MEANING.get(signum)
        cause = f"{name} ({meaning})" if meaning else name
    else:
        cause = "a stop signal"
    if will_requeue(signum, env):
        after = "the job script requeues the job, which resumes from there"
    else:
        after = "no requeue; run the same command again to continue"
    return f"stopped by {cause}: {stopped}; saved {saved}; {after}"


def interrupted_error(signum: int | None, step: int, path: str | os.PathLike[str], total: int | None = None,
                      stage: str = "", env: Mapping[str, str] | None = None) -> StoppedBySignal:
    """The one-line error after a stop signal, naming the step and the checkpoint saved."""
    where = f"{stage} after step {step}" if stage else f"after step {step}"
    if total is not None:
        where += f" of {total}"
    return stopped_error(signum, where, f"checkpoint {path} (step {step})", env)


def stopped_error(signum: int | None, stopped: str, saved: str,
                  env: Mapping[str, str] | None = None) -> StoppedBySignal:
    """The error for a stop (see :func:`stop_message`), worded again when it is printed
    and recorded: a SIGTERM the job script noted after the SIGUSR1 that stopped the
    ranks then reads as a cancel with no requeue.
    """
    def compose() -> str:
        return stop_message(signum, stopped, saved, env)
    return StoppedBySignal(compose(), recompose=compose)


#: seconds the ranks wait for each other before an orderly exit after a stop; a rank that
#: does not arrive (it never saw the stop) makes them fall back to MPI_Abort
ORDERLY_EXIT_WAIT = 30.0
#: seconds rank 0 waits for the other ranks on its node to be reaped by their launcher
PEERS_GONE_WAIT = 10.0
#: seconds rank 0 gives ranks on other nodes to be reaped before it exits itself
REMOTE_GRACE = 0.5
#: exit status of a stop by signal, as of any UserError, unless HPCQML_STOP_STATUS says otherwise
STOP_STATUS = 2


def stop_status(env: Mapping[str, str] | None = None) -> int | None:
    """The exit status a job script asks of a stop by signal (``HPCQML_STOP_STATUS``, 0 to
    255), or None when it asks none (then the stop exits with :data:`STOP_STATUS`).

    The job scripts ask for 0: they know from the signal they received what the stop means
    and whether to requeue, and under Open MPI's ``mpirun`` any non-zero status of a rank
    starts the launcher's kill sequence (see :func:`leave_after_stop`).
    """
    env = os.environ if env is None else env
    text = env.get("HPCQML_STOP_STATUS", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) > 255:
        return None
    return int(text)


def _process_identity() -> tuple[str, int, str]:
    """(boot id, pid, start time) of this process: names it exactly among the processes of
    its machine, so that a reused pid or another pid namespace is not taken for it.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return boot, os.getpid(), _start_time(os.getpid())


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat); ``"zombie"`` for a
    process that exited and is not yet reaped; ``""`` when there is no such process.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    if not fields or fields[0] in ("Z", "X"):
        return "zombie"
    return fields[19] if len(fields) > 19 else ""


def _wait_until_reaped(peers: Sequence[tuple[str, int, str]], timeout: float) -> None:
    """Wait (at most ``timeout`` s) until none of ``peers`` exists any more: gone from /proc,
    that is reaped by the launcher that started it (a zombie still counts as there).
    """
    deadline = time.monotonic() + timeout
    left = list(peers)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _start_time(p[1]) in (p[2], "zombie")]
        if left:
            time.sleep(0.02)


def _note_stopped() -> None:
    """Tell the job script that the ranks stopped before finishing (a line ``stopped`` in the
    file ``HPCQML_STOP_NOTE`` names), so that it exits non-zero when no requeue follows, even
    though the launcher returns 0.
    """
    note = os.environ.get("HPCQML_STOP_NOTE")
    if not note:
        return
    try:
        with open(note, "a", encoding="utf-8") as fh:
            fh.write("stopped\n")
    except OSError:
        pass


def leave_after_stop(comm: Any, message: str, code: int = STOP_STATUS) -> NoReturn:
    """End every rank in order after a stop by signal that all ranks agreed on.

    A stop by signal is raised on every rank together (:meth:`StopFlag.requested` is
    collective), after the resume state reached disk.  Ending it as an error ends, with
    ``MPI_Abort``, cost a minute under Open MPI's ``mpirun``: the aborting ranks wait to be
    killed, and the launcher kills them by sending SIGCONT, waiting
    ``odls_base_sigkill_timeout``, sending SIGTERM, waiting again and sending SIGKILL,
    whether or not they are still alive.  The job scripts set that timeout to 30 s (a
    checkpoint must fit between a cancel's SIGTERM and the SIGKILL), so ``mpirun``
    returned about 60 s after the stop.  ``mpirun`` runs the same sequence, over the
    exiting rank itself, when a rank exits with a non-zero status after ``MPI_Finalize``.

    So here the ranks leave in order: they meet (a non-blocking barrier, at most
    :data:`ORDERLY_EXIT_WAIT` s; a rank that never arrives makes the others abort as
    before), rank 0 prints the one line ``hpcqml: error (rank 0 of N): MESSAGE``, every rank
    calls ``MPI_Finalize``, the other ranks exit with status 0, and rank 0 exits last with
    ``code`` once the other ranks on its node are reaped (at most :data:`PEERS_GONE_WAIT`
    s) and, when some ranks run on other nodes, :data:`REMOTE_GRACE` s later.  With
    ``code`` 0 (what the job scripts ask through ``HPCQML_STOP_STATUS``) ``mpirun`` returns
    at once; with a non-zero ``code`` it still runs its kill sequence on rank 0.

    Args:
        comm: the communicator of every rank (``MPI.COMM_WORLD``).
        message: the stop's one-line message (:meth:`StoppedBySignal.final`).
        code: the exit status of rank 0, which the launcher reports.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    where = f" (rank {rank} of {size})" if size > 1 else ""
    first = message.splitlines()[0] if message else "stopped by a signal"
    line = f"hpcqml: error{where}: {first}\n".encode(errors="replace")
    sys.stdout.flush()
    sys.stderr.flush()
    if rank == 0:
        _note_stopped()
    if size == 1:                       # nothing to meet: no barrier, no MPI calls at all
        os.write(2, line)
        sys.exit(code)
    from mpi4py import MPI

    request = comm.Ibarrier()
    deadline = time.monotonic() + ORDERLY_EXIT_WAIT
    while not request.Test():
        if time.monotonic() > deadline:
            if rank == 0:
                os.write(2, line)
            comm.Abort(code or STOP_STATUS)
            os._exit(code or STOP_STATUS)
        time.sleep(0.01)
    me = _process_identity()
    peers = comm.allgather(me)
    if rank == 0:
        os.write(2, line)
    MPI.Finalize()
    if rank != 0:
        os._exit(0)
    local = [p for p in peers[1:] if p[0] and p[0] == me[0] and p[2]]
    _wait_until_reaped(local, PEERS_GONE_WAIT)
    if len(local) < size - 1:
        time.sleep(REMOTE_GRACE)
    os._exit(code)
