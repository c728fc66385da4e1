"""Truncated HHL (eq. II.86) against the closed form eq. II.87 and the Haar estimates eq. II.89-II.93."""
import numpy as np
import pytest

from hpcqml.errors import UserError
from hpcqml.hhl.statevector import clock_eigenvalues, default_t0, embed, simulate_hhl
from hpcqml.hhl.truncated import (
    closed_form_overlap,
    dissipative_split,
    eigen_coefficients,
    overlap_ii92,
    overlap_ii93,
    haar_average_overlap,
    ii92_against_ii87,
    measured_overlap,
)


def _system(lam, seed):
    rng = np.random.default_rng(seed)
    n = len(lam)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    M = Q @ np.diag(lam) @ Q.T
    B = rng.standard_normal(n)
    system = embed(M, B)
    return system, system.embed_solution(np.linalg.solve(M, B))


def exact_truncated_state(system, kappa_a: float) -> tuple[np.ndarray, np.ndarray]:
    """The two flag branches of eq. II.86 from the eigen-decomposition, jointly normalised.

    Returns ``(well, ill)`` float64 vectors of length D with ``||well||^2 + ||ill||^2 = 1``.
    """
    lam, beta = eigen_coefficients(system)
    well = np.abs(lam) >= 1.0 / kappa_a
    cw = np.where(well, beta / np.where(well, lam, 1.0), 0.0)
    ci = np.where(well, 0.0, beta)
    norm = np.sqrt(np.sum(cw**2) + np.sum(ci**2))
    V = system.eigenvectors
    return V @ cw / norm, V @ ci / norm


def test_grid_spectrum_matches_ii86_and_ii87_exactly():
    c = 6
    grid = clock_eigenvalues(c, default_t0(c))
    lam = grid[[2, 5, 9, 20, 31, -3, -12, -31]]  # |lambda| = 2/62 ... 1
    system, x = _system(lam, seed=0)
    kappa_a = 1.0 / 0.2  # threshold 0.2 lies between grid points: 2/62, 5/62, -3/62, 9/62 are 'ill'
    res = simulate_hhl(system, c, kappa_a=kappa_a)
    well, ill = exact_truncated_state(system, kappa_a)
    assert np.allclose(res.state_well, well, atol=1e-12) and np.allclose(res.state_ill, ill, atol=1e-12)
    lam_j, beta = eigen_coefficients(system)
    expected = closed_form_overlap(lam_j, beta, kappa_a)
    assert 0.05 < expected < 0.95  # a truncation that matters
    assert measured_overlap(res, x) == pytest.approx(expected, abs=1e-12)


def test_generic_spectrum_matches_ii87_within_phase_estimation_error():
    lam = np.array([0.05, -0.12, 0.15, 0.4, -0.55, 0.7, 0.85, 1.0])  # 0.1 away from the threshold 0.25
    system, x = _system(lam, seed=5)
    lam_j, beta = eigen_coefficients(system)
    expected = closed_form_overlap(lam_j, beta, 4.0)
    errors = {}
    for c in (5, 7, 9, 11):
        res = simulate_hhl(system, c, kappa_a=4.0)
        errors[c] = abs(measured_overlap(res, x) - expected)
        resolution = 2 * np.pi / (res.t0 * 2**c)  # one clock bin in eigenvalue units
        assert errors[c] <= resolution, (c, errors[c], resolution)
    assert errors[11] < 0.1 * errors[5]


