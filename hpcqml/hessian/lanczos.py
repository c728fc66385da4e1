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

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from hpcqml.errors import UserError
from hpcqml.hessian.hvp import check_finite
from hpcqml.hessian.quadrature import tridiagonal_quadrature
from hpcqml.parallel import allreduce_sum, block_bounds

REORTH = ("full", "none")


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
    ``unit_roundoff`` is that of the basis dtype (None when not recorded).
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
    unit_roundoff: float | None = None


class _Dist:
    """Slice bookkeeping of ``comm`` and the allgather of a sliced vector (sums use
    :func:`hpcqml.parallel.allreduce_sum`).
    """

    def __init__(self, comm: Any, n: int, perf: Any = None) -> None:
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        rank = 0 if comm is None else comm.Get_rank()
        self.lo, self.hi = block_bounds(n, rank, self.size)
        self.n = n
        bounds = [block_bounds(n, r, self.size) for r in range(self.size)]
        self.counts = [hi - lo for lo, hi in bounds]
        self.displs = [lo for lo, _ in bounds]
        self.perf = perf

    def gather(self, loc: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Assemble the full vector from every rank's slice (allgather)."""
        if self.size == 1:
            return loc.to(device).contiguous()
        from mpi4py.util.dtlib import from_numpy_dtype

        send = loc.detach().cpu().contiguous().numpy()
        recv = np.empty(self.n, dtype=send.dtype)
        mpitype = from_numpy_dtype(send.dtype)
        timer = self.perf.comm_timer() if self.perf is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        with timer:
            self.comm.Allgatherv([send, mpitype], [recv, self.counts, self.displs, mpitype])
        if self.perf is not None:
            # also inside the communication time; kept apart so a time split can name it
            self.perf.count("allgatherv_seconds", time.perf_counter() - t0)
        return torch.from_numpy(recv).to(device)


class Interrupted(Exception):
    """Raised by :func:`lanczos` when its ``interrupt`` callback asks it to stop."""


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


def _reorthogonalise(V: torch.Tensor, w: torch.Tensor, dist: _Dist, cols: int) -> float:
    """Classical Gram-Schmidt of ``w`` against the basis rows ``V``; returns ``||w||``.

    A second pass runs only when the first removed more than 1 - 1/sqrt(2) of the norm
    ("twice is enough", Kahan-Parlett criterion).
    """
    before = float(np.sqrt(_sum_scalar(dist, float(w @ w))))
    after = before
    for _ in range(2):
        coef = allreduce_sum(dist.comm, _project(V, w, cols), perf=dist.perf)
        _subtract(V, coef, w, cols)
        after = float(np.sqrt(_sum_scalar(dist, float(w @ w))))
        if after >= before / np.sqrt(2.0):
            break
        before = after
    return after


def _unit_start(z_local: np.ndarray, dist: _Dist, bdev: torch.device,
                state_dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """This rank's slice of ``v_1 = z/||z||`` and ``||z||^2``."""
    nloc = dist.hi - dist.lo
    if z_local.shape != (nloc,):
        raise ValueError(f"start slice has shape {z_local.shape}, expected ({nloc},)")
    z = torch.from_numpy(np.asarray(z_local, dtype=np.float64)).to(bdev)
    znorm2 = _sum_scalar(dist, float(z @ z))
    if not znorm2 > 0.0:
        raise UserError("Lanczos start vector is zero")
    return (z / np.sqrt(znorm2)).to(state_dtype), znorm2


def _check_arguments(reorth: str, steps: int) -> None:
    if reorth not in REORTH:
        raise UserError(f"reorth = {reorth!r}: not one of {', '.join(REORTH)}")
    if steps < 1:
        raise UserError(f"lanczos steps = {steps}: must be >= 1")


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, comm: Any, z_local: np.ndarray,
            steps: int = 100, reorth: str = "full", state_dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu", basis_device: torch.device | str | None = None,
            rtol: float | None = None, probe: int = 0, label: str = "", perf: Any = None,
            on_step: Callable[[int, int], None] | None = None,
            interrupt: Callable[[], bool] | None = None) -> LanczosResult:
    """Run ``steps`` Lanczos steps on ``matvec`` from the start vector ``z`` (sharded).

    Args:
        matvec: ``v -> H v`` on full length-n tensors on ``device``; collective over
            ``comm`` (same input, same output on every rank).
        n: dimension of the operator.
        comm: communicator sharding the basis (None = one process).
        z_local: this rank's slice ``[lo, hi)`` (:func:`hpcqml.parallel.block_bounds`) of the unnormalised
            start vector.
        steps: Lanczos steps m (at most n are taken).
        reorth: ``full`` (against the stored basis) or ``none``.
        state_dtype: dtype of the stored basis vectors and of the products.
        device: where the products run.
        basis_device: where the basis is held (default ``device``).
        rtol: breakdown threshold relative to ``max(|alpha|, beta)`` (default 100 eps).
        probe: the probe number (named in errors, stored in the result).
        label: what is measured (named in errors).
        perf: optional timer/counter object charged with the communication time.
        on_step: called as ``on_step(done, total)`` after every step (progress display).
        interrupt: polled after every step (collectively over ``comm``); when it returns
            True the run stops and :class:`Interrupted` is raised.

    Returns:
        The recurrence coefficients, Ritz values, Gauss weights and residual bounds.

    Raises:
        NumericalError: a non-finite product (naming ``label``, the probe and the step).
    """
    _check_arguments(reorth, steps)
    device = torch.device(device)
    bdev = torch.device(basis_device) if basis_device is not None else device
    dist = _Dist(comm, n, perf)
    m = min(int(steps), int(n))
    if rtol is None:
        rtol = 100.0 * float(torch.finfo(state_dtype).eps)
    cols = max(1, (1 << 24) // max(1, m))
    v, znorm2 = _unit_start(z_local, dist, bdev, state_dtype)
    V = None
    if reorth == "full":
        V = torch.empty((m, dist.hi - dist.lo), dtype=state_dtype, device=bdev)
        V[0] = v
    v_prev: torch.Tensor | None = None
    alphas: list[float] = []
    betas: list[float] = []
    breakdown = False
    for j in range(m):
        where = f"{label + ', ' if label else ''}probe {probe}, Lanczos step {j}"
        alpha, beta, w = _step(matvec(dist.gather(v, device)), v, v_prev, betas[-1] if betas else 0.0,
                               None if V is None else V[:j + 1], dist, bdev, cols, where)
        alphas.append(alpha)
        betas.append(beta)
        if on_step is not None:
            on_step(j + 1, m)
        if interrupt is not None and interrupt():
            raise Interrupted(f"probe {probe} stopped after Lanczos step {j + 1} of {m}")
        if j == m - 1:
            break
        if _broke_down(alphas, betas, rtol):
            breakdown = True
            break
        v_prev, v = v, (w / beta).to(state_dtype)
        del w
        if V is not None:
            V[j + 1] = v
    # Spanning the whole space (k = n) is an invariant subspace too: T_k is then exact.
    out = _result(probe, alphas, betas, breakdown or len(alphas) == n, znorm2)
    out.unit_roundoff = float(torch.finfo(state_dtype).eps) / 2.0
    return out


def _sum_scalar(dist: _Dist, x: float) -> float:
    """``x`` summed over the ranks of ``dist``."""
    return float(allreduce_sum(dist.comm, np.array([x], dtype=np.float64), perf=dist.perf)[0])


def _step(w_full: torch.Tensor, v: torch.Tensor, v_prev: torch.Tensor | None, beta_prev: float,
          V: torch.Tensor | None, dist: _Dist, bdev: torch.device, cols: int,
          where: str) -> tuple[float, float, torch.Tensor]:
    """One step of the three-term recurrence from the product ``w_full = H v``.

    Returns ``(alpha_j, beta_j, w)``: the diagonal entry, the norm of the new residual and
    the residual itself (this rank's float64 slice), reorthogonalised against the basis
    rows ``V`` when given.
    """
    check_finite(w_full, where)
    w = w_full[dist.lo:dist.hi].to(device=bdev, dtype=torch.float64)
    del w_full
    vj = v.to(torch.float64)
    alpha = _sum_scalar(dist, float(vj @ w))
    w -= alpha * vj
    if v_prev is not None:
        w -= beta_prev * v_prev.to(torch.float64)
    if V is not None:
        return alpha, _reorthogonalise(V, w, dist, cols), w
    return alpha, float(np.sqrt(_sum_scalar(dist, float(w @ w)))), w


def _broke_down(alphas: list[float], betas: list[float], rtol: float) -> bool:
    """Whether the last beta is negligible against the largest recurrence coefficient."""
    scale = max(max(abs(a) for a in alphas), max(betas[:-1], default=0.0))
    return betas[-1] <= rtol * scale or betas[-1] == 0.0


def _result(probe: int, alphas: list[float], betas: list[float], breakdown: bool, znorm2: float) -> LanczosResult:
    """The Lanczos result with the Gauss quadrature of its tridiagonal matrix."""
    alpha_arr = np.array(alphas, dtype=np.float64)
    beta_arr = np.array(betas, dtype=np.float64)
    nodes, weights, residuals = tridiagonal_quadrature(alpha_arr, beta_arr)
    return LanczosResult(probe=int(probe), alpha=alpha_arr, beta=beta_arr, nodes=nodes, weights=weights,
                         residuals=residuals, steps=len(alphas), breakdown=bool(breakdown),
                         quad_form=float(znorm2 * alpha_arr[0]), start_norm2=znorm2)
