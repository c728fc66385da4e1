"""State-vector HHL (hpcqml.hhl.statevector) against dense numpy solutions."""
import numpy as np
import pytest

from hpcqml.errors import UserError
from hpcqml.hhl.statevector import clock_eigenvalues, default_t0, embed, memory_estimate_bytes, simulate_hhl


def _spd(n: int, lo: float, hi: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return Q @ np.diag(np.linspace(lo, hi, n)) @ Q.T, rng.standard_normal(n)


def test_spd_system_reproduces_numpy_solution():
    M, B = _spd(6, 0.3, 1.0, seed=0)
    x = np.linalg.solve(M, B)
    system = embed(M, B)
    assert not system.dilated and system.dim == 8
    res = simulate_hhl(system, clock_qubits=8)
    assert res.fidelity_with(system.embed_solution(x)) > 0.99
    assert res.qubits == {"system": 3, "clock": 8, "ancilla": 1, "flag": 0, "total": 12}
    assert 0.0 < res.p_success <= res.p_ancilla <= 1.0


def test_fidelity_approaches_one_as_clock_grows():
    M, B = _spd(6, 0.3, 1.0, seed=0)
    system = embed(M, B)
    ref = system.embed_solution(np.linalg.solve(M, B))
    infid = {c: 1.0 - simulate_hhl(system, c).fidelity_with(ref) for c in (3, 5, 7, 9, 11)}
    # Phase estimation error: not monotone step by step, but decreasing by orders of magnitude.
    assert infid[3] > 1e-3  # three clock qubits are visibly inexact (no shortcut to M^-1 B)
    assert infid[11] < 1e-6
    assert infid[11] < infid[7] < infid[3]
    assert max(infid[9], infid[11]) < 1e-2 * infid[3]


def test_grid_eigenvalues_are_inverted_exactly():
    """Eigenvalues on the clock grid: QPE is exact, so HHL returns sum_j beta_j/lambda_j |u_j> exactly."""
    c = 5
    t0 = default_t0(c)
    grid = clock_eigenvalues(c, t0)
    lam = grid[[1, 3, 7, 15, -1, -4, -9, -15]]  # includes lambda = +-1 = max |lambda|
    assert np.isclose(np.abs(lam).max(), 1.0)
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    M = Q @ np.diag(lam) @ Q.T
    B = rng.standard_normal(8)
    system = embed(M, B)
    res = simulate_hhl(system, c)
    x = np.linalg.solve(M, B)
    assert res.fidelity_with(system.embed_solution(x)) == pytest.approx(1.0, abs=1e-12)
    assert res.leakage == pytest.approx(0.0, abs=1e-12)
    # p_success = C^2 sum |beta_j / lambda_j|^2 with C the smallest grid value 2 pi / (t0 2^c)
    beta = Q.T @ (B / np.linalg.norm(B))
    C = 2 * np.pi / (t0 * 2**c)
    assert res.C == pytest.approx(C)
    assert res.p_success == pytest.approx(C**2 * np.sum((beta / lam) ** 2), rel=1e-10)
    assert res.density_fidelity_with(system.embed_solution(x)) == pytest.approx(1.0, abs=1e-12)


def test_nonsymmetric_system_uses_dilation_and_padding():
    rng = np.random.default_rng(2)
    M = np.eye(5) + 0.3 * rng.standard_normal((5, 5))
    B = rng.standard_normal(5)
    system = embed(M, B)
    assert system.dilated and system.dim == 16 and system.system_qubits == 4
    assert np.allclose(system.H, system.H.T)
    sv = np.linalg.svd(M, compute_uv=False)
    assert system.scale == pytest.approx(sv[0])
    assert np.allclose(np.sort(np.abs(system.spectrum)), np.sort(np.concatenate([sv, sv])) / sv[0])
    x = np.linalg.solve(M, B)
    res = simulate_hhl(system, 10)
    assert res.fidelity_with(system.embed_solution(x)) > 0.999
    # the extracted solution block agrees with numpy's x up to a global phase
    part = system.solution_part(res.state)
    overlap = abs(np.vdot(x / np.linalg.norm(x), part))
    assert overlap > 0.999


def test_finite_clock_leaves_leakage_and_mixed_fidelity_below_pure():
    M, B = _spd(6, 0.3, 1.0, seed=3)
    system = embed(M, B)
    ref = system.embed_solution(np.linalg.solve(M, B))
    res = simulate_hhl(system, 4)
    assert res.leakage > 1e-3
    assert res.density_fidelity_with(ref) <= 1.0
    assert res.p_success < res.p_ancilla


def test_explicit_C_and_t0_are_used():
    M, B = _spd(4, 0.5, 1.0, seed=4)
    system = embed(M, B)
    res = simulate_hhl(system, 6, C=0.05, t0=2.0)
    assert res.C == 0.05 and res.t0 == 2.0


def test_bad_inputs_raise_user_error():
    with pytest.raises(UserError, match="square"):
        embed(np.ones((2, 3)), np.ones(2))
    with pytest.raises(UserError, match="length"):
        embed(np.eye(3), np.ones(2))
    with pytest.raises(UserError, match="NaN"):
        embed(np.array([[1.0, np.nan], [0.0, 1.0]]), np.ones(2))
    with pytest.raises(UserError, match="zero"):
        embed(np.eye(2), np.zeros(2))
    system = embed(np.eye(2), np.ones(2))
    with pytest.raises(UserError, match="clock_qubits"):
        simulate_hhl(system, 1)
    with pytest.raises(UserError, match="C must"):
        simulate_hhl(system, 4, C=2.0)
    with pytest.raises(UserError, match="kappa_a"):
        simulate_hhl(system, 4, kappa_a=-1.0)


def test_memory_model_grows_with_dimension_and_clock():
    a = memory_estimate_bytes(64, 6)
    assert memory_estimate_bytes(128, 6) > a and memory_estimate_bytes(64, 7) > a
    assert memory_estimate_bytes(64, 6, truncated=True) > a
    # dense part: five D x D float64 matrices
    assert memory_estimate_bytes(1024, 2) >= 5 * 8 * 1024**2
