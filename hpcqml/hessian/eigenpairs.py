"""Extreme eigenpairs by restarted Lanczos, and SLQ deflated of them.

Top-k eigenpairs (thick-restart Lanczos, in the Krylov-Schur form for a symmetric operator).
A Krylov basis ``V = [v_1 .. v_p]`` (orthonormal rows, sharded by parameter slices exactly as
the SLQ basis of :mod:`hpcqml.hessian.lanczos`) and the projected matrix ``M = V H V^T``
satisfy

    H V^T = V^T M + beta v_{p+1} e_p^T.

Each new vector is orthogonalised against the whole basis (classical Gram-Schmidt, twice when
the first pass cancelled more than 1 - 1/sqrt(2) of the norm); the Gram-Schmidt coefficients
are the new column of ``M``, so ``M`` is formed in float64 from the computed products and not
assumed tridiagonal.  When the basis holds ``ncv`` vectors, ``M = S diag(theta) S^T`` gives
the Ritz pairs ``(theta_i, u_i = V^T s_i)`` with residual estimates
``||H u_i - theta_i u_i|| = beta |S_{p,i}|``.  A restart keeps the ``l`` Ritz vectors nearest
the wanted end(s) and the residual vector; ``M`` becomes ``diag(theta_kept)`` bordered by
``beta S_{p,kept}`` (an arrowhead), and the expansion continues from there (Wu & Simon 2000;
Stewart 2001).

Convergence is declared only after a fresh product per wanted vector: with ``rho_i = u_i^T H u_i``
(the Rayleigh quotient of the normalised Ritz vector) the explicit residual
``||H u_i - rho_i u_i||`` must be at most ``tol * scale``, ``scale`` being the largest
``|theta|`` seen (an estimate of ``||H||_2``).  Each interval ``[rho_i - r_i, rho_i + r_i]`` then
holds an eigenvalue of ``H``.  A run that has not converged when its restart budget ends
raises :class:`hpcqml.errors.NumericalError` naming the residuals.

Deflated SLQ.  With the computed eigenvectors ``U`` (k x n, orthonormal rows) and
``P = I - U^T U``, the deflated operator is ``P H P``.  For a probe ``z`` (Rademacher,
``E[z z^T] = I``) let ``y = P z`` and run Lanczos on ``P H P`` from ``y / ||y||`` (m steps;
Gauss nodes ``theta_j``, weights ``tau_j``).  The probe's measure is

    mu_z = (1/n) sum_{i<=k} delta(lambda - lambda_i)  +  (||y||^2 / n) sum_j tau_j delta(lambda - theta_j).

Unbiasedness.  Let ``U`` span an invariant subspace (``H U^T = U^T diag(lambda_1..k)``) and
``p`` be a polynomial of degree < 2m.  The Gauss rule is exact for ``p``:
``sum_j tau_j p(theta_j) = y^T p(PHP) y / ||y||^2``, and on ``range(P)``, ``p(PHP) = p(H)``, so
``||y||^2 sum_j tau_j p(theta_j) = z^T P p(H) P z``.  Its expectation is
``tr(P p(H) P) = tr p(H) - sum_{i<=k} p(lambda_i)``, whence ``E[mu_z(p)] = tr p(H) / n``:
the measure is an unbiased estimate of the spectral measure of ``H`` for every polynomial of
degree < 2m, for Rademacher and Gaussian probes alike.  The weight of the SLQ part is
``||y||^2 / n`` and not ``(n - k)/n``: for a Rademacher ``z`` the squared norm
``||P z||^2 = z^T P z`` varies from probe to probe (mean ``n - k``, variance
``2 (||P||_F^2 - sum_i P_ii^2)``), and dividing it out gives a ratio estimator whose bias is of
the order of that relative variance (unbiased only for Gaussian probes, whose direction is
independent of their norm).  The per-probe total mass is ``(k + ||y||^2)/n``: 1 in expectation,
not exactly; quantities normalised by a mass (E(t) of eq. III.13, Delta_+/Delta of eq. II.28)
are ratios of such unbiased means.  With computed (not exact) eigenvectors the same argument
holds for the block-diagonal operator ``U^T diag(rho) U + P H P``, which differs from ``H`` by
the coupling ``P H U^T`` of norm at most ``||H U^T - U^T diag(rho)||_2`` (at most the root sum
of squares of the explicit residuals): each eigenvalue moves by no more than that (Weyl).

Deflation removes from every probe the contribution of the outliers, which for ``E(t)`` at
large t (terms ``|1 + a|^t``) carry most of the probe-to-probe variance; the outliers enter
exactly, with weight 1/n each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hpcqml.errors import NumericalError, UserError
from hpcqml.hessian.hvp import check_finite
from hpcqml.hessian.lanczos import (
    LanczosResult,
    _Dist,
    _project,
    _subtract,
    _sum_scalar,
    lanczos,
    rademacher_slice,
)
from hpcqml.hessian.slq import operator_size
from hpcqml.hessian.spectrum import Spectrum, pad
from hpcqml.parallel import allreduce_sum

WHICH = ("largest", "smallest", "both_ends", "largest_magnitude")
# probe numbers of the random vectors drawn when the Krylov space becomes invariant
# (far from the SLQ probe numbers 0, 1, 2, ...)
_FRESH_PROBE = 1 << 40
_COLS = 1 << 22  # columns per chunk of the float64 temporaries (bounded memory)


@dataclass
class Eigenpairs:
    """Eigenpairs of a symmetric operator from :func:`top_eigenpairs`.

    Layout.  ``vectors`` is this rank's slice of the eigenvectors: a tensor of shape
    ``(k, hi - lo)`` (row i = coordinates ``[lo, hi)`` of the unit eigenvector of ``values[i]``),
    ``[lo, hi) = hpcqml.parallel.block_bounds(n, rank, size)`` of the communicator, the same
    slices as the SLQ Krylov basis.  ``values`` (float64, ascending) are the Rayleigh quotients
    ``u^T H u`` from a fresh product; ``residuals`` the explicit ``||H u - value u||``, so an
    eigenvalue of ``H`` lies within ``values[i] +- residuals[i]``.
    """

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
    n: int
    lo: int
    hi: int
    which: str
    tol: float
    scale: float
    restarts: int
    products: int

    @property
    def k(self) -> int:
        """Number of eigenpairs."""
        return int(self.values.size)

    def gather_vectors(self, comm: Any = None) -> np.ndarray:
        """The whole eigenvectors, ``(k, n)`` float64, on every rank (collective; small n only)."""
        local = self.vectors.detach().cpu().to(torch.float64).numpy()
        if comm is None or comm.Get_size() == 1:
            return local.copy()
        parts = comm.allgather(local)
        return np.concatenate(parts, axis=1)

    def gather_vector(self, i: int, comm: Any = None, root: int = 0) -> np.ndarray | None:
        """Eigenvector ``i`` whole (float64, length n) on ``root``, None elsewhere (collective).

        One vector at a time, so a writer on ``root`` can store the vectors row by row (for
        example into a dataset of shape (k, n) chunked by rows) holding one length-n vector.
        """
        local = np.ascontiguousarray(self.vectors[i].detach().cpu().to(torch.float64).numpy())
        if comm is None or comm.Get_size() == 1:
            return local.copy()
        from mpi4py import MPI

        dist = _Dist(comm, self.n)
        out = np.empty(self.n, dtype=np.float64) if comm.Get_rank() == root else None
        recv = [out, dist.counts, dist.displs, MPI.DOUBLE] if out is not None else None
        comm.Gatherv([local, MPI.DOUBLE], recv, root=root)
        return out


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` in order of preference for ``which`` (wanted ones first).

    ``both_ends`` alternates largest, smallest, second largest, ... (so k wanted are the
    ceil(k/2) largest and floor(k/2) smallest).
    """
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    if which == "largest_magnitude":
        return np.argsort(-np.abs(theta), kind="stable")
    up = np.argsort(theta, kind="stable")
    out: list[int] = []
    lo, hi = 0, theta.size - 1
    while lo <= hi:
        out.append(int(up[hi]))
        hi -= 1
        if lo <= hi:
            out.append(int(up[lo]))
            lo += 1
    return np.array(out, dtype=np.int64)


