"""Exact Carleman lift of the discrete polynomial map (the ``discrete`` lift beside the paper's).

The paper linearises the map u(t+1) = g(u(t)) with g(u) = u + F_0 + F_1 u + ... + F_q u^{(x)q}
(eq. II.1) by the stepping y(t+1) = (I + A) y(t) + b (eq. II.78) with the Carleman matrix A of the
continuous-time field (eq. II.3-II.6).  That stepping is forward Euler of dy/dt = A y + b, so it
misses the products of increments of eq. V.21-V.22 and leaves a discreteness error that no order
N removes.  The map itself has an exact linear lift: with G_0 = F_0, G_1 = I + F_1, G_l = F_l
(l >= 2), so that g(u) = sum_l G_l u^{(x)l},

    g(u)^{(x)j} = sum_{l_1..l_j} (G_{l_1} (x) ... (x) G_{l_j}) u^{(x)(l_1 + ... + l_j)},

every cross term included (mixed-product property of the Kronecker product).  Block row j of the
lifted map L therefore holds P_{j,k} = sum_{l_1+..+l_j = k} G_{l_1} (x) ... (x) G_{l_j} in block
column k (1 <= k <= N) and the constant c_j = P_{j,0} = F_0^{(x)j}; truncation drops k > N.
Without truncation y(t) = (u(t), ..., u(t)^{(x)N}) exactly; the truncated lift's only error is
the dropped terms k > N, so it converges geometrically in N wherever the map contracts.

To reuse eq. II.79 unchanged, this module writes the lift as I + A_d with A_d = L - I and
b_d = (c_1, ..., c_N): M then has -(I + A_d) = -L below its diagonal, and B = (y_in, b_d, ..., b_d).
A_d's eigenvalues are products (1 + a_{i_1}) ... (1 + a_{i_j}) minus 1 when F_0 = 0 (L is block
upper triangular with diagonal blocks (I + F_1)^{(x)j}), so the dissipative count of eq. II.28
means |prod (1 + a)| < 1 for it.

Rows are generated per rank from the sparse rows of the G_l (no global intermediates), in the
index conventions of :mod:`hpcqml.carleman.petsc_assembly`.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from hpcqml.carleman.instance import PolynomialODE, carleman_dim

#: the two lifts of the ``qcm`` stage
LIFTS = ("paper", "discrete")


def map_terms(ode: PolynomialODE, t: int | None = None) -> list[sp.csr_matrix]:
    """[G_0, ..., G_q] of the map g(u) = sum_l G_l u^{(x)l}: G_0 = F_0(t), G_1 = I + F_1, G_l = F_l.

    Args:
        ode: the instance (eq. II.1).
        t: step of a time-varying constant term (None: the mean F_0).

    Returns:
        CSR float64 matrices of shapes n x n^l.
    """
    n = ode.n
    g0 = sp.csr_matrix(ode.f0(t).reshape(n, 1))
    g1 = sp.csr_matrix(ode.F[1] + sp.identity(n, dtype=np.float64, format="csr"))
    out = [g0, g1] + [sp.csr_matrix(F) for F in ode.F[2:]]
    for g in out:
        g.sum_duplicates()
        g.eliminate_zeros()
        g.sort_indices()
    return out


def compositions(q: int, j: int, N: int) -> Iterator[tuple[int, ...]]:
    """Every (l_1, ..., l_j) with 0 <= l_i <= q and l_1 + ... + l_j <= N (the kept terms of block row j)."""
    if j == 0:
        yield ()
        return
    for first in range(q + 1):
        if first > N:
            break
        for rest in compositions(q, j - 1, N - first):
            yield (first,) + rest


def kron_rows(factors: list[sp.csr_matrix], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nonzeros of the given rows of kron(factors[0], ..., factors[-1]) as COO triplets.

    Row r of the product has digits (a_1, ..., a_j) in base n (the factors are n x m_i); its entry in
    column (c_1, ..., c_j) (mixed radix m_i) is prod_i factors[i][a_i, c_i].

    Args:
        factors: CSR matrices with the same number of rows n.
        rows: row indices of the product (int64).

    Returns:
        ``(position in rows, column, value)``: int64, int64, float64 arrays.
    """
    n = factors[0].shape[0]
    j = len(factors)
    owner = np.arange(rows.shape[0], dtype=np.int64)
    col = np.zeros(rows.shape[0], dtype=np.int64)
    val = np.ones(rows.shape[0], dtype=np.float64)
    for i, G in enumerate(factors):
        digit = (rows[owner] // n ** (j - 1 - i)) % n
        counts = (G.indptr[digit + 1] - G.indptr[digit]).astype(np.int64)
        which = np.repeat(np.arange(owner.shape[0], dtype=np.int64), counts)
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        first = np.cumsum(counts) - counts
        pos = np.repeat(G.indptr[digit].astype(np.int64) - first, counts) + np.arange(total, dtype=np.int64)
        owner = owner[which]
        col = col[which] * G.shape[1] + G.indices[pos].astype(np.int64)
        val = val[which] * G.data[pos]
    return owner, col, val


def _offsets(n: int, N: int) -> np.ndarray:
    off = np.zeros(N + 2, dtype=np.int64)
    for j in range(1, N + 1):
        off[j + 1] = off[j] + n**j
    return off


def lift_coo(ode: PolynomialODE, N: int, r0: int, r1: int,
             t: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows [r0, r1) of the truncated lifted map L and of its constant c.

    Args:
        ode: the instance.
        N: truncation order.
        r0: first global row (0 <= r0 <= r1).
        r1: one past the last global row (<= Delta).
        t: step of a time-varying constant term.

    Returns:
        ``(local row, global column, value, c)``: the COO triplets of L (duplicates not summed) and
        the dense constant c[r0:r1] (float64).
    """
    n, q = ode.n, ode.q
    off = _offsets(n, N)
    G = map_terms(ode, t)
    rows, cols, vals = [], [], []
    const = np.zeros(r1 - r0, dtype=np.float64)
    for j in range(1, N + 1):
        lo, hi = max(r0, off[j]), min(r1, off[j + 1])
        if lo >= hi:
            continue
        rr = np.arange(lo - off[j], hi - off[j], dtype=np.int64)
        for comp in compositions(q, j, N):
            factors = [G[ell] for ell in comp]
            if any(f.nnz == 0 for f in factors):
                continue
            owner, c, v = kron_rows(factors, rr)
            k = sum(comp)
            if k == 0:
                np.add.at(const, rr[owner] + off[j] - r0, v)
                continue
            rows.append(rr[owner] + off[j] - r0)
            cols.append(off[k] + c)
            vals.append(v)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), const
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), const


def lift_local_csr(ode: PolynomialODE, N: int, r0: int, r1: int, t: int | None = None) -> sp.csr_matrix:
    """Rows [r0, r1) of A_d = L - I (duplicates summed, columns sorted), shape (r1 - r0, Delta)."""
    r, c, v, _ = lift_coo(ode, N, r0, r1, t)
    diag = np.arange(r0, r1, dtype=np.int64)
    r = np.concatenate([r, diag - r0])
    c = np.concatenate([c, diag])
    v = np.concatenate([v, -np.ones(r1 - r0)])
    m = sp.csr_matrix((v, (r, c)), shape=(r1 - r0, carleman_dim(ode.n, N)), dtype=np.float64)
    m.sum_duplicates()
    m.sort_indices()
    return m


def lift_rhs_local(ode: PolynomialODE, N: int, r0: int, r1: int, t: int | None = None) -> np.ndarray:
    """Entries [r0, r1) of b_d = (F_0, F_0^{(x)2}, ..., F_0^{(x)N}) (F_0(t) when ``t`` is given)."""
    return lift_coo(ode, N, r0, r1, t)[3]


# --- serial reference, by recursive Kronecker products (independent of the row generation above) ---

def reference_blocks(ode: PolynomialODE, N: int, t: int | None = None) -> dict[tuple[int, int], sp.csr_matrix]:
    """P_{j,k} = sum_l G_l (x) P_{j-1,k-l} with P_{0,0} = [1]: the blocks of the lifted map, 0 <= k <= N."""
    G = map_terms(ode, t)
    P: dict[tuple[int, int], sp.csr_matrix] = {(0, 0): sp.csr_matrix(np.ones((1, 1)))}
    for j in range(1, N + 1):
        for k in range(0, N + 1):
            acc = None
            for ell, g in enumerate(G):
                prev = P.get((j - 1, k - ell))
                if prev is None or k - ell < 0:
                    continue
                term = sp.kron(g, prev, format="csr")
                acc = term if acc is None else acc + term
            if acc is not None:
                P[(j, k)] = sp.csr_matrix(acc)
    return P


def reference_matrix(ode: PolynomialODE, N: int, t: int | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """(A_d = L - I, b_d) of order N assembled serially from :func:`reference_blocks`."""
    n = ode.n
    P = reference_blocks(ode, N, t)
    blocks = [[P.get((j, k)) for k in range(1, N + 1)] for j in range(1, N + 1)]
    for j in range(N):
        if blocks[j][j] is None:
            blocks[j][j] = sp.csr_matrix((n ** (j + 1), n ** (j + 1)))
    L = sp.bmat(blocks, format="csr", dtype=np.float64)
    b = np.concatenate([P[(j, 0)].toarray().reshape(-1) if (j, 0) in P else np.zeros(n**j) for j in range(1, N + 1)])
    A = sp.csr_matrix(L - sp.identity(L.shape[0], format="csr"))
    A.sum_duplicates()
    A.eliminate_zeros()
    return A, b.astype(np.float64)


def trajectory(ode: PolynomialODE, N: int, T: int) -> np.ndarray:
    """y(t), t = 0..T, of the truncated lift y(t+1) = L y(t) + c (serial, :func:`reference_matrix`).

    Returns:
        (T+1) x Delta float64.
    """
    from hpcqml.carleman.instance import lift

    ode.check_horizon(T)
    y0 = lift(ode.u_in, N)
    out = np.empty((T + 1, y0.shape[0]), dtype=np.float64)
    out[0] = y0
    A, b = reference_matrix(ode, N)
    for t in range(T):
        if ode.F0_t is not None:
            A, b = reference_matrix(ode, N, t)
        out[t + 1] = out[t] + A @ out[t] + b
    return out


def residuals(ode: PolynomialODE, N: int, u: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step residual of the exact trajectory in the truncated lift, r(t) = ŷ(u(t+1)) - L ŷ(u(t)) - c.

    The lifted error η(t) = ŷ(u(t)) - y(t) obeys η(t+1) = L η(t) + r(t), η(0) = 0.  The lift is exact
    before truncation, so r(t) consists only of the dropped terms k > N (``truncation`` = ``residual``,
    ``discreteness`` = 0), the counterpart of :func:`hpcqml.carleman.timestepping.lifted_residuals`.

    Returns:
        ``residual``, ``truncation``, ``discreteness``: 2-norms per step t = 0..T-1 (float64).
    """
    from hpcqml.carleman.instance import lift

    T = u.shape[0] - 1
    res = np.zeros(T, dtype=np.float64)
    A, b = reference_matrix(ode, N)
    for t in range(T):
        if ode.F0_t is not None:
            A, b = reference_matrix(ode, N, t)
        y = lift(u[t], N)
        res[t] = np.linalg.norm(lift(u[t + 1], N) - y - A @ y - b)
    return {"residual": res, "truncation": res.copy(), "discreteness": np.zeros(T, dtype=np.float64)}
