"""Report and notebook on a small results file the test makes (qcm + hhl stages only)."""
import os
from pathlib import Path

import pytest

from conftest import REPO, run_cli

CONFIG = """
[run]
output = "{out}"
stages = ["qcm", "hhl", "report"]
seed = 0
[qcm]
n = 2
f = [1.0, 0.5]
N = [1, 2]
T = 6
step_sizes = []
[hhl]
n = 2
N = 1
T = 2
clock_qubits = [3, 5]
kappa_a = [0.0, 2.0]
readout_trials = 20
"""


@pytest.fixture(scope="module")
def small_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg = tmp / "small.toml"
    out = tmp / "small.h5"
    cfg.write_text(CONFIG.format(out=out))
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


def test_notebook_executes(small_results, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["HPCQML_RESULTS"] = str(small_results)
    os.environ["HPCQML_FIGDIR"] = str(tmp_path / "figs")
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        os.environ.pop("HPCQML_RESULTS")
        os.environ.pop("HPCQML_FIGDIR")
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "drawn:" in outputs and "fig4a" in outputs
    assert (tmp_path / "figs" / "fig4a_error_vs_order.png").exists()
