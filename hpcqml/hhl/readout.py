"""Sampling read-out of a sparse output state (paper Sec. II D, eq. II.97-II.99).

The output ``|x> = sum_alpha v_alpha |p_alpha>`` (eq. II.97) is measured in the
computational basis; each shot returns basis index ``i`` with probability ``|x_i|^2``.
Shots are repeated until every index whose amplitude exceeds a threshold ``delta`` has been
seen at least once (the coupon collector's problem). For target weights
``p_alpha = |v_alpha|^2`` the expected number of shots is (eq. II.99)

    E[shots] = int_0^inf ( 1 - prod_alpha (1 - exp(-p_alpha y)) ) dy,

which holds whether or not the targets exhaust the distribution (Poissonisation: every
index is an independent Poisson stream of rate ``|x_i|^2``). For ``r`` equal weights it is
``r H_r = r ln r + gamma r + 1/2 + O(1/r)``. Magnitudes are estimated from the counts as
``|x_i| ~ sqrt(count_i / shots)``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import integrate

from hpcqml.errors import UserError


def _targets_weights(weights: np.ndarray) -> np.ndarray:
    p = np.asarray(weights, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise UserError("coupon collector: no target outcomes (is delta above every amplitude?)")
    if np.any(~np.isfinite(p)) or np.any(p <= 0) or p.sum() > 1.0 + 1e-9:
        raise UserError("coupon collector: weights must be finite, > 0 and sum to at most 1")
    return p


def coupon_integrand(y: np.ndarray | float, weights: np.ndarray) -> np.ndarray:
    """``1 - prod_alpha (1 - exp(-p_alpha y))`` of eq. II.99, evaluated stably (float64)."""
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    p = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logs = np.log1p(-np.exp(-np.outer(y, p))).sum(axis=1)
    return -np.expm1(logs)


def coupon_collector_expectation(weights: np.ndarray, rtol: float = 1e-10) -> tuple[float, float]:
    """Eq. II.99 by adaptive quadrature; returns ``(value, absolute error estimate)``.

    The half line is cut at geometric break points from ``0.01/p_max`` to
    ``Y = (ln r + 60)/p_min``, beyond which the integrand is below ``r exp(-60 - ln r)``;
    ``scipy.integrate.quad`` integrates each piece.
    """
    p = _targets_weights(weights)
    r = p.size
    y_hi = (np.log(r) + 60.0) / p.min()
    y_lo = 0.01 / p.max()
    edges = np.concatenate([[0.0], np.geomspace(y_lo, y_hi, 40)])
    total, err = 0.0, 0.0

    def integrand(y: float) -> float:
        return float(coupon_integrand(y, p)[0])

    for a, b in itertools.pairwise(edges):
        val, e = integrate.quad(integrand, a, b, epsabs=0.0, epsrel=rtol, limit=200)
        total += val
        err += e
    return float(total), float(err)


def coupon_uniform_exact(r: int) -> float:
    """``r H_r`` (``H_r`` the r-th harmonic number): expected shots for r equal weights 1/r."""
    if r < 1:
        raise UserError(f"coupon collector: r must be >= 1, got {r}")
    return float(r * np.sum(1.0 / np.arange(1, r + 1)))


def r_log_r(r: int) -> float:
    """The leading-order ``r ln r`` of the uniform case (Sec. II D)."""
    return float(r * np.log(r)) if r > 1 else 0.0


def targets_above(state: np.ndarray, delta: float) -> np.ndarray:
    """Indices whose amplitude magnitude exceeds ``delta`` (int64)."""
    if not delta >= 0:
        raise UserError(f"read-out: delta must be >= 0, got {delta!r}")
    return np.flatnonzero(np.abs(np.asarray(state)) > delta).astype(np.int64)


def sample_until_all_seen(probs: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
                          chunk: int = 4096, max_shots: int = 100_000_000) -> tuple[int, np.ndarray]:
    """Measure in the computational basis until every index in ``targets`` has occurred.

    Returns ``(shots, counts)`` with ``counts`` (int64, length ``len(probs)``) the outcome
    histogram of exactly those ``shots``. Outcomes are drawn by inverse-CDF sampling from
    ``probs`` (normalised here).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if np.any(probs < 0) or not np.isfinite(probs).all() or probs.sum() <= 0:
        raise UserError("read-out: outcome probabilities must be finite, >= 0, not all zero")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size == 0:
        raise UserError("read-out: no target outcomes")
    if np.any(probs[targets] == 0):
        raise UserError("read-out: a target outcome has probability zero")
    cdf = np.cumsum(probs / probs.sum())
    cdf[-1] = 1.0
    is_target = np.zeros(probs.size, dtype=bool)
    is_target[targets] = True
    missing = {int(t) for t in targets}
    drawn: list[np.ndarray] = []
    shots = 0
    last = -1
    while missing:
        if shots >= max_shots:
            raise UserError(f"read-out: not every target seen after {max_shots} shots")
        out = np.searchsorted(cdf, rng.random(chunk), side="right")
        out = np.minimum(out, probs.size - 1)
        drawn.append(out)
        hits = np.flatnonzero(is_target[out])
        for pos in hits:
            o = int(out[pos])
            if o in missing:
                missing.discard(o)
                if not missing:
                    last = shots + int(pos)
                    break
        shots += chunk
    allout = np.concatenate(drawn)[: last + 1]
    return last + 1, np.bincount(allout, minlength=probs.size).astype(np.int64)


