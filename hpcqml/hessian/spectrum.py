"""A Hessian spectrum from stochastic Lanczos quadrature, with its uncertainties.

:func:`slq` runs SLQ on any symmetric operator (an object with ``n`` or ``shape = (n, n)``
and ``matvec``) and returns a :class:`Spectrum`: the Ritz nodes, Gauss weights and residual
bounds of every probe, and the Hutchinson quadratic forms.  Every derived quantity is
defined here once and comes as an :class:`Estimate` (value, standard error, bootstrap
interval, resolved flag):

* ``trace()``: Hutchinson mean of ``z_l^T H z_l``.
* ``negative_mass(delta)``: SLQ mass of the nodes below ``-max(delta, r_i)`` (``r_i`` the
  node's residual bound, so only nodes whose eigenvalue interval lies below zero count).
* ``dissipative_fraction(convention, eta, cutoff)``: Delta_+/Delta of eq. II.28 among the
  modes with ``|lambda| >= cutoff``; with ``cutoff = 0`` it is the eq. II.93 estimate.
* ``error_proxy(t, convention, eta, cutoff)``: eq. III.10-III.13.

Modes (eq. I.3, II.65): ``a = -lambda`` (``convention = "paper"``) or ``a = -eta * lambda``
(``convention = "eta"``: one gradient step of size eta, spec F_1 = -eta spec H).  The
cutoff is stated in lambda for both.

Uncertainty over probes.  Each quantity is a function of probe means (a mean, or a ratio of
two means: the pooled SLQ measure is the mean of the per-probe measures).  Its standard
error is the jackknife one over probes (for a mean it equals ``std(ddof=1)/sqrt(n_v)``);
the interval is the percentile bootstrap over probes (``bootstrap`` resamples drawn from
``bootstrap_seed``, level ``confidence``).  With fewer than 3 probes both are NaN and the
estimate says ``unknown (fewer than 3 probes)``.

Resolution.  A node's eigenvalue is only known to lie in ``[theta - r, theta + r]``.  A
node is ambiguous for a quantity when that interval contains a point where the node's
class changes: ``[-delta, 0]`` for the negative mass; for the modes kept by the cutoff,
``0`` and ``2/k`` (``|1 + a| = 1`` with ``a = -k lambda``) for the dissipative split and the
error proxy (the cutoff itself is applied to the Ritz values, as eq. III.12 applies it to
the density, so the kept set and every denominator stay fixed).  Every node-based estimate
carries a resolution bracket ``[res_low, res_high]``: the smallest and largest value the
quantity takes when each ambiguous node's eigenvalue moves anywhere in its interval (all
other nodes fixed; per-probe values recomputed and pooled as the value).  For mass
fractions a node adds its weight to the numerator or not, so the bracket puts every
ambiguous node on the uncounted side, then on the counted side where its interval allows
it; for the proxy every kept node moves (its residual is amplified by the power t on
either side of a decision point) and its term ``w |1 - k lambda|^t`` is extreme at the
interval's ends or, when ``1/k`` lies inside, zero there.  The estimate is resolved when the bracket is
narrow: ``res_high - res_low <= max(resolution_rel * |value|, absolute)`` with
``resolution_rel`` (default 0.1) and ``absolute = resolution_mass`` (default 0.05) for
the mass fractions, 0 for the proxy.  Otherwise the ambiguous nodes decide the quantity
and it is marked unresolved.  ``ambiguous_mass`` (the heaviest ambiguous node of each
probe, pooled, as a share of the normalising mass) is kept for information.  The trace is
always resolved.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from scipy.special import logsumexp

from hpcqml.hessian.density import Density, density_on_grid, gaussian_density, kernel_width
from hpcqml.hessian.proxy import CONVENTIONS, dissipation, log_error_proxy, modes
from hpcqml.modes import fidelity_ii93, is_dissipative

if TYPE_CHECKING:  # the torch-side type only; this module imports no torch
    from hpcqml.hessian.lanczos import LanczosResult

UNKNOWN = "unknown (fewer than 3 probes)"
UNRESOLVED = "unresolved"
MIN_PROBES = 3


@dataclass(frozen=True)
class Estimate:
    """A number estimated from the probes, with its uncertainty and resolution.

    ``stderr`` (jackknife over probes), ``ci_low``/``ci_high`` (percentile bootstrap
    interval) are NaN when fewer than 3 probes exist (``note`` then says so).
    ``res_low``/``res_high`` bracket the value over the residual intervals of the ambiguous
    nodes (equal to ``value`` when none is ambiguous; module docstring); ``resolved`` is
    False when that bracket is wider than the tolerance, i.e. the ambiguous nodes decide
    the quantity.  ``ambiguous_mass`` is the pooled mass of the heaviest ambiguous node.
    ``per_probe`` holds the value computed from each probe alone.
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

    def __post_init__(self) -> None:
        """A missing bracket is the value itself (nothing ambiguous)."""
        if np.isnan(self.res_low):
            object.__setattr__(self, "res_low", float(self.value))
        if np.isnan(self.res_high):
            object.__setattr__(self, "res_high", float(self.value))

    def text(self, fmt: str = "{:.4g}") -> str:
        """A report-table entry.

        Returns:
            ``value ± stderr`` (or ``value ± unknown``) followed by `` [res lo–hi]`` when the
            bracket's ends differ at the printed precision; ``unresolved (lo–hi)`` when the
            ambiguous nodes decide it.
        """
        low, high = fmt.format(self.res_low), fmt.format(self.res_high)
        if not self.resolved:
            return f"{UNRESOLVED} ({low}–{high})"
        se = "unknown" if not np.isfinite(self.stderr) else f"{self.stderr:.2g}"
        bracket = f" [res {low}–{high}]" if low != high else ""
        return f"{fmt.format(self.value)} ± {se}{bracket}"


