"""Noise-free HHL and truncated HHL by Chebyshev matrix functions of the distributed operator
(paper eq. II.84-II.87; same circuit as :mod:`hpcqml.hhl.statevector`).

Why matrix functions suffice. Write ``|b> = sum_j beta_j |u_j>`` in the eigenbasis of the
unit-norm Hermitian ``H`` (eq. II.84). Phase estimation with ``c`` clock qubits maps
``|0>|u_j>`` to ``sum_y alpha_y(lambda_j) |y>|u_j>`` with

    alpha_y(lambda) = N_c^{-1} sum_{k=0}^{N_c-1} exp(i k (t0 lambda - 2 pi y / N_c)),

and nothing in the circuit mixes eigencomponents. Post-selecting ancilla ``|1>`` and clock
``|0>`` after the uncomputation therefore keeps, per flag branch ``r`` (rotation amplitudes
``a_r(y)`` of :func:`hpcqml.hhl.statevector.rotation_branches`),

    out_r = g_r(H) b,   g_r(lambda) = sum_y a_r(y) |alpha_y(lambda)|^2          (eq. II.85/II.86)

and the other figures are quadratic forms of functions of ``H``:

* ``p_success = sum_r ||g_r(H) b||^2``;
* ``p_ancilla = b^T h(H) b`` with ``h(lambda) = sum_r sum_y a_r(y)^2 |alpha_y(lambda)|^2``;
* fidelity with the reference ``z`` (the embedded PETSc solution): ``(z^T g_0(H) b)^2 / (p_success ||z||^2)``;
* clock-traced fidelity: the uncomputed clock-``k`` block of branch 0 is ``F_k(H) b`` with
  ``F_k(lambda) = exp(-i k t0 lambda) N_c^{-1/2} sum_y a_0(y) alpha_y(lambda) exp(2 pi i k y / N_c)``,
  so ``<z|rho|z> = sum_k |z^T F_k(H) b|^2 / (p_ancilla ||z||^2)``.

Approximation and its error. Every one of these functions is a trigonometric polynomial
``sum_d f_d exp(i d t0 lambda)`` with ``|d| <= N_c - 1`` and ``sum_d |f_d| <= N_c`` (the
rotation amplitudes are bounded by 1). By the Jacobi-Anger expansion
``exp(i w x) = sum_k (2 - delta_k0) i^k J_k(w) T_k(x)`` and ``|J_k(w)| <= (|w|/2)^k / k!``,
the Chebyshev series of ``f`` on ``[-1, 1]`` truncated after degree ``K`` has

    sup_{[-1,1]} |f - p_K| <= 2 N_c sum_{k>K} (w_max/2)^k / k!,   w_max = (N_c - 1) t0,

and the coefficients are computed by a discrete cosine transform on ``2K + 1`` Chebyshev
points, whose aliasing error is bounded by the same tail. :func:`chebyshev_degree` picks the
least ``K`` whose bound ``4 N_c tail`` is below the requested tolerance; the bound is a
rigorous sup-norm bound for every function used here, so ``||out_r - g_r(H) b|| <= bound``
for the normalised ``b`` (plus rounding of the three-term recurrence, of order ``K`` times
the machine epsilon). The degree grows like ``e (N_c - 1) t0 / 2``: these functions oscillate
with ``N_c`` periods over the spectrum, so no lower-degree polynomial can resolve them, and the
Chebyshev basis is the one that needs no spectral information beyond ``||H|| = 1``. Every
function shares the vectors ``T_k(H) b``, so one recurrence of ``K`` products with ``H``
serves plain HHL and every ``kappa_a`` at one clock size.

Distribution. ``H`` (``M`` when symmetric, else the dilation ``[[0, M], [M^T, 0]]``, not
padded: the padding of the state-vector simulator carries no amplitude) is a PETSc AIJ
matrix, each rank holding the rows :func:`hpcqml.parallel.block_bounds` gives it; the
state vectors are the local parts of the PETSc vectors. ``||H||_2`` comes from dense
eigenvalues up to ``DENSE_NORM_LIMIT`` rows and from the Lanczos upper estimate of
:func:`lanczos_norm_estimate` beyond.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import lgamma, log
from typing import Any, Self

import numpy as np
import scipy.fft
import scipy.sparse as sp

from hpcqml.errors import UserError
from hpcqml.hhl.reference import OPTIONS_PREFIX
from hpcqml.hhl.statevector import SYMMETRY_RTOL, default_C, default_t0, padded_dim, rotation_branches
from hpcqml.parallel import block_bounds

#: Largest embedded size whose norm ||H||_2 is taken from dense eigenvalues (exact).
DENSE_NORM_LIMIT = 4096

#: Default bound on the sup-norm error of every Chebyshev approximation.
DEFAULT_TOL = 1e-13

#: Chebyshev points evaluated per block when the coefficients are computed (memory cap).
_POINT_BLOCK = 512


def _symmetric(M: sp.csr_matrix) -> bool:
    """``M`` equals its transpose to ``SYMMETRY_RTOL`` times its largest entry (as the dense embedding)."""
    biggest = float(abs(M).max()) if M.nnz else 0.0
    diff = M - M.T
    return (float(abs(diff).max()) if diff.nnz else 0.0) <= SYMMETRY_RTOL * max(biggest, 1e-300)


def local_embedding(M: sp.csr_matrix, r0: int, r1: int, dilated: bool) -> sp.csr_matrix:
    """Rows ``[r0, r1)`` of the unscaled Hermitian embedding of ``M`` (CSR float64).

    Args:
        M: the square system matrix (CSR float64, the same on every rank).
        r0: first local row of the embedded operator.
        r1: one past the last local row.
        dilated: build ``[[0, M], [M^T, 0]]`` (else ``(M + M^T) / 2``).

    Returns:
        The local rows, all global columns.
    """
    n = M.shape[0]
    if not dilated:
        return sp.csr_matrix(0.5 * (M[r0:r1] + M.T.tocsr()[r0:r1]), dtype=np.float64)
    top = M[min(r0, n):min(r1, n)]
    top = sp.hstack([sp.csr_matrix((top.shape[0], n)), top]) if top.shape[0] else None
    lo, hi = max(r0, n) - n, max(r1, n) - n
    bottom = M[:, lo:hi].T.tocsr() if hi > lo else None
    bottom = sp.hstack([bottom, sp.csr_matrix((hi - lo, n))]) if bottom is not None else None
    parts = [p for p in (top, bottom) if p is not None]
    if not parts:
        return sp.csr_matrix((0, 2 * n), dtype=np.float64)
    return sp.csr_matrix(sp.vstack(parts), dtype=np.float64)


class EmbeddedOperator:
    """Owner of the PETSc ``Mat`` of the Hermitian embedding of ``M x = B`` and of ``b`` (context manager).

    Args:
        M: the system matrix (scipy.sparse or dense), the same on every rank.
        B: the right-hand side (length n), the same on every rank.
        comm: the mpi4py communicator.
        norm_steps: Lanczos steps of the estimate of ``||H||_2`` beyond ``DENSE_NORM_LIMIT`` rows.

    Attributes (after entering): ``mat`` (PETSc Mat, unscaled), ``b`` (PETSc Vec, normalised),
    ``n``, ``dilated``, ``size`` (rows of ``H``), ``dim`` (the padded dimension of the
    state-vector simulator), ``scale`` (``||H||_2``), ``b_norm`` (``||B||``), ``rows`` (local range).
    """

    def __init__(self, M: Any, B: np.ndarray, comm: Any, norm_steps: int = 300) -> None:
        self._M = sp.csr_matrix(M, dtype=np.float64)
        self._B = np.asarray(B, dtype=np.float64).reshape(-1)
        self.comm = comm
        self.norm_steps = int(norm_steps)
        n = self._M.shape[0]
        if self._M.shape != (n, n) or self._B.shape[0] != n:
            raise UserError(f"HHL: M must be square with b of matching length, got {self._M.shape} and {self._B.shape}")
        if not (np.all(np.isfinite(self._M.data)) and np.all(np.isfinite(self._B))):
            raise UserError("HHL: M or B contains NaN or Inf")
        if not np.any(self._B):
            raise UserError("HHL: right-hand side B is zero, |B> is undefined")
        self.n = n
        self.dilated = not _symmetric(self._M)
        self.size = 2 * n if self.dilated else n
        self.dim = padded_dim(self.size)
        self.rows = block_bounds(self.size, comm.Get_rank(), comm.Get_size())
        self.b_norm = float(np.linalg.norm(self._B))
        self.mat: Any = None
        self.b: Any = None
        self.scale = float("nan")
        self.norm_method = ""
        self._owner: Any = None

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
        from hpcqml.petsc import PetscOwner, aij_from_csr

        self._owner = owner = PetscOwner()
        r0, r1 = self.rows
        local = local_embedding(self._M, r0, r1, self.dilated).tocsr()
        local.sort_indices()
        self.mat = aij_from_csr(local, self.size, self.comm, owner, OPTIONS_PREFIX)
        self.b = owner.own(self.mat.createVecLeft())
        self.b.setArray(self.embed(self._B, rhs=True)[r0:r1] / self.b_norm)
        self.scale, self.norm_method = self._norm()
        if not self.scale > 0:
            raise UserError("HHL: M is the zero matrix")

    def _norm(self) -> tuple[float, str]:
        """``||H||_2``: exact (dense eigvalsh on rank 0, as the state-vector embedding) up to
        ``DENSE_NORM_LIMIT`` rows, else the Lanczos upper estimate.
        """
        if self.size > DENSE_NORM_LIMIT:
            return lanczos_norm_estimate(self.mat, self.comm, self.rows, self.norm_steps)
        value = None
        if self.comm.Get_rank() == 0:
            dense = local_embedding(self._M, 0, self.size, self.dilated).toarray()
            value = float(np.max(np.abs(np.linalg.eigvalsh(dense))))
        return float(self.comm.bcast(value, root=0)), "numpy eigvalsh (dense, exact)"

    def embed(self, x: np.ndarray, rhs: bool = False) -> np.ndarray:
        """The embedded vector of ``x`` (length ``size``): the right-hand side ``[B; 0]`` or solution ``[0; x]``."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.n:
            raise UserError(f"HHL: vector of length {x.shape[0]}, expected {self.n}")
        if not self.dilated:
            return x.copy()
        zero = np.zeros(self.n, dtype=np.float64)
        return np.concatenate([x, zero] if rhs else [zero, x])

    def gather(self, local: np.ndarray) -> np.ndarray:
        """The full embedded vector (padded to ``dim`` with zeros) from every rank's local part, on every rank."""
        full = np.concatenate(self.comm.allgather(np.asarray(local)))
        return np.concatenate([full, np.zeros(self.dim - self.size, dtype=full.dtype)])

    def solution_part(self, full: np.ndarray) -> np.ndarray:
        """The ``x`` block of a full embedded vector (length n)."""
        off = self.n if self.dilated else 0
        return np.asarray(full)[off:off + self.n]

    def destroy(self) -> None:
        """Destroy every PETSc/SLEPc object (safe to call twice)."""
        if self._owner is not None:
            self._owner.close()
        self.mat = self.b = None


