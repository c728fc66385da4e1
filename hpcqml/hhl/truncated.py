"""Truncated HHL (paper eq. II.86-II.93, Theorem II.4).

Write ``|b> = sum_j beta_j |u_j>`` in the eigenbasis of the (unit-norm) Hermitian matrix
(eq. II.84). Truncated HHL inverts only the well-conditioned eigenvalues
``|lambda_j| >= 1/kappa_a`` and passes the others through with a flag qubit (eq. II.86)::

    |x~>  ~  sum_{well} lambda_j^{-1} beta_j |u_j> |well>  +  sum_{ill} beta_j |u_j> |ill>.

Its overlap with the full solution ``|x> ~ sum_j lambda_j^{-1} beta_j |u_j>`` (eq. II.85),
taken as ``<x| <well| |x~>``, is eq. II.87::

    <x|x~> = S_well / ( S_all^{1/2} (S_well + P_ill)^{1/2} ),
    S_well = sum_{well} |beta_j / lambda_j|^2,  S_all = sum_j |beta_j / lambda_j|^2,
    P_ill = sum_{ill} |beta_j|^2.

For Haar-random ``|b>`` each ``|beta_j|^2`` averages to ``1/D`` (eq. II.89-II.91), which
gives the annealed estimate :func:`haar_average_fidelity`; for a spectrum with ``Delta_+``
dissipative modes of one eigenvalue ``a_+`` it reduces to eq. II.92 and, as
``a_+ -> 0^-``, to ``Delta_+ / Delta`` (eq. II.93).
"""
from __future__ import annotations

import numpy as np

from hpcqml.errors import UserError
from hpcqml.hhl.statevector import HermitianSystem, HHLResult
from hpcqml.modes import dissipative_counts, dissipative_mean, fidelity_ii92, fidelity_ii93  # noqa: F401  (re-exported)


def _check_kappa(kappa_a: float) -> float:
    kappa_a = float(kappa_a)
    if not kappa_a > 0 or not np.isfinite(kappa_a):
        raise UserError(f"truncated HHL: kappa_a must be a finite number > 0, got {kappa_a!r}")
    return kappa_a


def eigen_coefficients(system: HermitianSystem) -> tuple[np.ndarray, np.ndarray]:
    """``(lambda_j, beta_j)`` of eq. II.84 for the normalised ``|b>`` (float64 arrays, length D)."""
    b = system.b / np.linalg.norm(system.b)
    return system.eigenvalues.copy(), system.eigenvectors.T @ b


def closed_form_fidelity(eigenvalues: np.ndarray, beta: np.ndarray, kappa_a: float) -> float:
    """Eq. II.87: ``<x|x~>`` from the eigenvalues ``lambda_j`` and coefficients ``beta_j`` (float)."""
    kappa_a = _check_kappa(kappa_a)
    lam = np.asarray(eigenvalues, dtype=np.float64)
    w2 = np.abs(np.asarray(beta)) ** 2
    if lam.shape != w2.shape:
        raise UserError(f"truncated HHL: {lam.shape[0]} eigenvalues but {w2.shape[0]} coefficients")
    if np.any(lam[w2 > 0] == 0.0):
        raise UserError("truncated HHL: |b> has weight on a zero eigenvalue, the full solution is undefined")
    well = np.abs(lam) >= 1.0 / kappa_a
    with np.errstate(divide="ignore", invalid="ignore"):
        inv2 = np.where(w2 > 0, w2 / lam**2, 0.0)
    s_well = float(np.sum(inv2[well]))
    s_all = float(np.sum(inv2))
    p_ill = float(np.sum(w2[~well]))
    if s_well == 0.0:
        return 0.0
    return s_well / (np.sqrt(s_all) * np.sqrt(s_well + p_ill))


def measured_overlap(result: HHLResult, x_full: np.ndarray) -> float:
    """``|<x| <well| |x~_sim>|`` for a simulated truncated run and the full solution ``x_full``.

    ``x_full`` lives in the embedded space (see :meth:`HermitianSystem.embed_solution`); it is
    normalised here. This is the quantity eq. II.87 predicts.
    """
    if result.state_well is None:
        raise UserError("truncated HHL: the result has no flag branches (run with kappa_a)")
    x = np.asarray(x_full, dtype=np.complex128)
    return float(abs(np.vdot(x, result.state_well)) / np.linalg.norm(x))


def haar_average_fidelity(eigenvalues: np.ndarray, kappa_a: float) -> float:
    """Annealed Haar average of eq. II.87 using eq. II.89-II.91 (``|beta_j|^2 -> 1/D``).

    ``Tr(Lbar^-2) / ( Tr(L^-2)^{1/2} (Tr(Lbar^-2) + #ill)^{1/2} )`` over the given spectrum
    (the ``1/D`` factors cancel).
    """
    kappa_a = _check_kappa(kappa_a)
    lam = np.asarray(eigenvalues)
    if lam.size == 0 or np.any(lam == 0):
        raise UserError("truncated HHL: Haar estimate needs a non-empty spectrum without zero eigenvalues")
    a = np.abs(lam)
    well = a >= 1.0 / kappa_a
    tr_bar = float(np.sum(1.0 / a[well] ** 2))
    tr_all = float(np.sum(1.0 / a**2))
    n_ill = float(np.count_nonzero(~well))
    if tr_bar == 0.0:
        return 0.0
    return tr_bar / (np.sqrt(tr_all) * np.sqrt(tr_bar + n_ill))


def dissipative_split(qcm_eigenvalues: np.ndarray) -> tuple[int, int, float]:
    """``(Delta_+, Delta, a_+)`` from the eigenvalues ``a_mu`` of the Carleman matrix A.

    The count is :func:`hpcqml.modes.dissipative_counts` (``|1 + a_mu| < 1``,
    eq. II.28) and ``a_+`` is :func:`hpcqml.modes.dissipative_mean` (the mean
    real part of the dissipative eigenvalues; ``nan`` when there are none).
    """
    a = np.asarray(qcm_eigenvalues)
    if a.size == 0:
        raise UserError("truncated HHL: empty Carleman spectrum")
    d_plus, _ = dissipative_counts(a)
    return d_plus, int(a.size), dissipative_mean(a)