def test_large_kappa_a_is_plain_hhl():
    lam = np.array([0.3, -0.45, 0.6, 0.8, -0.9, 1.0])
    system, x = _system(lam, seed=2)
    lam_j, beta = eigen_coefficients(system)
    assert closed_form_overlap(lam_j, beta, 100.0) == pytest.approx(1.0, abs=1e-14)
    # kappa_a beyond the clock resolution: only clock value 0 is 'ill' (plain HHL drops it), so the
    # |well> branch is plain HHL's output and the |ill> branch holds what plain HHL discards.
    plain = simulate_hhl(system, 8)
    trunc = simulate_hhl(system, 8, C=plain.C, kappa_a=1e6)
    p_ill = np.linalg.norm(trunc.state_ill) ** 2
    assert 0 < p_ill < 1e-4
    assert np.allclose(trunc.state_well / np.sqrt(1 - p_ill), plain.state, atol=1e-12)
    assert trunc.fidelity_with(x) == pytest.approx(plain.fidelity_with(x) * (1 - p_ill), abs=1e-12)
    assert trunc.p_success == pytest.approx(plain.p_success / (1 - p_ill), rel=1e-10)


def test_closed_form_ii87_by_hand():
    lam = np.array([0.1, 0.5, 1.0])
    beta = np.array([0.6, 0.0, 0.8])
    # kappa_a = 4: 0.1 is ill. S_well = 0.64, S_all = 36 + 0.64, P_ill = 0.36
    assert closed_form_overlap(lam, beta, 4.0) == pytest.approx(0.64 / (np.sqrt(36.64) * 1.0))
    with pytest.raises(UserError):
        closed_form_overlap(lam, beta, 0.0)
    with pytest.raises(UserError):
        closed_form_overlap(np.array([0.0, 1.0]), np.array([1.0, 0.0]), 2.0)


def test_haar_average_ii89_identity_and_estimate():
    rng = np.random.default_rng(7)
    D = 256
    lam = np.concatenate([rng.uniform(0.3, 1.0, 200), rng.uniform(0.01, 0.1, 56)]) * rng.choice([-1, 1], D)
    kappa_a = 5.0
    est = haar_average_overlap(lam, kappa_a)
    well = np.abs(lam) >= 1 / kappa_a
    s_well, fids = [], []
    for _ in range(2000):
        z = rng.standard_normal(D) + 1j * rng.standard_normal(D)  # Haar-random state
        beta = z / np.linalg.norm(z)
        s_well.append(np.sum(np.abs(beta[well] / lam[well]) ** 2))
        fids.append(closed_form_overlap(lam, beta, kappa_a))
    s_well = np.array(s_well)
    # eq. II.89: E[S_well] = Tr(Lbar^-2)/D; 99.9 % two-sided normal interval (z = 3.29)
    target = np.sum(1 / lam[well] ** 2) / D
    assert abs(s_well.mean() - target) < 3.29 * s_well.std(ddof=1) / np.sqrt(s_well.size)
    # annealed estimate vs the mean of eq. II.87 over Haar states: close at D = 256
    assert abs(np.mean(fids) - est) < 0.01


def test_ii92_by_hand_and_limit_ii93():
    # Delta_+ = 3, Delta = 4, a_+ = -0.5, T = 1: G = 1 + 0.5 = 1.5, 4.5 / sqrt(8 * 6.5)
    assert overlap_ii92(3, 4, -0.5, 1) == pytest.approx(4.5 / np.sqrt(8 * 6.5), rel=1e-14)
    for T in (1, 10, 100):
        assert overlap_ii92(30, 40, -1e-12, T) == pytest.approx(overlap_ii93(30, 40), rel=1e-8)
        assert overlap_ii92(30, 40, 0.0, T) == pytest.approx(0.75, rel=1e-14)
    assert overlap_ii92(0, 5, -0.5, 3) == 0.0
    with pytest.raises(UserError):
        overlap_ii93(5, 4)


def _carleman_case(f: float, seed: int, eta: float, T: int, N: int = 2):
    """(M, B, eigenvalues of A) of a random n = 3 quadratic instance (Sec. III C) at step size ``eta``."""
    from hpcqml.carleman import reference as ref
    from hpcqml.carleman.cases import random_instance

    ode = random_instance("random", 3, f, seed, eta=eta, u_scale=0.1, div_range=0.05)
    A = ref.carleman_matrix(ode, N)
    M, B = ref.block_system(A, ode, N, T)
    return M, B, np.linalg.eigvals(A.toarray())


