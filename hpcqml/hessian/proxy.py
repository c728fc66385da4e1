"""Error proxy and dissipation measures from a Hessian spectrum (paper Sec. II C, III B).

Mode growth factors.  The linearised training ODE has modes ``a`` with
``a = -lambda`` (the paper: "a_nu are the negatives of the Hessian eigenvalues",
``convention="paper"``) or ``a = -eta * lambda`` for a learning rate ``eta``
(``convention="eta"``, one gradient step).  A mode grows like ``|1 + a|^t``.

Error proxy (eq. III.10-III.13).  With the density rho of the eigenvalues,

    E(t) = (1/N_c) int_{|lambda| >= c} rho(lambda) |1 + a(lambda)|^t dlambda,
    N_c  =          int_{|lambda| >= c} rho(lambda) dlambda,

i.e. modes with eigenvalue magnitude below the cutoff c (default 0.4) are removed and the
rest renormalised (eq. III.13).  The cutoff is applied to |lambda| in both conventions
(for ``paper`` this is |a|, as eq. III.12 writes).  On a grid (as the paper, 256 points)
the integrals are Riemann sums over the grid points; from Ritz nodes they are the Gauss
sums with the SLQ weights.  Evaluated in log space (``log E`` is always finite when
N_c > 0; E itself may overflow to inf for large t).

Dissipative fraction (eq. II.28).  ``Delta_+/Delta`` = mass of the modes with
``|1 + a| < 1`` among the kept modes (``dissipative_fraction``).

Time limit (eq. II.34).  With representative growth factors ``r_+`` and ``r_-`` of the
dissipative and divergent modes (mass-weighted geometric means of ``|1 + a|``; our choice
of "representative"),

    T_lim = log(Delta_-/Delta_+) / log(r_+/r_-),

meaning T << T_lim; 0 when Delta_- >= Delta_+ (no admissible T), inf when there are no
divergent modes.

Fidelity estimate (eq. II.93).  The a_+ -> 0^- limit of eq. II.92 is Delta_+/Delta over
all modes: the dissipative fraction without a cutoff
(:meth:`hpcqml.hessian.spectrum.Spectrum.overlap_ii93`).  The formulas of eq. II.92/II.93 are
:func:`hpcqml.hhl.truncated.overlap_ii92`/:func:`~hpcqml.hhl.truncated.overlap_ii93`; the
dissipative test and a_+ are :func:`hpcqml.carleman.spectra.is_dissipative` and
:func:`hpcqml.carleman.spectra.dissipative_mean`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from hpcqml.errors import UserError

CONVENTIONS = ("paper", "eta")


def modes(lam: np.ndarray, convention: str = "paper", eta: float = 0.01) -> np.ndarray:
    """``a = -lambda`` (paper) or ``a = -eta * lambda``."""
    lam = np.asarray(lam, dtype=np.float64)
    if convention == "paper":
        return -lam
    if convention == "eta":
        if not eta > 0:
            raise UserError(f"error proxy eta = {eta}: must be > 0")
        return -eta * lam
    raise UserError(f"error proxy convention = {convention!r}: not one of {', '.join(CONVENTIONS)}")


def _kept(lam: np.ndarray, mass: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    lam = np.asarray(lam, dtype=np.float64).ravel()
    mass = np.asarray(mass, dtype=np.float64).ravel()
    if lam.shape != mass.shape:
        raise UserError(f"eigenvalues ({lam.size}) and masses ({mass.size}) differ in length")
    if cutoff < 0:
        raise UserError(f"error proxy cutoff = {cutoff}: must be >= 0")
    ok = ~(np.isnan(lam) | np.isnan(mass)) & (np.abs(lam) >= cutoff) & (mass > 0)
    return lam[ok], mass[ok]


def log_error_proxy(lam: np.ndarray, mass: np.ndarray, t: np.ndarray, cutoff: float = 0.4,
                    convention: str = "paper", eta: float = 0.01) -> np.ndarray:
    """``log E(t)`` of eq. III.12/III.13 for a discrete measure (grid masses or Gauss weights).

    Returns NaN for every t when no mass is left after the cutoff.
    """
    t = np.asarray(t, dtype=np.float64)
    lam_k, m_k = _kept(lam, mass, cutoff)
    if m_k.size == 0:
        return np.full(t.shape, np.nan)
    with np.errstate(divide="ignore"):
        log_growth = np.log(np.abs(1.0 + modes(lam_k, convention, eta)))
    log_m = np.log(m_k) - np.log(m_k.sum())
    tt = np.atleast_1d(t).ravel()
    with np.errstate(invalid="ignore"):
        expo = tt[:, None] * log_growth[None, :]
    expo[tt == 0, :] = 0.0  # |1 + a|^0 = 1 even where 1 + a = 0
    return logsumexp(log_m[None, :] + expo, axis=1).reshape(t.shape)


def error_proxy(lam: np.ndarray, mass: np.ndarray, t: np.ndarray, cutoff: float = 0.4,
                convention: str = "paper", eta: float = 0.01) -> np.ndarray:
    """``E(t)`` of eq. III.12/III.13 (may be inf where it overflows float64)."""
    with np.errstate(over="ignore"):
        return np.exp(log_error_proxy(lam, mass, t, cutoff, convention, eta))


def grid_masses(grid: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Riemann masses ``rho_k * dlambda`` of a density sampled on an equally spaced grid."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.size < 2:
        raise UserError("density grid needs at least 2 points")
    return np.asarray(rho, dtype=np.float64) * (grid[1] - grid[0])


@dataclass
class Dissipation:
    """Dissipative/divergent split of the kept modes (eq. II.28, II.34, II.93)."""

    fraction: float        # Delta_+/Delta among the kept modes (eq. II.28)
    r_plus: float          # geometric-mean |1 + a| over dissipative modes (nan if none)
    r_minus: float         # geometric-mean |1 + a| over divergent modes (nan if none)
    a_plus: float          # a_+ of eq. II.92: mass-weighted mean a over dissipative modes (nan if none)
    time_limit: float      # eq. II.34


def time_limit(fraction: float, r_plus: float, r_minus: float) -> float:
    """Eq. II.34, ``T_lim = log(Delta_-/Delta_+)/log(r_+/r_-)`` with its edge cases."""
    if fraction >= 1.0 or not np.isfinite(r_minus):
        return float("inf")
    if fraction <= 0.0 or not np.isfinite(r_plus):
        return 0.0
    num = np.log((1.0 - fraction) / fraction)
    with np.errstate(divide="ignore"):  # r_plus = 0: a mode at |1 + a| = 0 gives T_lim = 0
        den = np.log(r_plus / r_minus)
    if den == 0.0:
        return float("inf") if num < 0 else 0.0
    return float(max(num / den, 0.0))


def dissipation(lam: np.ndarray, mass: np.ndarray, cutoff: float = 0.4, convention: str = "paper",
                eta: float = 0.01) -> Dissipation:
    """Dissipative fraction (|1 + a| < 1), representative factors and time limit."""
    lam_k, m_k = _kept(lam, mass, cutoff)
    if m_k.size == 0:
        return Dissipation(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    from hpcqml.modes import dissipative_mean, overlap_ii93, is_dissipative

    a = modes(lam_k, convention, eta)
    g = np.abs(1.0 + a)
    plus = is_dissipative(a)
    frac = float(overlap_ii93(float(m_k[plus].sum()), float(m_k.sum())))  # scalars in, float out

    def gmean(sel: np.ndarray) -> float:
        if not sel.any():
            return float("nan")
        with np.errstate(divide="ignore"):
            return float(np.exp(np.sum(m_k[sel] * np.log(g[sel])) / m_k[sel].sum()))

    r_plus, r_minus = gmean(plus), gmean(~plus)
    return Dissipation(fraction=frac, r_plus=r_plus, r_minus=r_minus, a_plus=dissipative_mean(a, m_k),
                       time_limit=time_limit(frac, r_plus, r_minus))
