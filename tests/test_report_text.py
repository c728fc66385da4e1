"""What the report and its figures say: titles from the data, integer and value ticks, human
legend labels, the status line of a report written by a run's own report stage, and every
non-number or failed verdict in the tables with its reason and a working link to docs/science.md.

The results file here is laid out by hand (docs/schema/*.md) so that each case the text must
handle is present: a wide spectrum (symlog axis), a short training run, two κ_a values, an
unresolved estimate, an estimate from two probes, a violated bound and a rate fitted over a
window shorter than one e-fold of its prediction.
"""
from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO
from hpcqml.report import build, figures
from hpcqml.store import SCHEMA_VERSION

LAMBDA_MAX = 49.0
STEPS = np.arange(21)          # a 0-20-step run
MEASURED = (0, 10, 20)
DELTA = 1.0                    # negative mass: the mass of the eigenvalues below -DELTA
NO_CUTOFF = (0.8125, 0.01, 0.7875, 0.8375)   # eq. III.11 proxy at t = 10: value, s.e., combined interval


def _estimate(g: h5py.Group, name: str, value: float, se: float, resolved: bool = True, note: str = "") -> None:
    d = g.create_dataset(name, data=np.array([value, se, value - 2 * se, value + 2 * se]))
    d.attrs.update({"resolved": resolved, "note": note})


def _spectrum(fh: h5py.File, label: str) -> None:
    r = fh.create_group(f"spectrum/{label}/result")
    r.attrs.update({"complete": True, "eta": 0.1, "n": 1000, "lambda_max": LAMBDA_MAX, "lambda_min": -3.0})
    grid = np.linspace(-4.0, 60.0, 256)          # the kernel reaches past λ_max
    r["density/grid"], r["density/rho"] = grid, np.exp(-0.1 * np.abs(grid)) + 1e-6
    e = r.create_group("estimates")
    _estimate(e, "trace", 123.0, 4.5)
    _estimate(e, "negative_mass", 0.02, np.nan)   # two probes: no standard error
    e["negative_mass"].attrs["delta"] = DELTA
    p = r.create_group("proxy")
    p.attrs["primary"] = "eta"
    for conv in ("eta", "paper"):
        curve = np.linspace(1.0, 2.0, 31)
        p[f"{conv}/nodes"], p[f"{conv}/grid"] = curve, curve
        pe = p.create_group(f"{conv}/estimates")
        _estimate(pe, "error_proxy_t10", 1.5, 0.1, resolved=conv != "eta",
                  note="" if conv != "eta" else "quadrature: bracket wider than tolerance")
        _estimate(pe, "error_proxy_no_cutoff_t10", *NO_CUTOFF[:2])          # eq. III.11, with its interval
        pe["error_proxy_no_cutoff_t10_resolution"] = np.array(NO_CUTOFF[2:])
        pe["error_proxy_no_cutoff_t10_combined"] = np.array(NO_CUTOFF[2:])


def _hhl(fh: h5py.File) -> None:
    g = fh.create_group("hhl/random")
    g.attrs["complete"] = True
    h = g.create_group("hhl")
    h["clock_qubits"] = np.array([4, 5, 6, 7])
    h["fidelity"] = np.array([0.9, 0.99, 0.999, 0.9999])
    h["leakage"] = np.array([0.1, 0.05, 0.04, 0.04])
    h["density_fidelity"] = np.array([0.8, 0.85, 0.86, 0.86])
    h["p_success"] = np.full(4, 0.3)
    g.create_group("instance").attrs.update({"embedded_dim": 4, "system_size": 9})
    t = g.create_group("truncated")
    t["clock_qubits"] = np.array([4, 4, 7, 7])
    t["kappa_a"] = np.array([4.0, 8.0, 4.0, 8.0])
    t["leakage"] = np.array([0.1, 0.1, 0.05, 0.04])
    t["overlap"] = np.array([0.9, 0.95, 0.91, 0.97])
    t["overlap_ii87"] = np.array([0.8, 0.9, 0.8, 0.9])


