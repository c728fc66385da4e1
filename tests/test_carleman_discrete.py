"""The exact Carleman lift of the discrete map (``[qcm] lift = "discrete"``), the PNAS R number,
eq. II.81 as printed and the three-valued bound flags, each against an independent computation."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse as sp
from mpi4py import MPI

from hpcqml.carleman import discrete
from hpcqml.carleman import generators as gen
from hpcqml.carleman import reference as ref
from hpcqml.carleman import timestepping as ts
from hpcqml.carleman.instance import PolynomialODE, carleman_dim, lift
from hpcqml.carleman.system import CarlemanCase
from hpcqml.errors import UserError

# logistic map of docs/science.md: u(t+1) = u - (u + u^2)/4, u(0) = 1/10 (all exact binary-free rationals)
F0, F1, F2, U0 = Fraction(0), Fraction(-1, 4), Fraction(-1, 4), Fraction(1, 10)


def _poly_mul(p: list[Fraction], q: list[Fraction]) -> list[Fraction]:
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def _exact_lift_scalar(N: int, f0: Fraction, f1: Fraction, f2: Fraction) -> list[list[Fraction]]:
    """P[j][k] = coefficient of u^k in g(u)^j, g(u) = f0 + (1 + f1) u + f2 u^2, in exact arithmetic."""
    g = [f0, 1 + f1, f2]
    P, power = [[Fraction(1)]], [Fraction(1)]
    for _ in range(N):
        power = _poly_mul(power, g)
        P.append(power + [Fraction(0)] * (N + 1))
    return P


def _ode_scalar(f0: float = 0.0) -> PolynomialODE:
    return PolynomialODE(F=[sp.csr_matrix([[f0]]), sp.csr_matrix([[float(F1)]]), sp.csr_matrix([[float(F2)]])],
                         u_in=np.array([float(U0)]))


def test_scalar_lift_equals_exact_polynomial_powers():
    """Both constructions (row generation and recursive Kronecker products) against Fraction arithmetic."""
    f0 = Fraction(1, 64)
    ode = _ode_scalar(float(f0))
    N = 6
    P = _exact_lift_scalar(N, f0, F1, F2)
    A_ref, b_ref = discrete.reference_matrix(ode, N)
    A_rows = discrete.lift_local_csr(ode, N, 0, N).toarray()
    b_rows = discrete.lift_rhs_local(ode, N, 0, N)
    for j in range(1, N + 1):
        assert b_ref[j - 1] == pytest.approx(float(P[j][0]), rel=1e-15, abs=0)
        assert b_rows[j - 1] == pytest.approx(float(P[j][0]), rel=1e-15, abs=0)
        for k in range(1, N + 1):
            want = float(P[j][k]) - (1.0 if j == k else 0.0)   # A_d = L - I
            # each entry is a sum of at most 3^j products of dyadic/small rationals: 1e-15 relative
            assert A_ref[j - 1, k - 1] == pytest.approx(want, rel=1e-15, abs=1e-16)
            assert A_rows[j - 1, k - 1] == pytest.approx(want, rel=1e-15, abs=1e-16)


def test_scalar_truncated_lift_error_falls_geometrically_and_paper_lift_does_not():
    """Exact-arithmetic iteration of the map and of the truncated lift: the error falls by >= 8x per order
    (the map contracts, g'(0) = 3/4); the paper's lift keeps its discreteness floor (>= 3e-4)."""
    T = 10
    u = [U0]
    for _ in range(T):
        u.append(u[-1] + F0 + F1 * u[-1] + F2 * u[-1] ** 2)
    errors = []
    for N in range(1, 9):
        P = _exact_lift_scalar(N, F0, F1, F2)
        y = [U0**k for k in range(N + 1)]
        worst = Fraction(0)
        for t in range(T):
            y = [Fraction(1)] + [sum(P[j][k] * y[k] for k in range(N + 1)) for j in range(1, N + 1)]
            worst = max(worst, abs(y[1] - u[t + 1]))
        errors.append(float(worst))
        # the float64 kernel reproduces the exact truncated lift (errors ~1e-17 against values ~0.1)
        traj = discrete.trajectory(_ode_scalar(), N, T)[:, 0]
        assert np.max(np.abs(traj - np.array([float(v) for v in u]))) == pytest.approx(float(worst), rel=1e-6)
    ratios = np.array(errors[1:]) / np.array(errors[:-1])
    assert np.all(ratios < 1 / 8), ratios          # measured 0.056 ... 0.088
    ode = gen.logistic(1.0, 1.0, 0.1, h=0.25)
    exact = ref.exact_recurrence(ode, T)
    for N in (4, 8, 10):
        paper = ref.forward_iteration(ref.carleman_matrix(ode, N), ref.carleman_rhs(ode, N), lift(ode.u_in, N), T)
        assert np.max(np.abs(paper[:, 0] - exact[:, 0])) > 3e-4     # measured 3.47e-4 for N >= 4


def _random_ode(n: int, q: int, seed: int, f0: bool = True) -> PolynomialODE:
    rng = np.random.default_rng(seed)
    F = [sp.csr_matrix(rng.uniform(-0.05, 0.05, (n, 1)) if f0 else np.zeros((n, 1)))]
    for ell in range(1, q + 1):
        F.append(sp.csr_matrix(rng.uniform(-0.2, 0.2, (n, n**ell)) * (rng.random((n, n**ell)) < 0.6)))
    return PolynomialODE(F=F, u_in=rng.uniform(-0.2, 0.2, n))


@pytest.mark.parametrize("n,q,N", [(2, 2, 3), (3, 2, 3), (2, 3, 4)])
def test_row_generation_equals_recursive_kronecker_reference(n, q, N):
    """Rows generated per range (as each rank does) equal the recursive sp.kron construction exactly."""
    ode = _random_ode(n, q, seed=n + 10 * q)
    A, b = discrete.reference_matrix(ode, N)
    D = carleman_dim(n, N)
    cuts = [0, 1, D // 3, D // 2 + 1, D]
    ranges = list(zip(cuts[:-1], cuts[1:], strict=True))
    rows = sp.vstack([discrete.lift_local_csr(ode, N, lo, hi) for lo, hi in ranges]).tocsr()
    rhs = np.concatenate([discrete.lift_rhs_local(ode, N, lo, hi) for lo, hi in ranges])
    # the same products summed in a different order: a few ulps of entries <= (1.2)^N
    assert abs(rows - A).max() <= 1e-14
    np.testing.assert_allclose(rhs, b, rtol=0, atol=1e-16)


def test_first_block_and_linear_maps_are_exact():
    """Block 1 of L y(u) + c is g(u) exactly once N >= q; for a linear map (F2 = 0) every block is exact."""
    ode = _random_ode(3, 2, seed=4)
    u = ode.u_in
    A, b = discrete.reference_matrix(ode, 2)
    y = lift(u, 2)
    np.testing.assert_allclose((y + A @ y + b)[:3], u + ode.rhs(u), rtol=1e-14, atol=1e-16)
    lin = PolynomialODE(F=[ode.F[0], ode.F[1], sp.csr_matrix((3, 9))], u_in=u)
    T = 6
    exact = ref.exact_recurrence(lin, T)
    traj = discrete.trajectory(lin, 3, T)
    want = np.array([lift(exact[t], 3) for t in range(T + 1)])
    np.testing.assert_allclose(traj, want, rtol=1e-12, atol=1e-15)
    paper = ref.forward_iteration(ref.carleman_matrix(lin, 3), ref.carleman_rhs(lin, 3), lift(u, 3), T)
    assert np.max(np.abs(paper[:, 3:] - want[:, 3:])) > 1e-6   # the paper lift misses du (x) du


def test_ksp_of_both_lifts_on_one_rank_and_noise():
    """CarlemanCase with either lift solves M X = B to the forward iteration of that lift (also with F0(t))."""
    ode = gen.with_f0_noise(gen.scale_step(gen.random_quadratic(3, 0.5, 2, u_scale=0.1), 0.25), 1e-3, 6, 3)
    T, N = 6, 3
    for kind, want in (("paper", ref.forward_iteration_t(ode, N, T)), ("discrete", discrete.trajectory(ode, N, T))):
        with CarlemanCase(ode, N, T, MPI.COMM_SELF, lift_kind=kind) as case:
            X = case.solve().X
        # KSP rtol 1e-12 on a unit lower-triangular M (exact ILU): rounding only
        np.testing.assert_allclose(X, want, rtol=0, atol=1e-13)
    with pytest.raises(UserError, match="lift"):
        CarlemanCase(ode, N, T, MPI.COMM_SELF, lift_kind="euler")


def test_discrete_residual_bound_holds_and_is_pure_truncation():
    ode = gen.logistic(1.0, 1.0, 0.1, h=0.25)
    u = ref.exact_recurrence(ode, 10)
    res = discrete.residuals(ode, 4, u)
    A, b = discrete.reference_matrix(ode, 4)
    norm_L = float(np.linalg.norm(np.eye(4) + A.toarray(), 2))
    B = ts.discrete_bound(norm_L, res["residual"])
    eta = np.abs(np.array([lift(u[t], 4) for t in range(11)]) - discrete.trajectory(ode, 4, 10)).max(axis=1)
    assert np.all(eta <= B + 1e-15) and np.all(res["discreteness"] == 0.0)   # max-abs <= 2-norm <= B(t)


# --- R number of Liu et al. (PNAS 2021) ---

def test_r_number_by_hand():
    """n = 2, F1 = diag(-0.5, -0.2), ||F2|| = 0.3 (one entry), F0 = (0.04, 0), u_in = (0.3, 0.4):
    R = (0.5 * 0.3 + 0.04 / 0.5) / 0.2 = 1.15; invariant under F_l -> eta F_l."""
    F2 = np.zeros((2, 4))
    F2[0, 1] = 0.3
    ode = PolynomialODE(F=[sp.csr_matrix([[0.04], [0.0]]), sp.csr_matrix(np.diag([-0.5, -0.2])), sp.csr_matrix(F2)],
                        u_in=np.array([0.3, 0.4]))
    R, note = ts.r_number_pnas(ode)
    assert R == pytest.approx(1.15, rel=1e-13) and "Re(lambda_1)" in note
    assert ts.r_number_pnas(gen.scale_step(ode, 0.1))[0] == pytest.approx(1.15, rel=1e-13)
    noisy = gen.with_f0_noise(ode, 0.01, 5, 0)
    f0max = max(np.linalg.norm(noisy.f0(t)) for t in range(5))
    assert ts.r_number_pnas(noisy, 5)[0] == pytest.approx((0.15 + f0max / 0.5) / 0.2, rel=1e-13)
    grow = PolynomialODE(F=[ode.F[0], sp.csr_matrix(np.diag([-0.5, 0.01])), ode.F[2]], u_in=ode.u_in)
    assert np.isnan(ts.r_number_pnas(grow)[0])
    assert np.isinf(ts.r_number_pnas(PolynomialODE(F=list(ode.F), u_in=np.zeros(2)))[0])
    cubic = gen.logistic(1.0, 1.0, 0.1, cubic=0.5)
    assert np.isnan(ts.r_number_pnas(cubic)[0])


# --- eq. II.81 as printed and the flags ---

def test_power_norms_against_matrix_power_and_inverse_of_M():  # noqa: N802 - paper notation
    """||(I+A)^t|| by repeated products equals numpy's matrix_power; sum_t ||(I+A)^t|| bounds ||M^-1||
    and is no larger than sum_t ||I+A||^t (submultiplicativity)."""
    ode = gen.scale_step(gen.random_quadratic(2, 0.5, 1, u_scale=0.1), 0.5)
    N, T = 2, 8
    IA = np.eye(carleman_dim(2, N)) + ref.carleman_matrix(ode, N).toarray()
    p = ts.power_norms(IA, T)
    want = [np.linalg.norm(np.linalg.matrix_power(IA, t), 2) for t in range(T + 1)]
    np.testing.assert_allclose(p, want, rtol=1e-12)
    M, _ = ref.block_system(ref.carleman_matrix(ode, N), ode, N, T)
    inv_norm = 1.0 / np.linalg.svd(M.toarray(), compute_uv=False)[-1]
    loose = sum(np.linalg.norm(IA, 2) ** t for t in range(T + 1))
    assert inv_norm <= p.sum() * (1 + 1e-12) and p.sum() <= loose * (1 + 1e-12)


def test_verdict_is_three_valued_and_never_true_by_default():
    assert ts.verdict(1.0, 2.0) == "true" and ts.verdict(3.0, 2.0) == "false"
    assert ts.verdict(1.0, float("nan")) == "not evaluated"      # sigma_min never computed
    assert ts.verdict(1.0, float("inf")) == "not evaluated"      # vacuous
    assert ts.verdict(float("nan"), 1.0) == "not evaluated"
    assert ts.verdict(np.array([1.0, 2.5]), np.array([2.0, 2.0])) == "false"
    assert ts.verdict(np.zeros(0), np.zeros(0)) == "not evaluated"
