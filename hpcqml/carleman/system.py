"""One owner for the PETSc objects of a Carleman case (in the manner of dolfinx's ``LinearProblem``).

:class:`CarlemanCase` assembles A (eq. II.3-II.6), M and B (eq. II.79) of one instance, order N
and horizon T on a communicator, and runs every solver of the case through itself: the KSP of
M X = B (options prefix ``qcm_``), the EPS of A (``qcm_``), the SVDs of A, I + A and M
(``qcm_``) and the inverse iteration for σ_min(M) (``qcm_inv_``); the prefix is the caller's choice
(``prefix``), and every object reads its own sub-prefix of it (``-qcm_mat_*``, ``-qcm_vec_*``,
``-qcm_ksp_*``, ``-qcm_pc_*``, ``-qcm_eps_*``, ``-qcm_svd_*``; :mod:`hpcqml.petsc`).  Every object is
registered with the case as it is created, so all of them are destroyed when the ``with`` block
ends, whether it ends normally or by an exception (also one in the middle of the assembly)::

    with CarlemanCase(ode, N=3, T=20, comm=MPI.COMM_WORLD) as case:
        X = case.solve().X
        eigs, method = case.eigenvalues()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcqml.carleman import spectra
from hpcqml.carleman.discrete import LIFTS
from hpcqml.carleman.instance import PolynomialODE, carleman_dim
from hpcqml.carleman.petsc_assembly import AssemblyStats, assemble_block_system, assemble_carleman
from hpcqml.carleman.timestepping import solve_ksp
from hpcqml.errors import UserError
from hpcqml.petsc import PetscOwner, to_numpy_all, to_numpy_root


@dataclass
class KspFacts:
    """The solution X ((T+1) x Delta, float64) and what the solver did.

    X is on every rank (``gather="all"``), on rank 0 only (``gather="root"``) or nowhere
    (``gather="none"``); ``local`` always holds this rank's entries [r0, r1) of the flat X
    (``row_range``), the rows of M this rank owns.
    """

    X: np.ndarray | None
    iterations: int
    reason: int
    ksp_type: str
    pc_type: str
    residual_norm: float
    seconds: float
    local: np.ndarray
    row_range: tuple[int, int]


@dataclass
class Norms:
    """‖I+A‖₂, ‖A‖₂ and σ_min(A) (NaN when Delta > dense_limit) with the method of the largest ones."""

    norm_IA: float  # noqa: N815 - the paper's symbol ||I+A||
    norm_A: float  # noqa: N815 - the paper's symbol ||A||
    sigma_min_A: float  # noqa: N815 - the paper's symbol sigma_min(A)
    method: str


class CarlemanCase(PetscOwner):
    """A, I + A, M, B, the solution vector and every KSP/EPS/SVD of one (instance, N, T) case.

    Args:
        ode: the polynomial ODE (eq. II.1).
        N: Carleman truncation order.
        T: number of time steps.
        comm: an mpi4py communicator (or a PETSc one).
        rtol: relative residual tolerance of the time-stepping KSP.
        lift_kind: ``"paper"`` (A of eq. II.3-II.6) or ``"discrete"`` (A_d = L - I of the exact lift of
            the map, :mod:`hpcqml.carleman.discrete`); every solver treats either as "A".
        prefix: options prefix of every object of the case; the inverse iteration uses ``{prefix}inv_``.
    """

    def __init__(self, ode: PolynomialODE, N: int, T: int, comm: Any, rtol: float = 1e-12,
                 lift_kind: str = "paper", prefix: str = spectra.PREFIX) -> None:
        super().__init__()
        if lift_kind not in LIFTS:
            raise UserError(f"CarlemanCase: lift {lift_kind!r} is not one of {', '.join(LIFTS)}")
        self.ode, self.N, self.T, self.comm, self.rtol = ode, N, T, comm, rtol
        self.lift_kind = lift_kind
        self.prefix = prefix
        self.A: Any = None  # PETSc Mat/Vec objects (no stubs), set by assemble()
        self.M: Any = None
        self.B: Any = None
        self._IA: Any = None
        self.stats_A: AssemblyStats | None = None
        self.stats_M: AssemblyStats | None = None

    def __enter__(self) -> "CarlemanCase":
        try:
            self.assemble()
        except BaseException:
            self.close()
            raise
        return self

    def assemble(self) -> None:
        """Assemble A, M and B (collective); each is owned by the case from its creation on."""
        self.A, self.stats_A = assemble_carleman(self.ode, self.N, self.comm, lift_kind=self.lift_kind, owner=self,
                                                 prefix=self.prefix)
        self.M, self.B, self.stats_M = assemble_block_system(self.ode, self.N, self.T, self.comm,
                                                             lift_kind=self.lift_kind, owner=self, prefix=self.prefix)

    @property
    def delta(self) -> int:
        """Delta = n + ... + n^N (eq. II.13)."""
        return carleman_dim(self.ode.n, self.N)

    def solve(self, gather: str = "all") -> KspFacts:
        """Solve M X = B with the suite's KSP; :class:`NumericalError` when it does not converge.

        Args:
            gather: ``all`` (X on every rank), ``root`` (X on rank 0 only) or ``none`` (the
                solution stays distributed: only this rank's part, ``KspFacts.local``).

        Returns:
            The solution and the solver's account of it.
        """
        if gather not in ("all", "root", "none"):
            raise ValueError(f"CarlemanCase.solve: gather = {gather!r} is not 'all', 'root' or 'none'")
        x, its, reason, kt, pt, resid, sec = solve_ksp(self.M, self.B, rtol=self.rtol, prefix=self.prefix, owner=self)
        flat = {"all": to_numpy_all, "root": to_numpy_root, "none": lambda _x: None}[gather](x)
        X = None if flat is None else flat.reshape(self.T + 1, self.delta)
        r0, r1 = x.getOwnershipRange()
        return KspFacts(X=X, iterations=its, reason=reason, ksp_type=kt, pc_type=pt, residual_norm=resid,
                        seconds=sec, local=np.array(x.getArray(), dtype=np.float64), row_range=(int(r0), int(r1)))

    def eigenvalues(self, dense_limit: int = 3000, nev: int = 20, tol: float = 1e-10) -> tuple[np.ndarray, str]:
        """Eigenvalues of A and the method (:func:`spectra.eigenvalues`)."""
        return spectra.eigenvalues(self.A, self, dense_limit=dense_limit, nev=nev, tol=tol, prefix=self.prefix)

    def identity_plus_A(self) -> Any:  # noqa: N802 - the paper's symbol A
        """I + A (assembled once, owned by the case)."""
        if self._IA is None:
            self._IA = spectra.shifted_identity(self.A, self)
        return self._IA

    def norms(self, tol: float = 1e-10, dense_limit: int = 3000) -> Norms:
        """‖I+A‖₂, ‖A‖₂ by SVD, σ_min(A) by dense SVD up to ``dense_limit`` rows (exact 0 for A = 0)."""
        def sv(mat: Any, which: str) -> tuple[float, str]:
            return spectra.singular_value(mat, self, which, tol=tol, dense_limit=dense_limit, prefix=self.prefix)

        norm_IA, method = sv(self.identity_plus_A(), "largest")
        norm_A, _ = sv(self.A, "largest")
        smin = float("nan")
        if self.delta <= dense_limit:
            smin, _ = sv(self.A, "smallest")
        return Norms(norm_IA=norm_IA, norm_A=norm_A, sigma_min_A=smin, method=method)

    def condition(self, norm_IA: float, tol: float = 1e-10, dense_limit: int = 3000) -> spectra.ConditionReport:
        """κ(M) with the bounds of eq. II.81-II.83 (:func:`spectra.condition_report`)."""
        return spectra.condition_report(self.M, norm_IA, self.T, self, tol=tol, dense_limit=dense_limit,
                                        prefix=self.prefix, inverse_prefix=f"{self.prefix}inv_")
