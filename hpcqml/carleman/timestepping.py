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
from hpcqml.carleman import spectra
from hpcqml.carleman.instance import PolynomialODE, carleman_dim, lift
from hpcqml.carleman.petsc_assembly import to_numpy_all
from hpcqml.errors import NumericalError


def solve_ksp(M: Any, B: Any, rtol: float = 1e-12, prefix: str = "qcm_",
              owner: spectra.PetscOwner | None = None) -> tuple[Any, int, int, str, str, float, float]:
    """Solve the distributed system M x = B with the suite's one KSP set-up (:func:`spectra.make_ksp`).

    Returns ``(x Vec, iterations, reason, ksp_type, pc_type, residual_norm, seconds)``; ``x`` belongs
    to ``owner`` when one is given, else to the caller.  The KSP belongs to ``owner`` (or is destroyed
    here).  Raises :class:`NumericalError` when KSP reports divergence (reason < 0).
    """
    local = spectra.PetscOwner()  # holds the KSP when no owner is given; closing it empty does nothing
    try:
        ksp = spectra.make_ksp(M, owner if owner is not None else local, rtol=rtol, prefix=prefix)
        x = M.createVecRight()
        if owner is not None:
            owner.own(x)
        t0 = time.perf_counter()
        try:
            spectra.checked_solve(ksp, B, x)
        except NumericalError:
            if owner is None:
                x.destroy()
            raise
        seconds = time.perf_counter() - t0
        return (x, int(ksp.getIterationNumber()), int(ksp.getConvergedReason()), ksp.getType(),
                ksp.getPC().getType(), float(ksp.getResidualNorm()), seconds)
    finally:
        local.close()


def petsc_forward_iteration(A: Any, b: np.ndarray, y0: np.ndarray, T: int) -> np.ndarray:
    """Forward iteration y(t+1) = (I+A) y(t) + b with distributed MatMult; (T+1) x Delta on every rank."""
    y = A.createVecRight()
    r0, r1 = y.getOwnershipRange()
    bl = A.createVecRight()
    bl.setArray(b[r0:r1])
    y.setArray(y0[r0:r1])
    out = np.empty((T + 1, y0.shape[0]))
    out[0] = y0
    tmp = y.duplicate()
    for t in range(T):
        A.mult(y, tmp)
        y.axpy(1.0, tmp)
        y.axpy(1.0, bl)
        out[t + 1] = to_numpy_all(y)
    for v in (y, tmp, bl):
        v.destroy()
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
        A, _ = assemble_carleman(ode, N, comm)
        out = petsc_forward_iteration(A, ref.carleman_rhs(ode, N), y0, T)
        A.destroy()
        return out
    out = np.empty((T + 1, y0.shape[0]), dtype=np.float64)
    out[0] = y0
    for t in range(T):
        A, _ = assemble_carleman(ode, N, comm, t=t)
        out[t + 1] = petsc_forward_iteration(A, ref.carleman_rhs(ode, N, t), out[t], 1)[1]
        A.destroy()
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
