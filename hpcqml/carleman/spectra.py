"""SLEPc spectra of the Carleman matrix and condition numbers of M (eq. II.28, II.81-II.83).

Methods (all open to ``setFromOptions``; default options prefixes: ``-qcm_eps_*`` for the eigensolver,
``-qcm_svd_*`` for ‖A‖, ‖I+A‖ and σ(M), ``-qcm_ksp_*``/``-qcm_pc_*`` for the time-stepping solve,
``-qcm_inv_ksp_*``/``-qcm_inv_svd_*`` for the inverse iteration of σ_min(M)):
- all eigenvalues of A for Delta <= ``dense_limit``: EPS type LAPACK (dense QR on a
  redundant copy; exact up to rounding);
- beyond: EPS Krylov-Schur, ``nev`` eigenvalues of largest real part and of smallest real part;
- extremal singular values: for size <= ``dense_limit`` SVD type LAPACK (dense, exact up to
  rounding; Lanczos converges slowly to clustered small singular values and can break down on
  small rank-deficient matrices); beyond, SVD thick-restart Lanczos (``trlanczos``) with relative
  residual tolerance ``tol`` for σ_max, and σ_min(M) is
  1/σ_max(M⁻¹) with M⁻¹ applied by KSP solves (:func:`smallest_singular_value_by_inverse`).
- the zero matrix (A = 0 when F1 = 0 and F2 = 0) is answered exactly without SLEPc: its
  eigenvalues and singular values are 0.

Every PETSc/SLEPc object created here is registered with a :class:`hpcqml.petsc.PetscOwner`, which
destroys it when the owner is closed, also when an exception leaves the ``with`` block; the KSP
set-up and the checked solve are those of :mod:`hpcqml.petsc`.  Each function takes the options
prefix (default ``qcm_``) from its caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcqml.errors import NumericalError
from hpcqml.modes import dissipative_counts, dissipative_mean, is_dissipative  # noqa: F401  (re-exported)
from hpcqml.petsc import PetscOwner, checked_solve, configure, make_ksp

PREFIX = "qcm_"
INVERSE_PREFIX = "qcm_inv_"


def _slepc() -> Any:
    from slepc4py import SLEPc

    return SLEPc


def is_zero_matrix(mat: Any) -> bool:
    """True when every stored entry of the distributed matrix is 0 (Frobenius norm 0)."""
    from petsc4py import PETSc

    return float(mat.norm(PETSc.NormType.FROBENIUS)) == 0.0


def _eps(A: Any, owner: PetscOwner, kind: str, which: Any = None, nev: int = 1,
         tol: float = 1e-10, prefix: str = PREFIX) -> list[complex]:
    SLEPc = _slepc()
    eps = owner.own(SLEPc.EPS().create(comm=A.getComm()))
    eps.setOperators(A)
    eps.setProblemType(SLEPc.EPS.ProblemType.NHEP)
    eps.setType(kind)
    if which is not None:
        eps.setWhichEigenpairs(which)
    eps.setDimensions(nev=nev)
    eps.setTolerances(tol=tol, max_it=2000)
    configure(eps, prefix)
    eps.solve()
    return [eps.getEigenvalue(i) for i in range(eps.getConverged())]


def eigenvalues(A: Any, owner: PetscOwner, dense_limit: int = 3000, nev: int = 20,
                tol: float = 1e-10, prefix: str = PREFIX) -> tuple[np.ndarray, str]:
    """Eigenvalues a of the Carleman matrix A (complex128, on every rank) and the method used.

    All Delta of them when Delta <= dense_limit, otherwise ``nev`` of largest and ``nev`` of smallest
    real part (deduplicated).  A = 0 gives Delta exact zeros.
    """
    SLEPc = _slepc()
    D = A.getSize()[0]
    if is_zero_matrix(A):
        return np.zeros(D, dtype=np.complex128), "zero matrix (exact)"
    if D <= dense_limit:
        vals = np.array(_eps(A, owner, SLEPc.EPS.Type.LAPACK, nev=D, prefix=prefix), dtype=np.complex128)
        if vals.shape[0] != D:
            raise NumericalError(f"SLEPc LAPACK returned {vals.shape[0]} of {D} eigenvalues")
        return vals, "EPS lapack (all)"
    out: list[complex] = []
    for which in (SLEPc.EPS.Which.LARGEST_REAL, SLEPc.EPS.Which.SMALLEST_REAL):
        out += _eps(A, owner, SLEPc.EPS.Type.KRYLOVSCHUR, which, nev=min(nev, D - 2), tol=tol,
                    prefix=prefix)
    vals = np.unique(np.round(np.array(out, dtype=np.complex128), 14))
    return vals, f"EPS krylovschur ({nev} largest + {nev} smallest real part, tol {tol:g})"


def singular_value(mat: Any, owner: PetscOwner, which: str = "largest", tol: float = 1e-10, max_it: int = 5000,
                   dense_limit: int = 3000, prefix: str = PREFIX) -> tuple[float, str]:
    """σ_max or σ_min of a distributed matrix by SLEPc SVD; returns (value, method).

    The zero matrix returns 0 exactly (Lanczos cannot start on it).
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"singular_value: which={which!r} is not 'largest' or 'smallest'")
    if is_zero_matrix(mat):
        return 0.0, "zero matrix (exact)"
    SLEPc = _slepc()
    size = mat.getSize()[0]
    svd = owner.own(SLEPc.SVD().create(comm=mat.getComm()))
    svd.setOperators(mat)
    if size <= dense_limit:  # exact; Lanczos can break down on small rank-deficient matrices
        svd.setType(SLEPc.SVD.Type.LAPACK)
        method = "SVD lapack (dense)"
    else:
        svd.setType(SLEPc.SVD.Type.TRLANCZOS)
        svd.setDimensions(nsv=1, ncv=min(size, 64 if which == "smallest" else 16))
        method = f"SVD trlanczos tol {tol:g}"
    svd.setWhichSingularTriplets(SLEPc.SVD.Which.LARGEST if which == "largest" else SLEPc.SVD.Which.SMALLEST)
    svd.setTolerances(tol=tol, max_it=max_it)
    configure(svd, prefix)
    svd.solve()
    nconv = svd.getConverged()
    if nconv < 1:
        raise NumericalError(f"SLEPc SVD ({which}) did not converge in {max_it} iterations")
    vals = [svd.getValue(i) for i in range(nconv)]
    return float(max(vals) if which == "largest" else min(vals)), method


