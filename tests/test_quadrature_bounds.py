"""Proven quadrature brackets (hpcqml.hessian.quadrature) against exact discrete measures.

Every case is a discrete measure mu = sum_i w_i delta(lambda_i) with known atoms: its
Jacobi matrix (Lanczos on diag(lambda) from sqrt(w), float64, full reorthogonalisation)
truncated to m steps is what Lanczos on H = Q diag(lambda) Q^T from a probe with those
weights produces.  The exact distribution function and integrals come from the atoms.
Tolerances: the brackets are compared with a slack of 1e-12 (absolute, masses) or 1e-12
relative (integrals): the rounding of the Jacobi matrix built here (~1e-15 per entry,
amplified by at most m ~ 40) and of the sums.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from hpcqml.hessian.quadrature import (ProbeQuadrature, jacobi_from_measure, power_derivative_sign,
                                       quantile_bounds)

SLACK = 1e-12


def hessian_like(rng: np.random.Generator, n: int = 300, width: float = 0.05, zeros: int = 5) -> np.ndarray:
    """A bulk near 0, outliers of both signs, and ``zeros`` eigenvalues exactly 0."""
    lam = np.concatenate([rng.normal(0.0, width, n - 30), rng.uniform(-3.0, -0.3, 8), rng.uniform(0.5, 30.0, 22)])
    lam[:zeros] = 0.0
    return lam


def truncated(lam: np.ndarray, w: np.ndarray, m: int) -> ProbeQuadrature:
    alpha, beta = jacobi_from_measure(lam, w)
    return ProbeQuadrature(alpha[:m], beta[:m - 1], float(beta[m - 1]), exact=False)


def dense_radau_bounds(q: ProbeQuadrature, x: float) -> tuple[float, float]:
    """CMS bounds at x from the Radau rule computed independently: the (m+1) x (m+1) Jacobi
    matrix with last diagonal x + d_m, (T_m - x I) d = beta_m^2 e_m solved densely, eigh."""
    m = q.steps
    T = np.diag(q.alpha) + np.diag(q.beta_off, 1) + np.diag(q.beta_off, -1)
    d = np.linalg.solve(T - x * np.eye(m), q.beta_last ** 2 * np.eye(m)[:, -1])
    J = np.zeros((m + 1, m + 1))
    J[:m, :m] = T
    J[m, m] = x + d[-1]
    J[m - 1, m] = J[m, m - 1] = q.beta_last
    y, V = scipy.linalg.eigh(J)
    w = V[0] ** 2
    j = int(np.argmin(np.abs(y - x)))
    return float(w[:j].sum()), float(w[:j + 1].sum())


@pytest.mark.parametrize("seed", range(6))
def test_cms_bounds_contain_the_exact_distribution(seed):
    """lo <= mu((-inf, x)) <= mu((-inf, x]) <= hi at the thresholds and random points, with
    eigenvalues exactly on 0; the bounds agree with a dense Radau computation (1e-7: the dense
    solve is ill-conditioned near Gauss nodes) and shrink as m grows."""
    rng = np.random.default_rng(seed)
    lam = hessian_like(rng)
    w = rng.random(lam.size)
    w /= w.sum()
    xs = np.concatenate(([0.0, 0.4, -0.4, 2.0, -0.01], rng.uniform(-3, 30, 20)))
    widths = []
    for m in (5, 15, 40):
        q = truncated(lam, w, m)
        lo, hi = q.cdf_bounds_many(xs)
        below = np.array([w[lam < x].sum() for x in xs])
        upto = np.array([w[lam <= x].sum() for x in xs])
        assert np.all(lo <= below + SLACK) and np.all(upto <= hi + SLACK)
        widths.append(float(np.mean(hi - lo)))
        for x in (0.4, 2.0, 7.3):
            assert q.cdf_bounds(x) == pytest.approx(dense_radau_bounds(q, x), abs=1e-7)
    assert widths[0] > widths[1] > widths[2]
    # the 5 zero eigenvalues carry mass that no m can place on a side of 0
    lo, hi = truncated(lam, w, 40).cdf_bounds(0.0)
    assert hi - lo >= w[lam == 0.0].sum() - SLACK


def test_breakdown_measure_is_exact_with_mass_on_the_threshold():
    """A measure on 4 atoms (one exactly at 0) with m = 4: the Gauss rule is the measure, the
    bound at 0 is [mass below 0, mass up to and including 0], whatever the rounding of the
    Ritz value at 0; away from atoms the bounds are the distribution itself."""
    lam = np.array([-1.0, 0.0, 0.5, 2.0])
    w = np.array([0.1, 0.3, 0.4, 0.2])
    alpha, beta = jacobi_from_measure(lam, w)
    q = ProbeQuadrature(alpha, beta, 0.0, exact=True)
    assert q.cdf_bounds(0.0) == pytest.approx((0.1, 0.4), abs=1e-15)
    assert q.cdf_bounds(0.25) == pytest.approx((0.4, 0.4), abs=1e-15)
    # (0, 2) with atoms on both ends: the open interval holds 0.4, the closed one 0.9
    assert q.interval_mass_bounds(0.0, 2.0) == pytest.approx((0.4, 0.9), abs=1e-15)


def test_cdf_bounds_are_cms_of_the_moments_not_of_the_measure():
    """Two measures with the same first 2m + 1 moments (the Radau rule at x, and mu itself)
    both satisfy the bounds, and the Radau rule attains them at x: the bounds are sharp."""
    rng = np.random.default_rng(7)
    lam = rng.uniform(-1, 3, 60)
    w = rng.random(60)
    w /= w.sum()
    q = truncated(lam, w, 8)
    for x in (0.3, 1.7):
        y, om, j = q.radau(x)
        lo, hi = q.cdf_bounds(x)
        assert lo == pytest.approx(om[:j].sum(), abs=1e-9) and hi == pytest.approx(om[:j + 1].sum(), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_integral_brackets_contain_the_exact_value(seed):
    """E(t) numerators |1 - k lambda|^t over |lambda| >= c (quantile bound) and without the
    cutoff (Gauss/Radau bracket) contain the exact integral for t = 3, 10, 100, both k."""
    rng = np.random.default_rng(100 + seed)
    lam = hessian_like(rng, zeros=3)
    w = rng.random(lam.size)
    w /= w.sum()
    a, b = float(lam.min()), float(lam.max())
    for m in (6, 20):
        q = truncated(lam, w, m)
        for k in (1.0, 0.01):
            for t in (3.0, 10.0, 100.0):
                def f(x, t=t, k=k):
                    return np.abs(1 - k * x) ** t

                def kept(x):
                    return np.abs(x) >= 0.4
                lo, hi = q.quantile_bracket(f, kept, a, b, np.array([-0.4, 0.4, 1 / k]))
                exact = float(np.sum(w * f(lam) * kept(lam)))
                assert lo * (1 - SLACK) <= exact <= hi * (1 + SLACK)
                glo, ghi = q.smooth_bracket(f, lambda j, lo_, hi_, t=t, k=k: power_derivative_sign(t, k, j, lo_, hi_),
                                            a, b)
                full = float(np.sum(w * f(lam)))
                assert glo <= full * (1 + SLACK) and full * (1 - SLACK) <= ghi


def test_polynomial_below_degree_2m_is_a_point_bracket():
    """(1 - 0.01 lambda)^t with every eigenvalue below 1/k = 100 is a polynomial of degree t;
    Gauss with m = 20 integrates t < 40 exactly: the bracket is the Gauss value (width 0) and
    equals the exact integral to 1e-13 relative."""
    rng = np.random.default_rng(3)
    lam = hessian_like(rng)
    w = rng.random(lam.size)
    w /= w.sum()
    q = truncated(lam, w, 20)
    for t in (1.0, 10.0, 39.0):
        def f(x, t=t):
            return np.abs(1 - 0.01 * x) ** t
        lo, hi = q.smooth_bracket(f, lambda j, a, b, t=t: power_derivative_sign(t, 0.01, j, a, b),
                                  float(lam.min()), float(lam.max()))
        assert lo == hi == pytest.approx(float(np.sum(w * f(lam))), rel=1e-13)


def test_quantile_bounds_by_hand():
    """Grid 0 < 1 < 2, F(0) in [0, 0.5], F(1^-) >= 0.5 and F(1) <= 0.5 (half the mass in
    [0, 1), half in (1, 2]); g = x: the integral lies in [0 * 0.5 + 1 * 0.5, 1 * 0.5 + 2 * 0.5]."""
    grid = np.array([0.0, 1.0, 2.0])
    lo = np.array([0.0, 0.5, 0.5])
    hi = np.array([0.5, 0.5, 1.0])
    low, high = quantile_bounds(grid, lo, hi, lambda x: x, lambda x: np.ones(x.shape, bool))
    assert (low, high) == pytest.approx((0.5, 1.5))


def test_derivative_signs():
    """|1 - k lambda|^t: on the side 1 - k lambda > 0 the j-th derivative has sign (-1)^j for
    integer j <= t and vanishes beyond; on the other side it is positive; an odd power
    straddling 1/k has no sign."""
    assert power_derivative_sign(10, 0.1, 3, -1.0, 5.0) == -1
    assert power_derivative_sign(10, 0.1, 4, -1.0, 5.0) == 1
    assert power_derivative_sign(10, 0.1, 11, -1.0, 50.0) == 0
    assert power_derivative_sign(3, 1.0, 2, 2.0, 5.0) == 1
    assert power_derivative_sign(3, 1.0, 2, 0.0, 5.0) is None
    assert power_derivative_sign(3, 1.0, 7, 0.0, 5.0) is None   # |1 - lambda|^3 is no polynomial there
    assert power_derivative_sign(4, 1.0, 2, 0.0, 5.0) == 1
