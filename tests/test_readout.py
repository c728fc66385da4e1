"""Sampling read-out and the weighted coupon collector expectation (eq. II.99).

Statistical checks use a fixed seed and a 99.9 % two-sided normal interval: the sample mean
of the shot counts must lie within 3.29 standard errors of the prediction.
"""
import itertools

import numpy as np
import pytest

from hpcqml.errors import UserError
from hpcqml.hhl.readout import (
    coupon_collector_expectation,
    coupon_integrand,
    coupon_uniform_exact,
    estimate_magnitudes,
    r_log_r,
    readout_trials,
    sample_until_all_seen,
    targets_above,
)

Z999 = 3.29  # two-sided 99.9 % normal quantile


def _inclusion_exclusion(p):
    """Exact expectation: sum over non-empty subsets S of (-1)^{|S|+1} / P(S)."""
    total = 0.0
    for k in range(1, len(p) + 1):
        for S in itertools.combinations(range(len(p)), k):
            total += (-1) ** (k + 1) / p[list(S)].sum()
    return total


def test_ii99_quadrature_matches_exact_formulas():
    rng = np.random.default_rng(0)
    w = rng.random(9)
    w = 0.8 * w / w.sum()  # targets carry 80 % of the probability
    val, err = coupon_collector_expectation(w)
    assert val == pytest.approx(_inclusion_exclusion(w), rel=1e-9)
    assert err < 1e-6
    for r in (1, 2, 50):
        assert coupon_collector_expectation(np.full(r, 1.0 / r))[0] == pytest.approx(coupon_uniform_exact(r), rel=1e-9)


def test_uniform_case_is_r_log_r_to_leading_order():
    # r H_r = r ln r + gamma r + 1/2 + O(1/r)
    for r in (100, 1000):
        assert coupon_uniform_exact(r) - r_log_r(r) - 0.5772156649 * r == pytest.approx(0.5, abs=1e-2)
    assert r_log_r(8) == pytest.approx(8 * np.log(8))


def test_integrand_limits():
    p = np.array([0.5, 0.25])
    assert coupon_integrand(0.0, p)[0] == pytest.approx(1.0)
    assert coupon_integrand(200.0, p)[0] < 1e-20


def test_sampling_stops_when_every_target_is_seen():
    rng = np.random.default_rng(1)
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    targets = np.array([0, 1, 2])
    shots, counts = sample_until_all_seen(probs, targets, rng, chunk=7)
    assert counts.sum() == shots and np.all(counts[targets] >= 1)
    # the last shot completed the set: removing it leaves one target unseen
    for _ in range(20):
        shots, counts = sample_until_all_seen(probs, targets, rng, chunk=5)
        assert np.count_nonzero(counts[targets] == 1) >= 1


def test_uniform_mean_agrees_with_r_H_r():  # noqa: N802 - paper notation
    r, trials = 16, 1500
    x = np.zeros(64)
    x[np.arange(0, 64, 4)] = 1 / np.sqrt(r)
    st = readout_trials(x, delta=0.1, trials=trials, rng=np.random.default_rng(2))
    assert st.r == r
    assert st.expected == pytest.approx(coupon_uniform_exact(r), rel=1e-9)
    assert abs(st.mean - st.expected) < Z999 * st.sem


def test_weighted_mean_with_threshold_agrees_with_ii99():
    rng = np.random.default_rng(3)
    probs = np.zeros(128)
    big = rng.choice(128, 10, replace=False)
    w = rng.uniform(0.2, 1.0, 10)
    probs[big] = 0.6 * w / w.sum()  # targets: 60 % of the probability, amplitudes >= 0.1
    small = np.setdiff1d(np.arange(128), big)[:100]
    probs[small] = 0.004  # 40 % spread over amplitudes 0.063 < delta: they never count as targets
    x = np.sqrt(probs) * rng.choice([-1, 1], 128)
    delta = 0.07
    assert set(targets_above(x, delta)) == set(big)
    st = readout_trials(x, delta=delta, trials=1500, rng=np.random.default_rng(4))
    assert st.r == 10
    expected = _inclusion_exclusion(probs[big])  # unnormalised target weights (Poissonisation)
    assert st.expected == pytest.approx(expected, rel=1e-9)
    assert abs(st.mean - expected) < Z999 * st.sem
    assert st.magnitude_error < 0.03  # counts-based |x_i| estimates over the pooled shots


def test_magnitude_estimates_from_counts():
    counts = np.array([25, 0, 75])
    assert np.allclose(estimate_magnitudes(counts, 100), [0.5, 0.0, np.sqrt(0.75)])


def test_bad_inputs_raise_user_error():
    with pytest.raises(UserError, match="delta"):
        readout_trials(np.array([0.6, 0.8]), delta=0.9, trials=10, rng=np.random.default_rng(0))
    with pytest.raises(UserError, match="trials"):
        readout_trials(np.array([0.6, 0.8]), delta=0.1, trials=1, rng=np.random.default_rng(0))
    with pytest.raises(UserError, match="weights"):
        coupon_collector_expectation(np.array([0.5, 0.0]))
    with pytest.raises(UserError, match="probability zero"):
        sample_until_all_seen(np.array([1.0, 0.0]), np.array([1]), np.random.default_rng(0))
    with pytest.raises(UserError, match="zero"):
        readout_trials(np.zeros(4), delta=0.1, trials=5, rng=np.random.default_rng(0))
