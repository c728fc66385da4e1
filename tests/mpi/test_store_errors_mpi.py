"""The results store on several ranks: an error that rank 0 meets inside a store operation (a
writer lock held by another run, damaged bytes) is raised on every rank with the same message,
so no rank waits for an answer that never comes.

Run with ``mpirun -n 2`` and ``-n 3`` (tests/mpi_pytest.sh).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpcqml.errors import InputFileError, UserError
from hpcqml.store import ResultsStore, write_dataset

COMM = MPI.COMM_WORLD
# a rank stuck in a collective is stopped (the thread method: a signal cannot interrupt MPI)
pytestmark = pytest.mark.timeout(120, method="thread")


def on_rank_0(fn: Callable[[], Any]) -> None:
    """``fn()`` on rank 0 only; an exception there is raised on every rank, so no rank is left
    waiting in the next collective."""
    error = None
    if COMM.Get_rank() == 0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - handed to every rank
            error = exc
    error = COMM.bcast(error, root=0)
    if error is not None:
        raise error


@pytest.fixture
def shared_dir():
    path = tempfile.mkdtemp(prefix="hpcqml-store-") if COMM.Get_rank() == 0 else None
    path = Path(COMM.bcast(path, root=0))
    yield path
    COMM.Barrier()
    if COMM.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def test_a_lock_held_by_another_run_is_refused_on_every_rank(shared_dir):
    out = shared_dir / "r.h5"
    lock = shared_dir / "r.h5.lock"
    # a live run of another host holds the file
    on_rank_0(lambda: lock.write_text("host=node-b\npid=1\njob=none\nstarted=then\n"))
    store = ResultsStore(out, COMM)
    with pytest.raises(UserError) as info:
        store.open_run("x = 1", "sha", {"command_line": "t"})
    assert str(info.value) == (f"results file {out} is being written by another run (host node-b, pid 1, "
                               f"since then); wait for it to finish, or delete {lock} if that run is gone")
    assert not store.lock.held and store.invocation is None
    kept = COMM.bcast(lock.read_text() if COMM.Get_rank() == 0 else None, root=0)
    assert kept == "host=node-b\npid=1\njob=none\nstarted=then\n" and not out.exists()


def test_damage_met_by_a_read_is_named_on_every_rank(shared_dir):
    out = shared_dir / "d.h5"
    store = ResultsStore(out, COMM)
    store.open_run("x = 1", "sha", {"command_line": "t"})
    store.commit("a", lambda g: write_dataset(g, "d", np.arange(4096.0), "1", "numbers", chunks=(4096,)))
    store.close_run("completed")

    def damage() -> None:
        with h5py.File(out, "r") as fh:
            offset = int(fh["a/d"].id.get_chunk_info(0).byte_offset)
        raw = bytearray(out.read_bytes())
        raw[offset + 100:offset + 108] = b"\xff" * 8
        out.write_bytes(bytes(raw))

    on_rank_0(damage)
    with pytest.raises(InputFileError) as info:
        ResultsStore(out, COMM).read(lambda fh: fh["a/d"][()])
    message = str(info.value)
    assert message.startswith(f"results file {out} is damaged: dataset /a/d: unreadable (OSError: ")
    assert message.endswith("; restore it or use --overwrite")
    assert COMM.allgather(message) == [message] * COMM.Get_size()
