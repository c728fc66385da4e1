"""SLEPc spectra of the Carleman matrix and condition numbers of M (eq. II.28, II.81-II.83).

Methods (all exposed through ``setFromOptions`` with the ``qcm_eps_`` / ``qcm_svd_`` prefixes):
- all eigenvalues of A for Delta <= ``dense_limit``: EPS type LAPACK (dense QR on a
  redundant copy; exact up to rounding);
- beyond: EPS Krylov-Schur, ``nev`` eigenvalues of largest real part and of smallest real part;
- extremal singular values (||I+A||_2, sigma_max(M), sigma_min(M)): SVD thick-restart Lanczos
  (``trlanczos``, one-sided off), relative residual tolerance ``tol`` (default 1e-10), at most
  ``max_it`` restarts; for size <= ``dense_limit`` the smallest one uses SVD type LAPACK because
  Lanczos converges slowly to clustered small singular values; beyond, sigma_min(M) is
  1/sigma_max(M^{-1}) with M^{-1} applied by KSP solves (see
  :func:`smallest_singular_value_by_inverse`).  The method used is returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcqml.errors import NumericalError


def _slepc():
    from slepc4py import SLEPc

    return SLEPc


def eigenvalues(A, dense_limit: int = 3000, nev: int = 20, tol: float = 1e-10) -> tuple[np.ndarray, str]:
    """Eigenvalues a of the Carleman matrix A (complex128, on every rank) and the method used.

    All Delta of them when Delta <= dense_limit, otherwise ``nev`` of largest and ``nev`` of smallest
    real part (deduplicated).
    """
    SLEPc = _slepc()
    D = A.getSize()[0]
    if D <= dense_limit:
        eps = SLEPc.EPS().create(comm=A.getComm())
        eps.setOperators(A)
        eps.setProblemType(SLEPc.EPS.ProblemType.NHEP)
        eps.setType(SLEPc.EPS.Type.LAPACK)
        eps.setDimensions(nev=D)
        eps.setOptionsPrefix("qcm_")
        eps.setFromOptions()
        eps.solve()
        vals = np.array([eps.getEigenvalue(i) for i in range(eps.getConverged())], dtype=np.complex128)
        eps.destroy()
        if vals.shape[0] != D:
            raise NumericalError(f"SLEPc LAPACK returned {vals.shape[0]} of {D} eigenvalues")
        return vals, "EPS lapack (all)"
    out = []
    for which in (SLEPc.EPS.Which.LARGEST_REAL, SLEPc.EPS.Which.SMALLEST_REAL):
        eps = SLEPc.EPS().create(comm=A.getComm())
        eps.setOperators(A)
        eps.setProblemType(SLEPc.EPS.ProblemType.NHEP)
        eps.setType(SLEPc.EPS.Type.KRYLOVSCHUR)
        eps.setWhichEigenpairs(which)
        eps.setDimensions(nev=min(nev, D - 2))
        eps.setTolerances(tol=tol, max_it=2000)
        eps.setOptionsPrefix("qcm_")
        eps.setFromOptions()
        eps.solve()
        out += [eps.getEigenvalue(i) for i in range(eps.getConverged())]
        eps.destroy()
    vals = np.unique(np.round(np.array(out, dtype=np.complex128), 14))
    return vals, f"EPS krylovschur ({nev} largest + {nev} smallest real part, tol {tol:g})"


def dissipative_counts(eigs: np.ndarray) -> tuple[int, int]:
    """(Delta_+, Delta_-): modes with |1 + a| < 1 (dissipative) vs |1 + a| >= 1 (eq. II.28)."""
    dis = int(np.sum(np.abs(1.0 + eigs) < 1.0))
    return dis, int(eigs.shape[0] - dis)


def singular_value(mat, which: str = "largest", tol: float = 1e-10, max_it: int = 5000,
                   dense_limit: int = 3000) -> tuple[float, str]:
    """sigma_max or sigma_min of a distributed matrix by SLEPc SVD; returns (value, method)."""
    SLEPc = _slepc()
    size = mat.getSize()[0]
    svd = SLEPc.SVD().create(comm=mat.getComm())
    svd.setOperators(mat)
    if which == "smallest" and size <= dense_limit:
        svd.setType(SLEPc.SVD.Type.LAPACK)
        method = "SVD lapack (dense)"
    else:
        svd.setType(SLEPc.SVD.Type.TRLANCZOS)
        svd.setDimensions(nsv=1, ncv=min(size, 64 if which == "smallest" else 16))
        method = f"SVD trlanczos tol {tol:g}"
    svd.setWhichSingularTriplets(SLEPc.SVD.Which.LARGEST if which == "largest" else SLEPc.SVD.Which.SMALLEST)
    svd.setTolerances(tol=tol, max_it=max_it)
    svd.setOptionsPrefix("qcm_")
    svd.setFromOptions()
    svd.solve()
    nconv = svd.getConverged()
    if nconv < 1:
        raise NumericalError(f"SLEPc SVD ({which}) did not converge in {max_it} iterations")
    vals = [svd.getValue(i) for i in range(nconv)]
    svd.destroy()
    return float(max(vals) if which == "largest" else min(vals)), method


class _InverseShell:
    """Python context of a shell matrix applying M^{-1} (and M^{-T}) by KSP solves."""

    def __init__(self, ksp):
        self.ksp = ksp

    def mult(self, mat, x, y):
        self.ksp.solve(x, y)
        if self.ksp.getConvergedReason() < 0:
            raise NumericalError("KSP failed inside the M^{-1} shell for kappa(M)")

    def multTranspose(self, mat, x, y):  # noqa: N802 - petsc4py naming
        self.ksp.solveTranspose(x, y)


def smallest_singular_value_by_inverse(M, tol: float = 1e-10, max_it: int = 5000,
                                       ksp_rtol: float = 1e-13) -> tuple[float, str]:
    """sigma_min(M) = 1 / sigma_max(M^{-1}): thick-restart Lanczos on a shell M^{-1} (KSP solves).

    The largest singular value of M^{-1} is well separated in practice, unlike the smallest of M,
    so this converges in a few dozen products where Lanczos on M stalls.
    """
    from petsc4py import PETSc

    SLEPc = _slepc()
    ksp = PETSc.KSP().create(comm=M.getComm())
    ksp.setOperators(M)
    ksp.setType("gmres")
    ksp.getPC().setType("bjacobi" if M.getComm().getSize() > 1 else "ilu")
    ksp.setTolerances(rtol=ksp_rtol, atol=0.0, max_it=1000)
    ksp.setOptionsPrefix("qcm_inv_")
    ksp.setFromOptions()
    ksp.setUp()
    shell = PETSc.Mat().createPython(M.getSizes(), context=_InverseShell(ksp), comm=M.getComm())
    shell.setUp()
    svd = SLEPc.SVD().create(comm=M.getComm())
    svd.setOperators(shell)
    svd.setType(SLEPc.SVD.Type.TRLANCZOS)
    svd.setWhichSingularTriplets(SLEPc.SVD.Which.LARGEST)
    svd.setDimensions(nsv=1, ncv=min(M.getSize()[0], 16))
    svd.setTolerances(tol=tol, max_it=max_it)
    svd.setOptionsPrefix("qcm_inv_")
    svd.setFromOptions()
    svd.solve()
    if svd.getConverged() < 1:
        raise NumericalError(f"SLEPc SVD of M^-1 did not converge in {max_it} iterations")
    val = max(svd.getValue(i) for i in range(svd.getConverged()))
    for obj in (svd, shell, ksp):
        obj.destroy()
    return 1.0 / float(val), f"1/sigma_max(M^-1), SVD trlanczos on KSP shell, tol {tol:g}"


def shifted_identity(A):
    """I + A as a new distributed matrix (diagonal entries inserted where missing)."""
    from petsc4py import PETSc

    B = A.duplicate(copy=True)
    B.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, False)
    B.shift(1.0)
    B.assemble()
    return B


@dataclass
class ConditionReport:
    """kappa(M) = sigma_max / sigma_min and its bounds (eq. II.81-II.83)."""

    sigma_max: float
    sigma_min: float
    kappa: float
    norm_IA: float
    bound_II83: float      # 2(T+1), valid when ||I+A|| < 1
    bound_general: float   # (1 + ||I+A||) sum_{t=0}^T ||I+A||^t
    method: str


def condition_report(M, IA_norm: float, T: int, tol: float = 1e-10, dense_limit: int = 3000) -> ConditionReport:
    """kappa(M) from SLEPc SVD next to 2(T+1) (eq. II.83) and the general bound (eq. II.81)."""
    smax, m1 = singular_value(M, "largest", tol=tol, dense_limit=dense_limit)
    if M.getSize()[0] <= dense_limit:
        smin, m2 = singular_value(M, "smallest", tol=tol, dense_limit=dense_limit)
    else:
        smin, m2 = smallest_singular_value_by_inverse(M, tol=tol)
    general = (1.0 + IA_norm) * float(sum(IA_norm**t for t in range(T + 1)))
    return ConditionReport(sigma_max=smax, sigma_min=smin, kappa=smax / smin, norm_IA=IA_norm,
                           bound_II83=2.0 * (T + 1), bound_general=general, method=f"max: {m1}; min: {m2}")