def _qcm(fh: h5py.File) -> None:
    case = fh.create_group("qcm/f1.000_seed1")
    case.attrs.update({"complete": True, "f": 1.0})
    o = case.create_group("N_1")
    o.attrs.update({"complete": True, "N": 1, "bound_II57": 1e-6, "measured_II57": 3e-4,
                    "violated_bounds": "II57", "kappa_M": 5.0})
    r = case.create_group("rates")
    r["N"], r["fitted"], r["fitted_se"], r["predicted"] = [1], [-0.0005], [0.0], [-0.0025]
    r["rho"] = -0.0025
    r.attrs["late_window"] = (10, 20)            # 10 steps against 1/ρ = 400: 0.025 e-folds


@pytest.fixture(scope="module")
def hand_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("report_text") / "hand.h5"
    with h5py.File(path, "w") as fh:
        fh.attrs["schema_version"] = SCHEMA_VERSION
        for s in MEASURED:
            _spectrum(fh, f"step_{s:06d}")
        t = fh.create_group("train")
        t.attrs["complete"] = True
        t["step"] = STEPS
        t["quantum_eligible"] = np.zeros(STEPS.size, dtype=np.int8)
        t["download"] = (STEPS % 10 == 0).astype(np.int8)
        t["batch_accuracy"] = np.linspace(0.1, 0.5, STEPS.size)
        t["test_accuracy"] = np.where(STEPS % 5 == 0, 0.3, np.nan)
        t["loss"] = np.linspace(2.0, 1.0, STEPS.size)
        t["sparsity"] = np.full(STEPS.size, 0.9)
        _hhl(fh)
        _qcm(fh)
        run = fh.create_group("provenance/run_000")
        run.attrs.update({"status": "running", "start_time": "2026-01-01T00:00:00+00:00", "end_time": "",
                          "command_line": "hpcqml run demo.toml", "mpi_size": 2, "hosts": "vm"})
    return path


# ---------------------------------------------------------------- figures


def test_fig2a_title_names_the_steps_drawn_and_legend_says_step_n(hand_file, tmp_path, drawn):
    with h5py.File(hand_file, "r") as fh:
        figures.fig2a_spectra_early(fh, tmp_path)          # default limit 200 on a 0-20-step run
    ax = drawn["fig2a_spectra_early.png"].axes[0]
    assert ax.get_title() == "Hessian spectra, steps 0–20 (Fig. 2a)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["step 0", "step 10", "step 20"]


def test_symlog_axis_reaches_the_largest_eigenvalue(hand_file, tmp_path, drawn):
    with h5py.File(hand_file, "r") as fh:
        figures.fig2a_spectra_early(fh, tmp_path)
    ax = drawn["fig2a_spectra_early.png"].axes[0]
    assert ax.get_xscale() == "symlog"
    ticks = list(ax.get_xticks())
    # the grid ends at 60 and -4: both ends are ticks, and ticks past λ_max = 49 exist
    assert 60.0 in ticks and -4.0 in ticks and 0.0 in ticks
    assert max(ticks) > LAMBDA_MAX and 20.0 in ticks
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "60" in labels and "20" in labels and not any("^" in t for t in labels)   # plain numbers


def test_symlog_ticks_give_way_to_the_ends():
    ticks = figures.symlog_ticks(-3.0, 49.0, 0.5)
    assert ticks[0] == -3.0 and ticks[-1] == 49.0 and 0.0 in ticks
    assert 50.0 not in ticks          # a fifth of a decade from 49: the end wins
    assert 20.0 in ticks and 10.0 in ticks and -2.0 not in ticks   # -2 is too close to -3
    assert all(abs(t) >= 1.0 or t == 0.0 for t in ticks)           # nothing inside the linear zone


def _whole(ax_axis) -> list[float]:
    lo, hi = ax_axis.get_view_interval()
    return [t for t in ax_axis.get_majorticklocs() if lo <= t <= hi]


def test_training_step_and_clock_axes_have_integer_ticks(hand_file, tmp_path, drawn):
    with h5py.File(hand_file, "r") as fh:
        figures.fig2d_accuracy(fh, tmp_path)
        figures.fig_hhl(fh, tmp_path)
    ax = drawn["fig2d_accuracy.png"].axes[0]
    ticks = _whole(ax.xaxis)
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)
    ax1, ax2, ax3 = drawn["hhl_fidelity.png"].axes
    for axis in (ax1.xaxis, ax2.xaxis):
        ticks = _whole(axis)
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_kappa_a_axis_is_ticked_at_its_values_in_plain_numbers(hand_file, tmp_path, drawn):
    with h5py.File(hand_file, "r") as fh:
        figures.fig_hhl(fh, tmp_path)
    ax3 = drawn["hhl_fidelity.png"].axes[2]
    assert ax3.get_xscale() == "log"
    assert list(ax3.get_xticks()) == [4.0, 8.0]
    fig = drawn["hhl_fidelity.png"]
    fig.canvas.draw()
    assert [t.get_text() for t in ax3.get_xticklabels()] == ["4", "8"]
    assert len(ax3.xaxis.get_minorticklocs()) == 0


