"""Distributed PETSc assembly of the Carleman matrix A (eq. II.3-II.6) and of M (eq. II.79).

Each rank generates only its own contiguous range of rows, directly from the sparse rows of
the F_l (no dense or global intermediates), sums duplicate entries locally, and hands the
resulting local CSR to PETSc, which therefore preallocates exactly (``MatMPIAIJSetPreallocationCSR``).

Index conventions: block j (1..N) of the Carleman vector is u^{(x)j}, block offset
off_j = n + ... + n^{j-1}; inside block j the row multi-index (a_1..a_j) has flat index
sum_i a_i n^{j-i}.  The term I^{(x)p} (x) F_l (x) I^{(x)(j-1-p)} of A^j_{j+l-1} maps row
(prefix, a_{p+1}, suffix) to columns (prefix, c, suffix) with c a column of row a_{p+1} of F_l.

Time-varying constant term F0(t) = F[0] + F0_t[t] (SGD noise): only the blocks A^j_{j-1} (l = 0)
depend on t.  Their entries are generated once on the union S of the supports of F[0] and of all
F0_t[t] (:meth:`PolynomialODE.f0_support`), so every A(t) has one sparsity pattern
(:class:`LocalPattern`); per t only the values change (zeros on S are stored explicitly).  In M,
block row t+1 holds -(I + A(t)) and B = (y_in, b(0), ..., b(T-1)).
"""
from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpcqml.carleman import discrete
from hpcqml.carleman.instance import PolynomialODE, carleman_dim, lift
from hpcqml.parallel import block_bounds
from hpcqml.petsc import PetscOwner, aij_from_csr, vec_for
from hpcqml.petsc import to_numpy_all  # noqa: F401 - its old home; the benchmarks import it from here


def block_offsets(n: int, N: int) -> np.ndarray:
    """off[j] = first row of block j (j = 1..N); off[N+1] = Delta. off[0] unused (= 0)."""
    off = np.zeros(N + 2, dtype=np.int64)
    for j in range(1, N + 1):
        off[j + 1] = off[j] + n**j
    return off


