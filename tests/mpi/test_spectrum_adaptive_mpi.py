"""Adaptive stopping in the spectrum stage under P ranks (one group, and probe groups) takes
the same rounds and gives the same numbers as one rank.

The tolerances are 0, so the rounds are set by the budgets alone (no decision sits on a
borderline): steps double 4 -> 8 for E(100) in the paper convention, whose quadrature
bracket is orders of magnitude wider than its sampling interval, then probes grow 3 -> 4
for the trace, whose quadrature is exact.  Probes run in lockstep (the default) and the
step growth extends each probe's recurrence on the group that holds it.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcqml.runner import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_hessian_stage import config, make_workdir

torch.set_num_threads(1)
COMM = MPI.COMM_WORLD
SETTINGS = dict(probes=3, max_probes=4, max_lanczos_steps=8, resolve=["error_proxy", "trace"], proxy_t=[100],
                convention="paper", resolution_rel=0.0)


@pytest.mark.timeout(600)
def test_adaptive_stage_same_on_any_ranks_and_groups():
    tmp = Path(COMM.bcast(tempfile.mkdtemp(prefix="hpcqml-adapt-") if COMM.Get_rank() == 0 else None))
    rank = COMM.Get_rank()
    groups = min(2, COMM.Get_size())
    # the one-rank reference on every rank at once (a run on COMM_SELF while the other
    # ranks wait in a collective is not what the runner supports), then all ranks together
    make_workdir(tmp, steps=(0,), name=f"serial{rank}")
    if rank == 0:
        make_workdir(tmp, steps=(0,), name="par")
    COMM.Barrier()
    serial = run_pipeline(config(tmp, name=f"serial{rank}", **SETTINGS), MPI.COMM_SELF, quiet=True)
    par = run_pipeline(config(tmp, name="par", groups=groups, **SETTINGS), COMM, quiet=True)
    try:
        if rank == 0:
            compare(serial, par, groups)
    finally:  # every rank waits for rank 0's checks, pass or fail
        COMM.Barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(serial: Path, par: Path, groups: int) -> None:
    """The P-rank file against the one-rank file: same rounds, same numbers."""
    with h5py.File(serial, "r") as a, h5py.File(par, "r") as b:
        ga, gb = a["spectrum/step_000000/result"], b["spectrum/step_000000/result"]
        for key in ("stop_reason", "probes", "lanczos_steps"):
            assert gb.attrs[key] == ga.attrs[key], key
        assert (ga.attrs["probes"], ga.attrs["lanczos_steps"]) == (4, 8)
        assert ga.attrs["stop_reason"] == "step and probe budgets"
        np.testing.assert_array_equal(gb["adaptive_rounds"][()], ga["adaptive_rounds"][()])
        # float32 products summed in another order over the ranks: Ritz values agree to
        # ~1e-6 relative of ||H|| (the serial-vs-sharded SLQ test's tolerance)
        np.testing.assert_allclose(gb["nodes"][()], ga["nodes"][()], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gb["estimates/trace"][0], ga["estimates/trace"][0], rtol=1e-4)
        assert gb.attrs["groups"] == groups and gb.attrs["ranks"] == COMM.Get_size()
        steps = [b[f"spectrum/step_000000/probe_{p:03d}"].attrs["steps_requested"] for p in range(4)]
        assert steps == [8, 8, 8, 8]
        # probes in lockstep (the default) and extended 4 -> 8, never rerun: 4 probes x 8 steps
        # in all, each group running its half (a rerun would cost 3 x 4 more)
        assert a["perf/spectrum/counters/hvp_products"][()].tolist() == [32.0]
        assert set(b["perf/spectrum/counters/hvp_products"][()].tolist()) == {32.0 / groups}