#: relative margin added to the Lanczos estimate of ||H|| (large systems only)
NORM_MARGIN = 1e-3


def lanczos_norm_estimate(mat: Any, comm: Any, rows: tuple[int, int], steps: int,
                          seed: int = 20250) -> tuple[float, str]:
    """Upper estimate of ``||H||_2`` from ``steps`` Lanczos steps (no reorthogonalisation).

    With the tridiagonal ``T_k`` of the Krylov space of a seeded random start vector (the
    same on any number of ranks), the extreme Ritz value ``theta`` lies inside the spectrum
    and ``theta + beta_k |e_k^T y|`` (``y`` its Ritz vector) is the Lanczos upper estimate of
    Zhou and Li (2011): reliable in practice, not a proof. Overestimating ``||H||`` only
    shrinks the spectrum of ``H / scale`` inside ``[-1, 1]`` (an effective ``t0`` smaller by
    the same factor); an underestimate by a relative ``e`` leaves the Chebyshev series of
    degree ``K`` accurate up to a factor ``(1 + sqrt(2 e))^K`` on its tail.

    Returns:
        ``(estimate, method)``.
    """
    from mpi4py import MPI
    from scipy.linalg import eigh_tridiagonal

    n = mat.getSize()[0]
    r0, r1 = rows
    start = np.random.default_rng(seed).standard_normal(n)[r0:r1]
    q = mat.createVecRight()
    prev = q.duplicate()
    w = q.duplicate()
    try:
        norm = np.sqrt(comm.allreduce(float(start @ start), op=MPI.SUM))
        q.setArray(start / norm)
        prev.set(0.0)
        alphas, betas = [], []
        beta = 0.0
        for _ in range(min(steps, n)):
            mat.mult(q, w)
            alpha = w.dot(q)
            w.axpy(-alpha, q)
            w.axpy(-beta, prev)
            alphas.append(alpha)
            beta = w.norm()
            betas.append(beta)
            if beta <= 1e-14 * max(abs(a) for a in alphas):
                break
            q.copy(prev)
            w.copy(q)
            q.scale(1.0 / beta)
    finally:
        for vec in (q, prev, w):
            vec.destroy()
    theta, vecs = eigh_tridiagonal(np.array(alphas), np.array(betas[:-1]))
    i = int(np.argmax(np.abs(theta)))
    # a margin of 1e-3 against an unconverged extreme eigenvalue; the recurrence checks that
    # the spectrum of H/scale stays in [-1, 1] (its moments of b stay bounded by 1)
    estimate = float(abs(theta[i]) + betas[-1] * abs(vecs[-1, i])) * (1.0 + NORM_MARGIN)
    return estimate, f"Lanczos upper estimate ({len(alphas)} steps) x (1 + {NORM_MARGIN:g})"


