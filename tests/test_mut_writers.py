"""What the spectrum stage's writers put into ``spectrum/LABEL/result``, dataset by dataset.

``result_writer``, ``write_convention`` and ``_write_estimate`` (hpcqml/stages/spectrum.py) turn a
:class:`hpcqml.hessian.spectrum.Spectrum` into the layout of docs/schema/spectrum.md. Here they
write one group of a scratch HDF5 file from a spectrum whose exact values are known: ``k = n``
fully reorthogonalised Lanczos steps on a 24 x 24 matrix with a known eigen-decomposition, so
each probe's Gauss quadrature is the exact spectral measure seen from that probe (atoms at the
eigenvalues, masses ``(q_i^T z)^2 / z^T z``). Every stored number is compared with

* an exact value computed here with numpy from ``eigh`` and the probes (the trace of the
  Hutchinson samples, the negative mass, Delta_+/Delta of eq. II.28 and eq. II.93, the error
  proxy E(t) of eqs. III.12-III.13 with and without the cutoff), or
* for what has no closed form here (standard errors by jackknife, grid estimates, brackets),
  the value the :class:`Spectrum` method returns, field by field, together with the name,
  units and shape the schema gives the dataset.

The ``make mutation`` target ``writers`` (tests/mutation.sh) runs these first.
"""
from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch
from conftest import attr_text, schema_table
from scipy import stats

from hpcqml.hessian.lanczos import lanczos, rademacher_slice
from hpcqml.hessian.proxy import dissipation
from hpcqml.hessian.spectrum import Spectrum
from hpcqml.stages.spectrum import result_writer

torch.set_num_threads(1)

N = 24
PROBES = 4
ETA = 0.3
CUTOFF = 0.4
CFG = {"grid_points": 64, "width_factor": 0.02, "negative_delta": 0.125, "t_max": 6, "convention": "eta",
       "cutoff": CUTOFF, "proxy_t": [0, 3, 5]}