@dataclass(frozen=True)
class Resolution:
    """The resolution bracket of one estimate and the absolute part of its tolerance.

    ``forced`` (when not None) is the resolved flag taken from another estimate (the grid
    Delta_+/Delta takes that of the nodes).
    """

    low: float
    high: float
    ambiguous_mass: float = 0.0
    absolute: float = 0.0
    forced: bool | None = None

    def resolved(self, value: float, relative: float) -> bool:
        """``high - low <= max(relative * |value|, absolute)`` (always True for a point bracket)."""
        if self.forced is not None:
            return self.forced
        if self.high == self.low or (np.isnan(self.high) and np.isnan(self.low)):
            return True
        with np.errstate(invalid="ignore", over="ignore"):
            return bool(self.high - self.low <= max(relative * abs(value), self.absolute))


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


@dataclass
class Spectrum:
    """SLQ results of one operator: per-probe Ritz nodes, Gauss weights, residual bounds.

    Arrays are ``(n_v, m')``, NaN-padded where a probe took fewer steps (breakdown).
    ``quad_forms[l] = z_l^T H z_l``.  The pooled SLQ measure gives node ``(l, i)`` the
    mass ``weights[l, i] / n_v``.
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
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_results(cls, results: Sequence[LanczosResult], n: int, **settings: Any) -> "Spectrum":
        """Pool per-probe Lanczos results (any order) into a spectrum."""
        if not results:
            raise ValueError("no SLQ probes to pool")
        results = sorted(results, key=lambda r: r.probe)
        width = max(r.steps for r in results)
        return cls(n=int(n), nodes=pad((r.nodes for r in results), width),
                   weights=pad((r.weights for r in results), width),
                   residuals=pad((r.residuals for r in results), width),
                   quad_forms=np.array([r.quad_form for r in results], dtype=np.float64),
                   probes=np.array([r.probe for r in results], dtype=np.int64),
                   steps=np.array([r.steps for r in results], dtype=np.int64),
                   breakdown=np.array([r.breakdown for r in results], dtype=bool), **settings)

    @property
    def probe_count(self) -> int:
        """n_v, the number of probes."""
        return int(self.nodes.shape[0])

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All (node, weight/n_v) pairs as flat arrays: the SLQ measure (total mass 1)."""
        ok = ~np.isnan(self.nodes)
        return self.nodes[ok], (self.weights / self.probe_count)[ok]

    def moment(self, k: int) -> float:
        """k-th moment of the SLQ measure, an estimate of tr(H^k)/n."""
        x, w = self.pooled()
        return float(np.sum(w * x ** k))

    def resolved_nodes(self) -> np.ndarray:
        """Per node: True where ``|theta| > r`` (the sign of its eigenvalue is known)."""
        with np.errstate(invalid="ignore"):
            return np.abs(self.nodes) > self.residuals

    def extremes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``((lambda_min, residual), (lambda_max, residual))`` over all probes."""
        imin, imax = np.nanargmin(self.nodes), np.nanargmax(self.nodes)
        return ((float(self.nodes.flat[imin]), float(self.residuals.flat[imin])),
                (float(self.nodes.flat[imax]), float(self.residuals.flat[imax])))

    # -- uncertainty machinery ---------------------------------------------------------
    def _estimate(self, stat: Callable[[np.ndarray], np.ndarray], res: Resolution | None = None) -> Estimate:
        """Value, jackknife standard error and bootstrap interval of ``stat`` over probes.

        ``stat(idx)`` takes an integer array (R, k) of probe rows and returns R values;
        ``res`` is the resolution bracket (None: nothing ambiguous).
        """
        nv = self.probe_count
        value = float(stat(np.arange(nv)[None, :])[0])
        per_probe = tuple(float(v) for v in stat(np.arange(nv)[:, None]))
        res = res or Resolution(value, value)
        # the value lies in its bracket; clamp away rounding between the two computations
        low, high = (value, value) if res.low == res.high else (min(res.low, value), max(res.high, value))
        unknown = Estimate(value, float("nan"), float("nan"), float("nan"), res.resolved(value, self.resolution_rel),
                           float(res.ambiguous_mass), UNKNOWN, per_probe, float(low), float(high))
        if nv < MIN_PROBES:
            return unknown
        leave_one_out = np.array([np.delete(np.arange(nv), i) for i in range(nv)])
        se = _jackknife_se(stat(leave_one_out))
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.bootstrap_seed), nv])))
        boot = stat(rng.integers(0, nv, size=(int(self.bootstrap), nv)))
        tail = 50.0 * (1.0 - self.confidence)
        with np.errstate(invalid="ignore"):
            lo, hi = np.percentile(boot, [tail, 100.0 - tail]) if np.all(np.isfinite(boot)) else (np.nan, np.nan)
        return replace(unknown, stderr=se, ci_low=float(lo), ci_high=float(hi), note="")

    def _mean_estimate(self, per_probe: np.ndarray, res: Resolution | None = None) -> Estimate:
        return self._estimate(lambda idx: per_probe[idx].mean(axis=1), res)

    @staticmethod
    def _fraction_stat(num: np.ndarray, den: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Delta_+/Delta of the per-probe masses ``num``/``den``, by the formula of eq. II.93."""
        def stat(idx: np.ndarray) -> np.ndarray:
            return np.asarray(fidelity_ii93(num[idx].mean(axis=1), den[idx].mean(axis=1)))  # arrays in, array out
        return stat

    def _pooled_value(self, stat: Callable[[np.ndarray], np.ndarray]) -> float:
        """``stat`` over all probes together (how the value pools them)."""
        return float(stat(np.arange(self.probe_count)[None, :])[0])

    def _ambiguous(self, points: np.ndarray, cutoff: float = 0.0) -> np.ndarray:
        """Per node with ``|theta| >= cutoff``: True when ``[theta - r, theta + r]`` contains
        one of ``points`` (the node's class is unknown).
        """
        a = self.nodes - self.residuals
        b = self.nodes + self.residuals
        hit = np.zeros(self.nodes.shape, dtype=bool)
        with np.errstate(invalid="ignore"):
            for p in np.atleast_1d(points):
                hit |= (a <= p) & (p <= b)
            return hit & (np.abs(self.nodes) >= cutoff)

    def _single_node_mass(self, select: np.ndarray) -> float:
        """Pooled mass of the heaviest selected node of each probe (the mass one node decides)."""
        heaviest = np.max(np.where(select & ~np.isnan(self.weights), self.weights, 0.0), axis=1)
        return float(np.mean(heaviest))

    def _per_probe(self, fn: Callable[[np.ndarray, np.ndarray], float]) -> np.ndarray:
        out = np.empty(self.probe_count, dtype=np.float64)
        for row in range(self.probe_count):
            ok = ~np.isnan(self.nodes[row])
            out[row] = fn(self.nodes[row, ok], self.weights[row, ok])
        return out

    # -- quantities --------------------------------------------------------------------
    def trace(self) -> Estimate:
        """Hutchinson trace ``mean_l z_l^T H z_l`` (always resolved)."""
        return self._mean_estimate(self.quad_forms)

    def negative_mass(self, delta: float = 0.0) -> Estimate:
        """SLQ mass of the nodes below ``-max(delta, r_i)``: eigenvalues known to be negative.

        Args:
            delta: a floor for the per-node threshold (>= 0, in eigenvalue units).

        Returns:
            The estimate; its bracket runs from the value (no ambiguous node counted) to the
            value plus the mass of the nodes whose interval meets ``[-delta, 0]``.
        """
        if not delta >= 0:
            raise ValueError(f"negative-mass threshold delta = {delta}: must be >= 0")
        with np.errstate(invalid="ignore"):
            below = self.nodes < -np.maximum(delta, self.residuals)
        per = np.nansum(np.where(below, self.weights, 0.0), axis=1)
        # sign unknown: the eigenvalue interval meets [-delta, 0]
        with np.errstate(invalid="ignore"):
            amb = (self.nodes - self.residuals <= 0.0) & (self.nodes + self.residuals >= -delta) & ~below
        return self._mean_estimate(per, self._count_bracket(per, per + self._mass_of(amb), amb, 1.0))

    def _mass_of(self, select: np.ndarray) -> np.ndarray:
        """Per probe: the weight of the selected nodes, ``(n_v,)``."""
        return np.sum(np.where(select & ~np.isnan(self.weights), self.weights, 0.0), axis=1)

    def _count_bracket(self, low: np.ndarray, high: np.ndarray, amb: np.ndarray, norm: float,
                       stat: Callable[[np.ndarray], float] | None = None) -> Resolution | None:
        """The bracket of a counted mass from its per-probe extremes ``low``/``high``.

        Args:
            low: per-probe numerators with every ambiguous node uncounted.
            high: per-probe numerators with every ambiguous node counted.
            amb: the ambiguous nodes (n_v, m').
            norm: the mass the quantity is normalised by (for ``ambiguous_mass``).
            stat: how per-probe numerators pool into the quantity (default: their mean).

        Returns:
            None when no node is ambiguous, else the bracket with ``absolute = resolution_mass``.
        """
        if not amb.any():
            return None
        pool = stat or (lambda num: float(num.mean()))
        single = self._single_node_mass(amb)
        return Resolution(pool(low), pool(high), single / max(norm, single, 1e-300), float(self.resolution_mass))

    def _kept_and_dissipative(self, m: Modes) -> tuple[np.ndarray, np.ndarray]:
        """Per probe: kept mass (|lambda| >= cutoff) and dissipative kept mass (eq. II.28)."""
        def kept(x: np.ndarray, w: np.ndarray) -> float:
            return float(w[np.abs(x) >= m.cutoff].sum())

        def plus(x: np.ndarray, w: np.ndarray) -> float:
            d = dissipation(x, w, cutoff=m.cutoff, convention=m.convention, eta=m.eta or 1.0)
            return 0.0 if not np.isfinite(d.fraction) else d.fraction * kept(x, w)
        return self._per_probe(kept), self._per_probe(plus)

    def dissipative_fraction(self, convention: str = "eta", eta: float | None = None, cutoff: float = 0.4,
                             source: str = "nodes", width_factor: float = 0.01, points: int = 256) -> Estimate:
        """Delta_+/Delta (eq. II.28): mass with ``|1 + a| < 1`` among modes with ``|lambda| >= cutoff``.

        Args:
            convention: ``eta`` (a = -eta lambda, eq. II.65) or ``paper`` (a = -lambda).
            eta: the learning rate (required for ``eta``).
            cutoff: eigenvalue magnitude removed first (0 keeps every mode: eq. II.93).
            source: ``nodes`` (the Gauss quadrature) or ``grid`` (the smoothed density).
            width_factor: kernel width factor for ``grid``.
            points: grid size for ``grid``.

        Returns:
            The estimate with its resolution bracket (each ambiguous kept node counted as
            dissipative or not); ``grid`` takes the nodes' flag and their bracket shifted to
            the grid value.
        """
        m = _modes(convention, eta, cutoff)
        if source not in ("nodes", "grid"):
            raise ValueError(f"source = {source!r}: not 'nodes' or 'grid'")
        den, num = self._kept_and_dissipative(m)
        res = self._dissipative_bracket(m, den)
        if source == "nodes":
            return self._estimate(self._fraction_stat(num, den), res)
        nodes_value = self._pooled_value(self._fraction_stat(num, den))
        grid, masses = self.grid_masses(width_factor, points)
        keep = np.abs(grid) >= m.cutoff
        plus = keep & is_dissipative(modes(grid, m.convention, m.eta or 1.0))
        stat = self._fraction_stat(masses[:, plus].sum(axis=1), masses[:, keep].sum(axis=1))
        if res is not None:
            # the grid smooths the same nodes: it takes their flag and their bracket, shifted
            # to the grid value (and kept within [0, 1], where a fraction lies)
            value = self._pooled_value(stat)
            res = Resolution(max(value - (nodes_value - res.low), 0.0), min(value + (res.high - nodes_value), 1.0),
                             res.ambiguous_mass, res.absolute, res.resolved(nodes_value, self.resolution_rel))
        return self._estimate(stat, res)

    def _dissipative_bracket(self, m: Modes, den: np.ndarray) -> Resolution | None:
        """Bracket of Delta_+/Delta (nodes): each ambiguous kept node counted as dissipative or not."""
        amb = self._ambiguous(m.boundaries(), m.cutoff)
        kept = self._kept_nodes(m)
        with np.errstate(invalid="ignore"):
            plus = kept & is_dissipative(modes(self.nodes, m.convention, m.eta or 1.0))
        low = self._mass_of(plus & ~amb)
        high = low + self._mass_of(amb)

        def pool(num: np.ndarray) -> float:
            return float(self._fraction_stat(num, den)(np.arange(self.probe_count)[None, :])[0])
        return self._count_bracket(low, high, amb, float(den.mean()), pool)

    def _kept_nodes(self, m: Modes) -> np.ndarray:
        """Nodes kept by the cutoff, ``|theta| >= cutoff`` (NaN padding is not kept)."""
        with np.errstate(invalid="ignore"):
            return np.abs(self.nodes) >= m.cutoff

    def fidelity_ii93(self, convention: str = "eta", eta: float | None = None) -> Estimate:
        """Eq. II.93 estimate of the truncated-HHL fidelity: Delta_+/Delta over all modes."""
        return self.dissipative_fraction(convention, eta, cutoff=0.0)

    def _log_proxy_parts(self, t: np.ndarray, m: Modes) -> tuple[np.ndarray, np.ndarray]:
        """Per probe: ``log sum_kept w |1+a|^t`` (n_v, len(t)) and the kept mass (n_v,)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        lognum = np.full((self.probe_count, t.size), -np.inf)
        den = np.zeros(self.probe_count)
        for row in range(self.probe_count):
            ok = ~np.isnan(self.nodes[row])
            x, w = self.nodes[row, ok], self.weights[row, ok]
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

    def error_proxy(self, t: float, convention: str = "eta", eta: float | None = None,
                    cutoff: float = 0.4) -> Estimate:
        """Error proxy E(t) of eq. III.12/III.13 from the Ritz nodes, at one ``t``.

        Args:
            t: iteration count (>= 0).
            convention: ``eta`` or ``paper`` (see :meth:`dissipative_fraction`).
            eta: the learning rate (required for ``eta``).
            cutoff: eigenvalue magnitude removed first (eq. III.12).

        Returns:
            The estimate of E(t) (may be inf where it overflows float64; see
            :meth:`log_error_proxy` for the logarithm).
        """
        m = _modes(convention, eta, cutoff)
        lognum, den = self._log_proxy_parts(np.array([float(t)]), m)
        stat = self._log_proxy_stat(lognum[:, 0], den)
        res = self._proxy_bracket(float(t), m, den)
        with np.errstate(over="ignore"):
            return self._estimate(lambda idx: np.exp(stat(idx)), res)

    def _proxy_bracket(self, t: float, m: Modes, den: np.ndarray) -> Resolution | None:
        """Bracket of E(t) over every kept node's interval (eq. III.12/III.13).

        A node's term ``w |1 - k lambda|^t`` over ``lambda`` in ``[theta - r, theta + r]`` is
        largest at an end of the interval and smallest at the other end, or 0 when
        ``1/k`` lies inside; the kept set and ``den`` are fixed, so the extremes of E(t) are
        the sums of the per-node extremes. Every kept node counts, not only those whose
        interval meets a decision point: at large t a node's residual alone can move E(t)
        by orders of magnitude (``|1 - k lambda|^t`` amplifies it), whichever side it is on.
        """
        amb = self._ambiguous(m.boundaries(), m.cutoff)
        kept = self._kept_nodes(m) & (self.weights > 0)
        spread = kept & (self.residuals > 0)
        if not spread.any() or t == 0.0:
            return None
        k = m.k
        with np.errstate(divide="ignore", invalid="ignore"):
            def log_term(lam: np.ndarray) -> np.ndarray:
                return np.where(kept, np.log(self.weights) + t * np.log(np.abs(1.0 - k * lam)), -np.inf)
            at, ends_a, ends_b = (log_term(self.nodes), log_term(self.nodes - self.residuals),
                                  log_term(self.nodes + self.residuals))
            zero_inside = (self.nodes - self.residuals <= 1.0 / k) & (1.0 / k <= self.nodes + self.residuals)
        low = np.where(spread, np.where(zero_inside, -np.inf, np.minimum(ends_a, ends_b)), at)
        high = np.where(spread, np.maximum(ends_a, ends_b), at)

        def pool(terms: np.ndarray) -> float:
            with np.errstate(divide="ignore", over="ignore"):
                stat = self._log_proxy_stat(logsumexp(terms, axis=1), den)
                return float(np.exp(stat(np.arange(self.probe_count)[None, :])[0]))
        single = self._single_node_mass(amb)
        return Resolution(pool(low), pool(high), single / max(float(den.mean()), single, 1e-300), 0.0)

    def log_error_proxy(self, t: np.ndarray, convention: str = "eta", eta: float | None = None,
                        cutoff: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
        """``log E(t)`` from the nodes over an array of ``t`` and its jackknife standard error.

        Returns:
            ``(log_E, stderr_of_log_E)``, each of ``t``'s length; the standard error is NaN
            with fewer than 3 probes.
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
        group.attrs.update({"n": int(self.n), "bootstrap_resamples": int(self.bootstrap),
                            "bootstrap_seed": int(self.bootstrap_seed), "confidence": float(self.confidence),
                            "resolution_mass": float(self.resolution_mass),
                            "resolution_rel": float(self.resolution_rel)})

    @classmethod
    def from_hdf5(cls, group: Any) -> "Spectrum":
        """Read a spectrum written by :meth:`to_hdf5`."""
        a = group.attrs
        return cls(n=int(a["n"]), nodes=group["nodes"][()], weights=group["weights"][()],
                   residuals=group["residuals"][()], quad_forms=group["quad_forms"][()],
                   probes=group["probes"][()].astype(np.int64), steps=group["probe_steps"][()].astype(np.int64),
                   breakdown=group["breakdown"][()].astype(bool),
                   bootstrap=int(a.get("bootstrap_resamples", 1000)), bootstrap_seed=int(a.get("bootstrap_seed", 0)),
                   confidence=float(a.get("confidence", 0.95)), resolution_mass=float(a.get("resolution_mass", 0.05)),
                   resolution_rel=float(a.get("resolution_rel", 0.1)))


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