def _check(n: int, k: int, which: str, tol: float, max_restarts: int, ncv: int | None) -> int:
    """Validate the arguments of :func:`top_eigenpairs`; return the basis size ncv."""
    if which not in WHICH:
        raise UserError(f"which = {which!r}: not one of {', '.join(WHICH)}")
    if not 1 <= int(k) <= n:
        raise UserError(f"eigenpairs k = {k}: must be between 1 and the operator size n = {n}")
    if not tol > 0:
        raise UserError(f"eigenpair tolerance tol = {tol}: must be > 0")
    if int(max_restarts) < 0:
        raise UserError(f"max_restarts = {max_restarts}: must be >= 0")
    if ncv is None:
        return min(n, max(2 * int(k) + 1, int(k) + 16))
    if not (int(k) < int(ncv) <= n or int(ncv) == n):
        raise UserError(f"Krylov basis size ncv = {ncv}: must be above k = {k} and at most n = {n}")
    return int(ncv)


def _orthogonalise(V: torch.Tensor, w: torch.Tensor, dist: _Dist) -> tuple[np.ndarray, float]:
    """Classical Gram-Schmidt of the slice ``w`` (float64, in place) against the rows of ``V``.

    A second pass runs when the first removed more than 1 - 1/sqrt(2) of the norm
    (Kahan-Parlett).  Returns the summed coefficients ``V w`` (float64, the new column of the
    projected matrix) and ``||w||`` after.
    """
    h = np.zeros(V.shape[0], dtype=np.float64)
    before = float(np.sqrt(_sum_scalar(dist, float(w @ w))))
    after = before
    for _ in range(2):
        coef = allreduce_sum(dist.comm, _project(V, w, _COLS), perf=dist.perf)
        _subtract(V, coef, w, _COLS)
        h += coef
        after = float(np.sqrt(_sum_scalar(dist, float(w @ w))))
        if after >= before / np.sqrt(2.0):
            break
        before = after
    return h, after


