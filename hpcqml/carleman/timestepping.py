"""Time stepping of the Carleman system: one KSP solve of M X = B (eq. II.79), forward iteration
(eq. II.78), the exact nonlinear recurrence (eq. II.1), linearisation errors (eq. II.8), the
bound of eq. II.57 with the order of eq. II.60, and the truncation/discreteness split of Sec. V B.

Solver choice.  In the natural ordering M is *lower triangular with unit diagonal*: every entry
of -(I+A) sits in block row t, block column t-1 < t.  ILU(0) of a lower-triangular matrix is the
exact factorisation (L = M, U = I), so on one rank PCILU makes M^{-1} exact and GMRES stops after
one iteration.  On p ranks we use PCBJACOBI with ILU(0) on each rank's diagonal block: the
preconditioned operator is I - K with K strictly block-lower-triangular over the p rank blocks,
hence nilpotent of index <= p, and GMRES converges in at most p iterations (up to rounding).
Everything can be changed with ``-qcm_ksp_type``/``-qcm_pc_type`` etc. (``setFromOptions``).
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from hpcqml.carleman import reference as ref
from hpcqml.carleman.instance import PolynomialODE, carleman_dim, lift
from hpcqml.petsc import PetscOwner, checked_solve, make_ksp, to_numpy_all, vec_for


def solve_ksp(M: Any, B: Any, rtol: float = 1e-12, prefix: str = "qcm_",
              owner: PetscOwner | None = None) -> tuple[Any, int, int, str, str, float, float]:
    """Solve the distributed system M x = B with the suite's one KSP set-up (:func:`hpcqml.petsc.make_ksp`).

    Args:
        M: the assembled matrix (eq. II.79).
        B: the right-hand side.
        rtol: relative residual tolerance.
        prefix: options prefix of the KSP, its PC and x (``-{prefix}ksp_*``, ``-{prefix}pc_*``, ``-{prefix}vec_*``).
        owner: owns the KSP and x from their creation on; None: the KSP is destroyed here and x
            belongs to the caller.

    Returns:
        ``(x Vec, iterations, reason, ksp_type, pc_type, residual_norm, seconds)``.

    Raises:
        NumericalError: the KSP diverged (one line naming the prefix and the reason).
    """
    solver = PetscOwner()   # the KSP when no owner is given
    result = PetscOwner()   # x when no owner is given: destroyed only on failure
    try:
        ksp = make_ksp(M, owner if owner is not None else solver, rtol=rtol, prefix=prefix)
        x = vec_for(M, owner if owner is not None else result, prefix, "right")
        t0 = time.perf_counter()
        checked_solve(ksp, B, x)
        seconds = time.perf_counter() - t0
        return (x, int(ksp.getIterationNumber()), int(ksp.getConvergedReason()), ksp.getType(),
                ksp.getPC().getType(), float(ksp.getResidualNorm()), seconds)
    except BaseException:
        result.close()
        raise
    finally:
        solver.close()


def petsc_forward_iteration(A: Any, b: np.ndarray, y0: np.ndarray, T: int) -> np.ndarray:
    """Forward iteration y(t+1) = (I+A) y(t) + b with distributed MatMult; (T+1) x Delta on every rank."""
    with PetscOwner() as owner:
        y = owner.own(A.createVecRight())
        r0, r1 = y.getOwnershipRange()
        bl = owner.own(A.createVecRight())
        bl.setArray(b[r0:r1])
        y.setArray(y0[r0:r1])
        out = np.empty((T + 1, y0.shape[0]))
        out[0] = y0
        tmp = owner.own(y.duplicate())
        for t in range(T):
            A.mult(y, tmp)
            y.axpy(1.0, tmp)
            y.axpy(1.0, bl)
            out[t + 1] = to_numpy_all(y)
    return out


def petsc_forward_iteration_t(ode: PolynomialODE, N: int, T: int, comm: Any) -> np.ndarray:
    """y(t+1) = (I + A(t)) y(t) + b(t) with distributed A(t) (eq. II.78 with F0(t)); (T+1) x Delta.

    A(t) is assembled for every step (on the pattern shared by all t); without a time-varying
    constant term this is :func:`petsc_forward_iteration` with the constant A.
    """
    from hpcqml.carleman.petsc_assembly import assemble_carleman

    ode.check_horizon(T)
    y0 = lift(ode.u_in, N)
    if ode.F0_t is None:
        with PetscOwner() as owner:
            A, _ = assemble_carleman(ode, N, comm, owner=owner)
            return petsc_forward_iteration(A, ref.carleman_rhs(ode, N), y0, T)
    out = np.empty((T + 1, y0.shape[0]), dtype=np.float64)
    out[0] = y0
    for t in range(T):
        with PetscOwner() as owner:
            A, _ = assemble_carleman(ode, N, comm, t=t, owner=owner)
            out[t + 1] = petsc_forward_iteration(A, ref.carleman_rhs(ode, N, t), out[t], 1)[1]
    return out


def stability_number(ode: PolynomialODE, N: int) -> float:
    """N * ||F1||_2: the Euler-type stepping of the Carleman system is only stable while <= ~1."""
    return float(N * ode.norms()[1])


def check_stability(ode: PolynomialODE, N: int) -> bool:
    """Warn (``RuntimeWarning``) when N * ||F1||_2 > 1; returns True when the check passes."""
    val = stability_number(ode, N)
    if val > 1.0:
        warnings.warn(f"Carleman stepping may be unstable: N*||F1||_2 = {val:.3g} > 1", RuntimeWarning, stacklevel=2)
        return False
    return True


def bound_II57(N: int, A_norm_inv: float, u_bar: float, F_norms: np.ndarray) -> float:  # noqa: N802 - eq. II.57
    """||eta(T)|| <= 3 N ||A||^{-1} ||u_bar||^{N+1} sum_{l>=2} (l-1) ||F_l|| (eq. II.57)."""
    s = sum((ell - 1) * F_norms[ell] for ell in range(2, len(F_norms)))
    if s == 0.0 or u_bar == 0.0:
        return 0.0
    with np.errstate(over="ignore"):
        return float(3.0 * N * A_norm_inv * np.power(np.float64(u_bar), N + 1) * s)


def order_II60(eps: float, A_norm: float, u_bar: float, F_norms: np.ndarray) -> float:  # noqa: N802 - eq. II.60
    """Smallest N of eq. II.60: N >= 2/log(1/||u_bar||) log(3 sum (l-1)||F_l|| / (||A|| eps)).

    Returns NaN when ||u_bar|| >= 1 (eq. II.54 fails) and 1 when the log argument is <= 1.
    """
    if not 0.0 < u_bar < 1.0:
        return float("nan")
    s = sum((ell - 1) * F_norms[ell] for ell in range(2, len(F_norms)))
    arg = 3.0 * s / (A_norm * eps)
    if arg <= 1.0:
        return 1.0
    return float(np.ceil(2.0 / np.log(1.0 / u_bar) * np.log(arg)))


def carleman_trajectory(ode: PolynomialODE, N: int, T: int) -> np.ndarray:
    """y_1(t), t = 0..T, of the order-N Carleman system by serial forward iteration, (T+1) x n.

    Uses A(t), b(t) when the constant term varies with t.
    """
    return ref.forward_iteration_t(ode, N, T)[:, : ode.n]


def error_split(ode: PolynomialODE, N: int, N_ref: int, T: int, u: np.ndarray | None = None,
                yR: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Split u(t) - y_1^{(N)}(t) into truncation and discreteness parts (Sec. V B, eq. V.20-V.22).

    truncation(t)   = y_1^{(N_ref)}(t) - y_1^{(N)}(t)  (N_ref large stands in for N -> infinity: the
                                                       linearisation error of the Carleman stepping itself)
    discreteness(t) = u(t) - y_1^{(N_ref)}(t)          (Carleman stepping with I+A is forward Euler of
                                                       the continuous-time lift, eq. V.20-V.22)
    ``u`` (exact recurrence) and ``yR`` (order-N_ref trajectory) may be passed when already computed.
    Returns (T+1) x n arrays ``total``, ``truncation``, ``discreteness``.
    """
    u = ref.exact_recurrence(ode, T) if u is None else u
    yR = carleman_trajectory(ode, N_ref, T) if yR is None else yR
    yN = carleman_trajectory(ode, N, T)
    return {"total": u - yN, "truncation": yR - yN, "discreteness": u - yR}


