"""Small, fast checks of the scalar helpers of ``hpcqml.carleman.timestepping``.

Written to kill the mutants that survived ``make mutation`` (docs/testing.md): each test compares
with a value worked out by hand in its docstring or with an independent library routine
(scipy.stats), never with the same formula typed again.  Inputs are chosen so that every value
compared is exact in binary floating point or far from any rounding-level boundary.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from hpcqml.carleman import timestepping as ts
from hpcqml.carleman.instance import PolynomialODE


def _diag_ode(f1: list[float]) -> PolynomialODE:
    """n = len(f1), F0 = 0, F1 = diag(f1), F2 = 0: ||F1||_2 = max |f1|."""
    n = len(f1)
    return PolynomialODE(F=[sp.csr_matrix((n, 1)), sp.csr_matrix(np.diag(f1)), sp.csr_matrix((n, n * n))],
                         u_in=np.full(n, 0.1))


def test_stability_number_and_its_threshold_on_either_side_of_one():
    """N ||F1||_2 with ||diag(f, -0.25)||_2 = f: at N = 2, f = 0.495 gives 0.99 (stable, no
    warning) and f = 0.505 gives 1.01 (a RuntimeWarning naming the value, and False); f = 0.5
    at N = 3 gives 1.5.  Each value is 1 % or more from the threshold, far beyond the rounding
    of the 2-norm (a few units in 1e-16), so no check depends on it."""
    below, above = _diag_ode([0.495, -0.25]), _diag_ode([0.505, -0.25])
    assert ts.stability_number(below, 2) == pytest.approx(0.99, rel=1e-12)
    assert ts.stability_number(above, 2) == pytest.approx(1.01, rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ts.check_stability(below, 2) is True
    for ode, N, text in ((above, 2, "1.01"), (_diag_ode([0.5, -0.25]), 3, "1.5")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ts.check_stability(ode, N) is False
        assert len(caught) == 1 and caught[0].category is RuntimeWarning
        assert str(caught[0].message) == f"Carleman stepping may be unstable: N*||F1||_2 = {text} > 1"
        assert caught[0].filename == __file__   # attributed to the caller (stacklevel 2)


def test_bound_II57_by_hand():  # noqa: N802 - eq. II.57
    """eq. II.57: 3 N ||A||^-1 u^(N+1) sum_{l>=2} (l-1)||F_l||.
    N = 2, ||A||^-1 = 0.5, u = 0.5, ||F|| = (9, 9, 2, 3): the sum is 1*2 + 2*3 = 8, so the bound is
    3 * 2 * 0.5 * 0.125 * 8 = 3.  F0 and F1 do not enter.  With only ||F_2|| = 1 the sum is 1 and the
    bound 3 * 2 * 0.5 * 0.125 = 0.375; no nonlinearity or u = 0 gives exactly 0."""
    assert ts.bound_II57(2, 0.5, 0.5, np.array([9.0, 9.0, 2.0, 3.0])) == 3.0
    assert ts.bound_II57(2, 0.5, 0.5, np.array([9.0, 9.0, 1.0])) == 0.375
    assert ts.bound_II57(2, 0.5, 0.5, np.array([9.0, 9.0, 0.0])) == 0.0
    assert ts.bound_II57(2, 0.5, 0.0, np.array([9.0, 9.0, 2.0])) == 0.0
    assert ts.bound_II57(1, 1.0, 0.5, np.array([0.0, 0.0, 1.0])) == 0.75   # 3 * 1 * 1 * 0.25 * 1
    assert ts.bound_II57(2, 0.5, 1.0, np.array([0.0, 0.0, 2.0])) == 6.0    # u = 1: 3 * 2 * 0.5 * 1 * 2
    # no nonlinearity is exactly 0 even when u^(N+1) overflows (inf * 0 would be NaN)
    assert ts.bound_II57(5, 1.0, 1e200, np.array([0.0, 1.0, 0.0])) == 0.0


def test_order_II60_by_hand():  # noqa: N802 - eq. II.60
    """eq. II.60: N = ceil(2 / log(1/u) * log(3 s / (||A|| eps))).  With u = e^-2 the prefactor is 1,
    so N = ceil(log(arg)): arg = e^2.5 gives 3 and arg = e^0.5 gives 1 (2.5 and 0.5 are far from
    integers, so rounding cannot move the ceiling).  arg = 3 s / (||A|| eps) = 1 exactly returns 1; u
    outside (0, 1) returns NaN (eq. II.54 fails)."""
    u = float(np.exp(-2.0))
    s = float(np.exp(2.5)) / 3.0
    assert ts.order_II60(1.0, 1.0, u, np.array([0.0, 0.0, s])) == 3.0
    assert ts.order_II60(1.0, 1.0, u, np.array([0.0, 0.0, float(np.exp(0.5)) / 3.0])) == 1.0
    # the (l - 1) weights: ||F_3|| = s / 2 counts twice, ||F_2|| = 0
    assert ts.order_II60(1.0, 1.0, u, np.array([0.0, 0.0, 0.0, s / 2.0])) == 3.0
    # ||A|| and eps divide: arg = 3 * 1 / (3 * 1) = 1 exactly, and 3 * 1 / (1 * 0.5) = 6 (log 6 = 1.79)
    assert ts.order_II60(1.0, 3.0, u, np.array([0.0, 0.0, 1.0])) == 1.0
    assert ts.order_II60(0.5, 1.0, u, np.array([0.0, 0.0, 1.0])) == 2.0
    assert ts.order_II60(1.0, 0.5, u, np.array([0.0, 0.0, 1.0])) == 2.0
    # 1 < arg < 2 still takes the formula: u = e^-0.5 (prefactor 4), arg = e^0.6: ceil(2.4) = 3
    assert ts.order_II60(1.0, 1.0, float(np.exp(-0.5)), np.array([0.0, 0.0, float(np.exp(0.6)) / 3.0])) == 3.0
    for bad in (1.0, 0.0, -0.5, 2.0):
        assert np.isnan(ts.order_II60(1.0, 1.0, bad, np.array([0.0, 0.0, s])))


def test_discrete_bound_by_hand():
    """B(t+1) = ||I+A|| B(t) + r(t), B(0) = 0: ||I+A|| = 2, r = (1, 1, 1) gives B = (0, 1, 3, 7)."""
    np.testing.assert_array_equal(ts.discrete_bound(2.0, np.ones(3)), [0.0, 1.0, 3.0, 7.0])


def test_fit_late_rate_standard_error_against_scipy_linregress():
    """Slope and its standard error against scipy.stats.linregress on the kept points.

    err(t) = exp(-0.2 t + noise) over t = 0..40, late fraction 0.5 -> t0 = floor(0.5 * 40) = 20;
    a NaN and a zero inside the window are left out.  Both fits are least squares in double
    precision on 19 points: they agree to ~1e-13 relative."""
    rng = np.random.default_rng(3)
    t = np.arange(41.0)
    err = np.exp(-0.2 * t + 0.05 * rng.standard_normal(41))
    err[25] = np.nan
    err[30] = 0.0
    slope, se, t0, t1 = ts.fit_late_rate(err, 0.5)
    assert (t0, t1) == (20, 40)
    keep = np.isfinite(err) & (err > 0) & (t >= 20)
    want = stats.linregress(t[keep], np.log(err[keep]))
    assert slope == pytest.approx(want.slope, rel=1e-10)
    assert se == pytest.approx(want.stderr, rel=1e-10)
    # floor, not round: 0.3 * 41 steps = 12.3 -> t0 = floor(0.7 * 41) = 28
    assert ts.fit_late_rate(np.exp(-0.1 * np.arange(42.0)), 0.3)[2] == 28
    # a negative error counts by its magnitude; exactly three usable points give a slope
    slope3 = ts.fit_late_rate(-np.exp(-0.5 * np.arange(3.0)), 1.0)[0]
    assert slope3 == pytest.approx(-0.5, rel=1e-12)


def test_predicted_rate_by_hand():
    """rho = max log|1 + a|.  a = (0.2, -0.5): rho = log 1.2 > 0, rate (N+1) rho; a = (-0.1, -0.5, -1):
    rho = log 0.9 < 0 (the a = -1 mode gives log 0 = -inf and is ignored), rate rho; a = (-2.5,) is
    |1 + a| = 1.5, divergent."""
    rho, rate = ts.predicted_rate(np.array([0.2, -0.5]), 2)
    assert rho == pytest.approx(np.log(1.2), rel=1e-14) and rate == pytest.approx(3 * np.log(1.2), rel=1e-14)
    rho, rate = ts.predicted_rate(np.array([-0.1, -0.5, -1.0]), 2)
    assert rho == pytest.approx(np.log(0.9), rel=1e-14) and rate == rho
    rho, rate = ts.predicted_rate(np.array([-2.5]), 1)
    assert rho == pytest.approx(np.log(1.5), rel=1e-14) and rate == pytest.approx(2 * np.log(1.5), rel=1e-14)


def test_verdict_tolerances():
    """measured <= bound (1 + rtol) + atol, default rtol 1e-9: 1 + 1e-10 passes a bound of 1, 1 + 1e-8
    does not; equality holds; atol adds; an array bound with one inf entry is not evaluated."""
    assert ts.verdict(1.0, 1.0) == "true"
    assert ts.verdict(1.0 + 1e-10, 1.0) == "true"
    assert ts.verdict(1.0 + 1e-8, 1.0) == "false"
    assert ts.verdict(1.5, 1.0, atol=0.5) == "true"
    assert ts.verdict(1.6, 1.0, atol=0.5) == "false"
    assert ts.verdict(1.5, 1.0, rtol=0.5) == "true"
    assert ts.verdict(1.0, 2.0, rtol=-0.6) == "false"   # the tolerance is relative to the bound
    assert ts.verdict(np.array([1.0, 1.0]), np.array([2.0, np.inf])) == "not evaluated"
    assert ts.verdict(np.array([1.0, 1.0]), np.zeros(0)) == "not evaluated"
    assert ts.verdict(np.array([1.0, np.nan]), np.array([2.0, 2.0])) == "not evaluated"


@pytest.mark.parametrize("m", [0, 1, 3, 4, 5, 10, 25])
def test_median_interval_against_scipy_binomial(m):
    """Order-statistic interval [x_(k), x_(m+1-k)]: its coverage 1 - 2 P(Bin(m, 1/2) <= k-1) from
    scipy.stats.binom; k is the largest with coverage >= 0.9 (1 when none is).  The sample is a
    permutation of 0..m-1, so x_(k) = k - 1 and the median is (m-1)/2."""
    rng = np.random.default_rng(m)
    x = rng.permutation(m).astype(np.float64)
    med, lo, hi, cov = ts.median_interval(x)
    if m == 0:
        assert all(np.isnan(v) for v in (med, lo, hi, cov))
        return
    covs = {k: 1.0 - 2.0 * stats.binom.cdf(k - 1, m, 0.5) for k in range(1, (m + 1) // 2 + 1)}
    good = [k for k, c in covs.items() if c >= 0.9]
    k = max(good) if good else 1
    assert med == (m - 1) / 2.0
    assert (lo, hi) == (k - 1.0, float(m - k))
    assert cov == pytest.approx(covs[k], abs=1e-12)


def test_median_interval_coverage_argument():
    """coverage = 0.5 on 10 points: k = 4 has 1 - 2 * 176/1024 = 0.656 >= 0.5 and k = 5 has
    1 - 2 * 386/1024 = 0.246 < 0.5 (binomial sums by hand), so the interval is [x_(4), x_(7)]."""
    med, lo, hi, cov = ts.median_interval(np.arange(10.0), coverage=0.5)
    assert (lo, hi) == (3.0, 6.0) and cov == pytest.approx(1.0 - 2.0 * 176 / 1024, abs=1e-14)


def test_rate_agreement_each_verdict():
    """Ratios fitted/predicted with predicted 1 (and rtol 0.25, so the band edges 0.75 and 1.25 are
    exact binary numbers):
    - 10 ratios of 1: interval [1, 1] with coverage 1002/1024 >= 0.9: agrees;
    - every ratio exactly on a band edge still agrees;
    - 3 ratios of 1: coverage 0.75: unresolved with a note;
    - all ratios 1.5 or all 0.5: disagrees; ratios straddling an edge: unresolved;
    - predicted 0.05 with a window of 10 steps: 0.5 e-folds, too short; 20 steps: exactly 1 e-fold, judged;
    - NaN fits and zero predictions are left out of the seed count."""
    one = np.ones(10)
    r = ts.rate_agreement(one, one, 100, rtol=0.25)
    assert r["verdict"] == "agrees" and r["seeds"] == 10.0
    assert r["coverage"] == pytest.approx(1002 / 1024, abs=1e-14) and r["efolds"] == 100.0
    assert ts.rate_agreement(0.75 * one, one, 100, rtol=0.25)["verdict"] == "agrees"
    assert ts.rate_agreement(1.25 * one, one, 100, rtol=0.25)["verdict"] == "agrees"
    r3 = ts.rate_agreement(np.ones(3), np.ones(3), 100, rtol=0.25)
    assert r3["verdict"].startswith("unresolved (interval coverage 75%")
    assert ts.rate_agreement(1.5 * one, one, 100, rtol=0.25)["verdict"] == "disagrees"
    assert ts.rate_agreement(0.5 * one, one, 100, rtol=0.25)["verdict"] == "disagrees"
    assert ts.rate_agreement(np.linspace(0.5, 1.5, 10), one, 100, rtol=0.25)["verdict"] == "unresolved"
    assert ts.rate_agreement(np.linspace(1.0, 1.5, 10), one, 100, rtol=0.25)["verdict"] == "unresolved"
    assert ts.rate_agreement(np.linspace(0.5, 1.0, 10), one, 100, rtol=0.25)["verdict"] == "unresolved"
    # default band 0.15: ratio 1.2 is outside it
    assert ts.rate_agreement(1.2 * one, one, 100)["verdict"] == "disagrees"
    assert ts.rate_agreement(1.1 * one, one, 100)["verdict"] == "agrees"
    small = -0.05 * one   # negative (decay) rates: the e-folds use |rate|
    assert ts.rate_agreement(small, small, 10)["verdict"] == "horizon too short to tell"
    r20 = ts.rate_agreement(small, small, 20)
    assert r20["verdict"] == "agrees" and r20["efolds"] == pytest.approx(1.0, rel=1e-14)
    f = one.copy()
    p = one.copy()
    f[:7] = np.nan
    p[9] = 0.0
    r2 = ts.rate_agreement(f, p, 100, rtol=0.25)
    assert r2["seeds"] == 2.0 and r2["verdict"].startswith("not evaluated (2 seed(s)")
    rn = ts.rate_agreement(np.full(4, np.nan), one[:4], 100)
    assert np.isnan(rn["efolds"]) and rn["seeds"] == 0.0


def _scalar(f1: float, f2: float | None, u0: float, f0_t: np.ndarray | None = None) -> PolynomialODE:
    """Scalar map u(t+1) = u + f1 u (+ f2 u^2) (+ F0_t[t]); q = 1 without f2."""
    F = [sp.csr_matrix((1, 1)), sp.csr_matrix([[f1]])]
    if f2 is not None:
        F.append(sp.csr_matrix([[f2]]))
    return PolynomialODE(F=F, u_in=np.array([u0]), F0_t=f0_t)


def _hand_recurrence(f1: float, f2: float, u0: float, T: int, f0: np.ndarray | None = None) -> np.ndarray:
    u = [u0]
    for t in range(T):
        u.append(u[-1] + f1 * u[-1] + f2 * u[-1] ** 2 + (0.0 if f0 is None else f0[t]))
    return np.array(u)


def test_lifted_residuals_of_a_pure_quadratic_by_hand():
    """u(t+1) = u + c u^2 (F1 = 0), lift ŷ(u) = (u, u^2) at N = 2 (eq. II.7).

    Block 1 of the Carleman step is exact: u + c u^2.  Block 2 maps u^2 -> u^2 + 2 c u^3, the u^3 term
    coming from the neglected block 3 (eq. II.50).  So r(t) = (0, (u + c u^2)^2 - u^2) =
    (0, 2 c u^3 + c^2 u^4): truncation 2 c u^3 (what block 3 feeds in), discreteness c^2 u^4 (the δu⊗δu
    term, eq. V.21-V.22).  At N = 1 the whole residual c u^2 is truncation."""
    c, u0, T = 0.3, 0.4, 5
    ode = _scalar(0.0, c, u0)
    u = _hand_recurrence(0.0, c, u0, T)
    res = ts.lifted_residuals(ode, 2, u)
    v = u[:-1]
    np.testing.assert_allclose(res["truncation"], 2 * c * v**3, rtol=1e-13)
    np.testing.assert_allclose(res["discreteness"], c**2 * v**4, rtol=1e-12)
    np.testing.assert_allclose(res["residual"], 2 * c * v**3 + c**2 * v**4, rtol=1e-13)
    res1 = ts.lifted_residuals(ode, 1, u)
    np.testing.assert_allclose(res1["residual"], c * v**2, rtol=1e-13)
    np.testing.assert_allclose(res1["truncation"], c * v**2, rtol=1e-13)
    assert np.all(res1["discreteness"] <= 1e-15 * c * v**2)


def test_lifted_residuals_with_a_time_varying_constant_by_hand():
    """Linear u(t+1) = (1 + a) u + f(t) (q = 1: no truncation), N = 2.  Block 2 of the Carleman step
    is u^2 + 2 a u^2 + 2 f(t) u, the exact square is ((1 + a) u + f)^2, so r(t) = (a u + f(t))^2 = δu^2,
    all of it discreteness; block 1 is exact."""
    a, u0, T = -0.2, 0.5, 4
    f = np.array([0.01, 0.03, -0.02, 0.05])
    ode = _scalar(a, None, u0, f0_t=f.reshape(-1, 1))
    u = _hand_recurrence(a, 0.0, u0, T, f)
    res = ts.lifted_residuals(ode, 2, u)
    want = (a * u[:-1] + f) ** 2
    np.testing.assert_allclose(res["residual"], want, rtol=1e-12)
    np.testing.assert_allclose(res["discreteness"], want, rtol=1e-12)
    np.testing.assert_array_equal(res["truncation"], 0.0)


def test_carleman_trajectory_and_error_split_by_hand():
    """u(t+1) = u + c u^2.  At N = 1 the Carleman step drops u^2 (F1 = 0), so y_1 stays at u0; the
    split is total = u - u0, truncation = yR - u0, discreteness = u - yR for any given u and yR, and
    with nothing given u is the exact recurrence."""
    c, u0, T = 0.3, 0.4, 5
    ode = _scalar(0.0, c, u0)
    np.testing.assert_array_equal(ts.carleman_trajectory(ode, 1, T), np.full((T + 1, 1), u0))
    u_given = np.arange(T + 1, dtype=np.float64).reshape(-1, 1)
    yR_given = 2.0 * u_given + 1.0
    s = ts.error_split(ode, 1, 4, T, u=u_given, yR=yR_given)
    np.testing.assert_array_equal(s["total"], u_given - u0)
    np.testing.assert_array_equal(s["truncation"], yR_given - u0)
    np.testing.assert_array_equal(s["discreteness"], u_given - yR_given)
    u = _hand_recurrence(0.0, c, u0, T).reshape(-1, 1)
    s = ts.error_split(ode, 1, 6, T)
    np.testing.assert_allclose(s["total"], u - u0, rtol=1e-14, atol=1e-16)
    yR = ts.carleman_trajectory(ode, 6, T)
    np.testing.assert_allclose(s["discreteness"], u - yR, rtol=1e-14, atol=1e-16)


def test_discreteness_scaling_is_first_order():
    """The discreteness error at a fixed time falls like h (each step misses the O(h^2) δu⊗δu term):
    logistic u' = -0.5 u - 0.8 u^2 from 0.3 to time 2 with h = 0.1, 0.05, 0.025 and N_ref = 8.
    The fitted order is 1 within 0.1 (measured 1.06: the O(h^2) term and the N_ref truncation);
    the intercept or a sign slip would be far off."""
    ode = _scalar(-0.5, -0.8, 0.3)
    steps = [0.1, 0.05, 0.025]
    out = ts.discreteness_scaling(ode, 8, 2.0, steps)
    np.testing.assert_array_equal(out["h"], steps)
    for h, e in zip(steps, out["error"], strict=True):
        Th = int(round(2.0 / h))
        u = _hand_recurrence(-0.5 * h, -0.8 * h, 0.3, Th)
        yR = ts.carleman_trajectory(_scalar(-0.5 * h, -0.8 * h, 0.3), 8, Th)
        assert e == pytest.approx(abs(u[-1] - yR[-1, 0]), rel=1e-10)
    assert abs(float(out["slope"]) - 1.0) < 0.1


def test_discreteness_scaling_holds_the_noise_over_each_unit_step():
    """With F0_t, step k of size h = 0.5 uses h F0_t[floor(k h)]: steps 0, 1 use row 0, steps 2, 3 row 1
    (the horizon 2 has 4 steps).  Linear u' = -0.5 u + f so the hand recurrence is exact."""
    f = np.array([0.1, -0.2, 0.3])
    ode = _scalar(-0.5, -0.8, 0.3, f0_t=f.reshape(-1, 1))
    out = ts.discreteness_scaling(ode, 3, 2.0, [0.5])
    h = 0.5
    u = _hand_recurrence(-0.5 * h, -0.8 * h, 0.3, 4, h * f[[0, 0, 1, 1]])
    yR = ts.carleman_trajectory(_scalar(-0.5 * h, -0.8 * h, 0.3, f0_t=(h * f[[0, 0, 1, 1]]).reshape(-1, 1)), 3, 4)
    assert out["error"][0] == pytest.approx(abs(u[-1] - yR[-1, 0]), rel=1e-10)
    assert np.isnan(float(out["slope"]))   # one step size: no order