def test_hhl_legends_name_the_case_in_words(hand_file, tmp_path, drawn):
    with h5py.File(hand_file, "r") as fh:
        figures.fig_hhl(fh, tmp_path)
    ax1, ax2, ax3 = drawn["hhl_fidelity.png"].axes
    texts = [t.get_text() for ax in (ax1, ax2, ax3) for t in ax.get_legend().get_texts()]
    assert "random case" in texts and "random case: leakage" in texts
    assert "random case: infidelity with the clock traced out" in texts
    assert not any("clock-traced F" in t or re.search(r"_\d{6}", t) for t in texts)


# ---------------------------------------------------------------- report text


def _report(hand_file: Path, out: Path, writer: str | None = None) -> str:
    summary = build.make_report([hand_file], out, quiet=True, writer=writer)
    return summary.markdown.read_text()


def test_status_is_complete_when_the_runs_own_report_stage_writes_it(hand_file, tmp_path):
    own = _report(hand_file, tmp_path / "a", writer="provenance/run_000")
    line = [ln for ln in own.splitlines() if ln.startswith("- latest invocation run_000")][0]
    assert "complete" in line and "(running)" not in line and "running" not in line
    other = _report(hand_file, tmp_path / "b")          # by hand while the run goes on: the truth
    line = [ln for ln in other.splitlines() if ln.startswith("- latest invocation run_000")][0]
    assert "running" in line and "complete" not in line


def _links(text: str) -> list[str]:
    return re.findall(r"\[why\]\(([^)]+)\)", text)


def test_every_unresolved_disagreeing_or_violated_row_says_why_and_links(hand_file, tmp_path):
    out = tmp_path / "deep" / "er"
    text = _report(hand_file, out)
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    # the unresolved E(10) (a = −ηλ) and the two-probe negative mass each name their reason
    (unresolved,) = [r for r in rows if r.startswith("| unresolved: ")]
    assert "bracket wider than tolerance (more Lanczos steps narrow it) [why](" in unresolved
    assert all(f"step_{s:06d} (a = −ηλ): error_proxy_t10" in unresolved for s in MEASURED)
    assert "(a = −λ)" not in unresolved                 # resolved in that convention
    (unknown,) = [r for r in rows if r.startswith("| no standard error: too few probes")]
    assert all(f"step_{s:06d}: negative_mass" in unknown for s in MEASURED) and "[why](" in unknown
    # the violated bound says by how much, in words
    (violated,) = [r for r in rows if "| II57 |" in r]
    assert "exceeds the bound by a factor 300" in violated and "[why](" in violated
    # a rate over 10 steps against 1/ρ = 400 steps: too short to tell, not "disagrees"
    (rate,) = [r for r in rows if r.startswith("| f1.000_seed1 | 1 | -0.0005")]
    assert "horizon too short to tell" in rate and "disagrees" not in rate and "0.025 e-folds" in rate
    # every link resolves to docs/science.md from the report folder, at a heading that exists there
    science = (REPO / "docs" / "science.md").read_text()
    anchors = {build.heading_anchor(h) for h in re.findall(r"^#+ (.+)$", science, flags=re.M)}
    links = _links(text)
    assert len(links) >= 4
    for link in links:
        path, anchor = link.split("#")
        assert (out / path).resolve() == (REPO / "docs" / "science.md").resolve()
        assert anchor in anchors, anchor


def test_heading_anchor_follows_the_markdown_viewers_rule():
    assert build.heading_anchor("Fig. 4: random quadratic ODEs") == "fig-4-random-quadratic-odes"
    assert build.heading_anchor("Eq. II.81 as printed, and honest flags") == "eq-ii81-as-printed-and-honest-flags"
    for title in build.SCIENCE_SECTIONS.values():
        assert f"#{build.heading_anchor(title)}" in build.why_link(
            next(k for k, v in build.SCIENCE_SECTIONS.items() if v == title))


