"""Resource estimates for the quantum algorithm (paper Theorems I.1, I.2, II.3, II.4; Sec. II C-D).

Every function here is a closed-form expression and works for instances far too large to
simulate. The paper gives its costs in O-notation: the hidden constants and the degrees of
the ``poly(...)``/``polylog(...)`` factors are not stated there, so the functions return
the explicit prefactor and the arguments of the unknown polynomial separately and mark the
rest as unknown (:data:`UNKNOWN`). Logarithms are natural unless stated; the base only
changes the unknown constants.

Quantities
- ``Delta = n + n^2 + ... + n^N`` (eq. II.13), the linear system ``(T+1) Delta`` (eq. II.79),
  its qubits ``ceil(log2((T+1) Delta))`` (doubled dimension when the Hermitian dilation
  is used), model qubits ``m = ceil(log2 n)``.
- ``kappa <= 2(T+1)`` when ``||I + A|| < 1`` (eq. II.83); the paper's ``kappa_a = 2(T+1)``.
- eq. II.77: ``O(s_M kappa polylog(N_h/eps))``; eq. II.94: ``O(s_M^2 kappa_a^2 polylog(N_h/eps))``.
- eq. I.1 / II.95: ``O(s q T poly(m, L, 1/eps))``; eq. I.2 / II.96: ``O(s^2 q^2 T^2 poly(m, L, 1/eps))``
  with ``L = 2/ln(1/||u||) * ln(3 sum_{l=2}^q (l-1)||F_l|| / (||A|| eps_le))`` (``eps_le = 1`` in I.1/I.2).
- tomography ``O(m^2 r^3 / eps^2)`` (Theorem I.1, Sec. II D, log factors ignored);
- sparse state preparation of an r-sparse state on ``m`` qubits: ``O(r m)`` = ``O(r log n)``
  (Gleinig & Hoefler, DAC 2021, paper ref. [55]).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp

from hpcqml.carleman.instance import carleman_dim
from hpcqml.errors import UserError

UNKNOWN = "unknown (not given in the paper)"

#: Trainable parameters of the two models of the paper (Sec. III B): resnet32-w4 and resnet56-w11.
PAPER_MODELS = {"resnet32-w4": 7_451_044, "resnet56-w11": 103_703_700}


def _pos_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise UserError(f"resources: {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _pos_float(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"resources: {name} must be a number, got {v!r}") from None
    if not (f > 0 and math.isfinite(f)):
        raise UserError(f"resources: {name} must be a finite number > 0, got {v!r}")
    return f


def qubits_for(dim: int) -> int:
    """``ceil(log2 dim)``: qubits to hold a vector of length ``dim`` (0 for dim 1)."""
    dim = _pos_int("dim", dim)
    return (dim - 1).bit_length()


def system_qubits(n: int, N: int, T: int, dilated: bool = True) -> int:
    """Qubits of the register holding the block system of eq. II.79, ``(T+1) Delta`` unknowns.

    The block matrix is not symmetric, so HHL needs the Hermitian dilation, one more qubit.
    """
    n, N, T = _pos_int("n", n), _pos_int("N", N), _pos_int("T", T, 0)
    return qubits_for((T + 1) * carleman_dim(n, N)) + (1 if dilated else 0)


def sparsity(M: Any) -> int:
    """``s``: the largest number of non-zeros in any row or column of ``M`` (dense or sparse)."""
    A = sp.csr_matrix(M)
    A.eliminate_zeros()
    if A.shape[0] == 0:
        return 0
    rows = np.diff(A.indptr).max()
    cols = np.diff(A.tocsc().indptr).max()
    return int(max(rows, cols))


def condition_number(M: Any, dense_limit: int = 6000) -> float:
    """``kappa = sigma_max / sigma_min`` by a dense SVD (``M`` up to ``dense_limit`` rows).

    Larger matrices: take kappa from the SLEPc SVD of the ``qcm`` stage instead.
    """
    A = M.toarray() if sp.issparse(M) else np.asarray(M, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise UserError(f"resources: condition number needs a square matrix, got shape {A.shape}")
    if A.shape[0] > dense_limit:
        raise UserError(f"resources: matrix of {A.shape[0]} rows is above the dense SVD limit {dense_limit}")
    s = np.linalg.svd(A, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def kappa_bound_dissipative(T: int) -> float:
    """``kappa <= 2(T+1)`` for ``||I + A|| < 1`` (eq. II.83); also the paper's choice of ``kappa_a``."""
    return 2.0 * (_pos_int("T", T, 0) + 1)


def kappa_bound_general(norm_I_plus_A: float, T: int) -> float:
    """``(1 + ||I+A||) sum_{t=0}^T ||I+A||^t`` (eq. II.81-II.83 without the dissipative assumption)."""
    g = float(norm_I_plus_A)
    T = _pos_int("T", T, 0)
    return (1.0 + g) * sum(g**t for t in range(T + 1))


def log_term(u_norm: float, F_norms: list[float], A_norm: float, eps_le: float = 1.0) -> float:
    """``L = 2/ln(1/||u||) * ln( 3 sum_{l=2}^q (l-1) ||F_l|| / (||A|| eps_le) )`` (eq. I.1, II.95, II.96).

    ``F_norms[l]`` is ``||F_l||`` for ``l = 0..q`` (entries 0 and 1 are not used). Needs
    ``||u|| < 1``; ``eps_le`` is the linearisation error target of eq. II.95/II.96.
    """
    u = _pos_float("||u||", u_norm)
    if u >= 1.0:
        raise UserError(f"resources: ||u|| must be < 1 for eq. I.1/I.2, got {u_norm!r}")
    s = sum((ell - 1) * float(f) for ell, f in enumerate(F_norms) if ell >= 2)
    if not s > 0:
        raise UserError("resources: sum_{l>=2} (l-1)||F_l|| must be > 0 (no non-linear term)")
    return 2.0 / math.log(1.0 / u) * math.log(3.0 * s / (_pos_float("||A||", A_norm) * _pos_float("eps_le", eps_le)))


