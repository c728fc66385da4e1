"""Fig. 4 that can show its f-dependence: independent draws per (f, seed), an agreement rule over
seeds that a factor of 1.3 cannot pass, quartile bands, medians under the rounding floor left out,
and both lifts drawn where both were run.  The figure is tested by what it draws."""
from __future__ import annotations

import warnings
from fractions import Fraction
from itertools import product

import h5py
import numpy as np
import pytest

from conftest import run_cli
from hpcqml.carleman import generators as gen
from hpcqml.carleman import timestepping as ts
from hpcqml.carleman.cases import random_instance
from hpcqml.report import figures

SEEDS = 8


def test_median_interval_coverage_is_the_exact_binomial_one():
    """For 8 seeds the interval [x_(2), x_(7)] covers the median unless 0-1 or 7-8 of 8 samples lie below
    it: exact coverage by enumerating the 2^8 sign patterns (Fraction arithmetic) is 238/256."""
    med, lo, hi, cov = ts.median_interval(np.arange(1.0, 9.0))
    assert (med, lo, hi) == (4.5, 2.0, 7.0)
    inside = sum(1 for signs in product((0, 1), repeat=8) if 2 <= sum(signs) <= 6)
    assert Fraction(inside, 256) == Fraction(238, 256)
    assert cov == pytest.approx(238 / 256, abs=1e-15)


def test_agreement_rule_rejects_a_factor_of_one_point_three():
    pred = np.full(SEEDS, 0.01)
    rng = np.random.default_rng(0)
    scatter = 1.0 + 0.03 * rng.standard_normal(SEEDS)        # 3 % seed-to-seed scatter
    assert ts.rate_agreement(1.3 * pred * scatter, pred, 300)["verdict"] == "disagrees"
    assert ts.rate_agreement(2.0 * pred, pred, 300)["verdict"] == "disagrees"
    assert ts.rate_agreement(pred * scatter, pred, 300)["verdict"] == "agrees"
    # an interval straddling the band edge decides nothing
    wide = np.array([0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.4]) * 0.01
    assert ts.rate_agreement(wide, pred, 300)["verdict"] == "unresolved"
    # 150 steps at 0.002/step is 0.3 e-fold: the late-time regime is not reached
    r = ts.rate_agreement(pred * scatter / 5, pred / 5, 150)
    assert r["verdict"] == "horizon too short to tell" and r["efolds"] == pytest.approx(0.3)
    assert ts.rate_agreement(pred[:2], pred[:2], 300)["verdict"].startswith("not evaluated")
    # negative (decaying) rates compare by their ratio too
    assert ts.rate_agreement(-pred * scatter, -pred, 300)["verdict"] == "agrees"


def test_independent_draws_differ_per_fraction_and_shared_ones_are_nested():
    """With draws = independent the divergent Hessian eigenvalues of f = 0.75, 0.5, 0.25 (one seed) are
    separate draws; with shared draws the largest divergent rate coincides across f (the old figure)."""
    rho = {}
    for draws in ("independent", "shared"):
        for f in (0.75, 0.5, 0.25):
            ode = random_instance("random", 4, f, 3, eta=0.25, u_scale=0.01, div_range=0.05, draws=draws)
            a = np.linalg.eigvals(ode.F[1].toarray())
            rho[(draws, f)] = float(np.max(np.log(np.abs(1 + a))))
    assert len({round(rho[("independent", f)], 12) for f in (0.75, 0.5, 0.25)}) == 3
    assert rho[("shared", 0.75)] <= rho[("shared", 0.5)] <= rho[("shared", 0.25)]
    same = gen.random_quadratic(4, 0.5, 3, stream=gen.fraction_stream(0.5))
    np.testing.assert_array_equal(same.u_in, random_instance("random", 4, 0.5, 3, eta=1.0, u_scale=0.1,
                                                             draws="independent").u_in)


CONFIG = """
[run]
output = "{out}"
stages = ["qcm"]
[qcm]
generator = "random"
n = 2
f = [1.0, 0.5]
seeds = [{seeds}]
N = [1, 2]
T = 40
eta = 0.25
u_scale = 0.01
div_range = 0.05
N_ref = 4
step_sizes = []
kappa = false
lift = "both"
"""


