"""State-vector HHL (hpcqml.hhl.statevector) against dense numpy solutions."""
import numpy as np
import pytest

from hpcqml.errors import UserError
from hpcqml.hhl.statevector import (
    clock_eigenvalues,
    clock_t0,
    default_C,
    default_t0,
    embed,
    estimate_solution_norm,
    exact_t0,
    memory_estimate_bytes,
    simulate_hhl,
)


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


def test_explicit_C_and_t0_are_used():  # noqa: N802 - paper notation
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


# ---------------------------------------------------------------------------------------
# clock mapping, t0 and C, ||x|| from the success probability
def _rotated_2x2(lam: tuple[float, float]) -> np.ndarray:
    th = 0.3
    Q = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return Q @ np.diag(lam) @ Q.T


def test_exact_clock_mapping_makes_a_representable_2x2_system_exact():
    """Eigenvalues {1, 1/2} of a symmetric 2x2: on 3 clock qubits the default t0 (clock values
    y/3) misses 1/2; t0 = 2 pi * 2 / 8 puts 1 and 1/2 on y = 2 and y = 1."""
    M, B = _rotated_2x2((2.0, 1.0)), np.array([1.0, 2.0])
    x = np.linalg.solve(M, B)
    system = embed(M, B)
    ref = system.embed_solution(x)
    default = simulate_hhl(system, 3)
    assert 1.0 - default.fidelity_with(ref) == pytest.approx(0.002374, abs=1e-6)
    t0, exact = clock_t0(system, 3, "exact")
    assert exact and t0 == pytest.approx(2 * np.pi * 2 / 8)
    res = simulate_hhl(system, 3, t0=t0)
    assert 1.0 - res.fidelity_with(ref) < 1e-12
    assert res.leakage < 1e-12 and res.C == pytest.approx(0.5)
    assert estimate_solution_norm(system, res) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert clock_t0(system, 3, "default") == (default_t0(3), False)


def test_exact_t0_takes_the_least_m_and_reports_none_when_impossible():
    assert exact_t0(np.array([1.0, -1.0, 0.5, 0.25]), 4) == pytest.approx(2 * np.pi * 4 / 16)
    assert exact_t0(np.array([1.0, 1 / 3]), 4) == pytest.approx(2 * np.pi * 3 / 16)
    assert exact_t0(np.array([1.0, 1 / 8]), 4) is None  # needs m = 8 = N_c/2: aliases
    assert exact_t0(np.array([1.0, 1 / np.sqrt(2)]), 6) is None
    system = embed(_rotated_2x2((1.0, 1 / np.sqrt(2))), np.ones(2))
    assert clock_t0(system, 6, "exact") == (default_t0(6), False)  # falls back to the default mapping


def test_solution_norm_estimate_converges_to_numpy_norm():
    M, B = _spd(6, 0.3, 1.0, seed=5)
    B = 3.0 * B
    M = 2.5 * M  # ||M|| = 2.5: the estimate must undo the scaling
    system = embed(M, B)
    norm = np.linalg.norm(np.linalg.solve(M, B))
    err = {c: abs(estimate_solution_norm(system, simulate_hhl(system, c)) / norm - 1.0) for c in (4, 8, 12)}
    assert err[12] < 1e-3 and err[12] < err[4]
    # truncated runs and saturated rotations give no estimate
    assert np.isnan(estimate_solution_norm(system, simulate_hhl(system, 6, kappa_a=4.0)))
    assert np.isnan(estimate_solution_norm(system, simulate_hhl(system, 6, C=0.5)))


def test_t0_at_or_above_pi_is_refused():
    system = embed(np.eye(2), np.ones(2))
    with pytest.raises(UserError, match="t0 must lie in"):
        simulate_hhl(system, 4, t0=np.pi)


# ---------------------------------------------------------------------------------------
# leakage and the clock-traced fidelity against the clock size, from independent computations
def _fejer(phi: np.ndarray, c: int) -> np.ndarray:
    """|alpha_{y|j}|^2 = sin^2(pi N d) / (N^2 sin^2(pi d)), d = phi_j - y/N (closed form of QPE)."""
    N = 2**c
    d = phi[:, None] - np.arange(N)[None, :] / N
    s = np.sin(np.pi * d)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.sin(np.pi * N * d) ** 2 / (N**2 * s**2)
    return np.where(np.abs(s) < 1e-14, 1.0, w)


