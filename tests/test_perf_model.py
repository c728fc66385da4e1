"""The spectrum-stage performance model of benchmarks/perf_model.py: its collective costs,
the fit of alpha and beta, and the shape of the projection."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.perf_model import Network, Workload, fit_alpha_beta, spectrum_seconds, step_seconds


def test_collectives_follow_the_ring_forms():
    net = Network(alpha=1e-6, beta=1e-9)
    assert net.allreduce(1e6, 1) == 0.0 and net.allgatherv(1e6, 1) == 0.0
    assert net.allreduce(1e6, 8) == pytest.approx(2 * 3 * 1e-6 + 2 * 7 / 8 * 1e6 * 1e-9)
    assert net.allgatherv(1e6, 4) == pytest.approx(2 * 1e-6 + 3 / 4 * 1e6 * 1e-9)


def test_fit_recovers_alpha_and_beta():
    sizes = np.array([8.0, 1e3, 1e5, 1e7])
    true = Network(alpha=3e-6, beta=2e-10)
    seconds = np.array([true.allreduce(x, 4) for x in sizes])
    got = fit_alpha_beta(sizes, seconds, 2.0, 4)
    assert got.alpha == pytest.approx(3e-6, rel=1e-6) and got.beta == pytest.approx(2e-10, rel=1e-6)


def test_one_rank_is_compute_and_reorthogonalisation_only():
    w = Workload("toy", n=1000, batch=64, steps=10, probes=2)
    parts = step_seconds(w, h=1e-3, net=Network(1e-6, 1e-9), ranks=1, mem_bw=1e9)
    assert parts["allreduce"] == parts["allgatherv"] == 0.0
    assert parts["compute"] == pytest.approx(0.064)
    assert parts["reorth"] == pytest.approx(1000 * 5.5 * 4 * 2 / 1e9)
    assert spectrum_seconds(w, 1e-3, Network(1e-6, 1e-9), 1, 1e9) == pytest.approx(20 * sum(parts.values()))


def test_efficiency_falls_as_communication_grows():
    w = Workload("resnet32-w4", 7_451_044, 2048)
    net = Network(2e-6, 1 / 20e9)
    h = 0.514 / 2048
    eff = [spectrum_seconds(w, h, net, 1) / (p * spectrum_seconds(w, h, net, p)) for p in (2, 8, 64, 1024)]
    assert all(a > b for a, b in zip(eff[:-1], eff[1:], strict=True))
    assert 0 < eff[-1] < 1 and math.isfinite(eff[0])


def test_two_rank_check_by_hand():
    """The 2-rank prediction: half the 1-rank time scaled by the two co-run factors, plus
    the alpha-beta cost of one product allreduce, one Allgatherv and the step's scalar
    reductions per product (worked out here term by term)."""
    from benchmarks.perf_model import two_rank_check

    net = Network(alpha=1e-6, beta=1e-9)
    r = two_rank_check(100.0, 60.0, products=10, n=1000, steps=9, batch_effect=0.9, corun=1.2, net=net)
    assert r["compute"] == pytest.approx(100.0 / 2 * 0.9 * 1.2)
    per_product = ((2 * 1e-6 + 4000 * 1e-9) + (1e-6 + 2000 * 1e-9)
                   + 2 * (2 * 1e-6 + 5 * 8 * 1e-9) + 4 * (2 * 1e-6 + 8 * 1e-9))
    assert r["communication"] == pytest.approx(10 * per_product)
    assert r["predicted efficiency"] == pytest.approx(100.0 / (2 * (54.0 + 10 * per_product)))
    assert r["measured efficiency"] == pytest.approx(100.0 / 120.0)
