"""Discrete polynomial ODE instances (paper eq. II.1-II.2).

An instance is the map

    u(t+1) - u(t) = F_0 + F_1 u(t) + F_2 u(t)^{(x)2} + ... + F_q u(t)^{(x)q},   u(0) = u_in,

with sparse ``F[l]`` of shape ``n x n**l`` (``F[0]`` is the column ``n x 1``).  Kronecker powers use
the row-major convention of eq. II.2: ``(u (x) v)[i * len(v) + k] = u[i] * v[k]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpcqml.errors import UserError


@dataclass
class PolynomialODE:
    """The discrete polynomial ODE of eq. II.1.

    Attributes
    ----------
    F : list of ``scipy.sparse.csr_matrix``; ``F[l]`` has shape ``(n, n**l)``, ``l = 0..q``.
    u_in : float64 array of length ``n``, the initial point ``u(0)``.
    meta : free-form description (generator name, seed, ...); not used by the numerics.
    """

    F: list
    u_in: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.F = [sp.csr_matrix(f, dtype=np.float64) for f in self.F]
        for f in self.F:
            f.sum_duplicates()
            f.sort_indices()
        self.u_in = np.asarray(self.u_in, dtype=np.float64).reshape(-1)
        validate(self)

    @property
    def n(self) -> int:
        """Number of state variables."""
        return int(self.u_in.shape[0])

    @property
    def q(self) -> int:
        """Polynomial degree (highest l with an F_l, zero or not)."""
        return len(self.F) - 1

    def rhs(self, u: np.ndarray) -> np.ndarray:
        """f(u) = sum_l F_l u^{(x)l} (right-hand side of eq. II.1), float64."""
        u = np.asarray(u, dtype=np.float64)
        out = np.asarray(self.F[0].toarray()).reshape(-1).copy()
        power = np.ones(1, dtype=np.float64)
        for ell in range(1, self.q + 1):
            power = np.kron(power, u)
            if self.F[ell].nnz:
                out += self.F[ell] @ power
        return out

    def norms(self) -> np.ndarray:
        """Spectral norms ||F_l||_2, l = 0..q (exact SVD for small blocks, else Frobenius bound flagged by caller)."""
        out = np.zeros(self.q + 1)
        for ell, f in enumerate(self.F):
            if f.nnz == 0:
                continue
            if f.shape[0] * f.shape[1] <= 4_000_000:
                out[ell] = float(np.linalg.norm(f.toarray(), 2))
            else:  # ||F||_2 = sqrt(lambda_max(F F^T)), F F^T is n x n
                g = (f @ f.T).toarray()
                out[ell] = float(np.sqrt(max(np.linalg.eigvalsh(g)[-1], 0.0)))
        return out


def validate(ode: PolynomialODE) -> None:
    """Raise :class:`UserError` (one line) if shapes, dtypes or values are malformed."""
    u = ode.u_in
    if u.ndim != 1 or u.shape[0] < 1:
        raise UserError(f"PolynomialODE: u_in must be a non-empty vector, got shape {u.shape}")
    n = u.shape[0]
    if len(ode.F) < 2:
        raise UserError(f"PolynomialODE: need at least F0 and F1, got {len(ode.F)} matrices")
    if not np.all(np.isfinite(u)):
        raise UserError("PolynomialODE: u_in contains NaN or Inf")
    for ell, f in enumerate(ode.F):
        want = (n, n**ell)
        if f.shape != want:
            raise UserError(f"PolynomialODE: F{ell} has shape {f.shape}, expected {want} for n={n}")
        if not np.all(np.isfinite(f.data)):
            raise UserError(f"PolynomialODE: F{ell} contains NaN or Inf")


def to_dict(ode: PolynomialODE) -> dict[str, np.ndarray]:
    """Plain dict of arrays (CSR triplets per F_l) for HDF5 storage; inverse of :func:`from_dict`.

    Keys: ``n`` (int64 scalar array), ``q``, ``u_in`` (float64, n), and for each l
    ``F{l}/indptr`` (int64, n+1), ``F{l}/indices`` (int64, nnz), ``F{l}/data`` (float64, nnz).
    """
    out: dict[str, np.ndarray] = {
        "n": np.array(ode.n, dtype=np.int64),
        "q": np.array(ode.q, dtype=np.int64),
        "u_in": ode.u_in.astype(np.float64),
    }
    for ell, f in enumerate(ode.F):
        out[f"F{ell}/indptr"] = f.indptr.astype(np.int64)
        out[f"F{ell}/indices"] = f.indices.astype(np.int64)
        out[f"F{ell}/data"] = f.data.astype(np.float64)
    return out


def from_dict(d: Any) -> PolynomialODE:
    """Rebuild (and validate) an instance from :func:`to_dict` output or an ``h5py.Group`` of the same layout."""
    try:
        u_in = np.asarray(d["u_in"][()], dtype=np.float64)
        q = int(np.asarray(d["q"][()]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"PolynomialODE file: missing or bad 'u_in'/'q' ({exc})") from None
    n = u_in.shape[0] if u_in.ndim == 1 else -1
    if n < 1:
        raise UserError(f"PolynomialODE file: u_in must be a vector, got shape {u_in.shape}")
    F = []
    for ell in range(q + 1):
        try:
            indptr = np.asarray(d[f"F{ell}/indptr"][()], dtype=np.int64)
            indices = np.asarray(d[f"F{ell}/indices"][()], dtype=np.int64)
            data = np.asarray(d[f"F{ell}/data"][()], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"PolynomialODE file: missing or bad F{ell} ({exc})") from None
        ncols = n**ell
        if (indptr.ndim != 1 or indptr.shape[0] != n + 1 or indices.shape != data.shape
                or indptr[0] != 0 or indptr[-1] != data.shape[0] or np.any(np.diff(indptr) < 0)
                or (indices.size and (indices.min() < 0 or indices.max() >= ncols))):
            raise UserError(f"PolynomialODE file: F{ell} CSR arrays do not describe an {n} x {ncols} matrix")
        F.append(sp.csr_matrix((data, indices, indptr), shape=(n, ncols)))
    return PolynomialODE(F=F, u_in=u_in)


def kron_power(u: np.ndarray, j: int) -> np.ndarray:
    """u^{(x)j} as a float64 vector of length n**j (eq. II.2); j = 0 gives [1.0]."""
    out = np.ones(1, dtype=np.float64)
    for _ in range(j):
        out = np.kron(out, u)
    return out


def lift(u: np.ndarray, N: int) -> np.ndarray:
    """y_in = (u, u^{(x)2}, ..., u^{(x)N}) of eq. II.7, length Delta = n + ... + n**N."""
    return np.concatenate([kron_power(np.asarray(u, dtype=np.float64), j) for j in range(1, N + 1)])


def carleman_dim(n: int, N: int) -> int:
    """Delta = n + n^2 + ... + n^N (eq. II.13)."""
    return int(sum(n**j for j in range(1, N + 1)))
