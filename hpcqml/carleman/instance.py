"""Discrete polynomial ODE instances (paper eq. II.1-II.2).

An instance is the map

    u(t+1) - u(t) = F_0 + F_1 u(t) + F_2 u(t)^{(x)2} + ... + F_q u(t)^{(x)q},   u(0) = u_in,

with sparse ``F[l]`` of shape ``n x n**l`` (``F[0]`` is the column ``n x 1``).  Kronecker powers use
the row-major convention of eq. II.2: ``(u (x) v)[i * len(v) + k] = u[i] * v[k]``.

Time-varying constant term ("SGD noise"): an optional dense ``F0_t`` of shape
``(T_max, n)`` makes the constant term of step t equal to ``F0(t) = F[0] + F0_t[t]``, so
``F[0]`` stays the mean and eq. II.1 becomes u(t+1) - u(t) = F0(t) + sum_{l>=1} F_l u^{(x)l}.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpcqml.errors import InputFileError, UserError
from hpcqml.io import open_hdf5_read


@dataclass
class PolynomialODE:
    """The discrete polynomial ODE of eq. II.1.

    Attributes:
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
    def T_max(self) -> int | None:  # noqa: N802 - the paper's horizon T
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


#: limits checked on declared shapes before any array of an instance file is read
MAX_DEGREE = 8
MAX_N = 100_000
MAX_ENTRIES = 50_000_000


def _read(d: Any, key: str, dtype: Any, max_len: int) -> np.ndarray:
    """``d[key]`` as an array of ``dtype`` after checking its declared shape and kind (integer
    kinds only when ``dtype`` is an integer type).
    """
    try:
        obj = d[key]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputFileError(f"PolynomialODE file: missing {key!r} ({exc.__class__.__name__})") from None
    shape = getattr(obj, "shape", np.shape(obj))
    if len(shape) > 2 or int(np.prod(shape, dtype=np.float64)) > max_len:
        raise InputFileError(f"PolynomialODE file: {key!r} has shape {tuple(shape)}, larger than allowed")
    kind = getattr(getattr(obj, "dtype", None), "kind", None) or np.asarray(obj).dtype.kind
    allowed = "biu" if np.issubdtype(dtype, np.integer) else "biuf"
    if kind not in allowed:
        raise InputFileError(f"PolynomialODE file: {key!r} has dtype kind {kind!r}, expected one of {allowed!r}")
    try:
        return np.asarray(obj[()], dtype=dtype)
    except (TypeError, ValueError, OSError) as exc:
        raise InputFileError(f"PolynomialODE file: cannot read {key!r} ({exc})") from None


def from_dict(d: Any) -> PolynomialODE:
    """Rebuild (and validate) an instance from :func:`to_dict` output or an ``h5py.Group`` of the same layout.

    Declared shapes, dtypes and sizes are checked before the arrays are read; anything malformed
    raises :class:`InputFileError` with one line naming the field.
    """
    u_in = _read(d, "u_in", np.float64, MAX_N)
    q_arr = _read(d, "q", np.float64, 1)
    if q_arr.size != 1 or not np.isfinite(q_arr).all() or q_arr.reshape(-1)[0] != int(q_arr.reshape(-1)[0]):
        raise InputFileError("PolynomialODE file: 'q' must be one integer")
    q = int(q_arr.reshape(-1)[0])
    if not 1 <= q <= MAX_DEGREE:
        raise InputFileError(f"PolynomialODE file: degree q={q} must lie in [1, {MAX_DEGREE}]")
    n = u_in.shape[0] if u_in.ndim == 1 else -1
    if n < 1:
        raise InputFileError(f"PolynomialODE file: u_in must be a non-empty vector, got shape {u_in.shape}")
    F = []
    for ell in range(q + 1):
        indptr = _read(d, f"F{ell}/indptr", np.int64, n + 1)
        indices = _read(d, f"F{ell}/indices", np.int64, MAX_ENTRIES)
        data = _read(d, f"F{ell}/data", np.float64, MAX_ENTRIES)
        ncols = n**ell
        if (indptr.ndim != 1 or indptr.shape[0] != n + 1 or indices.shape != data.shape or indices.ndim != 1
                or indptr[0] != 0 or indptr[-1] != data.shape[0] or np.any(np.diff(indptr) < 0)
                or (indices.size and (indices.min() < 0 or indices.max() >= ncols))):
            raise InputFileError(f"PolynomialODE file: F{ell} CSR arrays do not describe an {n} x {ncols} matrix")
        F.append(sp.csr_matrix((data, indices, indptr), shape=(n, ncols)))
    F0_t = None
    try:
        has_noise = "F0_t" in d
    except TypeError:
        has_noise = False
    if has_noise:
        F0_t = _read(d, "F0_t", np.float64, MAX_ENTRIES)
    try:
        return PolynomialODE(F=F, u_in=u_in, F0_t=F0_t)
    except InputFileError:
        raise
    except UserError as exc:
        raise InputFileError(str(exc)) from None


def load_instance(path: str | Path, group: str = "/") -> PolynomialODE:
    """Read an instance from ``group`` of the HDF5 file ``path`` (layout of :func:`to_dict`).

    Raises :class:`InputFileError` (one line) for a missing, truncated or non-HDF5 file, a missing
    group, or malformed contents.
    """
    import h5py

    fh = open_hdf5_read(path, "instance file")
    with fh:
        try:
            node = fh[group]
        except (KeyError, ValueError, OSError):
            raise InputFileError(f"instance file {path} has no group {group!r}") from None
        if not isinstance(node, h5py.Group):
            raise InputFileError(f"instance file {path}: {group!r} is not a group")
        try:
            return from_dict(node)
        except OSError as exc:
            raise InputFileError(f"instance file {path}: damaged HDF5 data ({exc})") from None
        except InputFileError as exc:  # the field is named; the file too
            raise InputFileError(f"instance file {path}: {exc}") from None


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
