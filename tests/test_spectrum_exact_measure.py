"""Spectral estimates against the exact spectral measure of each probe.

With ``k = n`` fully reorthogonalised Lanczos steps the Gauss quadrature of a probe ``z``
is the exact spectral measure of ``H`` seen from ``v = z/||z||``: atoms at the eigenvalues
``lambda_i`` with masses ``(q_i^T v)^2``. So on a matrix with a known eigen-decomposition
and no eigenvalue near a decision point, every estimate has an exact value, computed here
with numpy from ``eigh`` and the probes alone:

* negative mass (value = mean over probes of the mass below 0);
* Delta_+/Delta among ``|lambda| >= c`` (eq. II.28) and over all modes (eq. II.93);
* the error proxy E(t) (eq. III.12-III.13), pooled as a ratio of probe means.

This replaces range checks ("the negative mass lies in a window") by equalities.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.hessian.spectrum import Spectrum

N = 48
PROBES = 4
ETA = 0.3
CUTOFF = 0.4


@pytest.fixture(scope="module")
def exact():
    """Eigenvalues well away from 0, from +-CUTOFF and from 2/ETA and 2 (the decision points)."""
    rng = np.random.default_rng(21)
    lam = np.concatenate([rng.uniform(-3.0, -0.6, 12), rng.uniform(0.05, 0.3, 10), rng.uniform(-0.3, -0.05, 6),
                          rng.uniform(0.6, 1.8, 10), rng.uniform(2.3, 6.0, 6), rng.uniform(7.0, 9.0, 4)])
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    H = (q * lam) @ q.T
    lam, Q = np.linalg.eigh(H)
    zs = [rademacher_slice(N, 0, N, seed=9, probe=p) for p in range(PROBES)]
    masses = np.array([(Q.T @ z) ** 2 / (z @ z) for z in zs])      # (probes, N), rows sum to 1
    results = [lanczos(lambda v: torch.from_numpy(H) @ v, N, None, z, steps=N, reorth="full",
                       state_dtype=torch.float64, probe=p) for p, z in enumerate(zs)]
    spec = Spectrum.from_results(results, N)
    return {"lam": lam, "masses": masses, "spec": spec, "zs": zs, "H": H}


# Every quantity below is a finite sum of N float64 terms from a backward-stable eigensolver:
# errors ~ N eps ||H|| ~ 48 * 2.2e-16 * 9 ~ 1e-13 in the nodes and weights; 1e-9 is a margin
# that still fails on any change of a mass by one node (smallest mass here ~1e-5).
TOL = 1e-9


def test_negative_mass_is_the_exact_mass_below_zero(exact):
    want = exact["masses"][:, exact["lam"] < 0].sum(axis=1)
    est = exact["spec"].negative_mass()
    assert est.value == pytest.approx(want.mean(), abs=TOL)
    assert 0.2 < est.value < 0.6       # both signs carry mass: an always-true window is not the test


@pytest.mark.parametrize("convention", ["eta", "paper"])
def test_dissipative_fraction_is_the_exact_kept_ratio(exact, convention):
    lam, m = exact["lam"], exact["masses"]
    a = -ETA * lam if convention == "eta" else -lam
    plus = np.abs(1 + a) < 1
    kept = np.abs(lam) >= CUTOFF
    want = m[:, kept & plus].sum(axis=1).mean() / m[:, kept].sum(axis=1).mean()     # ratio of probe means
    est = exact["spec"].dissipative_fraction(convention, ETA, CUTOFF)
    assert est.value == pytest.approx(want, abs=TOL)
    want_all = m[:, plus].sum(axis=1).mean()                                         # eq. II.93, no cutoff
    assert exact["spec"].overlap_ii93(convention, ETA).value == pytest.approx(want_all, abs=TOL)
    assert abs(want - want_all) > 1e-3          # the cutoff matters for this spectrum


@pytest.mark.parametrize("t", [0, 1, 5, 20])
def test_error_proxy_is_the_exact_kept_average(exact, t):
    lam, m = exact["lam"], exact["masses"]
    kept = np.abs(lam) >= CUTOFF
    g = np.abs(1 - ETA * lam)
    want = (m[:, kept] * g[kept] ** t).sum(axis=1).mean() / m[:, kept].sum(axis=1).mean()
    assert exact["spec"].error_proxy(t, "eta", ETA, CUTOFF).value == pytest.approx(want, rel=TOL)


def test_trace_is_the_mean_quadratic_form(exact):
    want = np.mean([z @ exact["H"] @ z for z in exact["zs"]])
    assert exact["spec"].trace().value == pytest.approx(want, rel=1e-12)


def test_mode_convention_defaults_and_refusals():
    """``modes`` defaults to the paper's a = -lambda (eq. II.65 with eta only when asked) and
    refuses a non-positive learning rate with a one-line error naming it."""
    from hpcqml.errors import UserError
    from hpcqml.hessian.proxy import modes

    lam = np.array([-1.5, 0.0, 2.0])
    np.testing.assert_array_equal(modes(lam), -lam)
    np.testing.assert_array_equal(modes(lam, "eta"), -0.01 * lam)      # the documented default eta
    for bad in (0.0, -0.1):
        with pytest.raises(UserError, match=rf"^error proxy eta = {bad}: must be > 0$"):
            modes(lam, "eta", bad)


def test_proxy_kernel_defaults_boundaries_and_padding():
    """Eq. III.12-III.13 on a hand-made measure: the cutoff keeps |lambda| >= c (a node exactly at
    c is kept), NaN-padded entries and zero masses are left out, and the defaults are the paper's
    (c = 0.4, a = -lambda)."""
    from hpcqml.hessian.proxy import dissipation, error_proxy, log_error_proxy

    lam = np.array([0.4, 1.5, -0.5, 0.1, np.nan, 3.0])
    mass = np.array([0.2, 0.3, 0.1, 0.3, 0.1, np.nan])
    t = np.array([0.0, 1.0, 3.0])
    kept_lam, kept_mass = np.array([0.4, 1.5, -0.5]), np.array([0.2, 0.3, 0.1])   # by hand
    want = np.array([np.sum(kept_mass * np.abs(1 - kept_lam) ** tt) / kept_mass.sum() for tt in t])
    np.testing.assert_allclose(error_proxy(lam, mass, t), want, rtol=1e-13)        # defaults: c = 0.4, paper
    np.testing.assert_allclose(log_error_proxy(lam, mass, t), np.log(want), rtol=1e-13, atol=1e-14)
    # dissipative (|1 - lambda| < 1, i.e. 0 < lambda < 2) among the kept: 0.4 and 1.5 of 0.6 total
    assert dissipation(lam, mass).fraction == pytest.approx(0.5 / 0.6, rel=1e-13)
    # only zero mass beyond the cutoff: nothing is kept
    assert np.all(np.isnan(log_error_proxy(np.array([1.0, 0.1]), np.array([0.0, 1.0]), t)))
    assert np.isnan(dissipation(np.array([1.0, 0.1]), np.array([0.0, 1.0])).fraction)


def test_proxy_kernel_errors_are_one_line_and_name_the_cause():
    from hpcqml.errors import UserError
    from hpcqml.hessian.proxy import error_proxy, modes

    with pytest.raises(UserError, match=r"^error proxy convention = 'other': not one of paper, eta$"):
        modes(np.ones(2), "other")
    with pytest.raises(UserError, match=r"^eigenvalues \(3\) and masses \(2\) differ in length$"):
        error_proxy(np.ones(3), np.ones(2), np.zeros(1))
    with pytest.raises(UserError, match=r"^error proxy cutoff = -0.1: must be >= 0$"):
        error_proxy(np.ones(2), np.ones(2), np.zeros(1), cutoff=-0.1)


def test_proxy_kernel_eta_default_and_grid_masses():
    from hpcqml.errors import UserError
    from hpcqml.hessian.proxy import error_proxy, grid_masses, log_error_proxy

    lam, mass, t = np.array([50.0, -80.0, 150.0]), np.array([0.5, 0.3, 0.2]), np.array([2.0, 7.0])
    want = np.array([np.sum(mass * np.abs(1 - 0.01 * lam) ** tt) for tt in t])    # eta = 0.01, all kept
    np.testing.assert_allclose(error_proxy(lam, mass, t, convention="eta"), want, rtol=1e-13)
    np.testing.assert_allclose(log_error_proxy(lam, mass, t, convention="eta"), np.log(want), rtol=1e-13)
    # Riemann masses rho_k * dlambda; two points are enough, one is refused
    np.testing.assert_allclose(grid_masses(np.array([1.0, 1.5]), np.array([0.4, 2.0])), [0.2, 1.0], rtol=1e-15)
    with pytest.raises(UserError, match=r"^density grid needs at least 2 points$"):
        grid_masses(np.array([1.0]), np.array([1.0]))


@pytest.mark.parametrize("fraction, r_plus, r_minus, want", [
    (0.6, 0.5, 2.0, np.log(0.4 / 0.6) / np.log(0.25)),   # eq. II.34 by hand: 0.2925 steps
    (1.0, 0.5, 2.0, np.inf),                             # no divergent modes
    (0.6, 0.5, np.nan, np.inf),                          # no divergent modes (no r_-)
    (0.0, 0.5, 2.0, 0.0),                                # no dissipative modes
    (0.6, np.nan, 2.0, 0.0),                             # no dissipative modes (no r_+)
    (0.3, 1.0, 1.0, 0.0),                                # r_+ = r_-: more divergent, no admissible T
    (0.7, 1.0, 1.0, np.inf),                             # r_+ = r_-: more dissipative, no limit
    (0.3, 0.5, 2.0, 0.0),                                # Delta_- >= Delta_+: clipped at 0
])
def test_time_limit_values_and_edges(fraction, r_plus, r_minus, want):
    from hpcqml.hessian.proxy import time_limit

    assert time_limit(fraction, r_plus, r_minus) == pytest.approx(want, rel=1e-14)


def test_dissipation_eta_default():
    from hpcqml.hessian.proxy import dissipation

    lam, mass = np.array([50.0, 150.0, 250.0]), np.array([0.5, 0.3, 0.2])
    # a = -0.01 lambda: |1 + a| = 0.5, 0.5, 1.5 -> dissipative mass 0.8 (eq. II.28)
    assert dissipation(lam, mass, cutoff=0.0, convention="eta").fraction == pytest.approx(0.8, rel=1e-14)


def test_dissipation_with_only_dissipative_modes():
    """No divergent mode: r_- is undefined (NaN) and the time limit of eq. II.34 is infinite."""
    from hpcqml.hessian.proxy import dissipation

    d = dissipation(np.array([0.5, 1.0]), np.array([0.25, 0.75]), cutoff=0.0, convention="paper")
    assert d.fraction == 1.0 and np.isnan(d.r_minus) and d.time_limit == np.inf
    # r_+ = mass-weighted geometric mean of |1 + a| = 0.5 and 0: the zero factor makes it 0
    assert d.r_plus == 0.0
