"""HHL with a given rotation constant ``C`` against the closed form of the post-selected state.

With every eigenvalue of ``H`` on the clock grid, phase estimation is exact: clock value
``y_j`` carries ``lambda_j`` and nothing else. The ancilla rotation puts ``C / lambda_j`` on
``|1>``, uncomputation returns the clock to ``|0>``, and the post-selected (unnormalised)
state is ``C sum_j beta_j / lambda_j |u_j> = C H^{-1} |b>`` (eq. II.84-II.85). Hence

    p_success = C^2 ||H^{-1} b||^2,    output state = H^{-1} b / ||H^{-1} b||,

for any ``C`` with ``|C / lambda_j| <= 1``. Off the grid the amplitude of every branch is
still linear in ``C`` (the rotation is the only place ``C`` enters), so
``p_success(C2) / p_success(C1) = (C2 / C1)^2`` exactly, whatever the clock error.
"""
from __future__ import annotations

import numpy as np
import pytest

from hpcqml.hhl.statevector import clock_t0, default_t0, embed, simulate_hhl


def _grid_system():
    """Symmetric 4 x 4 ``M = Q diag(1, 1/2, -1/4, -3/4) Q^T``: with ``t0 = 2 pi m / N_c``, m = 4,
    the clock values are ``y'/4`` and hold every eigenvalue exactly (||M|| = 1, no rescaling).
    """
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    M = (q * np.array([1.0, 0.5, -0.25, -0.75])) @ q.T
    B = rng.standard_normal(4)
    return M, B


@pytest.mark.parametrize("C", [0.25, 0.1, 0.01])
def test_success_probability_is_c_squared_times_the_inverse_norm(C):
    M, B = _grid_system()
    system = embed(M, B)
    t0, exact = clock_t0(system, 4, "exact")
    assert exact and t0 == pytest.approx(2 * np.pi * 4 / 16)
    res = simulate_hhl(system, 4, C=C, t0=t0)
    x = np.linalg.solve(M, B)
    b = B / np.linalg.norm(B)
    # H = M here, so ||H^{-1} b|| = ||x|| / ||B||. Exact phase estimation: only FFT rounding,
    # ~ N_c * D * eps ~ 1e-14 relative; 1e-10 leaves room and is far below any change of C.
    assert res.C == C
    assert res.p_success == pytest.approx(C**2 * np.linalg.norm(np.linalg.solve(M, b)) ** 2, rel=1e-10)
    assert res.p_ancilla == pytest.approx(res.p_success, rel=1e-10)   # no clock leakage on the grid
    overlap = abs(np.vdot(res.state, x / np.linalg.norm(x)))
    assert overlap == pytest.approx(1.0, abs=1e-10)


def test_success_probability_scales_as_c_squared_off_the_grid():
    """Default clock mapping, eigenvalues off the grid (leakage present): p and p_ancilla both ~ C^2."""
    rng = np.random.default_rng(5)
    A = rng.standard_normal((4, 4))
    M = A @ A.T + 0.5 * np.eye(4)
    system = embed(M, rng.standard_normal(4))
    c = 5
    t0 = default_t0(c)
    cmax = 2 * np.pi / (t0 * 2**c)  # smallest non-zero clock value: no saturation for C <= cmax
    r1, r2 = simulate_hhl(system, c, C=cmax), simulate_hhl(system, c, C=cmax / 3)
    assert r1.leakage > 1e-4                                    # genuinely off the grid
    assert r2.p_success / r1.p_success == pytest.approx(1 / 9, rel=1e-12)
    assert r2.p_ancilla / r1.p_ancilla == pytest.approx(1 / 9, rel=1e-12)
    # The normalised output state does not depend on C (both branches scale alike).
    assert abs(np.vdot(r1.state, r2.state)) == pytest.approx(1.0, abs=1e-12)