def test_rate_verdict_of_one_fit():
    assert build._rate_verdict(-0.0101, 0.0, -0.01, 400) == "agrees"
    assert build._rate_verdict(-0.02, 0.0, -0.01, 400).startswith("disagrees: fitted/predicted lies outside")
    assert build._rate_verdict(-0.02, 0.0, -0.01, 20).startswith("horizon too short to tell: the fit window "
                                                                 "spans 0.2 e-folds")


# ---------------------------------------------------------------- validate --explain


def test_explain_shows_values_beside_defaults_in_pipeline_order():
    from hpcqml.config import explain, load_config
    from hpcqml.stages import PIPELINE, schemas

    sch = schemas()
    cfg = load_config(REPO / "jobs/configs/demo.toml", sch, overrides=["spectrum.probes=8"])
    text = explain(sch, cfg, PIPELINE)
    sections = re.findall(r"^\[(\w+)\]", text, flags=re.M)
    assert sections[: len(PIPELINE) + 1] == ["run", *PIPELINE]
    assert "performance only" not in text
    assert '  output: value "results/demo.h5"; string; default "results/run.h5" (not in the fingerprint)' in text
    assert "  probes: value 8; integer; default 4;" in text            # the override, beside the default
    assert "  micro_batch: value 64; integer; default 512; >= 1 (not in the fingerprint)" in text


def test_validate_explain_from_the_command_line():
    from conftest import run_cli

    res = run_cli("validate", "--explain", str(REPO / "jobs/configs/demo.toml"), "--set", "qcm.T=30")
    assert res.returncode == 0, res.stderr
    assert "  T: value 30; integer;" in res.stdout and "(not in the fingerprint)" in res.stdout
    assert res.stdout.index("[data]") < res.stdout.index("[train]") < res.stdout.index("[hhl]")


# ---------------------------------------------------------------- negative mass and eq. III.11


def _table(text: str, heading: str) -> list[str]:
    """The rows of the first table after ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_negative_mass_column_names_its_threshold(hand_file, tmp_path):
    rows = _table(_report(hand_file, tmp_path), "### Hessian spectra (SLQ)")
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[5] == "negative mass (λ < −δ, δ = 1)"
    assert "negative mass" not in " ".join(header[:5] + header[6:])
    for s in MEASURED:
        (row,) = [r for r in rows if r.startswith(f"| step_{s:06d} |")]
        assert [c.strip() for c in row.strip("|").split("|")][5].startswith("0.020")   # no δ of its own


def test_each_negative_mass_names_its_own_threshold_when_they_differ(tmp_path):
    """δ from the estimate's ``delta``, from the result group of a file without it, or 'not stored'."""
    path = tmp_path / "mixed.h5"
    with h5py.File(path, "w") as fh:
        fh.attrs["schema_version"] = SCHEMA_VERSION
        for s in MEASURED:
            _spectrum(fh, f"step_{s:06d}")
        del fh["spectrum/step_000010/result/estimates/negative_mass"].attrs["delta"]
        fh["spectrum/step_000010/result"].attrs["negative_delta"] = 0.5
        del fh["spectrum/step_000020/result/estimates/negative_mass"].attrs["delta"]
    rows = _table(_report(path, tmp_path / "out"), "### Hessian spectra (SLQ)")
    assert [c.strip() for c in rows[0].strip("|").split("|")][5] == "negative mass (λ < −δ)"
    cells = {s: [c.strip() for c in r.strip("|").split("|")][5]
             for s in MEASURED for r in rows if r.startswith(f"| step_{s:06d} |")}
    assert cells[0].startswith("δ = 1: 0.020") and cells[10].startswith("δ = 0.5: 0.020")
    assert cells[20].startswith("δ not stored: 0.020")


def test_convention_table_prints_the_eq_iii11_proxy_with_its_interval(hand_file, tmp_path):
    rows = _table(_report(hand_file, tmp_path), "Both mode conventions")
    value, _, low, high = NO_CUTOFF
    want = f"no cutoff (eq. III.11): E(10) = {value:.4g} [{low:.4g}–{high:.4g}]"
    for s in MEASURED:
        conv = [r for r in rows if r.startswith(f"| step_{s:06d} |")]
        assert len(conv) == 2 and all(want in r for r in conv), conv
        assert all(r.index("E(10) = 1.5") < r.index(want) for r in conv)     # after the proxy with cutoff