def test_discreteness_scaling_with_two_steps_and_the_noise_rows():
    """Two step sizes are enough for an order (h = 0.1, 0.05: measured 1.06, as above).  With F0_t of
    2 rows and a horizon of 3 unit steps the third step reuses the last row: rows (0, 1, 1).  A step
    start within 1e-9 below an integer counts as that integer: h = 1 - 1.5e-9 gives starts 0,
    0.9999999985 and 1.999999997, i.e. rows (0, 0, 1) (a guard of 2e-9 would give (0, 1, 1))."""
    ode = _scalar(-0.5, -0.8, 0.3)
    out = ts.discreteness_scaling(ode, 8, 2.0, [0.1, 0.05])
    assert abs(float(out["slope"]) - 1.0) < 0.1
    f = np.array([0.1, -0.2])
    noisy = _scalar(-0.5, -0.8, 0.3, f0_t=f.reshape(-1, 1))
    out = ts.discreteness_scaling(noisy, 3, 3.0, [1.0])
    u = _hand_recurrence(-0.5, -0.8, 0.3, 3, f[[0, 1, 1]])
    yR = ts.carleman_trajectory(_scalar(-0.5, -0.8, 0.3, f0_t=f[[0, 1, 1]].reshape(-1, 1)), 3, 3)
    assert out["error"][0] == pytest.approx(abs(u[-1] - yR[-1, 0]), rel=1e-10)
    h = 1.0 - 1.5e-9
    out = ts.discreteness_scaling(noisy, 3, 3.0 * h, [h])
    errs = []
    for idx in ([0, 0, 1], [0, 1, 1]):
        rows = h * f[idx]
        u = _hand_recurrence(-0.5 * h, -0.8 * h, 0.3, 3, rows)
        yR = ts.carleman_trajectory(_scalar(-0.5 * h, -0.8 * h, 0.3, f0_t=rows.reshape(-1, 1)), 3, 3)
        errs.append(abs(u[-1] - yR[-1, 0]))
    assert abs(errs[0] - errs[1]) > 1e-3 * errs[0]   # the two readings are distinguishable
    assert out["error"][0] == pytest.approx(errs[0], rel=1e-10)


