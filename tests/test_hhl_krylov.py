"""Matrix-function HHL (hpcqml.hhl.krylov) against the dense state-vector simulation.

The dense simulator (hpcqml.hhl.statevector) builds the full clock-system state from an
exact eigen-decomposition; it is the independent ground truth here. Tolerance 1e-10: the
Chebyshev series are truncated with a sup-norm bound of 1e-13 (DEFAULT_TOL), the three-term
recurrence adds about K * 1e-16 <= 1e-12 for the degrees used (K <= 600), and the two
values of ||H||_2 (dense eigvalsh there, SLEPc LAPACK here) agree to ~1e-15 relative, which
moves g(lambda) by at most |g'| * 1e-15 <= N_c t0 * 1e-15 < 1e-12.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from mpi4py import MPI

from hpcqml.errors import UserError
from hpcqml.hhl.krylov import (
    EmbeddedOperator,
    bessel_tail_bound,
    chebyshev_degree,
    clock_expansion,
    memory_estimate_bytes,
    simulate_hhl_krylov,
)
from hpcqml.hhl.statevector import clock_t0, default_C, embed, estimate_solution_norm, simulate_hhl

COMM = MPI.COMM_SELF
TOL = 1e-10


def _carleman_system(T: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A small Carleman block system (eq. II.79) of a random dissipative instance (not symmetric)."""
    from hpcqml.carleman.cases import random_instance
    from hpcqml.carleman.reference import block_system, carleman_matrix

    ode = random_instance("random", 2, 0.7, 3, eta=0.25, u_scale=0.1)
    A = carleman_matrix(ode, 2)
    M, B = block_system(A, ode, 2, T)
    return M.toarray(), np.asarray(B, dtype=np.float64)