def _gather_rows(F: sp.csr_matrix, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each entry a[i], the nonzeros of row a[i] of F: (owner i, column, value) arrays."""
    counts = (F.indptr[a + 1] - F.indptr[a]).astype(np.int64)
    total = int(counts.sum())
    owner = np.repeat(np.arange(a.shape[0], dtype=np.int64), counts)
    if total == 0:
        return owner, np.zeros(0, np.int64), np.zeros(0, np.float64)
    first = np.cumsum(counts) - counts
    pos = np.repeat(F.indptr[a].astype(np.int64) - first, counts) + np.arange(total, dtype=np.int64)
    return owner, F.indices[pos].astype(np.int64), F.data[pos]


def carleman_coo(ode: PolynomialODE, N: int, r0: int, r1: int,
                 skip_f0: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO triplets (local row, global column, value) of rows [r0, r1) of A, duplicates not summed.

    Implements eq. II.3 row by row: for every position p and degree l with target block
    c = j + l - 1 in 1..N.  The l = 0 term of block row 1 (the constant b) is not part of A.
    ``skip_f0`` leaves out every l = 0 term (the mean F0); see :func:`f0_coo` for those.
    """
    n, off = ode.n, block_offsets(ode.n, N)
    rows, cols, vals = [], [], []
    for j in range(1, N + 1):
        lo, hi = max(r0, off[j]), min(r1, off[j + 1])
        if lo >= hi:
            continue
        rr = np.arange(lo - off[j], hi - off[j], dtype=np.int64)  # index inside block j
        local = rr + (off[j] - r0)
        for p in range(j):
            s = n ** (j - 1 - p)  # size of the suffix
            a = (rr // s) % n
            prefix = rr // (s * n)
            suffix = rr % s
            for ell, F in enumerate(ode.F):
                c = j + ell - 1
                if c < 1 or c > N or F.nnz == 0 or (skip_f0 and ell == 0):
                    continue
                owner, fcol, fval = _gather_rows(F, a)
                col = off[c] + prefix[owner] * (n**ell * s) + fcol * s + suffix[owner]
                rows.append(local[owner])
                cols.append(col)
                vals.append(fval)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def f0_coo(n: int, N: int, r0: int, r1: int, support: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of the F0 blocks A^j_{j-1} (j = 2..N) in rows [r0, r1): (local row, global column, a).

    Term I^{(x)p} (x) F0 (x) I^{(x)(j-1-p)} puts F0[a] at row (prefix, a, suffix) of block j and
    column (prefix, suffix) of block j-1; only rows with a in ``support`` are generated.  The
    value of an entry is ``f0[a]`` for whichever F0 = F0(t) is being assembled.
    """
    off = block_offsets(n, N)
    rows, cols, src = [], [], []
    insupp = np.zeros(n, dtype=bool)
    insupp[support] = True
    for j in range(2, N + 1):
        lo, hi = max(r0, off[j]), min(r1, off[j + 1])
        if lo >= hi:
            continue
        rr = np.arange(lo - off[j], hi - off[j], dtype=np.int64)
        for p in range(j):
            s = n ** (j - 1 - p)
            a = (rr // s) % n
            keep = insupp[a]
            rows.append(rr[keep] + (off[j] - r0))
            cols.append(off[j - 1] + (rr[keep] // (s * n)) * s + rr[keep] % s)
            src.append(a[keep])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(src)


class LocalPattern:
    """Rows [r0, r1) of A(t) (optionally + I) with one sparsity pattern for every t.

    ``indptr``/``indices`` are the CSR pattern (columns sorted, duplicates merged) of the union
    of the F_l (l >= 1) terms, the optional identity and the F0 terms on ``support``;
    :meth:`values` returns the matching CSR data for a given dense F0(t) of length n.
    """

    def __init__(self, ode: PolynomialODE, N: int, r0: int, r1: int, support: np.ndarray,
                 add_identity: bool = False):
        D = carleman_dim(ode.n, N)
        rs, cs, vs = carleman_coo(ode, N, r0, r1, skip_f0=True)
        if add_identity:
            diag = np.arange(r0, r1, dtype=np.int64)
            rs, cs, vs = (np.concatenate([rs, diag - r0]), np.concatenate([cs, diag]),
                          np.concatenate([vs, np.ones(r1 - r0)]))
        r_f0, c_f0, self._src = f0_coo(ode.n, N, r0, r1, support)
        keys = np.concatenate([rs, r_f0]) * np.int64(D) + np.concatenate([cs, c_f0])
        uniq, inv = np.unique(keys, return_inverse=True)
        self.nrows, self.ncols = r1 - r0, D
        self.nnz = uniq.shape[0]
        self.indices = (uniq % D).astype(np.int64)
        self.indptr = np.zeros(self.nrows + 1, dtype=np.int64)
        np.cumsum(np.bincount(uniq // D, minlength=self.nrows), out=self.indptr[1:])
        self._inv_fixed, self._inv_f0 = inv[: rs.shape[0]], inv[rs.shape[0]:]
        self._fixed = np.bincount(self._inv_fixed, weights=vs, minlength=self.nnz)

    def values(self, f0: np.ndarray) -> np.ndarray:
        """CSR data of the pattern for constant term ``f0`` (dense, length n), float64."""
        return self._fixed + np.bincount(self._inv_f0, weights=np.asarray(f0, np.float64)[self._src],
                                         minlength=self.nnz)

    def csr(self, f0: np.ndarray, ncols: int | None = None, col_shift: int = 0, scale: float = 1.0) -> sp.csr_matrix:
        """``scale`` times the rows as CSR (columns shifted by ``col_shift``, width ``ncols``)."""
        return sp.csr_matrix((scale * self.values(f0), self.indices + col_shift, self.indptr),
                             shape=(self.nrows, ncols or self.ncols))


def _to_csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, nrows: int, ncols: int) -> sp.csr_matrix:
    m = sp.csr_matrix((vals, (rows, cols)), shape=(nrows, ncols), dtype=np.float64)
    m.sum_duplicates()
    m.sort_indices()
    return m


def carleman_local_csr(ode: PolynomialODE, N: int, r0: int, r1: int, t: int | None = None,
                       lift_kind: str = "paper") -> sp.csr_matrix:
    """Rows [r0, r1) of A as a CSR matrix of shape (r1-r0, Delta), duplicates summed.

    With ``t`` given and a time-varying constant term: rows of A(t), on the pattern shared by all t.
    ``lift_kind = "discrete"``: rows of A_d = L - I of the exact lift of the map
    (:mod:`hpcqml.carleman.discrete`) instead of the paper's A.
    """
    if lift_kind == "discrete":
        return discrete.lift_local_csr(ode, N, r0, r1, t)
    if t is not None and ode.F0_t is not None:
        return LocalPattern(ode, N, r0, r1, ode.f0_support()).csr(ode.f0(t))
    r, c, v = carleman_coo(ode, N, r0, r1)
    return _to_csr(r, c, v, r1 - r0, carleman_dim(ode.n, N))


def _append_diagonal(block: sp.csr_matrix, col_shift: int, diag_cols: np.ndarray) -> sp.csr_matrix:
    """Rows of ``block`` with columns shifted by ``col_shift``, each followed by a 1 in ``diag_cols``.

    Requires every shifted column to be smaller than the row's diagonal column (true in M, whose
    off-diagonal entries lie in the previous time block), so sorted order is preserved.
    """
    nrows = block.shape[0]
    counts = np.diff(block.indptr).astype(np.int64)
    indptr = np.zeros(nrows + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(counts + 1)
    diag_pos = indptr[1:] - 1
    mask = np.ones(indptr[-1], dtype=bool)
    mask[diag_pos] = False
    indices = np.empty(indptr[-1], dtype=np.int64)
    data = np.empty(indptr[-1], dtype=np.float64)
    indices[mask] = block.indices.astype(np.int64) + col_shift
    data[mask] = block.data
    indices[diag_pos] = diag_cols
    data[diag_pos] = 1.0
    return sp.csr_matrix((data, indices, indptr), shape=(nrows, block.shape[1]))


def block_system_local_csr(ode: PolynomialODE, N: int, T: int, R0: int, R1: int,
                           lift_kind: str = "paper") -> sp.csr_matrix:
    """Rows [R0, R1) of M (eq. II.79): 1 on the diagonal, -(I+A) in block (t, t-1).

    The rows of -(I+A) are generated once per distinct row range (all full time blocks of a rank
    share one) and reused with shifted column indices; no global or dense intermediates.
    ``lift_kind = "discrete"`` puts -(I + A_d) = -L of the exact lift of the map there.
    """
    if ode.F0_t is not None:
        return _block_system_local_csr_t(ode, N, T, R0, R1, lift_kind)
    D = carleman_dim(ode.n, N)
    ncols = (T + 1) * D
    cache: dict[tuple[int, int], sp.csr_matrix] = {}
    pieces = []
    for t, r0, r1, diag in _time_blocks(R0, R1, D):
        if t == 0:
            pieces.append(_append_diagonal(sp.csr_matrix((r1 - r0, ncols)), 0, diag))
            continue
        if (r0, r1) not in cache:
            A_loc = carleman_local_csr(ode, N, r0, r1, lift_kind=lift_kind)
            shift = sp.csr_matrix((np.ones(r1 - r0), (np.arange(r1 - r0), np.arange(r0, r1))), shape=A_loc.shape)
            IA = A_loc + shift
            IA.sum_duplicates()
            IA.sort_indices()
            IA.data *= -1.0
            cache[(r0, r1)] = sp.csr_matrix((IA.data, IA.indices, IA.indptr), shape=(r1 - r0, ncols))
        pieces.append(_append_diagonal(cache[(r0, r1)], (t - 1) * D, diag))
    return _stack_rows(pieces, R1 - R0, ncols)


def _time_blocks(R0: int, R1: int, D: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """For the rows [R0, R1) of M: ``(t, r0, r1, diag)`` per time block t they meet, with the
    block-local rows [r0, r1) and the global indices of those rows (the unit diagonal).
    """
    for t in range(R0 // D, (R1 - 1) // D + 1):
        lo, hi = max(R0, t * D), min(R1, (t + 1) * D)
        yield t, lo - t * D, hi - t * D, np.arange(lo, hi, dtype=np.int64)


def _stack_rows(pieces: list, nrows: int, ncols: int) -> sp.csr_matrix:
    """Vertical concatenation of CSR row blocks (sorted columns kept, no copies of the pattern logic)."""
    if len(pieces) == 1:
        return pieces[0]
    indptr = [pieces[0].indptr.astype(np.int64)]
    for pc in pieces[1:]:
        indptr.append(pc.indptr[1:].astype(np.int64) + indptr[-1][-1])
    return sp.csr_matrix((np.concatenate([pc.data for pc in pieces]),
                          np.concatenate([pc.indices for pc in pieces]),
                          np.concatenate(indptr)), shape=(nrows, ncols))


def _block_system_local_csr_t(ode: PolynomialODE, N: int, T: int, R0: int, R1: int,
                              lift_kind: str = "paper") -> sp.csr_matrix:
    """Rows [R0, R1) of M with a time-varying constant term: -(I + A(t-1)) in block row t >= 1.

    One :class:`LocalPattern` per distinct row range (on the union support of F0 and F0_t[:T]),
    whose values are re-evaluated with F0(t-1) for every time block.  The discrete lift's rows
    are generated afresh for every time block (F0(t) enters them through products).
    """
    ode.check_horizon(T)
    D = carleman_dim(ode.n, N)
    ncols = (T + 1) * D
    if lift_kind == "discrete":
        pieces = []
        for t, r0, r1, diag in _time_blocks(R0, R1, D):
            if t == 0:
                pieces.append(_append_diagonal(sp.csr_matrix((r1 - r0, ncols)), 0, diag))
                continue
            L = discrete.lift_local_csr(ode, N, r0, r1, t - 1)
            L = L + sp.csr_matrix((np.ones(r1 - r0), (np.arange(r1 - r0), np.arange(r0, r1))), shape=L.shape)
            L.sum_duplicates()
            L.sort_indices()
            blk = sp.csr_matrix((-L.data, L.indices, L.indptr), shape=(r1 - r0, ncols))
            pieces.append(_append_diagonal(blk, (t - 1) * D, diag))
        return _stack_rows(pieces, R1 - R0, ncols)
    support = ode.f0_support(T)
    cache: dict[tuple[int, int], LocalPattern] = {}
    pieces = []
    for t, r0, r1, diag in _time_blocks(R0, R1, D):
        if t == 0:
            pieces.append(_append_diagonal(sp.csr_matrix((r1 - r0, ncols)), 0, diag))
            continue
        if (r0, r1) not in cache:
            cache[(r0, r1)] = LocalPattern(ode, N, r0, r1, support, add_identity=True)
        blk = cache[(r0, r1)].csr(ode.f0(t - 1), ncols=ncols, scale=-1.0)
        pieces.append(_append_diagonal(blk, (t - 1) * D, diag))
    return _stack_rows(pieces, R1 - R0, ncols)


@dataclass
class AssemblyStats:
    """Per-assembly figures: global size/nnz, max over ranks of time, memory per rank.

    ``mat_bytes_per_rank`` is PETSc's MatInfo memory, or when PETSc reports 0 (3.18 does) the AIJ
    storage 12 bytes per nonzero (8-byte value + 4-byte column) + 8 bytes per row.
    ``exact_preallocation``: no mallocs during assembly and no unneeded preallocated slots on any rank.
    """

    rows: int
    nnz: int
    seconds: float
    mat_bytes_per_rank: list
    peak_rss_bytes_per_rank: list
    exact_preallocation: bool = True


def _petsc() -> Any:
    from petsc4py import PETSc

    return PETSc


def _stats(mat: Any, seconds: float, comm: Any) -> AssemblyStats:
    info = mat.getInfo(_petsc().Mat.InfoType.LOCAL)
    nnz_local = int(info["nz_used"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = comm.allgather(int(info.get("memory", 0)) or int(nnz_local * 12 + 8 * mat.getLocalSize()[0]))
    exact = bool(comm.allreduce(int(info["mallocs"] == 0 and info["nz_unneeded"] == 0), op=_min_op()))
    return AssemblyStats(rows=mat.getSize()[0], nnz=int(comm.allreduce(nnz_local)),
                         seconds=float(comm.allreduce(seconds, op=_max_op())),
                         mat_bytes_per_rank=mem, peak_rss_bytes_per_rank=comm.allgather(rss),
                         exact_preallocation=exact)


def _max_op() -> Any:
    from mpi4py import MPI

    return MPI.MAX


def _min_op() -> Any:
    from mpi4py import MPI

    return MPI.MIN


def assemble_carleman(ode: PolynomialODE, N: int, comm: Any, t: int | None = None,
                      lift_kind: str = "paper", owner: PetscOwner | None = None,
                      prefix: str = "qcm_") -> tuple[Any, AssemblyStats]:
    """Distributed AIJ matrix A of order N on ``comm`` (rows split by :func:`hpcqml.parallel.block_bounds`,
    which is PETSc's default split).

    With ``t`` given and a time-varying constant term this is A(t) (F0 replaced by F0(t)).
    ``lift_kind = "discrete"``: A_d = L - I of the exact lift of the map (:mod:`hpcqml.carleman.discrete`).

    Args:
        ode: the instance (eq. II.1).
        N: Carleman order.
        comm: the communicator.
        t: time step of a time-varying F0 (None: the mean F0).
        lift_kind: ``paper`` or ``discrete``.
        owner: owns the matrix from its creation on (None: the caller destroys it; it is destroyed
            here when the assembly fails).
        prefix: options prefix of the matrix (``-{prefix}mat_type``).

    Returns:
        ``(mat, AssemblyStats)``.
    """
    t0 = time.perf_counter()
    D = carleman_dim(ode.n, N)
    r0, r1 = block_bounds(D, comm.Get_rank(), comm.Get_size())
    local = PetscOwner()
    try:
        mat = aij_from_csr(carleman_local_csr(ode, N, r0, r1, t, lift_kind), D, comm,
                           owner if owner is not None else local, prefix)
        return mat, _stats(mat, time.perf_counter() - t0, comm)
    except BaseException:
        local.close()
        raise


def assemble_block_system(ode: PolynomialODE, N: int, T: int, comm: Any, lift_kind: str = "paper",
                          owner: PetscOwner | None = None, prefix: str = "qcm_") -> tuple[Any, Any, AssemblyStats]:
    """Distributed M (eq. II.79) and right-hand side B = (y_in, b, ..., b).

    ``lift_kind = "discrete"``: -(I + A_d) and b_d of the exact lift of the map.
    With a time-varying constant term: -(I + A(t)) in block row t+1 and B = (y_in, b(0), ..., b(T-1)).

    Args:
        ode: the instance (eq. II.1).
        N: Carleman order.
        T: number of time steps.
        comm: the communicator.
        lift_kind: ``paper`` or ``discrete``.
        owner: owns M and B from their creation on (None: the caller destroys them; they are
            destroyed here when the assembly fails).
        prefix: options prefix of M and B (``-{prefix}mat_type``, ``-{prefix}vec_type``).

    Returns:
        ``(M, B, AssemblyStats)`` with PETSc Mat and Vec on ``comm``.
    """
    t0 = time.perf_counter()
    D = carleman_dim(ode.n, N)
    R0, R1 = block_bounds((T + 1) * D, comm.Get_rank(), comm.Get_size())
    local = PetscOwner()
    target = owner if owner is not None else local
    try:
        M = aij_from_csr(block_system_local_csr(ode, N, T, R0, R1, lift_kind), (T + 1) * D, comm, target, prefix)
        B = vec_for(M, target, prefix, "left", block_rhs_local(ode, N, T, R0, R1, lift_kind))
        return M, B, _stats(M, time.perf_counter() - t0, comm)
    except BaseException:
        local.close()
        raise


def block_rhs_local(ode: PolynomialODE, N: int, T: int, R0: int, R1: int, lift_kind: str = "paper") -> np.ndarray:
    """Entries [R0, R1) of B = (y_in, b, ..., b) with b = (F0, 0, ..., 0) (eq. II.79).

    With a time-varying constant term block t >= 1 holds b(t-1) = (F0(t-1), 0, ..., 0).
    ``lift_kind = "discrete"``: b = b_d = (F0, F0^{(x)2}, ..., F0^{(x)N}) of the exact lift of the map.
    """
    D = carleman_dim(ode.n, N)
    out = np.zeros(R1 - R0, dtype=np.float64)
    if R0 < D:
        out[: min(R1, D) - R0] = lift(ode.u_in, N)[R0: min(R1, D)]
    if ode.F0_t is not None:
        ode.check_horizon(T)
    if lift_kind == "discrete":
        cache: dict[tuple[int, int], np.ndarray] = {}   # constant F0: one b_d per row range
        for t in range(1, T + 1):
            lo, hi = max(R0, t * D), min(R1, (t + 1) * D)
            if lo >= hi:
                continue
            rng = (lo - t * D, hi - t * D)
            if ode.F0_t is not None:
                out[lo - R0: hi - R0] = discrete.lift_rhs_local(ode, N, *rng, t - 1)
                continue
            if rng not in cache:
                cache[rng] = discrete.lift_rhs_local(ode, N, *rng)
            out[lo - R0: hi - R0] = cache[rng]
        return out
    f0 = ode.f0()
    if np.any(f0) or ode.F0_t is not None:
        for t in range(1, T + 1):
            lo, hi = max(R0, t * D), min(R1, t * D + ode.n)
            if lo < hi:
                f0t = ode.f0(t - 1) if ode.F0_t is not None else f0
                out[lo - R0: hi - R0] = f0t[lo - t * D: hi - t * D]
    return out
