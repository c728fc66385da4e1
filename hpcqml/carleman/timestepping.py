"""Time stepping of the Carleman system: one KSP solve of M X = B (eq. II.79), forward iteration
(eq. II.78), the exact nonlinear recurrence (eq. II.1), linearisation errors (eq. II.8), the
bound of eq. II.57 with the order of eq. II.60, and the truncation/discreteness split of Sec. V B.

Solver choice.  In the natural ordering M is *lower triangular with unit diagonal*: every entry
of -(I+A) sits in block row t, block column t-1 < t.  ILU(0) of a lower-triangular matrix is the
exact factorisation (L = M, U = I), so on one rank PCILU makes M^{-1} exact and GMRES stops after
one iteration.  On p ranks we use PCBJACOBI with ILU(0) on each rank's diagonal block: the
preconditioned operator is I - K with K strictly block-lower-triangular over the p rank blocks,
hence nilpotent of index <= p, and GMRES converges in at most p iterations (up to rounding).
Everything can be changed with ``-ksp_type``/``-pc_type`` etc. (``setFromOptions``).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from hpcqml.carleman import reference as ref
from hpcqml.carleman.instance import PolynomialODE, carleman_dim, lift
from hpcqml.carleman.petsc_assembly import AssemblyStats, assemble_block_system, to_numpy_all
from hpcqml.errors import NumericalError


@dataclass
class SolveResult:
    """Solution of M X = B as a (T+1) x Delta float64 array (on every rank) plus solver facts."""

    X: np.ndarray
    iterations: int
    reason: int
    ksp_type: str
    pc_type: str
    residual_norm: float
    solve_seconds: float
    stats: AssemblyStats


def solve_ksp(M, B, rtol: float = 1e-12, options_prefix: str = ""):
    """Solve the distributed system M x = B with KSP (GMRES + block Jacobi/ILU(0), see module doc).

    Returns ``(x Vec, iterations, reason, ksp_type, pc_type, residual_norm, seconds)``; raises
    :class:`NumericalError` when KSP reports divergence (reason < 0).
    """
    from petsc4py import PETSc

    ksp = PETSc.KSP().create(comm=M.getComm())
    ksp.setOperators(M)
    ksp.setType("gmres")
    ksp.getPC().setType("bjacobi" if M.getComm().getSize() > 1 else "ilu")
    ksp.setTolerances(rtol=rtol, atol=0.0, max_it=1000)
    if options_prefix:
        ksp.setOptionsPrefix(options_prefix)
    ksp.setFromOptions()
    x = M.createVecRight()
    t0 = time.perf_counter()
    ksp.solve(B, x)
    seconds = time.perf_counter() - t0
    reason = int(ksp.getConvergedReason())
    if reason < 0:
        raise NumericalError(f"KSP did not converge (reason {reason}) after {ksp.getIterationNumber()} iterations")
    out = (x, int(ksp.getIterationNumber()), reason, ksp.getType(), ksp.getPC().getType(),
           float(ksp.getResidualNorm()), seconds)
    ksp.destroy()
    return out


def solve_block_system(ode: PolynomialODE, N: int, T: int, comm, rtol: float = 1e-12) -> SolveResult:
    """Assemble M, B of order N and horizon T on ``comm``, solve, gather X to every rank."""
    M, B, stats = assemble_block_system(ode, N, T, comm)
    x, its, reason, kt, pt, res, sec = solve_ksp(M, B, rtol=rtol)
    X = to_numpy_all(x).reshape(T + 1, carleman_dim(ode.n, N))
    for obj in (x, M, B):
        obj.destroy()
    return SolveResult(X=X, iterations=its, reason=reason, ksp_type=kt, pc_type=pt, residual_norm=res,
                       solve_seconds=sec, stats=stats)


def petsc_forward_iteration(A, b: np.ndarray, y0: np.ndarray, T: int) -> np.ndarray:
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


def petsc_forward_iteration_t(ode: PolynomialODE, N: int, T: int, comm) -> np.ndarray:
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


def linearization_errors(u_exact: np.ndarray, X: np.ndarray, n: int) -> np.ndarray:
    """eta_1(t) = u(t) - y_1(t) (eq. II.8), (T+1) x n."""
    return u_exact - X[:, :n]


def stability_number(ode: PolynomialODE, N: int) -> float:
    """N * ||F1||_2: the Euler-type stepping of the Carleman system is only stable while <= ~1."""
    return float(N * ode.norms()[1])


def check_stability(ode: PolynomialODE, N: int) -> bool:
    """Warn (``RuntimeWarning``) when N * ||F1||_2 > 1; returns True when the check passes."""
    val = stability_number(ode, N)
    if val > 1.0:
        warnings.warn(f"Carleman stepping may be unstable: N*||F1||_2 = {val:.3g} > 1", RuntimeWarning)
        return False
    return True


def bound_II57(N: int, A_norm_inv: float, u_bar: float, F_norms: np.ndarray) -> float:
    """||eta(T)|| <= 3 N ||A||^{-1} ||u_bar||^{N+1} sum_{l>=2} (l-1) ||F_l|| (eq. II.57)."""
    s = sum((ell - 1) * F_norms[ell] for ell in range(2, len(F_norms)))
    return float(3.0 * N * A_norm_inv * u_bar ** (N + 1) * s)


def order_II60(eps: float, A_norm: float, u_bar: float, F_norms: np.ndarray) -> float:
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

    Uses A(t), b(t) when the constant term varies with t."""
    return ref.forward_iteration_t(ode, N, T)[:, : ode.n]


def error_split(ode: PolynomialODE, N: int, N_ref: int, T: int) -> dict[str, np.ndarray]:
    """Split u(t) - y_1^{(N)}(t) into truncation and discreteness parts (Sec. V B, eq. V.20-V.22).

    truncation(t)   = y_1^{(N_ref)}(t) - y_1^{(N)}(t)  (N_ref large stands in for N -> infinity)
    discreteness(t) = u(t) - y_1^{(N_ref)}(t)          (Carleman stepping with I+A is forward Euler of
                                                       the continuous-time lift, eq. V.20-V.22)
    Returns (T+1) x n arrays ``total``, ``truncation``, ``discreteness``.
    """
    u = ref.exact_recurrence(ode, T)
    yN = carleman_trajectory(ode, N, T)
    yR = carleman_trajectory(ode, N_ref, T)
    return {"total": u - yN, "truncation": yR - yN, "discreteness": u - yR}


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
