"""The report's small multiples of the spectra per curvature kind and diagonal block, drawn from a
tiny real curvature run (Hessian and GGN of one pruned snapshot, whole support and one block) and
checked by what they draw: panel titles, legend entries and line data against the results file.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from test_hessian_stage import config, make_workdir

from hpcqml.parallel import world
from hpcqml.report import figures
from hpcqml.report.build import make_report
from hpcqml.runner import run_pipeline

torch.set_num_threads(1)

BLOCK = "fc*"   # the head: weight and bias of the last layer
DELTA = 0.5     # negative mass: the mass of the eigenvalues below -DELTA


@pytest.fixture(scope="module")
def curvature_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curv")
    make_workdir(tmp, steps=(0,))
    cfg = config(tmp, curvature=["hessian", "ggn"], blocks=[BLOCK], lanczos_steps=4, probes=1,
                 batch_size=8, micro_batch=8, negative_delta=DELTA)
    return run_pipeline(cfg, world(), quiet=True)


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_small_multiples_draw_each_kind_and_block_from_the_file(curvature_file, tmp_path, drawn):
    groups = {("hessian", ""): "spectrum/step_000000/result",
              ("hessian", BLOCK): f"spectrum/step_000000/hessian/{BLOCK}/result",
              ("ggn", ""): "spectrum/step_000000/ggn/result",
              ("ggn", BLOCK): f"spectrum/step_000000/ggn/{BLOCK}/result"}
    with h5py.File(curvature_file, "r") as fh:
        figures.fig_curvature_spectra(fh, tmp_path)
        want = {k: (fh[g]["density/grid"][()], fh[g]["density/rho"][()], dict(fh[g].attrs)) for k, g in groups.items()}
        negative = {k: (fh[g]["estimates/negative_mass"][0], *fh[g]["estimates/negative_mass_combined"][()])
                    for k, g in groups.items()}
        assert all(fh[g]["estimates/negative_mass"].attrs["delta"] == DELTA for g in groups.values())
    fig = drawn["curvature_spectra.png"]
    axes = np.array(fig.axes).reshape(2, 2)     # rows: hessian, ggn; columns: whole support, the block
    assert fig._suptitle.get_text().startswith("Spectra per curvature kind (rows) and diagonal block (columns)")
    for r, kind in enumerate(("hessian", "ggn")):
        for c, block in enumerate(("", BLOCK)):
            ax = axes[r, c]
            grid, rho, attrs = want[(kind, block)]
            assert attrs["curvature"] == kind and attrs["block"] == block
            assert ax.get_title() == f"step 0: {kind} — {block or 'all kept parameters'}"
            density = ax.get_lines()[0]
            np.testing.assert_array_equal(density.get_xdata(), grid)
            np.testing.assert_array_equal(density.get_ydata(), np.maximum(rho, 1e-12))
            legend = _legend(ax)
            assert legend[0].startswith(f"ρ(λ), n = {attrs['n']:,}, trace {attrs['trace']:.3g}")
            assert legend[1:] == [f"λ_min = {attrs['lambda_min']:.3g}", f"λ_max = {attrs['lambda_max']:.3g}"]
            _, lmin, lmax = ax.get_lines()
            assert lmin.get_xdata()[0] == attrs["lambda_min"] and lmax.get_xdata()[0] == attrs["lambda_max"]
            assert ax.get_xlabel() == "eigenvalue λ" and ax.get_yscale() == "log"
            value, low, high = negative[(kind, block)]
            note = ax.get_legend().get_title().get_text()
            assert note.startswith(f"negative mass (λ < −δ, δ = 0.5):\n{value:.3g}, interval [{low:.3g}, {high:.3g}]")
    # the block is a strict part of the support, and the GGN is positive semidefinite up to Ritz error
    assert want[("hessian", BLOCK)][2]["n"] < want[("hessian", "")][2]["n"]
    assert want[("ggn", "")][2]["lambda_min"] > -1e-6 * want[("ggn", "")][2]["lambda_max"]


def test_report_names_the_small_multiples_and_tabulates_each_spectrum(curvature_file, tmp_path):
    summary = make_report([curvature_file], tmp_path / "rep", quiet=True)
    assert (tmp_path / "rep" / "curvature_spectra.png") in summary.figures
    assert "curvature" not in summary.skipped
    text = summary.markdown.read_text()
    table = text.split("### Spectra per curvature kind and block", 1)[1].split("###", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| step_000000 |")]
    (header,) = [ln for ln in table.splitlines() if ln.startswith("| state |")]
    assert header.rstrip().endswith("| trace | negative mass (λ < −δ, δ = 0.5) |")
    with h5py.File(curvature_file, "r") as fh:
        want = [("hessian", "all kept parameters", fh["spectrum/step_000000/result"].attrs),
                ("hessian", BLOCK, fh[f"spectrum/step_000000/hessian/{BLOCK}/result"].attrs),
                ("ggn", "all kept parameters", fh["spectrum/step_000000/ggn/result"].attrs),
                ("ggn", BLOCK, fh[f"spectrum/step_000000/ggn/{BLOCK}/result"].attrs)]
        want = [(k, b, int(a["n"]), float(a["lambda_min"]), float(a["lambda_max"])) for k, b, a in want]
    assert len(rows) == 4
    for line, (kind, block, n, lmin, lmax) in zip(rows, want, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:4] == [kind, block, f"{n:,}"]
        assert cells[4].startswith(f"{lmin:.4g} ± ") and cells[5].startswith(f"{lmax:.4g} ± ")


def test_a_file_with_one_spectrum_per_state_skips_the_small_multiples(tmp_path):
    with h5py.File(tmp_path / "one.h5", "w") as fh:
        g = fh.create_group("spectrum/step_000000/result")
        g.attrs.update({"curvature": "hessian", "block": "", "complete": True})
        d = g.create_group("density")
        d["grid"], d["rho"] = np.linspace(-1, 1, 5), np.ones(5)
    with h5py.File(tmp_path / "one.h5", "r") as fh, pytest.raises(figures.Skip, match="several curvature kinds"):
        figures.fig_curvature_spectra(fh, tmp_path)
