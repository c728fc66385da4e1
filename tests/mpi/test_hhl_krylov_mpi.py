"""Matrix-function HHL on several ranks gives the dense single-process numbers.

Run under ``mpirun -n 1``, ``-n 2`` and ``-n 3``: every rank also runs the dense state-vector
simulation (hpcqml.hhl.statevector, serial) as the independent reference; tolerance 1e-10
as in tests/test_hhl_krylov.py (series bound 1e-13, recurrence rounding K * 1e-16).
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from hpcqml.hhl.krylov import EmbeddedOperator, simulate_hhl_krylov
from hpcqml.hhl.statevector import clock_t0, embed, simulate_hhl

COMM = MPI.COMM_WORLD
TOL = 1e-10


def _carleman_system(T: int) -> tuple[np.ndarray, np.ndarray]:
    from hpcqml.carleman.cases import random_instance
    from hpcqml.carleman.reference import block_system, carleman_matrix

    ode = random_instance("random", 2, 0.7, 3, eta=0.25, u_scale=0.1)
    M, B = block_system(carleman_matrix(ode, 2), ode, 2, T)
    return M.toarray(), np.asarray(B, dtype=np.float64)


def _symmetric_on_grid() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    lam = np.array([-3, -2, -1, 1, 2, 3, 3], dtype=np.float64) / 3.0
    return Q @ np.diag(lam) @ Q.T, rng.standard_normal(7)


@pytest.mark.parametrize("system_of", [lambda: _carleman_system(3), lambda: _carleman_system(9),
                                       _symmetric_on_grid], ids=["carleman-T3", "carleman-T9", "symmetric"])
@pytest.mark.parametrize("c", [4, 6])
@pytest.mark.parametrize("mapping", ["default", "exact"])
def test_distributed_matches_dense(system_of, c, mapping):
    M, B = system_of()
    system = embed(M, B)
    x = np.linalg.solve(M, B)
    z = system.embed_solution(x)
    t0, _ = clock_t0(system, c, mapping)
    kappas = [None, 4.0]
    with EmbeddedOperator(M, B, COMM) as op:
        runs = simulate_hhl_krylov(op, c, kappas, x_ref=x, t0=t0)
        states = [np.concatenate([op.gather(br) for br in r.state_local]) for r in runs]
    for r, state, ka in zip(runs, states, kappas, strict=True):
        dense = simulate_hhl(system, c, t0=t0, kappa_a=ka)
        expected = dense.state if ka is None else np.concatenate([dense.state_well, dense.state_ill])
        assert np.max(np.abs(state - expected)) < TOL
        assert abs(r.p_success - dense.p_success) < TOL
        assert abs(r.p_ancilla - dense.p_ancilla) < TOL
        assert abs(r.fidelity - dense.fidelity_with(z)) < TOL
        assert abs(r.density_fidelity - dense.density_fidelity_with(z)) < TOL
    # every rank holds the same scalars
    assert COMM.allgather(runs[0].p_success) == [runs[0].p_success] * COMM.Get_size()