class _InverseShell:
    """Python context of a shell matrix applying M⁻¹ (and M⁻ᵀ) by solves with one KSP."""

    def __init__(self, ksp: Any) -> None:
        self.ksp = ksp

    def mult(self, mat: Any, x: Any, y: Any) -> None:  # noqa: ARG002 - petsc4py shell-context signature
        checked_solve(self.ksp, x, y)

    def multTranspose(self, mat: Any, x: Any, y: Any) -> None:  # noqa: N802, ARG002 - petsc4py shell-context API
        checked_solve(self.ksp, x, y, transpose=True)


def smallest_singular_value_by_inverse(M: Any, owner: PetscOwner, tol: float = 1e-10, max_it: int = 5000,
                                       ksp_rtol: float = 1e-13, prefix: str = INVERSE_PREFIX) -> tuple[float, str]:
    """σ_min(M) = 1 / σ_max(M⁻¹): thick-restart Lanczos on a shell M⁻¹ (solves with :func:`make_ksp`).

    The largest singular value of M⁻¹ is well separated in practice, unlike the smallest of M,
    so this converges in a few dozen products where Lanczos on M stalls.
    """
    from petsc4py import PETSc

    SLEPc = _slepc()
    ksp = make_ksp(M, owner, rtol=ksp_rtol, prefix=prefix)
    shell = owner.own(PETSc.Mat().createPython(M.getSizes(), context=_InverseShell(ksp), comm=M.getComm()))
    shell.setUp()
    svd = owner.own(SLEPc.SVD().create(comm=M.getComm()))
    svd.setOperators(shell)
    svd.setType(SLEPc.SVD.Type.TRLANCZOS)
    svd.setWhichSingularTriplets(SLEPc.SVD.Which.LARGEST)
    svd.setDimensions(nsv=1, ncv=min(M.getSize()[0], 16))
    svd.setTolerances(tol=tol, max_it=max_it)
    configure(svd, prefix)
    svd.solve()
    if svd.getConverged() < 1:
        raise NumericalError(f"SLEPc SVD of M^-1 did not converge in {max_it} iterations")
    val = max(svd.getValue(i) for i in range(svd.getConverged()))
    return 1.0 / float(val), f"1/sigma_max(M^-1), SVD trlanczos on KSP shell, tol {tol:g}"


def shifted_identity(A: Any, owner: PetscOwner) -> Any:
    """I + A as a new distributed matrix (diagonal entries inserted where missing), owned by ``owner``."""
    from petsc4py import PETSc

    B = owner.own(A.duplicate(copy=True))
    B.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, False)
    B.shift(1.0)
    B.assemble()
    return B


@dataclass
class ConditionReport:
    """κ(M) = σ_max / σ_min and its bounds (eq. II.81-II.83), each with whether it held."""

    sigma_max: float
    sigma_min: float
    kappa: float
    norm_IA: float  # noqa: N815 - the paper's symbol ||I+A||
    bound_II83: float  # noqa: N815 - names eq. II.83; 2(T+1), derived for ||I+A|| < 1
    bound_general: float   # (1 + ||I+A||) sum_{t=0}^T ||I+A||^t (eq. II.81 times ||M|| <= 1 + ||I+A||)
    method: str

    @property
    def II83_applies(self) -> bool:  # noqa: N802 - names eq. II.83
        """Eq. II.83's premise ‖I+A‖ < 1 (eq. II.82 for every mode is weaker)."""
        return bool(self.norm_IA < 1.0)

    @property
    def holds_II83(self) -> bool:  # noqa: N802 - names eq. II.83
        return bool(self.kappa <= self.bound_II83 * (1.0 + 1e-9))

    @property
    def holds_general(self) -> bool:
        return bool(self.kappa <= self.bound_general * (1.0 + 1e-9))


def condition_report(M: Any, IA_norm: float, T: int, owner: PetscOwner, tol: float = 1e-10,
                     dense_limit: int = 3000, prefix: str = PREFIX,
                     inverse_prefix: str = INVERSE_PREFIX) -> ConditionReport:
    """κ(M) from SLEPc SVD next to 2(T+1) (eq. II.83) and the general bound (eq. II.81).

    ``prefix`` is the options prefix of the SVDs of M, ``inverse_prefix`` that of the inverse iteration.
    """
    smax, m1 = singular_value(M, owner, "largest", tol=tol, dense_limit=dense_limit, prefix=prefix)
    if M.getSize()[0] <= dense_limit:
        smin, m2 = singular_value(M, owner, "smallest", tol=tol, dense_limit=dense_limit, prefix=prefix)
    else:
        smin, m2 = smallest_singular_value_by_inverse(M, owner, tol=tol, prefix=inverse_prefix)
    general = (1.0 + IA_norm) * float(sum(IA_norm**t for t in range(T + 1)))
    return ConditionReport(sigma_max=smax, sigma_min=smin, kappa=smax / smin, norm_IA=IA_norm,
                           bound_II83=2.0 * (T + 1), bound_general=general, method=f"max: {m1}; min: {m2}")
