"""One function per figure. Each reads an open results file and returns the PNG path it
wrote, or raises :class:`Skip` naming what the file lacks. Figure numbers follow the paper.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axis import Axis


class Skip(Exception):
    """The results file lacks what a figure needs; the message says what."""


def _need(fh: h5py.File, key: str, what: str) -> h5py.Group:
    obj = fh.get(key)
    if obj is None or (isinstance(obj, h5py.Group) and not obj.attrs.get("complete", True)):
        raise Skip(f"no {what} ({key})")
    return obj


def _save(fig: Any, out: Path, name: str) -> Path:
    """Write ``fig`` to ``out/name`` atomically (never through a symlink planted there) and close it."""
    from hpcqml.io import atomic_write

    path = out / name
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, dpi=110, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def _densities(fh: h5py.File, labels: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for label in labels:
        key = f"spectrum/{label}/result/density"
        if key in fh:
            out.append((label, fh[f"{key}/grid"][()], fh[f"{key}/rho"][()]))
    return out


def _step_labels(fh: h5py.File) -> dict[int, str]:
    if "spectrum" not in fh:
        return {}
    steps = {}
    for label in fh["spectrum"]:
        m = re.fullmatch(r"step_(\d+)", label)
        if m and f"spectrum/{label}/result" in fh:
            steps[int(m.group(1))] = label
    return steps


def human_label(label: str) -> str:
    """A results-file group name as a legend says it: ``step_000012`` -> ``step 12``."""
    m = re.fullmatch(r"step_(\d+)", label)
    return f"step {int(m.group(1))}" if m else label


def _plain(value: float, _pos: object = None) -> str:
    """A tick label without exponent notation: 4, 0.5, -20, 1e+04 only beyond 5 digits."""
    return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.0e}"


def integer_ticks(axis: Axis) -> None:
    """Ticks of an axis of whole numbers (training steps, clock qubits) at integers only."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def value_ticks(axis: Axis, values: np.ndarray, most: int = 6) -> None:
    """On a log axis with few distinct values (κ_a = 4 and 8), ticks at exactly those values,
    labelled plainly ("4", "8", not "4×10⁰"), no minor ticks.  More values: left as they are.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    distinct = np.unique(np.asarray(values, dtype=np.float64))
    distinct = distinct[np.isfinite(distinct) & (distinct > 0)]
    if 0 < distinct.size <= most:
        axis.set_major_locator(FixedLocator(distinct))
        axis.set_major_formatter(FuncFormatter(_plain))
        axis.set_minor_locator(NullLocator())


def symlog_ticks(low: float, high: float, linthresh: float) -> list[float]:
    """Ticks of a symlog axis over [low, high]: 0, then 1, 2 and 5 times each decade outside
    the linear zone |x| < linthresh, and both ends (rounded to two significant digits) so the
    extreme eigenvalues can be read off; a decade tick closer than a fifth of a decade to an
    end (in the axis' log coordinate) gives way to the end.
    """
    def where(x: float) -> float:   # the symlog coordinate, in decades past the linear zone
        return float(np.sign(x) * (np.log10(abs(x) / linthresh) + 1) if abs(x) > linthresh else x / linthresh)

    ends = [float(f"{v:.2g}") for v in (low, high) if abs(v) > linthresh]
    ticks = {0.0, *ends}
    top = max(abs(low), abs(high))
    for k in range(int(np.floor(np.log10(linthresh))), int(np.ceil(np.log10(top))) + 1):
        for m in (1.0, 2.0, 5.0):
            for x in (m * 10.0 ** k, -m * 10.0 ** k):
                if abs(x) >= 2 * linthresh and low <= x <= high and \
                        all(abs(where(x) - where(e)) >= 0.2 for e in ends):
                    ticks.add(x)
    return sorted(ticks)


def _density_axes(ax: Any, curves: list[tuple[str, np.ndarray, np.ndarray]], title: str, cmap: str = "viridis",
                  log: bool = True) -> None:
    from matplotlib.ticker import FuncFormatter, NullLocator

    colors = plt.get_cmap(cmap)(np.linspace(0.05, 0.95, max(len(curves), 1)))
    span = max(np.max(np.abs(g)) for _, g, _ in curves)
    for (label, grid, rho), color in zip(curves, colors, strict=True):
        ax.plot(grid, np.maximum(rho, 1e-12) if log else rho, color=color, lw=1.2, label=human_label(label))
    ax.set_xlabel("Hessian eigenvalue λ")
    ax.set_ylabel("spectral density ρ(λ)")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, min(np.max(r) for _, _, r in curves) * 1e-6))
    if span > 50:
        linthresh = max(span * 1e-2, 1e-3)
        ax.set_xscale("symlog", linthresh=linthresh)
        low = min(float(np.min(g)) for _, g, _ in curves)
        high = max(float(np.max(g)) for _, g, _ in curves)
        ax.set_xticks(symlog_ticks(low, high, linthresh))
        ax.xaxis.set_major_formatter(FuncFormatter(_plain))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)


def fig2a_spectra_early(fh: h5py.File, out: Path, first_steps: int = 200) -> Path:
    """Fig. 2(a): densities of the snapshots in the first ``first_steps`` training steps; the title
    names the first and last step drawn.
    """
    steps = _step_labels(fh)
    early = [steps[s] for s in sorted(steps) if s <= first_steps]
    if not early:
        raise Skip("no spectrum/step_* groups in the first training steps")
    drawn = sorted(s for s in steps if s <= first_steps)
    span = f"step {drawn[0]}" if len(drawn) == 1 else f"steps {drawn[0]}–{drawn[-1]}"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _density_axes(ax, _densities(fh, early), f"Hessian spectra, {span} (Fig. 2a)")
    return _save(fig, out, "fig2a_spectra_early.png")


def fig2b_spectra_downloads(fh: h5py.File, out: Path) -> Path:
    """Fig. 2(b): densities measured right after each download (re-pruning)."""
    train = _need(fh, "train", "training log")
    steps = _step_labels(fh)
    downloads = train["step"][()][train["download"][()].astype(bool)]
    labels = [steps[int(s)] for s in downloads if int(s) in steps]
    if not labels:
        raise Skip("no spectrum measured at a download step")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _density_axes(ax, _densities(fh, labels), "Hessian spectra right after downloads (Fig. 2b)", cmap="plasma")
    return _save(fig, out, "fig2b_spectra_downloads.png")


CONVENTION_LABEL = {"eta": "a = −ηλ (eq. II.65)", "paper": "a = −λ"}


def _primary_convention(fh: h5py.File, label: str) -> str:
    """The convention a result draws first (``proxy`` attr ``primary``; older files: ``convention``)."""
    a = fh[f"spectrum/{label}/result/proxy"].attrs
    value = a.get("primary", a.get("convention", "paper"))
    return value.decode() if isinstance(value, bytes) else str(value)


def _proxy_curve(fh: h5py.File, label: str, source: str,
                 convention: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E(t) of one stored spectrum and its ±1 standard-error band (NaN where unknown)."""
    g = fh[f"spectrum/{label}/result/proxy"]
    if convention in g:
        cg = g[convention]
        curve = cg[source][()]
        if source == "nodes" and "log_nodes_stderr" in cg:
            log, se = cg["log_nodes"][()], cg["log_nodes_stderr"][()]
            with np.errstate(over="ignore", invalid="ignore"):
                return curve, np.exp(log - se), np.exp(log + se)
        return curve, np.full(curve.shape, np.nan), np.full(curve.shape, np.nan)
    if _primary_convention(fh, label) != convention or source not in g:  # a file with one convention
        raise Skip(f"no error proxy for convention {convention!r} in spectrum/{label}")
    curve = g[source][()]
    return curve, np.full(curve.shape, np.nan), np.full(curve.shape, np.nan)


@dataclass
class ProxySeries:
    """The error proxy along the training steps, with a ±1 standard-error band."""

    step: np.ndarray
    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    convention: str
    eta: float


def proxy_series(fh: h5py.File, source: str = "nodes", convention: str | None = None) -> ProxySeries:
    """Error proxy per training step (eq. III.12): 1 on classical steps; on a quantum
    segment starting at s0, the proxy at t = s - s0 + 1 of the spectrum measured last at
    or before s0 (the state uploaded to the quantum ODE solver).

    ``source`` is ``nodes`` (the SLQ quadrature itself: exact for the measured Ritz
    values) or ``grid`` (the paper's 256-point smoothed density, whose kernel can smear
    the large mass near zero across the 0.4 cutoff).  ``convention`` is ``eta`` or
    ``paper`` (None: the one the spectra name as primary).
    """
    train = _need(fh, "train", "training log")
    steps = _step_labels(fh)
    if not steps:
        raise Skip("no spectrum/step_* groups")
    measured = np.array(sorted(steps))
    convention = convention or _primary_convention(fh, steps[int(measured[0])])
    step = train["step"][()]
    quantum = train["quantum_eligible"][()].astype(bool)
    out = [np.ones(step.shape, dtype=np.float64) for _ in range(3)]
    s0, curves = None, None
    for i, s in enumerate(step):
        if not quantum[i]:
            s0 = None
            continue
        if s0 is None:
            s0 = int(s)
            before = measured[measured <= s0 - 1] if np.any(measured <= s0 - 1) else measured[measured <= s0]
            curves = _proxy_curve(fh, steps[int(before[-1])], source, convention) if before.size else None
        t = int(s) - s0 + 1
        for k in range(3):
            out[k][i] = curves[k][t] if curves is not None and t < curves[k].size else np.nan
    eta = float(fh[f"spectrum/{steps[int(measured[0])]}/result"].attrs.get("eta", np.nan))
    return ProxySeries(step, out[0], out[1], out[2], convention, eta)


def proxy_over_training(fh: h5py.File, source: str = "nodes",
                        convention: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(step, E)`` of :func:`proxy_series` (the primary convention unless named)."""
    series = proxy_series(fh, source, convention)
    return series.step, series.value


def _unresolved_proxies(fh: h5py.File, convention: str) -> tuple[int, int]:
    """How many step spectra store an unresolved E(t) estimate for ``convention``, of how many."""
    count, total = 0, 0
    for label in _step_labels(fh).values():
        key = f"spectrum/{label}/result/proxy/{convention}/estimates"
        if key not in fh:
            continue
        total += 1
        e = fh[key]
        count += any(not bool(e[k].attrs.get("resolved", False)) for k in e
                     if k.startswith("error_proxy_t") and not k.endswith("_per_probe"))
    return count, total


def _proxy_axes(ax: Any, fh: h5py.File, convention: str, primary: bool) -> None:
    """One panel of Fig. 2c: E(t) from the nodes with its band, and from the density grid."""
    nodes = proxy_series(fh, "nodes", convention)
    style = dict(lw=1.4, ls="-") if primary else dict(lw=1.1, ls="-.")
    color = "C3" if convention == "eta" else "C0"
    ax.plot(nodes.step, nodes.value, color=color, label="from Ritz nodes and weights", **style)
    if np.any(np.isfinite(nodes.low)):
        ax.fill_between(nodes.step, nodes.low, nodes.high, color=color, alpha=0.25, lw=0,
                        label="±1 standard error over probes")
    try:
        grid = proxy_series(fh, "grid", convention)
        ax.plot(grid.step, grid.value, lw=0.9, ls="--", color="0.4", label="from the 256-point density (paper)")
    except (KeyError, Skip):
        pass
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
    finite = nodes.value[np.isfinite(nodes.value) & (nodes.value > 0)]
    if finite.size and finite.max() / max(finite.min(), 1e-300) > 100:
        ax.set_yscale("log")
    unresolved, total = _unresolved_proxies(fh, convention)
    if unresolved:
        ax.text(0.02, 0.02, f"E(t) unresolved in {unresolved} of {total} spectra (see report)",
                transform=ax.transAxes, fontsize=7, color="0.3")
    name = CONVENTION_LABEL[convention] + (f", η = {nodes.eta:g}" if convention == "eta" else "")
    ax.set_title(f"{'' if primary else 'other convention: '}{name}", fontsize=9)
    ax.set_xlabel("training step")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("error proxy E (eq. III.12)")
    ax.legend(fontsize=7)


def draw_fig2c(fh: h5py.File) -> Any:
    """The Fig. 2c figure: the primary convention's panel, and the other beside it."""
    primary = proxy_series(fh, "nodes").convention
    others = [c for c in ("eta", "paper") if c != primary]
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 3.9))
    _proxy_axes(axes[0], fh, primary, True)
    try:
        _proxy_axes(axes[1], fh, others[0], False)
    except Skip as why:
        axes[1].set_axis_off()
        axes[1].text(0.5, 0.5, str(why), ha="center", va="center", fontsize=8, wrap=True)
    fig.suptitle("Error proxy during sparse training (Fig. 2c)", fontsize=11)
    return fig


