"""Truncated HHL (eq. II.86) against the closed form eq. II.87 and the Haar estimates eq. II.89-II.93."""
import numpy as np
import pytest

from hpcqml.errors import UserError
from hpcqml.hhl.statevector import clock_eigenvalues, default_t0, embed, simulate_hhl
from hpcqml.hhl.truncated import (
    closed_form_fidelity,
    dissipative_split,
    eigen_coefficients,
    fidelity_ii92,
    fidelity_ii93,
    haar_average_fidelity,
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
    expected = closed_form_fidelity(lam_j, beta, kappa_a)
    assert 0.05 < expected < 0.95  # a truncation that matters
    assert measured_overlap(res, x) == pytest.approx(expected, abs=1e-12)


def test_generic_spectrum_matches_ii87_within_phase_estimation_error():
    lam = np.array([0.05, -0.12, 0.15, 0.4, -0.55, 0.7, 0.85, 1.0])  # 0.1 away from the threshold 0.25
    system, x = _system(lam, seed=5)
    lam_j, beta = eigen_coefficients(system)
    expected = closed_form_fidelity(lam_j, beta, 4.0)
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
    assert closed_form_fidelity(lam_j, beta, 100.0) == pytest.approx(1.0, abs=1e-14)
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
    assert closed_form_fidelity(lam, beta, 4.0) == pytest.approx(0.64 / (np.sqrt(36.64) * 1.0))
    with pytest.raises(UserError):
        closed_form_fidelity(lam, beta, 0.0)
    with pytest.raises(UserError):
        closed_form_fidelity(np.array([0.0, 1.0]), np.array([1.0, 0.0]), 2.0)


def test_haar_average_ii89_identity_and_estimate():
    rng = np.random.default_rng(7)
    D = 256
    lam = np.concatenate([rng.uniform(0.3, 1.0, 200), rng.uniform(0.01, 0.1, 56)]) * rng.choice([-1, 1], D)
    kappa_a = 5.0
    est = haar_average_fidelity(lam, kappa_a)
    well = np.abs(lam) >= 1 / kappa_a
    s_well, fids = [], []
    for _ in range(2000):
        z = rng.standard_normal(D) + 1j * rng.standard_normal(D)  # Haar-random state
        beta = z / np.linalg.norm(z)
        s_well.append(np.sum(np.abs(beta[well] / lam[well]) ** 2))
        fids.append(closed_form_fidelity(lam, beta, kappa_a))
    s_well = np.array(s_well)
    # eq. II.89: E[S_well] = Tr(Lbar^-2)/D; 99.9 % two-sided normal interval (z = 3.29)
    target = np.sum(1 / lam[well] ** 2) / D
    assert abs(s_well.mean() - target) < 3.29 * s_well.std(ddof=1) / np.sqrt(s_well.size)
    # annealed estimate vs the mean of eq. II.87 over Haar states: close at D = 256
    assert abs(np.mean(fids) - est) < 0.01


def test_ii92_by_hand_and_limit_ii93():
    # Delta_+ = 3, Delta = 4, a_+ = -0.5, T = 1: G = 1 + 0.5 = 1.5, 4.5 / sqrt(8 * 6.5)
    assert fidelity_ii92(3, 4, -0.5, 1) == pytest.approx(4.5 / np.sqrt(8 * 6.5), rel=1e-14)
    for T in (1, 10, 100):
        assert fidelity_ii92(30, 40, -1e-12, T) == pytest.approx(fidelity_ii93(30, 40), rel=1e-8)
        assert fidelity_ii92(30, 40, 0.0, T) == pytest.approx(0.75, rel=1e-14)
    assert fidelity_ii92(0, 5, -0.5, 3) == 0.0
    with pytest.raises(UserError):
        fidelity_ii93(5, 4)


def test_ii92_is_the_haar_estimate_of_its_own_model():
    """Eq. II.92 is eq. II.89-II.91 for Delta_+ dissipative modes, kappa_a = 2(T+1), Delta_- ill ones.

    Model the inverse block matrix eigen-weights as eq. II.92 does: each dissipative mode
    contributes sum_t (1+a_+)^t to Tr(Lbar^-2)-like sums; the annealed ratio then equals eq. II.92.
    """
    T, a_plus, d_plus, d_minus = 5, -0.3, 6, 2
    g = sum((1 + a_plus) ** t for t in range(T + 1))
    num = d_plus * g
    den = np.sqrt((T + 1) * (d_plus + d_minus)) * np.sqrt(d_plus * g + (T + 1) * d_minus)
    assert fidelity_ii92(d_plus, d_plus + d_minus, a_plus, T) == pytest.approx(num / den, rel=1e-13)


def test_dissipative_split():
    a = np.array([-0.5, -1.5, 0.1, -2.5, -0.2 + 0.1j])
    d_plus, d, a_plus = dissipative_split(a)
    assert (d_plus, d) == (3, 5)
    assert a_plus == pytest.approx(np.mean([-0.5, -1.5, -0.2]))


def test_measured_overlap_requires_flag():
    system, x = _system(np.array([0.5, 1.0]), seed=0)
    with pytest.raises(UserError, match="flag"):
        measured_overlap(simulate_hhl(system, 4), x)