def test_ii92_and_ii87_agree_in_their_common_limit():
    """Delta_- = 0 and a_+ -> 0 (step size 1e-7): nothing is truncated and eq. II.92 -> 1 = eq. II.87.

    |1 - II.92| = 1 - sqrt(G/(T+1)) ~ T |a_+| / 4 ~ 1e-7 here; II.87 is 1 up to rounding (1e-12).
    """
    T = 4
    r = ii92_against_ii87(*_carleman_case(1.0, 0, 1e-7, T), T)
    assert r["Delta_plus"] == r["Delta"] == 12 and r["ill_fraction"] == 0.0
    assert r["overlap_ii87"] == pytest.approx(1.0, abs=1e-12)
    assert r["overlap_haar"] == pytest.approx(1.0, abs=1e-12)
    assert r["overlap_ii92"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("T", [4, 20])
def test_ii92_against_ii87_on_the_same_carleman_M_records_the_gap(T):  # noqa: N802 - paper notation
    """Random n = 3, N = 2, f = 1, step 0.25, kappa_a = 2(T+1): kappa(M) <= kappa_a, so no eigenvalue is
    truncated and eq. II.87 and its Haar estimate are exactly 1, while eq. II.92 (Delta_- = 0) is
    sqrt(G/(T+1)) with G = sum_t (1 + a_+)^t, far below 1 (measured 0.71-0.87 at T = 4, 0.37-0.57 at T = 20).
    G is summed term by term here, independently of the closed form in :func:`overlap_ii92`."""
    for seed in range(5):
        M, B, a = _carleman_case(1.0, seed, 0.25, T)
        r = ii92_against_ii87(M, B, a, T)
        assert r["ill_fraction"] == 0.0 and r["Delta_plus"] == r["Delta"]
        assert r["overlap_ii87"] == pytest.approx(1.0, abs=1e-12)
        assert r["overlap_haar"] == pytest.approx(1.0, abs=1e-12)
        a_plus = np.mean(np.real(a[np.abs(1 + a) < 1]))
        G = sum((1 + a_plus) ** t for t in range(T + 1))
        assert r["overlap_ii92"] == pytest.approx(np.sqrt(G / (T + 1)), rel=1e-12)
        assert r["overlap_ii92"] < 0.9           # the recorded disagreement with eq. II.87


def test_simulated_truncated_hhl_follows_ii87_not_ii92():
    """The simulated truncated circuit on the same M reproduces eq. II.87 (= 1) to the phase-estimation
    error (measured 1 - overlap = 2e-5 at c = 8, 1.3e-3 at c = 6), not eq. II.92 (0.87)."""
    T = 4
    M, B, a = _carleman_case(1.0, 0, 0.25, T)
    r = ii92_against_ii87(M, B, a, T)
    system = embed(M.toarray(), B)
    x = system.embed_solution(np.linalg.solve(M.toarray(), B))
    measured = measured_overlap(simulate_hhl(system, 8, kappa_a=r["kappa_a"]), x)
    assert abs(measured - r["overlap_ii87"]) < 1e-3
    assert measured - r["overlap_ii92"] > 0.1


def test_dissipative_split():
    a = np.array([-0.5, -1.5, 0.1, -2.5, -0.2 + 0.1j])
    d_plus, d, a_plus = dissipative_split(a)
    assert (d_plus, d) == (3, 5)
    assert a_plus == pytest.approx(np.mean([-0.5, -1.5, -0.2]))


def test_measured_overlap_requires_flag():
    system, x = _system(np.array([0.5, 1.0]), seed=0)
    with pytest.raises(UserError, match="flag"):
        measured_overlap(simulate_hhl(system, 4), x)


def test_older_names_are_the_overlap_functions():
    """The pre-rename names stay importable for outside callers and are the same functions."""
    from hpcqml.hhl import truncated

    assert truncated.closed_form_fidelity is closed_form_overlap
    assert truncated.haar_average_fidelity is haar_average_overlap
