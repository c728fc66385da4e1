"""Proven brackets for Gauss quadrature of one probe's spectral measure (numpy only).

A Lanczos run of ``m`` steps from the unit vector ``v = z/||z||`` gives the Jacobi matrix
``T_m`` (diagonal ``alpha_1..alpha_m``, off-diagonal ``beta_1..beta_{m-1}``) and the norm
``beta_m`` of the last residual.  They fix the first ``2m + 1`` moments of the probe's
spectral measure ``mu_z = sum_i (u_i . v)^2 delta(lambda_i)`` (total mass 1).  Every
measure with those moments obeys the bounds below; so does ``mu_z``.

Distribution function (Chebyshev-Markov-Stieltjes).  For a point ``x`` let the Gauss-Radau
rule with prescribed node ``x`` be the eigen-decomposition of ``T_m`` extended by one row and
column: off-diagonal ``beta_m`` and diagonal ``x + d_m`` with ``(T_m - x I) d = beta_m^2 e_m``
(Golub & Meurant 2010, ch. 6).  Its ``m + 1`` nodes ``y_j`` (one of them ``x``) and weights
``omega_j`` integrate polynomials of degree ``2m`` exactly and give

    sum_{y_j < x} omega_j  <=  mu_z((-inf, x))  <=  mu_z((-inf, x])  <=  sum_{y_j <= x} omega_j,

the Chebyshev-Markov-Stieltjes inequalities (Akhiezer 1965; Chen, Trogdon & Ubaru 2021).
The mass exactly at ``x`` is never decided: both ends of the bracket hold for the open and
for the closed half-line.  Which Radau node is the prescribed one is decided by its index
(the node nearest ``x``), never by the sign of a rounding-level difference.  When Lanczos
broke down (``beta_m = 0``: an invariant subspace), ``mu_z`` *is* the Gauss measure.

Rounding.  In floating point the computed ``T_m`` is, to first order, the exact Jacobi
matrix of a nearby problem ``H + E`` with ``||E||`` of order ``m u ||H||`` (``u`` the unit
roundoff of the Krylov basis; Paige 1976, Greenbaum 1989 for the reorthogonalised case).
The bounds are therefore evaluated a margin ``eps = 16 m u s`` outside the threshold
(``s = max |theta| + beta_m``, a bound on ``||T_m||`` up to a factor 2): the lower bound at
``x - eps`` and the upper bound at ``x + eps``, so a node that sits within rounding of a
threshold counts on both sides.  This margin is a stated safety factor on a first-order
estimate, not a proof.

Integrals.  For an integrand ``g`` that is monotone between known breakpoints on the
spectral interval ``[a, b]`` (which must contain the support of ``mu_z``), the bounds on the
distribution function at grid points ``g_0 = a < ... < g_K = b`` confine every quantile
``Q(u)`` of ``mu_z`` to a range of grid cells; ``int g dmu_z = int_0^1 g(Q(u)) du`` then lies
between the integrals over ``u`` of the smallest and largest values of ``g`` on those
ranges (:func:`quantile_bounds`).  Where ``g`` is smooth and its derivatives of orders
``2m`` and ``2m + 1`` keep one sign on ``[a, b]``, the Gauss and Gauss-Radau (at ``a`` and
``b``) rules bracket the integral directly (:meth:`ProbeQuadrature.smooth_bracket`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.linalg

#: rounding margin factor: eps = MARGIN_FACTOR * m * u * scale
MARGIN_FACTOR = 16.0
#: a Radau point is kept at least this far (relative to the scale) from every Gauss node
SEPARATION = 1e-9
#: refinement of the integration grid around every Gauss node: fractions of the gap
REFINE = (0.5, 1e-1, 1e-2, 1e-3, 1e-5)


def gauss_rule(alpha: np.ndarray, beta_off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes, weights and last eigenvector components of the Jacobi matrix ``T_m``.

    Args:
        alpha: diagonal (m,).
        beta_off: off-diagonal (m - 1,).

    Returns:
        ``(theta, S_1i^2, S_mi)`` in float64, theta ascending.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta_off = np.asarray(beta_off, dtype=np.float64)
    if alpha.size == 1:
        return alpha.copy(), np.ones(1), np.ones(1)
    theta, s = scipy.linalg.eigh_tridiagonal(alpha, beta_off)
    return theta, s[0, :] ** 2, s[-1, :].copy()


def tridiagonal_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values, Gauss weights ``S_1i^2`` and residual bounds ``|beta_m S_mi|`` of ``T_m``.

    Args:
        alpha: the ``m`` diagonal entries.
        beta: ``beta_1..beta_m`` (the last is the norm of the final residual), or only the
            ``m - 1`` off-diagonals (then the residuals are 0).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    m = alpha.size
    theta, weights, last = gauss_rule(alpha, beta[:m - 1])
    residuals = np.abs(beta[m - 1] * last) if beta.size >= m else np.zeros(m)
    return theta, weights, residuals


def jacobi_from_measure(nodes: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Jacobi matrix whose Gauss rule is the given discrete measure (Lanczos on ``diag(nodes)``).

    Used for spectra stored without their recurrence: the Ritz values and Gauss weights
    determine ``T_m`` up to rounding (Gragg & Harrod 1984; here by Lanczos with full
    reorthogonalisation in float64).  Nodes with zero weight are dropped.

    Returns:
        ``(alpha, beta_off)``.
    """
    x = np.asarray(nodes, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    keep = ~np.isnan(x) & ~np.isnan(w) & (w > 0)
    x, w = x[keep], w[keep] / w[keep].sum()
    m = x.size
    V = np.zeros((m, m))
    V[0] = np.sqrt(w)
    alpha, beta = np.zeros(m), np.zeros(max(m - 1, 0))
    for j in range(m):
        r = x * V[j]
        alpha[j] = V[j] @ r
        r -= alpha[j] * V[j] + (beta[j - 1] * V[j - 1] if j > 0 else 0.0)
        for _ in range(2):
            r -= V[:j + 1].T @ (V[:j + 1] @ r)
        if j == m - 1:
            break
        beta[j] = np.linalg.norm(r)
        if beta[j] == 0.0:
            return alpha[:j + 1], beta[:j]
        V[j + 1] = r / beta[j]
    return alpha, beta


@dataclass
class ProbeQuadrature:
    """One probe's Jacobi matrix and the proven bounds it implies (module docstring).

    Attributes:
        alpha: diagonal of ``T_m`` (m,).
        beta_off: off-diagonal (m - 1,).
        beta_last: ``beta_m``, the norm of the last Lanczos residual (0 after a breakdown).
        exact: True when the Gauss measure is the probe's measure (breakdown or m = n).
        unit_roundoff: ``u`` of the arithmetic that built ``T_m`` (its Krylov basis).
    """

    alpha: np.ndarray
    beta_off: np.ndarray
    beta_last: float
    exact: bool
    unit_roundoff: float = 2.0 ** -53
    nodes: np.ndarray = field(init=False, repr=False)
    weights: np.ndarray = field(init=False, repr=False)
    first: np.ndarray = field(init=False, repr=False)
    last: np.ndarray = field(init=False, repr=False)
    _cdf: dict = field(default_factory=dict, init=False, repr=False)
    _raw: dict = field(default_factory=dict, init=False, repr=False)
    _grids: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        """Gauss rule of ``T_m``; a zero ``beta_m`` makes the rule exact."""
        self.alpha = np.asarray(self.alpha, dtype=np.float64)
        self.beta_off = np.asarray(self.beta_off, dtype=np.float64)
        if self.alpha.size == 1:
            self.nodes, self.first, self.last = self.alpha.copy(), np.ones(1), np.ones(1)
        else:
            self.nodes, vectors = scipy.linalg.eigh_tridiagonal(self.alpha, self.beta_off)
            self.first, self.last = vectors[0].copy(), vectors[-1].copy()
        self.weights = self.first ** 2
        self.exact = bool(self.exact) or not self.beta_last > 0.0

    @classmethod
    def from_recurrence(cls, alpha: np.ndarray, beta: np.ndarray, exact: bool,
                        unit_roundoff: float = 2.0 ** -53) -> "ProbeQuadrature":
        """From Lanczos ``alpha`` (m,) and ``beta`` (m,), NaN padding removed."""
        alpha = np.asarray(alpha, dtype=np.float64)
        beta = np.asarray(beta, dtype=np.float64)
        m = int(np.count_nonzero(~np.isnan(alpha)))
        return cls(alpha[:m], beta[:m - 1], float(beta[m - 1]) if beta.size >= m else 0.0, exact, unit_roundoff)

    @property
    def steps(self) -> int:
        """m, the number of Lanczos steps."""
        return int(self.alpha.size)

    @property
    def scale(self) -> float:
        """``max |theta| + beta_m``, the scale of ``T_m`` used by the rounding margin."""
        return float(np.max(np.abs(self.nodes)) + abs(self.beta_last)) or 1.0

    @property
    def margin(self) -> float:
        """The rounding margin ``eps = 16 m u s`` (module docstring)."""
        return MARGIN_FACTOR * self.steps * self.unit_roundoff * self.scale

    # -- Gauss-Radau ---------------------------------------------------------------------
    def radau(self, x: float) -> tuple[np.ndarray, np.ndarray, int]:
        """The ``m + 1``-point Gauss-Radau rule with prescribed node ``x``.

        Returns:
            ``(nodes, weights, j)`` with ``nodes[j]`` the prescribed node; nodes ascending.
        """
        b2 = self.beta_last ** 2
        d = b2 * float(np.sum(self.last ** 2 / (self.nodes - x)))
        diag = np.append(self.alpha, x + d)
        off = np.append(self.beta_off, self.beta_last)
        y, s = scipy.linalg.eigh_tridiagonal(diag, off)
        return y, s[0, :] ** 2, int(np.argmin(np.abs(y - x)))

    def _away_from_nodes(self, x: float, direction: float) -> float:
        """``x`` moved in ``direction`` until it is at least ``SEPARATION * scale`` from every
        Gauss node (the Radau extension is then well conditioned; a bound at a point further
        out in ``direction`` is still a bound).
        """
        return float(self._away_many(np.array([x], dtype=np.float64), direction)[0])

    def _away_many(self, x: np.ndarray, direction: float) -> np.ndarray:
        """:meth:`_away_from_nodes` for every point of ``x`` (vectorised)."""
        gap = SEPARATION * self.scale
        x = np.array(x, dtype=np.float64)
        nodes = self.nodes
        for _ in range(nodes.size + 1):
            i = np.clip(np.searchsorted(nodes, x), 1, nodes.size) if nodes.size > 1 else np.ones(x.size, int)
            lo_n = nodes[i - 1]
            hi_n = nodes[np.minimum(i, nodes.size - 1)]
            near_lo = np.abs(x - lo_n) < gap
            near_hi = np.abs(x - hi_n) < gap
            near = near_lo | near_hi
            if not near.any():
                break
            if direction < 0:
                target = np.where(near_lo & near_hi, np.minimum(lo_n, hi_n), np.where(near_lo, lo_n, hi_n)) - gap
            else:
                target = np.where(near_lo & near_hi, np.maximum(lo_n, hi_n), np.where(near_lo, lo_n, hi_n)) + gap
            x = np.where(near, target, x)
        return x

    def cdf_bounds(self, x: float) -> tuple[float, float]:
        """``(lo, hi)`` with ``lo <= mu_z((-inf, x)) <= mu_z((-inf, x]) <= hi`` (margin included)."""
        lo, hi = self.cdf_bounds_many(np.array([float(x)]))
        return float(lo[0]), float(hi[0])

    def cdf_bounds_many(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`cdf_bounds` at every point of ``x`` (vectorised; results cached per point)."""
        x = np.asarray(x, dtype=np.float64).ravel()
        todo = np.array([v for v in np.unique(x) if v not in self._cdf], dtype=np.float64)
        if todo.size:
            eps = self.margin
            lo = self._raw_bounds(self._away_many(todo - eps, -1.0))[0]
            hi = self._raw_bounds(self._away_many(todo + eps, +1.0))[1]
            for v, a, b in zip(todo, lo, hi, strict=True):
                self._cdf[float(v)] = (float(a), float(b))
        out = np.array([self._cdf[float(v)] for v in x]).reshape(-1, 2)
        return out[:, 0], out[:, 1]

    def _raw_bounds(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CMS bounds at points ``p`` without the rounding margin (``p`` off the Gauss nodes
        unless the rule is exact), clipped to [0, 1].
        """
        if self.exact:
            cw = np.concatenate(([0.0], np.cumsum(self.weights)))
            lo = cw[np.searchsorted(self.nodes, p, side="left")]
            hi = cw[np.searchsorted(self.nodes, p, side="right")]
            return np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
        cache = self._raw
        todo = np.array([v for v in np.unique(p) if float(v) not in cache], dtype=np.float64)
        if todo.size:
            lo, hi = self._radau_bounds(todo)
            cache.update({float(v): (a, b) for v, a, b in zip(todo, lo, hi, strict=True)})
        out = np.array([cache[float(v)] for v in p], dtype=np.float64).reshape(-1, 2)
        return np.clip(out[:, 0], 0.0, 1.0), np.clip(out[:, 1], 0.0, 1.0)

    def grid_bounds(self, grid: np.ndarray, sharp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distribution bounds for :func:`quantile_bounds`, one Radau rule per grid point.

        The rule at ``q`` bounds the measure of the nearby problem; with the margin ``eps`` its
        lower bound holds for ``mu_z((-inf, q + eps))`` and its upper bound for
        ``mu_z((-inf, q - eps])``, and both shifted points enter the returned grid (where a
        point carries one bound the other is the trivial 0 or 1, tightened by the monotone
        envelopes of :func:`quantile_bounds`).  At the ``sharp`` points (breakpoints, Gauss
        nodes) rules at ``x - eps`` and ``x + eps`` give both bounds at ``x`` itself.

        Returns:
            ``(points, lo, hi)``, points ascending.
        """
        eps = self.margin
        sharp = np.unique(sharp)
        plain = np.setdiff1d(np.unique(grid), sharp)
        if self.exact:
            q = np.concatenate((plain, sharp - eps, sharp + eps))
        else:
            q = np.concatenate((self._away_many(plain, -1.0), self._away_many(sharp - eps, -1.0),
                                self._away_many(sharp + eps, +1.0)))
        q = np.unique(q)
        lo, hi = self._raw_bounds(q)
        pts = np.concatenate((q + eps, q - eps))
        lows = np.concatenate((lo, np.zeros(q.size)))
        highs = np.concatenate((np.ones(q.size), hi))
        order = np.argsort(pts, kind="stable")
        pts, lows, highs = pts[order], lows[order], highs[order]
        uniq, first = np.unique(pts, return_index=True)
        return uniq, np.maximum.reduceat(lows, first), np.minimum.reduceat(highs, first)

    def _radau_bounds(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CMS bounds from the Gauss-Radau rules with prescribed nodes ``p`` (off the Gauss nodes).

        The Radau rule's nodes are the roots of the secular equation
        ``phi(y) = phi(p)``, ``phi(y) = y - beta_m^2 sum_i S_mi^2/(y - theta_i)``, one between
        each pair of consecutive Gauss nodes and one beyond each end; a root ``y`` has weight
        ``(beta_m sum_i S_1i S_mi/(y - theta_i))^2 / phi'(y)``.  Gauss nodes whose coupling
        ``|beta_m S_mi|`` (their residual bound) is at rounding level are deflated: they are
        nodes of every Radau rule with their Gauss weight.  The roots on the side of ``p``
        with fewer of them are found by bisection.

        Returns:
            ``(sum of weights below p, that plus the weight at p)``.
        """
        coupling = self.beta_last * self.last
        active = np.abs(coupling) > 1e-14 * self.scale
        if not active.any():   # every node deflated: the Gauss rule is the measure
            cw = np.concatenate(([0.0], np.cumsum(self.weights)))
            return cw[np.searchsorted(self.nodes, p, side="left")], cw[np.searchsorted(self.nodes, p, side="right")]
        th = self.nodes[active]
        b2s2 = coupling[active] ** 2
        cpl = self.beta_last * self.first[active] * self.last[active]
        dnodes, dweights = self.nodes[~active], self.weights[~active]
        M = th.size

        def phi(y: np.ndarray) -> np.ndarray:
            return y - np.sum(b2s2 / (y[:, None] - th[None, :]), axis=1)

        def omega(d: np.ndarray) -> np.ndarray:
            # d[r, k] = y_r - theta_k
            d = np.where(d == 0.0, np.spacing(np.abs(th))[None, :], d)
            dm = np.min(np.abs(d), axis=1, keepdims=True)   # scaled so nothing overflows
            r = dm / d
            return np.sum(cpl * r, axis=1) ** 2 / (dm[:, 0] ** 2 + np.sum(b2s2 * r ** 2, axis=1))

        target = phi(p)
        j = np.searchsorted(th, p)               # roots in intervals 0..j-1 lie below p, j+1..M above
        below_defl = np.array([dweights[dnodes < v].sum() for v in p]) if dnodes.size else np.zeros(p.size)
        above_defl = dweights.sum() - below_defl
        # every root but p itself; the weight at p is never used (near a Gauss node it is the
        # difference of large terms), so each bound is a direct sum of accurate root weights
        pts_a = np.repeat(np.arange(p.size), M)
        ints_a = np.concatenate([np.delete(np.arange(M + 1), j[q]) for q in range(p.size)]) if M else \
            np.zeros(0, dtype=np.int64)
        near, tau = self._secular_roots(th, b2s2, target[pts_a], ints_a)
        # y - theta_k as (theta_near - theta_k) + tau: accurate for a root next to a pole
        w = omega((th[near][:, None] - th[None, :]) + tau[:, None])
        is_below = ints_a < j[pts_a]
        below = np.bincount(pts_a, weights=np.where(is_below, w, 0.0), minlength=p.size)
        above = np.bincount(pts_a, weights=np.where(is_below, 0.0, w), minlength=p.size)
        lo, hi = below + below_defl, 1.0 - above - above_defl
        # consistency check: the m + 1 Radau weights sum to 1; where the secular roots fail it
        # (a root missed or counted twice) the rule is recomputed by a dense eigen-solve
        at = omega(p[:, None] - th[None, :])
        bad = ~(np.abs(lo + at - hi) <= 1e-9) | ~(lo <= hi)
        for i in np.nonzero(bad)[0]:
            _, om, k = self.radau(float(p[i]))
            lo[i], hi[i] = float(om[:k].sum()), float(om[:k + 1].sum())
        return lo, hi

    @staticmethod
    def _secular_roots(th: np.ndarray, b2s2: np.ndarray, target: np.ndarray,
                       interval: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Roots of ``phi(y) = target`` in interval ``i`` between poles ``th[i-1]`` and ``th[i]``
        (``i = 0``: below ``th[0]``; ``i = len(th)``: above the last).

        Bisection to the ulp, then, for a root close to a pole, the fixed point
        ``tau = c_k / (theta_k + tau - sum_{j != k} c_j/(theta_k - theta_j + tau) - target)``
        for its offset ``tau`` from the nearest pole ``theta_k`` (``c = beta_m^2 S_m^2``), which
        resolves offsets far below the ulp of ``theta_k``.

        Returns:
            ``(index of the nearest pole, offset tau)`` per root.
        """
        M = th.size
        beta = np.sqrt(b2s2.sum())
        lo = np.where(interval > 0, th[np.maximum(interval - 1, 0)], 0.0)
        hi = np.where(interval < M, th[np.minimum(interval, M - 1)], 0.0)
        first = interval == 0
        last = interval == M
        lo = np.where(first, th[0] - np.maximum(beta, th[0] - target + beta) * 1.001 - 1e-300, lo)
        hi = np.where(last, th[-1] + np.maximum(beta, target - th[-1] + beta) * 1.001 + 1e-300, hi)
        y = np.empty(target.size)
        for s in range(0, target.size, 2048):
            sl = slice(s, s + 2048)
            y[sl] = _two_pole_iteration(th, b2s2, target[sl], interval[sl], lo[sl], hi[sl])
        near = np.argmin(np.abs(y[:, None] - th[None, :]), axis=1)
        tau = y - th[near]
        delta = th[near][:, None] - th[None, :]
        others = np.where(np.arange(M)[None, :] == near[:, None], np.inf, np.abs(delta))
        close = np.abs(tau) < 0.1 * np.min(others, axis=1, initial=np.inf)
        if close.any():
            dn, cn, tc = delta[close], b2s2[near[close]], tau[close]
            rest_c = np.where(np.arange(M)[None, :] == near[close][:, None], 0.0, b2s2[None, :])
            # the root lies below its interval's upper pole and above its lower one
            side = np.where(near[close] == interval[close], -1.0, 1.0)
            for _ in range(8):
                with np.errstate(divide="ignore", invalid="ignore"):
                    rest = np.sum(rest_c / np.where(rest_c > 0, dn + tc[:, None], 1.0), axis=1)
                    new = cn / (th[near[close]] + tc - rest - target[close])
                tc = np.where(np.isfinite(new) & (np.sign(new) == side), new, tc)
            tau[close] = tc
        return near, tau

    def interval_mass_bounds(self, p: float, q: float) -> tuple[float, float]:
        """Bounds on ``mu_z`` of any interval with ends ``p < q`` (open or closed at either end)."""
        lp, hp = self.cdf_bounds(p) if np.isfinite(p) else (0.0, 0.0)
        lq, hq = self.cdf_bounds(q) if np.isfinite(q) else (1.0, 1.0)
        return max(lq - hp, 0.0), min(hq - lp, 1.0)

    # -- integrals -----------------------------------------------------------------------
    def gauss(self, f: Callable[[np.ndarray], np.ndarray]) -> float:
        """The Gauss rule ``sum_i w_i f(theta_i)``."""
        return float(np.sum(self.weights * f(self.nodes)))

    def smooth_bracket(self, f: Callable[[np.ndarray], np.ndarray],
                       signs: Callable[[int, float, float], int | None], a: float, b: float) -> tuple[float, float]:
        """Bracket of ``int f dmu_z`` from Gauss and Gauss-Radau at ``a``, ``b`` (Golub-Meurant).

        The Gauss error is ``f^(2m)(xi)/(2m)! int pi_m^2 dmu`` and the Radau error at ``a``
        (``b``) is ``f^(2m+1)(eta)/(2m+1)! int (lambda - a) pi^2 dmu`` (``lambda - b``), so a
        known sign of ``f^(2m)`` (``f^(2m+1)``) on ``[a, b]`` makes the Gauss (Radau) values
        one-sided bounds; sign 0 means the derivative vanishes identically (the rule is exact).

        Args:
            f: the integrand (vectorised).
            signs: ``signs(j, a, b)``, the sign of ``f^(j)`` on ``[a, b]`` (+1, -1, 0 for
                identically zero) or None when it is not of one sign.
            a: lower end of the spectral interval.
            b: upper end.  Both are moved outward off the Gauss nodes (a Radau node must
                not coincide with one); the signs are asked on the moved interval.

        Returns:
            ``(lo, hi)``, possibly infinite on a side without a bound.
        """
        lo, hi = -np.inf, np.inf
        g = self.gauss(f)
        a, b = self._away_from_nodes(a, -1.0), self._away_from_nodes(b, +1.0)
        m = self.steps
        sign_2m, sign_2m1 = signs(2 * m, a, b), signs(2 * m + 1, a, b)
        if self.exact or sign_2m == 0:
            return g, g
        if sign_2m == 1:
            lo = g
        elif sign_2m == -1:
            hi = g
        if sign_2m1 is not None and self.beta_last > 0:
            qa, qb = (float(np.sum(w * f(y))) for y, w, _ in (self.radau(a), self.radau(b)))
            if sign_2m1 == 0:
                return max(lo, min(qa, qb)), min(hi, max(qa, qb))
            # sign +: int f >= Q_a and int f <= Q_b; sign -: the reverse
            low_r, high_r = (qa, qb) if sign_2m1 == 1 else (qb, qa)
            lo, hi = max(lo, low_r), min(hi, high_r)
        return lo, hi

    def grid(self, a: float, b: float, extra: np.ndarray) -> np.ndarray:
        """Integration grid on ``[a, b]``: the ends, ``extra`` (breakpoints), the Gauss nodes and
        points at geometric fractions of the gap on either side of every node.
        """
        x = self.nodes
        gaps_left = np.diff(np.concatenate(([a], x)))
        gaps_right = np.diff(np.concatenate((x, [b])))
        pts = [np.array([a, b]), np.asarray(extra, dtype=np.float64), x]
        for f in REFINE:
            pts += [x - f * gaps_left, x + f * gaps_right]
        g = np.unique(np.concatenate(pts))
        return g[(g >= a) & (g <= b)]

    def quantile_bracket(self, f: Callable[[np.ndarray], np.ndarray], inside: Callable[[np.ndarray], np.ndarray],
                         a: float, b: float, breakpoints: np.ndarray) -> tuple[float, float]:
        """Bracket of ``int f 1_S dmu_z`` over measures consistent with the distribution bounds.

        Args:
            f: continuous on ``[a, b]`` and monotone between consecutive ``breakpoints``.
            inside: membership in ``S`` (vectorised boolean); ``S``'s boundary points must be
                among ``breakpoints``.
            a: lower end of the spectral interval (assumed to hold the support).
            b: upper end.
            breakpoints: turning points of ``f`` and boundary points of ``S``.

        Returns:
            ``(lo, hi)``.
        """
        g, lo, hi = self.quantile_grid(a, b, breakpoints)
        return quantile_bounds(g, lo, hi, f, inside)

    def quantile_grid(self, a: float, b: float, breakpoints: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The grid and distribution bounds :meth:`quantile_bracket` integrates over (cached).

        Returns:
            ``(g, lo, hi)``: ``g_0 = a < ... < g_K = b``, ``lo_k <= F(g_k^-)``, ``F(g_k) <= hi_k``.
        """
        bp = np.asarray(breakpoints, dtype=np.float64)
        key = (float(a), float(b), tuple(bp.tolist()))
        if key not in self._grids:
            sharp = np.concatenate((bp, self.nodes))
            pts, lo, hi = self.grid_bounds(self.grid(a, b, bp), sharp[(sharp >= a) & (sharp <= b)])
            keep = (pts > a) & (pts < b)
            # the ends a and b hold the support: F(a^-) = 0 and F(b) = 1
            g = np.concatenate(([a], pts[keep], [b]))
            lo = np.concatenate(([0.0], lo[keep], [lo[pts < b].max(initial=0.0)]))
            hi = np.concatenate(([hi[pts > a].min(initial=1.0)], hi[keep], [1.0]))
            # every breakpoint is a grid point, so no cell straddles a boundary of S (a
            # breakpoint next to a Gauss node was moved off it above); it carries the trivial
            # bounds 0 and 1, which the monotone envelopes of quantile_bounds tighten from
            # its neighbours
            extra = np.setdiff1d(bp[(bp > a) & (bp < b)], g)
            if extra.size:
                g = np.concatenate((g, extra))
                lo = np.concatenate((lo, np.zeros(extra.size)))
                hi = np.concatenate((hi, np.ones(extra.size)))
                order = np.argsort(g, kind="stable")
                g, lo, hi = g[order], lo[order], hi[order]
            self._grids[key] = (g, lo, hi)
        return self._grids[key]


def _two_pole_iteration(th: np.ndarray, b2s2: np.ndarray, target: np.ndarray, interval: np.ndarray,
                        lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Safeguarded rational (two-pole) iteration for ``phi(y) = target`` on ``(lo, hi)``.

    At an iterate ``y`` the poles left and right of the interval are each replaced by one
    pole at the interval's end matching their value and slope (the linear term's slope
    shared between them, Gragg's "middle way"); the model's root is the next iterate,
    replaced by the bracket's midpoint when it leaves the bracket, which shrinks with the
    sign of ``phi - target``.  Converges to the ulp in a few steps; only the roots not yet
    converged are iterated.
    """
    M = th.size
    has_l_all, has_r_all = interval > 0, interval < M
    thl_all = np.where(has_l_all, th[np.maximum(interval - 1, 0)], lo)
    thr_all = np.where(has_r_all, th[np.minimum(interval, M - 1)], hi)
    lft_all, r_all = lo.copy(), hi.copy()
    y_all = 0.5 * (lft_all + r_all)
    idx = np.arange(target.size)
    for _ in range(100):
        if idx.size == 0:
            break
        y, lft, r, c = y_all[idx], lft_all[idx], r_all[idx], target[idx]
        has_l, has_r, th_l, th_r = has_l_all[idx], has_r_all[idx], thl_all[idx], thr_all[idx]
        left = np.arange(M)[None, :] < interval[idx][:, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            t1 = b2s2[None, :] / (y[:, None] - th[None, :])
            t2 = t1 / (y[:, None] - th[None, :])
            g = y - c - t1.sum(axis=1)
            dl = np.where(left, t2, 0.0).sum(axis=1)
            dr = t2.sum(axis=1) - dl
            neg = g < 0
            lft = np.where(neg, y, lft)
            r = np.where(neg, r, y)
            qa = np.where(has_l, -(dl + np.where(has_r, 0.5, 1.0)) * (y - th_l) ** 2, 0.0)
            qb = np.where(has_r, -(dr + np.where(has_l, 0.5, 1.0)) * (y - th_r) ** 2, 0.0)
            C = g - np.where(has_l, qa / (y - th_l), 0.0) - np.where(has_r, qb / (y - th_r), 0.0)
            D = th_r - th_l
            a, b, c0 = C, qa + qb - C * D, -qa * D
            disc = np.sqrt(np.maximum(b * b - 4 * a * c0, 0.0))
            tau1 = 2 * c0 / (-b - np.where(b >= 0, 1.0, -1.0) * disc)
            tau2 = c0 / (a * tau1)          # the product of the roots is c0/a
            tau = np.where((tau1 > 0) & (tau1 < D), tau1, tau2)
            cand = np.where(has_l & has_r, th_l + tau, np.where(has_r, th_r - qb / C, th_l - qa / C))
        # a model root on a pole or on a bracket end (an earlier iterate) has converged to the
        # ulp (an offset from a pole is refined afterwards)
        pinned = np.isfinite(cand) & (((cand == th_l) & has_l) | ((cand == th_r) & has_r) | (cand == lft) | (cand == r))
        ok = np.isfinite(cand) & (cand > lft) & (cand < r)
        new = np.where(ok | pinned, cand, 0.5 * (lft + r))
        done = (np.abs(new - y) <= 4 * np.spacing(np.abs(y) + np.abs(th_l) + 1e-300)) | (r <= np.nextafter(lft, np.inf))
        done |= pinned
        y_all[idx], lft_all[idx], r_all[idx] = new, lft, r
        idx = idx[~done]
    return y_all


def quantile_bounds(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray, f: Callable[[np.ndarray], np.ndarray],
                    inside: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """``int f 1_S dmu`` bounded through the quantile function of ``mu`` (module docstring).

    The pieces are the atoms ``{g_k}`` and the open cells ``(g_k, g_k+1)`` of the grid, in
    order.  From ``lo_k <= F(g_k^-)`` and ``F(g_k) <= hi_k`` (monotone envelopes taken), a
    quantile level ``u`` above ``hi_k`` lies right of ``g_k`` and one below ``lo_k`` left of
    it; on each interval of ``u`` between consecutive bound values the smallest and largest
    value of ``f 1_S`` over the allowed pieces are integrated.

    Args:
        grid: ``a = g_0 < ... < g_K = b`` (the support lies in ``[a, b]``).
        lo: lower bounds on ``F(g_k^-)``.
        hi: upper bounds on ``F(g_k)``.
        f: continuous, monotone on every cell.
        inside: membership in ``S`` (the boundary of ``S`` on grid points).

    Returns:
        ``(lower, upper)``.
    """
    K = grid.size - 1
    lo = np.maximum.accumulate(np.clip(lo, 0.0, 1.0))
    hi = np.minimum.accumulate(np.clip(hi, 0.0, 1.0)[::-1])[::-1]
    hi[-1] = 1.0
    hi = np.maximum(hi, lo)
    fg = f(grid)
    at = np.where(inside(grid), fg, 0.0)
    mid_in = inside(0.5 * (grid[:-1] + grid[1:]))
    cell_max = np.where(mid_in, np.maximum(fg[:-1], fg[1:]), 0.0)
    cell_min = np.where(mid_in, np.minimum(fg[:-1], fg[1:]), 0.0)
    pmax = np.empty(2 * K + 1)
    pmin = np.empty(2 * K + 1)
    pmax[0::2], pmin[0::2] = at, at
    pmax[1::2], pmin[1::2] = cell_max, cell_min
    levels = np.unique(np.concatenate(([0.0, 1.0], lo, hi)))
    u0, u1 = levels[:-1], levels[1:]
    # first piece allowed: after the atom of the last k with hi_k <= u0
    k1 = np.searchsorted(hi, u0, side="right") - 1
    jmin = np.where(k1 >= 0, 2 * k1 + 1, 0)
    # last piece allowed: before the atom of the first k with lo_k >= u1
    k2 = np.searchsorted(lo, u1, side="left")
    jmax = np.where(k2 <= K, 2 * k2 - 1, 2 * K)
    jmax = np.maximum(jmax, jmin)
    jmin = np.minimum(jmin, 2 * K)
    jmax = np.minimum(jmax, 2 * K)
    width = u1 - u0
    upper = float(np.sum(width * _range_reduce(pmax, jmin, jmax, np.maximum)))
    lower = float(np.sum(width * _range_reduce(pmin, jmin, jmax, np.minimum)))
    return lower, upper


def _quantile_pieces(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quantile levels of :func:`quantile_bounds` and, per level interval, the first and
    last allowed piece (atoms at even, open cells at odd indices).

    Returns:
        ``(width, jmin, jmax)``.
    """
    K = grid.size - 1
    lo = np.maximum.accumulate(np.clip(lo, 0.0, 1.0))
    hi = np.minimum.accumulate(np.clip(hi, 0.0, 1.0)[::-1])[::-1]
    hi[-1] = 1.0
    hi = np.maximum(hi, lo)
    levels = np.unique(np.concatenate(([0.0, 1.0], lo, hi)))
    u0, u1 = levels[:-1], levels[1:]
    k1 = np.searchsorted(hi, u0, side="right") - 1
    jmin = np.where(k1 >= 0, 2 * k1 + 1, 0)
    k2 = np.searchsorted(lo, u1, side="left")
    jmax = np.where(k2 <= K, 2 * k2 - 1, 2 * K)
    jmax = np.maximum(jmax, jmin)
    return u1 - u0, np.minimum(jmin, 2 * K), np.minimum(jmax, 2 * K)


@dataclass
class RatioPieces:
    """What the distribution bounds allow, per quantile level interval, for a ratio
    ``int_S f dmu / mu(S)`` (:func:`ratio_pieces`).

    Attributes:
        width: length of each level interval.
        fmin: smallest value of ``f`` over the allowed pieces inside ``S`` (+inf: none).
        fmax: largest value (-inf: none).
        outside: True where an allowed piece lies outside ``S``.
    """

    width: np.ndarray
    fmin: np.ndarray
    fmax: np.ndarray
    outside: np.ndarray

    @staticmethod
    def concat(parts: list["RatioPieces"]) -> "RatioPieces":
        """The pieces of several probes together (their sums pool the probes)."""
        return RatioPieces(*(np.concatenate([getattr(p, n) for p in parts])
                             for n in ("width", "fmin", "fmax", "outside")))

    def lower(self, r: float) -> float:
        """A lower bound on ``int_S (f - r) dmu`` over the allowed measures (summed over pieces)."""
        with np.errstate(invalid="ignore"):
            v = np.minimum(self.fmin - r, np.where(self.outside, 0.0, np.inf))
        return float(np.sum(self.width * v))

    def upper(self, r: float) -> float:
        """An upper bound on ``int_S (f - r) dmu``."""
        with np.errstate(invalid="ignore"):
            v = np.maximum(self.fmax - r, np.where(self.outside, 0.0, -np.inf))
        return float(np.sum(self.width * v))

    def bracket(self) -> tuple[float, float]:
        """Bounds on ``int_S f dmu / mu(S)`` for every allowed measure with ``mu(S) > 0``.

        ``N/D >= r`` exactly when ``int_S (f - r) dmu >= 0``, so the lower end is the largest
        ``r`` with :meth:`lower` ``>= 0`` and the upper end the smallest ``r`` with
        :meth:`upper` ``<= 0`` (both non-increasing in ``r``), found by bisection and rounded
        outward (the returned ends satisfy their inequality).
        """
        finite_min = self.fmin[np.isfinite(self.fmin)]
        finite_max = self.fmax[np.isfinite(self.fmax)]
        if finite_min.size == 0 or finite_max.size == 0 or np.any(np.isnan(self.fmax)) \
                or np.any(np.isposinf(self.fmax)):
            return -np.inf, np.inf   # nothing allowed in S, or f overflowed: no joint bound

        def solve(g: Callable[[float], bool], a: float, b: float) -> tuple[float, float]:
            # g(a) holds and g(b) does not; bisect to the ulp
            for _ in range(200):
                mid = 0.5 * (a + b)
                if mid in (a, b):
                    break
                a, b = (mid, b) if g(mid) else (a, mid)
            return a, b
        lo_a, hi_b = float(finite_min.min()), float(finite_max.max())
        top = hi_b + abs(hi_b) + 1.0
        # lower(r) >= 0 holds at r = min fmin; find where it stops holding
        low = lo_a if not self.lower(top) >= 0 else top
        if low != top:
            low = solve(lambda r: self.lower(r) >= 0, lo_a, top)[0]
        bottom = lo_a - abs(lo_a) - 1.0
        # upper(r) <= 0 holds at r = max fmax; find where it starts holding
        if self.upper(bottom) <= 0:
            high = bottom
        else:
            high = solve(lambda r: not self.upper(r) <= 0, bottom, hi_b)[1]
        return low, high


def ratio_pieces(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray, f: Callable[[np.ndarray], np.ndarray],
                 inside: Callable[[np.ndarray], np.ndarray]) -> RatioPieces:
    """Per quantile level interval: the range of ``f`` over the allowed pieces in ``S`` and
    whether a piece outside ``S`` is allowed (the quantile argument of :func:`quantile_bounds`
    applied to ``(f - r) 1_S`` for every ``r`` at once).
    """
    width, jmin, jmax = _quantile_pieces(grid, lo, hi)
    K = grid.size - 1
    fg = f(grid)
    at_in = inside(grid)
    mid_in = inside(0.5 * (grid[:-1] + grid[1:]))
    vmin = np.empty(2 * K + 1)
    vmax = np.empty(2 * K + 1)
    vmin[0::2] = np.where(at_in, fg, np.inf)
    vmax[0::2] = np.where(at_in, fg, -np.inf)
    vmin[1::2] = np.where(mid_in, np.minimum(fg[:-1], fg[1:]), np.inf)
    vmax[1::2] = np.where(mid_in, np.maximum(fg[:-1], fg[1:]), -np.inf)
    out = np.empty(2 * K + 1, dtype=np.int64)
    out[0::2], out[1::2] = ~at_in, ~mid_in
    count = np.concatenate(([0], np.cumsum(out)))
    return RatioPieces(width, _range_reduce(vmin, jmin, jmax, np.minimum), _range_reduce(vmax, jmin, jmax, np.maximum),
                       count[jmax + 1] - count[jmin] > 0)


def _range_reduce(values: np.ndarray, start: np.ndarray, stop: np.ndarray, op: np.ufunc) -> np.ndarray:
    """``op`` over ``values[start_i..stop_i]`` (inclusive) for every i (sparse table)."""
    table = [values]
    span = 1
    while 2 * span <= values.size:
        prev = table[-1]
        table.append(op(prev[:-span], prev[span:]))
        span *= 2
    length = stop - start + 1
    level = np.floor(np.log2(np.maximum(length, 1))).astype(np.int64)
    out = np.empty(start.size)
    for lev in np.unique(level):
        sel = level == lev
        t = table[lev]
        out[sel] = op(t[start[sel]], t[stop[sel] - (1 << lev) + 1])
    return out


def falling_sign(t: float, j: int) -> int:
    """Sign of ``t (t-1) ... (t-j+1)`` (0 when a factor vanishes)."""
    s = 1
    for i in range(j):
        v = t - i
        if v == 0:
            return 0
        s *= 1 if v > 0 else -1
    return s


def power_derivative_sign(t: float, k: float, j: int, a: float, b: float) -> int | None:
    """Sign of the j-th derivative of ``|1 - k lambda|^t`` on ``[a, b]`` (None: not one sign).

    On the side ``1 - k lambda >= 0`` the derivative is ``falling(t, j) (-k)^j (1 - k
    lambda)^(t-j)``, on the other ``falling(t, j) k^j (k lambda - 1)^(t-j)``; for an even
    integer ``t`` the function is the polynomial ``(1 - k lambda)^t`` everywhere.
    """
    integer = float(t).is_integer() and t >= 0
    root = 1.0 / k
    if b < root or (integer and b <= root):
        return 0 if integer and j > t else falling_sign(t, j) * (-1) ** j
    if a > root or (integer and a >= root):
        return 0 if integer and j > t else falling_sign(t, j)
    if integer and int(t) % 2 == 0:   # the polynomial (1 - k lambda)^t on both sides
        if j > t:
            return 0
        return falling_sign(t, j) * (-1) ** j if (int(t) - j) % 2 == 0 else None
    return None


def student_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student t quantile ``t_{(1+confidence)/2, dof}``."""
    from scipy.stats import t as student

    return float(student.ppf(0.5 * (1.0 + confidence), dof))