def fig2c_error_proxy(fh: h5py.File, out: Path) -> Path:
    """Fig. 2(c): the error proxy along the sparse-training run, both mode conventions."""
    return _save(draw_fig2c(fh), out, "fig2c_error_proxy.png")


def fig2d_accuracy(fh: h5py.File, out: Path) -> Path:
    """Fig. 2(d): test accuracy (and batch accuracy) against the training step."""
    train = _need(fh, "train", "training log")
    step = train["step"][()]
    test = train["test_accuracy"][()]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(step, train["batch_accuracy"][()], lw=0.8, color="0.6", label="batch accuracy")
    ok = np.isfinite(test)
    ax.plot(step[ok], test[ok], "o-", ms=3, color="C0", label="test accuracy")
    for s in step[train["download"][()].astype(bool)]:
        ax.axvline(s, color="C3", lw=0.6, ls="--")
    ax.set_xlabel("training step")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy during sparse training; dashed: downloads (Fig. 2d)")
    ax.legend(fontsize=8)
    return _save(fig, out, "fig2d_accuracy.png")


def fig3_pruned_spectrum(fh: h5py.File, out: Path) -> Path:
    """Fig. 3: spectrum of a model measured once (the pruned large model)."""
    if "spectrum" not in fh:
        raise Skip("no spectrum group")
    labels = [lab for lab in fh["spectrum"] if not lab.startswith("step_") and f"spectrum/{lab}/result" in fh]
    if not labels:
        raise Skip("no spectrum of a pruned/single model (spectrum/pruned)")
    curves = _densities(fh, labels)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    res = fh[f"spectrum/{labels[0]}/result"]
    name = res.attrs.get("model_name", labels[0])
    _density_axes(ax, curves, f"Hessian spectrum of {name}, n = {int(res.attrs.get('n', 0)):,} (Fig. 3)",
                  cmap="cividis")
    return _save(fig, out, "fig3_pruned_spectrum.png")


