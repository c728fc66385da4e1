"""Reliability on several ranks: a refusal on one rank is a refusal on all, a failed rerun
keeps the old results, a choice is made once by rank 0, and damage is named on every rank.

Run with ``mpirun -n 2`` and ``-n 3`` (tests/mpi_pytest.sh); the results equal one rank's.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpcqml import config as config_module
from hpcqml.config import Field, load_config
from hpcqml.errors import InputFileError, UserError
from hpcqml.runner import run_pipeline
from hpcqml.stages import REGISTRY, Stage, StageContext, register, schemas
from hpcqml.store import write_dataset

COMM = MPI.COMM_WORLD
FAIL_AT: dict[str, int] = {}


def _unit_stage(ctx: StageContext) -> None:
    for unit in range(ctx.cfg["units"]):
        key = f"{ctx.name}/unit_{unit:03d}"
        if ctx.store.is_complete(key):
            continue
        if FAIL_AT.get(ctx.name) == unit:
            raise RuntimeError("injected failure")  # on every rank together
        # every rank contributes: the value is a reduction, as a real stage's would be
        value = COMM.allreduce(ctx.cfg["scale"] * (unit + 1) / COMM.Get_size())
        ctx.store.commit(key, lambda g, v=value: write_dataset(g, "value", np.full(3, v), "1", "a reduced value"))


def _refuse_on_last_rank(ctx: StageContext) -> None:
    """A pre-run check that fails on the last rank only (a file one node cannot see)."""
    if ctx.cfg["needs"] and ctx.rank == ctx.size - 1:
        raise UserError(f"[{ctx.name}] {ctx.cfg['needs']}: not visible on rank {ctx.rank}")


@pytest.fixture
def stages(monkeypatch):
    schema = {"units": Field(int, 2, min=1, doc="units"), "scale": Field(float, 1.0, doc="scale"),
              "needs": Field(str, "", doc="a file")}
    for name in ("up", "down"):
        register(Stage(name, schema, _unit_stage, doc=name, checks=(_refuse_on_last_rank,)))
    monkeypatch.setitem(config_module.UPSTREAM, "down", ("up",))
    FAIL_AT.clear()
    yield
    for name in ("up", "down"):
        REGISTRY.pop(name, None)
    FAIL_AT.clear()


@pytest.fixture
def shared_dir():
    path = tempfile.mkdtemp(prefix="hpcqml-rel-") if COMM.Get_rank() == 0 else None
    return Path(COMM.bcast(path, root=0))


def _cfg(out: Path, **sections: str):
    text = f'[run]\noutput = "{out}"\nstages = ["up", "down"]\n'
    for name, body in sections.items():
        text += f"[{name}]\n{body}\n"
    return load_config("t.toml", schemas(), text=text)


def _values(out: Path) -> dict[str, np.ndarray]:
    data = None
    if COMM.Get_rank() == 0:
        data = {}
        with h5py.File(out, "r") as fh:
            for top in ("up", "down"):
                fh[top].visititems(lambda n, o, t=top: data.__setitem__(f"{t}/{n}", o[()])
                                   if isinstance(o, h5py.Dataset) else None)
    return COMM.bcast(data, root=0)


def test_a_refusal_on_one_rank_refuses_on_all_and_touches_nothing(stages, shared_dir):
    out = shared_dir / "a.h5"
    run_pipeline(_cfg(out), COMM, quiet=True)
    before = _values(out)
    with pytest.raises(UserError, match=f"not visible on rank {COMM.Get_size() - 1}"):
        run_pipeline(_cfg(out, up='scale = 2.0\nneeds = "x"'), COMM, quiet=True)
    after = _values(out)
    assert sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_a_failed_rerun_keeps_the_old_results_and_they_come_back(stages, shared_dir):
    out = shared_dir / "b.h5"
    run_pipeline(_cfg(out), COMM, quiet=True)
    before = _values(out)
    FAIL_AT["up"] = 1
    with pytest.raises(RuntimeError):
        run_pipeline(_cfg(out, up="scale = 3.0"), COMM, quiet=True)
    FAIL_AT.clear()
    run_pipeline(_cfg(out), COMM, quiet=True)
    after = _values(out)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    # the values are those of one rank: scale * (unit + 1), summed over the ranks' shares
    np.testing.assert_allclose(after["up/unit_001/value"], [2.0, 2.0, 2.0], rtol=1e-15)


def test_a_choice_is_rank_0s_on_every_rank(shared_dir):
    from hpcqml.store import ResultsStore

    store = ResultsStore(shared_dir / "c.h5", COMM)
    store.open_run("x = 1", "sha", {"command_line": "choice"})
    try:
        first = store.decide_once("s/decisions", lambda: {"route": f"rank{COMM.Get_rank()}"})
        again = store.decide_once("s/decisions", lambda: {"route": "never"})
    finally:
        store.close_run("completed")
    assert first == {"route": "rank0"} and again["route"] == "rank0"


def test_damage_is_named_on_every_rank(stages, shared_dir):
    out = shared_dir / "d.h5"
    run_pipeline(_cfg(out), COMM, quiet=True)
    if COMM.Get_rank() == 0:
        with h5py.File(out, "r") as fh:
            offset = int(fh["up/unit_000/value"].id.get_chunk_info(0).byte_offset)
        raw = bytearray(out.read_bytes())
        for i in range(offset + 2, offset + 6):
            raw[i] ^= 0xA5
        out.write_bytes(bytes(raw))
    COMM.Barrier()
    with pytest.raises(InputFileError, match="up/unit_000/value"):
        run_pipeline(_cfg(out), COMM, quiet=True)
