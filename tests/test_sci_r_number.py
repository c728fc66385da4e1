"""The R number of Liu et al. (PNAS 118, e2026805118, 2021) against its published definition, computed
independently with numpy: spectral norms (not Frobenius), the eigenvalue of F1 with the largest real
part (not a norm or logarithmic norm of F1), and the forcing term ||F0||/||u_in||.

The co-author's script that reproduces the paper's Burgers results (hermankolden/CarlemanBurgers,
carleman_burgers.m) computes the same expression.  With F0 = 0 it reduces to ||u_in|| ||F2|| / |Re lambda_1|,
the form of the first arXiv version (2011.03185v1) that JuliaReach's CarlemanLinearization.jl implements.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hpcqml.carleman import timestepping as ts
from hpcqml.carleman.instance import PolynomialODE


def _ode(F0, F1, F2, u):
    return PolynomialODE(F=[sp.csr_matrix(np.reshape(F0, (-1, 1))), sp.csr_matrix(F1), sp.csr_matrix(F2)],
                         u_in=np.asarray(u, dtype=np.float64))


def test_r_uses_spectral_norms_and_the_rightmost_eigenvalue_of_a_non_normal_f1():
    """F1 upper triangular with a large off-diagonal entry: eigenvalues -1 and -0.4 (Re lambda_1 = -0.4),
    while ||F1||_2 ~ 3.2 and its logarithmic norm is positive.  Two F2 with the same entries: in one row
    (spectral norm 0.5 = Frobenius norm) and in two rows and columns (spectral norm 0.4, Frobenius 0.5)."""
    F1 = np.array([[-1.0, 3.0], [0.0, -0.4]])
    F2 = np.zeros((2, 4))
    F2[0, 1], F2[0, 3] = 0.3, 0.4            # one row: ||F2||_2 = ||F2||_F = 0.5
    F2b = np.zeros((2, 4))
    F2b[0, 1], F2b[1, 3] = 0.3, 0.4          # two rows, two columns: ||F2b||_2 = 0.4 < ||F2b||_F = 0.5
    F0 = np.array([0.02, -0.01])
    u = np.array([0.1, 0.2])
    for f2 in (F2, F2b):
        lam1 = np.max(np.linalg.eigvals(F1).real)
        want = (np.linalg.norm(u) * np.linalg.svd(f2, compute_uv=False)[0]
                + np.linalg.norm(F0) / np.linalg.norm(u)) / abs(lam1)
        R, note = ts.r_number_pnas(_ode(F0, F1, f2, u))
        assert R == pytest.approx(want, rel=1e-13)
        assert note == "R = (||u_in|| ||F2|| + ||F0||/||u_in||) / |Re(lambda_1)|"
    assert ts.r_number_pnas(_ode(F0, F1, F2b, u))[0] < ts.r_number_pnas(_ode(F0, F1, F2, u))[0]


def test_without_forcing_r_is_the_arxiv_form():
    """F0 = 0, complex eigenvalues -0.3 +- 0.5i (rotation plus decay): R = ||u_in|| ||F2|| / 0.3."""
    F1 = np.array([[-0.3, 0.5], [-0.5, -0.3]])
    F2 = np.array([[0.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, -0.1]])
    u = np.array([0.3, -0.4])
    R, _ = ts.r_number_pnas(_ode(np.zeros(2), F1, F2, u))
    assert R == pytest.approx(0.5 * 0.2 / 0.3, rel=1e-13)
