"""A Hessian spectrum from stochastic Lanczos quadrature, with proven brackets and sampling intervals.

:func:`hpcqml.hessian.slq.slq` runs SLQ on a symmetric operator and returns a
:class:`Spectrum`: per probe the Lanczos recurrence (``alpha``, ``beta``), the Ritz nodes,
Gauss weights and residual bounds, and the Hutchinson quadratic forms.  Every derived
quantity is defined here once and comes as an :class:`Estimate`:

* ``trace()``: Hutchinson mean of ``z_l^T H z_l``.
* ``negative_mass(delta)``: the mass of the eigenvalues below ``-delta``, ``mu((-inf, -delta))``.
* ``dissipative_fraction(convention, eta, cutoff)``: Delta_+/Delta of eq. II.28 among the
  modes with ``|lambda| >= cutoff``; with ``cutoff = 0`` it is the eq. II.93 estimate.
* ``error_proxy(t, convention, eta, cutoff)``: E(t) of eq. III.10-III.13.

Modes (eq. I.3, II.65): ``a = -lambda`` (``convention = "paper"``) or ``a = -eta * lambda``
(``convention = "eta"``); a mode is dissipative when ``|1 + a| < 1``, i.e. ``0 < lambda <
2/k`` with ``k = 1`` or ``eta``.  The cutoff is stated in lambda for both.

Two uncertainties, kept apart (definitions in docs/science.md):

1. Quadrature.  Each probe's value is a functional of its spectral measure ``mu_z``; the
   Gauss rule of its Lanczos matrix gives the point value and
   :mod:`hpcqml.hessian.quadrature` a *proven* bracket of the probe-exact value
   ``z^T f(H) z/||z||^2`` (distribution-function bounds at the thresholds; for E(t) the
   quantile bound over the spectral interval ``[a, b]``, intersected with the Gauss/Gauss-
   Radau bracket where it applies).  Pooled quantities are means (or ratios of means) over
   probes, so the means of the per-probe bounds bracket the probe-exact pooled value
   (``res_low``, ``res_high``).  Ratios (E(t) with a cutoff, Delta_+/Delta) are also bounded
   jointly: ``N/D >= r`` exactly when ``int_kept (f - r) dmu_z >= 0``, bounded for every ``r``
   from the same distribution bounds (:class:`hpcqml.hessian.quadrature.RatioPieces`); the
   bracket is the intersection.  Mass fractions and distribution-function bounds need no
   spectral interval; E(t) needs one: the ``interval`` given to the spectrum (source
   ``given``), else the extreme Ritz values widened by their residual bounds (source
   ``ritz``), which holds when the extreme Ritz values have converged to the extreme
   eigenvalues of every probe's measure: the bracket of E(t) is conditional on that.
2. Sampling over probes.  A Student t interval with ``n_v - 1`` degrees of freedom around
   the value, half-width ``t_{(1+confidence)/2, n_v-1}`` times the standard error (for a
   mean ``std(ddof=1)/sqrt(n_v)``; for a ratio of means the jackknife one); not evaluated
   below 2 probes.  The standard error is that of the Gauss per-probe values.

Why an unresolved, quadrature-dominated estimate is unresolved: ``mass at threshold x`` when
moving the probe mass the bounds leave undecided at the decision point ``x`` across it
accounts for at least :data:`THRESHOLD_SHARE` of the bracket width (the estimate stores
``threshold``, ``threshold_mass``, ``threshold_share``), else ``bracket wider than tolerance``.

Combined interval: ``[min(res_low, value) - h, max(res_high, value) + h]`` with ``h`` the
sampling half-width.  ``resolved`` means its half-width is at most ``max(tol_abs, tol_rel *
|value|)``; defaults ``resolution_rel`` and ``resolution_mass`` (mass fractions) or
``resolution_abs`` (other quantities), each overridable per call.  An estimate that is
not resolved says why in ``note`` (``quadrature: ...`` or ``sampling: ...``).

Rounding: a Ritz value within the rounding margin of a threshold (see
:mod:`hpcqml.hessian.quadrature`) is taken to sit on it when the point value is formed,
so no value depends on the sign of a rounding-level difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from scipy.special import logsumexp

from hpcqml.hessian.density import Density, density_on_grid, gaussian_density, kernel_width
from hpcqml.hessian.proxy import CONVENTIONS, log_error_proxy, modes
from hpcqml.hessian.quadrature import (ProbeQuadrature, RatioPieces, jacobi_from_measure, power_derivative_sign,
                                       ratio_pieces, student_quantile)
from hpcqml.errors import NumericalError
from hpcqml.modes import overlap_ii93, is_dissipative

if TYPE_CHECKING:  # the torch-side type only; this module imports no torch
    from hpcqml.hessian.lanczos import LanczosResult

MIN_PROBES = 2
NOT_EVALUATED = f"sampling: not evaluated (fewer than {MIN_PROBES} probes)"
UNKNOWN = NOT_EVALUATED
UNRESOLVED = "unresolved"
RESOLVED = "resolved"
#: the growth an unresolved estimate asks for (see :func:`next_growth`)
GROW_STEPS, GROW_PROBES = "steps", "probes"
F64_UNIT_ROUNDOFF = 2.0 ** -53
#: an unresolved, quadrature-dominated estimate is said to be held up by the mass at a
#: threshold when moving that mass across it accounts for at least this share of the
#: quadrature bracket's width (see :meth:`Spectrum._threshold_widths`)
THRESHOLD_SHARE = 0.5


@dataclass(frozen=True)
class Estimate:
    """A number estimated from the probes, with its two uncertainties and their combination.

    Attributes:
        value: the Gauss-quadrature estimate pooled over probes.
        stderr: standard error over probes (NaN below 2 probes).
        ci_low: sampling interval (Student t, level ``confidence``) around ``value``.
        ci_high: its upper end.
        resolved: the combined interval meets the tolerance.
        ambiguous_mass: kept for readers of older files; always 0 here.
        note: why the estimate is not resolved (empty when it is).
        per_probe: the value from each probe alone.
        res_low: lower end of the proven quadrature bracket of the probe-exact pooled value
            (NaN: not evaluated).
        res_high: its upper end.
        low: lower end of the combined interval (NaN: not evaluated).
        high: its upper end.
        per_probe_low: per-probe proven lower bounds.
        per_probe_high: per-probe proven upper bounds.
        tolerance: the half-width the combined interval had to meet.
        threshold: the decision point whose undecided mass explains the largest part of the
            quadrature bracket (None: the quantity has none, or no finite bracket).
        threshold_mass: the pooled probe mass the bounds cannot place on either side of it
            (mean over probes of the Chebyshev-Markov-Stieltjes width there).
        threshold_share: the part of the quadrature bracket width that mass accounts for
            (its width ``W_x`` over ``res_high - res_low``; may exceed 1, inf when it can
            empty a denominator).
    """

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    resolved: bool = True
    ambiguous_mass: float = 0.0
    note: str = ""
    per_probe: tuple[float, ...] = ()
    res_low: float = float("nan")
    res_high: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    per_probe_low: tuple[float, ...] = ()
    per_probe_high: tuple[float, ...] = ()
    tolerance: float = float("nan")
    threshold: float | None = None
    threshold_mass: float = 0.0
    threshold_share: float = 0.0

    @property
    def status(self) -> str:
        """``resolved``, ``resolved (conditional: ...)`` or ``unresolved (reason)``."""
        if self.resolved:
            return f"{RESOLVED} ({self.note})" if self.note else RESOLVED
        return f"{UNRESOLVED} ({self.note or 'no reason recorded'})"

    @property
    def half_width(self) -> float:
        """Half-width of the combined interval (NaN when not evaluated)."""
        return 0.5 * (self.high - self.low)

    def text(self, fmt: str = "{:.4g}") -> str:
        """A report-table entry.

        Returns:
            ``value [low–high]`` (the combined interval) when resolved, followed by
            ``(conditional: ...)`` when the bracket rests on an assumed spectral interval;
            otherwise ``value, unresolved (reason)`` followed by the combined interval, or by
            the quadrature bracket when sampling was not evaluated.
        """
        v = fmt.format(self.value)
        if np.isfinite(self.low) and np.isfinite(self.high):
            span = f" [{fmt.format(self.low)}–{fmt.format(self.high)}]"
        elif np.isfinite(self.res_low) and np.isfinite(self.res_high):
            span = f" [quadrature {fmt.format(self.res_low)}–{fmt.format(self.res_high)}]"
        else:
            span = ""
        if self.resolved:
            return f"{v}{span}" + (f" ({self.note})" if self.note else "")
        return f"{v}, {self.status}{span}"


@dataclass(frozen=True)
class Modes:
    """How eigenvalues map to modes ``a = -k lambda`` and which of them are kept."""

    convention: str
    eta: float | None
    cutoff: float

    @property
    def k(self) -> float:
        """The factor in ``a = -k lambda``: 1 (paper) or eta."""
        if self.convention == "paper":
            return 1.0
        if self.eta is None:
            raise ValueError(f"convention {self.convention!r} needs a learning rate eta (got None)")
        return float(self.eta)

    def boundaries(self) -> np.ndarray:
        """Eigenvalues where a kept mode changes class: 0 and 2/k (``|1 + a| = 1``)."""
        return np.array([0.0, 2.0 / self.k], dtype=np.float64)


def _modes(convention: str, eta: float | None, cutoff: float) -> Modes:
    if convention not in CONVENTIONS:
        raise ValueError(f"error proxy convention = {convention!r}: not one of {', '.join(CONVENTIONS)}")
    if convention == "paper":
        eta = None
    elif eta is None or not eta > 0:
        raise ValueError(f"convention 'eta' needs a learning rate eta > 0 (got {eta})")
    if not cutoff >= 0:
        raise ValueError(f"error proxy cutoff = {cutoff}: must be >= 0")
    return Modes(convention, None if eta is None else float(eta), float(cutoff))


def _overlap(lo: float, hi: float) -> tuple[float, float]:
    """The intersection ``[lo, hi]`` of two proven brackets of one value.

    Two valid brackets always overlap. Where both are tight, rounding can cross them by a few
    ulps; that is collapsed to the midpoint. A wider gap means a bound does not hold here, and
    is never reported as a value.

    Raises:
        NumericalError: the brackets miss each other by more than rounding.
    """
    if lo <= hi or not (np.isfinite(lo) and np.isfinite(hi)):
        return lo, hi
    if lo - hi > 1e-9 * max(1.0, abs(lo), abs(hi)):
        raise NumericalError(f"the joint and the separate bracket of a ratio do not overlap "
                             f"(lower {lo:.9g} > upper {hi:.9g}): a quadrature bound does not hold here")
    mid = 0.5 * (lo + hi)
    return mid, mid


@dataclass(frozen=True)
class _Parts:
    """Per-probe Gauss values and proven bounds of a quantity's numerator and denominator.

    ``kind`` says how they pool: ``mean`` (mean of ``num``), ``ratio`` (mean num / mean den)
    or ``fraction`` (mean num / (mean num + mean den), eq. II.93 with ``den`` the
    non-dissipative kept mass).  ``points`` are the thresholds the quantity depends on.
    """

    kind: str
    num: np.ndarray
    num_lo: np.ndarray
    num_hi: np.ndarray
    den: np.ndarray | None = None
    den_lo: np.ndarray | None = None
    den_hi: np.ndarray | None = None
    points: tuple[float, ...] = ()
    mass: bool = False
    evaluated: bool = True
    why: str = ""
    #: what a proven bracket of this quantity assumes beyond the Lanczos runs ("" for nothing)
    assumes: str = ""
    #: the decision points: ``(x, dnum, dden)``, how the pooled ``num`` and ``den`` change per
    #: unit of probe mass moved from just below ``x`` to just above it (see
    #: :meth:`Spectrum._threshold_widths`)
    moves: tuple[tuple[float, float, float], ...] = ()
    #: for a ratio: a bracket of the pooled ratio bounded jointly (numerator and denominator
    #: from the same distribution bounds) and the per-probe ones; intersected with the
    #: bracket from the separate bounds
    joint: tuple[float, float] | None = None
    joint_per_probe: tuple[np.ndarray, np.ndarray] | None = None


def _pool(kind: str, num: np.ndarray, den: np.ndarray | None) -> np.ndarray:
    """Pool per-probe rows ``num[idx]`` (R, k) into R values for ``kind``."""
    n = num.mean(axis=-1)
    if kind == "mean":
        return n
    d = den.mean(axis=-1)  # type: ignore[union-attr]
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "ratio":
            return n / d
        return np.asarray(overlap_ii93(n, n + d)) if np.all(d >= 0) else n / (n + d)


@dataclass
class Spectrum:
    """SLQ results of one operator: per-probe recurrence, Ritz nodes, Gauss weights, residual bounds.

    Arrays are ``(n_v, m')``, NaN-padded where a probe took fewer steps (breakdown).
    ``quad_forms[l] = z_l^T H z_l``.  The pooled SLQ measure gives node ``(l, i)`` the
    mass ``weights[l, i] / n_v``.  ``alpha``/``beta`` (the Lanczos coefficients, ``beta[l,
    j]`` the norm of residual j) may be None for spectra stored without them: the Jacobi
    matrix is then rebuilt from the nodes and weights and ``beta_m`` from the residual
    bounds (``sqrt(sum_i r_i^2) = beta_m``), to rounding.

    ``interval`` (a, b) holds the spectrum of H when given; ``unit_roundoff`` is that of
    the Krylov basis (the rounding margin); ``bootstrap``/``bootstrap_seed`` are kept for
    older files and are not used (the sampling interval is Student t).  ``stop_reason``
    records what ended an adaptive run (``resolved``, ``step budget``, ``probe budget``).
    """

    n: int
    nodes: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    quad_forms: np.ndarray
    probes: np.ndarray
    steps: np.ndarray
    breakdown: np.ndarray
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    resolution_mass: float = 0.05
    resolution_rel: float = 0.1
    resolution_abs: float = 0.0
    #: False for a measure that is not one Lanczos recurrence per probe (deflated SLQ adds exact
    #: atoms): its quadrature brackets are then not evaluated and nothing is resolved
    certified: bool = True
    alpha: np.ndarray | None = None
    beta: np.ndarray | None = None
    unit_roundoff: float = F64_UNIT_ROUNDOFF
    interval: tuple[float, float] | None = None
    stop_reason: str = ""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_results(cls, results: Sequence[LanczosResult], n: int, **settings: Any) -> "Spectrum":
        """Pool per-probe Lanczos results (any order) into a spectrum.

        ``unit_roundoff`` defaults to the largest one the results recorded (float64's when
        none did: pass it for results read back from storage).
        """
        if not results:
            raise ValueError("no SLQ probes to pool")
        results = sorted(results, key=lambda r: r.probe)
        width = max(r.steps for r in results)
        recorded = [float(u) for u in (getattr(r, "unit_roundoff", None) for r in results) if u is not None]
        if recorded and "unit_roundoff" not in settings:
            settings = {**settings, "unit_roundoff": max(recorded)}
        return cls(n=int(n), nodes=pad((r.nodes for r in results), width),
                   weights=pad((r.weights for r in results), width),
                   residuals=pad((r.residuals for r in results), width),
                   quad_forms=np.array([r.quad_form for r in results], dtype=np.float64),
                   probes=np.array([r.probe for r in results], dtype=np.int64),
                   steps=np.array([r.steps for r in results], dtype=np.int64),
                   breakdown=np.array([r.breakdown for r in results], dtype=bool),
                   alpha=pad((r.alpha for r in results), width), beta=pad((r.beta for r in results), width),
                   **settings)

    @property
    def probe_count(self) -> int:
        """n_v, the number of probes."""
        return int(self.nodes.shape[0])

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All (node, weight/n_v) pairs as flat arrays: the SLQ measure (total mass 1)."""
        ok = ~np.isnan(self.nodes)
        return self.nodes[ok], (self.weights / self.probe_count)[ok]

    def moment(self, k: int) -> float:
        """k-th moment of the SLQ measure, an estimate of ``tr(H^k)/n``.

        Gauss quadrature with m nodes integrates ``lambda^k`` exactly for ``k < 2m``, so for
        such k this is the mean over probes of ``v_l^T H^k v_l`` (up to rounding): a
        Hutchinson estimate, unbiased for Rademacher probes.
        """
        x, w = self.pooled()
        return float(np.sum(w * x ** k))

    def resolved_nodes(self) -> np.ndarray:
        """Per node: True where ``|theta| > r`` (an eigenvalue of that sign lies within ``r``)."""
        with np.errstate(invalid="ignore"):
            return np.abs(self.nodes) > self.residuals

    def extremes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``((lambda_min, residual), (lambda_max, residual))`` over all probes.

        The residual bound ``r`` proves an eigenvalue of H within ``theta +- r``; that it is
        the extreme one is not proven (it holds once the extreme Ritz value has converged).
        """
        imin, imax = np.nanargmin(self.nodes), np.nanargmax(self.nodes)
        return ((float(self.nodes.flat[imin]), float(self.residuals.flat[imin])),
                (float(self.nodes.flat[imax]), float(self.residuals.flat[imax])))

    # -- per-probe quadrature ----------------------------------------------------------
    def quadrature(self, row: int) -> ProbeQuadrature:
        """The proven-bound machinery of probe row ``row`` (cached)."""
        key = ("quad", int(row))
        if key not in self._cache:
            exact = bool(self.breakdown[row])
            if self.alpha is not None and self.beta is not None:
                q = ProbeQuadrature.from_recurrence(self.alpha[row], self.beta[row], exact, self.unit_roundoff)
            else:
                ok = ~np.isnan(self.nodes[row])
                alpha, beta_off = jacobi_from_measure(self.nodes[row, ok], self.weights[row, ok])
                beta_last = float(np.sqrt(np.nansum(self.residuals[row] ** 2)))
                q = ProbeQuadrature(alpha, beta_off, beta_last, exact, self.unit_roundoff)
            self._cache[key] = q
        return self._cache[key]

    @property
    def recurrence_source(self) -> str:
        """``lanczos`` (stored coefficients) or ``rebuilt from nodes, weights and residuals``."""
        return "lanczos" if self.alpha is not None and self.beta is not None else \
            "rebuilt from nodes, weights and residuals"

    def spectral_interval(self) -> tuple[float, float, str]:
        """``(a, b, source)``: the interval assumed to hold every probe measure's support.

        ``given`` when set on the spectrum; else ``ritz``: the smallest Ritz value minus its
        residual bound and the largest plus its own, over all probes (holds when the extreme
        Ritz values have converged to the extreme eigenvalues of each probe's measure).
        """
        if self.interval is not None:
            return float(self.interval[0]), float(self.interval[1]), "given"
        (lmin, rmin), (lmax, rmax) = self.extremes()
        return lmin - rmin, lmax + rmax, "ritz"

    def _margin(self) -> np.ndarray:
        """Per probe: the rounding margin of its quadrature."""
        return np.array([self.quadrature(r).margin for r in range(self.probe_count)])

    def _snapped(self, row: int, points: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
        """Probe ``row``'s nodes and weights, nodes within the rounding margin of a threshold
        moved onto it (module docstring).
        """
        ok = ~np.isnan(self.nodes[row])
        x, w = self.nodes[row, ok].copy(), self.weights[row, ok]
        eps = self.quadrature(row).margin
        for p in points:
            x[np.abs(x - p) <= eps] = p
        return x, w

    def _cdf(self, x: float) -> tuple[np.ndarray, np.ndarray]:
        """Per probe ``(lo, hi)`` with ``lo <= mu_z((-inf, x)) <= mu_z((-inf, x]) <= hi``."""
        b = np.array([self.quadrature(r).cdf_bounds(x) for r in range(self.probe_count)])
        return b[:, 0], b[:, 1]

    def _interval_mass(self, p: float, q: float) -> tuple[np.ndarray, np.ndarray]:
        """Per probe bounds on the mass of an interval with ends ``p < q`` (either end open)."""
        b = np.array([self.quadrature(r).interval_mass_bounds(p, q) for r in range(self.probe_count)])
        return b[:, 0], b[:, 1]

    # -- estimates -----------------------------------------------------------------------
    def _estimate(self, parts: _Parts, clip: tuple[float, float] | None = None, tol_abs: float | None = None,
                  tol_rel: float | None = None) -> Estimate:
        """Value, brackets, sampling interval, combined interval and resolution of ``parts``."""
        nv = self.probe_count
        rows = np.arange(nv)
        kind = parts.kind

        def stat(idx: np.ndarray) -> np.ndarray:
            return _pool(kind, parts.num[idx], None if parts.den is None else parts.den[idx])
        value = float(stat(rows[None, :])[0])
        per_probe = tuple(float(v) for v in stat(rows[:, None]))
        lo, hi, plo, phi = self._bracket(parts)
        se, half = self._sampling(stat, kind)
        a_tol = (self.resolution_mass if parts.mass else self.resolution_abs) if tol_abs is None else float(tol_abs)
        r_tol = self.resolution_rel if tol_rel is None else float(tol_rel)
        tolerance = max(a_tol, r_tol * abs(value)) if np.isfinite(value) else float("nan")
        low = min(lo, value) - half
        high = max(hi, value) + half
        if clip is not None:
            low, high = max(low, clip[0]), min(high, clip[1])
        where, u, share = self._threshold_attribution(parts, lo, hi)
        est = Estimate(value, se, value - half, value + half, False, 0.0, "", per_probe, lo, hi, low, high,
                       plo, phi, tolerance, where, u, share)
        resolved, note = self._judge(est, parts, se)
        return replace(est, resolved=resolved, note=note)

    def _bracket(self, parts: _Parts) -> tuple[float, float, tuple[float, ...], tuple[float, ...]]:
        """Pooled and per-probe proven brackets (NaN when not evaluated)."""
        if not parts.evaluated:
            nan = float("nan")
            return nan, nan, (), ()
        kind = parts.kind
        nl, nh = parts.num_lo, parts.num_hi
        if kind == "mean":
            return float(nl.mean()), float(nh.mean()), tuple(map(float, nl)), tuple(map(float, nh))
        dl, dh = parts.den_lo, parts.den_hi
        assert dl is not None and dh is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            if kind == "ratio":
                lo_p, hi_p = nl / dh, np.where(dl > 0, nh / np.where(dl > 0, dl, 1.0), np.inf)
                lo, hi = nl.mean() / dh.mean(), (nh.mean() / dl.mean() if dl.mean() > 0 else np.inf)
            else:  # P/(P + N): increasing in P, decreasing in N
                lo_p = np.where(nl + dh > 0, nl / (nl + dh), 0.0)
                hi_p = np.where(nh + dl > 0, nh / (nh + dl), 1.0)
                a, b = nl.mean(), dh.mean()
                c, d = nh.mean(), dl.mean()
                lo = a / (a + b) if a + b > 0 else 0.0
                hi = c / (c + d) if c + d > 0 else 1.0
            if kind != "mean" and parts.joint is not None and parts.joint_per_probe is not None:
                lo, hi = max(lo, parts.joint[0]), min(hi, parts.joint[1])
                lo_p = np.maximum(lo_p, parts.joint_per_probe[0])
                hi_p = np.minimum(hi_p, parts.joint_per_probe[1])
                lo, hi = _overlap(float(lo), float(hi))
                pairs = [_overlap(float(a), float(b)) for a, b in zip(lo_p, hi_p, strict=True)]
                lo_p, hi_p = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        return float(lo), float(hi), tuple(map(float, lo_p)), tuple(map(float, hi_p))

    def _sampling(self, stat: Callable[[np.ndarray], np.ndarray], kind: str) -> tuple[float, float]:
        """Standard error over probes and the Student t half-width (NaN below 2 probes)."""
        nv = self.probe_count
        if nv < MIN_PROBES:
            return float("nan"), float("nan")
        if kind == "mean":
            per = stat(np.arange(nv)[:, None])
            se = float(np.std(per, ddof=1) / np.sqrt(nv)) if np.all(np.isfinite(per)) else float("nan")
        else:
            leave_one_out = np.array([np.delete(np.arange(nv), i) for i in range(nv)])
            se = _jackknife_se(stat(leave_one_out))
        return se, se * student_quantile(self.confidence, nv - 1)

    def _judge(self, est: Estimate, parts: _Parts, se: float) -> tuple[bool, str]:
        """Whether the combined interval meets the tolerance and, if not, why; a resolved
        quantity whose bracket rests on an assumption says so (``conditional: ...``).
        """
        if not self.certified:
            return False, "quadrature: not evaluated (the measure is not one Lanczos recurrence per probe)"
        if not parts.evaluated:
            return False, f"quadrature: not evaluated ({parts.why})"
        if not (np.isfinite(est.res_low) and np.isfinite(est.res_high)):
            return False, "quadrature: no finite proven bound (spectral interval or kept mass)"
        if not np.isfinite(se):
            return False, NOT_EVALUATED
        half = est.half_width
        if np.isfinite(half) and half <= est.tolerance:
            return True, f"conditional: {parts.assumes}" if parts.assumes else ""
        quad_half = 0.5 * (est.res_high - est.res_low)
        samp_half = 0.5 * (est.ci_high - est.ci_low)
        if quad_half >= samp_half:
            if est.threshold_share >= THRESHOLD_SHARE:
                return False, f"quadrature: mass at threshold {est.threshold:g}"
            return False, "quadrature: bracket wider than tolerance"
        return False, "sampling: interval wider than tolerance"

    def _threshold_widths(self, parts: _Parts) -> list[tuple[float, float, float]]:
        """Per decision point ``x`` of ``parts``: ``(x, u_x, W_x)``.

        ``u_x`` is the pooled undecided mass at ``x``: the mean over probes of the width
        ``hi - lo`` of the Chebyshev-Markov-Stieltjes bounds at ``x`` (the weight of the
        Gauss-Radau node prescribed at ``x``, margin included).  ``W_x`` is how far the pooled
        value moves when that mass is moved across ``x``: the pooled formula evaluated with
        the Gauss means ``num + s dnum u_x/2`` and ``den + s dden u_x/2`` for ``s = +1`` and
        ``s = -1`` (a mass quantity's bracket at a single threshold has width ``u_x`` and
        ``W_x = u_x``); inf when the shift can empty a denominator.
        """
        out = []
        num = float(parts.num.mean())
        den = None if parts.den is None else float(parts.den.mean())
        for x, dn, dd in parts.moves:
            lo, hi = self._cdf(x)
            u = float(np.mean(hi - lo))
            vals = []
            for sgn in (1.0, -1.0):
                n = max(num + sgn * dn * 0.5 * u, 0.0)
                if parts.kind == "mean":
                    vals.append(n)
                    continue
                d = max(den + sgn * dd * 0.5 * u, 0.0)  # type: ignore[operator]
                if parts.kind == "ratio":
                    vals.append(n / d if d > 0 else np.inf)
                else:
                    vals.append(n / (n + d) if n + d > 0 else np.inf)
            width = abs(vals[0] - vals[1]) if np.all(np.isfinite(vals)) else np.inf
            out.append((float(x), u, float(width)))
        return out

    def _threshold_attribution(self, parts: _Parts, lo: float, hi: float) -> tuple[float | None, float, float]:
        """``(x, u_x, W_x / (hi - lo))`` for the decision point with the largest ``W_x``
        (:meth:`_threshold_widths`); ``(None, 0, 0)`` when there is none or no finite bracket.
        """
        if not parts.moves or not parts.evaluated or not (np.isfinite(lo) and np.isfinite(hi)):
            return None, 0.0, 0.0
        x, u, w = max(self._threshold_widths(parts), key=lambda r: r[2])
        span = hi - lo
        share = w / span if span > 0 else (0.0 if w == 0 else np.inf)
        return x, u, float(share)

    # -- quantities --------------------------------------------------------------------
    def trace(self, tol_abs: float | None = None, tol_rel: float | None = None) -> Estimate:
        """Hutchinson trace ``mean_l z_l^T H z_l``; its per-probe value is exact (to rounding)."""
        q = self.quad_forms.astype(np.float64)
        slack = 16.0 * self.unit_roundoff * np.abs(q) * np.maximum(self.steps, 1)
        return self._estimate(_Parts("mean", q, q - slack, q + slack), tol_abs=tol_abs, tol_rel=tol_rel)

    def negative_mass(self, delta: float = 0.0, tol_abs: float | None = None,
                      tol_rel: float | None = None) -> Estimate:
        """The mass of the eigenvalues below ``-delta``, ``mu((-inf, -delta))``.

        Args:
            delta: the threshold (>= 0, in eigenvalue units); an eigenvalue at exactly
                ``-delta`` is not counted.
            tol_abs: absolute tolerance (default ``resolution_mass``).
            tol_rel: relative tolerance (default ``resolution_rel``).

        Returns:
            The estimate; its bracket is the Chebyshev-Markov-Stieltjes bound at ``-delta``.
        """
        if not delta >= 0:
            raise ValueError(f"negative-mass threshold delta = {delta}: must be >= 0")
        x = 0.0 - float(delta)   # 0.0, not -0.0, for delta = 0
        num = np.array([w[xs < x].sum() for xs, w in (self._snapped(r, [x]) for r in range(self.probe_count))])
        lo, hi = self._cdf(x)
        return self._estimate(_Parts("mean", num, lo, hi, points=(x,), mass=True, moves=((x, -1.0, 0.0),)),
                              clip=(0.0, 1.0),
                              tol_abs=tol_abs, tol_rel=tol_rel)

    def _dissipative_parts(self, m: Modes) -> _Parts:
        """Per probe: dissipative kept mass P and non-dissipative kept mass N with their bounds.

        P is the mass of ``[c, 2/k)`` (``(0, 2/k)`` when ``c = 0``; empty when ``c >= 2/k``);
        N is the kept mass outside it, ``1 - mu((-c, max(c, 2/k)))`` (``1 - mu((0, 2/k))``
        when ``c = 0``).
        """
        c, top = m.cutoff, 2.0 / m.k
        bottom = c if c > 0 else 0.0
        points = (-c, c, top) if c > 0 else (0.0, top)
        P, N = [], []
        for r in range(self.probe_count):
            x, w = self._snapped(r, points)
            kept = np.abs(x) >= c
            plus = kept & is_dissipative(modes(x, m.convention, m.eta or 1.0))
            P.append(w[plus].sum())
            N.append(w[kept & ~plus].sum())
        if bottom < top:
            p_lo, p_hi = self._interval_mass(bottom, top)
        else:
            p_lo = p_hi = np.zeros(self.probe_count)
        gap_lo, gap_hi = self._interval_mass(-c if c > 0 else 0.0, max(c, top))
        # mass moved upward across: -c leaves N (kept) for the dropped gap; c enters P (or N
        # when c >= 2/k); 0 (no cutoff) goes from N to P; 2/k from P to N
        if c > 0:
            moves = [(-c, 0.0, -1.0), (c, 1.0, 0.0) if c < top else (c, 0.0, 1.0)]
            if c < top:
                moves.append((top, -1.0, 1.0))
        else:
            moves = [(0.0, 1.0, -1.0), (top, -1.0, 1.0)]
        # P/(P + N) is the ratio int_kept 1_P dmu / int_kept dmu: bounded jointly as E(t) is
        a, b, _ = self.spectral_interval()
        lo_end = min(a, -c, 0.0) - 1.0
        hi_end = max(b, top, c) + 1.0

        def indicator(x: np.ndarray) -> np.ndarray:
            return ((np.abs(x) >= c) & (x > 0) & (x < top) & (x >= bottom)).astype(np.float64)

        def kept_set(x: np.ndarray) -> np.ndarray:
            return np.abs(x) >= c
        # no spectral interval is assumed: the integrand 1_P 1_kept is constant beyond the
        # outermost threshold on either side, so moving any mass that lies beyond the ends
        # below onto the ends changes neither the integrals nor the distribution bounds at
        # the grid points inside; the quantile argument then holds for every support
        breaks = np.array(sorted({-c, c, 0.0, top} if c > 0 else {0.0, top}))
        pieces = [ratio_pieces(*self.quadrature(r).quantile_grid(lo_end, hi_end, breaks), indicator, kept_set)
                  for r in range(self.probe_count)]
        per = np.array([pc.bracket() for pc in pieces])
        joint = RatioPieces.concat(pieces).bracket()
        return _Parts("fraction", np.array(P), p_lo, p_hi, np.array(N), 1.0 - gap_hi, 1.0 - gap_lo,
                      points=points, mass=True, moves=tuple(moves), joint=joint,
                      joint_per_probe=(per[:, 0], per[:, 1]))

    def dissipative_fraction(self, convention: str = "eta", eta: float | None = None, cutoff: float = 0.4,
                             source: str = "nodes", width_factor: float = 0.01, points: int = 256,
                             tol_abs: float | None = None, tol_rel: float | None = None) -> Estimate:
        """Delta_+/Delta (eq. II.28): mass with ``|1 + a| < 1`` among modes with ``|lambda| >= cutoff``.

        Args:
            convention: ``eta`` (a = -eta lambda, eq. II.65) or ``paper`` (a = -lambda).
            eta: the learning rate (required for ``eta``).
            cutoff: eigenvalue magnitude removed first (0 keeps every mode: eq. II.93).
            source: ``nodes`` (the Gauss quadrature) or ``grid`` (the smoothed density, a
                different quantity: its bracket is not evaluated, so it is never resolved).
            width_factor: kernel width factor for ``grid``.
            points: grid size for ``grid``.
            tol_abs: absolute tolerance (default ``resolution_mass``).
            tol_rel: relative tolerance (default ``resolution_rel``).

        Returns:
            The estimate; the bracket is ``[P_lo/(P_lo + N_hi), P_hi/(P_hi + N_lo)]`` from the
            bounds on the dissipative (P) and the other kept (N) mass.
        """
        m = _modes(convention, eta, cutoff)
        if source not in ("nodes", "grid"):
            raise ValueError(f"source = {source!r}: not 'nodes' or 'grid'")
        parts = self._dissipative_parts(m)
        if source == "grid":
            grid, masses = self.grid_masses(width_factor, points)
            keep = np.abs(grid) >= m.cutoff
            plus = keep & is_dissipative(modes(grid, m.convention, m.eta or 1.0))
            P, N = masses[:, plus].sum(axis=1), masses[:, keep & ~plus].sum(axis=1)
            parts = _Parts("fraction", P, P, P, N, N, N, parts.points, True, False,
                           "the smoothed density has no proven bound")
        return self._estimate(parts, clip=(0.0, 1.0), tol_abs=tol_abs, tol_rel=tol_rel)

    def overlap_ii93(self, convention: str = "eta", eta: float | None = None, tol_abs: float | None = None,
                      tol_rel: float | None = None) -> Estimate:
        """Eq. II.93 estimate of the truncated-HHL fidelity: Delta_+/Delta over all modes."""
        return self.dissipative_fraction(convention, eta, cutoff=0.0, tol_abs=tol_abs, tol_rel=tol_rel)

    def _proxy_parts(self, t: float, m: Modes) -> _Parts:
        """Per probe: ``N = int_{|lambda| >= c} |1 - k lambda|^t dmu_z`` and the kept mass ``D``.

        Bounds on N: the quantile bound of ``|1 - k lambda|^t 1_{|lambda| >= c}`` over the
        spectral interval, intersected (where the derivative signs allow) with the Gauss/
        Gauss-Radau bracket of the whole integral minus the quantile bound of the part with
        ``|lambda| < c``.  D: ``1 - mu_z((-c, c))``.
        """
        k, c = m.k, m.cutoff
        a, b, _ = self.spectral_interval()
        points = (-c, c, 1.0 / k) if c > 0 else (1.0 / k,)

        def f(x: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):
                return np.abs(1.0 - k * x) ** t if t != 0 else np.ones_like(x)

        def kept(x: np.ndarray) -> np.ndarray:
            return np.abs(x) >= c

        def dropped(x: np.ndarray) -> np.ndarray:
            return np.abs(x) < c

        def signs(j: int, lo: float, hi: float) -> int | None:
            return 0 if t == 0 else power_derivative_sign(t, k, j, lo, hi)
        breaks = np.array([p for p in (-c, c, 1.0 / k) if a < p < b])
        num, nlo, nhi, den, dlo, dhi = (np.zeros(self.probe_count) for _ in range(6))
        pieces = []
        for r in range(self.probe_count):
            x, w = self._snapped(r, points)
            keep = kept(x)
            num[r], den[r] = float(np.sum(w[keep] * f(x[keep]))), float(w[keep].sum())
            q = self.quadrature(r)
            if c == 0 and float(t).is_integer() and int(t) % 2 == 0 and t < 2 * q.steps:
                # (1 - k lambda)^t, a polynomial of degree below 2m: Gauss is exact on any
                # spectral interval (the slack is the rounding allowance only)
                g = q.gauss(f)
                slack = _rounding_slack(q, f, t, k, a, b)
                nlo[r], nhi[r] = max(g - slack, 0.0), g + slack
                dlo[r] = dhi[r] = 1.0
                continue
            lo, hi = q.quantile_bracket(f, kept, a, b, breaks)
            g_lo, g_hi = q.smooth_bracket(f, signs, a, b)
            if np.isfinite(g_lo) or np.isfinite(g_hi):
                slack = _rounding_slack(q, f, t, k, a, b)
                if c > 0:
                    d_lo, d_hi = q.quantile_bracket(f, dropped, a, b, breaks)
                else:
                    d_lo = d_hi = 0.0
                lo, hi = max(lo, g_lo - slack - d_hi), min(hi, g_hi + slack - d_lo)
            nlo[r], nhi[r] = max(lo, 0.0), max(hi, lo, 0.0)
            if c > 0:
                gl, gh = q.interval_mass_bounds(-c, c)
                dlo[r], dhi[r] = 1.0 - gh, 1.0 - gl
                pieces.append(ratio_pieces(*q.quantile_grid(a, b, breaks), f, kept))
            else:
                dlo[r] = dhi[r] = 1.0
        joint = joint_pp = None
        if c > 0:
            # N/D >= r exactly when int_kept (f - r) dmu >= 0: one quantile bound for both
            per = np.array([p.bracket() for p in pieces])
            joint, joint_pp = RatioPieces.concat(pieces).bracket(), (per[:, 0], per[:, 1])
        source = self.spectral_interval()[2]
        # no cutoff, t an even integer below 2m on every probe: the integrand is a polynomial
        # Gauss integrates exactly, whatever the spectral interval
        polynomial = c == 0 and float(t).is_integer() and int(t) % 2 == 0 and t < 2 * int(np.min(self.steps))
        assumes = "" if source == "given" or polynomial else \
            f"spectrum within [{a:.4g}, {b:.4g}] (extreme Ritz values +- residuals)"
        # mass moved upward across -c leaves the kept set, across c enters it
        moves = ((-c, -float(f(np.array([-c]))[0]), -1.0), (c, float(f(np.array([c]))[0]), 1.0)) if c > 0 else ()
        return _Parts("ratio", num, nlo, nhi, den, dlo, dhi, points=points, assumes=assumes, moves=moves,
                      joint=joint, joint_per_probe=joint_pp)

    def error_proxy(self, t: float, convention: str = "eta", eta: float | None = None, cutoff: float = 0.4,
                    tol_abs: float | None = None, tol_rel: float | None = None) -> Estimate:
        """Error proxy E(t) of eq. III.12/III.13 from the Gauss quadrature, at one ``t``.

        Args:
            t: iteration count (>= 0).
            convention: ``eta`` or ``paper`` (see :meth:`dissipative_fraction`).
            eta: the learning rate (required for ``eta``).
            cutoff: eigenvalue magnitude removed first (eq. III.12).
            tol_abs: absolute tolerance (default ``resolution_abs``).
            tol_rel: relative tolerance (default ``resolution_rel``).

        Returns:
            The estimate of ``E(t) = mean_l N_l / mean_l D_l`` (may be inf where it overflows
            float64; :meth:`log_error_proxy` gives the logarithm); the bracket is
            ``[mean N_lo / mean D_hi, mean N_hi / mean D_lo]``, conditional on the spectral
            interval (:meth:`spectral_interval`).
        """
        if not t >= 0:
            raise ValueError(f"error proxy t = {t}: must be >= 0")
        m = _modes(convention, eta, cutoff)
        return self._estimate(self._proxy_parts(float(t), m), clip=(0.0, np.inf), tol_abs=tol_abs, tol_rel=tol_rel)

    def _log_proxy_parts(self, t: np.ndarray, m: Modes) -> tuple[np.ndarray, np.ndarray]:
        """Per probe: ``log sum_kept w |1+a|^t`` (n_v, len(t)) and the kept mass (n_v,)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        lognum = np.full((self.probe_count, t.size), -np.inf)
        den = np.zeros(self.probe_count)
        points = (-m.cutoff, m.cutoff) if m.cutoff > 0 else ()
        for row in range(self.probe_count):
            x, w = self._snapped(row, points)
            den[row] = w[np.abs(x) >= m.cutoff].sum()
            if den[row] > 0:
                lognum[row] = log_error_proxy(x, w, t, m.cutoff, m.convention, m.eta or 1.0) + np.log(den[row])
        return lognum, den

    def _log_proxy_stat(self, lognum: np.ndarray, den: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        def stat(idx: np.ndarray) -> np.ndarray:
            k = idx.shape[1]
            with np.errstate(divide="ignore", invalid="ignore"):
                return (logsumexp(lognum[idx], axis=1) - np.log(k)) - np.log(den[idx].mean(axis=1))
        return stat

    def log_error_proxy(self, t: np.ndarray, convention: str = "eta", eta: float | None = None,
                        cutoff: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
        """``log E(t)`` from the nodes over an array of ``t`` and its jackknife standard error.

        Returns:
            ``(log_E, stderr_of_log_E)``, each of ``t``'s length; the standard error is NaN
            below 2 probes.  (Curves only: the proven brackets are per ``t`` in
            :meth:`error_proxy`.)
        """
        m = _modes(convention, eta, cutoff)
        lognum, den = self._log_proxy_parts(t, m)
        stat = self._log_proxy_stat(lognum, den)
        value = stat(np.arange(self.probe_count)[None, :])[0]
        nv = self.probe_count
        if nv < MIN_PROBES:
            return value, np.full(value.shape, np.nan)
        jack = np.stack([stat(np.delete(np.arange(nv), i)[None, :])[0] for i in range(nv)])
        with np.errstate(invalid="ignore"):
            se = np.sqrt((nv - 1) / nv * np.sum((jack - jack.mean(axis=0)) ** 2, axis=0))
        return value, se

    def log_error_proxy_grid(self, t: np.ndarray, convention: str = "eta", eta: float | None = None,
                             cutoff: float = 0.4, width_factor: float = 0.01, points: int = 256) -> np.ndarray:
        """``log E(t)`` from the smoothed density (Riemann sums over the grid, as the paper)."""
        m = _modes(convention, eta, cutoff)
        grid, masses = self.grid_masses(width_factor, points)
        return log_error_proxy(grid, masses.mean(axis=0), np.asarray(t, dtype=np.float64),
                               m.cutoff, m.convention, m.eta or 1.0)

    # -- densities ---------------------------------------------------------------------
    def density(self, points: int = 256, width_factor: float = 0.01, min_width: float = 1e-6) -> Density:
        """Gaussian-kernel density of the pooled measure (width rule in :mod:`density`)."""
        x, w = self.pooled()
        return gaussian_density(x, w, points, width_factor, min_width)

    def grid_masses(self, width_factor: float = 0.01, points: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """The density grid and each probe's Riemann masses on it, ``(points,)`` and ``(n_v, points)``.

        The grid and kernel width are those of :meth:`density` with the same arguments;
        the mean over probes of the masses is the pooled density's masses.
        """
        key = ("grid", float(width_factor), int(points))
        if key not in self._cache:
            dens = self.density(points, width_factor)
            step = dens.grid[1] - dens.grid[0]
            masses = np.stack([density_on_grid(self.nodes[row], self.weights[row], dens.grid, dens.sigma) * step
                               for row in range(self.probe_count)])
            self._cache[key] = (dens.grid, masses)
        return self._cache[key]

    def kernel_width(self, width_factor: float = 0.01, min_width: float = 1e-6) -> float:
        """The kernel sigma that :meth:`density` uses."""
        return kernel_width(float(np.nanmin(self.nodes)), float(np.nanmax(self.nodes)), width_factor, min_width)

    # -- storage -----------------------------------------------------------------------
    def to_hdf5(self, group: Any, units: str = "1") -> None:
        """Write the per-probe data into an HDF5 group (every dataset with units and a description).

        Args:
            group: an open, writable HDF5 group.
            units: the unit of the eigenvalues (e.g. ``nat`` for a Hessian of a loss in nats).
        """
        from hpcqml.store import write_dataset

        f8 = np.float64
        write_dataset(group, "nodes", self.nodes.astype(f8), units,
                      "Ritz values theta per probe (rows), NaN-padded")
        write_dataset(group, "weights", self.weights.astype(f8), "1",
                      "Gauss weights S_1i^2 per probe, rows sum to 1; the SLQ measure is weights/n_v")
        write_dataset(group, "residuals", self.residuals.astype(f8), units,
                      "Ritz residual bounds |beta_k S_ki|: an eigenvalue lies in theta +- residual")
        write_dataset(group, "resolved", self.resolved_nodes().astype(np.int8), "1",
                      "1 where |theta| > residual (the node's sign is resolved), per node")
        write_dataset(group, "quad_forms", self.quad_forms.astype(f8), units,
                      "Hutchinson samples z^T H z per probe (trace estimates)")
        write_dataset(group, "probes", self.probes.astype(np.int64), "count", "probe number of each row")
        write_dataset(group, "probe_steps", self.steps.astype(np.int64), "count", "Lanczos steps k taken per probe")
        write_dataset(group, "breakdown", self.breakdown.astype(np.int8), "1",
                      "1 where the probe's Lanczos run found an invariant subspace (breakdown)")
        if self.alpha is not None and self.beta is not None:
            write_dataset(group, "lanczos_alpha", self.alpha.astype(f8), units,
                          "Lanczos diagonal alpha_j per probe (rows), NaN-padded: the Jacobi matrix T_m")
            write_dataset(group, "lanczos_beta", self.beta.astype(f8), units,
                          "Lanczos beta_j per probe: off-diagonals of T_m, the last the final residual norm")
        a, b, source = self.spectral_interval()
        group.attrs.update({"n": int(self.n), "bootstrap_resamples": int(self.bootstrap),
                            "bootstrap_seed": int(self.bootstrap_seed), "confidence": float(self.confidence),
                            "resolution_mass": float(self.resolution_mass),
                            "resolution_rel": float(self.resolution_rel),
                            "resolution_abs": float(self.resolution_abs),
                            "unit_roundoff": float(self.unit_roundoff),
                            "spectral_interval": np.array([a, b], dtype=np.float64),
                            "spectral_interval_source": source,
                            "recurrence_source": self.recurrence_source,
                            "stop_reason": self.stop_reason})

    @classmethod
    def from_hdf5(cls, group: Any) -> "Spectrum":
        """Read a spectrum written by :meth:`to_hdf5`.

        A group written before the Lanczos coefficients were stored (no ``lanczos_alpha``)
        is read with the Jacobi matrix rebuilt from its nodes, weights and residual bounds
        (:attr:`recurrence_source` says so).
        """
        a = group.attrs
        interval = None
        if str(a.get("spectral_interval_source", "")) == "given":
            lo, hi = (float(v) for v in a["spectral_interval"])
            interval = (lo, hi)
        stored = "lanczos_alpha" in group and "lanczos_beta" in group
        return cls(n=int(a["n"]), nodes=group["nodes"][()], weights=group["weights"][()],
                   residuals=group["residuals"][()], quad_forms=group["quad_forms"][()],
                   probes=group["probes"][()].astype(np.int64), steps=group["probe_steps"][()].astype(np.int64),
                   breakdown=group["breakdown"][()].astype(bool),
                   bootstrap=int(a.get("bootstrap_resamples", 1000)), bootstrap_seed=int(a.get("bootstrap_seed", 0)),
                   confidence=float(a.get("confidence", 0.95)), resolution_mass=float(a.get("resolution_mass", 0.05)),
                   resolution_rel=float(a.get("resolution_rel", 0.1)),
                   resolution_abs=float(a.get("resolution_abs", 0.0)),
                   alpha=group["lanczos_alpha"][()] if stored else None,
                   beta=group["lanczos_beta"][()] if stored else None,
                   unit_roundoff=float(a.get("unit_roundoff", F64_UNIT_ROUNDOFF)), interval=interval,
                   stop_reason=str(a.get("stop_reason", "")))


def _rounding_slack(q: ProbeQuadrature, f: Callable[[np.ndarray], np.ndarray], t: float, k: float,
                    a: float, b: float) -> float:
    """Rounding allowance of a Gauss/Radau value of ``|1 - k lambda|^t``: the node margin times a
    Lipschitz bound on ``[a, b]`` plus ``16 m u`` times the size of the sum.
    """
    if t == 0:
        return 16.0 * q.steps * q.unit_roundoff
    ends = np.abs(1.0 - k * np.array([a, b]))
    lip = t * k * float(np.max(ends)) ** (t - 1.0) if t >= 1 else np.inf
    size = float(np.sum(q.weights * np.abs(f(q.nodes))))
    return q.margin * lip + 16.0 * q.steps * q.unit_roundoff * max(size, float(np.max(f(np.array([a, b])))))


def next_growth(estimates: Sequence[Estimate]) -> str | None:
    """What to grow so that the unresolved estimates can become resolved.

    The estimate furthest from its tolerance (combined half-width over tolerance) decides:
    a quadrature-dominated one asks for more Lanczos steps (:data:`GROW_STEPS`), a sampling-
    dominated one (or one without a sampling interval yet) for more probes
    (:data:`GROW_PROBES`).

    Returns:
        ``"steps"``, ``"probes"`` or None when every estimate is resolved.
    """
    worst, need = -1.0, None
    for est in estimates:
        if est.resolved:
            continue
        if est.note.startswith("sampling"):
            want = GROW_PROBES
        elif est.note.startswith("quadrature: not evaluated"):
            continue  # no amount of growth gives it a bracket
        else:
            want = GROW_STEPS
        ratio = est.half_width / est.tolerance if est.tolerance > 0 else np.inf
        ratio = np.inf if not np.isfinite(ratio) else ratio
        if need is None or ratio > worst:
            worst, need = ratio, want
    return need


def _jackknife_se(jack: np.ndarray) -> float:
    """Jackknife standard error from the leave-one-out values (scaled, so values near the
    float64 limit do not overflow when squared; NaN when any value is not finite).
    """
    if not np.all(np.isfinite(jack)):
        return float("nan")
    scale = float(np.max(np.abs(jack)))
    if scale == 0.0:
        return 0.0
    x = jack / scale
    return float(scale * np.sqrt((x.size - 1) / x.size * np.sum((x - x.mean()) ** 2)))


def pad(rows: Iterable[np.ndarray], width: int) -> np.ndarray:
    """Stack 1-D arrays into (len, width) float64 padded with NaN."""
    rows = list(rows)
    out = np.full((len(rows), width), np.nan, dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, :r.size] = r
    return out
