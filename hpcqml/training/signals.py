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
import threading
from collections.abc import Mapping

import numpy as np

from hpcqml.errors import StoppedBySignal
from hpcqml.io import read_limited

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: bytes the stop note may have (it holds one signal name)
STOP_NOTE_LIMIT = 64

#: collective codes: a larger code wins the max-allreduce, so a cancel beats the warning
_CODE = {signal.SIGUSR1: 1, signal.SIGTERM: 2}
_SIGNUM = {code: signum for signum, code in _CODE.items()}

#: what each signal means to a batch job
MEANING = {signal.SIGUSR1: "wall-time warning", signal.SIGTERM: "cancel"}


class StopFlag:
    """Install with ``with StopFlag() as stop: ... if stop.requested(comm): ...``.

    ``signum`` is the signal that arrived (SIGTERM wins over SIGUSR1 when both do); after
    :meth:`requested` returned True it is the same on every rank.
    """

    def __init__(self, signals=SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def flag(self) -> bool:
        """Whether this rank has received a stop signal."""
        return self.signum is not None

    def _handler(self, signum: int, frame: object) -> None:  # noqa: ARG002 - signal handler signature
        if _CODE.get(signum, 0) >= _CODE.get(self.signum, 0):
            self.signum = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def requested(self, comm) -> bool:
        """True on every rank if any rank has received a stop signal (collective)."""
        if comm.Get_size() == 1:
            return self.flag
        from mpi4py import MPI

        buf = np.array([_CODE.get(self.signum, 0)], dtype=np.int32)
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


def interrupted_error(signum: int | None, step: int, path, total: int | None = None,
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
