"""Report and notebook on a small results file the test makes (qcm + hhl stages only)."""
import os
from pathlib import Path

import pytest

from conftest import REPO, run_cli, small_qcm_hhl_config


@pytest.fixture(scope="module")
def small_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = tmp / "small.toml"
    out = tmp / "small.h5"
    cfg.write_text(small_qcm_hhl_config(out, stages=("qcm", "hhl", "report")))
    res = run_cli("--quiet", "run", str(cfg), timeout=600)
    assert res.returncode == 0, res.stderr
    return out


def test_report_stage_and_cli_draw_what_exists(small_results, tmp_path):
    stage_dir = small_results.with_name("small-report")
    assert (stage_dir / "report.md").exists()
    res = run_cli("report", str(small_results), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    for name in ("fig4a_error_vs_order.png", "fig4b_error_vs_fraction.png", "kappa_bounds.png",
                 "hhl_fidelity.png", "report.md"):
        assert name in files, (name, files)
    assert "fig2a_spectra_early.png" not in files
    assert "skipped fig2a: no spectrum" in res.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "### Carleman systems" in text and "## Skipped" in text and "config sha256" in text
    for png in (tmp_path / "rep").glob("*.png"):
        assert png.stat().st_size > 5000   # a drawn figure, not an empty canvas


def test_report_of_unreadable_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"nope")
    res = run_cli("report", str(bad), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1


def test_info_summarises(small_results):
    res = run_cli("info", str(small_results))
    assert res.returncode == 0, res.stderr
    assert "qcm       complete" in res.stdout and "spectrum  not run" in res.stdout


def _execute_notebook(cwd: Path, env: dict[str, str]):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    saved = {k: os.environ.get(k) for k in ("HPCQML_RESULTS", "HPCQML_FIGDIR")}
    for key in saved:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _add_spectrum(path: Path) -> None:
    """Add ``spectrum/step_000000/result`` as the spectrum stage writes it, for a known
    spectrum (diag(-1, 0.5, 1, ..., 4), n = 8, exact with 8 Lanczos steps)."""
    import h5py
    import numpy as np
    import torch

    from hpcqml.hessian.slq import slq
    from hpcqml.stages.spectrum import SCHEMA, result_writer

    diag = torch.tensor([-1.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0], dtype=torch.float64)

    class Diagonal:
        n = 8

        def matvec(self, v):
            return diag * v

    spec = slq(Diagonal(), probes=3, steps=8, seed=0)
    with h5py.File(path, "a") as fh:
        group = fh.create_group("spectrum/step_000000/result")
        result_writer(spec, {k: f.default for k, f in SCHEMA.items()}, 0.01)(group)
        group.attrs.update({"eta": 0.01, "complete": True})
    import hpcqml.results

    with hpcqml.results.open(path) as res:            # read back through the one Spectrum definition
        back = res.spectra["step_000000"].spectrum
    assert np.isclose(back.trace().value, float(diag.sum()), rtol=1e-10)   # z^T D z = tr D for +-1 probes
    assert np.isclose(back.negative_mass().value, 1 / 8, rtol=1e-8)       # one of 8 eigenvalues below 0


def test_notebook_runs_from_notebooks_folder_and_draws_inline(small_results, tmp_path):
    """Started where Jupyter opens it (``notebooks/``), it finds ``results/demo.h5`` above,
    and prints the spectrum's estimates (with their uncertainty) through hpcqml.results."""
    import shutil

    checkout = tmp_path / "checkout"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "results").mkdir()
    shutil.copy(small_results, checkout / "results" / "demo.h5")
    _add_spectrum(checkout / "results" / "demo.h5")
    outputs = _execute_notebook(checkout / "notebooks", {})
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs)
    assert f"file: {checkout / 'results' / 'demo.h5'}" in text
    assert "drawn:" in text and "fig4a" in text
    line = next(x for x in text.splitlines() if x.startswith("step_000000 | trace:"))
    # each estimate prints its value and its [combined interval]
    assert "negative mass (λ < −1):" in line and line.count("[") == 2 and line.count("–") >= 2, line
    assert "dissipative fraction (eta convention):" in text
    inline = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(inline) >= 3                                      # figures shown in the notebook itself
    assert (checkout / "results" / "notebook-figures" / "fig4a_error_vs_order.png").exists()


def test_notebook_reads_an_explicit_path(small_results, tmp_path):
    outputs = _execute_notebook(REPO / "notebooks", {"HPCQML_RESULTS": str(small_results),
                                                     "HPCQML_FIGDIR": str(tmp_path / "figs")})
    text = "".join(o.get("text", "") for o in outputs)
    assert f"file: {small_results}" in text and "qcm       complete" in text
    assert (tmp_path / "figs" / "fig4a_error_vs_order.png").exists()


def test_every_dataset_is_self_describing(small_results):
    """Every dataset has ``units`` and a ``description``. Point it at any results file with
    ``HPCQML_RESULTS=results/demo.h5`` (default: the qcm + hhl file this module makes)."""
    from hpcqml.results import assert_self_describing

    assert_self_describing(os.environ.get("HPCQML_RESULTS") or small_results)


def test_every_dataset_is_documented(small_results):
    """docs/results-schema.md and docs/schema/*.md name every dataset the qcm and hhl stages write
    (the full pipeline's file is checked in test_workdir_binding)."""
    from conftest import undocumented_datasets

    assert undocumented_datasets(os.environ.get("HPCQML_RESULTS") or small_results) == []


def test_late_rate_verdict_flags_a_fit_far_from_its_prediction():
    """The Fig. 4 rate table says whether each fitted rate agrees with its prediction."""
    from hpcqml.report.build import _rate_verdict

    assert _rate_verdict(-0.0101, 0.0002, -0.0103) == "agrees"          # fitted/predicted = 0.98
    assert _rate_verdict(0.0558, 0.0028, -0.0103).startswith("disagrees")  # growing where decay is predicted
    # a factor of 2 (or 1.3) does not pass, whatever one fit's least-squares error says
    assert _rate_verdict(0.020, 0.004, 0.010).startswith("disagrees")
    assert _rate_verdict(0.013, 0.004, 0.010).startswith("disagrees")
    # a window of 20 steps against a predicted rate of 1/400 per step: under one e-fold
    assert _rate_verdict(0.0040, 0.001, 0.0025, window=20).startswith("horizon too short to tell")
    assert _rate_verdict(float("nan"), 0.1, 0.01) == "–"


def test_make_notebook_runs_headless(small_results, tmp_path):
    """``make notebook`` executes the analysis notebook without a browser or server and
    writes the executed copy, whose cells ran without an error output.
    """
    import json
    import subprocess

    executed = REPO / "notebooks" / "analysis-executed.ipynb"
    executed.unlink(missing_ok=True)
    source = (REPO / "notebooks" / "analysis.ipynb").read_bytes()
    res = subprocess.run(["make", "--no-print-directory", "notebook", f"NOTEBOOK_RESULTS={small_results}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (REPO / "notebooks" / "analysis.ipynb").read_bytes() == source  # the checked-in notebook stays clean
    try:
        cells = json.loads(executed.read_text())["cells"]
        outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
        assert all(c.get("execution_count") for c in cells if c["cell_type"] == "code" and c["source"])
    finally:
        executed.unlink(missing_ok=True)
