"""Probes in lockstep and extended recurrences under P ranks give the 1-rank sequential numbers.

Run under ``mpirun -n 1``, ``-n 2`` and ``-n 3``: every rank also computes the serial
reference (comm = None, whole batch, probes one at a time) and compares in float64 to 1e-9
relative (the products differ only in summation order over the ranks and columns).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcqml.hessian.lockstep import LanczosEngine
from hpcqml.hessian.slq import probe_groups, run_probes, slq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slq_mpi import serial_operator, sharded_operator

torch.set_num_threads(1)
COMM = MPI.COMM_WORLD


@pytest.mark.timeout(300)
def test_lockstep_slq_on_ranks_equals_serial_sequential():
    op, ref = sharded_operator(COMM), serial_operator()
    got = slq(op, probes=4, steps=10, seed=7, comm=COMM, lockstep=3)
    want = slq(ref, probes=4, steps=10, seed=7, lockstep=1)
    np.testing.assert_allclose(got.nodes, want.nodes, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-9, atol=1e-11)
    assert op.products == 4 * 10    # 4 + 4 + 2 ... columns: every probe-step is one column


@pytest.mark.timeout(300)
def test_extended_probe_groups_on_ranks_equal_a_fresh_serial_run():
    """Probe groups (2 where there are 2 ranks or more), blocks of 2: 5 probes run with 4
    steps, then extended to 9; each group extends the probes it holds (probe l on group
    l mod G), the extension costs 5 steps per probe, and the result equals a fresh serial
    9-step run."""
    layout = probe_groups(COMM, min(2, COMM.Get_size()))
    op = sharded_operator(layout.comm)
    engine = LanczosEngine(op.n, layout.comm, state_dtype=torch.float64)
    kw = dict(reorth="full", state_dtype=torch.float64, width=2, matmat=op.matmat, engine=engine)
    run_probes(op.matvec, op.n, layout, list(range(5)), 11, steps=4, **kw)
    before = op.products
    got = run_probes(op.matvec, op.n, layout, list(range(5)), 11, steps=9, **kw)
    mine = [p for p in range(5) if p % layout.count == layout.index]
    assert op.products - before == 5 * len(mine)
    ref = serial_operator()
    want = run_probes(ref.matvec, ref.n, probe_groups(None, 1), list(range(5)), 11, steps=9,
                      state_dtype=torch.float64)
    assert [r.probe for r in got] == list(range(5))
    for a, b in zip(got, want, strict=True):
        assert a.steps == b.steps == 9
        np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(a.nodes, b.nodes, rtol=1e-9, atol=1e-11)