def _closed_form(lam, beta, c, kappa_a=None):
    """(p_ancilla, p_success) from the QPE distribution: clock 0 after uncomputation keeps
    sum_y |alpha_{y|j}|^2 a_y per eigenvector (a_y the rotation amplitude of each branch)."""
    N, t0 = 2**c, default_t0(c)
    C = default_C(c, t0, kappa_a)
    y = np.arange(N)
    lt = 2 * np.pi * np.where(y >= N // 2, y - N, y) / (t0 * N)
    with np.errstate(divide="ignore"):
        inv = np.where(lt != 0, C / lt, 0.0)
    amps = [inv] if kappa_a is None else [np.where(np.abs(lt) < 1 / kappa_a, 0.0, inv),
                                          np.where(np.abs(lt) < 1 / kappa_a, C, 0.0)]
    W, b2 = _fejer(lam * t0 / (2 * np.pi), c), beta**2
    return sum(np.sum(b2 * (W @ a**2)) for a in amps), sum(np.sum(b2 * (W @ a) ** 2) for a in amps)


def _generic_system():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    M, B = Q @ np.diag([0.31, 0.47, 0.73, 1.0]) @ Q.T, rng.standard_normal(4)
    system = embed(M, B)
    return system, system.eigenvectors.T @ (system.b / np.linalg.norm(system.b))


def test_leakage_matches_closed_form_and_does_not_vanish_with_the_clock():
    system, beta = _generic_system()
    plain, trunc = {}, {}
    for c in range(3, 13):
        r = simulate_hhl(system, c)
        pa, ps = _closed_form(system.eigenvalues, beta, c)
        assert r.p_ancilla == pytest.approx(pa, rel=1e-10) and r.p_success == pytest.approx(ps, rel=1e-10)
        plain[c] = r.leakage
        rt = simulate_hhl(system, c, kappa_a=4.0)
        pa, ps = _closed_form(system.eigenvalues, beta, c, kappa_a=4.0)
        assert rt.leakage == pytest.approx(1 - ps / pa, rel=1e-8, abs=1e-14)
        trunc[c] = rt.leakage
    # plain HHL: the QPE tails at small clock values are amplified by C/lambda~ ~ 1/y, so the
    # leakage stays O(0.1) and moves with the fractional phases (numbers of this system)
    assert plain[6] == pytest.approx(0.252535, abs=1e-6) and plain[9] == pytest.approx(0.016402, abs=1e-6)
    assert plain[12] == pytest.approx(0.252130, abs=1e-6) and min(plain[10], plain[12]) > 0.2
    # truncated HHL (filtered inversion) leaks less and less
    assert trunc[12] < 2e-3 and trunc[11] < trunc[5] / 100


def test_leakage_approaches_its_large_clock_formula():
    """leakage -> sum_j w_j s_j g_j / 3 / sum_j w_j (1 + s_j g_j / 3), w_j = |beta_j/lambda_j|^2,
    s_j = sin^2(pi N_c phi_j), g_j = (pi phi_j / sin(pi phi_j))^2 (docs/science.md)."""
    system, beta = _generic_system()
    lam = system.eigenvalues
    for c in (12, 13, 14):
        phi = lam * default_t0(c) / (2 * np.pi)
        s = np.sin(np.pi * 2**c * phi) ** 2
        g = (np.pi * phi / np.sin(np.pi * phi)) ** 2
        w = beta**2 / lam**2
        limit = np.sum(w * s * g / 3) / np.sum(w * (1 + s * g / 3))
        assert simulate_hhl(system, c).leakage == pytest.approx(limit, rel=1e-3)


def _explicit_circuit(H: np.ndarray, b: np.ndarray, c: int, ref: np.ndarray):
    """The HHL circuit with dense gate matrices (clock (x) system, ancilla kept as two branches):
    Hadamards, controlled powers of expm(i H t0), inverse QFT, rotation, and the inverse of the
    first three. Returns (p_ancilla, p_success, fidelity, clock-traced fidelity)."""
    from scipy.linalg import expm

    N, D, t0 = 2**c, H.shape[0], default_t0(c)
    C = default_C(c, t0)
    had = np.ones((1, 1))
    for _ in range(c):
        had = np.kron(had, np.array([[1, 1], [1, -1]]) / np.sqrt(2))
    U = expm(1j * t0 * H)
    ctrl = np.zeros((N * D, N * D), dtype=complex)
    for k in range(N):
        ctrl[k * D:(k + 1) * D, k * D:(k + 1) * D] = np.linalg.matrix_power(U, k)
    k = np.arange(N)
    iqft = np.exp(-2j * np.pi * np.outer(k, k) / N) / np.sqrt(N)
    W = np.kron(iqft, np.eye(D)) @ ctrl @ np.kron(had, np.eye(D))
    psi = W @ np.kron(np.eye(N)[0], b / np.linalg.norm(b))
    lt = clock_eigenvalues(c, t0)
    with np.errstate(divide="ignore"):
        a = np.where(lt != 0, C / lt, 0.0)
    branch = W.conj().T @ (np.repeat(a, D) * psi)  # ancilla |1>, uncomputed
    blocks = branch.reshape(N, D)
    p_anc = float(np.sum(np.abs(blocks) ** 2))
    out = blocks[0]
    p_succ = float(np.sum(np.abs(out) ** 2))
    r = ref / np.linalg.norm(ref)
    rho = blocks.T @ blocks.conj()  # trace over the clock
    return p_anc, p_succ, abs(np.vdot(r, out)) ** 2 / p_succ, float(np.real(r.conj() @ rho @ r)) / p_anc


def test_simulation_equals_an_explicit_gate_by_gate_circuit():
    rng = np.random.default_rng(7)
    M, B = np.eye(2) + 0.4 * rng.standard_normal((2, 2)), rng.standard_normal(2)
    system = embed(M, B)
    ref = system.embed_solution(np.linalg.solve(M, B))
    for c in (3, 4, 5):
        r = simulate_hhl(system, c)
        pa, ps, fid, dfid = _explicit_circuit(system.H, system.b, c, ref)
        assert r.p_ancilla == pytest.approx(pa, rel=1e-10)
        assert r.p_success == pytest.approx(ps, rel=1e-10)
        assert r.fidelity_with(ref) == pytest.approx(fid, abs=1e-12)
        assert r.density_fidelity_with(ref) == pytest.approx(dfid, abs=1e-12)
