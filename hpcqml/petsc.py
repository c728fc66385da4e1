"""The suite's one seam to PETSc: an owner that destroys objects, AIJ matrices and vectors from local
CSR rows, the one KSP set-up and the one checked solve, and gathers of distributed vectors.

Options prefixes.  The caller names a prefix (``qcm_``, ``qcm_inv_``, ``hhl_``, ...); every object
created here gets that prefix and ``setFromOptions``, and PETSc adds the object's own word, so each
object reads its own sub-prefix: ``-qcm_mat_*`` the matrices, ``-qcm_vec_*`` the vectors,
``-qcm_ksp_*`` the Krylov solver, ``-qcm_pc_*`` its preconditioner (and, for callers that create
them, ``-qcm_eps_*`` and ``-qcm_svd_*``).  ``-qcm_mat_type aijcusparse -qcm_vec_type cuda`` therefore
moves one stage's linear algebra to a GPU without touching code (a PETSc built with CUDA assumed).

Ownership.  Every object is registered with a :class:`PetscOwner` the moment it is created, before
it is filled or assembled, so an exception half way through a set-up still destroys it when the
owner's ``with`` block is left (the pattern of dolfinx's ``LinearProblem``).

Communicators: any mpi4py communicator (or a PETSc one) is accepted and passed on to PETSc.
"""
from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp

from hpcqml.errors import NumericalError

OwnedT = TypeVar("OwnedT")


class PetscOwner:
    """Holds PETSc/SLEPc objects and destroys them, newest first, on :meth:`close` / ``__exit__``."""

    def __init__(self) -> None:
        self._objects: list[Any] = []

    def own(self, obj: OwnedT) -> OwnedT:
        """Register ``obj`` (anything with ``destroy()``) and return it."""
        self._objects.append(obj)
        return obj

    def close(self) -> None:
        """Destroy every registered object (idempotent)."""
        while self._objects:
            self._objects.pop().destroy()

    def __enter__(self) -> PetscOwner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _petsc() -> Any:
    from petsc4py import PETSc

    return PETSc


def petsc_comm(comm: Any) -> Any:
    """The PETSc communicator of an mpi4py (or PETSc) communicator."""
    PETSc = _petsc()
    return comm if isinstance(comm, PETSc.Comm) else PETSc.Comm(comm)


def configure(obj: OwnedT, prefix: str) -> OwnedT:
    """Give ``obj`` the options prefix ``prefix`` and let the options database change it (``setFromOptions``).

    Args:
        obj: a PETSc Mat, Vec, KSP or a SLEPc EPS/SVD (not a Python shell matrix).
        prefix: the caller's prefix, e.g. ``qcm_``; PETSc appends the object's own word (``mat_``, ``ksp_``).

    Returns:
        ``obj``.
    """
    obj.setOptionsPrefix(prefix)  # type: ignore[attr-defined]
    obj.setFromOptions()  # type: ignore[attr-defined]
    return obj


def aij_from_csr(local: sp.csr_matrix, ncols: int, comm: Any, owner: PetscOwner, prefix: str) -> Any:
    """Distributed square AIJ matrix whose rows on this rank are ``local`` (exact preallocation from the CSR).

    The matrix is registered with ``owner`` and given ``prefix`` before it is filled, so
    ``-{prefix}mat_type`` chooses its storage (``aijcusparse``, ``aijperm``, ...); inserting a
    nonzero outside the given pattern later is an error.

    Args:
        local: this rank's rows (shape ``(nloc, ncols)``, sorted column indices, float64).
        ncols: global size of the square matrix (its columns are split across ranks as its rows).
        comm: the communicator.
        owner: destroys the matrix.
        prefix: options prefix.

    Returns:
        The assembled PETSc Mat.
    """
    PETSc = _petsc()
    IT = PETSc.IntType
    nloc = local.shape[0]
    mat = owner.own(PETSc.Mat().create(comm=petsc_comm(comm)))
    mat.setSizes(((nloc, ncols), (nloc, ncols)))
    mat.setType(PETSc.Mat.Type.AIJ)
    configure(mat, prefix)
    mat.setPreallocationCSR((local.indptr.astype(IT), local.indices.astype(IT),
                             np.asarray(local.data, dtype=np.float64)))
    mat.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, True)
    mat.assemble()
    return mat


def vec_for(mat: Any, owner: PetscOwner, prefix: str, side: str = "left", values: np.ndarray | None = None) -> Any:
    """A vector laid out like the rows (``left``) or columns (``right``) of ``mat``, owned by ``owner``.

    Args:
        mat: the matrix.
        owner: destroys the vector.
        prefix: options prefix (``-{prefix}vec_type``).
        side: ``left`` (y in y = M x) or ``right`` (x).
        values: this rank's entries (float64), or None for zeros.

    Returns:
        The PETSc Vec.
    """
    vec = owner.own(mat.createVecLeft() if side == "left" else mat.createVecRight())
    configure(vec, prefix)
    if values is not None:
        vec.setArray(np.asarray(values, dtype=np.float64))
    else:
        vec.set(0.0)
    return vec


