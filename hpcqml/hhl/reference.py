"""Reference solution of ``M x = b`` for the HHL comparisons: one PETSc KSP with prefix ``hhl_``.

:class:`ReferenceSolver` owns the distributed ``Mat``, the two ``Vec`` and the ``KSP`` of
one system and destroys them on exit from its ``with`` block, also when the solve fails.
Each rank holds the rows ``hpcqml.parallel.block_bounds`` gives it (PETSc's default
split). The KSP is :func:`hpcqml.petsc.make_ksp` (the suite's one KSP set-up):
GMRES (restart ``min(n, 500)``) with ILU(0) on one rank and block
Jacobi/ILU(0) on several, relative tolerance 1e-12; every setting can be changed on the
command line with the ``hhl_`` prefix (``-hhl_ksp_type preonly -hhl_pc_type lu``,
``-hhl_ksp_monitor``, ``-hhl_mat_type``, ...); the solve is :func:`hpcqml.petsc.checked_solve`.
A KSP that reports divergence, a PETSc failure inside the solve
(a zero pivot of ILU, say: a matrix with zeros on its diagonal needs
``-hhl_pc_type none`` or another preconditioner) or a non-finite solution raises
:class:`NumericalError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import scipy.sparse as sp

from hpcqml.errors import NumericalError
from hpcqml.parallel import block_bounds

if TYPE_CHECKING:
    from hpcqml.petsc import PetscOwner

#: Options prefix of every PETSc object the hhl stage creates.
OPTIONS_PREFIX = "hhl_"


@dataclass(frozen=True)
class ReferenceSolution:
    """``x`` (float64, length n, on every rank) and the solver's account of it."""

    x: np.ndarray
    iterations: int
    reason: int
    ksp_type: str
    pc_type: str
    rel_residual: float

    @property
    def method(self) -> str:
        """One line naming the solver, e.g. ``PETSc KSP gmres/ilu (prefix hhl_), 1 iterations``."""
        return f"PETSc KSP {self.ksp_type}/{self.pc_type} (prefix {OPTIONS_PREFIX}), {self.iterations} iterations"


class ReferenceSolver:
    """Owner of the PETSc objects of one reference solve (use as a context manager).

    Args:
        M: the matrix (scipy.sparse or dense), the same on every rank.
        b: the right-hand side (float64, length n), the same on every rank.
        comm: the mpi4py communicator.
        rtol: relative residual tolerance of the KSP.
    """

    def __init__(self, M: Any, b: np.ndarray, comm: Any, rtol: float = 1e-12) -> None:
        self._M = sp.csr_matrix(M, dtype=np.float64)
        self._b = np.asarray(b, dtype=np.float64).reshape(-1)
        self._comm = comm
        self._rtol = float(rtol)
        # PETSc Mat, Vecs and KSP (no stubs), created on entering the with block
        self.mat: Any = None
        self.rhs: Any = None
        self.sol: Any = None
        self.ksp: Any = None
        self._owner: PetscOwner | None = None

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _create(self) -> None:
        from hpcqml.petsc import PetscOwner, aij_from_csr, make_ksp, vec_for

        self._owner = owner = PetscOwner()
        n = self._M.shape[0]
        r0, r1 = block_bounds(n, self._comm.Get_rank(), self._comm.Get_size())
        self.mat = aij_from_csr(self._M[r0:r1], n, self._comm, owner, OPTIONS_PREFIX)
        self.rhs = vec_for(self.mat, owner, OPTIONS_PREFIX, "left", self._b[r0:r1])
        self.sol = vec_for(self.mat, owner, OPTIONS_PREFIX, "right")
        self.ksp = make_ksp(self.mat, owner, rtol=self._rtol, prefix=OPTIONS_PREFIX,
                            max_it=max(10 * n, 1000), restart=max(min(n, 500), 1))

    def solve(self) -> ReferenceSolution:
        """Solve (collective) and gather ``x`` to every rank.

        Raises:
            NumericalError: divergence, a PETSc failure in the solve, or a non-finite result.
        """
        from hpcqml.petsc import checked_solve

        its = checked_solve(self.ksp, self.rhs, self.sol)
        reason = int(self.ksp.getConvergedReason())
        x = np.concatenate(self._comm.allgather(np.array(self.sol.getArray(), dtype=np.float64)))
        if not np.all(np.isfinite(x)):
            raise NumericalError(f"KSP (prefix {OPTIONS_PREFIX}) returned a non-finite solution")
        resid = float(np.linalg.norm(self._M @ x - self._b) / np.linalg.norm(self._b))
        return ReferenceSolution(x=x, iterations=its, reason=reason, ksp_type=self.ksp.getType(),
                                 pc_type=self.ksp.getPC().getType(), rel_residual=resid)

    def destroy(self) -> None:
        """Destroy every PETSc object this solver created (safe to call twice)."""
        if self._owner is not None:
            self._owner.close()
        self.mat = self.rhs = self.sol = self.ksp = None


def reference_solution(M: Any, b: np.ndarray, comm: Any, rtol: float = 1e-12) -> ReferenceSolution:
    """Solve ``M x = b`` with :class:`ReferenceSolver`; its PETSc objects are gone on return."""
    with ReferenceSolver(M, b, comm, rtol=rtol) as solver:
        return solver.solve()