def gate_complexity(theorem: str, s: int, q: int, T: int, m: int, eps: float,
                    L: float | None = None) -> dict[str, Any]:
    """Gate complexity of Theorem I.1 (``"I.1"``, = eq. II.95) or I.2 (``"I.2"``, = eq. II.96).

    Returns ``prefactor`` (``s q T`` or ``s^2 q^2 T^2``, exact), ``poly_args`` (the
    arguments ``m``, ``L``, ``1/eps`` of the unknown polynomial), and ``constant`` and
    ``poly_degree`` marked :data:`UNKNOWN`.
    """
    s, q, T, m = _pos_int("s", s), _pos_int("q", q), _pos_int("T", T), _pos_int("m", m)
    eps = _pos_float("eps", eps)
    if theorem in ("I.1", "II.95"):
        pre, eq = s * q * T, "I.1/II.95: O(s q T poly(m, L, 1/eps))"
    elif theorem in ("I.2", "II.96"):
        pre, eq = (s * q * T) ** 2, "I.2/II.96: O(s^2 q^2 T^2 poly(m, L, 1/eps))"
    else:
        raise UserError(f"resources: theorem must be 'I.1' or 'I.2', got {theorem!r}")
    return {"equation": eq, "prefactor": pre,
            "poly_args": {"m": m, "L": float("nan") if L is None else float(L), "1/eps": 1.0 / eps},
            "constant": UNKNOWN, "poly_degree": UNKNOWN}


def qlsa_complexity(s_M: int, kappa: float, N_h: int, eps: float, truncated: bool = False) -> dict[str, Any]:
    """Eq. II.77 ``O(s_M kappa polylog(N_h/eps))`` or, truncated, eq. II.94 ``O(s_M^2 kappa_a^2 polylog)``.

    Returns the exact prefactor and ``log2(N_h/eps)``, the argument of the unknown polylog.
    """
    s_M, N_h = _pos_int("s_M", s_M), _pos_int("N_h", N_h)
    kappa, eps = _pos_float("kappa", kappa), _pos_float("eps", eps)
    pre = (s_M * kappa) ** 2 if truncated else s_M * kappa
    return {"equation": "II.94: O(s_M^2 kappa_a^2 polylog(N_h/eps))" if truncated
            else "II.77: O(s_M kappa polylog(N_h/eps))",
            "prefactor": float(pre), "log2_Nh_over_eps": math.log2(N_h / eps),
            "constant": UNKNOWN, "polylog_degree": UNKNOWN}


def tomography_cost(m: int, r: int, eps: float) -> float:
    """``m^2 r^3 / eps^2`` measurements (Theorem I.1, Sec. II D; constant and log factors unknown)."""
    return float(_pos_int("m", m) ** 2 * _pos_int("r", r) ** 3) / _pos_float("eps", eps) ** 2


def sparse_state_prep_cost(r: int, n: int) -> int:
    """``r ceil(log2 n)``: the ``O(r log n)`` CNOT count/depth of Gleinig & Hoefler for an r-sparse state."""
    return _pos_int("r", r) * max(qubits_for(_pos_int("n", n)), 1)


def coupon_cost(r: int) -> float:
    """``r ln r``: shots to see all r equal-weight outcomes, to leading order (Sec. II D)."""
    r = _pos_int("r", r)
    return r * math.log(r) if r > 1 else 1.0


def model_table(n_params: dict[str, int] | None = None, density: float = 0.1, N: int = 2, q: int = 2,
                T: int = 100, eps: float = 1e-2, s: int | None = None) -> list[dict[str, Any]]:
    """One row of resource figures per model, for an r-sparse weight vector ``r = density * n``.

    ``s`` (the sparsity of the F_l) is not known for a real network; when ``None`` the
    gate-complexity prefactors are given per unit ``s`` (``q T`` and ``q^2 T^2``) and
    ``s`` is reported as unknown. Carleman order ``N``, degree ``q``, ``T`` (the paper
    downloads the sparse weights every 100 steps) and ``eps`` are assumptions of the table.
    """
    n_params = PAPER_MODELS if n_params is None else n_params
    if not 0 < density <= 1:
        raise UserError(f"resources: density must lie in (0, 1], got {density!r}")
    rows = []
    for name, n in n_params.items():
        n = _pos_int("n", n)
        r = max(round(density * n), 1)
        m = qubits_for(n)
        delta = carleman_dim(n, _pos_int("N", N))
        kappa_a = kappa_bound_dissipative(T)
        rows.append({
            "model": name, "n": n, "density": float(density), "r": r, "m": m, "N": N, "q": q, "T": T, "eps": eps,
            "Delta": delta, "system_size": (T + 1) * delta, "system_qubits": system_qubits(n, N, T),
            "kappa_a": kappa_a,
            "s": UNKNOWN if s is None else int(s),
            "prefactor_I1": q * T * (1 if s is None else s),
            "prefactor_I2": (q * T) ** 2 * (1 if s is None else s * s),
            "prefactor_times": "s (I.1), s^2 (I.2)" if s is None else "1",
            "tomography": tomography_cost(m, r, eps),
            "state_prep": sparse_state_prep_cost(r, n),
            "coupon_r_log_r": coupon_cost(r),
        })
    return rows