def make_ksp(M: Any, owner: PetscOwner, rtol: float = 1e-12, prefix: str = "qcm_", max_it: int = 1000,
             restart: int | None = None) -> Any:
    """The KSP for M x = b: GMRES with ILU(0) (1 rank) or block Jacobi/ILU(0) (p ranks).

    The one KSP set-up of the suite.  For the Carleman block system M (eq. II.79) is unit lower
    triangular, so this preconditioner is exact on one rank and nilpotent of index <= p on p ranks
    (see :mod:`hpcqml.carleman.timestepping`).  ``-{prefix}ksp_*`` and ``-{prefix}pc_*`` override
    every choice.

    Args:
        M: the assembled PETSc matrix.
        owner: registers the KSP for destruction (before it is set up).
        rtol: relative residual tolerance.
        prefix: options prefix.
        max_it: iteration limit.
        restart: GMRES restart length (None: PETSc's default).

    Returns:
        The set-up KSP.

    Raises:
        NumericalError: the set-up failed inside PETSc (a zero pivot of ILU, say).
    """
    PETSc = _petsc()
    ksp = owner.own(PETSc.KSP().create(comm=M.getComm()))
    ksp.setOperators(M)
    ksp.setType("gmres")
    ksp.getPC().setType("bjacobi" if M.getComm().getSize() > 1 else "ilu")
    if restart is not None:
        ksp.setGMRESRestart(restart)
    ksp.setTolerances(rtol=rtol, atol=0.0, max_it=max_it)
    configure(ksp, prefix)
    try:
        ksp.setUp()
    except PETSc.Error as exc:
        raise petsc_failure(prefix, exc) from None
    return ksp


def _reason_name(reason: int) -> str:
    """PETSc's name of a KSP converged reason (e.g. ``DIVERGED_ITS``), or ``?``."""
    table = _petsc().KSP.ConvergedReason
    for name in dir(table):
        if name.isupper() and getattr(table, name) == reason:
            return name
    return "?"


def petsc_failure(prefix: str, exc: Exception) -> NumericalError:
    """The one-line error for a PETSc failure inside a KSP set-up or solve of options prefix ``prefix``."""
    return NumericalError(f"KSP (prefix {prefix}) failed with PETSc error {getattr(exc, 'ierr', '?')}; "
                          f"choose another solver with -{prefix}ksp_type/-{prefix}pc_type")


def checked_solve(ksp: Any, b: Any, x: Any, transpose: bool = False) -> int:
    """``ksp.solve(b, x)`` (or the transposed solve) with its converged reason checked.

    Args:
        ksp: a set-up KSP (:func:`make_ksp`).
        b: right-hand side.
        x: solution (overwritten).
        transpose: solve with the transpose.

    Returns:
        The number of iterations.

    Raises:
        NumericalError: one line naming the options prefix and the reason, when the KSP diverged
            (reason < 0) or PETSc failed inside the solve.
    """
    PETSc = _petsc()
    prefix = ksp.getOptionsPrefix() or ""
    try:
        (ksp.solveTranspose if transpose else ksp.solve)(b, x)
    except PETSc.Error as exc:
        raise petsc_failure(prefix, exc) from None
    reason = int(ksp.getConvergedReason())
    its = int(ksp.getIterationNumber())
    if reason < 0:
        raise NumericalError(f"KSP (prefix {prefix}) diverged (reason {reason}, {_reason_name(reason)}) after "
                             f"{its} iterations: did not converge; change -{prefix}ksp_type/-{prefix}pc_type "
                             f"or the tolerance")
    return its


def to_numpy_all(vec: Any) -> np.ndarray:
    """Gather a distributed PETSc Vec into a float64 numpy array on every rank (collective)."""
    PETSc = _petsc()
    scatter, full = PETSc.Scatter.toAll(vec)
    try:
        scatter.scatter(vec, full, addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
        return np.array(full.getArray(), dtype=np.float64)
    finally:
        scatter.destroy()
        full.destroy()


def to_numpy_root(vec: Any) -> np.ndarray | None:
    """Gather a distributed PETSc Vec to rank 0 of its communicator (collective).

    Returns:
        The whole vector (float64) on rank 0; None on every other rank.
    """
    PETSc = _petsc()
    scatter, full = PETSc.Scatter.toZero(vec)
    try:
        scatter.scatter(vec, full, addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
        if vec.getComm().getRank() != 0:
            return None
        return np.array(full.getArray(), dtype=np.float64)
    finally:
        scatter.destroy()
        full.destroy()
