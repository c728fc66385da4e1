"""One function per figure. Each reads an open results file and returns the PNG path it
wrote, or raises :class:`Skip` naming what the file lacks. Figure numbers follow the paper."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class Skip(Exception):
    """The results file lacks what a figure needs; the message says what."""


def _need(fh: h5py.File, key: str, what: str) -> h5py.Group:
    obj = fh.get(key)
    if obj is None or (isinstance(obj, h5py.Group) and not obj.attrs.get("complete", True)):
        raise Skip(f"no {what} ({key})")
    return obj


def _save(fig, out: Path, name: str) -> Path:
    path = out / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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


def _density_axes(ax, curves, title: str, cmap: str = "viridis", log: bool = True) -> None:
    colors = plt.get_cmap(cmap)(np.linspace(0.05, 0.95, max(len(curves), 1)))
    span = max(np.max(np.abs(g)) for _, g, _ in curves)
    for (label, grid, rho), color in zip(curves, colors):
        ax.plot(grid, np.maximum(rho, 1e-12) if log else rho, color=color, lw=1.2, label=label)
    ax.set_xlabel("Hessian eigenvalue λ")
    ax.set_ylabel("spectral density ρ(λ)")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, min(np.max(r) for _, _, r in curves) * 1e-6))
    if span > 50:
        linthresh = max(span * 1e-2, 1e-3)
        ax.set_xscale("symlog", linthresh=linthresh)
        # decades only, from just outside the linear zone: no crowded labels around 0
        decades = range(int(np.ceil(np.log10(2 * linthresh))), int(np.floor(np.log10(span))) + 1)
        ax.set_xticks(sorted([0.0] + [sign * 10.0 ** k for k in decades for sign in (-1, 1)]))
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)


def fig2a_spectra_early(fh: h5py.File, out: Path, first_steps: int = 200) -> Path:
    """Fig. 2(a): densities of the snapshots in the first ``first_steps`` training steps."""
    steps = _step_labels(fh)
    early = [steps[s] for s in sorted(steps) if s <= first_steps]
    if not early:
        raise Skip("no spectrum/step_* groups in the first training steps")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _density_axes(ax, _densities(fh, early), f"Hessian spectra, steps 0–{first_steps} (Fig. 2a)")
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


def proxy_over_training(fh: h5py.File, source: str = "nodes") -> tuple[np.ndarray, np.ndarray]:
    """Error proxy per training step (eq. III.12): 1 on classical steps; on a quantum
    segment starting at s0, the proxy at t = s - s0 + 1 of the spectrum measured last at
    or before s0 (the state uploaded to the quantum ODE solver).

    ``source`` is ``nodes`` (the SLQ quadrature itself: exact for the measured Ritz
    values) or ``grid`` (the paper's 256-point smoothed density, whose kernel can smear
    the large mass near zero across the 0.4 cutoff)."""
    train = _need(fh, "train", "training log")
    steps = _step_labels(fh)
    if not steps:
        raise Skip("no spectrum/step_* groups")
    step = train["step"][()]
    quantum = train["quantum_eligible"][()].astype(bool)
    proxy = np.ones(step.shape, dtype=np.float64)
    measured = np.array(sorted(steps))
    s0 = None
    curve = None
    for i, s in enumerate(step):
        if not quantum[i]:
            s0 = None
            continue
        if s0 is None:
            s0 = int(s)
            before = measured[measured <= s0 - 1] if np.any(measured <= s0 - 1) else measured[measured <= s0]
            if before.size == 0:
                curve = None
            else:
                curve = fh[f"spectrum/{steps[int(before[-1])]}/result/proxy/{source}"][()]
        t = int(s) - s0 + 1
        proxy[i] = curve[t] if curve is not None and t < curve.size else np.nan
    return step, proxy


def fig2c_error_proxy(fh: h5py.File, out: Path) -> Path:
    """Fig. 2(c): the error proxy along the sparse-training run."""
    step, proxy = proxy_over_training(fh, "nodes")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(step, proxy, lw=1.2, color="C3", label="from Ritz nodes and weights")
    try:
        _, smoothed = proxy_over_training(fh, "grid")
        ax.plot(step, smoothed, lw=0.9, ls="--", color="0.4", label="from the smoothed 256-point density (paper)")
    except KeyError:
        pass
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
    finite = proxy[np.isfinite(proxy) & (proxy > 0)]
    if finite.size and finite.max() / max(finite.min(), 1e-300) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("error proxy (eq. III.12)")
    ax.set_title("Error proxy during sparse training (Fig. 2c)")
    ax.legend(fontsize=7)
    return _save(fig, out, "fig2c_error_proxy.png")


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
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy during sparse training; dashed: downloads (Fig. 2d)")
    ax.legend(fontsize=8)
    return _save(fig, out, "fig2d_accuracy.png")


def fig3_pruned_spectrum(fh: h5py.File, out: Path) -> Path:
    """Fig. 3: spectrum of a model measured once (the pruned large model)."""
    if "spectrum" not in fh:
        raise Skip("no spectrum group")
    labels = [l for l in fh["spectrum"] if not l.startswith("step_") and f"spectrum/{l}/result" in fh]
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


def fig4a_error_vs_order(fh: h5py.File, out: Path) -> Path:
    """Fig. 4(a): |η₁(t)| of one coordinate for N = 1..4, all modes dissipative (f = 1).

    Solid: error against the exact nonlinear recurrence; dashed: its truncation part
    (against the large-N reference run), which is what shrinks with N once the O(step)
    discreteness floor of the Euler-type stepping dominates (paper Sec. V B)."""
    cases = _qcm_cases(fh)
    full = [g for k, g in cases.items() if float(g.attrs.get("f", -1)) == 1.0] or list(cases.values())
    if not full:
        raise Skip("no qcm case")
    case = full[0]
    coord = int(case.attrs.get("coordinate", 0))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, N in enumerate(_orders(case)):
        err = _positive(case[f"N_{N}/eta1"][()][:, coord])
        ax.semilogy(np.arange(err.size), err, color=f"C{i}", label=f"N = {N}")
        key = f"split/N_{N}/truncation"
        if key in case:
            trunc = _positive(case[key][()][:, coord])
            ax.semilogy(np.arange(trunc.size), trunc, color=f"C{i}", ls="--", lw=0.9)
    ax.set_xlabel("time step t")
    ax.set_ylabel(f"|u_{coord}(t) − ŷ_{coord}(t)|")
    ax.set_title(f"Carleman error vs order, {case.name.split('/')[-1]} (Fig. 4a; dashed: truncation part)",
                 fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out, "fig4a_error_vs_order.png")


def fig4b_error_vs_fraction(fh: h5py.File, out: Path, order: int = 4) -> Path:
    """Fig. 4(b): the same error at N = ``order`` (or the largest) for several fractions f."""
    cases = _qcm_cases(fh)
    with_f = sorted(((float(g.attrs["f"]), g) for g in cases.values() if "f" in g.attrs), key=lambda p: -p[0])
    if len({f for f, _ in with_f}) < 2:
        raise Skip("fewer than two dissipative fractions f among the qcm cases")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for f, case in with_f:
        orders = _orders(case)
        if not orders:
            continue
        N = order if order in orders else orders[-1]
        coord = int(case.attrs.get("coordinate", 0))
        err = _positive(case[f"N_{N}/eta1"][()][:, coord])
        ax.semilogy(np.arange(err.size), err, label=f"f = {f:g} (N = {N})")
    ax.set_xlabel("time step t")
    ax.set_ylabel("|η₁(t)| of one coordinate")
    ax.set_title("Carleman error vs fraction of dissipative modes (Fig. 4b)")
    ax.legend(fontsize=8)
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
    """HHL fidelity vs clock qubits, and truncated-HHL overlap vs κ_a, per case."""
    if "hhl" not in fh:
        raise Skip("no hhl group")
    cases = [(k, g) for k, g in fh["hhl"].items() if "hhl" in g and g.attrs.get("complete", False)]
    if not cases:
        raise Skip("no hhl case")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, g) in enumerate(cases):
        c = g["hhl/clock_qubits"][()]
        ax1.semilogy(c, _positive(1 - g["hhl/fidelity"][()]), "o-", color=f"C{i}", label=label)
        tr = g.get("truncated")
        if tr is not None and tr["kappa_a"].size:
            best = tr["clock_qubits"][()] == tr["clock_qubits"][()].max()
            ka = tr["kappa_a"][()][best]
            order = np.argsort(ka)
            ax2.semilogx(ka[order], tr["overlap"][()][best][order], "o-", color=f"C{i}", label=f"{label} simulated")
            ax2.semilogx(ka[order], tr["overlap_ii87"][()][best][order], "k--", lw=0.8)
    ax1.set_xlabel("clock qubits c")
    ax1.set_ylabel("1 − fidelity |⟨x_ref|x⟩|²")
    ax1.set_title("HHL infidelity vs clock qubits")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("κ_a")
    ax2.set_ylabel("overlap with the full solution")
    ax2.set_title("Truncated HHL (dashed: eq. II.87)")
    ax2.legend(fontsize=7)
    return _save(fig, out, "hhl_fidelity.png")


FIGURES: dict[str, Callable[[h5py.File, Path], Path]] = {
    "fig2a": fig2a_spectra_early,
    "fig2b": fig2b_spectra_downloads,
    "fig2c": fig2c_error_proxy,
    "fig2d": fig2d_accuracy,
    "fig3": fig3_pruned_spectrum,
    "fig4a": fig4a_error_vs_order,
    "fig4b": fig4b_error_vs_fraction,
    "kappa": fig_kappa,
    "hhl": fig_hhl,
}


def scaling_records(paths: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """(ranks, max wall seconds) per stage over several results files of one study
    (records of resumed stages, which time only part of the work, are left out)."""
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