# ---------------------------------------------------------------------------------------
# Chebyshev degree and coefficients
def bessel_tail_bound(w: float, K: int) -> float:
    """``sum_{k>K} (w/2)^k / k!`` bounded by a geometric series (valid once ``K + 2 > w/2``), else ``inf``."""
    half = abs(float(w)) / 2.0
    if half == 0.0:
        return 0.0
    ratio = half / (K + 2)
    if ratio >= 1.0:
        return float("inf")
    log_first = (K + 1) * log(half) - lgamma(K + 2)
    return float(np.exp(log_first) / (1.0 - ratio))


def chebyshev_degree(clock_qubits: int, t0: float, tol: float = DEFAULT_TOL) -> tuple[int, float]:
    """Least degree ``K`` whose sup-norm error bound ``4 N_c tail(w_max, K)`` is at most ``tol``.

    ``w_max = (N_c - 1) t0`` is the highest frequency of the clock functions (module docstring).

    Returns:
        ``(K, bound)``.
    """
    Nc = 2**clock_qubits
    w = (Nc - 1) * float(t0)
    K = max(int(w / 2), 1)
    while 4.0 * Nc * bessel_tail_bound(w, K) > tol:
        K += max(K // 64, 1)
    return K, 4.0 * Nc * bessel_tail_bound(w, K)


def _clock_values(x: np.ndarray, clock_qubits: int, t0: float, amps: list[np.ndarray],
                  traced: bool) -> dict[str, np.ndarray]:
    """Values at the points ``x`` of ``g_r`` (per branch), ``h`` and, if ``traced``, ``F_k`` of branch 0.

    Mirrors the operations of :func:`hpcqml.hhl.statevector.simulate_hhl` with ``beta = 1``.
    """
    Nc = 2**clock_qubits
    k = np.arange(Nc, dtype=np.float64)[:, None]
    psi = np.exp(1j * k * t0 * x[None, :]) / np.sqrt(Nc)
    psi = np.fft.fft(psi, axis=0) / np.sqrt(Nc)  # alpha_y(x), rows y
    out: dict[str, np.ndarray] = {"g": np.empty((len(amps), x.size)), "h": np.zeros(x.size)}
    for r, amp in enumerate(amps):
        phi = np.fft.ifft(psi * amp[:, None], axis=0) * np.sqrt(Nc)
        phi *= np.exp(-1j * k * t0 * x[None, :])
        out["h"] += np.sum(np.abs(phi) ** 2, axis=0)
        out["g"][r] = (phi.sum(axis=0) / np.sqrt(Nc)).real
        if r == 0 and traced:
            out["F"] = phi
    return out


def _dct_coefficients(values: np.ndarray) -> np.ndarray:
    """Chebyshev coefficients (last axis) from values at the points ``cos(pi j / P)``, ``j = 0..P``."""
    P = values.shape[-1] - 1
    coef = scipy.fft.dct(values, type=1, axis=-1) / P
    coef[..., 0] /= 2.0
    coef[..., -1] /= 2.0
    return coef


@dataclass
class ClockExpansion:
    """Chebyshev coefficients (degree ``K``) of every function one clock size needs.

    Attributes:
        g: ``(variants, branches=2, K+1)`` float64, ``g_r`` per variant (branch 1 is zero for plain HHL).
        h: ``(variants, K+1)`` float64.
        F: ``(variants, N_c, K+1)`` complex128, the clock-``k`` functions of branch 0, or None.
        degree: ``K``; bound: the sup-norm error bound of each function.
    """

    g: np.ndarray
    h: np.ndarray
    F: np.ndarray | None
    degree: int
    bound: float


def clock_expansion(clock_qubits: int, t0: float, variants: list[tuple[float, float | None]],
                    tol: float = DEFAULT_TOL, traced: bool = True) -> ClockExpansion:
    """Chebyshev coefficients of ``g_r``, ``h`` (and ``F_k``) for each ``(C, kappa_a)`` variant.

    Args:
        clock_qubits: ``c``.
        t0: evolution time (``||H|| = 1``).
        variants: ``(C, kappa_a)`` pairs; ``kappa_a = None`` is plain HHL.
        tol: bound on the sup-norm error of each truncated series (module docstring).
        traced: also expand the clock-``k`` functions of the clock-traced fidelity.

    Returns:
        The :class:`ClockExpansion`.
    """
    K, bound = chebyshev_degree(clock_qubits, t0, tol)
    P = 2 * K
    x = np.cos(np.pi * np.arange(P + 1) / P)
    Nc, V = 2**clock_qubits, len(variants)
    g = np.zeros((V, 2, P + 1))
    h = np.zeros((V, P + 1))
    F = np.zeros((V, Nc, P + 1), dtype=np.complex128) if traced else None
    for v, (C, ka) in enumerate(variants):
        amps = rotation_branches(clock_qubits, t0, C, ka)
        for s in range(0, P + 1, _POINT_BLOCK):
            vals = _clock_values(x[s:s + _POINT_BLOCK], clock_qubits, t0, amps, traced)
            g[v, :len(amps), s:s + _POINT_BLOCK] = vals["g"]
            h[v, s:s + _POINT_BLOCK] = vals["h"]
            if F is not None:
                F[v, :, s:s + _POINT_BLOCK] = vals["F"]
    Fc = None
    if F is not None:
        Fc = (_dct_coefficients(F.real) + 1j * _dct_coefficients(F.imag))[..., :K + 1]
    return ClockExpansion(g=_dct_coefficients(g)[..., :K + 1], h=_dct_coefficients(h)[..., :K + 1],
                          F=Fc, degree=K, bound=bound)


# ---------------------------------------------------------------------------------------
# the simulation
@dataclass
class KrylovHHLResult:
    """One simulated (truncated) HHL run by matrix functions; the numbers match :class:`HHLResult`.

    Attributes:
        state_local: this rank's rows of the normalised post-selected state, float64
            ``(branches, local rows)`` (branch 0 = plain/well, 1 = ill for truncated runs).
        p_success, p_ancilla, leakage: as in :class:`hpcqml.hhl.statevector.HHLResult`.
        fidelity: ``|<z|x_well>|^2`` with the normalised reference ``z`` (nan without a reference).
        overlap: ``sqrt(fidelity)`` (the quantity of eq. II.87 for truncated runs).
        density_fidelity: ``<z|rho|z>`` with the clock traced out (nan when not computed).
        x_norm_estimate: ``sqrt(p_success) ||B|| / (C ||M||_2)`` (plain HHL with unsaturated C), else nan.
        degree: Chebyshev degree ``K``; error_bound: sup-norm bound of each function's series.
        matvecs: products with ``H`` of the recurrence (shared by every variant at this clock size).
    """

    clock_qubits: int
    t0: float
    C: float
    kappa_a: float | None
    p_success: float
    p_ancilla: float
    leakage: float
    fidelity: float
    overlap: float
    density_fidelity: float
    x_norm_estimate: float
    degree: int
    error_bound: float
    matvecs: int
    qubits: dict
    state_local: np.ndarray = field(repr=False)


def _reference_local(op: EmbeddedOperator, x_ref: np.ndarray | None) -> np.ndarray | None:
    """This rank's rows of the normalised embedded reference, or None."""
    if x_ref is None:
        return None
    z = op.embed(x_ref)
    nz = float(np.linalg.norm(z))
    if not nz > 0:
        raise UserError("HHL: the reference solution is zero")
    r0, r1 = op.rows
    return z[r0:r1] / nz


def _recurrence(op: EmbeddedOperator, K: int, outs: tuple[np.ndarray, np.ndarray],
                z: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Run ``v_k = T_k(H / scale) b`` for ``k = 0..K``; accumulate ``outs += coef[..., k] v_k``.

    ``outs`` is ``(coefficients (V, 2, K+1), accumulators (V, 2, local rows))``; series with
    all-zero coefficients (the ill branch of plain HHL) are skipped. Returns the global
    moments ``b^T v_k`` and ``z^T v_k``.
    """
    from scipy.linalg.blas import daxpy

    coefs, acc = outs
    active = [(i, j) for i in range(coefs.shape[0]) for j in range(coefs.shape[1]) if np.any(coefs[i, j])]
    mat = op.mat
    prev = op.b.duplicate()
    op.b.copy(prev)
    cur = op.b.duplicate()
    nxt = op.b.duplicate()
    try:
        b_loc = np.array(op.b.getArray(), dtype=np.float64)
        mb = np.zeros(K + 1)
        mz = np.zeros(K + 1)
        inv = 1.0 / op.scale
        for k in range(K + 1):
            if k == 0:
                v = prev
            elif k == 1:
                mat.mult(prev, cur)
                cur.scale(inv)
                v = cur
            else:
                mat.mult(cur, nxt)
                nxt.scale(2.0 * inv)
                nxt.axpy(-1.0, prev)
                prev, cur, nxt = cur, nxt, prev
                v = cur
            arr = v.getArray(readonly=True)
            for i, j in active:
                daxpy(arr, acc[i, j], a=coefs[i, j, k])  # in place: acc[i, j] += coef * v_k
            mb[k] = b_loc @ arr
            if z is not None:
                mz[k] = z @ arr
    finally:
        for vec in (prev, cur, nxt):
            vec.destroy()
    from mpi4py import MPI

    moments = np.stack([mb, mz])
    op.comm.Allreduce(MPI.IN_PLACE, moments, op=MPI.SUM)
    # b is a unit vector, so b^T T_k(H/scale) b lies in [-1, 1] while the spectrum of H/scale
    # does; beyond it T_k grows like cosh(k acosh|x|) and the series' error bound is void
    worst = float(np.max(np.abs(moments[0])))
    if worst > 1.0 + 1e-8 * (K + 1):
        from hpcqml.errors import NumericalError

        raise NumericalError(f"HHL krylov: |b^T T_k(H/scale) b| reaches {worst:.6g} > 1, so the spectrum of H "
                             f"leaves [-scale, scale] (scale {op.scale:.6g} from {op.norm_method}); the "
                             f"Chebyshev error bound would not hold")
    return moments[0], moments[1]


def simulate_hhl_krylov(op: EmbeddedOperator, clock_qubits: int, kappas: list[float | None],
                        x_ref: np.ndarray | None = None, C: float | None = None, t0: float | None = None,
                        tol: float = DEFAULT_TOL, traced: bool = True) -> list[KrylovHHLResult]:
    """Plain (``kappa_a = None``) and truncated HHL at one clock size by Chebyshev matrix functions.

    Collective over ``op.comm``. One three-term recurrence of ``K`` products with ``H``
    serves every entry of ``kappas`` (module docstring for the functions and the error bound).

    Args:
        op: the embedded operator (entered).
        clock_qubits: ``c`` (at least 2).
        kappas: the variants: ``None`` for plain HHL, else ``kappa_a`` of eq. II.86.
        x_ref: the reference solution of ``M x = B`` (length n, every rank), or None.
        C: rotation constant, default :func:`hpcqml.hhl.statevector.default_C` per variant.
        t0: evolution time, default :func:`hpcqml.hhl.statevector.default_t0`.
        tol: sup-norm error bound of every Chebyshev series.
        traced: also compute the clock-traced fidelity (needs ``x_ref``).

    Returns:
        One :class:`KrylovHHLResult` per entry of ``kappas``, in order.

    Raises:
        UserError: bad parameters, or nothing survives the post-selection.
    """
    if not isinstance(clock_qubits, (int, np.integer)) or clock_qubits < 2:
        raise UserError(f"HHL: clock_qubits must be an integer >= 2, got {clock_qubits!r}")
    t0 = default_t0(clock_qubits) if t0 is None else float(t0)
    if not 0.0 < t0 < np.pi:
        raise UserError(f"HHL: t0 must lie in (0, pi) (eigenvalues +-1 alias beyond), got {t0!r}")
    variants = []
    for ka in kappas:
        if ka is not None and not ka > 0:
            raise UserError(f"HHL: kappa_a must be > 0, got {ka!r}")
        Cv = default_C(clock_qubits, t0, ka) if C is None else float(C)
        if not 0.0 < Cv <= 1.0:
            raise UserError(f"HHL: rotation constant C must lie in (0, 1], got {Cv!r}")
        variants.append((Cv, ka))
    z = _reference_local(op, x_ref)
    exp = clock_expansion(clock_qubits, t0, variants, tol, traced=traced and z is not None)
    V, K = len(variants), exp.degree
    r0, r1 = op.rows
    # one coefficient table: per variant the two g branches, then h-less rows are moments only
    acc = np.zeros((V, 2, r1 - r0))
    mb, mz = _recurrence(op, K, (exp.g, acc), z)
    sums = np.zeros((V, 3))  # ||out_0||^2, ||out_1||^2, z^T out_0 (local)
    sums[:, 0] = np.sum(acc[:, 0] ** 2, axis=-1)
    sums[:, 1] = np.sum(acc[:, 1] ** 2, axis=-1)
    if z is not None:
        sums[:, 2] = acc[:, 0] @ z
    from mpi4py import MPI

    op.comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    results = []
    for v, (Cv, ka) in enumerate(variants):
        p_succ = float(sums[v, 0] + sums[v, 1])
        if p_succ <= 1e-300:
            raise UserError("HHL: post-selection probability is zero (no eigenvalue was inverted)")
        p_anc = float(exp.h[v] @ mb)
        fid = float(sums[v, 2] ** 2 / p_succ) if z is not None else float("nan")
        dens = float("nan")
        if exp.F is not None:
            dens = float(np.sum(np.abs(exp.F[v] @ mz) ** 2) / p_anc)
        smallest = 2.0 * np.pi / (t0 * 2**clock_qubits)
        xnorm = (float(np.sqrt(p_succ) * op.b_norm / (Cv * op.scale))
                 if ka is None and Cv <= smallest * (1.0 + 1e-12) else float("nan"))
        qubits = {"system": int(op.dim).bit_length() - 1, "clock": int(clock_qubits), "ancilla": 1,
                  "flag": 0 if ka is None else 1}
        qubits["total"] = sum(qubits.values())
        results.append(KrylovHHLResult(
            clock_qubits=int(clock_qubits), t0=t0, C=Cv, kappa_a=ka, p_success=p_succ, p_ancilla=p_anc,
            leakage=1.0 - p_succ / p_anc if p_anc > 0 else 0.0, fidelity=fid, overlap=float(np.sqrt(fid)),
            density_fidelity=dens, x_norm_estimate=xnorm, degree=K, error_bound=exp.bound, matvecs=K,
            qubits=qubits, state_local=acc[v, :1 if ka is None else 2] / np.sqrt(p_succ)))
    return results


def memory_estimate_bytes(size: int, nnz: int, clock_qubits: int, variants: int = 1,
                          ranks: int = 1, t0: float | None = None) -> int:
    """Peak memory per rank of :func:`simulate_hhl_krylov` (bytes, model).

    The local rows of ``H`` (AIJ: 12 bytes per non-zero plus 8 per row, and the copy the
    embedding builds), five recurrence and right-hand-side vectors, two accumulators per
    variant, and the coefficient tables: values of ``F_k`` at ``2K + 1`` points
    (``N_c (2K + 1)`` complex128 per variant) dominate for large clocks.
    """
    t0 = default_t0(clock_qubits) if t0 is None else t0
    K, _ = chebyshev_degree(clock_qubits, t0)
    rows = -(-size // max(ranks, 1))
    local_nnz = -(-nnz // max(ranks, 1))
    matrix = 2 * (12 * local_nnz + 8 * rows)
    vectors = 8 * rows * (5 + 2 * variants)
    tables = variants * (2**clock_qubits) * (2 * K + 1) * 16 * 2 + _POINT_BLOCK * 2**clock_qubits * 16 * 4
    return int(matrix + vectors + tables)


def matvec_count(clock_qubits: int, t0: float | None = None) -> int:
    """Products with ``H`` per clock size (the Chebyshev degree ``K``), the time model's unit."""
    t0 = default_t0(clock_qubits) if t0 is None else t0
    return chebyshev_degree(clock_qubits, t0)[0]
