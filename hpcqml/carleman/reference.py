"""Serial scipy.sparse reference for the Carleman matrix and the time-stepping system.

Written with explicit Kronecker products, independently of the row-wise distributed
assembly in :mod:`hpcqml.carleman.petsc_assembly`; the tests compare the two.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from hpcqml.carleman.instance import PolynomialODE, carleman_dim, lift


def _identity_power(n: int, k: int) -> sp.csr_matrix:
    return sp.identity(n**k, dtype=np.float64, format="csr")


def transfer_block(F_ell: sp.spmatrix, n: int, j: int) -> sp.csr_matrix:
    """A^j_{j+l-1} = sum_{p=0}^{j-1} I^{(x)p} (x) F_l (x) I^{(x)(j-1-p)} (eq. II.3).

    Shape ``n**j x n**(j+l-1)`` where ``F_l`` is ``n x n**l``.
    """
    out = None
    for p in range(j):
        term = sp.kron(sp.kron(_identity_power(n, p), F_ell, format="csr"),
                       _identity_power(n, j - 1 - p), format="csr")
        out = term if out is None else out + term
    return sp.csr_matrix(out)


def _terms(ode: PolynomialODE, t: int | None) -> list:
    """[F0(t), F1, ..., Fq] with F0(t) = F[0] + F0_t[t] as an n x 1 CSR (t = None: the mean F[0])."""
    if t is None or ode.F0_t is None:
        return list(ode.F)
    return [sp.csr_matrix(ode.f0(t).reshape(-1, 1))] + list(ode.F[1:])


def carleman_matrix(ode: PolynomialODE, N: int, t: int | None = None) -> sp.csr_matrix:
    """Truncated Carleman matrix A of order N (eq. II.4-II.6), Delta x Delta, float64 CSR.

    Block row j (1..N) holds A^j_{j+l-1} in block column j+l-1 for l = 0..q whenever
    1 <= j+l-1 <= N; the l = 0 block of row 1 is the constant b = (F0, 0, ..., 0).
    With ``t`` given and a time-varying constant term, F0 is replaced by F0(t) = F[0] + F0_t[t],
    which changes only the blocks A^j_{j-1} = sum_p I^{(x)p} (x) F0(t) (x) I^{(x)(j-1-p)}: this is A(t).
    """
    n = ode.n
    blocks = [[None] * N for _ in range(N)]
    for j in range(1, N + 1):
        for ell, F in enumerate(_terms(ode, t)):
            col = j + ell - 1
            if 1 <= col <= N and F.nnz:
                blk = transfer_block(F, n, j)
                blocks[j - 1][col - 1] = blk if blocks[j - 1][col - 1] is None else blocks[j - 1][col - 1] + blk
    for j in range(N):
        if blocks[j][j] is None:
            blocks[j][j] = sp.csr_matrix((n ** (j + 1), n ** (j + 1)))
    A = sp.bmat(blocks, format="csr", dtype=np.float64)
    A.sum_duplicates()
    A.eliminate_zeros()
    return A


def carleman_rhs(ode: PolynomialODE, N: int, t: int | None = None) -> np.ndarray:
    """B = (F0, 0, ..., 0) of length Delta (eq. II.5); b(t) = (F0(t), 0, ..., 0) when ``t`` is given."""
    b = np.zeros(carleman_dim(ode.n, N), dtype=np.float64)
    b[: ode.n] = ode.f0(t)
    return b


def block_system(A: sp.spmatrix, ode: PolynomialODE, N: int, T: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """M X = B of eq. II.79: identity diagonal blocks, -(I+A) below, B = (y_in, b, ..., b).

    Returns ``M`` ((T+1)Delta square, CSR) and ``rhs`` (float64, (T+1)Delta).
    When ``ode`` has a time-varying constant term, ``A`` is not used: block row t+1 holds
    -(I + A(t)) and the right-hand side is (y_in, b(0), ..., b(T-1)) (see :func:`block_system_t`).
    """
    if ode.F0_t is not None:
        return block_system_t(ode, N, T)
    D = A.shape[0]
    IA = sp.identity(D, format="csr") + sp.csr_matrix(A)
    sub = sp.diags([np.ones(T)], [-1], shape=(T + 1, T + 1), format="csr")
    M = sp.identity((T + 1) * D, format="csr") - sp.kron(sub, IA, format="csr")
    M = sp.csr_matrix(M)
    M.sum_duplicates()
    rhs = np.concatenate([lift(ode.u_in, N)] + [carleman_rhs(ode, N)] * T)
    return M, rhs


def block_system_t(ode: PolynomialODE, N: int, T: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Eq. II.79 with a time-varying constant term: identity diagonal, -(I + A(t)) in block (t+1, t).

    Built from :func:`carleman_matrix` at every t (independent Kronecker products) and
    ``scipy.sparse.bmat``; right-hand side (y_in, b(0), ..., b(T-1)).
    """
    ode.check_horizon(T)
    D = carleman_dim(ode.n, N)
    eye = sp.identity(D, format="csr", dtype=np.float64)
    blocks = [[None] * (T + 1) for _ in range(T + 1)]
    for t in range(T + 1):
        blocks[t][t] = eye
        if t >= 1:
            blocks[t][t - 1] = -(eye + carleman_matrix(ode, N, t - 1))
    M = sp.csr_matrix(sp.bmat(blocks, format="csr", dtype=np.float64))
    M.sum_duplicates()
    rhs = np.concatenate([lift(ode.u_in, N)] + [carleman_rhs(ode, N, t) for t in range(T)])
    return M, rhs


def forward_iteration_t(ode: PolynomialODE, N: int, T: int) -> np.ndarray:
    """y(t+1) = (I + A(t)) y(t) + b(t), y(0) = y_in (eq. II.78 with F0(t)); (T+1) x Delta float64.

    Without a time-varying term this is :func:`forward_iteration` with the constant A and b.
    """
    ode.check_horizon(T)
    y0 = lift(ode.u_in, N)
    if ode.F0_t is None:
        return forward_iteration(carleman_matrix(ode, N), carleman_rhs(ode, N), y0, T)
    out = np.empty((T + 1, y0.shape[0]), dtype=np.float64)
    out[0] = y0
    for t in range(T):
        out[t + 1] = out[t] + carleman_matrix(ode, N, t) @ out[t] + carleman_rhs(ode, N, t)
    return out


def forward_iteration(A: sp.spmatrix, b: np.ndarray, y0: np.ndarray, T: int) -> np.ndarray:
    """y(t+1) = (I + A) y(t) + b (eq. II.78); returns the (T+1) x Delta trajectory."""
    out = np.empty((T + 1, y0.shape[0]), dtype=np.float64)
    out[0] = y0
    for t in range(T):
        out[t + 1] = out[t] + A @ out[t] + b
    return out


def exact_recurrence(ode: PolynomialODE, T: int) -> np.ndarray:
    """The nonlinear map of eq. II.1 iterated exactly, with F0(t) at step t; (T+1) x n float64."""
    ode.check_horizon(T)
    out = np.empty((T + 1, ode.n), dtype=np.float64)
    out[0] = ode.u_in
    for t in range(T):
        out[t + 1] = out[t] + ode.rhs(out[t], t)
    return out