@pytest.fixture(scope="module")
def fig4_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fig4")
    cfg = tmp / "fig4.toml"
    cfg.write_text(CONFIG.format(out=tmp / "fig4.h5", seeds=", ".join(str(s) for s in range(SEEDS))))
    res = run_cli("--quiet", "run", str(cfg), timeout=900)
    assert res.returncode == 0, res.stderr
    return tmp / "fig4.h5"


def _norms(case, key):
    v = np.linalg.norm(case[key][()], axis=1)
    return np.where(v == 0, np.nan, v)


def _stats(curves):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stack = np.vstack(curves)
        return np.nanmedian(stack, axis=0), np.nanpercentile(stack, 25, axis=0), np.nanpercentile(stack, 75, axis=0)


def _verdict(cases, N):
    fit, pred, window = [], [], 0
    for c in cases:
        i = list(c["rates/N"][()]).index(N)
        fit.append(c["rates/fitted"][()][i])
        pred.append(c["rates/predicted"][()][i])
        t0, t1 = c["rates"].attrs["late_window"]
        window = int(t1) - int(t0)
    return str(ts.rate_agreement(np.array(fit), np.array(pred), window)["verdict"]).split(" (")[0]


def test_fig4a_draws_quartiles_floor_masked_medians_and_both_lifts(fig4_file, tmp_path, drawn):
    with h5py.File(fig4_file, "r") as fh:
        figures.fig4a_error_vs_order(fh, tmp_path)
        cases = [fh[f"qcm/f1.000_seed{s}"] for s in range(SEEDS)]
        floor = np.median(np.vstack([c["floor"][()] for c in cases]), axis=0)
        want = {N: _stats([_norms(c, f"split/N_{N}/truncation") for c in cases]) for N in (1, 2)}
        exact = {N: _stats([_norms(c, f"discrete_N_{N}/eta1") for c in cases])[0] for N in (1, 2)}
        verdicts = {N: _verdict(cases, N) for N in (1, 2)}
    ax = drawn["fig4a_error_vs_order.png"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for N in (1, 2):
        (label,) = [k for k in lines if k.startswith(f"N = {N}:")]
        med, q1, q3 = want[N]
        drawn_y = np.asarray(lines[label].get_ydata(), dtype=np.float64)
        np.testing.assert_array_equal(drawn_y, np.where(med > floor, med, np.nan))
        assert label.endswith(verdicts[N]) and f"({SEEDS}/{SEEDS} seeds)" in label
        (dlabel,) = [k for k in lines if k.startswith(f"N = {N} discrete lift")]
        assert lines[dlabel].get_linestyle() == "-."
        np.testing.assert_array_equal(np.asarray(lines[dlabel].get_ydata(), dtype=np.float64),
                                      np.where(exact[N] > floor, exact[N], np.nan))
    # the band of N = 1 spans the quartiles, not the min-max range
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    med, q1, q3 = want[1]
    assert np.nanmax(band) == pytest.approx(np.nanmax(q3), rel=1e-12)
    assert np.nanmin(band[band > 0]) == pytest.approx(np.nanmin(q1[q1 > 0]), rel=1e-12)
    assert "quartile band" in ax.get_title() and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "time step t"


def test_fig4b_draws_each_fraction_with_its_own_verdict(fig4_file, tmp_path, drawn):
    with h5py.File(fig4_file, "r") as fh:
        figures.fig4b_error_vs_fraction(fh, tmp_path)
        want, verdicts = {}, {}
        for f in ("1.000", "0.500"):
            cases = [fh[f"qcm/f{f}_seed{s}"] for s in range(SEEDS)]
            floor = np.median(np.vstack([c["floor"][()] for c in cases]), axis=0)
            med = _stats([_norms(c, "split/N_2/truncation") for c in cases])[0]
            want[f] = np.where(med > floor, med, np.nan)
            verdicts[f] = _verdict(cases, 2)
    ax = drawn["fig4b_error_vs_fraction.png"].axes[0]
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert [ln.get_label().split(":")[0] for ln in solid] == ["f = 1, N = 2", "f = 0.5, N = 2"]
    for ln, f in zip(solid, ("1.000", "0.500"), strict=True):
        np.testing.assert_array_equal(np.asarray(ln.get_ydata(), dtype=np.float64), want[f])
        assert ln.get_label().endswith(verdicts[f])
    assert "quartile band" in ax.get_title()