def _qcm_cases(fh: h5py.File) -> dict[str, h5py.Group]:
    if "qcm" not in fh:
        raise Skip("no qcm group")
    return {k: g for k, g in fh["qcm"].items() if g.attrs.get("complete", False)}


def _orders(case: h5py.Group) -> list[int]:
    return sorted(int(k[2:]) for k in case if k.startswith("N_") and case[k].attrs.get("complete", False))


def _positive(values: np.ndarray) -> np.ndarray:
    """|values| with exact zeros as NaN, so a log axis is not stretched to 1e-300."""
    out = np.abs(values).astype(np.float64)
    out[out == 0] = np.nan
    return out


def _median_band(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, first and third quartile over seeds at every t (curves of equal length; NaN ignored)."""
    import warnings

    stack = np.vstack(curves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (under the floor) stay NaN
        return (np.nanmedian(stack, axis=0), np.nanpercentile(stack, 25, axis=0),
                np.nanpercentile(stack, 75, axis=0))


def _median_floor(cases: list[h5py.Group]) -> np.ndarray | None:
    """Median over cases of the stored rounding floor per t (None when no case stores one)."""
    floors = [case["floor"][()] for case in cases if "floor" in case]
    return np.median(np.vstack(floors), axis=0) if floors else None


def _norm_curve(case: h5py.Group, key: str) -> np.ndarray:
    """‖case[key](t)‖₂ over coordinates, zeros as NaN (log axes)."""
    return _positive(np.linalg.norm(case[key][()], axis=1))


def _floor_line(ax: Any, cases: list[h5py.Group], t: np.ndarray) -> None:
    """The median rounding floor of the cases (errors under it are not fitted), thin black dotted."""
    floors = [case["floor"][()] for case in cases if "floor" in case]
    if floors:
        ax.semilogy(t, np.median(np.vstack(floors), axis=0), color="k", ls=":", lw=0.7,
                    label="rounding floor (not fitted below)")


def _rate_text(cases: list[h5py.Group], N: int) -> str:
    """'rate r [quartiles] vs p/step (seeds): verdict' for order N, by the rule of
    :func:`hpcqml.carleman.timestepping.rate_agreement` (median ratio and its order-statistic interval
    over seeds within 15 %).
    """
    from hpcqml.carleman.timestepping import rate_agreement

    fitted, predicted, window = [], [], 0
    for case in cases:
        if "rates" not in case:
            continue
        orders = list(case["rates/N"][()])
        if N in orders:
            i = orders.index(N)
            fitted.append(case["rates/fitted"][()][i])
            predicted.append(case["rates/predicted"][()][i])
            lw = case["rates"].attrs.get("late_window", (0, 0))
            window = int(lw[1]) - int(lw[0])
    f, p = np.asarray(fitted, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if not np.any(np.isfinite(f)):
        return "rate not fitted (under the rounding floor)"
    seeds = f"{int(np.isfinite(f).sum())}/{f.size} seeds"
    verdict = str(rate_agreement(f, p, window)["verdict"]).split(" (")[0]   # the reason is in the report
    return (f"rate {np.nanmedian(f):+.4f} [{np.nanpercentile(f, 25):+.4f}, {np.nanpercentile(f, 75):+.4f}] "
            f"vs {np.nanmedian(p):+.4f}/step ({seeds}): {verdict}")


def _band(ax: Any, t: np.ndarray, curves: list[np.ndarray], color: str, label: str, ls: str = "-",
          floor: np.ndarray | None = None) -> None:
    """Median over seeds (not drawn where it lies below ``floor``) and the quartile band."""
    med, lo, hi = _median_band(curves)
    if floor is not None:
        med = np.where(med > floor, med, np.nan)
    ax.semilogy(t, med, color=color, ls=ls, label=label)
    if len(curves) > 1:
        ax.fill_between(t, lo, hi, color=color, alpha=0.18, lw=0)


def _by_fraction(fh: h5py.File) -> dict[float, list[h5py.Group]]:
    """Complete random-family cases grouped by their dissipative fraction f (all seeds)."""
    out: dict[float, list[h5py.Group]] = {}
    for case in _qcm_cases(fh).values():
        if "f" in case.attrs and "split" in case:
            out.setdefault(float(case.attrs["f"]), []).append(case)
    return out


def curvature_results(fh: h5py.File) -> dict[str, dict[tuple[str, str], h5py.Group]]:
    """Per model state with more than one stored spectrum (several ``[spectrum] curvature`` kinds or
    ``blocks``): ``{(curvature kind, block): result group}``, the whole space's block named ``""``,
    read from each result's ``curvature`` and ``block`` attributes (docs/schema/spectrum.md).
    """
    out: dict[str, dict[tuple[str, str], h5py.Group]] = {}
    if "spectrum" not in fh:
        return out
    for label, top in fh["spectrum"].items():
        found: dict[tuple[str, str], h5py.Group] = {}

        def visit(name: str, obj: object, found: dict = found) -> None:
            if isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1] == "result" and "density" in obj \
                    and obj.attrs.get("complete", True):
                kind, block = obj.attrs.get("curvature", "hessian"), obj.attrs.get("block", "")
                kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                block = block.decode() if isinstance(block, bytes) else str(block)
                found[(kind, block)] = obj

        if isinstance(top, h5py.Group):
            top.visititems(visit)
        if len(found) > 1:
            out[label] = found
    return out


def negative_mass_delta(res: h5py.Group) -> float | None:
    """The threshold δ of a result's stored negative mass μ((−∞, −δ)): the ``delta`` attribute of
    ``estimates/negative_mass`` (docs/schema/spectrum.md), else the result group's ``negative_delta``
    or ``delta`` attribute; None when none is stored (files of older versions).
    """
    e = res.get("estimates")
    places = [e["negative_mass"].attrs] if e is not None and "negative_mass" in e else []
    for attrs, key in [(a, "delta") for a in places] + [(res.attrs, "negative_delta"), (res.attrs, "delta")]:
        if key in attrs:
            value = float(np.asarray(attrs[key]).reshape(-1)[0])
            if np.isfinite(value):
                return value
    return None


def delta_text(delta: float | None) -> str:
    """``δ = 1`` for a stored threshold, ``δ not stored`` for an older file."""
    return "δ not stored" if delta is None else f"δ = {delta:g}"


def negative_mass_name(delta: float | None) -> str:
    """The name of the negative mass with its threshold: ``negative mass (λ < −δ, δ = 1)``."""
    return f"negative mass (λ < −δ, {delta_text(delta)})"


def _negative_mass_text(res: h5py.Group) -> str:
    """The SLQ estimate of the negative mass of one result with its threshold δ: value, combined
    interval (where stored) and whether it is resolved, as docs/schema/spectrum.md stores it.
    """
    e = res.get("estimates")
    if e is None or "negative_mass" not in e:
        return "negative mass: not stored"
    d = e["negative_mass"]
    text = f"{negative_mass_name(negative_mass_delta(res))}:\n{float(d[0]):.3g}"   # two lines: the panel is narrow
    if "negative_mass_combined" in e:
        low, high = (float(v) for v in e["negative_mass_combined"][()])
        text += f", interval [{low:.3g}, {high:.3g}]"
    return text + (", resolved" if bool(d.attrs.get("resolved", False)) else ", unresolved")


def fig_curvature_spectra(fh: h5py.File, out: Path) -> Path:
    """Small multiples of the spectra of one model state: one row per curvature kind (and state),
    one column per diagonal block (first: all kept parameters), each panel the smoothed density
    ρ(λ) of its SLQ result with its extreme Ritz values λ_min, λ_max, the trace estimate and the
    negative-mass estimate μ((−∞, −δ)) with its threshold δ and combined interval (the legend's title).
    Axes are not shared: the kinds differ by orders of magnitude.
    """
    states = curvature_results(fh)
    if not states:
        raise Skip("no model state with several curvature kinds or blocks ([spectrum] curvature, blocks)")
    def kinds(found: dict) -> list[str]:   # the Hessian first, then the other kinds by name
        return sorted(dict.fromkeys(k for k, _ in found), key=lambda k: (k != "hessian", k))

    rows = [(label, kind) for label, found in states.items() for kind in kinds(found)]
    blocks = list(dict.fromkeys(b for found in states.values() for _, b in sorted(found, key=lambda kb: kb[1])))
    fig, axes = plt.subplots(len(rows), len(blocks), figsize=(3.6 * len(blocks), 2.9 * len(rows)), squeeze=False)
    for r, (label, kind) in enumerate(rows):
        for col, block in enumerate(blocks):
            ax = axes[r][col]
            res = states[label].get((kind, block))
            where = block or "all kept parameters"
            if res is None:
                ax.set_axis_off()
                ax.set_title(f"{kind} — {where}: not measured", fontsize=8)
                continue
            a = res.attrs
            grid, rho = res["density/grid"][()], res["density/rho"][()]
            trace, trace_se = float(a.get("trace", np.nan)), float(a.get("trace_se", np.nan))
            spread = f"± {trace_se:.2g}" if np.isfinite(trace_se) else "(one probe: no s.e.)"
            ax.plot(grid, np.maximum(rho, 1e-12), color=f"C{r}", lw=1.1,
                    label=f"ρ(λ), n = {int(a.get('n', 0)):,}, trace {trace:.3g} {spread}")
            lmin, lmax = float(a.get("lambda_min", np.nan)), float(a.get("lambda_max", np.nan))
            ax.axvline(lmin, color="0.3", ls="--", lw=0.8, label=f"λ_min = {lmin:.3g}")
            ax.axvline(lmax, color="0.3", ls=":", lw=0.8, label=f"λ_max = {lmax:.3g}")
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(1e-8, float(np.max(rho)) * 1e-6))
            ax.set_title(f"{human_label(label)}: {kind} — {where}", fontsize=8)
            ax.set_xlabel("eigenvalue λ", fontsize=8)
            ax.set_ylabel("density ρ(λ)", fontsize=8)
            ax.tick_params(labelsize=7)
            # the negative mass heads the legend, which the legend placement then keeps off the curves
            ax.legend(fontsize=6, title=_negative_mass_text(res), title_fontsize=6, alignment="left")
    fig.suptitle("Spectra per curvature kind (rows) and diagonal block (columns), SLQ", fontsize=10)
    return _save(fig, out, "curvature_spectra.png")


def fig4a_error_vs_order(fh: h5py.File, out: Path) -> Path:
    """Fig. 4(a): linearisation error vs t for N = 1..4, all modes dissipative (f = 1), median and
    min-max band over seeds.

    Solid: ‖ŷ₁^(N_ref)(t) − ŷ₁^(N)(t)‖₂, the truncation error of the Carleman stepping against its
    large-order limit (the primary curve). Dashed grey: ‖u(t) − ŷ₁^(N_ref)(t)‖₂, the discreteness
    error between the discrete map and the continuous-time lift (eq. V.20–V.22), the same for all N.
    The legend gives the fitted late-time rate (median [min, max] over seeds) and the slowest mode's
    rate max log|1 + a|.
    """
    groups = _by_fraction(fh)
    cases = groups.get(1.0) or (list(_qcm_cases(fh).values())[:1] if _qcm_cases(fh) else [])
    cases = [c for c in cases if "split" in c]
    if not cases:
        raise Skip("no qcm case with an error split")
    orders = sorted(set.intersection(*[set(_orders(c)) for c in cases]))
    T = cases[0]["u_exact"].shape[0]
    t = np.arange(T)
    floor = _median_floor(cases)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for i, N in enumerate(orders):
        _band(ax, t, [_norm_curve(c, f"split/N_{N}/truncation") for c in cases], f"C{i}",
              f"N = {N}: {_rate_text(cases, N)}", floor=floor)
    _band(ax, t, [_norm_curve(c, f"split/N_{orders[0]}/discreteness") for c in cases], "0.5",
          "discreteness error u − ŷ₁^(N_ref) (eq. V.21), all N", ls="--", floor=floor)
    for i, N in enumerate(orders):   # the exact lift of the map, where it was run: no discreteness error
        if all(f"discrete_N_{N}" in c and "eta1" in c[f"discrete_N_{N}"] for c in cases):
            _band(ax, t, [_norm_curve(c, f"discrete_N_{N}/eta1") for c in cases], f"C{i}",
                  f"N = {N} discrete lift: ‖u − ŷ₁‖ of the exact lift of the map", ls="-.", floor=floor)
    _floor_line(ax, cases, t)
    ax.set_xlabel("time step t")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("‖error(t)‖₂ over coordinates")
    ax.set_title(f"Fig. 4a: truncation error, f = {float(cases[0].attrs.get('f', 1.0)):g}, "
                 f"{len(cases)} seed(s), median (above the floor) and quartile band", fontsize=9)
    ax.legend(fontsize=6.5)
    return _save(fig, out, "fig4a_error_vs_order.png")


def fig4b_error_vs_fraction(fh: h5py.File, out: Path, order: int = 4) -> Path:
    """Fig. 4(b): truncation error at N = ``order`` (or the largest) for each fraction f, median and
    quartile band over seeds, with the fitted late-time rate beside (N+1)·max log|1 + a| (divergent)
    or max log|1 + a| (all dissipative). Dotted: the discreteness error of each f (eq. V.21).
    Dash-dot, where ``[qcm] lift = "discrete"`` or ``"both"`` was run: the error ‖u(t) − ŷ₁(t)‖ of
    the exact lift of the discrete map at the same N (no discreteness part).
    """
    groups = _by_fraction(fh)
    if len(groups) < 2:
        raise Skip("fewer than two dissipative fractions f among the qcm cases")
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for i, f in enumerate(sorted(groups, reverse=True)):
        cases = groups[f]
        orders = sorted(set.intersection(*[set(_orders(c)) for c in cases]))
        if not orders:
            continue
        N = order if order in orders else orders[-1]
        t = np.arange(cases[0]["u_exact"].shape[0])
        floor = _median_floor(cases)
        _band(ax, t, [_norm_curve(c, f"split/N_{N}/truncation") for c in cases], f"C{i}",
              f"f = {f:g}, N = {N}: {_rate_text(cases, N)}", floor=floor)
        med, _, _ = _median_band([_norm_curve(c, f"split/N_{N}/discreteness") for c in cases])
        if floor is not None:
            med = np.where(med > floor, med, np.nan)
        ax.semilogy(t, med, color=f"C{i}", ls=(0, (1, 3)), lw=0.9)
        if all(f"discrete_N_{N}" in c and "eta1" in c[f"discrete_N_{N}"] for c in cases):
            # the exact lift of the map was run too: its whole error, which has no discreteness part
            _band(ax, t, [_norm_curve(c, f"discrete_N_{N}/eta1") for c in cases], f"C{i}",
                  f"f = {f:g}, N = {N} discrete lift: ‖u − ŷ₁‖ of the exact lift of the map", ls="-.",
                  floor=floor)
    _floor_line(ax, [c for cs in groups.values() for c in cs], t)
    ax.set_xlabel("time step t")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("‖truncation error(t)‖₂ (dotted: discreteness error)")
    ax.set_title("Fig. 4b: truncation error vs fraction f of dissipative modes (median above the floor, "
                 "quartile band)", fontsize=9)
    ax.legend(fontsize=6.5)
    return _save(fig, out, "fig4b_error_vs_fraction.png")


def fig_kappa(fh: h5py.File, out: Path) -> Path:
    """κ(M) from SLEPc against its bounds (eq. II.83 when ‖I+A‖ < 1, eq. II.81 in general)."""
    rows = []
    for label, case in _qcm_cases(fh).items():
        for N in _orders(case):
            a = case[f"N_{N}"].attrs
            if "kappa_M" in a and np.isfinite(a["kappa_M"]):
                rows.append((f"{label} N={N}", a["kappa_M"], a.get("kappa_bound_II83", np.nan),
                             a.get("kappa_bound_general", np.nan), bool(a.get("kappa_bound_II83_applies", False))))
    if not rows:
        raise Skip("no κ(M) values in qcm cases")
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(rows) + 2), 4.0))
    ax.semilogy(x, [r[1] for r in rows], "o", color="C0", label="κ(M) (SLEPc SVD)")
    ax.semilogy(x, [r[2] for r in rows], "_", ms=14, color="C2", label="2(T+1) (eq. II.83)")
    ax.semilogy(x, [r[3] for r in rows], "x", color="C3", label="(1+‖I+A‖)Σ‖I+A‖ᵗ (eq. II.81)")
    ax.set_xticks(x, [r[0] for r in rows], rotation=70, fontsize=6)
    ax.set_ylabel("condition number")
    ax.set_title("Condition number of the time-stepping system")
    ax.legend(fontsize=8)
    return _save(fig, out, "kappa_bounds.png")


def fig_hhl(fh: h5py.File, out: Path) -> Path:
    """Per case: HHL infidelity vs clock qubits, leakage and clock-traced infidelity vs clock
    qubits (plain and truncated), and truncated-HHL overlap vs κ_a (read through
    :class:`hpcqml.hhl.case.HHLCase`).
    """
    from hpcqml.hhl.case import read_cases

    cases = list(read_cases(fh).items())
    if not cases:
        raise Skip("no hhl case")
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for i, (label, case) in enumerate(cases):
        h, tr = case.hhl, case.truncated
        c = h["clock_qubits"]
        name = f"{label} case"
        ax1.semilogy(c, _positive(1 - h["fidelity"]), "o-", color=f"C{i}", label=name)
        ax2.plot(c, h["leakage"], "o-", color=f"C{i}", label=f"{name}: leakage")
        ax2.plot(c, 1 - h["density_fidelity"], "s:", color=f"C{i}",
                 label=f"{name}: infidelity with the clock traced out")
        if "kappa_a" in tr and tr["kappa_a"].size:
            clocks, kas = tr["clock_qubits"], tr["kappa_a"]
            largest = kas == kas.max()
            ax2.plot(clocks[largest], tr["leakage"][largest], "^--", color=f"C{i}",
                     label=f"{name}: truncated HHL leakage (κ_a = {kas.max():g})")
            best = clocks == clocks.max()
            order = np.argsort(kas[best])
            ax3.semilogx(kas[best][order], tr["overlap"][best][order], "o-", color=f"C{i}",
                         label=f"{name}: simulated")
            if "overlap_ii87" in tr:  # needs the eigen-decomposition: state-vector cases only
                ax3.semilogx(kas[best][order], tr["overlap_ii87"][best][order], "k--", lw=0.8)
    ax1.set_xlabel("clock qubits c")
    integer_ticks(ax1.xaxis)
    ax1.set_ylabel("1 − fidelity |⟨x_ref|x⟩|²")
    ax1.set_title("HHL infidelity vs clock qubits")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("clock qubits c")
    integer_ticks(ax2.xaxis)
    ax2.set_ylabel("probability")
    ax2.set_title("Leakage: no limit for plain HHL (docs/science.md)")
    ax2.legend(fontsize=6)
    ax3.set_xlabel("κ_a")
    value_ticks(ax3.xaxis, np.concatenate([ln.get_xdata() for ln in ax3.get_lines()] or [np.zeros(0)]))
    ax3.set_ylabel("overlap with the full solution")
    ax3.set_title("Truncated HHL (dashed: eq. II.87)")
    ax3.legend(fontsize=7)
    return _save(fig, out, "hhl_fidelity.png")


def fig_hhl_ii92(fh: h5py.File, out: Path) -> Path:
    """Eq. II.92 against eq. II.87 on the same M: per Carleman case (one panel each), at the
    largest clock size, the simulated truncated-HHL overlap, eq. II.87 (exact eigen-decomposition)
    and the Haar estimate eq. II.89–II.91 against κ_a, and eq. II.92, which has no κ_a in it, as
    one marker at the paper's κ_a = 2(T+1).  All unsquared overlaps ⟨x|x̃⟩.
    """
    from hpcqml.hhl.case import read_cases

    cases = [(k, c) for k, c in read_cases(fh).items()
             if "overlap_ii92" in c.truncated and "overlap_ii87" in c.truncated]
    if not cases:
        raise Skip("no Carleman hhl case with eq. II.87 (state-vector method) and eq. II.92")
    fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 4.0), squeeze=False)
    for ax, (label, case) in zip(axes[0], cases, strict=True):
        tr = case.truncated
        clocks, kas = tr["clock_qubits"], tr["kappa_a"]
        best = clocks == clocks.max()
        order = np.argsort(kas[best])
        x = kas[best][order]
        ax.semilogx(x, tr["overlap"][best][order], "o-", color="C0",
                    label=f"simulated truncated HHL (c = {int(clocks.max())})")
        ax.semilogx(x, tr["overlap_ii87"][best][order], "k--", lw=1.0, label="eq. II.87 (exact)")
        ax.semilogx(x, tr["overlap_haar"][best][order], ":", color="C2", lw=1.4, label="Haar estimate eq. II.89–II.91")
        paper = float(tr.attrs.get("kappa_a_paper", np.nan))
        ax.semilogx([paper], [float(tr["overlap_ii92"][0])], "s", color="C3", ms=7,
                    label=f"eq. II.92 (stated for κ_a = 2(T+1) = {paper:g})")
        value_ticks(ax.xaxis, np.append(x, paper))
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("κ_a")
        ax.set_ylabel("overlap ⟨x|x̃⟩ (unsquared)")
        ax.set_title(f"{label}: eq. II.92 vs eq. II.87", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, out, "hhl_ii92_vs_ii87.png")


def fig_hhl_scale(fh: h5py.File, out: Path) -> Path:
    """HHL fidelity |<x_ref|x>|^2 and success probability against the number of unknowns S of
    the system, one line per clock size, over every complete hhl case (the ``sizes_T`` sweep).
    """
    from hpcqml.hhl.case import read_cases

    points: dict[int, list[tuple[int, float, float]]] = {}
    for case in read_cases(fh).values():
        if "system_size" not in case.instance.attrs:
            continue
        size = int(case.instance.attrs["system_size"])
        h = case.hhl
        for c, fid, p in zip(h["clock_qubits"], h["fidelity"], h["p_success"], strict=True):
            points.setdefault(int(c), []).append((size, float(fid), float(p)))
    if not points or max(len({s for s, _, _ in v}) for v in points.values()) < 2:
        raise Skip("fewer than two system sizes")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (c, rows) in enumerate(sorted(points.items())):
        rows.sort()
        sizes = [r[0] for r in rows]
        ax1.semilogx(sizes, [r[1] for r in rows], "o-", color=f"C{i}", label=f"c = {c}")
        ax2.loglog(sizes, [r[2] for r in rows], "o-", color=f"C{i}", label=f"c = {c}")
    ax1.set_xlabel("unknowns S of M x = B")
    ax1.set_ylabel("fidelity |⟨x_ref|x⟩|²")
    ax1.set_title("HHL fidelity against system size")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("unknowns S of M x = B")
    ax2.set_ylabel("success probability")
    ax2.set_title("HHL success probability against system size")
    ax2.legend(fontsize=8)
    return _save(fig, out, "hhl_scale.png")


FIGURES: dict[str, Callable[[h5py.File, Path], Path]] = {
    "fig2a": fig2a_spectra_early,
    "fig2b": fig2b_spectra_downloads,
    "fig2c": fig2c_error_proxy,
    "fig2d": fig2d_accuracy,
    "fig3": fig3_pruned_spectrum,
    "curvature": fig_curvature_spectra,
    "fig4a": fig4a_error_vs_order,
    "fig4b": fig4b_error_vs_fraction,
    "kappa": fig_kappa,
    "hhl": fig_hhl,
    "hhl_ii92": fig_hhl_ii92,
    "hhl_scale": fig_hhl_scale,
}


def scaling_records(paths: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """(ranks, max wall seconds) per stage over several results files of one study
    (records of resumed stages, which time only part of the work, are left out).
    """
    from hpcqml.store import open_results

    table: dict[str, list[tuple[int, float]]] = {}
    for path in paths:
        with open_results(path) as fh:
            if "perf" not in fh:
                continue
            for stage, g in fh["perf"].items():
                if g.attrs.get("complete", False) and not g.attrs.get("resumed", False):
                    table.setdefault(stage, []).append((int(g.attrs["ranks"]), float(np.max(g["wall_seconds"][()]))))
    return {k: sorted(v) for k, v in table.items()}


def fig_scaling(paths: list[Path], out: Path) -> Path:
    """Speed-up and parallel efficiency against rank count from the stage timings."""
    table = {k: v for k, v in scaling_records(paths).items() if len({r for r, _ in v}) >= 2}
    if not table:
        raise Skip("needs results files of one study at two or more rank counts")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for stage, rows in sorted(table.items()):
        ranks = np.array([r for r, _ in rows], dtype=float)
        wall = np.array([w for _, w in rows])
        base = wall[0] * ranks[0]
        ax1.loglog(ranks, base / wall, "o-", label=stage)
        ax2.semilogx(ranks, base / wall / ranks, "o-", label=stage)
    top = max(r for rows in table.values() for r, _ in rows)
    ax1.loglog([1, top], [1, top], "k:", lw=0.8, label="ideal")
    ax1.set_xlabel("MPI ranks")
    ax1.set_ylabel("speed-up")
    ax2.set_xlabel("MPI ranks")
    ax2.set_ylabel("parallel efficiency")
    ax2.set_ylim(0, 1.2)
    ax1.legend(fontsize=7)
    ax1.set_title("Strong scaling from /perf")
    return _save(fig, out, "scaling.png")
