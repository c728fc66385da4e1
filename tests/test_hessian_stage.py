"""The ``spectrum`` stage end to end on a tiny ResNet and synthetic data: layout and resume."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from hpcqml.config import load_config
from hpcqml.errors import UserError
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline
from hpcqml.stages import load_all

torch.set_num_threads(1)


def make_workdir(tmp_path, steps=(0, 10), name="run", results=None):
    """Snapshots in ``<name>.work`` stamped as made by the run writing ``<name>.h5`` (or ``results``)."""
    from hpcqml.data.synth import write_synthetic
    from hpcqml.models import build
    from hpcqml.training.checkpoint import save_checkpoint

    work = tmp_path / f"{name}.work"
    stamp = str(results or (tmp_path / f"{name}.h5").resolve())
    write_synthetic(work / "data", n_train=120, n_test=10, classes=10, seed=0)
    torch.manual_seed(0)
    model = build("resnet8-w1", 10)
    mask = {k: torch.rand(p.shape) < 0.1 for k, p in model.named_parameters() if p.dim() > 1}
    for s in steps:
        save_checkpoint(work / "snapshots" / f"step_{s:06d}.pt", "resnet8-w1", 10, model, mask=mask, step=s,
                        results=stamp)
    return work


def config(tmp_path, name="run", seed=3, **over):
    """A spectrum-only run on the tiny work directory of :func:`make_workdir`, with ``[spectrum]``
    keys ``over`` and the run seed ``seed``."""
    body = {"batch_size": 8, "micro_batch": 5, "lanczos_steps": 4, "probes": 2, "route": "double-backward",
            "t_max": 5, **over}
    def toml(v):
        return ("true" if v else "false") if isinstance(v, bool) else str(v) if isinstance(v, list) \
            else repr(v).replace("'", '"')
    lines = "\n".join(f"{k} = {toml(v)}" for k, v in body.items())
    text = f'[run]\noutput = "{tmp_path}/{name}.h5"\nworkdir = "{tmp_path}/{name}.work"\ndevice = "cpu"\n' \
           f'stages = ["spectrum"]\nseed = {seed}\nthreads = 1\n[spectrum]\n{lines}\n'
    schemas = {k: s.schema for k, s in load_all().items()}
    return load_config("<test>", schemas, text=text)


def read_result(path, label):
    with h5py.File(path, "r") as fh:
        g = fh[f"spectrum/{label}/result"]
        return {"attrs": dict(g.attrs), "nodes": g["nodes"][()], "weights": g["weights"][()],
                "rho": g["density/rho"][()], "grid": g["density/grid"][()],
                "proxy": {c: g[f"proxy/{c}/nodes"][()] for c in ("eta", "paper")},
                "density_attrs": dict(g["density"].attrs),
                "proxy_attrs": {c: dict(g[f"proxy/{c}"].attrs) for c in ("eta", "paper")},
                "primary": g["proxy"].attrs["primary"],
                "estimates": {k: g[f"estimates/{k}"][()] for k in g["estimates"]},
                "probe_routes": [fh[f"spectrum/{label}/{k}"].attrs["route"]
                                 for k in sorted(fh[f"spectrum/{label}"]) if k.startswith("probe_")],
                "probes": sorted(k for k in fh[f"spectrum/{label}"] if k.startswith("probe_"))}


def datasets_without_units(path):
    missing = []
    with h5py.File(path, "r") as fh:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.startswith("spectrum/") and not (
                    obj.attrs.get("units") and obj.attrs.get("description")):
                missing.append(name)
        fh.visititems(visit)
    return missing


def test_stage_writes_layout(tmp_path):
    make_workdir(tmp_path)
    path = run_pipeline(config(tmp_path), world(), quiet=True)
    r = read_result(path, "step_000010")
    assert r["probes"] == ["probe_000", "probe_001"]
    assert r["nodes"].shape == (2, 4) and np.allclose(np.nansum(r["weights"], axis=1), 1.0)
    assert r["rho"].shape == (256,) and r["density_attrs"]["kernel"] == "gaussian"
    assert "width_factor" in r["density_attrs"]["width_rule"]
    a = r["attrs"]
    assert a["wrt"] == "all" and a["route"] == "double-backward" and a["reorth"] == "full"
    assert a["lambda_min"] <= a["lambda_max"] and np.isfinite(a["trace"])
    # both conventions; eta from the [train] lr (default 0.01); the eta convention drawn first
    assert r["primary"] == "eta" and a["eta"] == 0.01 and a["eta_source"] == "[train] lr"
    assert r["proxy_attrs"]["paper"]["a_definition"] == "a = -lambda"
    assert r["proxy_attrs"]["eta"]["a_definition"] == "a = -eta*lambda, eta = 0.01"
    assert r["proxy_attrs"]["eta"]["cutoff"] == 0.4 == r["proxy_attrs"]["paper"]["cutoff"]
    assert r["proxy"]["eta"].shape == r["proxy"]["paper"].shape == (6,)
    assert not np.allclose(r["proxy"]["eta"][1:], r["proxy"]["paper"][1:])
    # 2 probes: a Student t interval with 1 degree of freedom, value +- t_{0.975,1} s.e.
    # (t_{0.975,1} = tan(0.475 pi) = 12.706..., the Cauchy quantile)
    tr = r["estimates"]["trace"]
    assert tr[0] == pytest.approx(a["trace"]) and tr[1] > 0
    t975 = np.tan(0.475 * np.pi)
    np.testing.assert_allclose(tr[2:], [tr[0] - t975 * tr[1], tr[0] + t975 * tr[1]], rtol=1e-9)
    assert r["estimates"]["trace_per_probe"].shape == (2,)
    assert a["precision"] == "fp32" and a["precision_setting"] == "tf32"  # CPU: always fp32
    assert r["probe_routes"] == ["double-backward"] * 2
    assert datasets_without_units(path) == []
    # both snapshots measured; batch is drawn with the step's seed, so the spectra differ
    r0 = read_result(path, "step_000000")
    assert not np.allclose(r0["nodes"], r["nodes"])


def test_stage_resumes_at_next_unfinished_probe(tmp_path, monkeypatch):
    from hpcqml.hessian.lockstep import LanczosEngine

    make_workdir(tmp_path, steps=(10,))
    real = LanczosEngine.start
    started = []

    def failing(self, number, *args, **kw):
        started.append(number)
        if number == 1:
            raise KeyboardInterrupt("simulated kill")
        return real(self, number, *args, **kw)

    monkeypatch.setattr(LanczosEngine, "start", failing)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(tmp_path, probes=3, wrt="support", lockstep=1), world(), quiet=True)
    assert started == [0, 1]
    started.clear()

    def counting(self, number, *args, **kw):
        started.append(number)
        return real(self, number, *args, **kw)

    monkeypatch.setattr(LanczosEngine, "start", counting)
    # resumed in lockstep (a performance setting): only the unfinished probes run
    path = run_pipeline(config(tmp_path, probes=3, wrt="support", lockstep=2), world(), quiet=True)
    assert started == [1, 2]  # probe 0 was not recomputed
    resumed = read_result(path, "step_000010")
    make_workdir(tmp_path, steps=(10,), name="fresh")
    fresh = run_pipeline(config(tmp_path, name="fresh", probes=3, wrt="support"), world(), quiet=True)
    ref = read_result(fresh, "step_000010")
    np.testing.assert_allclose(resumed["nodes"], ref["nodes"], rtol=1e-6)
    assert resumed["attrs"]["wrt"] == "support"
    from hpcqml.models import build

    assert resumed["attrs"]["n"] < 0.5 * sum(p.numel() for p in build("resnet8-w1", 10).parameters())


def test_sigterm_commits_finished_probes_and_says_so(tmp_path, monkeypatch):
    """SIGTERM during probe 1: probe 0 stays committed, the stop names what was saved,
    and a rerun finishes with the route decided by the first run."""
    import os
    import signal

    from hpcqml.hessian.lockstep import LanczosEngine
    from hpcqml.training.signals import StoppedBySignal

    make_workdir(tmp_path, steps=(10,))
    real = LanczosEngine.start

    def signalling(self, number, *args, **kw):
        if number == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, number, *args, **kw)

    monkeypatch.setattr(LanczosEngine, "start", signalling)
    cfg = config(tmp_path, probes=3, route="auto", lockstep=1)
    with pytest.raises(StoppedBySignal, match=r"SIGTERM.*spectrum step_000010 with probes \[1, 2\] not finished"
                                              r".*saved probes \[0\] of step_000010"):
        run_pipeline(cfg, world(), quiet=True)
    with h5py.File(tmp_path / "run.h5", "r") as fh:
        assert sorted(k for k in fh["spectrum/step_000010"]) == ["probe_000"]
        first = fh["spectrum/step_000010/probe_000"].attrs["route"]
        decisions = dict(fh["spectrum/decisions"].attrs)
    assert first in ("double-backward", "func")
    # the choice was committed before the first probe and is read back, never timed again
    assert decisions["complete"] and decisions["route"] == first and decisions["device"] == "cpu"
    monkeypatch.setattr(LanczosEngine, "start", real)
    import hpcqml.stages.spectrum as stage

    def no_retiming(*args, **kw):
        raise AssertionError("route re-decided on resume")
    monkeypatch.setattr(stage, "decide_route", no_retiming)
    r = read_result(run_pipeline(cfg, world(), quiet=True), "step_000010")
    assert r["probe_routes"] == [first] * 3 and r["attrs"]["route"] == first
    assert r["attrs"]["route_setting"] == "auto"
    assert np.all(np.isfinite(r["estimates"]["trace"]))  # 3 probes: a standard error


def test_too_many_lanczos_steps_refused(tmp_path):
    make_workdir(tmp_path, steps=(0,))
    with pytest.raises(UserError, match=r"lanczos_steps = 100000 exceeds the dimension n = \d+"):
        run_pipeline(config(tmp_path, lanczos_steps=100000), world(), quiet=True)


def test_progress_per_lanczos_step_and_basis_memory_warning(tmp_path, capsys, monkeypatch):
    """Rank 0 shows a bar per probe advanced every Lanczos step (with a rate), and warns
    with the basis bytes per rank when they exceed the stated fraction of memory."""
    import hpcqml.stages.spectrum as stage

    make_workdir(tmp_path, steps=(0,))
    monkeypatch.setattr(stage, "BASIS_MEMORY_FRACTION", 1e-12)
    capsys.readouterr()
    run_pipeline(config(tmp_path, probes=2, lockstep=1), world(), quiet=False)
    err = capsys.readouterr().err
    assert "step_000000 probe 0" in err and "step_000000 probe 1" in err and "4/4" in err
    assert "step/s" in err or "s/step" in err
    assert "warning: step_000000: the Krylov basis needs" in err and "GiB per rank (4 steps x" in err
    # in lockstep one bar per block of probes, and the warning counts the bases held at once
    make_workdir(tmp_path, steps=(0,), name="block")
    run_pipeline(config(tmp_path, name="block", probes=2, lockstep=2), world(), quiet=False)
    err = capsys.readouterr().err
    assert "step_000000 probes 0-1" in err and "4/4" in err
    assert "the Krylov bases of 2 probes held at once need" in err


def test_eta_override_and_paper_primary(tmp_path):
    make_workdir(tmp_path, steps=(0,))
    path = run_pipeline(config(tmp_path, eta=0.5, convention="paper", probes=3, proxy_t=[2, 4]), world(),
                        quiet=True)
    r = read_result(path, "step_000000")
    assert r["primary"] == "paper" and r["attrs"]["eta"] == 0.5 and r["attrs"]["eta_source"] == "[spectrum] eta"
    with h5py.File(path, "r") as fh:
        e = fh["spectrum/step_000000/result/proxy/eta/estimates"]
        assert {"error_proxy_t2", "error_proxy_t4", "dissipative_fraction_nodes", "dissipative_fraction_grid",
                "dissipative_fraction_grid_half_width", "dissipative_fraction_grid_double_width",
                "overlap_ii93"} <= set(e)
        # the stored curve and the estimate at t = 4 are the same number
        assert e["error_proxy_t4"][0] == pytest.approx(fh["spectrum/step_000000/result/proxy/eta/nodes"][4])
        assert e["error_proxy_t4"].attrs["columns"] == "value, stderr, ci_low, ci_high"


def test_missing_snapshot_is_user_error(tmp_path):
    make_workdir(tmp_path, steps=(0,))
    # refused before the run (one line naming the file) or, failing that, by the stage
    with pytest.raises(UserError, match=r"step_000020\.pt is missing|no snapshot for step 20"):
        run_pipeline(config(tmp_path, steps=[20]), world(), quiet=True)


def test_purged_snapshot_measures_the_rest_then_fails_naming_it(tmp_path):
    """Steps 0, 10 and 20 asked for, step 20's snapshot gone: 0 and 10 are measured and
    committed, then the stage fails with one line naming step_000020.pt and is not marked
    complete; with the file back, a rerun measures only step 20."""
    from hpcqml.models import build
    from hpcqml.training.checkpoint import save_checkpoint

    work = make_workdir(tmp_path, steps=(0, 10))
    with pytest.raises(UserError, match=r"^\[spectrum\] snapshot \S+step_000020\.pt is missing \(1 missing: "
                                        r"step_000020\.pt\); the 2 present model state\(s\) were measured"):
        run_pipeline(config(tmp_path, steps=[0, 10, 20]), world(), quiet=True)
    with h5py.File(tmp_path / "run.h5", "r") as fh:
        assert fh["spectrum/step_000000/result"].attrs["complete"]
        assert fh["spectrum/step_000010/result"].attrs["complete"]
        assert "step_000020" not in fh["spectrum"]
        assert not ("perf/spectrum" in fh and fh["perf/spectrum"].attrs.get("complete", False))
    torch.manual_seed(0)
    save_checkpoint(work / "snapshots" / "step_000020.pt", "resnet8-w1", 10, build("resnet8-w1", 10), step=20,
                    results=str((tmp_path / "run.h5").resolve()))
    path = run_pipeline(config(tmp_path, steps=[0, 10, 20]), world(), quiet=True)
    with h5py.File(path, "r") as fh:
        assert fh["perf/spectrum"].attrs["complete"]
        assert fh["spectrum/step_000020/result"].attrs["complete"]
        # steps 0 and 10 were kept, not recomputed: 2 probes x 4 steps for step 20 only
        assert fh["perf/spectrum/counters/hvp_products"][()].tolist() == [8.0]


def test_fig2c_and_report_table_show_both_conventions(tmp_path):
    """Fig. 2c draws the primary (eta) convention with its probe band and the paper one
    beside it; the report table prints value ± s.e., and 'unknown' below 3 probes."""
    import matplotlib.collections

    from hpcqml.report.build import _spectrum_md
    from hpcqml.report.figures import draw_fig2c

    make_workdir(tmp_path, steps=(0, 10))
    path = run_pipeline(config(tmp_path, probes=3, t_max=12), world(), quiet=True)
    with h5py.File(path, "a") as fh:  # a training log: quantum segments start at steps 1 and 11
        t = fh.create_group("train")
        step = np.arange(21)
        t["step"] = step
        t["quantum_eligible"] = ((step % 10) != 0).astype(np.int8)
    with h5py.File(path, "r") as fh:
        curve = fh["spectrum/step_000000/result/proxy/eta/nodes"][()]
        fig = draw_fig2c(fh)
        left, right = fig.axes[:2]
        assert "a = −ηλ" in left.get_title() and "η = 0.01" in left.get_title()
        assert right.get_title().startswith("other convention: a = −λ")
        for ax in (left, right):
            labels = [line.get_label() for line in ax.get_lines()]
            assert "from Ritz nodes and weights" in labels and "from the 256-point density (paper)" in labels
            bands = [c for c in ax.collections if isinstance(c, matplotlib.collections.PolyCollection)]
            assert bands and bands[0].get_label() == "±1 standard error over probes"
        # a note on the panel when a stored E(t) estimate of a spectrum is unresolved
        flagged = any(not fh[f"spectrum/{lab}/result/proxy/eta/estimates/error_proxy_t{t}"].attrs["resolved"]
                      for lab in ("step_000000", "step_000010") for t in (10, 100))
        notes = [t.get_text() for t in left.texts if "unresolved" in t.get_text()]
        assert bool(notes) == flagged
        nodes = [ln for ln in left.get_lines() if ln.get_label() == "from Ritz nodes and weights"][0]
        y = nodes.get_ydata()
        assert y[0] == 1.0 and y[5] == pytest.approx(curve[5])  # step 5 = t 5 of the step-0 spectrum
        md = "\n".join(_spectrum_md(fh))
    assert "a = -eta*lambda, eta = 0.01 (primary)" in md and "| a = -lambda |" in md
    assert md.index("(primary)") < md.index("| a = -lambda |")
    assert "E(10) = " in md and "E(100) = " in md and " ± " in md
    make_workdir(tmp_path, steps=(0, 10), name="two")
    two = run_pipeline(config(tmp_path, name="two", probes=1), world(), quiet=True)
    with h5py.File(two, "r") as fh:
        md = "\n".join(_spectrum_md(fh))
    # one probe: no sampling interval, the reason printed beside the value
    assert "unresolved (sampling: not evaluated (fewer than 2 probes))" in md
    assert "stopped: probe budget" in md


def test_snapshot_of_another_run_is_refused(tmp_path):
    """A snapshot stamped by another run (other fingerprint and results file) is refused in
    one line naming the file, before any data is read; a file named by model_file is measured."""
    make_workdir(tmp_path, steps=(0,), results=str(tmp_path / "elsewhere.h5"))
    with pytest.raises(UserError) as err:
        run_pipeline(config(tmp_path), world(), quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and "step_000000.pt" in msg and "elsewhere.h5" in msg
    snap = tmp_path / "run.work" / "snapshots" / "step_000000.pt"
    path = run_pipeline(config(tmp_path, name="named", source="file", model_file=str(snap),
                                 data_root=str(tmp_path / "run.work" / "data")), world(), quiet=True)
    with h5py.File(path, "r") as fh:
        assert fh["spectrum/step_000000/result"].attrs["checkpoint"] == str(snap)


def test_changed_settings_recompute_every_probe(tmp_path, monkeypatch):
    """After a settings change the runner discards the stage's groups: no probe of the old
    settings is resumed (every probe runs again with the new number of steps)."""
    from hpcqml.hessian.lockstep import LanczosEngine

    make_workdir(tmp_path, steps=(0,))
    run_pipeline(config(tmp_path, probes=2), world(), quiet=True)
    real, started = LanczosEngine.start, []

    def counting(self, number, *args, **kw):
        started.append(number)
        return real(self, number, *args, **kw)

    monkeypatch.setattr(LanczosEngine, "start", counting)
    path = run_pipeline(config(tmp_path, probes=2, lanczos_steps=3), world(), quiet=True)
    assert started == [0, 1]
    with h5py.File(path, "r") as fh:
        assert [fh[f"spectrum/step_000000/probe_00{p}"].attrs["steps"] for p in (0, 1)] == [3, 3]