class _Operator:
    """The product on this rank's slice: gather the full vector, ``matvec``, keep ``[lo, hi)``."""

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor], dist: _Dist, dtype: torch.dtype,
                 device: torch.device, on_product: Callable[[], None]) -> None:
        self.matvec, self.dist, self.dtype, self.device = matvec, dist, dtype, device
        self.on_product = on_product

    def __call__(self, x_loc: torch.Tensor, where: str) -> torch.Tensor:
        """``(H x)[lo:hi]`` in float64 for the slice ``x_loc``."""
        full = self.dist.gather(x_loc.to(torch.float64), self.device).to(self.dtype)
        out = self.matvec(full)
        check_finite(out, where)
        self.on_product()
        return out[self.dist.lo:self.dist.hi].to(device=x_loc.device, dtype=torch.float64)


@dataclass
class _Basis:
    """Krylov basis rows ``V`` (ncv + 1, slice) and the float64 projected matrix ``M``."""

    V: torch.Tensor
    M: np.ndarray
    beta: float = 0.0
    size: int = 0                     # vectors 0..size-1 form the basis, V[size] the next one
    fresh: int = 0                    # random vectors drawn after invariant subspaces


def _fresh_vector(basis: _Basis, dist: _Dist, seed: int) -> float:
    """Put a random unit vector orthogonal to the basis (size >= 1) into ``V[size]``.

    Returns the norm left after orthogonalising the Rademacher draw (of norm sqrt(n)); a draw
    keeping less than 1e-3 of its norm is replaced (at most three tries).
    """
    for _ in range(3):
        z = torch.from_numpy(rademacher_slice(dist.n, dist.lo, dist.hi, seed, _FRESH_PROBE + basis.fresh))
        basis.fresh += 1
        w = z.to(device=basis.V.device, dtype=torch.float64)
        _, norm = _orthogonalise(basis.V[:basis.size], w, dist)
        if norm > 1e-3 * np.sqrt(dist.n):
            basis.V[basis.size] = (w / norm).to(basis.V.dtype)
            return norm
    raise NumericalError("restarted Lanczos: no random vector independent of the Krylov basis was found")