def estimate_magnitudes(counts: np.ndarray, shots: int) -> np.ndarray:
    """``|x_i| ~ sqrt(count_i / shots)`` (float64)."""
    if shots < 1:
        raise UserError(f"read-out: shots must be >= 1, got {shots}")
    return np.sqrt(np.asarray(counts, dtype=np.float64) / shots)


@dataclass
class ReadoutStats:
    """Repeated read-out trials of one state with threshold ``delta``.

    ``shots`` (int64, trials): shots per trial; ``mean``/``std``/``sem``: their sample mean,
    standard deviation and standard error; ``expected`` and ``expected_err``: eq. II.99 and
    its quadrature error; ``r``: number of targets; ``r_log_r`` and ``uniform``: ``r ln r``
    and ``r H_r`` for comparison; ``magnitude_error``: largest ``| sqrt(count/shots) - |x_i| |``
    over the targets, pooled over all trials.
    """

    shots: np.ndarray
    mean: float
    std: float
    sem: float
    expected: float
    expected_err: float
    r: int
    r_log_r: float
    uniform: float
    magnitude_error: float
    delta: float


def readout_trials(state: np.ndarray, delta: float, trials: int, rng: np.random.Generator) -> ReadoutStats:
    """Run ``trials`` independent read-outs of ``state`` (normalised here) and compare with eq. II.99."""
    if trials < 2:
        raise UserError(f"read-out: need at least 2 trials for a standard error, got {trials}")
    x = np.asarray(state)
    nrm = np.linalg.norm(x)
    if not nrm > 0:
        raise UserError("read-out: the state is zero")
    x = x / nrm
    probs = np.abs(x) ** 2
    targets = targets_above(x, delta)
    if targets.size == 0:
        raise UserError(f"read-out: no amplitude exceeds delta={delta:g} (largest {np.abs(x).max():.3g})")
    shots = np.empty(trials, dtype=np.int64)
    pooled = np.zeros(x.size, dtype=np.int64)
    for i in range(trials):
        shots[i], counts = sample_until_all_seen(probs, targets, rng)
        pooled += counts
    expected, err = coupon_collector_expectation(probs[targets])
    est = estimate_magnitudes(pooled, int(shots.sum()))
    r = int(targets.size)
    return ReadoutStats(shots=shots, mean=float(shots.mean()), std=float(shots.std(ddof=1)),
                        sem=float(shots.std(ddof=1) / np.sqrt(trials)), expected=expected, expected_err=err,
                        r=r, r_log_r=r_log_r(r), uniform=coupon_uniform_exact(r),
                        magnitude_error=float(np.max(np.abs(est[targets] - np.abs(x[targets])))),
                        delta=float(delta))
