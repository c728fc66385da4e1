"""Assemble figures and ``report.md`` from one or more results files."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from hpcqml.errors import UserError
from hpcqml.report.figures import FIGURES, Skip, fig_scaling, proxy_over_training
from hpcqml.store import open_results


@dataclass
class ReportSummary:
    out: Path
    figures: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    markdown: Path | None = None


def _attr(a, key: str, fmt: str = "{}") -> str:
    if key not in a:
        return "–"
    value = a[key]
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _provenance_md(fh: h5py.File, path: Path) -> list[str]:
    a = fh.attrs
    lines = [f"## {path.name}", "",
             f"- command: `{_attr(a, 'prov_command_line')}`",
             f"- code: hpcqml {_attr(a, 'hpcqml_version')}, git {_attr(a, 'prov_git_commit')}",
             f"- MPI ranks: {_attr(a, 'prov_mpi_size')} on {_attr(a, 'prov_hosts')}",
             f"- run: {_attr(a, 'prov_start_time')} → {_attr(a, 'prov_end_time')} ({_attr(a, 'prov_status')})",
             f"- config sha256: `{_attr(a, 'config_sha256')[:16]}`"]
    if "prov_versions" in a:
        versions = json.loads(a["prov_versions"])
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    lines.append("")
    return lines


def _perf_md(fh: h5py.File) -> list[str]:
    if "perf" not in fh:
        return []
    lines = ["| stage | ranks | wall max (s) | MPI max (s) | peak host max (MiB) | work counts (sum) |",
             "|---|---|---|---|---|---|"]
    for stage, g in fh["perf"].items():
        counters = ", ".join(f"{c} {int(np.sum(g['counters'][c][()])):,}" for c in g["counters"])
        lines.append(f"| {stage} | {g.attrs['ranks']} | {np.max(g['wall_seconds'][()]):.2f} | "
                     f"{np.max(g['comm_seconds'][()]):.2f} | {np.max(g['peak_host_bytes'][()]) / 2**20:.0f} | "
                     f"{counters} |")
    return ["### Stage timings", ""] + lines + [""]


def _spectrum_md(fh: h5py.File) -> list[str]:
    if "spectrum" not in fh:
        return []
    lines = ["### Hessian spectra (SLQ)", "",
             "| state | n | λ_min ± res | λ_max ± res | trace ± s.e. | mass < 0 | Δ₊/Δ (nodes) | eq. II.93 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, g in fh["spectrum"].items():
        if "result" not in g:
            continue
        a = g["result"].attrs
        p = g["result/proxy"].attrs if "result/proxy" in g else {}
        lines.append(f"| {label} | {_attr(a, 'n', '{:,}')} | {_attr(a, 'lambda_min', '{:.4g}')} ± "
                     f"{_attr(a, 'lambda_min_residual', '{:.2g}')} | {_attr(a, 'lambda_max', '{:.4g}')} ± "
                     f"{_attr(a, 'lambda_max_residual', '{:.2g}')} | {_attr(a, 'trace', '{:.4g}')} ± "
                     f"{_attr(a, 'trace_se', '{:.2g}')} | {_attr(a, 'mass_below_zero', '{:.3f}')} | "
                     f"{_attr(p, 'dissipative_fraction_nodes', '{:.3f}')} | {_attr(p, 'fidelity_ii93_nodes', '{:.3f}')} |")
    return lines + [""]


def _train_md(fh: h5py.File) -> list[str]:
    if "train" not in fh:
        return []
    g = fh["train"]
    test = g["test_accuracy"][()]
    ok = np.isfinite(test)
    lines = ["### Sparse training", "",
             f"- model {_attr(g.attrs, 'model')} ({_attr(g.attrs, 'num_parameters', '{:,}')} parameters), "
             f"{_attr(g.attrs, 'steps')} steps of B = {_attr(g.attrs, 'batch_size')}, lr {_attr(g.attrs, 'lr')}, "
             f"download every {_attr(g.attrs, 'download_every')} steps",
             f"- final batch loss {g['loss'][()][-1]:.4f}, final sparsity {g['sparsity'][()][-1]:.3f}"
             + (f", last test accuracy {test[ok][-1]:.4f}" if ok.any() else "")]
    try:
        step, proxy = proxy_over_training(fh)
        finite = proxy[np.isfinite(proxy)]
        if finite.size:
            lines.append(f"- error proxy over the run: min {finite.min():.4g}, max {finite.max():.4g}")
    except Skip:
        pass
    return lines + [""]


def _qcm_md(fh: h5py.File) -> list[str]:
    if "qcm" not in fh:
        return []
    lines = ["### Carleman systems", "",
             "| case | N | Δ | nnz(A) | KSP its | max abs η₁ | ‖I+A‖ | κ(M) | 2(T+1) | dissipative/divergent |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, case in fh["qcm"].items():
        for key in sorted(k for k in case if k.startswith("N_")):
            a = case[key].attrs
            eta = np.max(np.abs(case[f"{key}/eta1"][()])) if "eta1" in case[key] else float("nan")
            lines.append(f"| {label} | {_attr(a, 'N')} | {_attr(a, 'Delta', '{:,}')} | {_attr(a, 'nnz_A', '{:,}')} | "
                         f"{_attr(a, 'ksp_iterations')} | {eta:.3e} | {_attr(a, 'norm_I_plus_A', '{:.4f}')} | "
                         f"{_attr(a, 'kappa_M', '{:.4g}')} | {_attr(a, 'kappa_bound_II83', '{:.4g}')} | "
                         f"{_attr(a, 'dissipative_modes')}/{_attr(a, 'divergent_modes')} |")
    return lines + [""]


def _hhl_md(fh: h5py.File) -> list[str]:
    if "hhl" not in fh:
        return []
    lines = ["### Simulated HHL", "", "| case | dim | clock qubits | fidelity | success prob. | read-out shots (eq. II.99) |",
             "|---|---|---|---|---|---|"]
    for label, g in fh["hhl"].items():
        if "hhl" not in g:
            continue
        c = g["hhl/clock_qubits"][()]
        i = int(np.argmax(c))
        ro = g["readout"].attrs if "readout" in g else {}
        lines.append(f"| {label} | {_attr(g['instance'].attrs, 'embedded_dim')} | {c[i]} | "
                     f"{g['hhl/fidelity'][()][i]:.6f} | {g['hhl/p_success'][()][i]:.3g} | "
                     f"{_attr(ro, 'mean', '{:.1f}')} ({_attr(ro, 'expected_ii99', '{:.1f}')}) |")
    return lines + [""]


def make_report(paths: list[str | Path], out: str | Path, quiet: bool = False) -> ReportSummary:
    """Draw every figure the files allow into ``out`` and write ``out/report.md``."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("report: no results file given")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = ReportSummary(out=out)
    md = ["# hpcqml report", ""]
    for path in paths:
        prefix = "" if len(paths) == 1 else f"{path.stem}_"
        with open_results(path) as fh:
            md += _provenance_md(fh, path)
            for name, draw in FIGURES.items():
                try:
                    drawn = draw(fh, out)
                except Skip as why:
                    summary.skipped[f"{prefix}{name}"] = str(why)
                    continue
                if prefix:
                    renamed = drawn.with_name(prefix + drawn.name)
                    drawn.replace(renamed)
                    drawn = renamed
                summary.figures.append(drawn)
            md += _perf_md(fh) + _train_md(fh) + _spectrum_md(fh) + _qcm_md(fh) + _hhl_md(fh)
    try:
        summary.figures.append(fig_scaling(paths, out))
    except Skip as why:
        summary.skipped["scaling"] = str(why)
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in summary.figures] + [""]
    if summary.skipped:
        md += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in summary.skipped.items()] + [""]
    summary.markdown = out / "report.md"
    from hpcqml.io import atomic_write_bytes

    atomic_write_bytes(summary.markdown, "\n".join(md).encode())
    if not quiet:
        print(f"report: {len(summary.figures)} figure(s) and report.md in {out}", file=sys.stderr)
        for name, why in summary.skipped.items():
            print(f"report: skipped {name}: {why}", file=sys.stderr)
    return summary


def add_arguments(parser) -> None:
    parser.add_argument("results", nargs="+", help="results file(s); several files of one study add scaling plots")
    parser.add_argument("--out", required=True, help="folder for the PNG figures and report.md")


def cli_main(args) -> int:
    make_report(args.results, args.out, quiet=getattr(args, "quiet", False))
    return 0
