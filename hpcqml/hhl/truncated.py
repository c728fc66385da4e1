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
gives the annealed estimate :func:`haar_average_overlap` over the actual spectrum of the
embedded system.  The paper's eq. II.92 (and its limit ``a_+ -> 0^-``, eq. II.93: ``Delta_+ / Delta``)
is a different quantity: it is built from the Carleman mode counts, not from the spectrum of M,
and it does not follow from eq. II.89-II.91.  With ``Delta_- = 0`` it reduces to ``sqrt(G/(T+1)) < 1``
although nothing is truncated whenever kappa(M) <= kappa_a = 2(T+1), where eq. II.87 is exactly 1;
the two agree only as ``a_+ -> 0`` with ``Delta_- = 0``.  :func:`ii92_against_ii87` evaluates both on
the same M (docs/science.md, "Eq. II.92 against eq. II.87").  All overlaps here are unsquared,
<x|x~> as in the paper.
"""
from __future__ import annotations

import numpy as np

from hpcqml.errors import UserError
from hpcqml.hhl.statevector import HermitianSystem, HHLResult
from hpcqml.modes import dissipative_counts, dissipative_mean, overlap_ii92, overlap_ii93


def _check_kappa(kappa_a: float) -> float:
    kappa_a = float(kappa_a)
    if not kappa_a > 0 or not np.isfinite(kappa_a):
        raise UserError(f"truncated HHL: kappa_a must be a finite number > 0, got {kappa_a!r}")
    return kappa_a


def eigen_coefficients(system: HermitianSystem) -> tuple[np.ndarray, np.ndarray]:
    """``(lambda_j, beta_j)`` of eq. II.84 for the normalised ``|b>`` (float64 arrays, length D)."""
    b = system.b / np.linalg.norm(system.b)
    return system.eigenvalues.copy(), system.eigenvectors.T @ b


def closed_form_overlap(eigenvalues: np.ndarray, beta: np.ndarray, kappa_a: float) -> float:
    """Eq. II.87: the unsquared overlap ``<x|x~>`` from the eigenvalues ``lambda_j`` and
    coefficients ``beta_j`` (float; the fidelity is its square).
    """
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


def haar_average_overlap(eigenvalues: np.ndarray, kappa_a: float) -> float:
    """Annealed Haar average of the eq. II.87 overlap using eq. II.89-II.91 (``|beta_j|^2 -> 1/D``),
    unsquared like eq. II.87.

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


#: older names of :func:`closed_form_overlap` and :func:`haar_average_overlap`, kept for
#: callers outside the package; both return the unsquared overlap, not a fidelity
closed_form_fidelity = closed_form_overlap
haar_average_fidelity = haar_average_overlap


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


def ii92_against_ii87(M: np.ndarray, B: np.ndarray, carleman_eigenvalues: np.ndarray, T: int,
                      kappa_a: float | None = None) -> dict[str, float]:
    """Eq. II.92 (and II.93) beside the exact eq. II.87 overlap and its Haar estimate on the same M.

    Eq. II.92 is the paper's estimate of the truncated-HHL overlap from the Carleman mode counts
    (Delta_+, Delta, a_+) with kappa_a = 2(T+1); eq. II.87 is the overlap itself for the actual
    Hermitian embedding of M x = B (:func:`hpcqml.hhl.statevector.embed`, unit norm), and
    :func:`haar_average_overlap` its annealed average over |b> (eq. II.89-II.91).  The two do not
    describe the same thing: with Delta_- = 0 eq. II.92 reduces to sqrt(G / (T+1)) < 1,
    G = sum_t (1 + a_+)^t, although nothing is truncated whenever kappa(M) <= kappa_a (then eq. II.87
    is exactly 1).  They agree in the limit a_+ -> 0 with Delta_- = 0.

    Args:
        M: the block matrix of eq. II.79 (dense or scipy.sparse), (T+1) Delta square.
        B: its right-hand side.
        carleman_eigenvalues: eigenvalues a of the Carleman matrix A of the same case.
        T: number of time steps.
        kappa_a: truncation parameter (default 2(T+1), the paper's choice).

    Returns:
        ``overlap_ii87``, ``overlap_haar``, ``overlap_ii92``, ``overlap_ii93`` (all unsquared overlaps
        <x|x~>), ``Delta_plus``, ``Delta``, ``a_plus``, ``kappa_a``, ``ill_fraction`` (fraction of the
        embedded spectrum with |lambda| < 1/kappa_a).
    """
    from hpcqml.hhl.statevector import embed

    kappa = float(2 * (T + 1)) if kappa_a is None else _check_kappa(kappa_a)
    system = embed(M, B)
    lam, beta = eigen_coefficients(system)
    d_plus, d_all, a_plus = dissipative_split(carleman_eigenvalues)
    spec = np.asarray(system.spectrum)
    return {
        "overlap_ii87": closed_form_overlap(lam, beta, kappa),
        "overlap_haar": haar_average_overlap(spec, kappa),
        "overlap_ii92": overlap_ii92(d_plus, d_all, a_plus, T) if d_plus else 0.0,
        "overlap_ii93": float(overlap_ii93(d_plus, d_all)),
        "Delta_plus": float(d_plus), "Delta": float(d_all), "a_plus": a_plus, "kappa_a": kappa,
        "ill_fraction": float(np.mean(np.abs(spec) < 1.0 / kappa)),
    }