def _expand(basis: _Basis, ncv: int, product: _Operator, dist: _Dist, seed: int, rtol: float) -> None:
    """Grow the basis to ``ncv`` vectors (collective); fills ``M`` and ``basis.beta``."""
    n = dist.n
    for p in range(basis.size, ncv):
        basis.size = p + 1
        w = product(basis.V[p], f"restarted Lanczos, basis vector {p}")
        h, beta = _orthogonalise(basis.V[:p + 1], w, dist)
        basis.M[:p + 1, p] = h
        basis.M[p, :p + 1] = h
        scale = max(float(np.max(np.abs(basis.M[:p + 1, :p + 1]))), 1e-300)
        basis.beta = beta
        if p + 1 == n:
            basis.beta = 0.0      # the basis spans the whole space: M is exact
            return
        if beta <= rtol * scale:  # invariant subspace: continue from a fresh direction
            basis.beta = 0.0
            _fresh_vector(basis, dist, seed)
            continue
        basis.V[p + 1] = (w / beta).to(basis.V.dtype)
        if p + 1 < ncv:
            basis.M[p + 1, p] = basis.M[p, p + 1] = beta


def _ritz(basis: _Basis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values, eigenvectors ``S`` of the symmetrised ``M`` and residual estimates."""
    p = basis.size
    M = basis.M[:p, :p]
    theta, S = np.linalg.eigh(0.5 * (M + M.T))
    return theta, S, np.abs(basis.beta * S[p - 1, :])


def _combine(basis: _Basis, S: np.ndarray) -> torch.Tensor:
    """``S^T V`` over the basis rows, in float64, chunked over columns: (cols of S, slice)."""
    p = basis.size
    Sm = torch.from_numpy(np.ascontiguousarray(S.T)).to(device=basis.V.device, dtype=torch.float64)
    out = torch.empty((S.shape[1], basis.V.shape[1]), dtype=torch.float64, device=basis.V.device)
    for s in range(0, basis.V.shape[1], _COLS):
        out[:, s:s + _COLS] = Sm @ basis.V[:p, s:s + _COLS].to(torch.float64)
    return out


def _restart(basis: _Basis, theta: np.ndarray, S: np.ndarray, keep: np.ndarray) -> None:
    """Thick restart: keep the Ritz vectors ``keep`` and the residual vector (arrowhead ``M``)."""
    p, nk = basis.size, keep.size
    coupling = basis.beta * S[p - 1, keep]
    kept = _combine(basis, S[:, keep])
    basis.V[:nk] = kept.to(basis.V.dtype)
    basis.V[nk] = basis.V[p]
    basis.M[:] = 0.0
    basis.M[np.arange(nk), np.arange(nk)] = theta[keep]
    basis.M[nk, :nk] = coupling
    basis.M[:nk, nk] = coupling
    basis.size = nk


def _explicit(U: torch.Tensor, product: _Operator, dist: _Dist) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh quotients and explicit residual norms of the unit rows of ``U`` (fresh products)."""
    rho = np.empty(U.shape[0])
    res = np.empty(U.shape[0])
    for i in range(U.shape[0]):
        u = U[i]
        norm2 = _sum_scalar(dist, float(u @ u))
        Hu = product(u, f"eigenpair residual check, vector {i}")
        rho[i] = _sum_scalar(dist, float(u @ Hu)) / norm2
        r = Hu - rho[i] * u
        res[i] = float(np.sqrt(_sum_scalar(dist, float(r @ r)) / norm2))
    return rho, res


def top_eigenpairs(op: Any, k: int, which: str = "largest", *, comm: Any = None, tol: float | None = None,
                   max_restarts: int = 100, seed: int = 0, dtype: torch.dtype = torch.float64,
                   ncv: int | None = None, device: torch.device | str | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> Eigenpairs:
    """The k extreme eigenpairs of a symmetric operator by thick-restart Lanczos (module docstring).

    Args:
        op: an object with ``n`` (or a square ``shape``) and ``matvec`` on full length-n
            tensors, collective over ``comm`` (e.g. :class:`hpcqml.hessian.HessianLinearOperator`).
        k: number of eigenpairs (1 <= k <= n).
        which: ``largest`` / ``smallest`` (algebraic), ``both_ends`` (ceil(k/2) largest and
            floor(k/2) smallest) or ``largest_magnitude`` (largest ``|lambda|``).
        comm: MPI communicator ``op`` is collective over; the basis is sharded over it.
        tol: residual tolerance relative to ``||H||_2`` (estimated by the largest ``|theta|``);
            default ``sqrt(eps)`` of the product dtype (1.5e-8 in float64, 3.5e-4 in float32),
            about the smallest residual the products can certify.
        max_restarts: restarts allowed before the run fails.
        seed: start vector ``rademacher_slice(n, .., seed, 0)`` (and fresh directions).
        dtype: dtype of the stored basis (float64 default; the products take the operator's
            ``dtype`` when it has one).
        ncv: basis size (default ``min(n, max(2k + 1, k + 16))``).
        device: where the products take their vectors (default: the operator's ``device``).
        on_progress: ``on_progress(done, total)`` after every product, on every rank (print
            on rank 0): products done and the most the budget allows (so rate and an upper
            bound of the time left follow).

    Returns:
        The :class:`Eigenpairs` (values ascending, this rank's slice of the vectors).

    Raises:
        UserError: bad ``k``, ``which``, ``tol``, ``max_restarts`` or ``ncv``.
        NumericalError: not converged within ``max_restarts`` (the message lists the
            residuals), or a non-finite product.
    """
    n = operator_size(op)
    ncv = _check(n, k, which, 1.0 if tol is None else tol, max_restarts, ncv)
    k = int(k)
    op_dtype = getattr(op, "dtype", None) or dtype
    if tol is None:
        tol = float(np.sqrt(torch.finfo(op_dtype).eps))
    dev = torch.device(device if device is not None else getattr(op, "device", "cpu"))
    dist = _Dist(comm, n)
    keep = min(ncv - 1, k + max(1, (ncv - k) // 2)) if ncv < n else k
    budget = ncv + int(max_restarts) * (ncv - keep) + (int(max_restarts) + 1) * k
    count = [0]

    def tick() -> None:
        count[0] += 1
        if on_progress is not None:
            on_progress(min(count[0], budget), budget)

    product = _Operator(op.matvec, dist, op_dtype, dev, tick)
    basis = _Basis(V=torch.zeros((ncv + 1, dist.hi - dist.lo), dtype=dtype),
                   M=np.zeros((ncv + 1, ncv + 1), dtype=np.float64))
    _start(basis, dist, seed)
    rtol = 100.0 * float(torch.finfo(dtype).eps)
    scale, last = 0.0, np.full(k, np.inf)
    for restart in range(int(max_restarts) + 1):
        _expand(basis, ncv, product, dist, seed, rtol)
        theta, S, est = _ritz(basis)
        scale = max(scale, float(np.max(np.abs(theta))), 1e-300)
        order = _order(theta, which)
        wanted = order[:k]
        last = est[wanted]
        if np.all(est[wanted] <= tol * scale):
            U = _combine(basis, S[:, wanted])
            rho, res = _explicit(U, product, dist)
            last = res
            if np.all(res <= tol * scale):
                idx = np.argsort(rho, kind="stable")
                return Eigenpairs(values=rho[idx], vectors=U[idx].to(dtype), residuals=res[idx], n=n,
                                  lo=dist.lo, hi=dist.hi, which=which, tol=float(tol), scale=scale,
                                  restarts=restart, products=count[0])
        if basis.size == n or restart == int(max_restarts):
            break
        _restart(basis, theta, S, np.sort(order[:keep]))
    raise NumericalError(
        f"top_eigenpairs: {k} {which} eigenpairs not converged after {max_restarts} restarts "
        f"({count[0]} products): residuals {np.array2string(np.asarray(last), precision=3)} against "
        f"tol * ||H|| = {tol * scale:.3g}; raise max_restarts or ncv, or loosen tol")


def _start(basis: _Basis, dist: _Dist, seed: int) -> None:
    """``V[0]``: the unit Rademacher start vector ``rademacher_slice(n, .., seed, 0)``."""
    z = torch.from_numpy(rademacher_slice(dist.n, dist.lo, dist.hi, seed, 0))
    basis.V[0] = (z / np.sqrt(dist.n)).to(basis.V.dtype)


class DeflatedOperator:
    """``P H P`` with ``P = I - U^T U`` for computed eigenvectors ``U`` (module docstring).

    ``matvec`` takes and returns full length-n vectors (collective over ``comm``, like the
    operator it wraps); ``U`` stays sharded: ``U x`` is a sum of slice products over the
    ranks and ``P x`` is assembled with one allgather.
    """

    def __init__(self, op: Any, pairs: Eigenpairs, comm: Any = None) -> None:
        self.op = op
        self.n = operator_size(op)
        if pairs.n != self.n:
            raise UserError(f"eigenpairs of an operator of size {pairs.n} cannot deflate one of size {self.n}")
        self.dist = _Dist(comm, self.n)
        if (pairs.lo, pairs.hi) != (self.dist.lo, self.dist.hi):
            raise UserError(f"eigenvector slice [{pairs.lo}, {pairs.hi}) does not match this communicator's "
                            f"[{self.dist.lo}, {self.dist.hi})")
        self.U = pairs.vectors.detach().cpu().to(torch.float64)
        self.dtype = getattr(op, "dtype", None) or torch.float64
        self.device = torch.device(getattr(op, "device", "cpu"))

    def project_slice(self, x_loc: torch.Tensor) -> torch.Tensor:
        """``(P x)[lo:hi]`` from the slice ``x_loc`` (float64; collective)."""
        x = x_loc.detach().cpu().to(torch.float64)
        if self.U.shape[0] == 0:
            return x.clone()
        coef = allreduce_sum(self.dist.comm, (self.U @ x).numpy().copy())
        return x - torch.from_numpy(coef) @ self.U

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``P H P v`` for a full vector ``v`` (collective); the result has ``v``'s dtype."""
        lo, hi = self.dist.lo, self.dist.hi
        pv = self.dist.gather(self.project_slice(v[lo:hi]), self.device).to(self.dtype)
        hv = self.op.matvec(pv)
        return self.dist.gather(self.project_slice(hv[lo:hi]), v.device).to(v.dtype)


@dataclass
class DeflatedProbe:
    """One probe of deflated SLQ: Lanczos on ``P H P`` from ``y = P z`` (normalised).

    ``alpha``/``beta``: the recurrence (beta[:m-1] off-diagonal of T_m, beta[m-1] the last
    residual norm); ``nodes``/``weights`` (sum 1)/``residuals``: its Gauss rule and Ritz
    residual bounds, the measure of ``y/||y||`` for ``P H P`` on the complement of the
    eigenvectors; ``breakdown``: the Gauss measure is exact (an invariant subspace, or n - k
    steps spanning the complement); ``start_norm2 = ||y||^2``; ``quad_form = y^T H y``.  In the probe's measure
    the Gauss part carries the total weight ``slq_mass = ||y||^2 / n``.
    """

    probe: int
    alpha: np.ndarray
    beta: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    steps: int
    breakdown: bool
    start_norm2: float
    quad_form: float
    n: int

    @property
    def slq_mass(self) -> float:
        """Weight of the Gauss part in the probe's measure, ``||P z||^2 / n``."""
        return self.start_norm2 / self.n

    @classmethod
    def from_lanczos(cls, result: LanczosResult, n: int) -> "DeflatedProbe":
        """Wrap a :class:`~hpcqml.hessian.lanczos.LanczosResult` on ``P H P``."""
        return cls(probe=result.probe, alpha=result.alpha, beta=result.beta, nodes=result.nodes,
                   weights=result.weights, residuals=result.residuals, steps=result.steps,
                   breakdown=result.breakdown, start_norm2=result.start_norm2, quad_form=result.quad_form, n=int(n))


@dataclass
class DeflatedSLQ:
    """Deflated SLQ: exact outliers plus SLQ of ``P H P`` on their complement.

    The measure of probe l (module docstring) is

        mu_l = (1/n) sum_i delta(lambda - atoms[i])
               + probes[l].slq_mass * sum_j probes[l].weights[j] delta(lambda - probes[l].nodes[j]),

    unbiased for the spectral measure of ``H`` on polynomials of degree < 2m.  ``atoms`` are
    the eigenvalues, ``atom_residuals`` their explicit residuals.
    """

    n: int
    atoms: np.ndarray
    atom_residuals: np.ndarray
    probes: list[DeflatedProbe]

    @property
    def k(self) -> int:
        """Number of deflated eigenpairs."""
        return int(self.atoms.size)

    def measure(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Probe ``row``'s measure: nodes, weights and residual bounds (atoms first)."""
        p = self.probes[row]
        nodes = np.concatenate([self.atoms, p.nodes])
        weights = np.concatenate([np.full(self.k, 1.0 / self.n), p.slq_mass * p.weights])
        return nodes, weights, np.concatenate([self.atom_residuals, p.residuals])

    def spectrum(self, **settings: Any) -> Spectrum:
        """The probes' measures as a :class:`~hpcqml.hessian.spectrum.Spectrum` (atoms first in each row).

        Every estimate of the spectrum then pools the deflated measures; ``quad_forms`` are
        ``sum(atoms) + y^T H y`` (unbiased for tr H).  A row's weights sum to
        ``(k + ||P z||^2)/n`` (1 in expectation).  A row is not the Gauss rule of one Lanczos
        recurrence, so the proven quadrature brackets do not apply: the spectrum is marked
        ``certified = False`` and its estimates carry the sampling interval only, never
        "resolved".
        """
        rows = [self.measure(i) for i in range(len(self.probes))]
        width = max(r[0].size for r in rows)
        return Spectrum(n=self.n, nodes=pad((r[0] for r in rows), width), weights=pad((r[1] for r in rows), width),
                        residuals=pad((r[2] for r in rows), width),
                        quad_forms=np.array([float(self.atoms.sum()) + p.quad_form for p in self.probes]),
                        probes=np.array([p.probe for p in self.probes], dtype=np.int64),
                        steps=np.array([p.steps for p in self.probes], dtype=np.int64),
                        breakdown=np.array([p.breakdown for p in self.probes], dtype=bool),
                        **{"certified": False, **settings})


def deflated_probe(deflated: DeflatedOperator, z_local: np.ndarray, probe: int, steps: int,
                   dtype: torch.dtype = torch.float64,
                   on_step: Callable[[int, int], None] | None = None) -> DeflatedProbe:
    """Lanczos on ``P H P`` from ``P z`` for this rank's slice ``z_local`` of a probe vector.

    Args:
        deflated: the deflated operator.
        z_local: slice ``[lo, hi)`` of the probe ``z`` (any vector; Rademacher in :func:`deflated_slq`).
        probe: the probe number (stored, named in errors).
        steps: Lanczos steps (at most ``n - k``, the dimension of the complement).
        dtype: dtype of the Krylov basis and of the products.
        on_step: ``on_step(done, total)`` after every step.

    Returns:
        The probe's recurrence, Gauss rule and ``||P z||^2``.
    """
    y = deflated.project_slice(torch.from_numpy(np.asarray(z_local, dtype=np.float64))).numpy()
    m = max(1, min(int(steps), deflated.n - int(deflated.U.shape[0])))
    result = lanczos(deflated.matvec, deflated.n, deflated.dist.comm, y, steps=m, state_dtype=dtype,
                     device=deflated.device, probe=probe, label="deflated SLQ", on_step=on_step)
    out = DeflatedProbe.from_lanczos(result, deflated.n)
    # n - k steps span the whole complement: the Gauss measure is then the probe's measure
    out.breakdown = out.breakdown or out.steps == deflated.n - int(deflated.U.shape[0])
    return out


def deflated_slq(op: Any, pairs: Eigenpairs, *, probes: int | Sequence[int], steps: int, seed: int = 0,
                 comm: Any = None, dtype: torch.dtype | None = None,
                 on_step: Callable[[int, int, int], None] | None = None) -> DeflatedSLQ:
    """SLQ of ``op`` with the eigenpairs ``pairs`` deflated (module docstring).

    Args:
        op: the operator (``n``, ``matvec``; collective over ``comm``).
        pairs: eigenpairs from :func:`top_eigenpairs` on the same operator and communicator.
        probes: number of Rademacher probes (numbered 0..probes-1) or the probe numbers;
            probe l is ``rademacher_slice(n, .., seed, l)``, as in :func:`hpcqml.hessian.slq.slq`.
        steps: Lanczos steps per probe (1 <= steps; at most ``n - k`` are taken).
        seed: probe seed.
        comm: MPI communicator (None: one process).
        dtype: dtype of the basis and products (default: the operator's, else float64).
        on_step: ``on_step(probe, done, total)`` after every Lanczos step.

    Returns:
        The :class:`DeflatedSLQ` (``.spectrum()`` for the usual estimates).

    Raises:
        UserError: no probes, ``steps`` < 1, or eigenpairs of another operator/communicator.
    """
    deflated = DeflatedOperator(op, pairs, comm)
    numbers = list(range(int(probes))) if isinstance(probes, (int, np.integer)) else [int(p) for p in probes]
    if not numbers:
        raise UserError("deflated SLQ needs at least one probe")
    if int(steps) < 1:
        raise UserError(f"Lanczos steps = {steps}: must be >= 1")
    if pairs.k >= deflated.n:
        raise UserError(f"deflating k = {pairs.k} eigenpairs of an operator of size {deflated.n} leaves nothing "
                        "for SLQ: use the eigenvalues directly")
    state = dtype or deflated.dtype
    out = []
    for number in numbers:
        z = rademacher_slice(deflated.n, deflated.dist.lo, deflated.dist.hi, seed, number)
        cb = None if on_step is None else (lambda done, total, number=number: on_step(number, done, total))
        out.append(deflated_probe(deflated, z, number, steps, state, cb))
    return DeflatedSLQ(n=deflated.n, atoms=np.asarray(pairs.values, dtype=np.float64).copy(),
                       atom_residuals=np.asarray(pairs.residuals, dtype=np.float64).copy(), probes=out)
