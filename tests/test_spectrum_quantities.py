"""The public Spectrum/slq API against exact computations on small explicit matrices."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from hpcqml.hessian.lanczos import Interrupted, lanczos, rademacher_slice
from hpcqml.hessian.slq import ProbesInterrupted, probe_groups, run_probes
from hpcqml.hessian.slq import slq
from hpcqml.hessian.spectrum import UNKNOWN, Estimate, Spectrum

torch.set_num_threads(1)


class Dense:
    """A symmetric matrix as an operator with ``n`` and ``matvec``."""

    def __init__(self, A: np.ndarray) -> None:
        self.A = torch.from_numpy(A)
        self.n = A.shape[0]
        self.products = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.A @ v


class Shaped:
    """The same with only a ``shape`` attribute."""

    def __init__(self, A: np.ndarray) -> None:
        self.A = torch.from_numpy(A)
        self.shape = A.shape

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.A @ v


def symmetric(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    A = (Q * eigenvalues) @ Q.T
    return 0.5 * (A + A.T)


def from_measure(nodes: list[list[float]], weights: list[list[float]], residuals=None, **kw) -> Spectrum:
    """A spectrum with given per-probe nodes/weights (residual bounds 0 unless given)."""
    x = np.array(nodes, dtype=np.float64)
    w = np.array(weights, dtype=np.float64)
    r = np.zeros_like(x) if residuals is None else np.array(residuals, dtype=np.float64)
    nv = x.shape[0]
    return Spectrum(n=x.shape[1], nodes=x, weights=w, residuals=r, quad_forms=np.zeros(nv),
                    probes=np.arange(nv), steps=np.full(nv, x.shape[1]), breakdown=np.zeros(nv, bool), **kw)


def test_slq_against_eigh():
    """Full Lanczos (m = n) on a 12 x 12 matrix: the Ritz values are its eigenvalues (1e-9),
    the Gauss weights the squared eigenvector components of v = z/||z|| (1e-9), the quadratic
    forms z^T A z (1e-10 relative)."""
    ev = np.array([-2.0, -1.1, -0.3, 0.05, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 3.0, 4.2])
    A = symmetric(ev)
    w_ev, Q = np.linalg.eigh(A)
    spec = slq(Dense(A), probes=3, steps=12, seed=4)
    assert spec.nodes.shape == (3, 12) and spec.probe_count == 3
    for row in range(3):
        z = rademacher_slice(12, 0, 12, seed=4, probe=row)
        np.testing.assert_allclose(spec.nodes[row], w_ev, atol=1e-9)
        np.testing.assert_allclose(spec.weights[row], (Q.T @ z) ** 2 / 12, atol=1e-9)
        assert spec.quad_forms[row] == pytest.approx(z @ A @ z, rel=1e-10)
    assert spec.trace().value == pytest.approx(np.mean(spec.quad_forms), rel=1e-12)
    (lmin, _), (lmax, _) = spec.extremes()
    assert lmin == pytest.approx(ev.min(), abs=1e-9) and lmax == pytest.approx(ev.max(), abs=1e-9)
    # shape (n, n) instead of n; probe numbers instead of a count
    other = slq(Shaped(A), probes=[2], steps=12, seed=4)
    np.testing.assert_allclose(other.nodes[0], spec.nodes[2], atol=1e-12)


def test_slq_refuses_more_steps_than_n():
    with pytest.raises(ValueError, match="operator size n = 5"):
        slq(Dense(np.eye(5)), probes=1, steps=6)
    with pytest.raises(ValueError, match="int attribute n or a square shape"):
        slq(object(), probes=1, steps=1)


def test_proxy_both_conventions_closed_form():
    """Eigenvalues 0.5 (0.56), -0.6 (0.24), 0.1 (0.2, removed by the cutoff 0.4), eta = 0.1:
    paper: kept 0.7 at |1 - 0.5| and 0.3 at |1 + 0.6|; eta: 0.7 at 0.95 and 0.3 at 1.06."""
    spec = from_measure([[0.5, -0.6, 0.1]] * 3, [[0.56, 0.24, 0.2]] * 3)
    for t in (0, 1, 10, 100):
        paper = spec.error_proxy(t, convention="paper", cutoff=0.4)
        eta = spec.error_proxy(t, convention="eta", eta=0.1, cutoff=0.4)
        assert paper.value == pytest.approx(0.7 * 0.5 ** t + 0.3 * 1.6 ** t, rel=1e-12)
        assert eta.value == pytest.approx(0.7 * 0.95 ** t + 0.3 * 1.06 ** t, rel=1e-12)
        assert paper.stderr == pytest.approx(0.0, abs=1e-9 * paper.value)  # identical probes
    log_e, se = spec.log_error_proxy(np.array([0.0, 10.0]), convention="eta", eta=0.1)
    assert np.allclose(log_e, np.log([1.0, 0.7 * 0.95 ** 10 + 0.3 * 1.06 ** 10]), rtol=1e-12)
    assert spec.dissipative_fraction("paper", cutoff=0.4).value == pytest.approx(0.7)
    assert spec.dissipative_fraction("eta", eta=0.1, cutoff=0.4).value == pytest.approx(0.7)
    # eq. II.93 over all modes: lambda = 0.1 is dissipative too (|1 - 0.1| < 1)
    assert spec.fidelity_ii93("paper").value == pytest.approx(0.76)
    # lambda = 3 diverges for a = -lambda (|1 - 3| = 2) but not for eta = 0.1
    big = from_measure([[3.0, -0.6]] * 3, [[0.5, 0.5]] * 3)
    assert big.dissipative_fraction("paper").value == pytest.approx(0.0)
    assert big.dissipative_fraction("eta", eta=0.1).value == pytest.approx(0.5)
    with pytest.raises(ValueError, match="eta"):
        spec.error_proxy(1, convention="eta")


def test_unresolved_node_is_marked():
    """A node at 0.004 with residual 0.05 carrying 90 % of the mass: its sign is unknown.
    The negative mass and eq. II.93 can be anywhere between 0.05 and 0.95 whichever side of
    zero its eigenvalue lies, so they are unresolved and print that range."""
    nodes = [[-0.8, 0.004, 1.5]] * 3
    weights = [[0.05, 0.9, 0.05]] * 3
    spec = from_measure(nodes, weights, residuals=[[1e-6, 0.05, 1e-6]] * 3)
    neg = spec.negative_mass()
    assert neg.value == pytest.approx(0.05)        # only the resolved negative node counts
    assert not neg.resolved and neg.ambiguous_mass == pytest.approx(0.9)
    assert (neg.res_low, neg.res_high) == pytest.approx((0.05, 0.95))
    assert neg.text() == "unresolved (0.05–0.95)"
    assert spec.resolved_nodes()[0].tolist() == [True, False, True]
    # eq. II.93 (no cutoff) is decided by that node too; the proxy with a cutoff is not
    fid = spec.fidelity_ii93("eta", eta=0.1)
    assert not fid.resolved and (fid.res_low, fid.res_high) == pytest.approx((0.05, 0.95))
    proxy = spec.error_proxy(10, convention="eta", eta=0.1, cutoff=0.4)
    # its bracket comes only from the kept nodes' residuals (1e-6): a few parts in 1e6
    assert proxy.resolved and proxy.res_low <= proxy.value <= proxy.res_high
    assert proxy.res_high - proxy.res_low < 1e-5 * proxy.value
    # the same node resolved (tiny residual): the negative mass is a number
    ok = from_measure(nodes, weights, residuals=[[1e-6, 1e-4, 1e-6]] * 3)
    assert ok.negative_mass().resolved and ok.negative_mass().value == pytest.approx(0.05)
    # a threshold delta above the residuals
    assert ok.negative_mass(delta=1.0).value == pytest.approx(0.0)


def test_hutchinson_standard_error_matches_theory():
    """Rademacher probes: Var(z^T H z) = 2 sum_{i != j} H_ij^2.  With 1500 probes the
    jackknife standard error is within 10 % of sqrt(Var / n_v) (its own sampling error is
    about 2-3 %), the mean within 4 standard errors of tr(H), and the 95 % bootstrap
    interval about 2 x 1.96 standard errors wide (within 15 %)."""
    rng = np.random.default_rng(3)
    B = rng.standard_normal((8, 8))
    H = 0.5 * (B + B.T)
    nv = 1500
    spec = slq(Dense(H), probes=nv, steps=1, seed=11, bootstrap=2000)
    off = H - np.diag(np.diag(H))
    theory = np.sqrt(2.0 * np.sum(off ** 2) / nv)
    tr = spec.trace()
    assert tr.stderr == pytest.approx(theory, rel=0.10)
    assert abs(tr.value - np.trace(H)) <= 4 * theory
    assert tr.ci_high - tr.ci_low == pytest.approx(2 * 1.96 * tr.stderr, rel=0.15)
    assert tr.ci_low < tr.value < tr.ci_high and tr.resolved
    assert len(tr.per_probe) == nv


def test_fewer_than_three_probes_uncertainty_unknown():
    spec = slq(Dense(symmetric(np.linspace(-1, 2, 10))), probes=2, steps=10, seed=0)
    for est in (spec.trace(), spec.negative_mass(), spec.dissipative_fraction("paper"),
                spec.error_proxy(10, "eta", eta=0.1)):
        assert np.isnan(est.stderr) and np.isnan(est.ci_low) and est.note == UNKNOWN
        # "± unknown", then the resolution bracket where an ambiguous node gives it a width
        assert est.resolved and " ± unknown" in est.text()
    assert np.all(np.isnan(spec.log_error_proxy(np.arange(3.0), "eta", eta=0.1)[1]))


def test_jackknife_of_a_ratio_and_grid_width():
    """Dissipative fraction from probes with different measures: the value is the ratio
    of probe means, the standard error the jackknife one (computed here by hand)."""
    nodes = [[0.5, -0.6, 1.0], [0.7, -0.5, 2.5], [0.9, -1.0, 0.45], [0.6, -0.7, 3.0]]
    weights = [[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4]]
    spec = from_measure(nodes, weights)
    x, w = np.array(nodes), np.array(weights)
    plus = np.where((x > 0) & (x < 2.0), w, 0).sum(axis=1)   # a = -lambda: dissipative iff 0 < lambda < 2
    est = spec.dissipative_fraction("paper", cutoff=0.4)
    assert est.value == pytest.approx(plus.mean())
    loo = np.array([np.delete(plus, i).mean() for i in range(4)])
    assert est.stderr == pytest.approx(np.sqrt(3 / 4 * np.sum((loo - loo.mean()) ** 2)), rel=1e-12)
    assert est.per_probe == pytest.approx(tuple(plus))
    # from the grid with a narrow kernel: close to the nodes; wider kernels smear mass across 0
    narrow = spec.dissipative_fraction("paper", cutoff=0.4, source="grid", width_factor=0.002)
    assert narrow.value == pytest.approx(est.value, abs=0.01)
    dens = spec.density(256, 0.01)
    grid, masses = spec.grid_masses(0.01, 256)
    np.testing.assert_allclose(masses.mean(axis=0), dens.rho * (grid[1] - grid[0]), rtol=1e-12)


def test_hdf5_round_trip(tmp_path):
    spec = slq(Dense(symmetric(np.linspace(-1, 2, 10))), probes=3, steps=4, seed=1, bootstrap=50)
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        spec.to_hdf5(fh.create_group("s"), units="nat")
    with h5py.File(tmp_path / "s.h5", "r") as fh:
        g = fh["s"]
        assert all(g[k].attrs["units"] and g[k].attrs["description"] for k in g)
        assert g["nodes"].attrs["units"] == "nat"
        back = Spectrum.from_hdf5(g)
    np.testing.assert_array_equal(back.nodes, spec.nodes)
    assert back.bootstrap == 50 and back.trace() == spec.trace()


def test_interrupt_between_steps_and_between_rounds():
    A = symmetric(np.linspace(-1, 2, 20))
    op = Dense(A)
    z = rademacher_slice(20, 0, 20, seed=0, probe=0)
    with pytest.raises(Interrupted, match="after Lanczos step 3 of 10"):
        lanczos(op.matvec, 20, None, z, steps=10, state_dtype=torch.float64,
                interrupt=lambda: op.products >= 3)
    calls = []
    seen: list[int] = []

    def stop(comm: object) -> bool:
        calls.append(comm)
        return len(seen) >= 1   # stop once the first probe was handed over

    with pytest.raises(ProbesInterrupted) as info:
        run_probes(op.matvec, 20, probe_groups(None, 1), [0, 1, 2], seed=0, steps=5,
                   state_dtype=torch.float64, on_round=lambda done: seen.extend(r.probe for r in done),
                   should_stop=stop)
    assert info.value.done == [0] and info.value.remaining == [1, 2] and seen == [0]


def test_estimate_text():
    assert Estimate(1.23456, 0.012, 1.2, 1.26).text() == "1.235 ± 0.012"
    assert Estimate(1.0, float("nan"), float("nan"), float("nan"), note=UNKNOWN).text() == "1 ± unknown"
    assert Estimate(1.0, 0.1, 0.9, 1.1, resolved=False).text() == "unresolved (1–1)"
    assert Estimate(0.5, 0.01, 0.48, 0.52, res_low=0.45, res_high=0.52).text() == "0.5 ± 0.01 [res 0.45–0.52]"
    assert Estimate(0.5, 0.01, 0.48, 0.52, resolved=False, res_low=0.0, res_high=0.9).text() == "unresolved (0–0.9)"
    assert Estimate(2.0, float("nan"), float("nan"), float("nan"), res_low=1.9, res_high=2.1).text() \
        == "2 ± unknown [res 1.9–2.1]"


# -- resolution brackets ------------------------------------------------------------------

#: four probes, each with one heavy node near zero whose residual interval straddles 0
HEAVY_NODES = [[0.003, 0.6, 1.2, 2.5, -0.7], [-0.002, 0.5, 1.4, 2.2, -0.9],
               [0.001, 0.45, 1.1, 3.0, -0.5], [-0.004, 0.7, 1.3, 2.8, -0.6]]
HEAVY_WEIGHTS = [[0.92, 0.03, 0.02, 0.02, 0.01], [0.95, 0.02, 0.01, 0.01, 0.01],
                 [0.90, 0.04, 0.03, 0.02, 0.01], [0.94, 0.02, 0.02, 0.01, 0.01]]
HEAVY_RESIDUALS = [[0.3, 0.01, 0.02, 0.01, 0.01], [0.25, 0.01, 0.01, 0.02, 0.01],
                   [0.35, 0.02, 0.01, 0.01, 0.02], [0.28, 0.01, 0.02, 0.01, 0.01]]


def heavy_spectrum(residuals=HEAVY_RESIDUALS, **kw) -> Spectrum:
    return from_measure(HEAVY_NODES, HEAVY_WEIGHTS, residuals, **kw)


def brute_force_proxy_bracket(t: float, k: float, cutoff: float, residuals=HEAVY_RESIDUALS,
                              points: int = 200001) -> tuple[float, float]:
    """E(t) bracket by brute force: every kept node's term w |1 - k lambda|^t evaluated on a
    dense grid over its interval (ends included), min/max per node, summed per probe, pooled as
    mean over probes of the kept sums divided by the mean kept mass."""
    x, w, r = (np.array(a, dtype=np.float64) for a in (HEAVY_NODES, HEAVY_WEIGHTS, residuals))
    low, high, den = np.zeros(len(x)), np.zeros(len(x)), np.zeros(len(x))
    for p in range(len(x)):
        for i in range(x.shape[1]):
            if abs(x[p, i]) < cutoff:
                continue
            den[p] += w[p, i]
            a, b = x[p, i] - r[p, i], x[p, i] + r[p, i]
            terms = w[p, i] * np.abs(1 - k * np.linspace(a, b, points)) ** t
            low[p] += terms.min()
            high[p] += terms.max()
    return low.mean() / den.mean(), high.mean() / den.mean()


def test_heavy_ambiguous_node_decides_the_negative_mass():
    """(a) The heavy node near 0 (90-95 % of each probe, residual 10-100x its distance from 0)
    may be on either side: the negative mass (0.01, the resolved node at -0.5..-0.9) could be
    up to 0.01 + its mean weight."""
    spec = heavy_spectrum()
    neg = spec.negative_mass()
    heavy = np.mean([w[0] for w in HEAVY_WEIGHTS])
    assert neg.value == pytest.approx(0.01, abs=1e-12)
    assert (neg.res_low, neg.res_high) == pytest.approx((0.01, 0.01 + heavy), abs=1e-12)
    assert not neg.resolved and neg.ambiguous_mass == pytest.approx(heavy)
    assert neg.text("{:.3f}") == f"unresolved (0.010–{0.01 + heavy:.3f})"


def test_heavy_ambiguous_node_does_not_decide_the_eta_proxy():
    """(b) With a = -eta lambda, eta = 0.01 and no cutoff, the heavy node's term
    |1 - 0.01 lambda|^10 moves by about 6 % over lambda in theta +- r: E(10) is resolved, and
    its bracket equals the brute-force extremes (1e-9)."""
    spec = heavy_spectrum()
    est = spec.error_proxy(10, convention="eta", eta=0.01, cutoff=0.0)
    lo, hi = brute_force_proxy_bracket(10, 0.01, 0.0)
    assert (est.res_low, est.res_high) == pytest.approx((lo, hi), rel=1e-9)
    assert est.res_low < est.value < est.res_high and est.res_high - est.res_low < 0.1 * est.value
    assert est.resolved and est.text().endswith(f"[res {lo:.4g}–{hi:.4g}]")
    # a tighter relative tolerance makes the same bracket too wide
    assert not heavy_spectrum(resolution_rel=0.01).error_proxy(10, convention="eta", eta=0.01, cutoff=0.0).resolved
    # the negative mass of the same spectrum stays unresolved: the node decides it, not E(10)
    assert not spec.negative_mass().resolved


def test_proxy_bracket_where_a_term_can_vanish():
    """Paper convention (k = 1): the node at 0.6 of probe 0 gets residual 0.7, so its interval
    [-0.1, 1.3] holds 0 (it is ambiguous) and lambda = 1, where its term |1 - lambda|^t is 0
    (not at an end of the interval).  The bracket equals the brute force at t = 3 and t = 10."""
    residuals = [list(row) for row in HEAVY_RESIDUALS]
    residuals[0][1] = 0.7
    spec = heavy_spectrum(residuals)
    for t in (3, 10):
        est = spec.error_proxy(t, convention="paper", cutoff=0.0)
        lo, hi = brute_force_proxy_bracket(t, 1.0, 0.0, residuals)
        assert (est.res_low, est.res_high) == pytest.approx((lo, hi), rel=1e-9, abs=1e-15)


def test_ambiguous_node_with_most_of_the_kept_mass_decides_the_dissipative_fraction():
    """(c) Cutoff 0.4: kept are 0.5 (r = 0.6, straddles 0, 0.10 of the mass), 1.0 and -0.8
    (0.02 each).  Delta+/Delta (a = -eta lambda) is 1/7 if the node's eigenvalue is negative and
    6/7 if positive: unresolved; the grid estimates carry the nodes' flag."""
    nodes = [[0.5, 1.0, -0.8, 0.0]] * 3
    weights = [[0.10, 0.02, 0.02, 0.86]] * 3
    spec = from_measure(nodes, weights, residuals=[[0.6, 0.01, 0.01, 0.001]] * 3)
    frac = spec.dissipative_fraction("eta", eta=0.01, cutoff=0.4)
    assert frac.value == pytest.approx(12 / 14)
    assert (frac.res_low, frac.res_high) == pytest.approx((2 / 14, 12 / 14))
    assert not frac.resolved and frac.ambiguous_mass == pytest.approx(10 / 14)
    grid = spec.dissipative_fraction("eta", eta=0.01, cutoff=0.4, source="grid", width_factor=0.002)
    assert not grid.resolved and grid.res_high - grid.res_low == pytest.approx(10 / 14, abs=1e-9)
    # the same node with a residual below its distance from 0: nothing ambiguous, resolved
    sharp = from_measure(nodes, weights, residuals=[[0.1, 0.01, 0.01, 0.001]] * 3)
    est = sharp.dissipative_fraction("eta", eta=0.01, cutoff=0.4)
    assert est.resolved and est.res_low == est.res_high == est.value
    # a small ambiguous node within the absolute tolerance (resolution_mass) stays resolved
    small = from_measure([[0.5, 1.0, -0.8, 0.0]] * 3, [[0.002, 0.09, 0.048, 0.86]] * 3,
                         residuals=[[0.6, 0.01, 0.01, 0.001]] * 3)
    est = small.dissipative_fraction("eta", eta=0.01, cutoff=0.4)
    assert est.res_high - est.res_low == pytest.approx(0.002 / 0.14) and est.resolved


