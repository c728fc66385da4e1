"""Every figure the report can make, tested by what it draws.

Each figure function of :mod:`hpcqml.report.figures` builds a matplotlib Figure and hands it
to ``figures._save``; the tests wrap ``_save`` to keep the Figure (the PNG is still written)
and compare the plotted line data with the datasets of the results file, computed here
independently with numpy, together with titles, axis labels, ticks and legend entries.

Carleman and HHL figures read a file the real ``qcm`` and ``hhl`` stages write; the spectrum
and training figures read a small file laid out by hand as docs/schema/spectrum.md and
docs/schema/train.md describe (running the training and SLQ stages for them would take minutes).
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import run_cli, small_qcm_hhl_config
from hpcqml.report import figures
from hpcqml.store import SCHEMA_VERSION


def _legend(ax) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


def _same(a, b) -> None:
    """Plotted data equal the expected values exactly (both from the same float64 data)."""
    np.testing.assert_array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


# ---------------------------------------------------------------- Carleman and HHL (real stages)


@pytest.fixture(scope="module")
def qcm_hhl_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("figs_qcm")
    cfg = tmp / "qh.toml"
    cfg.write_text(small_qcm_hhl_config(tmp / "qh.h5", qcm_extra='seeds = [1, 2]\nlift = "both"\n'))
    res = run_cli("--quiet", "run", str(cfg), timeout=600)
    assert res.returncode == 0, res.stderr
    return tmp / "qh.h5"


def _norms(case, key):
    v = np.linalg.norm(case[key][()], axis=1)
    return np.where(v == 0, np.nan, v)


def _median(curves):
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(np.vstack(curves), axis=0)


def test_fig4a_draws_the_truncation_error_of_each_order(qcm_hhl_file, tmp_path, drawn):
    with h5py.File(qcm_hhl_file, "r") as fh:
        figures.fig4a_error_vs_order(fh, tmp_path)
        cases = [fh[f"qcm/f1.000_seed{s}"] for s in (1, 2)]
        T1 = cases[0]["u_exact"].shape[0]
        want = {N: _median([_norms(c, f"split/N_{N}/truncation") for c in cases]) for N in (1, 2)}
        disc = _median([_norms(c, "split/N_1/discreteness") for c in cases])
        total = {N: _median([_norms(c, f"split/N_{N}/total") for c in cases]) for N in (1, 2)}
    ax = drawn["fig4a_error_vs_order.png"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for N in (1, 2):
        (label,) = [k for k in lines if k.startswith(f"N = {N}:")]
        _same(lines[label].get_xdata(), np.arange(T1))
        _same(lines[label].get_ydata(), want[N])
        assert lines[label].get_linestyle() == "-"
        # The truncation curve is not the total error: they differ by the discreteness part here.
        assert not np.allclose(np.nan_to_num(want[N]), np.nan_to_num(total[N]), rtol=1e-3, atol=0)
    (dlabel,) = [k for k in lines if k.startswith("discreteness error")]
    _same(lines[dlabel].get_ydata(), disc)
    assert lines[dlabel].get_linestyle() == "--"
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "time step t"
    assert ax.get_title().startswith("Fig. 4a: truncation error, f = 1, 2 seed(s)")
    legend = _legend(ax)
    assert [e.split(":")[0] for e in legend[:2]] == ["N = 1", "N = 2"]
    assert all("rate" in e for e in legend[:2])


def test_fig4b_draws_the_truncation_error_of_each_fraction(qcm_hhl_file, tmp_path, drawn):
    with h5py.File(qcm_hhl_file, "r") as fh:
        figures.fig4b_error_vs_fraction(fh, tmp_path)
        want, disc = {}, {}
        for f in ("1.000", "0.500"):
            cases = [fh[f"qcm/f{f}_seed{s}"] for s in (1, 2)]
            want[f] = _median([_norms(c, "split/N_2/truncation") for c in cases])   # order 4 absent: largest, 2
            disc[f] = _median([_norms(c, "split/N_2/discreteness") for c in cases])
    ax = drawn["fig4b_error_vs_fraction.png"].axes[0]
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert [ln.get_label().split(":")[0] for ln in solid] == ["f = 1, N = 2", "f = 0.5, N = 2"]
    _same(solid[0].get_ydata(), want["1.000"])
    _same(solid[1].get_ydata(), want["0.500"])
    dotted = [ln for ln in ax.get_lines() if ln.get_label().startswith("_")]   # unlabelled: the dotted ones
    assert len(dotted) == 2
    _same(dotted[0].get_ydata(), disc["1.000"])
    _same(dotted[1].get_ydata(), disc["0.500"])
    assert ax.get_title().startswith("Fig. 4b: truncation error vs fraction f")
    assert ax.get_ylabel().startswith("‖truncation error(t)‖₂")
    legend = _legend(ax)
    assert [e.split(":")[0] for e in legend if "discrete lift" not in e][:2] == ["f = 1, N = 2", "f = 0.5, N = 2"]


def test_fig4b_draws_the_discrete_lift_beside_the_paper_lift(qcm_hhl_file, tmp_path, drawn):
    """Both lifts were run (lift = "both"): each f also draws the median error of the exact lift of the
    map at the same N, read from the discrete_N_* groups, dash-dot, and it is not the paper lift's curve."""
    with h5py.File(qcm_hhl_file, "r") as fh:
        figures.fig4b_error_vs_fraction(fh, tmp_path)
        want, paper = {}, {}
        for f in ("1.000", "0.500"):
            cases = [fh[f"qcm/f{f}_seed{s}"] for s in (1, 2)]
            assert all(c["discrete_N_2"].attrs["lift"] == "discrete" for c in cases)
            floor = np.median(np.vstack([c["floor"][()] for c in cases]), axis=0)
            med = _median([_norms(c, "discrete_N_2/eta1") for c in cases])
            want[f] = np.where(med > floor, med, np.nan)      # medians under the rounding floor are not drawn
            paper[f] = _median([_norms(c, "split/N_2/truncation") for c in cases])
    ax = drawn["fig4b_error_vs_fraction.png"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for f, name in (("1.000", "1"), ("0.500", "0.5")):
        (label,) = [k for k in lines if k.startswith(f"f = {name}, N = 2 discrete lift")]
        assert lines[label].get_linestyle() == "-."
        _same(lines[label].get_ydata(), want[f])
        assert np.isfinite(want[f]).sum() >= 3                 # a curve, not only the masked start
        assert not np.allclose(np.nan_to_num(want[f]), np.nan_to_num(paper[f]), rtol=1e-3, atol=0)
        assert label in _legend(ax)


def test_kappa_figure_draws_each_order_against_its_bounds(qcm_hhl_file, tmp_path, drawn):
    with h5py.File(qcm_hhl_file, "r") as fh:
        figures.fig_kappa(fh, tmp_path)
        rows = [(f"{label} N={N}", fh[f"qcm/{label}/N_{N}"].attrs) for label in fh["qcm"] for N in (1, 2)]
        kappa = [a["kappa_M"] for _, a in rows]
        ii83 = [a["kappa_bound_II83"] for _, a in rows]
        general = [a["kappa_bound_general"] for _, a in rows]
    ax = drawn["kappa_bounds.png"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    _same(lines["κ(M) (SLEPc SVD)"].get_ydata(), kappa)
    _same(lines["2(T+1) (eq. II.83)"].get_ydata(), ii83)
    _same(lines["(1+‖I+A‖)Σ‖I+A‖ᵗ (eq. II.81)"].get_ydata(), general)
    assert [t.get_text() for t in ax.get_xticklabels()] == [r for r, _ in rows]
    assert ax.get_ylabel() == "condition number" and ax.get_yscale() == "log"
    assert np.all(np.array(kappa) <= np.array(general) * (1 + 1e-9))   # what the figure shows holds


def test_hhl_figure_draws_infidelity_leakage_and_overlap(qcm_hhl_file, tmp_path, drawn):
    with h5py.File(qcm_hhl_file, "r") as fh:
        figures.fig_hhl(fh, tmp_path)
        cases = [k for k in fh["hhl"] if "hhl" in fh[f"hhl/{k}"]]
        g = fh[f"hhl/{cases[0]}"]
        c = g["hhl/clock_qubits"][()]
        infid = 1 - g["hhl/fidelity"][()]
        leak = g["hhl/leakage"][()]
        tr = g["truncated"]
        kas, clocks = tr["kappa_a"][()], tr["clock_qubits"][()]
        best = clocks == clocks.max()
        order = np.argsort(kas[best])
        overlap = tr["overlap"][()][best][order]
    ax1, ax2, ax3 = drawn["hhl_fidelity.png"].axes
    first = ax1.get_lines()[0]
    assert first.get_label() == f"{cases[0]} case"
    _same(first.get_xdata(), c)
    _same(first.get_ydata(), np.where(infid == 0, np.nan, np.abs(infid)))
    leak_line = [ln for ln in ax2.get_lines() if ln.get_label() == f"{cases[0]} case: leakage"][0]
    _same(leak_line.get_ydata(), leak)
    sim = [ln for ln in ax3.get_lines() if ln.get_label() == f"{cases[0]} case: simulated"][0]
    _same(sim.get_xdata(), kas[best][order])
    _same(sim.get_ydata(), overlap)
    assert ax1.get_xlabel() == "clock qubits c" and ax3.get_xlabel() == "κ_a" and ax3.get_xscale() == "log"
    assert ax1.get_title() == "HHL infidelity vs clock qubits"
    assert ax3.get_title() == "Truncated HHL (dashed: eq. II.87)"


def test_hhl_ii92_figure_draws_the_three_overlaps_and_ii92_against_kappa(qcm_hhl_file, tmp_path, drawn):
    """Per Carleman case: simulated, eq. II.87 and Haar overlaps against kappa_a at the largest clock size,
    eq. II.92 as one marker at 2(T+1); the drawn data are the file's, and eq. II.87/II.89-91 recomputed
    here with numpy from the stored spectrum and right-hand side agree with them."""
    with h5py.File(qcm_hhl_file, "r") as fh:
        figures.fig_hhl_ii92(fh, tmp_path)
        g = fh["hhl/random"]
        tr = g["truncated"]
        kas, clocks = tr["kappa_a"][()], tr["clock_qubits"][()]
        best = clocks == clocks.max()
        order = np.argsort(kas[best])
        sim, ii87, haar = (tr[k][()][best][order] for k in ("overlap", "overlap_ii87", "overlap_haar"))
        ii92 = tr.attrs["overlap_ii92"]
        T = int(g["instance"].attrs["T"])
        spectrum = g["instance/spectrum_H"][()]
    ax = drawn["hhl_ii92_vs_ii87.png"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    _same(lines[f"simulated truncated HHL (c = {clocks.max()})"].get_xdata(), kas[best][order])
    _same(lines[f"simulated truncated HHL (c = {clocks.max()})"].get_ydata(), sim)
    _same(lines["eq. II.87 (exact)"].get_ydata(), ii87)
    _same(lines["Haar estimate eq. II.89–II.91"].get_ydata(), haar)
    marker = lines[f"eq. II.92 (stated for κ_a = 2(T+1) = {2 * (T + 1)})"]
    _same(marker.get_xdata(), [2.0 * (T + 1)])
    _same(marker.get_ydata(), [ii92])
    assert ax.get_title() == "random: eq. II.92 vs eq. II.87" and ax.get_xscale() == "log"
    assert ax.get_ylabel() == "overlap ⟨x|x̃⟩ (unsquared)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "6"]
    # the Haar estimate, independently: Tr(Lbar^-2) / sqrt(Tr(L^-2) (Tr(Lbar^-2) + #ill)) on |lambda|
    a = np.abs(spectrum)
    for k, drawn_value in zip(kas[best][order], haar, strict=True):
        well = a >= 1.0 / k
        tb = np.sum(1 / a[well] ** 2)
        assert drawn_value == pytest.approx(tb / np.sqrt(np.sum(1 / a**2) * (tb + np.sum(~well))), rel=1e-12)


def test_report_table_states_where_ii92_and_ii87_disagree(qcm_hhl_file):
    """The report's II.92 table: one row per clock size at kappa_a = 2(T+1), numbers from the file,
    'no' with the reason when |II.92 - II.87| exceeds the tolerance (here: nothing truncated, II.87 = 1)."""
    from hpcqml.report.build import _hhl_md

    with h5py.File(qcm_hhl_file, "r") as fh:
        lines = _hhl_md(fh)
        tr = fh["hhl/random/truncated"]
        rows = np.flatnonzero(tr["ii92_applies"][()])
        want = [(int(tr["clock_qubits"][i]), tr["overlap"][i], tr["overlap_ii87"][i], tr["overlap_ii92"][i])
                for i in rows]
    start = lines.index("### Eq. II.92 against eq. II.87")
    table = [ln for ln in lines[start:] if ln.startswith("| random |")]
    assert len(table) == len(want) == 2
    for line, (c, sim, ii87, ii92) in zip(table, want, strict=True):
        cells = [x.strip() for x in line.strip("|").split("|")]
        assert len(cells) == 11                      # no '|' inside a cell
        assert cells[1:6] == ["6", str(c), f"{sim:.4f}", f"{ii87:.4f}", cells[5]]
        assert cells[6] == f"{ii92:.4f}" and cells[8] == f"{ii92 - ii87:+.4f}"
        assert cells[9] == "no" and cells[10].startswith("nothing is truncated")


# ---------------------------------------------------------------- spectrum and training (hand-laid file)

STEPS_MEASURED = (0, 3, 8)
TRAIN_STEPS = np.arange(10)
QUANTUM = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0], dtype=np.int8)
DOWNLOADS = np.array([0, 0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=np.int8)


def _density(seed):
    rng = np.random.default_rng(seed)
    grid = np.linspace(-2.0, 3.0, 256)
    rho = np.exp(-((grid - rng.uniform(-1, 1)) ** 2)) + rng.uniform(0, 1e-3, 256)
    return grid, rho


def _proxy(seed, t_max=8):
    rng = np.random.default_rng(100 + seed)
    return np.cumprod(np.concatenate([[1.0], rng.uniform(0.9, 1.2, t_max)]))


def _write_spectrum(fh, label, seed, model_name="resnet8-w1", n=1234):
    r = fh.create_group(f"spectrum/{label}/result")
    r.attrs.update({"complete": True, "eta": 0.05, "model_name": model_name, "n": n})
    grid, rho = _density(seed)
    r["density/grid"], r["density/rho"] = grid, rho
    p = r.create_group("proxy")
    p.attrs["primary"] = "eta"
    for k, conv in enumerate(("eta", "paper")):
        curve = _proxy(seed + 10 * k)
        p[f"{conv}/nodes"] = curve
        p[f"{conv}/log_nodes"] = np.log(curve)
        p[f"{conv}/log_nodes_stderr"] = np.full(curve.shape, 0.1)
        p[f"{conv}/grid"] = curve * 1.01


@pytest.fixture(scope="module")
def spectrum_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("figs_spec") / "spec.h5"
    with h5py.File(path, "w") as fh:
        fh.attrs["schema_version"] = SCHEMA_VERSION
        for s in STEPS_MEASURED:
            _write_spectrum(fh, f"step_{s:06d}", s)
        _write_spectrum(fh, "pruned", 99, model_name="resnet56-w11", n=2_345_678)
        t = fh.create_group("train")
        t.attrs["complete"] = True
        t["step"] = TRAIN_STEPS
        t["quantum_eligible"] = QUANTUM
        t["download"] = DOWNLOADS
        t["batch_accuracy"] = np.linspace(0.1, 0.6, 10)
        t["test_accuracy"] = np.array([0.1, np.nan, np.nan, 0.3, np.nan, np.nan, 0.4, np.nan, np.nan, 0.5])
    return path


def test_fig2a_draws_each_early_density(spectrum_file, tmp_path, drawn):
    with h5py.File(spectrum_file, "r") as fh:
        figures.fig2a_spectra_early(fh, tmp_path, first_steps=5)
    ax = drawn["fig2a_spectra_early.png"].axes[0]
    curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert [ln.get_label() for ln in curves] == ["step 0", "step 3"]     # step 8 is not early
    for ln, s in zip(curves, (0, 3), strict=True):
        grid, rho = _density(s)
        _same(ln.get_xdata(), grid)
        _same(ln.get_ydata(), np.maximum(rho, 1e-12))
    assert ax.get_title() == "Hessian spectra, steps 0–3 (Fig. 2a)"     # the steps drawn, not the limit
    assert ax.get_xlabel() == "Hessian eigenvalue λ" and ax.get_ylabel() == "spectral density ρ(λ)"
    assert ax.get_yscale() == "log" and _legend(ax) == ["step 0", "step 3"]


def test_fig2b_draws_the_densities_at_downloads(spectrum_file, tmp_path, drawn):
    with h5py.File(spectrum_file, "r") as fh:
        figures.fig2b_spectra_downloads(fh, tmp_path)
    ax = drawn["fig2b_spectra_downloads.png"].axes[0]
    assert _legend(ax) == ["step 3", "step 8"]     # the download steps with a spectrum
    curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    _same(curves[1].get_ydata(), np.maximum(_density(8)[1], 1e-12))
    assert ax.get_title() == "Hessian spectra right after downloads (Fig. 2b)"


def _expected_proxy(conv_offset: int, source: str = "nodes") -> np.ndarray:
    """Fig. 2c's rule, spelled out for this file: 1 on classical steps; the quantum segment
    4..7 starts at s0 = 4 and reads E(t = s - 3) of the spectrum measured last before s0 (step 3).
    """
    curve = _proxy(3 + conv_offset) * (1.01 if source == "grid" else 1.0)
    out = np.ones(10)
    for s in range(4, 8):
        out[s] = curve[s - 4 + 1]
    return out


def test_fig2c_draws_the_proxy_of_the_uploaded_state(spectrum_file, tmp_path, drawn):
    with h5py.File(spectrum_file, "r") as fh:
        figures.fig2c_error_proxy(fh, tmp_path)
    fig = drawn["fig2c_error_proxy.png"]
    left, right = fig.axes[:2]
    for ax, offset in ((left, 0), (right, 10)):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        _same(lines["from Ritz nodes and weights"].get_xdata(), TRAIN_STEPS)
        _same(lines["from Ritz nodes and weights"].get_ydata(), _expected_proxy(offset))
        np.testing.assert_allclose(lines["from the 256-point density (paper)"].get_ydata(),
                                   _expected_proxy(offset, "grid"), rtol=1e-15)
        assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "error proxy E (eq. III.12)"
        assert "±1 standard error over probes" in _legend(ax)
    assert left.get_title() == "a = −ηλ (eq. II.65), η = 0.05"
    assert right.get_title() == "other convention: a = −λ"
    assert fig._suptitle.get_text() == "Error proxy during sparse training (Fig. 2c)"


def test_fig2d_draws_accuracies_and_download_markers(spectrum_file, tmp_path, drawn):
    with h5py.File(spectrum_file, "r") as fh:
        figures.fig2d_accuracy(fh, tmp_path)
        test_acc = fh["train/test_accuracy"][()]
    ax = drawn["fig2d_accuracy.png"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    _same(lines["batch accuracy"].get_ydata(), np.linspace(0.1, 0.6, 10))
    ok = np.isfinite(test_acc)
    _same(lines["test accuracy"].get_xdata(), TRAIN_STEPS[ok])
    _same(lines["test accuracy"].get_ydata(), test_acc[ok])
    marks = sorted(float(ln.get_xdata()[0]) for ln in ax.get_lines() if ln.get_label().startswith("_"))
    assert marks == [3.0, 8.0]
    assert ax.get_title() == "Accuracy during sparse training; dashed: downloads (Fig. 2d)"
    assert _legend(ax) == ["batch accuracy", "test accuracy"]


def test_fig3_draws_the_pruned_density_and_names_the_model(spectrum_file, tmp_path, drawn):
    with h5py.File(spectrum_file, "r") as fh:
        figures.fig3_pruned_spectrum(fh, tmp_path)
    ax = drawn["fig3_pruned_spectrum.png"].axes[0]
    (line,) = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    grid, rho = _density(99)
    _same(line.get_xdata(), grid)
    _same(line.get_ydata(), np.maximum(rho, 1e-12))
    assert ax.get_title() == "Hessian spectrum of resnet56-w11, n = 2,345,678 (Fig. 3)"
    assert _legend(ax) == ["pruned"]


def _perf_file(path, ranks, walls):
    with h5py.File(path, "w") as fh:
        fh.attrs["schema_version"] = SCHEMA_VERSION
        for stage, wall in walls.items():
            g = fh.create_group(f"perf/{stage}")
            g.attrs.update({"complete": True, "ranks": ranks})
            g["wall_seconds"] = np.full(ranks, wall * 0.9).tolist()[:-1] + [wall]   # max is `wall`
    return path


def test_scaling_figure_draws_speedup_and_efficiency(tmp_path, drawn):
    paths = [_perf_file(tmp_path / f"r{r}.h5", r, {"qcm": w, "spectrum": 2 * w})
             for r, w in ((1, 100.0), (2, 55.0), (4, 40.0))]
    figures.fig_scaling(paths, tmp_path)
    ax1, ax2 = drawn["scaling.png"].axes
    ranks = np.array([1.0, 2.0, 4.0])
    speedup = 100.0 / np.array([100.0, 55.0, 40.0])
    lines = {ln.get_label(): ln for ln in ax1.get_lines()}
    _same(lines["qcm"].get_xdata(), ranks)
    np.testing.assert_allclose(lines["qcm"].get_ydata(), speedup, rtol=1e-15)
    np.testing.assert_allclose(lines["spectrum"].get_ydata(), speedup, rtol=1e-15)
    _same(lines["ideal"].get_ydata(), [1, 4])
    eff = {ln.get_label(): ln for ln in ax2.get_lines()}
    np.testing.assert_allclose(eff["qcm"].get_ydata(), speedup / ranks, rtol=1e-15)
    assert ax1.get_xlabel() == "MPI ranks" and ax1.get_ylabel() == "speed-up"
    assert ax2.get_ylabel() == "parallel efficiency" and ax2.get_ylim() == (0.0, 1.2)
    assert ax1.get_title() == "Strong scaling from /perf"
    assert _legend(ax1) == ["qcm", "spectrum", "ideal"]


def test_every_report_figure_is_tested_here():
    """A figure added to the report without a test here fails this check."""
    # hhl_scale is drawn from a real size sweep in tests/test_hhl_stage.py (_check_scale_figure);
    # curvature from a tiny curvature run in tests/test_sci_curvature_figure.py
    tested = {"fig2a", "fig2b", "fig2c", "fig2d", "fig3", "curvature", "fig4a", "fig4b", "kappa", "hhl",
              "hhl_ii92", "hhl_scale"}
    assert set(figures.FIGURES) == tested
