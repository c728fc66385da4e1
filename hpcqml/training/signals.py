"""Checkpoint-and-stop on SIGTERM / SIGUSR1 (what batch schedulers send before the wall time).

The handler only sets a flag; the training loop polls :meth:`StopFlag.requested`, which
is collective (a max-allreduce of the flag), so every rank stops after the same step
even when only some ranks received the signal.
"""
from __future__ import annotations

import signal
import threading

import numpy as np

from hpcqml.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Install with ``with StopFlag() as stop: ... if stop.requested(comm): ...``."""

    def __init__(self, signals=SIGNALS) -> None:
        self.signals = tuple(signals)
        self.flag = False
        self.signum: int | None = None
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.flag = True
        self.signum = signum

    def __enter__(self) -> "StopFlag":
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

        buf = np.array([1 if self.flag else 0], dtype=np.int32)
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return bool(buf[0])



class StoppedBySignal(UserError):
    """Raised on every rank after a stop signal, once the checkpoint is on disk."""


def interrupted_error(signum: int | None, step: int, path) -> StoppedBySignal:
    """The one-line error telling the user the run stopped cleanly and how to continue."""
    name = signal.Signals(signum).name if signum else "a stop signal"
    return StoppedBySignal(f"stopped by {name} after step {step}; checkpoint {path} saved, "
                           f"run the same command again to continue")
