"""The spectrum stage's adaptive stopping and reruns that keep work (tiny ResNet, synthetic data).

Work is counted by wrapping :meth:`hpcqml.hessian.lockstep.LanczosEngine.start`: every call
starts one probe's recurrence from scratch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcqml.parallel import world
from hpcqml.runner import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hessian_stage import config, make_workdir

torch.set_num_threads(1)
LABEL = "step_000000"


def probe_arrays(path):
    with h5py.File(path, "r") as fh:
        g = fh[f"spectrum/{LABEL}"]
        return {k: {d: g[k][d][()] for d in ("alpha", "beta", "nodes", "weights", "residuals")}
                for k in g if k.startswith("probe_")}


def result_attrs(path):
    with h5py.File(path, "r") as fh:
        return dict(fh[f"spectrum/{LABEL}/result"].attrs)


def test_more_probes_extends_the_stored_ones_and_report_follows(tmp_path, started):
    """Raising ``probes`` runs only the new probes; the old ones stay bit for bit; a report
    with the old probe count in the config is not refused and renders the 5 stored probes."""
    make_workdir(tmp_path, steps=(0,))
    run_pipeline(config(tmp_path, probes=3), world(), quiet=True)
    assert started == [0, 1, 2]
    before = probe_arrays(tmp_path / "run.h5")
    started.clear()
    path = run_pipeline(config(tmp_path, probes=5), world(), quiet=True)
    assert started == [3, 4]                      # probes 0-2 were not recomputed
    after = probe_arrays(path)
    assert sorted(after) == [f"probe_{p:03d}" for p in range(5)]
    for key, arrays in before.items():
        for name, value in arrays.items():
            assert after[key][name].tobytes() == value.tobytes(), (key, name)
    a = result_attrs(path)
    assert a["probes"] == 5 and a["probes_setting"] == 5 and a["lanczos_steps"] == 4
    with h5py.File(path, "r") as fh:
        assert fh[f"spectrum/{LABEL}/result/nodes"].shape == (5, 4)
        assert fh["perf/spectrum"].attrs["complete"]
    # the same probe count again: nothing to do
    started.clear()
    run_pipeline(config(tmp_path, probes=5), world(), quiet=True)
    assert started == []
    # the report, with the config still saying 3 probes, renders what the file holds
    path = run_pipeline(config(tmp_path, probes=3), world(), stages=["report"], quiet=True)
    assert started == []
    with h5py.File(path, "r") as fh:
        assert fh["perf/report"].attrs["complete"] and fh.attrs["prov_status"] == "completed"
        assert fh[f"spectrum/{LABEL}/result"].attrs["probes"] == 5


def test_adaptive_stops_when_resolved_or_at_the_budget(tmp_path, started):
    """The trace's quadrature is exact (Hutchinson), so only probes can grow it: a loose
    tolerance stops at once ('resolved'); tolerance 0 grows probes to the budget ('probe
    budget') and never the steps. E(100) in the paper convention (|1 - lambda|^100 over a
    spectral interval reaching lambda ~ 4) has a quadrature bracket many orders wider than
    its sampling interval at 4 and 8 steps: at tolerance 0 it doubles the steps to the step
    budget and stops there ('step budget')."""
    make_workdir(tmp_path, steps=(0,), name="loose")
    loose = run_pipeline(config(tmp_path, name="loose", probes=3, max_probes=6, max_lanczos_steps=8,
                                resolve=["trace"], resolution_rel=1e9), world(), quiet=True)
    a = result_attrs(loose)
    assert (a["stop_reason"], a["probes"], a["lanczos_steps"], a["unresolved"]) == ("resolved", 3, 4, "")
    assert started == [0, 1, 2] and a["adaptive"]

    started.clear()
    make_workdir(tmp_path, steps=(0,), name="tight")
    tight = run_pipeline(config(tmp_path, name="tight", probes=3, max_probes=5, max_lanczos_steps=8,
                                resolve=["trace"], resolution_rel=0.0), world(), quiet=True)
    a = result_attrs(tight)
    assert (a["stop_reason"], a["probes"], a["lanczos_steps"]) == ("probe budget", 5, 4)
    assert "trace: sampling" in a["unresolved"]
    assert started == [0, 1, 2, 3, 4]             # probes added, none rerun
    with h5py.File(tight, "r") as fh:
        np.testing.assert_array_equal(fh[f"spectrum/{LABEL}/result/adaptive_rounds"][()][:, :2], [[3, 4], [5, 4]])

    started.clear()
    make_workdir(tmp_path, steps=(0,), name="steps")
    steps_only = dict(probes=3, max_lanczos_steps=8, resolve=["error_proxy"], proxy_t=[100], convention="paper",
                      resolution_rel=0.0)
    grown = run_pipeline(config(tmp_path, name="steps", **steps_only), world(), quiet=True)
    a = result_attrs(grown)
    assert (a["stop_reason"], a["probes"], a["lanczos_steps"]) == ("step budget", 3, 8)
    assert "E(100) (paper): quadrature" in a["unresolved"]
    assert started == [0, 1, 2]                   # each probe extended from 4 to 8 steps, not rerun
    with h5py.File(grown, "r") as fh:
        assert [fh[f"spectrum/{LABEL}/probe_00{p}"].attrs["steps_requested"] for p in range(3)] == [8, 8, 8]
        assert fh[f"spectrum/{LABEL}/result/nodes"].shape == (3, 8)
        # 3 probes x 8 steps: the growth 4 -> 8 cost 4 products per probe (a rerun would cost 36)
        assert fh["perf/spectrum/counters/hvp_products"][()].tolist() == [24.0]

    # the extended probes equal a fresh run with 8 steps (float32 products: the extension does
    # the same operations as a fresh run, up to the reorthogonalisation chunking)
    make_workdir(tmp_path, steps=(0,), name="fresh8")
    fresh = run_pipeline(config(tmp_path, name="fresh8", **{**steps_only, "lanczos_steps": 8}), world(), quiet=True)
    ext, ref = probe_arrays(grown), probe_arrays(fresh)
    for key in ref:
        np.testing.assert_allclose(ext[key]["alpha"], ref[key]["alpha"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ext[key]["beta"], ref[key]["beta"], rtol=1e-6, atol=1e-7)
    # a larger step budget on a later run extends the stored 8-step probes to 16 from their
    # Krylov bases on disk (written because the first run's steps could grow): no probe starts
    # again, and the growth 8 -> 16 costs 8 products per probe
    started.clear()
    run_pipeline(config(tmp_path, name="steps", **{**steps_only, "max_lanczos_steps": 16}), world(), quiet=True)
    assert started == [] and result_attrs(grown)["lanczos_steps"] == 16
    with h5py.File(grown, "r") as fh:
        assert fh["perf/spectrum/counters/hvp_products"][()].tolist() == [24.0]


def test_stored_estimates_follow_from_stored_alpha_beta(tmp_path):
    """Each probe's nodes, weights and residual bounds are the eigen-decomposition of its
    stored tridiagonal (checked with a dense eigh); the result stores the same recurrence,
    and every stored estimate (value, sampling interval, proven bracket, combined interval,
    resolution) is recomputed from the stored data with the stored settings."""
    from hpcqml.hessian.spectrum import Spectrum

    make_workdir(tmp_path, steps=(0,))
    path = run_pipeline(config(tmp_path, probes=4, proxy_t=[2, 5], resolution_abs=0.01), world(), quiet=True)
    with h5py.File(path, "r") as fh:
        r = fh[f"spectrum/{LABEL}/result"]
        for p in range(4):
            g = fh[f"spectrum/{LABEL}/probe_{p:03d}"]
            alpha, beta = g["alpha"][()], g["beta"][()]
            k = alpha.size
            T = np.diag(alpha) + np.diag(beta[:k - 1], 1) + np.diag(beta[:k - 1], -1)
            theta, S = np.linalg.eigh(T)
            # symmetric eigenproblem in float64: eigenvalues to ~k eps ||T||; the weights S_1i^2
            # and residuals to that over the gap (4 Ritz values of a spread spectrum)
            scale = np.abs(T).max()
            np.testing.assert_allclose(g["nodes"][()], theta, rtol=0, atol=1e-12 * scale * k)
            np.testing.assert_allclose(g["weights"][()], S[0] ** 2, rtol=0, atol=1e-9)
            np.testing.assert_allclose(g["residuals"][()], np.abs(beta[k - 1] * S[k - 1]), rtol=0,
                                       atol=1e-9 * scale)
            np.testing.assert_array_equal(r["lanczos_alpha"][p], alpha)
            np.testing.assert_array_equal(r["lanczos_beta"][p], beta)
        spec = Spectrum.from_hdf5(r)
        assert spec.resolution_abs == 0.01 and spec.recurrence_source == "lanczos"
        eta = float(r.attrs["eta"])
        expect = {"estimates/trace": spec.trace(), "estimates/negative_mass": spec.negative_mass(0.0)}
        for conv in ("eta", "paper"):
            e = f"proxy/{conv}/estimates"
            expect[f"{e}/dissipative_fraction_nodes"] = spec.dissipative_fraction(conv, eta, 0.4)
            expect[f"{e}/overlap_ii93"] = spec.overlap_ii93(conv, eta)
            for t in (2, 5):
                expect[f"{e}/error_proxy_t{t}"] = spec.error_proxy(t, conv, eta, 0.4)
        for key, est in expect.items():
            # the same float64 inputs through the same code: equal up to summation order
            close = dict(rtol=1e-12, atol=1e-15, err_msg=key)
            np.testing.assert_allclose(r[key][()], [est.value, est.stderr, est.ci_low, est.ci_high], **close)
            np.testing.assert_allclose(r[f"{key}_resolution"][()], [est.res_low, est.res_high], **close)
            np.testing.assert_allclose(r[f"{key}_combined"][()], [est.low, est.high], **close)
            assert bool(r[key].attrs["resolved"]) == est.resolved and r[key].attrs["note"] == est.note, key
            assert r[key].attrs["tolerance"] == pytest.approx(est.tolerance, rel=1e-12, abs=1e-15), key
        assert r.attrs["stop_reason"] in ("resolved", "step budget", "probe budget", "step and probe budgets")


def test_result_of_an_older_version_is_read_without_recomputing_probes(tmp_path, started):
    """A file whose probes and result predate the recorded step counts and extendable
    settings: the rerun keeps every probe and rewrites only the result."""
    make_workdir(tmp_path, steps=(0,))
    path = run_pipeline(config(tmp_path, probes=3), world(), quiet=True)
    first = result_attrs(path)
    with h5py.File(path, "a") as fh:
        for p in range(3):
            del fh[f"spectrum/{LABEL}/probe_00{p}"].attrs["steps_requested"]
        for key in ("extendable", "stop_reason"):
            del fh[f"spectrum/{LABEL}/result"].attrs[key]
        del fh["perf/spectrum"].attrs["extendable"]
    started.clear()
    run_pipeline(config(tmp_path, probes=3), world(), quiet=True)
    assert started == []
    a = result_attrs(path)
    assert a["probes"] == 3 and a["stop_reason"] == first["stop_reason"] and a["extendable"] == first["extendable"]


def test_top_eigenpairs_stored_with_residuals_and_vectors(tmp_path):
    """``top_k`` stores the largest eigenvalues with residuals and (on request) orthonormal
    eigenvectors; the top one bounds every Ritz value of the SLQ probes from above (Cauchy
    interlacing: a Ritz value never exceeds lambda_max)."""
    make_workdir(tmp_path, steps=(0,))
    path = run_pipeline(config(tmp_path, probes=3, top_k=2, top_which="largest", eigenvectors=True), world(),
                        quiet=True)
    with h5py.File(path, "r") as fh:
        g = fh[f"spectrum/{LABEL}/eigenpairs"]
        values, residuals, vectors = g["values"][()], g["residuals"][()], g["vectors"][()]
        n = int(fh[f"spectrum/{LABEL}/result"].attrs["n"])
        theta_max = float(fh[f"spectrum/{LABEL}/result"].attrs["lambda_max"])
        assert g.attrs["k"] == 2 and g.attrs["which"] == "largest" and vectors.shape == (2, n)
        assert g["vectors"].chunks == (1, min(n, 1 << 20))
        assert np.all(np.diff(values) >= 0) and np.all(residuals <= g.attrs["tol"] * g.attrs["norm_estimate"])
        # unit, orthogonal rows: converged Ritz vectors of a float64 basis, orthonormal to ~1e-10
        np.testing.assert_allclose(vectors @ vectors.T, np.eye(2), atol=1e-8)
        # the eigenvalue lies within value +- residual and above every Ritz value
        assert values[-1] + residuals[-1] >= theta_max - 1e-4 * abs(theta_max)


def test_extendable_settings_are_not_in_any_fingerprint(tmp_path):
    """Probe counts, budgets and tolerances leave the spectrum's and the report's fingerprints
    unchanged (so a report is never refused for them); the Lanczos step count does not."""
    from hpcqml.config import explain
    from hpcqml.stages import schemas

    sch = schemas()
    base = config(tmp_path, probes=3)
    for over in (dict(probes=8), dict(max_probes=16, max_lanczos_steps=40), dict(resolution_rel=0.01),
                 dict(resolve=["trace"])):
        other = config(tmp_path, **{"probes": 3, **over})
        for stage in ("spectrum", "report"):
            assert other.stage_fingerprint(stage, sch) == base.stage_fingerprint(stage, sch), (over, stage)
    assert config(tmp_path, lanczos_steps=5).stage_fingerprint("spectrum", sch) != base.stage_fingerprint(
        "spectrum", sch)
    keys = base.extendable_keys("spectrum", sch["spectrum"])
    assert keys["probes"] == 3 and {"max_probes", "max_lanczos_steps", "resolve", "resolution_rel"} <= set(keys)
    assert "  probes: integer; default 4; >= 1 (extendable" in explain(sch)
