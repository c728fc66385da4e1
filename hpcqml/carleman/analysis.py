"""Analysis of one Carleman order: the typed :class:`OrderReport` (paper Sec. II A-C, III C, V B).

:func:`order_report` computes, for one instance, order N and lift, everything the qcm stage stores:
the KSP solution of M X = B (eq. II.79) against the exact recurrence (eq. II.1, II.8), SLEPc spectra,
||I+A||_2, kappa(M), the bounds of eq. II.57, II.60, II.81 (also as printed, with the power norms
||(I+A)^t||), II.83 and a discrete-map bound, each beside its measured quantity with a three-valued
``holds_*`` flag ("true", "false", "not evaluated"), and the R number of Liu et al. (PNAS 2021).
:class:`CaseReference` holds the serial reference quantities of one instance shared by its orders
(exact trajectory, order-N_ref run, error split, late-time rates of Fig. 4).

:meth:`OrderReport.to_group` / :meth:`OrderReport.from_group` define the HDF5 layout of an order
group once (docs/schema/qcm.md); the stage writes with the first, :mod:`hpcqml.results` reads with
the second.  The solution X stays distributed until it is written: it is gathered to rank 0 only,
which computes the errors from it and broadcasts the few derived numbers.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hpcqml.errors import NumericalError

#: largest number of entries (T+1) * Delta of the solution X that is gathered (to rank 0) and stored
#: whole; beyond it X stays distributed and only its first n columns y_1(t) are gathered and stored
STORE_WHOLE_LIMIT = 2_000_000

if TYPE_CHECKING:
    import h5py

    from hpcqml.carleman.instance import PolynomialODE
    from hpcqml.carleman.spectra import ConditionReport
    from hpcqml.carleman.system import KspFacts, Norms


def _ref_order(cfg: dict, n: int) -> int:
    from hpcqml.carleman.instance import carleman_dim

    N_ref = cfg["N_ref"] or max(cfg["N"]) + 2
    while N_ref > max(cfg["N"]) and carleman_dim(n, N_ref) > cfg["ref_max_dim"]:
        N_ref -= 1
    return N_ref


def _f1_eigenvalues(ode: PolynomialODE) -> np.ndarray:
    """Eigenvalues a of F1 (a = -η λ for Hessian eigenvalues λ, eq. II.65); NaN beyond n = 2000."""
    if ode.n > 2000:
        return np.full(1, np.nan)
    return np.linalg.eigvals(ode.F[1].toarray()).astype(np.complex128)


class CaseReference:
    """Serial (every rank alike) reference quantities of one instance: u, the order-N_ref run, splits."""

    def __init__(self, cfg: dict, label: str, ode: PolynomialODE, attrs: dict) -> None:
        from hpcqml.carleman import reference as ref
        from hpcqml.carleman import timestepping as ts

        T = cfg["T"]
        self.ode, self.attrs, self.T = ode, attrs, T
        self.u = ref.exact_recurrence(ode, T)
        bad = np.flatnonzero(~np.all(np.isfinite(self.u), axis=1))
        if bad.size:
            raise NumericalError(f"[qcm] the exact map of case {label} overflows at t = {bad[0]} "
                                 f"(|u| grows without bound); shorten T or shrink u_scale")
        self.F_norms = ode.norms()
        self.R = ts.r_number_pnas(ode, T)
        self.u_bar = float(np.max(np.linalg.norm(self.u, axis=1)))
        self.coord = int(np.random.default_rng(attrs.get("seed", 0)).integers(ode.n))
        self.N_ref = _ref_order(cfg, ode.n)
        self.yR = ts.carleman_trajectory(ode, self.N_ref, T)
        self.a = _f1_eigenvalues(ode)
        self.split = {N: ts.error_split(ode, N, self.N_ref, T, u=self.u, yR=self.yR) for N in cfg["N"]}
        # rounding floor of a difference of two O(|u|) trajectories (100x the float64 vs extended-precision
        # difference seen on the Fig. 4 instances): fitted and drawn points must lie above it
        self.floor = 1e-14 * np.maximum.accumulate(np.maximum(np.linalg.norm(self.u, axis=1),
                                                              np.linalg.norm(self.yR, axis=1)))


def late_rates(case: CaseReference, orders: list[int], late_fraction: float) -> dict[str, np.ndarray]:
    """Late-time rates per order: fitted slopes of log‖error‖ (truncation and total) and predictions."""
    from hpcqml.carleman import timestepping as ts

    names = ("fitted", "fitted_se", "fitted_total", "fitted_total_se", "predicted")
    out: dict[str, list[float]] = {k: [] for k in names}
    window = (0, 0)
    for N in orders:
        parts = case.split[N]
        for key, name in (("truncation", "fitted"), ("total", "fitted_total")):
            err = np.linalg.norm(parts[key], axis=1)
            err = np.where(err > case.floor, err, np.nan)
            slope, se, t0, t1 = ts.fit_late_rate(err, late_fraction)
            out[name].append(slope)
            out[f"{name}_se"].append(se)
            window = (t0, t1)
        rho, pred = ts.predicted_rate(case.a, N) if np.all(np.isfinite(case.a)) else (np.nan, np.nan)
        out["predicted"].append(pred)
    res = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    res["rho"] = np.asarray(rho, dtype=np.float64)
    res["window"] = np.asarray(window, dtype=np.int64)
    return res



def write_case_group(g: h5py.Group, case: CaseReference, scaling: dict[str, np.ndarray] | None,
                     rates: dict[str, np.ndarray]) -> None:
    """The case group ``qcm/LABEL``: instance, exact trajectory, error split, rates, discreteness scaling.

    Args:
        g: the (empty) group.
        case: the instance's reference quantities.
        scaling: :func:`hpcqml.carleman.timestepping.discreteness_scaling` at the horizon T, or None.
        rates: :func:`late_rates`.
    """
    from hpcqml.carleman.instance import to_dict
    from hpcqml.store import write_dataset

    gi = g.create_group("instance")
    units = {"n": "count", "q": "count"}
    for key, val in to_dict(case.ode).items():
        write_dataset(gi, key, val, units.get(key, "1"), f"instance array {key} (CSR of F_l, eq. II.1-II.2)")
    write_dataset(g, "u_exact", case.u, "1", "exact nonlinear recurrence u(t), t = 0..T (eq. II.1)")
    write_dataset(g, "F_norms", case.F_norms, "1", "spectral norms ||F_l||_2, l = 0..q")
    write_dataset(g, "F1_eigenvalues", case.a, "1", "eigenvalues a of F1 (a = -eta*lambda, eq. II.65)")
    write_dataset(g, "floor", case.floor, "1", "rounding floor 1e-14*max_{s<=t} max(||u(s)||, ||y_ref(s)||); "
                                              "errors below it are not fitted or drawn")
    if "params" in case.ode.meta:
        write_dataset(g, "params", list(case.ode.meta["params"]), "1", "network: names of the kept weights")
    for N, parts in case.split.items():
        gs = g.create_group(f"split/N_{N}")
        write_dataset(gs, "total", parts["total"], "1", "u(t) - y1^(N)(t): error against the discrete map (eq. II.8)")
        write_dataset(gs, "truncation", parts["truncation"], "1",
                      "y1^(N_ref)(t) - y1^(N)(t): linearisation (truncation) error of the Carleman stepping")
        write_dataset(gs, "discreteness", parts["discreteness"], "1",
                      "u(t) - y1^(N_ref)(t): discreteness error of the continuous-time lift (eq. V.20-V.22)")
    _write_rates(g.create_group("rates"), case, rates)
    if scaling is not None:
        gd = g.create_group("discreteness_scaling")
        write_dataset(gd, "h", scaling["h"], "1", "relative step sizes (F_l -> h F_l, horizon/h steps)")
        write_dataset(gd, "error", scaling["error"], "1", "max-abs discreteness error at the horizon")
        gd.attrs["slope"] = float(scaling["slope"])
        gd.attrs["horizon"] = float(case.T)


def _write_rates(gr: h5py.Group, case: CaseReference, rates: dict) -> None:
    """The fitted late-time rates beside their predictions (Fig. 4)."""
    from hpcqml.store import write_dataset

    gr.attrs["late_window"] = rates["window"]
    write_dataset(gr, "N", np.asarray(list(case.split), dtype=np.int64), "count", "Carleman orders of the rows")
    write_dataset(gr, "fitted", rates["fitted"], "1/step", "late-time slope of log||truncation error(t)||_2")
    write_dataset(gr, "fitted_se", rates["fitted_se"], "1/step",
                  "least-squares standard error of that slope; the residuals are deterministic transients, so "
                  "this is not an uncertainty (verdicts use the spread over seeds)")
    write_dataset(gr, "fitted_total", rates["fitted_total"], "1/step", "late-time slope of log||u(t)-y1(t)||_2")
    write_dataset(gr, "fitted_total_se", rates["fitted_total_se"], "1/step", "standard error of that slope")
    write_dataset(gr, "predicted", rates["predicted"], "1/step",
                  "(N+1)*rho when rho > 0 (divergent mode), rho otherwise (slowest mode); eq. II.28, II.52")
    write_dataset(gr, "rho", rates["rho"], "1/step", "max log|1+a| over the eigenvalues a of F1 (eq. II.28)")


def case_attributes(case: CaseReference, generator: str, eta: float) -> dict:
    """The attributes of the case group: sizes, u_bar, N_ref, the N = 1 dissipative fraction, R."""
    from hpcqml.carleman.mode_link import hessian_fraction

    return {"generator": generator, "n": case.ode.n, "q": case.ode.q, "T": case.T, "eta": eta,
            "u_bar": case.u_bar, "coordinate": case.coord, "N_ref": case.N_ref,
            "dissipative_fraction_N1": hessian_fraction(case.a) if np.all(np.isfinite(case.a)) else float("nan"),
            "R_PNAS": case.R[0], "R_PNAS_definition": case.R[1],
            **{k: v for k, v in case.attrs.items() if isinstance(v, (int, float, str))}}


#: (units, description) of every dataset of an order group
ORDER_DATASETS = {
    "y": ("1", "KSP solution y(t) of M X = B (eq. II.79); first n columns only when large"),
    "eta1": ("1", "eta_1(t) = u(t) - y_1(t) (eq. II.8)"),
    "eta1_norm": ("1", "||eta_1(t)||_2"),
    "eta_norm": ("1", "||lift(u(t)) - y(t)||_2 over all N blocks (eq. II.8); NaN when y is not stored whole"),
    "eigenvalues": ("1", "eigenvalues a of A (eq. II.28)"),
    "residual_norm": ("1", "||r(t)||: per-step residual of the lifted exact trajectory (eq. II.50, V.21)"),
    "residual_truncation": ("1", "truncation part of r(t) (eq. II.50-II.52)"),
    "residual_discreteness": ("1", "discreteness part of r(t) (delta zeta, eq. V.21-V.22)"),
    "bound_discrete": ("1", "B(t) = sum_s ||I+A||^(t-1-s) ||r(s)||, a valid bound on ||eta(t)|| of the map"),
    "power_norms": ("1", "||(I+A)^t||_2, t = 0..T, by dense repeated products: the terms of eq. II.81 as printed"),
    "mat_bytes_per_rank": ("bytes", "AIJ storage of A per rank"),
    "mat_bytes_per_rank_M": ("bytes", "AIJ storage of M per rank"),
    "peak_rss_bytes_per_rank": ("bytes", "peak resident memory per rank after assembling M"),
}


def _order_II60_check(case: CaseReference, cfg: dict, N_star: float) -> tuple[float, bool, float]:  # noqa: N802 - eq. II.60
    """(order to report, whether it was checked, measured max_t ||eta_1(t)|| at that order).

    The order of eq. II.60 is verified by running the order-N* stepping when it is small enough
    (Delta <= ref_max_dim); when its error misses eps the order is reported as NaN, so no N is
    named that does not reach the target.  Unchecked orders are reported as the formula gives them.
    """
    from hpcqml.carleman import timestepping as ts
    from hpcqml.carleman.instance import carleman_dim

    if not np.isfinite(N_star) or N_star > 64 or carleman_dim(case.ode.n, int(N_star)) > cfg["ref_max_dim"]:
        return N_star, False, float("nan")
    y = ts.carleman_trajectory(case.ode, int(N_star), case.T)
    err = float(np.max(np.linalg.norm(case.u - y, axis=1)))
    return (N_star if err <= cfg["eps"] else float("nan")), True, err


def _inverse(x: float) -> float:
    """1/x for x > 0, +inf for x = 0, NaN when x is NaN (never computed)."""
    if not np.isfinite(x):
        return float("nan")
    return 1.0 / x if x > 0 else float("inf")


def _bounds(case: CaseReference, cfg: dict, N: int, norms: Norms, eta_norm: np.ndarray, bound_discrete: np.ndarray,
            lift_kind: str = "paper") -> dict:
    """Every bound of the order with the measured quantity beside it and a ``holds_*`` flag.

    Each flag is "true", "false" or "not evaluated" (:func:`hpcqml.carleman.timestepping.verdict`):
    a bound that was not computed (NaN σ_min(A), unchecked order, no residual bound) or is infinite
    is never reported as held.  Eq. II.57 and II.60 are statements about the paper's A; for the
    discrete lift they are "not evaluated".
    """
    from hpcqml.carleman import timestepping as ts

    nan = float("nan")
    measured = float(np.nanmax(eta_norm))
    trunc = float(np.max(np.linalg.norm(case.split[N]["truncation"], axis=1)))
    atol = 1e-10 * case.u_bar  # resolution of the measured errors (KSP rtol 1e-12 on M of norm <= 2)
    paper = lift_kind == "paper"
    inv_A, inv_Ainv = _inverse(norms.norm_A), _inverse(norms.sigma_min_A)
    b57 = (ts.bound_II57(N, inv_A, case.u_bar, case.F_norms) if case.u_bar > 0 else 0.0) if paper else nan
    b57i = ((ts.bound_II57(N, inv_Ainv, case.u_bar, case.F_norms) if case.u_bar > 0 else 0.0)
            if paper and np.isfinite(inv_Ainv) else nan)
    formula = (ts.order_II60(cfg["eps"], norms.norm_A, case.u_bar, case.F_norms)
               if paper and norms.norm_A > 0 else nan)
    order, checked, err_at = _order_II60_check(case, cfg, formula) if paper else (nan, False, nan)
    if checked:
        holds60 = "true" if np.isfinite(order) else "false"
    else:
        holds60 = ts.NOT_EVALUATED
    return {
        "bound_II57": b57, "bound_II57_inverse_norm": b57i, "measured_II57": measured, "bounds_atol": atol,
        "holds_II57": ts.verdict(measured, b57, atol), "holds_II57_inverse_norm": ts.verdict(measured, b57i, atol),
        "measured_II57_truncation": trunc,
        "holds_II57_truncation": ts.verdict(trunc, b57, atol) if paper else ts.NOT_EVALUATED,
        "order_II60_formula": formula, "order_II60": order, "order_II60_checked": checked,
        "order_II60_measured": err_at, "holds_II60": holds60,
        "bound_discrete": float(bound_discrete[-1]) if bound_discrete.size else nan,
        "holds_discrete": ts.verdict(eta_norm, bound_discrete, atol) if bound_discrete.size else ts.NOT_EVALUATED,
    }


def _violated(attrs: dict) -> str:
    """Comma-separated names of the bounds that were evaluated and did not hold (flag "false")."""
    names = [k[len("holds_"):] for k, v in attrs.items() if k.startswith("holds_") and v == "false"]
    if "kappa_II83" in names and not attrs.get("kappa_bound_II83_applies", False):
        names.remove("kappa_II83")
    return ",".join(names)


def _fractions(case: CaseReference, N: int, dis: int, delta: int, complete: bool, lift_kind: str) -> dict:
    """Dissipative fraction of the assembled A beside the F0 = 0 sum-spectrum value (eq. II.64).

    NaN where the count is not complete or (for the sums) the lift is not the paper's or n^N > 10^6.
    """
    from hpcqml.carleman.mode_link import sum_spectrum_fraction

    nan = float("nan")
    sums_ok = lift_kind == "paper" and np.all(np.isfinite(case.a)) and case.ode.n ** N <= 1_000_000
    return {"dissipative_fraction": dis / delta if complete else nan,
            "dissipative_fraction_F0_zero": sum_spectrum_fraction(case.a, N) if sums_ok else nan}


def _lifted_error(case: CaseReference, X: np.ndarray, N: int) -> np.ndarray:
    """||lift(u(t)) - y(t)||_2 over all N blocks, t = 0..T (the η of eq. II.8)."""
    from hpcqml.carleman.instance import lift

    return np.array([np.linalg.norm(lift(case.u[t], N) - X[t]) for t in range(case.T + 1)], dtype=np.float64)


def _residual_bound(case: CaseReference, cfg: dict, N: int, norm_IA: float,
                    lift_kind: str = "paper") -> tuple[dict, np.ndarray]:
    """Per-step residual norms and the discrete bound B(t); empty when too large or F0 varies with t."""
    from hpcqml.carleman import discrete
    from hpcqml.carleman import timestepping as ts
    from hpcqml.carleman.instance import carleman_dim

    if case.ode.F0_t is not None or carleman_dim(case.ode.n, N + max(case.ode.q - 1, 0)) > cfg["ref_max_dim"]:
        return {}, np.zeros(0)
    res = ts.lifted_residuals(case.ode, N, case.u) if lift_kind == "paper" else discrete.residuals(case.ode, N, case.u)
    return ({"residual_norm": res["residual"], "residual_truncation": res["truncation"],
             "residual_discreteness": res["discreteness"]}, ts.discrete_bound(norm_IA, res["residual"]))


def _power_sums(case: CaseReference, cfg: dict, N: int, norm_IA: float, lift_kind: str) -> dict:
    """Eq. II.81 as printed, sum_t ||(I+A)^t||, beside the looser sum_t ||I+A||^t; NaN beyond the limit.

    The powers are dense repeated products of the serial I + A (the mean A for a time-varying F0),
    done when T * Delta^3 <= ``power_norm_flops``.
    """
    from hpcqml.carleman import discrete
    from hpcqml.carleman import reference as ref
    from hpcqml.carleman import timestepping as ts
    from hpcqml.carleman.instance import carleman_dim

    D = carleman_dim(case.ode.n, N)
    loose = float(sum(norm_IA**t for t in range(case.T + 1)))
    if case.T * float(D) ** 3 > cfg["power_norm_flops"]:
        return {"sum_power_norms": float("nan"), "sum_norm_powers": loose, "power_norms": np.zeros(0)}
    A = ref.carleman_matrix(case.ode, N) if lift_kind == "paper" else discrete.reference_matrix(case.ode, N)[0]
    powers = ts.power_norms(np.eye(D) + A.toarray(), case.T)
    return {"sum_power_norms": float(np.sum(powers)), "sum_norm_powers": loose, "power_norms": powers}


def _kappa_attrs(cr: ConditionReport, sums: dict) -> dict:
    """κ(M), ||M^-1|| and every eq. II.81/II.83 bound with a three-valued flag."""
    from hpcqml.carleman import timestepping as ts

    inv_M = _inverse(cr.sigma_min)
    printed = (1.0 + cr.norm_IA) * sums["sum_power_norms"]
    return {"sigma_max_M": cr.sigma_max, "sigma_min_M": cr.sigma_min, "kappa_M": cr.kappa,
            "inverse_norm_M": inv_M,
            "bound_II81_power_norms": sums["sum_power_norms"], "bound_II81_norm_powers": sums["sum_norm_powers"],
            "holds_II81_power_norms": ts.verdict(inv_M, sums["sum_power_norms"]),
            "holds_II81_norm_powers": ts.verdict(inv_M, sums["sum_norm_powers"]),
            "kappa_bound_II83": cr.bound_II83, "kappa_bound_general": cr.bound_general,
            "kappa_bound_II81_power_norms": printed,
            "kappa_bound_II83_applies": cr.II83_applies,
            "holds_kappa_II83": ts.verdict(cr.kappa, cr.bound_II83) if cr.II83_applies else ts.NOT_EVALUATED,
            "holds_kappa_II81": ts.verdict(cr.kappa, cr.bound_general),
            "holds_kappa_II81_power_norms": ts.verdict(cr.kappa, printed), "kappa_method": cr.method}


@dataclass
class OrderReport:
    """Everything computed for one (instance, order N, lift): the attributes and arrays of its group.

    ``attrs`` are the scalar results (sizes, solver facts, errors, bounds, ``holds_*`` flags, kappa,
    R; names and meaning in docs/schema/qcm.md), ``arrays`` the per-step and per-rank arrays
    (:data:`ORDER_DATASETS` gives their units and descriptions).  On ranks other than 0 the
    array ``y`` (the solution itself) is absent; every other entry is the same on every rank.
    """

    N: int
    lift: str
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def flags(self) -> dict[str, str]:
        """Every ``holds_*`` flag ("true", "false", "not evaluated"), by bound name."""
        return {k[len("holds_"):]: str(v) for k, v in self.attrs.items() if k.startswith("holds_")}

    @property
    def violated(self) -> list[str]:
        """Names of the evaluated bounds that did not hold."""
        text = str(self.attrs.get("violated_bounds", ""))
        return [name for name in text.split(",") if name]

    @property
    def kappa(self) -> float:
        """The condition number of M, sigma_max / sigma_min (eq. II.81-II.83); NaN when not computed."""
        return float(self.attrs.get("kappa_M", float("nan")))

    @property
    def R(self) -> float:  # noqa: N802 - the symbol R of Liu et al.
        """The convergence number R of Liu et al. (PNAS 2021); NaN where not defined."""
        return float(self.attrs.get("R_PNAS", float("nan")))

    @property
    def power_norms(self) -> np.ndarray:
        """||(I+A)^t||_2, t = 0..T (the terms of eq. II.81 as printed); empty when not computed."""
        return np.asarray(self.arrays.get("power_norms", np.zeros(0)), dtype=np.float64)

    @property
    def max_error(self) -> float:
        """max_t ||eta_1(t)||_2 (eq. II.8)."""
        return float(self.attrs["max_norm_eta1"])

    def to_group(self, group: h5py.Group) -> None:
        """Write the arrays (each with units and description) and the attributes into ``group``."""
        from hpcqml.store import write_dataset

        for name, val in self.arrays.items():
            units, desc = ORDER_DATASETS[name]
            write_dataset(group, name, val, units, desc)
        for name, value in self.attrs.items():
            group.attrs[name] = value

    @classmethod
    def from_group(cls, group: h5py.Group) -> OrderReport:
        """The report of an order group written by :meth:`to_group` (strings decoded, scalars as Python)."""
        def plain(value: Any) -> Any:
            if isinstance(value, bytes):
                return value.decode("utf-8", errors="replace")
            return value.item() if isinstance(value, np.generic) else value

        attrs = {k: plain(v) for k, v in group.attrs.items() if k not in ("complete", "completed_at")}
        arrays = {k: np.asarray(v[()]) for k, v in group.items() if k in ORDER_DATASETS}
        order = attrs.get("N", str(group.name).rsplit("_", 1)[-1])   # the group is named N_{N} or discrete_N_{N}
        return cls(N=int(order), lift=str(attrs.get("lift", "paper")), attrs=attrs, arrays=arrays)


def _solve_and_spectra(case: CaseReference, cfg: dict, N: int, lift_kind: str, comm: Any,
                       log: Callable[[str], None], label: str) -> tuple[dict, dict, np.ndarray, Norms, tuple]:
    """Assembly, KSP solve, spectra, norms and kappa of one order inside one :class:`CarlemanCase`.

    Returns ``(attrs, derived, eigenvalues, norms, (stats_A, stats_M))``; ``derived`` holds the
    errors computed from X on rank 0 (``y`` only there) and broadcast.
    """
    from hpcqml.carleman.system import CarlemanCase

    tol, dense = cfg["svd_tol"], cfg["dense_limit"]
    with CarlemanCase(case.ode, N, case.T, comm, rtol=cfg["ksp_rtol"], lift_kind=lift_kind) as pc:
        stA, stM = pc.stats_A, pc.stats_M
        assert stA is not None and stM is not None   # set by the assembly on entering the block
        big = stM.rows >= 50_000
        if big:
            log(f"{label} N={N}: KSP solve of M ({stM.rows:,} rows, {stM.nnz:,} nonzeros)")
        whole = (case.T + 1) * pc.delta <= STORE_WHOLE_LIMIT
        facts = pc.solve(gather="root" if whole else "none")
        if big:
            log(f"{label} N={N}: KSP done, {facts.iterations} its in {facts.seconds:.2f} s")
        derived = _errors_on_root(case, facts.X, N, comm) if whole else _errors_distributed(case, facts, N, comm)
        eigs, eig_method = pc.eigenvalues(dense_limit=dense, nev=cfg["nev"], tol=tol)
        norms = pc.norms(tol=tol, dense_limit=dense)
        attrs = {"Delta": stA.rows, "nnz_A": stA.nnz, "rows_M": stM.rows,
                 "nnz_M": stM.nnz, "assembly_seconds_A": stA.seconds,
                 "assembly_seconds_M": stM.seconds,
                 "exact_preallocation": bool(stA.exact_preallocation and stM.exact_preallocation),
                 "ksp_type": facts.ksp_type, "pc_type": facts.pc_type, "ksp_iterations": facts.iterations,
                 "ksp_reason": facts.reason, "ksp_residual_norm": facts.residual_norm,
                 "solve_seconds": facts.seconds, "eigen_method": eig_method,
                 "norm_I_plus_A": norms.norm_IA, "norm_A": norms.norm_A, "sigma_min_A": norms.sigma_min_A,
                 "svd_method": norms.method, "lift": lift_kind}
        if cfg["kappa"]:
            if big:
                log(f"{label} N={N}: SLEPc SVD for kappa(M)")
            cr = pc.condition(norms.norm_IA, tol=tol, dense_limit=dense)
            sums = _power_sums(case, cfg, N, norms.norm_IA, lift_kind)
            attrs.update(_kappa_attrs(cr, sums))
            derived["power_norms"] = sums["power_norms"]
        stats = (stA, stM)
    return attrs, derived, eigs, norms, stats


def _errors_on_root(case: CaseReference, X: np.ndarray | None, N: int, comm: Any) -> dict:
    """eta_1(t) = u(t) - y_1(t) and ||lift(u(t)) - y(t)|| from X on rank 0, broadcast to every rank.

    Rank 0 also keeps ``y`` = X, which is stored whole.
    """
    out: dict = {}
    if comm.Get_rank() == 0:
        assert X is not None
        out["y"] = X
        small = (case.u - X[:, : case.ode.n], _lifted_error(case, X, N))
    else:
        small = None
    out["eta1"], out["eta_norm"] = comm.bcast(small, root=0)
    return out


def _errors_distributed(case: CaseReference, facts: KspFacts, N: int, comm: Any) -> dict:
    """eta_1(t) and ||lift(u(t)) - y(t)||_2 (eq. II.8) without gathering X (more than
    :data:`STORE_WHOLE_LIMIT` entries): each rank sums the squared lifted error over its own rows,
    the sums are added over ranks, and only the first n columns y_1(t) travel, to rank 0, which
    keeps them as ``y`` and broadcasts eta_1.
    """
    from hpcqml.carleman.instance import carleman_dim, lift

    n, T = case.ode.n, case.T
    D = carleman_dim(n, N)
    r0, r1 = facts.row_range
    idx = np.arange(r0, r1, dtype=np.int64)
    step, col = idx // D, idx % D
    squares = np.zeros(T + 1, dtype=np.float64)
    for t in np.unique(step):
        sel = step == t
        diff = lift(case.u[t], N)[col[sel]] - facts.local[sel]
        squares[t] = float(diff @ diff)
    eta_norm = np.sqrt(np.asarray(comm.allreduce(squares), dtype=np.float64))
    first = col < n
    pieces = comm.gather((idx[first], facts.local[first]), root=0)
    out: dict = {}
    small = None
    if comm.Get_rank() == 0:
        y1 = np.empty((T + 1, n), dtype=np.float64)
        for rows, vals in pieces:
            y1[rows // D, rows % D] = vals
        out["y"] = y1
        small = case.u - y1
    out["eta1"], out["eta_norm"] = comm.bcast(small, root=0), eta_norm
    return out


def order_report(case: CaseReference, cfg: dict, N: int, comm: Any, lift_kind: str = "paper",
                 log: Callable[[str], None] = lambda _line: None, label: str = "") -> OrderReport:
    """Every result of order N of one instance (collective over ``comm``).

    Args:
        case: the instance's serial reference quantities.
        cfg: the qcm configuration (tolerances, limits, ``kappa``, ``eps``; docs/schema/qcm.md).
        N: Carleman order.
        comm: the communicator of the PETSc objects.
        lift_kind: ``paper`` (eq. II.3-II.6) or ``discrete`` (exact lift of the map).
        log: progress and warning lines (rank 0 prints them in the stage).
        label: the case's name in those lines.

    Returns:
        The :class:`OrderReport`.
    """
    from hpcqml.carleman import spectra
    from hpcqml.carleman import timestepping as ts

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stable = ts.check_stability(case.ode, N)
    for w in caught:
        log(f"warning: {w.message}")
    petsc_attrs, derived, eigs, norms, (stA, stM) = _solve_and_spectra(case, cfg, N, lift_kind, comm, log, label)
    powers = derived.pop("power_norms", None)
    dis, div = spectra.dissipative_counts(eigs)
    complete = eigs.shape[0] == petsc_attrs["Delta"]
    eta1, eta_norm = derived["eta1"], derived["eta_norm"]
    residuals, bound_discrete = _residual_bound(case, cfg, N, norms.norm_IA, lift_kind)
    with np.errstate(divide="ignore"):
        rho_A = float(np.max(np.log(np.abs(1.0 + eigs)))) if eigs.size else float("nan")
    attrs = {"N": N, "T": case.T, "ranks": comm.Get_size(), **petsc_attrs,
             "stability_number": ts.stability_number(case.ode, N), "stable": bool(stable),
             "dissipative_modes": dis, "divergent_modes": div, "max_log_abs_1_plus_a": rho_A,
             "dissipative_count_scope": ("complete" if complete else
                                         f"computed eigenvalues only ({eigs.shape[0]} of {petsc_attrs['Delta']})"),
             **_fractions(case, N, dis, petsc_attrs["Delta"], complete, lift_kind),
             "svd_tol": cfg["svd_tol"], "u_bar": case.u_bar, "eps": cfg["eps"],
             "max_abs_eta1": float(np.max(np.abs(eta1))), "max_norm_eta1": float(np.max(np.linalg.norm(eta1, axis=1))),
             "R_PNAS": case.R[0],
             **_bounds(case, cfg, N, norms, eta_norm, bound_discrete, lift_kind)}
    attrs["violated_bounds"] = _violated(attrs)
    arrays = {**({"y": derived["y"]} if "y" in derived else {}), "eta1": eta1,
              "eta1_norm": np.linalg.norm(eta1, axis=1), "eta_norm": eta_norm, "eigenvalues": eigs,
              **residuals, "mat_bytes_per_rank": np.asarray(stA.mat_bytes_per_rank, dtype=np.int64),
              "mat_bytes_per_rank_M": np.asarray(stM.mat_bytes_per_rank, dtype=np.int64),
              "peak_rss_bytes_per_rank": np.asarray(stM.peak_rss_bytes_per_rank, dtype=np.int64)}
    if bound_discrete.size:
        arrays["bound_discrete"] = bound_discrete
    if powers is not None and powers.size:
        arrays["power_norms"] = powers
    return OrderReport(N=N, lift=lift_kind, attrs=attrs, arrays=arrays)