def test_bracket_survives_hdf5_and_the_stage_writer(tmp_path):
    """(d) Spectrum.to_hdf5/from_hdf5 keeps the settings, so the bracket is the same after a
    round trip; the spectrum stage stores it as NAME_resolution, which the report prints."""
    from hpcqml.report.build import _estimate_text
    from hpcqml.stages.spectrum import _write_estimate

    spec = heavy_spectrum(resolution_rel=0.2, resolution_mass=0.03, bootstrap=50)
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        spec.to_hdf5(fh.create_group("s"), units="nat")
        est = fh.create_group("estimates")
        _write_estimate(est, "negative_mass", spec.negative_mass(), "1", "negative mass")
        _write_estimate(est, "error_proxy_t10", spec.error_proxy(10, "eta", eta=0.01, cutoff=0.0), "1", "E(10)")
    with h5py.File(tmp_path / "s.h5", "r") as fh:
        back = Spectrum.from_hdf5(fh["s"])
        e = fh["estimates"]
        neg, proxy = e["negative_mass_resolution"], e["error_proxy_t10_resolution"]
        assert neg.attrs["units"] == "1" and "ambiguous node" in neg.attrs["description"]
        stored = (tuple(neg[()]), tuple(proxy[()]))
        texts = (_estimate_text(e, "negative_mass", "{:.3f}"), _estimate_text(e, "error_proxy_t10"))
    assert (back.resolution_rel, back.resolution_mass) == (0.2, 0.03)
    proxy_kw = dict(convention="eta", eta=0.01, cutoff=0.0)
    for a, b in ((back.negative_mass(), spec.negative_mass()),
                 (back.error_proxy(10, **proxy_kw), spec.error_proxy(10, **proxy_kw))):
        assert (a.res_low, a.res_high, a.resolved) == (b.res_low, b.res_high, b.resolved)
    assert stored == ((spec.negative_mass().res_low, spec.negative_mass().res_high),
                      (spec.error_proxy(10, "eta", eta=0.01, cutoff=0.0).res_low,
                       spec.error_proxy(10, "eta", eta=0.01, cutoff=0.0).res_high))
    assert texts[0].startswith("unresolved (0.010–0.9")
    assert "[res " in texts[1] and " ± " in texts[1] and texts[1].count("(") == 1  # value ± se (ci) [res lo–hi]



def test_proxy_bracket_counts_every_kept_nodes_residual():
    """A node far from every decision point still moves E(t) at large t: lambda = -1.0 +- 0.3
    with eta = 0.01 gives |1 + 0.01 (1.0 +- 0.3)|^1000, a factor of about 20 either way."""
    spec = from_measure([[-1.0, 0.5]] * 4, [[0.5, 0.5]] * 4, residuals=[[0.3, 0.01]] * 4)
    t100 = spec.error_proxy(100, convention="eta", eta=0.01, cutoff=0.4)
    t1000 = spec.error_proxy(1000, convention="eta", eta=0.01, cutoff=0.4)
    for est, t in ((t100, 100), (t1000, 1000)):
        lo = 0.5 * (1.007 ** t + min(abs(1 - 0.01 * lam) ** t for lam in (0.49, 0.51)))
        hi = 0.5 * (1.013 ** t + max(abs(1 - 0.01 * lam) ** t for lam in (0.49, 0.51)))
        assert (est.res_low, est.res_high) == pytest.approx((lo, hi), rel=1e-9)
    assert not t100.resolved and not t1000.resolved
    assert t1000.res_high / t1000.res_low > 100
