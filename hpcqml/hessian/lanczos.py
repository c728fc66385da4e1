"""Lanczos tridiagonalisation with a Krylov basis sharded by parameter slices.

For a symmetric operator ``H`` (n x n) and a unit start vector ``v_1`` the Lanczos
recurrence

    w_j = H v_j - beta_{j-1} v_{j-1},   alpha_j = v_j^T H v_j,
    w_j <- w_j - alpha_j v_j,           beta_j = ||w_j||,   v_{j+1} = w_j / beta_j

builds ``V_k^T H V_k = T_k`` (tridiagonal: diagonal alpha, off-diagonal beta).  The
eigen-decomposition ``T_k = S diag(theta) S^T`` gives the Ritz values theta_i, the Gauss
quadrature weights ``tau_i = S_{1i}^2`` of the spectral measure of ``H`` seen from ``v_1``,

    v_1^T f(H) v_1  ~=  sum_i tau_i f(theta_i),

and the residual bounds ``||H y_i - theta_i y_i|| = |beta_k S_{ki}|`` of the Ritz pairs
(each interval ``[theta_i - r_i, theta_i + r_i]`` holds an eigenvalue of ``H``).

Distribution.  Every rank of ``comm`` holds the full current vector ``v_j`` (the product
needs it) but only its parameter slice ``[lo, hi)`` of the basis ``V`` (about m*n/P
values in the state dtype, i.e. the parameter dtype).  Dot products are local slice
dots summed by allreduce; the next basis vector is assembled with one allgather.
alpha, beta, the reorthogonalisation coefficients and the tridiagonal eigen-solve are in
float64.  Full reorthogonalisation is classical Gram-Schmidt against all stored basis
vectors, repeated once when the first pass cancelled more than 1 - 1/sqrt(2) of the
norm (Kahan-Parlett "twice is enough"); ``reorth="none"`` keeps only the last two slices (O(n/P) memory).
A ``beta_j`` below ``rtol * max(|alpha|, beta)`` is a breakdown (an invariant subspace
was found): the run ends early and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.linalg
import torch

from hpcqml.errors import UserError
from hpcqml.hessian.hvp import check_finite
from hpcqml.parallel import block_bounds

REORTH = ("full", "none")


#: contiguous near-equal slice ``[lo, hi)`` of the parameter vector owned by a rank
slice_bounds = block_bounds


RADEMACHER_BLOCK = 1 << 20


def rademacher_slice(n: int, lo: int, hi: int, seed: int, probe: int) -> np.ndarray:
    """Coordinates ``[lo, hi)`` of the Rademacher probe ``z in {-1, +1}^n`` numbered ``probe``.

    The vector is cut in blocks of 2^20 coordinates, block ``b`` drawn from
    ``SeedSequence([seed, probe, b])``, so any slice is the same whatever the number of
    ranks and no rank ever forms the whole vector.  Returned as float64.
    """
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"bad slice [{lo}, {hi}) of {n}")
    out = np.empty(hi - lo, dtype=np.float64)
    b0, b1 = lo // RADEMACHER_BLOCK, (hi - 1) // RADEMACHER_BLOCK if hi > lo else -1
    for b in range(b0, b1 + 1):
        start = b * RADEMACHER_BLOCK
        stop = min(start + RADEMACHER_BLOCK, n)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(probe), b])))
        bits = rng.integers(0, 2, size=stop - start, dtype=np.int8)
        s, e = max(start, lo), min(stop, hi)
        out[s - lo:e - lo] = 2.0 * bits[s - start:e - start] - 1.0
    return out


@dataclass
class LanczosResult:
    """One Lanczos run (one SLQ probe).

    ``alpha`` (k,), ``beta`` (k,): beta[:k-1] are the off-diagonals of T_k and beta[k-1]
    the norm of the last residual.  ``nodes``/``weights``/``residuals`` (k,): Ritz values,
    Gauss weights (sum to 1) and residual bounds.  ``quad_form`` = z^T H z for the
    unnormalised start vector z (= n * alpha_1 for a Rademacher z), the Hutchinson sample.
    """

    probe: int
    alpha: np.ndarray
    beta: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    steps: int
    breakdown: bool
    quad_form: float
    start_norm2: float


def tridiagonal_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values, Gauss weights ``S_1i^2`` and residual bounds ``|beta_k S_ki|`` of T_k (float64)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    k = alpha.size
    if k == 1:
        return alpha.copy(), np.ones(1), np.abs(beta[:1]).copy()
    theta, s = scipy.linalg.eigh_tridiagonal(alpha, beta[:k - 1])
    weights = s[0, :] ** 2
    residuals = np.abs(beta[k - 1] * s[k - 1, :]) if beta.size >= k else np.zeros(k)
    return theta, weights, residuals


class _Dist:
    """Slice bookkeeping and the two collectives Lanczos needs on ``comm``."""

    def __init__(self, comm: Any, n: int, perf: Any = None) -> None:
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        rank = 0 if comm is None else comm.Get_rank()
        self.lo, self.hi = slice_bounds(n, rank, self.size)
        self.n = n
        bounds = [slice_bounds(n, r, self.size) for r in range(self.size)]
        self.counts = [h - l for l, h in bounds]
        self.displs = [l for l, _ in bounds]
        self.perf = perf

    def _timer(self):  # noqa: ANN202
        import contextlib
        return self.perf.comm_timer() if self.perf is not None else contextlib.nullcontext()

    def sum(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64)
        if self.size == 1:
            return x
        from mpi4py import MPI
        out = np.empty_like(x)
        with self._timer():
            self.comm.Allreduce(x, out, op=MPI.SUM)
        return out

    def gather(self, loc: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.size == 1:
            return loc.to(device).contiguous()
        from mpi4py import MPI
        send = loc.detach().cpu().contiguous().numpy()
        recv = np.empty(self.n, dtype=send.dtype)
        mpitype = MPI._typedict[send.dtype.char]
        with self._timer():
            self.comm.Allgatherv([send, mpitype], [recv, self.counts, self.displs, mpitype])
        return torch.from_numpy(recv).to(device)


def _project(V: torch.Tensor, w: torch.Tensor, cols: int) -> np.ndarray:
    """Local float64 coefficients ``V w`` computed over column chunks (bounded temporaries)."""
    c = torch.zeros(V.shape[0], dtype=torch.float64, device=V.device)
    for s in range(0, V.shape[1], cols):
        c += V[:, s:s + cols].to(torch.float64) @ w[s:s + cols]
    return c.cpu().numpy()


def _subtract(V: torch.Tensor, coef: np.ndarray, w: torch.Tensor, cols: int) -> None:
    """``w -= V^T coef`` in float64, chunked over columns."""
    c = torch.from_numpy(coef).to(device=V.device, dtype=torch.float64)
    for s in range(0, V.shape[1], cols):
        w[s:s + cols] -= c @ V[:, s:s + cols].to(torch.float64)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, comm: Any, z_local: np.ndarray,
            steps: int = 100, reorth: str = "full", state_dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu", basis_device: torch.device | str | None = None,
            rtol: float | None = None, probe: int = 0, label: str = "", perf: Any = None) -> LanczosResult:
    """Run ``steps`` Lanczos steps on ``matvec`` from the start vector ``z`` (sharded).

    ``matvec(v)`` takes and returns a full length-n tensor on ``device`` and is collective
    over ``comm`` (same input, same output on every rank).  ``z_local`` is this rank's slice
    ``[lo, hi)`` (``slice_bounds``) of the unnormalised start vector.  The basis is kept on
    ``basis_device`` (default ``device``) in ``state_dtype``.  A non-finite product raises
    :class:`~hpcqml.errors.NumericalError` naming ``label``, the probe and the step.
    """
    if reorth not in REORTH:
        raise UserError(f"reorth = {reorth!r}: not one of {', '.join(REORTH)}")
    if steps < 1:
        raise UserError(f"lanczos steps = {steps}: must be >= 1")
    device = torch.device(device)
    bdev = torch.device(basis_device) if basis_device is not None else device
    dist = _Dist(comm, n, perf)
    nloc = dist.hi - dist.lo
    if z_local.shape != (nloc,):
        raise ValueError(f"start slice has shape {z_local.shape}, expected ({nloc},)")
    m = min(int(steps), int(n))
    if rtol is None:
        rtol = 100.0 * float(torch.finfo(state_dtype).eps)
    cols = max(1, (1 << 24) // max(1, m))

    z = torch.from_numpy(np.asarray(z_local, dtype=np.float64)).to(bdev)
    znorm2 = float(dist.sum(np.array([float(z @ z)]))[0])
    if not znorm2 > 0.0:
        raise UserError("Lanczos start vector is zero")
    v = (z / np.sqrt(znorm2)).to(state_dtype)
    del z
    if reorth == "full":
        V = torch.empty((m, nloc), dtype=state_dtype, device=bdev)
        V[0] = v
    v_prev: torch.Tensor | None = None
    v_full = dist.gather(v, device)
    alphas: list[float] = []
    betas: list[float] = []
    breakdown = False
    for j in range(m):
        w_full = matvec(v_full)
        check_finite(w_full, f"{label + ', ' if label else ''}probe {probe}, Lanczos step {j}")
        w = w_full[dist.lo:dist.hi].to(device=bdev, dtype=torch.float64)
        del w_full
        vj = v.to(torch.float64)
        alpha = float(dist.sum(np.array([float(vj @ w)]))[0])
        w -= alpha * vj
        if j > 0:
            w -= betas[-1] * v_prev.to(torch.float64)
        if reorth == "full":
            # classical Gram-Schmidt; a second pass only when the first removed more than
            # 1 - 1/sqrt(2) of the norm ("twice is enough", Kahan-Parlett criterion)
            before = float(np.sqrt(dist.sum(np.array([float(w @ w)]))[0]))
            for _ in range(2):
                coef = dist.sum(_project(V[:j + 1], w, cols))
                _subtract(V[:j + 1], coef, w, cols)
                after = float(np.sqrt(dist.sum(np.array([float(w @ w)]))[0]))
                if after >= before / np.sqrt(2.0):
                    break
                before = after
            beta = after
        else:
            beta = float(np.sqrt(dist.sum(np.array([float(w @ w)]))[0]))
        alphas.append(alpha)
        betas.append(beta)
        if j == m - 1:
            break
        scale = max(max(abs(a) for a in alphas), max(betas[:-1], default=0.0))
        if beta <= rtol * scale or beta == 0.0:
            breakdown = True
            break
        v_prev = v
        v = (w / beta).to(state_dtype)
        del w
        if reorth == "full":
            V[j + 1] = v
        v_full = dist.gather(v, device)
    # Spanning the whole space (k = n) is an invariant subspace too: T_k is then exact.
    breakdown = breakdown or len(alphas) == n
    alpha_arr = np.array(alphas, dtype=np.float64)
    beta_arr = np.array(betas, dtype=np.float64)
    nodes, weights, residuals = tridiagonal_quadrature(alpha_arr, beta_arr)
    return LanczosResult(probe=int(probe), alpha=alpha_arr, beta=beta_arr, nodes=nodes, weights=weights,
                         residuals=residuals, steps=len(alphas), breakdown=bool(breakdown),
                         quad_form=float(znorm2 * alpha_arr[0]), start_norm2=znorm2)
