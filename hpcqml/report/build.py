"""Assemble figures and ``report.md`` from one or more results files."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcqml.errors import UserError
from hpcqml.report.figures import (FIGURES, Skip, curvature_results, delta_text, fig_scaling, negative_mass_delta,
                                   negative_mass_name, proxy_over_training)
from hpcqml import results
from hpcqml.results import Fact, Results, provenance_facts
from hpcqml.store import DAMAGE_ERRORS, damage_error


@dataclass
class ReportSummary:
    """What a report wrote: its folder, figures, skipped figures (with why) and Markdown file."""
    out: Path
    figures: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    markdown: Path | None = None


#: stands for the path from the report folder to docs/science.md until report.md is written
_SCIENCE = "@SCIENCE_MD@"

#: sections of docs/science.md that explain a verdict, by the headings they have there
SCIENCE_SECTIONS = {
    "resolution": 'Certified spectral estimates: brackets, sampling intervals, "resolved"',
    "error bars": "Error bars",
    "bounds": "Carleman linearisation: errors and bounds",
    "fig4": "Fig. 4: random quadratic ODEs",
}


def heading_anchor(title: str) -> str:
    """The anchor Markdown viewers (GitHub, GitLab, VS Code) give a heading: lower case,
    punctuation other than hyphens dropped, spaces as hyphens.
    """
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def why_link(section: str) -> str:
    """A Markdown link to a section of docs/science.md (key of :data:`SCIENCE_SECTIONS`)."""
    return f"[why]({_SCIENCE}#{heading_anchor(SCIENCE_SECTIONS[section])})"


def science_path(out: Path) -> str:
    """docs/science.md relative to the report folder ``out`` (the checkout's copy), in '/' form."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "science.md"
    return Path(os.path.relpath(docs, out.resolve())).as_posix()


def _attr(a: Any, key: str, fmt: str = "{}") -> str:
    if key not in a:
        return "–"
    value = a[key]
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _written_by(res: Results, writer: str | None) -> bool:
    """Whether ``writer`` (``provenance/run_NNN``) is the latest invocation, still running: the
    report is then written by that invocation's report stage, the last of its pipeline.
    """
    inv = res.latest
    return bool(writer) and inv is not None and inv.status == "running" and \
        inv.name.rsplit("/", 1)[-1] == str(writer).rsplit("/", 1)[-1]


def _provenance_md(res: Results, path: Path, writer: str | None = None) -> list[str]:
    """The latest invocation (:func:`hpcqml.results.provenance_facts`) and stale stages, as Markdown.

    Written by the report stage of the latest invocation (``writer``), its status reads
    "complete": every stage before the report, the last one, has finished.
    """
    from hpcqml.store import utc_now

    lines = [f"## {path.name}", ""]
    for i, fact in enumerate(provenance_facts(res.latest, res.attrs)):
        if i == 0 and res.latest is not None and _written_by(res, writer):
            fact = Fact(fact.label, f"complete (every stage before this report finished), "
                                    f"{res.latest.start_time} -> {utc_now()} (report written)")
        lines.append(f"- {fact.label}: " + (f"`{fact.text}`" if fact.code else fact.text))
    stale = [f"{name} ({st.stale_because})" for name, st in res.stages.items() if st.stale]
    if stale:
        lines.append("- stale (inputs recomputed since; rerun them): " + "; ".join(stale))
    lines.append("")
    return lines


def _perf_md(res: Results) -> list[str]:
    if not res.perf:
        return []
    lines = ["| stage | ranks | wall max (s) | MPI max (s) | peak host max (MiB) | work counts (sum) |",
             "|---|---|---|---|---|---|"]
    for stage, rec in res.perf.items():
        counters = ", ".join(f"{c} {int(np.sum(v)):,}" for c, v in rec.counters.items())
        lines.append(f"| {stage} | {rec.ranks} | {rec.wall_seconds.max():.2f} | {rec.comm_seconds.max():.2f} | "
                     f"{rec.peak_host_bytes.max() / 2**20:.0f} | {counters} |")
    return ["### Stage timings", ""] + lines + [""]


#: names of estimates in files of older versions (eq. II.93 is an unsquared overlap)
_OLDER_NAMES = {"overlap_ii93": "fidelity_ii93"}


def _estimate_text(group: h5py.Group, name: str, fmt: str = "{:.4g}") -> str:
    """A stored estimate as :meth:`hpcqml.hessian.spectrum.Estimate.text` prints it: the value
    and its combined interval, or why it is unresolved; an older file's value is not certified.
    """
    from hpcqml.hessian.spectrum import Estimate

    name = name if name in group else _OLDER_NAMES.get(name, name)
    if name not in group:
        return "–"
    d = group[name]
    value, se, lo, hi = (float(v) for v in d[()])
    res = group[f"{name}_resolution"][()] if f"{name}_resolution" in group else (value, value)
    if f"{name}_combined" in group:  # proven bracket and combined interval stored
        low, high = (float(v) for v in group[f"{name}_combined"][()])
        note = d.attrs.get("note", "")
        return Estimate(value, se, lo, hi, resolved=bool(d.attrs.get("resolved", False)),
                        note=note.decode() if isinstance(note, bytes) else str(note),
                        res_low=float(res[0]), res_high=float(res[1]), low=low, high=high).text(fmt)
    # A file of an older version has no proven bracket: its number is shown with its standard
    # error but never as resolved (its old resolution flag was not a bound).
    se_text = f" ± {se:.2g}" if np.isfinite(se) else ""
    return f"{fmt.format(value)}{se_text}, not certified (older file: rerun the spectrum stage)"


def _spectrum_rows(fh: h5py.File) -> list[tuple[str, h5py.Group]]:
    """``(label, result group)`` of every spectrum result with stored estimates."""
    return [(label, g["result"]) for label, g in fh["spectrum"].items()
            if "result" in g and "estimates" in g["result"]]


#: estimate names of the error proxy without the cutoff (eq. III.11), one per t
_NO_CUTOFF = "error_proxy_no_cutoff_t"


def _no_cutoff_proxies(e: h5py.Group) -> list[str]:
    """The stored eq. III.11 proxies of an estimates group, by increasing t."""
    return sorted((k for k in e if k.startswith(_NO_CUTOFF) and k[len(_NO_CUTOFF):].isdigit()),
                  key=lambda k: int(k[len(_NO_CUTOFF):]))


def _convention_rows(label: str, res: h5py.Group) -> list[str]:
    """One table row per mode convention of a result, the primary one first."""
    p = res["proxy"]
    primary = p.attrs.get("primary", "eta")
    primary = primary.decode() if isinstance(primary, bytes) else str(primary)
    rows = []
    for conv in [primary] + [c for c in ("eta", "paper") if c != primary]:
        if conv not in p:
            continue
        e = p[conv]["estimates"]
        a_def = p[conv].attrs.get("a_definition", conv)
        a_def = a_def.decode() if isinstance(a_def, bytes) else str(a_def)
        proxies = sorted((k for k in e if k.startswith("error_proxy_t") and k[len("error_proxy_t"):].isdigit()),
                         key=lambda k: int(k[len("error_proxy_t"):]))
        grid = " / ".join(_estimate_text(e, f"dissipative_fraction_{w}", "{:.3f}")
                          for w in ("grid_half_width", "grid", "grid_double_width"))
        rows.append(f"| {label} | {a_def}{' (primary)' if conv == primary else ''} | "
                    f"{_estimate_text(e, 'dissipative_fraction_nodes', '{:.3f}')} | {grid} | "
                    f"{_estimate_text(e, 'overlap_ii93', '{:.3f}')} | "
                    + "; ".join(f"E({k[len('error_proxy_t'):]}) = {_estimate_text(e, k)}" for k in proxies)
                    + "".join(f"; no cutoff (eq. III.11): E({k[len(_NO_CUTOFF):]}) = {_estimate_text(e, k)}"
                              for k in _no_cutoff_proxies(e)) + " |")
    return rows


def _adaptive_md(rows: list[tuple[str, h5py.Group]]) -> list[str]:
    """Per state: the probes and Lanczos steps used, what ended adaptive stopping, and every
    requested estimate left unresolved with its reason (nothing for files without that record).
    """
    lines = []
    for label, res in rows:
        a = res.attrs
        if "stop_reason" not in a or "probes_setting" not in a:
            continue
        reason, unresolved = _attr(a, "stop_reason"), _attr(a, "unresolved")
        lines.append(f"- {label}: {_attr(a, 'probes')} probes × {_attr(a, 'lanczos_steps')} Lanczos steps "
                     f"(budget {_attr(a, 'max_probes')} × {_attr(a, 'max_lanczos_steps')}), stopped: {reason}"
                     + (f"; unresolved: {unresolved}" if unresolved and unresolved != "–" else ""))
    return ["", "Adaptive stopping (requested estimates, primary convention):", ""] + lines if lines else []


def _negative_mass_column(results: list[h5py.Group]) -> tuple[str, bool]:
    """The header of a table's negative-mass column, which names the threshold δ of μ((−∞, −δ)),
    and whether each cell must name its own δ (the rows were measured with different thresholds).
    """
    deltas = {negative_mass_delta(res) for res in results}
    if len(deltas) == 1:
        return negative_mass_name(deltas.pop()), False
    return "negative mass (λ < −δ)", True


def _negative_mass_cell(res: h5py.Group, e: h5py.Group, own_delta: bool) -> str:
    """The negative-mass estimate of one result, preceded by its δ where the column has none."""
    return (f"{delta_text(negative_mass_delta(res))}: " if own_delta else "") + \
        _estimate_text(e, "negative_mass", "{:.3f}")


def _spectrum_md(fh: h5py.File) -> list[str]:
    if "spectrum" not in fh:
        return []
    rows = _spectrum_rows(fh)
    if not rows:
        return []
    negative, own_delta = _negative_mass_column([res for _, res in rows])
    lines = ["### Hessian spectra (SLQ)", "",
             "Each estimate prints its value and [combined interval]: the proven quadrature bracket of the "
             "probe-exact value widened by the 95 % Student t sampling interval over probes; 'resolved' when "
             "that interval's half-width meets the tolerance, else 'unresolved (reason)' with the reason: "
             "'quadrature: …' (more Lanczos steps narrow it; 'mass at threshold x' when probe mass that the "
             "moments cannot place on either side of the decision point x explains at least half of the "
             "bracket) or 'sampling: …' (more probes narrow it). Definitions: docs/science.md. "
             "Files written by older versions carry no proven bracket: their values print with the "
             "jackknife standard error and 'not certified'.", "",
             f"| state | n | λ_min ± res | λ_max ± res | trace | {negative} | precision | route |",
             "|---|---|---|---|---|---|---|---|"]
    for label, res in rows:
        a, e = res.attrs, res["estimates"]
        lines.append(f"| {label} | {_attr(a, 'n', '{:,}')} | {_attr(a, 'lambda_min', '{:.4g}')} ± "
                     f"{_attr(a, 'lambda_min_residual', '{:.2g}')} | {_attr(a, 'lambda_max', '{:.4g}')} ± "
                     f"{_attr(a, 'lambda_max_residual', '{:.2g}')} | {_estimate_text(e, 'trace')} | "
                     f"{_negative_mass_cell(res, e, own_delta)} | {_attr(a, 'precision')} | "
                     f"{_attr(a, 'route')} |")
    lines += _adaptive_md(rows)
    lines += ["", "Both mode conventions, cutoff |λ| ≥ c as stored (eq. III.12/III.13); "
              "Δ₊/Δ from the density grid at 0.5× / 1× / 2× the kernel width:", "",
              "| state | modes | Δ₊/Δ (nodes) | Δ₊/Δ (grid 0.5× / 1× / 2×) | eq. II.93 | error proxy |",
              "|---|---|---|---|---|---|"]
    for label, res in rows:
        lines += _convention_rows(label, res)
    return lines + [""]


def _curvature_md(fh: h5py.File) -> list[str]:
    """One row per stored spectrum of a model state with several curvature kinds or blocks (the
    numbers beside the small multiples ``curvature_spectra.png``).
    """
    states = curvature_results(fh)
    if not states:
        return []
    negative, own_delta = _negative_mass_column([res for found in states.values() for res in found.values()])
    lines = ["### Spectra per curvature kind and block", "",
             "Every spectrum stored for one model state ([spectrum] curvature and blocks; figure "
             "curvature_spectra.png). Eigenvalues are those of the curvature matrix of the batch-mean loss "
             "with respect to the block's n parameters; estimates print as in the table above.", "",
             f"| state | curvature | block | n | λ_min ± res | λ_max ± res | trace | {negative} |",
             "|---|---|---|---|---|---|---|---|"]
    for label, found in states.items():
        for (kind, block), res in sorted(found.items(), key=lambda kv: (kv[0][0] != "hessian", kv[0])):
            a = res.attrs
            e = res["estimates"] if "estimates" in res else {}
            lines.append(f"| {label} | {kind} | {block or 'all kept parameters'} | {_attr(a, 'n', '{:,}')} | "
                         f"{_attr(a, 'lambda_min', '{:.4g}')} ± {_attr(a, 'lambda_min_residual', '{:.2g}')} | "
                         f"{_attr(a, 'lambda_max', '{:.4g}')} ± {_attr(a, 'lambda_max_residual', '{:.2g}')} | "
                         f"{_estimate_text(e, 'trace') if e else '–'} | "
                         f"{_negative_mass_cell(res, e, own_delta) if e else '–'} |")
    return lines + [""]


#: the reasons the spectrum stage stores with an unresolved estimate (``note``), and what helps
_NOTE_HELP = {
    "bracket wider than tolerance": "more Lanczos steps narrow it",
    "interval wider than tolerance": "more probes narrow it",
    "fewer than 2 probes": "more probes give it",
    "mass at threshold": ("probe mass that the moments cannot place on either side of this decision point "
                          "explains at least half of the bracket; a threshold outside that mass, or more "
                          "Lanczos steps once the nodes resolve the mass near it, narrow it"),
}


def unresolved_reason(note: str) -> str:
    """The stored reason of an unresolved estimate in words, with what would resolve it."""
    if not note:
        return ("the Ritz values do not decide it within the tolerance; more Lanczos steps or probes "
                "narrow it")
    helps = [help_ for key, help_ in _NOTE_HELP.items() if key in note]
    return note + (f" ({'; '.join(helps)})" if helps else "")


def _not_numbers(e: h5py.Group) -> tuple[dict[str, str], list[str]]:
    """The unresolved estimates in ``e`` (name -> stored reason), and the names of the resolved ones
    without a standard error (too few probes).
    """
    unresolved, unknown = {}, []
    for name, d in e.items():
        if not isinstance(d, h5py.Dataset) or d.shape != (4,) or \
                name.endswith(("_resolution", "_per_probe", "_combined", "_per_probe_bounds")):
            continue
        if not bool(d.attrs.get("resolved", False)):
            note = d.attrs.get("note", "")
            unresolved[name] = note.decode() if isinstance(note, bytes) else str(note)
        elif not np.isfinite(float(d[()][1])):
            unknown.append(name)
    return unresolved, unknown


def _spectrum_reasons_md(fh: h5py.File) -> list[str]:
    """One row per reason why entries of the spectrum tables are not plain numbers: the reason in
    words with what would resolve it and a link to docs/science.md, and where it applies
    (state, modes: quantities).
    """
    if "spectrum" not in fh:
        return []
    no_se = f"no standard error: too few probes (raise probes) {why_link('error bars')}"
    where: dict[str, dict[str, list[str]]] = {}
    for label, res in _spectrum_rows(fh):
        groups = [("all", res["estimates"])]
        if "proxy" in res:
            groups += [(c, res[f"proxy/{c}/estimates"]) for c in ("eta", "paper") if f"proxy/{c}/estimates" in res]
        for conv, e in groups:
            unresolved, unknown = _not_numbers(e)
            state = label + {"eta": " (a = −ηλ)", "paper": " (a = −λ)"}.get(conv, "")
            for name, note in unresolved.items():
                reason = f"unresolved: {unresolved_reason(note)} {why_link('resolution')}"
                where.setdefault(reason, {}).setdefault(state, []).append(name)
            if unknown:
                where.setdefault(no_se, {}).setdefault(state, []).extend(unknown)
    if not where:
        return []
    rows = [f"| {reason} | " + "; ".join(f"{state}: {', '.join(names)}" for state, names in places.items()) + " |"
            for reason, places in where.items()]
    return ["Why entries of the tables above are not plain numbers:", "",
            "| why | where (state: quantities) |", "|---|---|", *rows, ""]


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


#: violated-bound name -> (attribute of the bound, attribute of the measured quantity) in a qcm order group
_QCM_BOUND_KEYS = {
    "II57": ("bound_II57", "measured_II57"),
    "II57_inverse_norm": ("bound_II57_inverse_norm", "measured_II57"),
    "II57_truncation": ("bound_II57", "measured_II57_truncation"),
    "II60": ("eps", "order_II60_measured"),
    "discrete": ("bound_discrete", "measured_II57"),
    "kappa_II83": ("kappa_bound_II83", "kappa_M"),
    "kappa_II81": ("kappa_bound_general", "kappa_M"),
    "kappa_II81_power_norms": ("kappa_bound_II81_power_norms", "kappa_M"),
    "II81_power_norms": ("bound_II81_power_norms", "inverse_norm_M"),
    "II81_norm_powers": ("bound_II81_norm_powers", "inverse_norm_M"),
}


def _qcm_order_keys(case: h5py.Group) -> list[str]:
    """Order groups of a qcm case: the paper lift's ``N_*`` first, then the discrete lift's ``discrete_N_*``."""
    paper = sorted((k for k in case if k.startswith("N_")), key=lambda k: int(k[2:]))
    exact = sorted((k for k in case if k.startswith("discrete_N_")), key=lambda k: int(k[len("discrete_N_"):]))
    return paper + exact


def _dissipative_cell(a: Any) -> str:
    """'dissipative/divergent' with whether the counts cover all eigenvalues or only the computed ones."""
    scope = a.get("dissipative_count_scope", "")
    scope = scope.decode() if isinstance(scope, bytes) else str(scope)
    return f"{_attr(a, 'dissipative_modes')}/{_attr(a, 'divergent_modes')} ({scope or 'scope not recorded'})"


def _rate_verdict(fit: float, se: float, pred: float,  # noqa: ARG001 - se kept for callers, not used
                  window: int = 0) -> str:
    """One fit against its prediction: 'agrees' or 'disagrees' (ratio fitted/predicted within 15 % of 1
    or not), 'horizon too short to tell' when the fit window of ``window`` steps spans less than one
    e-fold of the predicted rate (window · |pred| < 1), each verdict but 'agrees' with its reason.

    The least-squares error ``se`` of one fit is not used: its residuals are deterministic transients,
    not independent noise.  The verdict over seeds is :func:`hpcqml.carleman.timestepping.rate_agreement`.
    """
    from hpcqml.carleman.timestepping import RATE_RTOL

    if not (np.isfinite(fit) and np.isfinite(pred)) or pred == 0:
        return "–"
    if 0 < window * abs(pred) < 1.0:
        return verdict_cell("horizon too short to tell", window * abs(pred))
    return "agrees" if abs(fit / pred - 1.0) <= RATE_RTOL else verdict_cell("disagrees", window * abs(pred))


def verdict_cell(verdict: str, efolds: float) -> str:
    """A rate verdict with its reason in words and a link to docs/science.md ('agrees' alone)."""
    reasons = {
        "disagrees": "fitted/predicted lies outside 1 ± 15 %",
        "unresolved": "the interval of fitted/predicted straddles an edge of 1 ± 15 %; more seeds narrow it",
        "horizon too short to tell": f"the fit window spans {efolds:.2g} e-folds of the predicted rate, fewer "
                                     "than one; a longer T tells",
    }
    if verdict == "agrees":
        return verdict
    reason = reasons.get(verdict) or (verdict.split("(", 1)[1].rstrip(")") if "(" in verdict else "")
    return f"{verdict.split(' (')[0]}: {reason} {why_link('fig4')}" if reason else f"{verdict} {why_link('fig4')}"


def _rate_groups_md(groups: dict[tuple[float, int], dict[str, list]]) -> list[str]:
    """Table of the verdict over seeds per (f, N) (:func:`hpcqml.carleman.timestepping.rate_agreement`)."""
    from hpcqml.carleman.timestepping import rate_agreement

    rows = []
    for (f, N), g in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        r = rate_agreement(np.asarray(g["fit"]), np.asarray(g["pred"]), int(max(g["window"])))
        rows.append(f"| {f:g} | {N} | {int(r['seeds'])} | {float(r['median']):.3f} | [{float(r['low']):.3f}, "
                    f"{float(r['high']):.3f}] ({float(r['coverage']):.0%}) | {float(r['efolds']):.2g} | "
                    f"{verdict_cell(str(r['verdict']), float(r['efolds']))} |")
    return rows


def _violation_reason(bound: float, measured: float) -> str:
    """Why a bound row is in the violated table, in words, with the link to the bounds' section."""
    if not (np.isfinite(bound) and np.isfinite(measured)):
        return f"the bound or the measured value is not finite {why_link('bounds')}"
    factor = f" by a factor {measured / bound:.3g}" if bound > 0 else ""
    return f"the measured value exceeds the bound{factor} {why_link('bounds')}"


def _qcm_md(fh: h5py.File) -> list[str]:
    """Carleman table, late-time rates (Fig. 4) and every bound that was checked and did not hold."""
    if "qcm" not in fh:
        return []
    lines = ["### Carleman systems", "",
             "| case | lift | N | Δ | nnz(A) | KSP its | max abs η₁ | ‖I+A‖ | κ(M) | 2(T+1) | Σ‖(I+A)ᵗ‖ | "
             "Σ‖I+A‖ᵗ | 1/σ_min(M) | R | dissipative/divergent (scope) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rates, violated = [], []
    groups: dict[tuple[float, int], dict[str, list]] = {}
    for label, case in fh["qcm"].items():
        for key in _qcm_order_keys(case):
            a = case[key].attrs
            eta = np.max(np.abs(case[f"{key}/eta1"][()])) if "eta1" in case[key] else float("nan")
            lines.append(f"| {label} | {_attr(a, 'lift', '{}') if 'lift' in a else 'paper'} | {_attr(a, 'N')} | "
                         f"{_attr(a, 'Delta', '{:,}')} | {_attr(a, 'nnz_A', '{:,}')} | "
                         f"{_attr(a, 'ksp_iterations')} | {eta:.3e} | {_attr(a, 'norm_I_plus_A', '{:.4f}')} | "
                         f"{_attr(a, 'kappa_M', '{:.4g}')} | {_attr(a, 'kappa_bound_II83', '{:.4g}')} | "
                         f"{_attr(a, 'bound_II81_power_norms', '{:.4g}')} | "
                         f"{_attr(a, 'bound_II81_norm_powers', '{:.4g}')} | "
                         f"{_attr(a, 'inverse_norm_M', '{:.4g}')} | {_attr(a, 'R_PNAS', '{:.3g}')} | "
                         f"{_dissipative_cell(a)} |")
            names = a.get("violated_bounds", "")
            names = names.decode() if isinstance(names, bytes) else str(names)
            for name in filter(None, names.split(",")):
                bkey, mkey = _QCM_BOUND_KEYS.get(name, (f"bound_{name}", f"measured_{name}"))
                bound, measured = a.get(bkey, float("nan")), a.get(mkey, float("nan"))
                tag = "" if key.startswith("N_") else " (discrete lift)"
                violated.append(f"| {label} | {a.get('N')}{tag} | {name} | {float(bound):.3e} | "
                                f"{float(measured):.3e} | {_violation_reason(float(bound), float(measured))} |")
        if "rates" in case:
            r = case["rates"]
            for i, N in enumerate(r["N"][()]):
                fit, se, pred = r["fitted"][()][i], r["fitted_se"][()][i], r["predicted"][()][i]
                lw = r.attrs.get("late_window", (0, 0))
                rates.append(f"| {label} | {N} | {fit:+.4f} | {pred:+.4f} | {float(r['rho'][()]):+.4f} | "
                             f"{_rate_verdict(fit, se, pred, int(lw[1]) - int(lw[0]))} |")
                if "f" in case.attrs:
                    g = groups.setdefault((float(case.attrs["f"]), int(N)), {"fit": [], "pred": [], "window": []})
                    lw = r.attrs.get("late_window", (0, 0))
                    g["fit"].append(fit)
                    g["pred"].append(pred)
                    g["window"].append(int(lw[1]) - int(lw[0]))
    lines.append("")
    lines += ["Dissipative/divergent counts use |1 + a| < 1 over the eigenvalues a of A "
              "(`hpcqml.carleman.spectra.dissipative_counts`, eq. II.28), the same test as the truncated-HHL "
              "counts and the SLQ mass fractions; '(complete)' means all Δ eigenvalues were computed, "
              "'computed eigenvalues only' means only the extremal ones beyond `dense_limit`, so the counts are "
              "not the whole spectrum's.",
              "Lift 'paper' is I + A of eq. II.3-II.6 (forward Euler of the continuous-time lift); 'discrete' is "
              "the exact lift of the map u -> u + F(u) (Kronecker powers of u + F(u), truncated at N), which has "
              "no discreteness error. Errors η₁ are in the units of u. Σ‖(I+A)ᵗ‖ (t = 0..T) is eq. II.81 as "
              "printed, a bound on ‖M⁻¹‖ = 1/σ_min(M) ('–' or nan where the dense powers were not affordable); "
              "Σ‖I+A‖ᵗ is the looser bound of eq. II.83's derivation. R (dimensionless) is Liu et al., PNAS 118, "
              "e2026805118 (2021): R = (‖u_in‖‖F₂‖ + ‖F₀‖/‖u_in‖)/|Re λ₁(F₁)|, their Carleman convergence "
              "condition R < 1 for dissipative quadratic equations (nan where not defined).", ""]
    if rates:
        lines += ["#### Late-time error rates (Fig. 4)", "",
                  "Slope of log‖ŷ₁^(N_ref) − ŷ₁^(N)‖₂ over the late window (1/step), "
                  "against (N+1)ρ for a divergent mode or ρ for the slowest dissipative one, "
                  "ρ = max log|1 + a| over the eigenvalues a of F₁. Per case, 'agrees' means the ratio "
                  "fitted/predicted is within 15 % of 1 (one fit, no interval: the least-squares error of a fit "
                  "to deterministic transients is not a statistical error).", "",
                  "| case | N | fitted rate per step | predicted | ρ | one-fit verdict |", "|---|---|---|---|---|---|",
                  *rates, ""]
        group_rows = _rate_groups_md(groups)
        if group_rows:
            lines += ["Over seeds, per (f, N): median of fitted/predicted with a distribution-free order-statistic "
                      "interval (coverage in brackets). 'agrees' only when the whole interval lies within ±15 % "
                      "(a factor of 1.3 cannot pass), 'disagrees' when it lies outside, 'unresolved' otherwise; "
                      "'horizon too short to tell' when the fit window spans less than one e-fold of the predicted "
                      "rate (column e-folds = window length × |median predicted rate|).", "",
                      "| f | N | seeds | median ratio | interval | e-folds | verdict |",
                      "|---|---|---|---|---|---|---|", *group_rows, ""]
    lines += ["#### Violated bounds", ""]
    if violated:
        lines += ["| case | N | bound | bound value | measured | why |", "|---|---|---|---|---|---|", *violated, ""]
    else:
        lines += ["Every checked bound held.", ""]
    return lines


def _hhl_md(fh: h5py.File) -> list[str]:
    """Plain HHL at the largest clock size per case: fidelities, leakage, ||x|| from p_success, read-out
    (read through :class:`hpcqml.hhl.case.HHLCase`).
    """
    from hpcqml.hhl.case import read_cases

    cases = read_cases(fh)
    if not cases:
        return []
    lines = ["### Simulated HHL", "",
             "Largest clock size per case. Leakage and the clock-traced fidelity do not converge with the "
             "clock for plain HHL (docs/science.md); ||x|| is estimated from the success probability. "
             "Fidelities are squared overlaps |⟨x_ref|x⟩|². Method: statevector (dense clock register) or "
             "krylov (Chebyshev matrix functions, error bound in the results).", "",
             "| case | dim | clock qubits | on grid | fidelity | clock-traced fid. | leakage | success prob. | "
             "‖x‖ est. (rel. err.) | read-out shots (eq. II.99) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, case in cases.items():
        h, inst = case.hhl, case.instance.attrs
        i = int(np.argmax(h["clock_qubits"]))
        ro = case.readout.attrs if case.readout is not None else {}
        grid = ("yes" if h["clock_exact"][i] else "no") if "clock_exact" in h else "–"
        norm = "–"
        if "x_norm_estimate" in h and "x_norm" in inst:
            est = float(h["x_norm_estimate"][i])
            norm = f"{est:.4g} ({est / inst['x_norm'] - 1:+.1e})" if np.isfinite(est) else "undefined"
        lines.append(f"| {label} ({case.method}) | {_attr(inst, 'embedded_dim')} | {h['clock_qubits'][i]} | {grid} | "
                     f"{h['fidelity'][i]:.6f} | {h['density_fidelity'][i]:.4f} | {h['leakage'][i]:.3g} | "
                     f"{h['p_success'][i]:.3g} | {norm} | "
                     f"{_attr(ro, 'mean', '{:.1f}')} ({_attr(ro, 'expected_ii99', '{:.1f}')}) |")
    return lines + [""] + _ii92_md(cases)


def _ii92_md(cases: dict) -> list[str]:
    """Eq. II.92 against eq. II.87 at the paper's κ_a = 2(T+1), per Carleman case and clock size."""
    from hpcqml.hhl.case import II92_TOLERANCE

    rows = [(label, r) for label, case in cases.items() for r in case.truncated.ii92_rows()]
    if not rows:
        return []
    lines = ["### Eq. II.92 against eq. II.87", "",
             "Truncated HHL at the paper's κ_a = 2(T+1) (eq. II.83), on the same M: the simulated overlap, the "
             "exact eq. II.87 from the eigen-decomposition of M's Hermitian embedding, its Haar estimate "
             "(eq. II.89–II.91), and the paper's eq. II.92 and eq. II.93 from the dissipative mode counts of "
             "A. All are unsquared overlaps ⟨x|x̃⟩ (dimensionless). 'agree' means |II.92 − II.87| ≤ "
             f"{II92_TOLERANCE:g}; the reason column says why they differ (docs/science.md, "
             "\"Eq. II.92 against eq. II.87\").", "",
             "| case | κ_a | c | simulated | eq. II.87 | Haar | eq. II.92 | eq. II.93 | II.92 − II.87 | agree "
             "| reason |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['kappa_a']:g} | {r['c']} | {r['simulated']:.4f} | {r['ii87']:.4f} | "
                     f"{r['haar']:.4f} | {r['ii92']:.4f} | {r['ii93']:.4f} | {r['gap']:+.4f} | "
                     f"{'yes' if r['agree'] else 'no'} | {r['reason']} |")
    return lines + [""]


def _report_one(res: Results, path: Path, prefix: str, out: Path, summary: ReportSummary,
                writer: str | None = None) -> list[str]:
    """Figures and markdown of one results file (``writer``: see :func:`make_report`)."""
    fh = res.file
    md = _provenance_md(res, path, writer)
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
    return (md + _perf_md(res) + _train_md(fh) + _spectrum_md(fh) + _curvature_md(fh) + _spectrum_reasons_md(fh)
            + _qcm_md(fh) + _hhl_md(fh))


def make_report(paths: list[str | Path], out: str | Path, quiet: bool = False,
                writer: str | None = None) -> ReportSummary:
    """Draw every figure the files allow into ``out`` and write ``out/report.md``.

    Args:
        paths: results files (several files of one study add the scaling figure).
        out: folder for the figures and report.md.
        quiet: no summary lines on stderr.
        writer: the invocation (``provenance/run_NNN``) whose report stage writes this report, if
            any: its status then reads "complete" instead of "running".

    Returns:
        What was drawn, skipped (with why) and written.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise UserError("report: no results file given")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = ReportSummary(out=out)
    md = ["# hpcqml report", ""]
    for path in files:
        prefix = "" if len(files) == 1 else f"{path.stem}_"
        with results.open(path) as res:
            try:
                md += _report_one(res, path, prefix, out, summary, writer)
            except DAMAGE_ERRORS as exc:
                error = damage_error(path, exc)
                if error is None:
                    raise
                raise error from None
    try:
        summary.figures.append(fig_scaling(files, out))
    except Skip as skip:
        summary.skipped["scaling"] = str(skip)
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in summary.figures] + [""]
    if summary.skipped:
        md += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in summary.skipped.items()] + [""]
    summary.markdown = out / "report.md"
    from hpcqml.io import atomic_write_bytes

    atomic_write_bytes(summary.markdown, "\n".join(md).replace(_SCIENCE, science_path(out)).encode())
    if not quiet:
        print(f"report: {len(summary.figures)} figure(s) and report.md in {out}", file=sys.stderr)
        for name, why in summary.skipped.items():
            print(f"report: skipped {name}: {why}", file=sys.stderr)
    return summary


def add_arguments(parser: Any) -> None:
    """Options of ``hpcqml report``."""
    parser.add_argument("results", nargs="+", help="results file(s); several files of one study add scaling plots")
    parser.add_argument("--out", required=True, help="folder for the PNG figures and report.md")


def cli_main(args: Any) -> int:
    """``hpcqml report RESULTS... --out DIR``: figures and report.md; returns the exit code."""
    make_report(args.results, args.out, quiet=getattr(args, "quiet", False))
    return 0