ROUNDS = [(2, 12, 3), (4, 24, 0)]
# Each value below is a finite sum of N float64 terms from a backward-stable eigensolver:
# errors ~ N eps ||H|| ~ 24 * 2.2e-16 * 9 ~ 5e-14; 1e-9 still fails on a change by one node
# (smallest mass here ~1e-4).
TOL = 1e-9


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Eigenvalues well away from 0, -delta, +-CUTOFF, 2/ETA and 2 (the decision points)."""
    rng = np.random.default_rng(31)
    lam = np.concatenate([rng.uniform(-3.0, -0.6, 6), rng.uniform(0.05, 0.3, 5), rng.uniform(-0.3, -0.2, 1),
                          rng.uniform(-0.1, -0.05, 3), rng.uniform(0.6, 1.8, 4), rng.uniform(2.3, 6.0, 3),
                          rng.uniform(7.0, 9.0, 2)])
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    H = (q * lam) @ q.T
    lam, Q = np.linalg.eigh(H)
    zs = [rademacher_slice(N, 0, N, seed=4, probe=p) for p in range(PROBES)]
    masses = np.array([(Q.T @ z) ** 2 / (z @ z) for z in zs])
    results = [lanczos(lambda v: torch.from_numpy(H) @ v, N, None, z, steps=N, reorth="full",
                       state_dtype=torch.float64, probe=p) for p, z in enumerate(zs)]
    spec = Spectrum.from_results(results, N)
    path = tmp_path_factory.mktemp("writers") / "w.h5"
    with h5py.File(path, "w") as fh:
        result_writer(spec, CFG, ETA, ROUNDS)(fh.create_group("result"))
    fh = h5py.File(path, "r")
    yield {"fh": fh, "g": fh["result"], "spec": spec, "lam": lam, "masses": masses, "zs": zs, "H": H}
    fh.close()


def _same_estimate(group, name: str, est, units: str) -> None:
    """The four datasets of one estimate hold ``est`` (docs/schema/spectrum.md, "Estimates")."""
    d = group[name]
    assert d.shape == (4,) and d.dtype == np.float64 and attr_text(d.attrs["units"]) == units
    np.testing.assert_array_equal(d[()], [est.value, est.stderr, est.ci_low, est.ci_high])
    a = d.attrs
    assert attr_text(a["columns"]) == "value, stderr, ci_low, ci_high"
    assert bool(a["resolved"]) is bool(est.resolved) and attr_text(a["note"]) == est.note
    assert float(a["tolerance"]) == est.tolerance and float(a["ambiguous_mass"]) == est.ambiguous_mass
    if est.threshold is None:
        assert np.isnan(a["threshold"])
    else:
        assert float(a["threshold"]) == est.threshold
    assert float(a["threshold_mass"]) == est.threshold_mass
    np.testing.assert_array_equal(a["threshold_share"], est.threshold_share)
    assert attr_text(a["uncertainty"]).startswith("standard error over probes (jackknife for ratios); ci: Student t")
    assert attr_text(a["uncertainty"]).endswith("interval over probes (NaN below 2 probes)")
    base = attr_text(d.attrs["description"])
    assert "\n" not in base and base
    per = group[f"{name}_per_probe"]
    np.testing.assert_array_equal(per[()], est.per_probe)
    res = group[f"{name}_resolution"]
    np.testing.assert_array_equal(res[()], [est.res_low, est.res_high])
    comb = group[f"{name}_combined"]
    np.testing.assert_array_equal(comb[()], [est.low, est.high])
    derived = [per, res, comb]
    if est.per_probe_low:
        bounds = group[f"{name}_per_probe_bounds"]
        assert bounds.shape == (PROBES, 2)
        np.testing.assert_array_equal(bounds[()], np.stack([est.per_probe_low, est.per_probe_high], axis=1))
        derived.append(bounds)
    else:
        assert f"{name}_per_probe_bounds" not in group
    for ds in derived:        # the derived datasets describe themselves as parts of the estimate
        assert ds.dtype == np.float64 and attr_text(ds.attrs["units"]) == units
        assert attr_text(ds.attrs["description"]).startswith(base + ": ")
    # what NaN means in the bracket, and when the combined interval counts as resolved
    assert attr_text(res.attrs["description"]).endswith("proven quadrature bracket of the probe-exact pooled value "
                                                     "(NaN: not evaluated)")
    assert attr_text(comb.attrs["description"]).endswith("resolved when its half-width is at most the tolerance")


def test_trace_is_the_mean_hutchinson_sample_with_a_student_t_interval(written):
    """value = mean z^T H z; stderr = sample standard deviation / sqrt(n_v); the 95 % interval
    value +- t_{0.975, n_v - 1} stderr (scipy.stats.t); per probe the four z^T H z."""
    q = np.array([z @ written["H"] @ z for z in written["zs"]])
    d = written["g"]["estimates/trace"][()]
    se = q.std(ddof=1) / np.sqrt(PROBES)
    half = stats.t.ppf(0.975, PROBES - 1) * se
    np.testing.assert_allclose(d, [q.mean(), se, q.mean() - half, q.mean() + half], rtol=1e-10)
    np.testing.assert_allclose(written["g"]["estimates/trace_per_probe"][()], q, rtol=1e-12)
    _same_estimate(written["g"]["estimates"], "trace", written["spec"].trace(), "nat")


def test_negative_mass_is_the_exact_mass_below_minus_delta(written):
    lam, m = written["lam"], written["masses"]
    delta = CFG["negative_delta"]
    per_probe = m[:, lam < -delta].sum(axis=1)
    est_ds = written["g"]["estimates/negative_mass"]
    assert est_ds[0] == pytest.approx(per_probe.mean(), abs=TOL)
    np.testing.assert_allclose(written["g"]["estimates/negative_mass_per_probe"][()], per_probe, atol=TOL)
    assert float(est_ds.attrs["delta"]) == delta
    assert "delta = 0.125" in attr_text(est_ds.attrs["description"])
    _same_estimate(written["g"]["estimates"], "negative_mass", written["spec"].negative_mass(delta), "1")


def test_density_group_is_the_spectrum_density(written):
    dens = written["spec"].density(CFG["grid_points"], CFG["width_factor"])
    d = written["g"]["density"]
    np.testing.assert_array_equal(d["grid"][()], dens.grid)
    np.testing.assert_array_equal(d["rho"][()], dens.rho)
    assert d["grid"].shape == (CFG["grid_points"],)
    assert attr_text(d["grid"].attrs["units"]) == "nat" and attr_text(d["rho"].attrs["units"]) == "1/nat"
    # the kernel width rule: width_factor x (largest - smallest node), independent of the code
    x, _ = written["spec"].pooled()
    assert d.attrs["sigma"] == pytest.approx(CFG["width_factor"] * (x.max() - x.min()), rel=1e-12)
    assert float(d.attrs["width_factor"]) == CFG["width_factor"] and float(d.attrs["min_width"]) == dens.min_width
    assert attr_text(d.attrs["width_rule"]) == dens.rule and attr_text(d.attrs["kernel"]) == "gaussian"


def test_adaptive_rounds(written):
    rounds = written["g"]["adaptive_rounds"]
    assert rounds.dtype == np.int64 and attr_text(rounds.attrs["units"]) == "count"
    np.testing.assert_array_equal(rounds[()], ROUNDS)


def test_proxy_time_axis_and_primary_convention(written):
    p = written["g"]["proxy"]
    np.testing.assert_array_equal(p["t"][()], np.arange(CFG["t_max"] + 1, dtype=np.float64))
    assert attr_text(p["t"].attrs["units"]) == "count"
    assert attr_text(p.attrs["primary"]) == "eta"
    assert sorted(k for k in p if k != "t") == ["eta", "paper"]


def _exact_proxy(written, convention: str, t: np.ndarray, cutoff: float) -> np.ndarray:
    """E(t) of eqs. III.12-III.13 from the exact measure pooled over probes: the mean mass of
    each eigenvalue, kept where |lambda| >= cutoff, weighted by |1 + a|^t and renormalised by
    the kept mass (every mode is kept when cutoff = 0, whose kept mass is 1)."""
    lam, m = written["lam"], written["masses"].mean(axis=0)
    a = -ETA * lam if convention == "eta" else -lam
    kept = np.abs(lam) >= cutoff
    return np.array([np.sum(m[kept] * np.abs(1 + a[kept]) ** tt) for tt in t]) / m[kept].sum()


@pytest.mark.parametrize("convention", ["eta", "paper"])
def test_proxy_curves_are_the_exact_error_proxy(written, convention):
    g = written["g"][f"proxy/{convention}"]
    t = np.arange(CFG["t_max"] + 1, dtype=np.float64)
    want = _exact_proxy(written, convention, t, CUTOFF)
    np.testing.assert_allclose(g["nodes"][()], want, rtol=TOL)
    np.testing.assert_allclose(g["log_nodes"][()], np.log(want), rtol=TOL, atol=TOL)
    spec = written["spec"]
    k = dict(convention=convention, eta=ETA, cutoff=CUTOFF)
    log_grid = spec.log_error_proxy_grid(t, width_factor=CFG["width_factor"], points=CFG["grid_points"], **k)
    np.testing.assert_array_equal(g["log_grid"][()], log_grid)
    np.testing.assert_allclose(g["grid"][()], np.exp(log_grid), rtol=1e-15)
    np.testing.assert_array_equal(g["log_nodes_stderr"][()], spec.log_error_proxy(t, **k)[1])
    for name in ("nodes", "grid", "log_nodes", "log_grid", "log_nodes_stderr"):
        assert g[name].shape == t.shape and attr_text(g[name].attrs["units"]) == "1"
    assert all("III.12" in attr_text(g[name].attrs["description"]) for name in ("nodes", "grid"))


@pytest.mark.parametrize("convention", ["eta", "paper"])
def test_convention_estimates_are_the_exact_values(written, convention):
    lam, m = written["lam"], written["masses"]
    spec = written["spec"]
    est = written["g"][f"proxy/{convention}/estimates"]
    for tt in CFG["proxy_t"]:
        want = _exact_proxy(written, convention, np.array([tt]), CUTOFF)[0]
        assert est[f"error_proxy_t{tt}"][0] == pytest.approx(want, rel=TOL)
        _same_estimate(est, f"error_proxy_t{tt}", spec.error_proxy(tt, convention, ETA, CUTOFF), "1")
        want0 = _exact_proxy(written, convention, np.array([tt]), 0.0)[0]
        assert est[f"error_proxy_no_cutoff_t{tt}"][0] == pytest.approx(want0, rel=TOL)
        _same_estimate(est, f"error_proxy_no_cutoff_t{tt}", spec.error_proxy(tt, convention, ETA, 0.0), "1")
    a = -ETA * lam if convention == "eta" else -lam
    plus, kept = np.abs(1 + a) < 1, np.abs(lam) >= CUTOFF
    frac = m[:, kept & plus].sum(axis=1).mean() / m[:, kept].sum(axis=1).mean()       # eq. II.28
    assert est["dissipative_fraction_nodes"][0] == pytest.approx(frac, abs=TOL)
    _same_estimate(est, "dissipative_fraction_nodes", spec.dissipative_fraction(convention, ETA, CUTOFF), "1")
    assert est["overlap_ii93"][0] == pytest.approx(m[:, plus].sum(axis=1).mean(), abs=TOL)   # eq. II.93
    _same_estimate(est, "overlap_ii93", spec.overlap_ii93(convention, ETA), "1")
    for tag, f in (("grid", 1.0), ("grid_half_width", 0.5), ("grid_double_width", 2.0)):
        want_est = spec.dissipative_fraction(convention, ETA, CUTOFF, source="grid",
                                             width_factor=f * CFG["width_factor"], points=CFG["grid_points"])
        _same_estimate(est, f"dissipative_fraction_{tag}", want_est, "1")
        assert f"{f:g} x the kernel width" in attr_text(est[f"dissipative_fraction_{tag}"].attrs["description"])
    names = {f"{p}{tt}" for p in ("error_proxy_t", "error_proxy_no_cutoff_t") for tt in CFG["proxy_t"]}
    names |= {"dissipative_fraction_nodes", "dissipative_fraction_grid", "dissipative_fraction_grid_half_width",
              "dissipative_fraction_grid_double_width", "overlap_ii93"}
    assert {k for k in est if not k.endswith(("_per_probe", "_resolution", "_combined", "_per_probe_bounds"))} == names


@pytest.mark.parametrize("convention", ["eta", "paper"])
def test_convention_attributes(written, convention):
    g = written["g"][f"proxy/{convention}"]
    x, w = written["spec"].pooled()
    dis = dissipation(x, w, cutoff=CUTOFF, convention=convention, eta=ETA)
    a = g.attrs
    assert attr_text(a["convention"]) == convention and float(a["eta"]) == ETA and float(a["cutoff"]) == CUTOFF
    assert attr_text(a["cutoff_applies_to"]) == "|lambda|"
    assert attr_text(a["a_definition"]) == ("a = -eta*lambda, eta = 0.3" if convention == "eta" else "a = -lambda")
    for name in ("r_plus", "r_minus", "a_plus", "time_limit"):
        np.testing.assert_array_equal(a[name], getattr(dis, name), err_msg=name)
    # the pooled dissipative fraction of the same call is the exact one (eq. II.28)
    lam, m = written["lam"], written["masses"].mean(axis=0)
    aa = -ETA * lam if convention == "eta" else -lam
    kept = np.abs(lam) >= CUTOFF
    assert dis.fraction == pytest.approx(m[kept & (np.abs(1 + aa) < 1)].sum() / m[kept].sum(), abs=TOL)


_FIELDS = {"C": "eta|paper", "T": r"[0-9.e+-]+", "NAME": ".+"}


def _schema_rows() -> list[tuple[re.Pattern[str], str, str]]:
    """The table "Stored units and descriptions" of docs/schema/spectrum.md: one
    (name pattern, units, description template) per row, the ``{C}``/``{T}``/``{NAME}`` fields
    of the name as named groups."""
    rows = []
    for name, units, desc in schema_table("spectrum.md", "### Stored units and descriptions"):
        pattern = re.escape(name)
        for field, rx in _FIELDS.items():
            pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>{rx})")
        rows.append((re.compile(pattern), units, desc))
    return rows


def test_every_dataset_has_the_units_and_description_of_the_schema(written):
    """Each dataset of the written group carries the ``units`` and ``description`` that the
    schema's table gives it, word for word, and no dataset is missing from the table: a
    reader of the file sees what the docs promise (the texts are the file's only account of
    what a column means)."""
    g = written["g"]
    rows = _schema_rows()
    assert len(rows) >= 30
    seen = set()

    def check(key: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        hits = []
        for pattern, units, desc in rows:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            fields = m.groupdict()
            if "NAME" in fields:            # a part of an estimate: its main dataset's texts
                main = fields["NAME"]
                if main not in g or "columns" not in g[main].attrs:
                    continue
                units = attr_text(g[main].attrs["units"])
                fields["DESC"] = attr_text(g[main].attrs["description"])
            if "{delta}" in desc:
                fields["delta"] = format(float(obj.attrs["delta"]), "g")
            hits.append((pattern.pattern, units, desc.format(**fields)))
        assert len(hits) == 1, f"{key}: {len(hits)} rows of the schema table match ({hits})"
        _, units, desc = hits[0]
        assert attr_text(obj.attrs["units"]) == units, key
        assert attr_text(obj.attrs["description"]) == desc, key
        seen.add(hits[0][0])

    g.visititems(check)
    assert len(seen) == len(rows), "rows of the schema table that no dataset matched: " + ", ".join(
        sorted({p.pattern for p, _, _ in rows} - seen))
