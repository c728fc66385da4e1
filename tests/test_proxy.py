"""Error proxy (eq. III.10-III.13), dissipation (II.28, II.34), fidelity (II.92, II.93), density."""
from __future__ import annotations

import numpy as np
import pytest

from hpcqml.errors import UserError
from hpcqml.hessian.density import gaussian_density, kernel_width
from hpcqml.hessian.proxy import dissipation, error_proxy, grid_masses, log_error_proxy, modes, time_limit

# eigenvalues 0.5 (mass 0.56), -0.6 (0.24) and 0.1 (0.2, removed by the 0.4 cutoff)
LAM = np.array([0.5, -0.6, 0.1])
W = np.array([0.56, 0.24, 0.2])


def exact_proxy(t: np.ndarray) -> np.ndarray:
    # kept mass 0.8 renormalised: 0.7 at a = -0.5 (|1+a| = 0.5), 0.3 at a = 0.6 (|1+a| = 1.6)
    return 0.7 * 0.5 ** t + 0.3 * 1.6 ** t


def test_proxy_from_nodes_is_exact():
    t = np.arange(0, 60, dtype=float)
    assert np.allclose(error_proxy(LAM, W, t), exact_proxy(t), rtol=1e-12)
    assert error_proxy(LAM, W, np.array(0.0)) == pytest.approx(1.0)


def test_proxy_without_cutoff_is_eq_iii10():
    t = np.arange(0, 10, dtype=float)
    full = 0.56 * 0.5 ** t + 0.24 * 1.6 ** t + 0.2 * 0.9 ** t
    assert np.allclose(error_proxy(LAM, W, t, cutoff=0.0), full, rtol=1e-12)


def test_proxy_on_grid_matches_nodes():
    dens = gaussian_density(LAM, W, points=256, width_factor=0.002)
    t = np.arange(0, 20, dtype=float)
    grid = error_proxy(dens.grid, grid_masses(dens.grid, dens.rho), t)
    assert np.allclose(grid, exact_proxy(t), rtol=2e-2)


def test_eta_convention_and_large_t_log_space():
    t = np.array([0.0, 1.0, 5000.0])
    out = log_error_proxy(LAM, W, t, convention="eta", eta=0.1)
    # a = -0.1 lambda: kept |1 + a| = 0.95 (0.7) and 1.06 (0.3)
    ref = np.log(0.7 * 0.95 ** t[:2] + 0.3 * 1.06 ** t[:2])
    assert np.allclose(out[:2], ref, rtol=1e-12)
    assert out[2] == pytest.approx(np.log(0.3) + 5000 * np.log(1.06), rel=1e-12)
    assert np.isinf(error_proxy(LAM, W, t)[2])  # overflows, while the log stays finite
    assert np.allclose(modes(np.array([2.0]), "eta", 0.5), [-1.0])


def test_no_mass_beyond_cutoff_gives_nan():
    assert np.all(np.isnan(error_proxy(np.array([0.1, -0.2]), np.array([0.5, 0.5]), np.arange(3.0))))


def test_bad_convention_is_user_error():
    with pytest.raises(UserError, match="convention"):
        error_proxy(LAM, W, np.arange(2.0), convention="other")
    with pytest.raises(UserError, match="cutoff"):
        error_proxy(LAM, W, np.arange(2.0), cutoff=-1.0)


def test_dissipation_and_time_limit_eq_ii34():
    d = dissipation(LAM, W)
    assert d.fraction == pytest.approx(0.7)
    assert d.r_plus == pytest.approx(0.5) and d.r_minus == pytest.approx(1.6)
    T = np.log(0.3 / 0.7) / np.log(0.5 / 1.6)
    assert d.time_limit == pytest.approx(T)
    # at T_lim the two sides of eq. II.33 are equal
    assert (0.5 / 1.6) ** d.time_limit == pytest.approx(0.3 / 0.7)
    assert time_limit(1.0, 0.5, float("nan")) == np.inf
    assert time_limit(0.4, 0.5, 1.6) == 0.0  # more divergent than dissipative modes
    d_all = dissipation(LAM, W, cutoff=0.0)  # lambda = 0.1 -> |1 + a| = 0.9, dissipative
    assert d_all.fraction == pytest.approx(0.76)


def test_spectral_ii93_is_the_count_ratio_of_eq_ii93():
    """Equal-weight nodes: the spectral eq. II.93 estimate equals Delta_+/Delta of the
    Carleman-side definition (counts), and eq. II.92 tends to it as a_+ -> 0^-."""
    from hpcqml.hessian.spectrum import Spectrum
    from hpcqml.modes import overlap_ii92, overlap_ii93

    lam = np.array([[0.5, 1.0, 1.5, -0.2, 0.3, 1.9, 2.5, 0.1, -1.0, 0.7]] * 3)  # 7 of 10 in (0, 2)
    spec = Spectrum(n=10, nodes=lam, weights=np.full(lam.shape, 0.1), residuals=np.zeros(lam.shape),
                    quad_forms=np.zeros(3), probes=np.arange(3), steps=np.full(3, 10), breakdown=np.zeros(3, bool))
    assert spec.overlap_ii93("paper").value == pytest.approx(overlap_ii93(7, 10))
    assert overlap_ii92(7, 10, -1e-12, 50) == pytest.approx(spec.overlap_ii93("paper").value, rel=1e-9)


def test_density_width_rule_and_normalisation():
    x = np.array([-1.0, 0.0, 0.0, 3.0])
    w = np.array([0.1, 0.4, 0.3, 0.2])
    d = gaussian_density(x, w, points=256, width_factor=0.01)
    assert d.sigma == pytest.approx(0.04) == kernel_width(-1.0, 3.0)
    assert d.grid.size == 256
    assert d.grid[0] == pytest.approx(-1.0 - 5 * d.sigma) and d.grid[-1] == pytest.approx(3.0 + 5 * d.sigma)
    assert np.trapz(d.rho, d.grid) == pytest.approx(1.0, abs=1e-3)
    mean = np.trapz(d.rho * d.grid, d.grid)
    assert mean == pytest.approx(np.sum(w * x), abs=1e-3)
    single = gaussian_density(np.array([2.0]), np.array([1.0]), points=64)
    assert single.sigma == 1e-6 and np.all(np.isfinite(single.rho))
    with pytest.raises(UserError, match="node"):
        gaussian_density(np.array([]), np.array([]))
