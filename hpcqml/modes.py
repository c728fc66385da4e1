"""Modes of a linear(ised) gradient step and the paper's mode-counting formulas.

This is the lowest numerical layer shared by the Hessian spectra (``hessian/``), the Carleman
systems (``carleman/``) and the HHL estimates (``hhl/``): plain numpy, no torch, no PETSc.
A mode with eigenvalue ``a`` of the linear part ``F_1`` of ``u(t+1) - u(t) = F(u)`` (eq. I.3,
II.1) is dissipative when ``|1 + a| < 1`` (eq. II.28).  For a Hessian eigenvalue ``lambda``,
``a = -eta lambda`` (eq. II.65).  Eq. II.92 and its limit eq. II.93 turn the counts of such
modes into the paper's estimate of the truncated-HHL fidelity.
"""
from __future__ import annotations

import numpy as np

from hpcqml.errors import UserError


def is_dissipative(a: np.ndarray) -> np.ndarray:
    """Boolean mask of the dissipative modes, |1 + a| < 1 (eq. II.28), for eigenvalues ``a``.

    The one definition; callers holding Hessian eigenvalues λ pass a = -η λ (eq. II.65), and
    weighted fractions (SLQ masses) sum their weights over this mask.
    """
    return np.abs(1.0 + np.asarray(a)) < 1.0


def dissipative_counts(eigs: np.ndarray) -> tuple[int, int]:
    """(Delta_+, Delta_-): modes with |1 + a| < 1 (dissipative) vs |1 + a| >= 1 (eq. II.28).

    The one count of dissipative modes for eigenvalues a of a Carleman (or F1) matrix.
    """
    eigs = np.asarray(eigs)
    dis = int(np.count_nonzero(is_dissipative(eigs)))
    return dis, int(eigs.shape[0] - dis)


def dissipative_mean(a: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The representative dissipative eigenvalue a_+ of eq. II.92: the weighted mean of Re(a)
    over the dissipative modes (:func:`is_dissipative`); nan when there are none.

    The one convention of a_+: equal weights for the eigenvalues of a Carleman (or F1)
    matrix, the SLQ masses for a Hessian spectrum (a = -lambda or a = -eta*lambda).
    """
    a = np.asarray(a)
    w = np.ones(a.shape, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    plus = is_dissipative(a)
    if not plus.any() or not w[plus].sum() > 0:
        return float("nan")
    return float(np.sum(w[plus] * np.real(a[plus])) / np.sum(w[plus]))


def overlap_ii92(delta_plus: int, delta: int, a_plus: float, T: int) -> float:
    """Eq. II.92 with ``kappa_a = 2(T+1)``: ``Delta_+ G / ( ((T+1) Delta)^{1/2} (Delta_+ G + (T+1) Delta_-)^{1/2} )``.

    ``G = sum_{t=0}^{T} (1 + a_+)^t = ((1 + a_+)^{T+1} - 1) / a_+`` (``T + 1`` at ``a_+ = 0``).
    The one formula of eq. II.92, as printed.  ``a_+`` is the representative dissipative eigenvalue of
    :func:`dissipative_mean` (weighted mean of Re a over the modes with
    ``|1 + a| < 1``).  It is the paper's estimate, not the overlap of eq. II.87: with ``Delta_- = 0``
    it is ``sqrt(G/(T+1)) < 1`` although nothing is truncated when kappa(M) <= 2(T+1), where eq. II.87
    is 1 (:func:`hpcqml.hhl.truncated.ii92_against_ii87` evaluates both on one M).
    """
    if not (0 <= delta_plus <= delta and delta >= 1 and T >= 0):
        raise UserError(f"eq. II.92: need 0 <= Delta_+ <= Delta, Delta >= 1, T >= 0 "
                        f"(got {delta_plus}, {delta}, {T})")
    if delta_plus == 0:
        return 0.0
    if a_plus == 0.0:
        g = float(T + 1)
    elif a_plus > -1.0:
        g = float(np.expm1((T + 1) * np.log1p(a_plus)) / a_plus)
    else:
        g = float(((1.0 + a_plus) ** (T + 1) - 1.0) / a_plus)
    d_minus = delta - delta_plus
    return delta_plus * g / (np.sqrt((T + 1) * delta) * np.sqrt(delta_plus * g + (T + 1) * d_minus))


def overlap_ii93(delta_plus: float | np.ndarray, delta: float | np.ndarray) -> float | np.ndarray:
    """Eq. II.93, the ``a_+ -> 0^-`` limit of eq. II.92: ``Delta_+ / Delta``.

    The one formula of eq. II.93 (and of the ratio Delta_+/Delta of eq. II.28).  ``delta_plus``
    and ``delta`` are mode counts or masses (SLQ weights), scalars or arrays of equal shape.

    Returns:
        A float for scalars, else a float64 array (NaN where ``delta`` is 0).

    Raises:
        UserError: a negative count/mass, ``Delta_+ > Delta``, or a scalar ``Delta`` <= 0.
    """
    dp = np.asarray(delta_plus, dtype=np.float64)
    d = np.asarray(delta, dtype=np.float64)
    if np.any(dp < 0) or np.any(dp > d * (1.0 + 1e-12)) or (d.ndim == 0 and not d > 0):
        raise UserError(f"eq. II.93: need 0 <= Delta_+ <= Delta and Delta > 0 (got {delta_plus}, {delta})")
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = dp / d
    return float(ratio) if ratio.ndim == 0 else ratio
