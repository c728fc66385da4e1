"""Discrete polynomial ODE instances (paper eq. II.1-II.2).

An instance is the map

    u(t+1) - u(t) = F_0 + F_1 u(t) + F_2 u(t)^{(x)2} + ... + F_q u(t)^{(x)q},   u(0) = u_in,

with sparse ``F[l]`` of shape ``n x n**l`` (``F[0]`` is the column ``n x 1``).  Kronecker powers use
the row-major convention of eq. II.2: ``(u (x) v)[i * len(v) + k] = u[i] * v[k]``.

Time-varying constant term ("SGD noise", issue 5): an optional dense ``F0_t`` of shape
``(T_max, n)`` makes the constant term of step t equal to ``F0(t) = F[0] + F0_t[t]``, so
``F[0]`` stays the mean and eq. II.1 becomes u(t+1) - u(t) = F0(t) + sum_{l>=1} F_l u^{(x)l}.
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
    F0_t : optional float64 array ``(T_max, n)``; the constant term of step t is
        ``F[0] + F0_t[t]`` (t < T_max).  ``None``: time-independent F0 (the original eq. II.1).
    """

    F: list
    u_in: np.ndarray
    meta: dict = field(default_factory=dict)
    F0_t: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.F = [sp.csr_matrix(f, dtype=np.float64) for f in self.F]
        for f in self.F:
            f.sum_duplicates()
            f.sort_indices()
        self.u_in = np.asarray(self.u_in, dtype=np.float64).reshape(-1)
        if self.F0_t is not None:
            try:
                self.F0_t = np.array(self.F0_t, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise UserError(f"PolynomialODE: F0_t is not a float array ({exc})") from None
        validate(self)

    @property
    def n(self) -> int:
        """Number of state variables."""
        return int(self.u_in.shape[0])

    @property
    def q(self) -> int:
        """Polynomial degree (highest l with an F_l, zero or not)."""
        return len(self.F) - 1

    @property
    def T_max(self) -> int | None:
        """Number of steps covered by ``F0_t`` (None when F0 does not depend on t)."""
        return None if self.F0_t is None else int(self.F0_t.shape[0])

    def check_horizon(self, T: int) -> None:
        """Raise :class:`UserError` when ``F0_t`` does not cover the steps t = 0..T-1."""
        if self.F0_t is not None and T > self.F0_t.shape[0]:
            raise UserError(f"PolynomialODE: F0_t covers {self.F0_t.shape[0]} steps but T={T} steps were asked for")

    def f0(self, t: int | None = None) -> np.ndarray:
        """Dense constant term F0(t) = F[0] + F0_t[t] (length n, float64); t = None gives the mean F[0]."""
        out = np.asarray(self.F[0].toarray(), dtype=np.float64).reshape(-1).copy()
        if t is not None and self.F0_t is not None:
            self.check_horizon(t + 1)
            out += self.F0_t[t]
        return out

    def f0_support(self, T: int | None = None) -> np.ndarray:
        """Sorted rows a where F[0] stores an entry or F0_t[t, a] != 0 for some t < T (all t if T is None).

        This union of supports is the sparsity pattern of the F0 blocks of every A(t).
        """
        rows = np.flatnonzero(np.diff(self.F[0].indptr) > 0)
        if self.F0_t is not None:
            noise = self.F0_t if T is None else self.F0_t[:T]
            rows = np.union1d(rows, np.flatnonzero(np.any(noise != 0.0, axis=0)))
        return rows.astype(np.int64)

    def rhs(self, u: np.ndarray, t: int | None = None) -> np.ndarray:
        """f_t(u) = F0(t) + sum_{l>=1} F_l u^{(x)l} (right-hand side of eq. II.1), float64."""
        u = np.asarray(u, dtype=np.float64)
        out = self.f0(t)
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
    if ode.F0_t is not None:
        g = ode.F0_t
        if g.ndim != 2 or g.shape[0] < 1 or g.shape[1] != n:
            raise UserError(f"PolynomialODE: F0_t has shape {g.shape}, expected (T_max >= 1, {n}) for n={n}")
        if not np.all(np.isfinite(g)):
            raise UserError("PolynomialODE: F0_t contains NaN or Inf")


def to_dict(ode: PolynomialODE) -> dict[str, np.ndarray]:
    """Plain dict of arrays (CSR triplets per F_l) for HDF5 storage; inverse of :func:`from_dict`.

    Keys: ``n`` (int64 scalar array), ``q``, ``u_in`` (float64, n), and for each l
    ``F{l}/indptr`` (int64, n+1), ``F{l}/indices`` (int64, nnz), ``F{l}/data`` (float64, nnz);
    ``F0_t`` (float64, (T_max, n)) only when the constant term varies with t.
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
    if ode.F0_t is not None:
        out["F0_t"] = ode.F0_t.astype(np.float64)
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
    F0_t = None
    try:
        has_noise = "F0_t" in d
    except TypeError:
        has_noise = False
    if has_noise:
        try:
            F0_t = np.asarray(d["F0_t"][()], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise UserError(f"PolynomialODE file: bad 'F0_t' ({exc})") from None
    return PolynomialODE(F=F, u_in=u_in, F0_t=F0_t)


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