def _symmetric_on_grid(n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric M with eigenvalues in (1/3) Z, so the exact clock mapping exists (m = 3)."""
    rng = np.random.default_rng(5)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.array([-3, -2, -1, 1, 2, 3, 3][:n], dtype=np.float64) / 3.0
    return Q @ np.diag(lam) @ Q.T, rng.standard_normal(n)


SYSTEMS = {"carleman": _carleman_system, "symmetric": _symmetric_on_grid}


def _compare(M: np.ndarray, B: np.ndarray, c: int, mapping: str, kappa: float | None, comm=COMM) -> None:
    system = embed(M, B)
    x = np.linalg.solve(M, B)
    z = system.embed_solution(x)
    t0, _ = clock_t0(system, c, mapping)
    dense = simulate_hhl(system, c, t0=t0, kappa_a=kappa)
    with EmbeddedOperator(M, B, comm) as op:
        assert op.dim == system.dim and op.dilated == system.dilated
        assert op.scale == pytest.approx(system.scale, rel=1e-14)
        res = simulate_hhl_krylov(op, c, [kappa], x_ref=x, t0=t0)[0]
        state = np.concatenate([op.gather(branch) for branch in res.state_local])
    expected = dense.state if kappa is None else np.concatenate([dense.state_well, dense.state_ill])
    assert np.max(np.abs(state - expected)) < TOL
    assert abs(res.p_success - dense.p_success) < TOL
    assert abs(res.p_ancilla - dense.p_ancilla) < TOL
    assert abs(res.leakage - dense.leakage) < TOL
    assert abs(res.fidelity - dense.fidelity_with(z)) < TOL
    assert abs(res.density_fidelity - dense.density_fidelity_with(z)) < TOL
    assert res.C == dense.C and res.t0 == dense.t0 and res.qubits == dense.qubits
    if kappa is None:
        assert res.x_norm_estimate == pytest.approx(estimate_solution_norm(system, dense), rel=TOL)
    else:
        assert np.isnan(res.x_norm_estimate)


@pytest.mark.parametrize("name", sorted(SYSTEMS))
@pytest.mark.parametrize("c", [3, 5, 7])
@pytest.mark.parametrize("mapping", ["default", "exact"])
@pytest.mark.parametrize("kappa", [None, 3.0])
def test_matches_dense_state_vector_simulation(name, c, mapping, kappa):
    M, B = SYSTEMS[name]()
    _compare(M, B, c, mapping, kappa)


def test_exact_mapping_really_puts_eigenvalues_on_the_clock():
    """The symmetric case exercises the exact mapping (t0 = 2 pi 3 / N_c), not its fallback."""
    M, B = _symmetric_on_grid()
    t0, exact = clock_t0(embed(M, B), 5, "exact")
    assert exact and t0 == pytest.approx(2 * np.pi * 3 / 32)


def test_one_recurrence_serves_several_kappas():
    M, B = _carleman_system()
    system = embed(M, B)
    x = np.linalg.solve(M, B)
    with EmbeddedOperator(M, B, COMM) as op:
        runs = simulate_hhl_krylov(op, 5, [None, 2.0, 8.0], x_ref=x)
    for r, ka in zip(runs, [None, 2.0, 8.0], strict=True):
        dense = simulate_hhl(system, 5, kappa_a=ka)
        assert abs(r.p_success - dense.p_success) < TOL
        assert abs(r.fidelity - dense.fidelity_with(system.embed_solution(x))) < TOL
    assert runs[0].matvecs == runs[1].matvecs == runs[0].degree


def test_larger_carleman_system_at_dim_256():
    """T = 20: n = 126 unknowns, dilated and padded to D = 256; c = 6."""
    M, B = _carleman_system(T=20)
    _compare(M, B, 6, "default", None)
    _compare(M, B, 6, "default", 2.0 * 21)


def test_chebyshev_series_meets_its_bound_against_direct_evaluation():
    """Ground truth: g and h evaluated directly (dense clock register, one eigenvalue) at 400 points."""
    c, t0 = 5, 2.3
    variants = [(default_C(c, t0), None), (default_C(c, t0, 4.0), 4.0)]
    exp = clock_expansion(c, t0, variants, tol=1e-12, traced=False)
    x = np.linspace(-1.0, 1.0, 400)
    series = np.polynomial.chebyshev.chebval(x, exp.h[1])
    direct = np.empty_like(x)
    for i, lam in enumerate(x):  # the dense simulator on the 2 x 2 system diag(lam, 1) with b = e_0
        system = embed(np.diag([lam if lam != 0 else 1e-300, 1.0]), np.array([1.0, 0.0]))
        system.scale, system.H = 1.0, np.diag([lam, 1.0])
        system.eigenvalues, system.eigenvectors = np.array([lam, 1.0]), np.eye(2)
        direct[i] = simulate_hhl(system, c, C=variants[1][0], t0=t0, kappa_a=4.0).p_ancilla
    assert exp.bound <= 1e-12
    assert np.max(np.abs(series - direct)) <= exp.bound + 1e-14  # + rounding of chebval


def test_bessel_tail_bound_dominates_the_true_tail():
    for w in (10.0, 100.0, 400.0):
        for K in (int(0.8 * w), int(1.4 * w), int(2 * w)):
            true_tail = float(np.sum(np.abs(scipy.special.jv(np.arange(K + 1, K + 400), w))))
            assert bessel_tail_bound(w, K) >= true_tail
    K, bound = chebyshev_degree(6, 3.0)
    assert bound <= 1e-13 and K >= 63 * 3.0  # at least the highest frequency


def test_bad_parameters_give_one_line_errors():
    M, B = _carleman_system()
    with EmbeddedOperator(M, B, COMM) as op:
        with pytest.raises(UserError, match="clock_qubits"):
            simulate_hhl_krylov(op, 1, [None])
        with pytest.raises(UserError, match="t0"):
            simulate_hhl_krylov(op, 4, [None], t0=4.0)
        with pytest.raises(UserError, match="kappa_a"):
            simulate_hhl_krylov(op, 4, [-1.0])
    with pytest.raises(UserError, match="zero"):
        EmbeddedOperator(M, np.zeros(B.size), COMM)


def test_petsc_objects_are_destroyed_on_exit():
    M, B = _carleman_system()
    op = EmbeddedOperator(M, B, COMM)
    with op:
        mat = op.mat
        assert mat.getSize() == (2 * M.shape[0], 2 * M.shape[0])
    assert op.mat is None and op.b is None and mat.handle == 0


def test_memory_model_grows_with_size_and_clock():
    a = memory_estimate_bytes(10**5, 10**6, 6)
    assert memory_estimate_bytes(10**6, 10**7, 6) > a and memory_estimate_bytes(10**5, 10**6, 8) > a
    assert memory_estimate_bytes(10**6, 10**7, 6, ranks=2) < memory_estimate_bytes(10**6, 10**7, 6)