def test_discreteness_scaling_of_a_linear_map_is_zero():
    """A linear map (q = 1) is carried exactly by block 1 of its Carleman lift: every error is 0 and no
    order can be fitted (NaN, not a fit through log 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ts.discreteness_scaling(_scalar(-0.5, None, 0.3), 3, 2.0, [0.5, 0.25, 0.125])
    np.testing.assert_array_equal(out["error"], 0.0)
    assert np.isnan(float(out["slope"]))


def test_verdict_default_relative_tolerance_is_1e_9():
    assert ts.verdict(1.0 + 0.5e-9, 1.0) == "true"
    assert ts.verdict(1.0 + 1.5e-9, 1.0) == "false"


def test_r_number_refusals_by_hand():
    """R is stated for quadratic maps only: a cubic gets NaN with the reason; above n = 2000 the dense
    eigenvalues of F1 are not computed (n = 2001: NaN, "not evaluated"); the quadratic case of
    tests/test_carleman_discrete.py (R = 1.15 by hand) is evaluated."""
    F2 = np.zeros((2, 4))
    F2[0, 1] = 0.3
    quad = PolynomialODE(F=[sp.csr_matrix([[0.04], [0.0]]), sp.csr_matrix(np.diag([-0.5, -0.2])), sp.csr_matrix(F2)],
                         u_in=np.array([0.3, 0.4]))
    assert ts.r_number_pnas(quad)[0] == pytest.approx(1.15, rel=1e-13)
    cubic = PolynomialODE(F=list(quad.F) + [sp.csr_matrix((2, 8))], u_in=quad.u_in)
    R, note = ts.r_number_pnas(cubic)
    assert np.isnan(R) and note == "not defined: degree q = 3 (R is stated for quadratic equations)"
    n = 2001
    big = PolynomialODE(F=[sp.csr_matrix((n, 1)), sp.identity(n, format="csr") * -0.5, sp.csr_matrix((n, n * n))],
                        u_in=np.full(n, 0.01))
    R, note = ts.r_number_pnas(big)
    assert np.isnan(R) and note == "not evaluated: n > 2000 (dense eigenvalues of F1)"


def test_power_norms_against_numpy_matrix_power():
    """||(I+A)^t||_2, t = 0..T, against numpy.linalg.matrix_power and a 2-norm by SVD; t = 0 is ||I|| = 1."""
    rng = np.random.default_rng(5)
    IA = np.eye(3) + 0.3 * rng.standard_normal((3, 3))
    p = ts.power_norms(IA, 4)
    want = [np.linalg.svd(np.linalg.matrix_power(IA, t), compute_uv=False)[0] for t in range(5)]
    assert p.shape == (5,) and p[0] == 1.0
    np.testing.assert_allclose(p, want, rtol=1e-12)


def _quad(u_in, f0=(0.04, 0.0), f1=(-0.5, -0.2), f0_t=None) -> PolynomialODE:
    """The case of tests/test_carleman_discrete.py: ||F2|| = 0.3 (one entry), R by hand."""
    F2 = np.zeros((2, 4))
    F2[0, 1] = 0.3
    return PolynomialODE(F=[sp.csr_matrix(np.reshape(f0, (2, 1))), sp.csr_matrix(np.diag(f1)), sp.csr_matrix(F2)],
                         u_in=np.asarray(u_in, dtype=np.float64), F0_t=f0_t)


def test_r_number_cases_by_hand():
    """R = (||u_in|| ||F2|| + ||F0|| / ||u_in||) / |Re(lambda_1)| with ||F2|| = 0.3, lambda_1 = -0.2:

    - u_in = (0.6, 0.8), ||u|| = 1, ||F0|| = 0.04: R = (0.3 + 0.04) / 0.2 = 1.7;
    - F0_t rows (0, 0), (0, 0), (0.06, 0): ||F0(t)|| = 0.04, 0.04, 0.1; over all rows (T = None or
      T = 3) with ||u|| = 0.5: (0.15 + 0.2) / 0.2 = 1.75; over T = 2 rows: (0.15 + 0.08) / 0.2 = 1.15;
    - lambda_1 = 0 or 0.01: not dissipative, NaN; u_in = 0: NaN with F0 = 0, +inf with ||F0|| = 1."""
    assert ts.r_number_pnas(_quad([0.6, 0.8]))[0] == pytest.approx(1.7, rel=1e-13)
    rows = np.array([[0.0, 0.0], [0.0, 0.0], [0.06, 0.0]])
    noisy = _quad([0.3, 0.4], f0_t=rows)
    assert ts.r_number_pnas(noisy)[0] == pytest.approx(1.75, rel=1e-13)
    assert ts.r_number_pnas(noisy, 3)[0] == pytest.approx(1.75, rel=1e-13)
    assert ts.r_number_pnas(noisy, 2)[0] == pytest.approx(1.15, rel=1e-13)
    R, note = ts.r_number_pnas(_quad([0.3, 0.4]))
    assert note == "R = (||u_in|| ||F2|| + ||F0||/||u_in||) / |Re(lambda_1)|"
    for lam in (0.0, 0.01):
        R, note = ts.r_number_pnas(_quad([0.3, 0.4], f1=(-0.5, lam)))
        assert np.isnan(R) and note == f"not defined: Re(lambda_1) = {lam:.3g} >= 0 (F1 not dissipative)"
    R, note = ts.r_number_pnas(_quad([0.0, 0.0], f0=(0.0, 0.0)))
    assert np.isnan(R) and note == "not defined: u_in = 0 and F0 = 0"
    R, note = ts.r_number_pnas(_quad([0.0, 0.0], f0=(1.0, 0.0)))
    assert R == np.inf and note == "u_in = 0 with F0 != 0: ||F0||/||u_in|| is infinite"


def test_median_interval_narrowest_with_zero_coverage():
    """coverage = 0 accepts every k up to (m+1)/2: 10 points give k = 5, the interval [x_(5), x_(6)]
    (coverage 1 - 2 * 386/1024); 5 points give k = 3, the median itself (coverage 1 - 2 * 16/32 = 0)."""
    med, lo, hi, cov = ts.median_interval(np.arange(10.0), coverage=0.0)
    assert (lo, hi) == (4.0, 5.0) and cov == pytest.approx(1.0 - 2.0 * 386 / 1024, abs=1e-14)
    med, lo, hi, cov = ts.median_interval(np.arange(5.0), coverage=0.0)
    assert (lo, hi) == (2.0, 2.0) and cov == 0.0


def test_rate_agreement_band_edges_are_unresolved():
    """10 seeds, rtol 0.25: the interval is [x_(2), x_(9)].  Ratios (0.5, 0.5, 0.75 x 8) give
    [0.5, 0.75]: it touches the band at 0.75, so it is not entirely outside: unresolved.  Likewise
    (1.25 x 8, 1.5, 1.5) give [1.25, 1.5], touching 1.25."""
    one = np.ones(10)
    low = np.array([0.5, 0.5] + [0.75] * 8)
    high = np.array([1.25] * 8 + [1.5, 1.5])
    assert ts.rate_agreement(low, one, 100, rtol=0.25)["verdict"] == "unresolved"
    assert ts.rate_agreement(high, one, 100, rtol=0.25)["verdict"] == "unresolved"


def test_rate_agreement_reports_the_median_interval():
    """Ratios 0.91, 0.92, ..., 1.00 (predicted 1): median 0.955, interval [x_(2), x_(9)] = [0.92, 0.99]."""
    fitted = np.linspace(0.91, 1.0, 10)
    r = ts.rate_agreement(fitted, np.ones(10), 100)
    assert r["median"] == pytest.approx(0.955, rel=1e-14)
    assert r["low"] == pytest.approx(0.92, rel=1e-14) and r["high"] == pytest.approx(0.99, rel=1e-14)