def lifted_residuals(ode: PolynomialODE, N: int, u: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step residual of the exact trajectory in the order-N Carleman stepping, and its two parts.

    r(t) = ŷ(u(t+1)) - (I + A) ŷ(u(t)) - b with ŷ(u) = (u, u⊗u, ..., u^{⊗N}) (eq. II.7), so the
    lifted error η(t) = ŷ(u(t)) - y(t) obeys η(t+1) = (I + A) η(t) + r(t), η(0) = 0 exactly.
    The truncation part is what the neglected blocks j > N feed into blocks j <= N (eq. II.50);
    the rest is the discreteness term δζ of eq. V.21-V.22 (products of increments δu).

    Returns ``residual``, ``truncation``, ``discreteness``: 2-norms per step t = 0..T-1 (float64).
    Time-varying constant terms use A(t), b(t).
    """
    T = u.shape[0] - 1
    q = ode.q
    D = carleman_dim(ode.n, N)
    big = N + max(q - 1, 0)
    out = {k: np.zeros(T, dtype=np.float64) for k in ("residual", "truncation", "discreteness")}
    const = ode.F0_t is None
    A_N = ref.carleman_matrix(ode, N) if const else None
    A_big = ref.carleman_matrix(ode, big) if const else None
    for t in range(T):
        if not const:
            A_N, A_big = ref.carleman_matrix(ode, N, t), ref.carleman_matrix(ode, big, t)
        b = ref.carleman_rhs(ode, N, t if not const else None)
        lo, hi = lift(u[t], big), lift(u[t + 1], N)
        step = hi - lo[:D] - A_N @ lo[:D] - b
        trunc = (A_big @ lo)[:D] - A_N @ lo[:D]
        out["residual"][t] = np.linalg.norm(step)
        out["truncation"][t] = np.linalg.norm(trunc)
        out["discreteness"][t] = np.linalg.norm(step - trunc)
    return out


def discrete_bound(norm_IA: float, residual_norms: np.ndarray) -> np.ndarray:
    """A posteriori bound of the discrete map: ||η(t)|| <= B(t) = sum_{s<t} ||I+A||^{t-1-s} ||r(s)||.

    Follows from η(t+1) = (I + A) η(t) + r(t), η(0) = 0 (:func:`lifted_residuals`) by the triangle
    inequality; unlike eq. II.57 it includes the discreteness residual (eq. V.21-V.22).
    Returns B(t), t = 0..T (float64).
    """
    out = np.zeros(residual_norms.shape[0] + 1, dtype=np.float64)
    for t, r in enumerate(residual_norms):
        out[t + 1] = norm_IA * out[t] + r
    return out


def fit_late_rate(err: np.ndarray, late_fraction: float) -> tuple[float, float, int, int]:
    """Slope of log(err(t)) over the last ``late_fraction`` of t = 0..T by least squares.

    Entries that are zero or not finite are left out.  Returns ``(slope, standard error, t0, t1)``
    (per step; NaN slope with fewer than 3 usable points, NaN error with exactly 3 collinear ones).
    """
    T = err.shape[0] - 1
    t0 = int(np.floor((1.0 - late_fraction) * T))
    t = np.arange(t0, T + 1, dtype=np.float64)
    e = np.abs(np.asarray(err[t0:], dtype=np.float64))
    keep = np.isfinite(e) & (e > 0)
    if keep.sum() < 3:
        return float("nan"), float("nan"), t0, T
    x, y = t[keep], np.log(e[keep])
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    resid = y - y.mean() - slope * xc
    se = float(np.sqrt(np.dot(resid, resid) / (x.size - 2) / np.dot(xc, xc)))
    return slope, se, t0, T


def predicted_rate(a: np.ndarray, N: int) -> tuple[float, float]:
    """(ρ, predicted late-time rate of the order-N linearisation error) from the eigenvalues a of F1.

    ρ = max log|1 + a| is the growth (ρ > 0, a divergent mode) or the decay (ρ < 0, the slowest
    dissipative mode) per step of the linear part of the map (eq. II.28 with a = -ηλ, eq. II.65).
    The error is O(|u|^{N+1}) (eq. II.50-II.52): when a mode diverges, u^{⊗(N+1)} and hence the
    error grow like |1 + a|^{(N+1) t}, rate (N+1)ρ; when all modes decay, the error of y_1 is
    carried at late times by the slowest mode of the first block, rate ρ.
    """
    with np.errstate(divide="ignore"):
        rho = float(np.max(np.log(np.abs(1.0 + np.asarray(a)))))
    return rho, (N + 1) * rho if rho > 0 else rho


def discreteness_scaling(ode: PolynomialODE, N_ref: int, horizon: float, steps: list[float]) -> dict[str, np.ndarray]:
    """Discreteness error at the fixed time ``horizon`` for step sizes h (F_l -> h F_l, horizon/h steps).

    Returns ``h``, ``error`` (max-abs over coordinates at the final step) and the fitted order
    ``slope`` of log(error) vs log(h) (expected ~1: each step misses the O(h^2) term du (x) du).
    A time-varying constant term is refined piecewise constant: step k of size h uses
    h * F0_t[floor(k h)] (unit steps beyond T_max reuse the last row).
    """
    from hpcqml.carleman.generators import scale_step

    hs, errs = [], []
    for h in steps:
        Th = int(round(horizon / h))
        sc = scale_step(ode, h)
        if ode.F0_t is not None:  # noise held constant over each unit step: F0_t(k h) = F0_t[floor(k h)]
            idx = np.minimum(np.floor(np.arange(Th) * h + 1e-9).astype(np.int64), ode.F0_t.shape[0] - 1)
            sc = PolynomialODE(F=sc.F, u_in=sc.u_in, meta=sc.meta, F0_t=h * ode.F0_t[idx])
        u = ref.exact_recurrence(sc, Th)
        yR = carleman_trajectory(sc, N_ref, Th)
        hs.append(h)
        errs.append(float(np.max(np.abs(u[-1] - yR[-1]))))
    hs_a, e_a = np.array(hs), np.array(errs)
    good = e_a > 0
    slope = float(np.polyfit(np.log(hs_a[good]), np.log(e_a[good]), 1)[0]) if good.sum() >= 2 else float("nan")
    return {"h": hs_a, "error": e_a, "slope": np.array(slope)}


#: the three values of every ``holds_*`` flag of the qcm stage
NOT_EVALUATED = "not evaluated"


def verdict(measured: float | np.ndarray, bound: float | np.ndarray, atol: float = 0.0, rtol: float = 1e-9) -> str:
    """"true" when measured <= bound (1 + rtol) + atol everywhere, "false" when not, "not evaluated" when
    either side is NaN or the bound is not finite (a bound of +inf holds vacuously and is not reported as held).

    Args:
        measured: the measured quantity (scalar or array).
        bound: the bound (same shape or scalar).
        atol: absolute tolerance (resolution of the measurement).
        rtol: relative tolerance on the bound.

    Returns:
        One of "true", "false", :data:`NOT_EVALUATED`.
    """
    m = np.asarray(measured, dtype=np.float64)
    b = np.asarray(bound, dtype=np.float64)
    if m.size == 0 or b.size == 0 or np.any(np.isnan(m)) or not np.all(np.isfinite(b)):
        return NOT_EVALUATED
    return "true" if bool(np.all(m <= b * (1.0 + rtol) + atol)) else "false"


def r_number_pnas(ode: PolynomialODE, T: int | None = None) -> tuple[float, str]:
    """The convergence parameter R of Liu et al., PNAS 118 (35), e2026805118 (2021), for quadratic maps.

    For du/dt = F_2 u^{(x)2} + F_1 u + F_0(t), u(0) = u_in, with F_1 diagonalisable and its
    eigenvalue lambda_1 of largest real part satisfying Re(lambda_1) < 0,

        R = ( ||u_in|| ||F_2|| + ||F_0|| / ||u_in|| ) / |Re(lambda_1)|,

    spectral norms, ||F_0|| = max_t ||F_0(t)||; their Carleman truncation converges for R < 1, and they
    show the problem is hard for R >= sqrt(2).  Here the F_l are the per-step coefficients of eq. II.1
    (R is unchanged by F_l -> eta F_l).

    Sources checked for this definition: the published abstract (pnas.org/doi/10.1073/pnas.2026805118:
    R is "the ratio of the nonlinearity and forcing to the linear dissipation", R < 1 for the algorithm,
    hardness for R >= sqrt(2)); the script by co-author H. Kolden that reproduces the paper's Burgers
    results (github.com/hermankolden/CarlemanBurgers, carleman_burgers.m), which computes exactly
    ``R = (norm(u0)*norm(F2) + max_t norm(F0(t))/norm(u0)) / abs(lambda_1)`` with MATLAB's spectral
    ``norm`` and lambda_1 the largest eigenvalue of F_1; and the first arXiv version (2011.03185v1),
    whose R has no forcing term, ||u_in|| ||F_2|| / |Re(lambda_1)|, the F_0 = 0 case of the formula above,
    as JuliaReach's CarlemanLinearization.jl implements it (src/error_bounds.jl).

    Args:
        ode: the instance.
        T: steps over which a time-varying F_0(t) is maximised (None: all of F0_t).

    Returns:
        ``(R, note)``: NaN with the reason when R is not defined (degree q != 2, Re(lambda_1) >= 0, F_1
        too large for dense eigenvalues, u_in = 0 with F_0 = 0); +inf when u_in = 0 and F_0 != 0.
    """
    if ode.q != 2:
        return float("nan"), f"not defined: degree q = {ode.q} (R is stated for quadratic equations)"
    if ode.n > 2000:
        return float("nan"), "not evaluated: n > 2000 (dense eigenvalues of F1)"
    lam1 = float(np.max(np.real(np.linalg.eigvals(ode.F[1].toarray()))))
    if not lam1 < 0.0:
        return float("nan"), f"not defined: Re(lambda_1) = {lam1:.3g} >= 0 (F1 not dissipative)"
    norms = ode.norms()
    f0 = norms[0]
    if ode.F0_t is not None:
        steps = ode.F0_t.shape[0] if T is None else min(T, ode.F0_t.shape[0])
        f0 = max(float(np.linalg.norm(ode.f0(t))) for t in range(steps))
    u = float(np.linalg.norm(ode.u_in))
    if u == 0.0:
        if f0 == 0.0:
            return float("nan"), "not defined: u_in = 0 and F0 = 0"
        return float("inf"), "u_in = 0 with F0 != 0: ||F0||/||u_in|| is infinite"
    return float((u * norms[2] + f0 / u) / abs(lam1)), "R = (||u_in|| ||F2|| + ||F0||/||u_in||) / |Re(lambda_1)|"


def power_norms(IA: np.ndarray, T: int) -> np.ndarray:
    """||(I+A)^t||_2 for t = 0..T by repeated dense products (the terms of eq. II.81 as printed).

    Args:
        IA: the dense matrix I + A (Delta x Delta, float64).
        T: largest power.

    Returns:
        float64 array of length T + 1 (the t = 0 entry is ||I|| = 1).
    """
    P = np.eye(IA.shape[0], dtype=np.float64)
    out = np.empty(T + 1, dtype=np.float64)
    for t in range(T + 1):
        out[t] = float(np.linalg.norm(P, 2))
        P = IA @ P
    return out


#: a fitted late-time rate agrees with its prediction when the interval of the median ratio lies within 15 %
RATE_RTOL = 0.15


def median_interval(values: np.ndarray, coverage: float = 0.9) -> tuple[float, float, float, float]:
    """Median of ``values`` with a distribution-free interval from order statistics.

    The interval [x_(k), x_(m+1-k)] of the sorted sample covers the population median with probability
    1 - 2 P(Bin(m, 1/2) <= k - 1); k is the largest index whose coverage is still >= ``coverage``
    (k = 1, the sample range, when even that falls short).  It is the spread over independent draws,
    not a residual-based error of one fit.

    Args:
        values: finite sample (e.g. fitted/predicted rate ratios, one per seed).
        coverage: wanted two-sided coverage.

    Returns:
        ``(median, low, high, achieved coverage)``; NaNs for an empty sample.
    """
    from math import comb

    x = np.sort(np.asarray(values, dtype=np.float64))
    m = x.size
    if m == 0:
        return (float("nan"),) * 4
    cdf = np.cumsum([comb(m, i) for i in range(m + 1)]) / 2.0**m   # P(Bin(m, 1/2) <= i)
    k, achieved = 1, 1.0 - 2.0 * cdf[0]
    for kk in range(2, (m + 1) // 2 + 1):
        cov = 1.0 - 2.0 * cdf[kk - 1]
        if cov < coverage:
            break
        k, achieved = kk, cov
    return float(np.median(x)), float(x[k - 1]), float(x[m - k]), float(achieved)


def rate_agreement(fitted: np.ndarray, predicted: np.ndarray, window_steps: int,
                   rtol: float = RATE_RTOL) -> dict[str, float | str]:
    """Verdict on fitted late-time rates against their predictions over seeds (Fig. 4).

    Per seed the ratio fitted / predicted; its median with the order-statistic interval of
    :func:`median_interval`.  "agrees" when the whole interval lies in [1 - rtol, 1 + rtol]
    (a factor of 1.3 cannot pass), "disagrees" when it lies entirely outside, "unresolved" when it
    straddles a band edge, "horizon too short to tell" when the fit window spans less than one e-fold
    of the median predicted rate (window_steps * |rate| < 1), "not evaluated" with fewer than 3 seeds.

    Args:
        fitted: fitted rates per seed (NaN where not fitted).
        predicted: predicted rates per seed.
        window_steps: length of the fit window in steps.
        rtol: relative tolerance of the agreement band.

    Returns:
        ``verdict``, ``median``, ``low``, ``high`` (of the ratio), ``coverage``, ``efolds``, ``seeds``.
    """
    f = np.asarray(fitted, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    ok = np.isfinite(f) & np.isfinite(p) & (p != 0)
    ratio = f[ok] / p[ok]
    med, lo, hi, cov = median_interval(ratio)
    efolds = float(window_steps * np.median(np.abs(p[ok]))) if ok.any() else float("nan")
    if ratio.size < 3:
        verdict = NOT_EVALUATED + f" ({ratio.size} seed(s) with a fitted rate, need 3)"
    elif efolds < 1.0:
        verdict = "horizon too short to tell"
    elif lo >= 1.0 - rtol and hi <= 1.0 + rtol:
        # the order-statistic interval covers the median with probability ``cov`` only; with
        # few seeds (3 seeds: 75 %) that is no statistical support for "agrees"
        verdict = "agrees" if cov >= 0.9 else f"unresolved (interval coverage {cov:.0%} < 90 %; more seeds)"
    elif hi < 1.0 - rtol or lo > 1.0 + rtol:
        verdict = "disagrees"
    else:
        verdict = "unresolved"
    return {"verdict": verdict, "median": med, "low": lo, "high": hi, "coverage": cov, "efolds": efolds,
            "seeds": float(ratio.size)}
