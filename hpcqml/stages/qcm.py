"""``qcm`` stage: quantum Carleman matrices of polynomial ODE instances (paper Sec. II A-C, III C, V B).

For every instance (one per fraction f and seed, or one from a file / a network) and every
truncation order N it assembles A (eq. II.3-II.6) and M (eq. II.79) with PETSc inside one
:class:`hpcqml.carleman.system.CarlemanCase` (which owns every PETSc object of the case), solves
M X = B with KSP, compares with the exact nonlinear recurrence (eq. II.1), computes SLEPc spectra,
||I+A||_2, kappa(M), the bounds of eq. II.57, II.60, II.81, II.83 and a discrete-map bound, each
with the measured quantity and a three-valued ``holds_*`` flag ("true", "false", "not evaluated"),
fits the late-time error rate (Fig. 4) and writes one HDF5 group per case (layout: docs/schema/qcm.md).
``lift`` selects the paper's I + A, the exact lift of the discrete map (:mod:`hpcqml.carleman.discrete`)
or both; the R number of Liu et al. (PNAS 2021) and eq. II.81 as printed are stored beside the errors.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import NumericalError, UserError
from hpcqml.stages import Stage, StageContext, register

if TYPE_CHECKING:
    from hpcqml.carleman.spectra import ConditionReport

SCHEMA = {
    "generator": Field(str, "random", choices=("random", "sparse", "logistic", "network", "file"),
                       doc="instance source: random quadratic family (Sec. III C), its sparse variant, "
                           "scalar logistic map, reduced network instance, or an HDF5 file"),
    "n": Field(int, 3, min=1, doc="state dimension (random/sparse)"),
    "f": Field(list, [1.0], min_items=1, item=float, min=0.0, max=1.0,
               doc="fractions of dissipative Hessian modes, one case each"),
    "seeds": Field(list, [0], min_items=1, item=int, min=0, doc="instance seeds, one case each"),
    "N": Field(list, [1, 2, 3], min_items=1, item=int, min=1, doc="Carleman truncation orders"),
    "T": Field(int, 20, min=1, doc="number of time steps"),
    "eta": Field(float, 0.25, min=0.0,
                 doc="step size: F_l -> eta F_l (random/sparse/logistic); learning rate (network)"),
    "u_scale": Field(float, 0.1, min=0.0, doc="u_in ~ U(-u_scale, u_scale) (random/sparse); u_in (logistic)"),
    "div_range": Field(float, 0.01, min=0.0, doc="random/sparse: divergent Hessian eigenvalues ~ U(-div_range, 0) "
                                                 "(the paper's 0.01; larger values are a stated variant)"),
    "f2_per_row": Field(int, 4, min=0, doc="nonzeros per row of F2 (sparse)"),
    "logistic_a": Field(float, 1.0, doc="logistic: linear rate a in u' = -a u - c u^2"),
    "logistic_c": Field(float, 1.0, doc="logistic: quadratic rate c"),
    "file": Field(str, "", doc="HDF5 file holding an instance (generator = file)"),
    "file_group": Field(str, "/", doc="group inside that file"),
    "model_file": Field(str, "", doc="network: checkpoint; empty = workdir/pruned.pt"),
    "k": Field(int, 6, min=1, doc="network: number of parameters kept"),
    "batch_size": Field(int, 32, min=1, doc="network: samples in the fixed batch"),
    "batchnorm": Field(str, "eval", choices=("eval", "train"),
                       doc="network: BatchNorm statistics of the derivatives: running (eval, default) or the fixed "
                           "batch's own (train; running statistics neither read nor updated); docs/science.md"),
    "N_ref": Field(int, 0, min=0, doc="order of the reference run for the truncation/discreteness split; 0 = max(N)+2 "
                                      "capped by ref_max_dim"),
    "ref_max_dim": Field(int, 20000, min=1, doc="largest Delta allowed for the reference run"),
    "step_sizes": Field(list, [1.0, 0.5, 0.25], item=float, min=0.0,
                        doc="relative step sizes for the discreteness scaling"),
    "eps": Field(float, 1e-3, min=0.0, doc="target linearisation error for the order of eq. II.60"),
    "dense_limit": Field(int, 3000, min=1, doc="all eigenvalues / dense SVD up to this size"),
    "nev": Field(int, 20, min=1, doc="extremal eigenvalues computed beyond dense_limit"),
    "svd_tol": Field(float, 1e-10, min=0.0, doc="SLEPc SVD relative tolerance"),
    "ksp_rtol": Field(float, 1e-12, min=0.0, doc="KSP relative residual tolerance"),
    "kappa": Field(bool, True, doc="compute kappa(M) by SLEPc SVD (skip for huge systems)"),
    "f0_noise": Field(float, 0.0, min=0.0, doc="SGD noise of the constant term: F0(t) = F0 + f0_noise * xi_t, "
                                                "xi_t ~ N(0, I) per step t < T from the case seed; 0 = off"),
    "late_fraction": Field(float, 0.5, min=0.05, max=1.0,
                           doc="last fraction of t = 0..T over which the late-time error rate is fitted"),
    "draws": Field(str, "independent", choices=("independent", "shared"),
                   doc="random/sparse: independent draws per (f, seed) (default), or one stream per seed shared "
                       "by every f (the earlier behaviour: nested divergent draws, equal predicted rates)"),
    "lift": Field(str, "paper", choices=("paper", "discrete", "both"),
                  doc="Carleman lift: the paper's I + A (eq. II.3-II.6, II.78), the exact lift of the discrete map "
                      "(Kronecker powers of u + F(u), truncated at N), or both (groups N_* and discrete_N_*)"),
    "power_norm_flops": Field(float, 2e9, min=0.0,
                              doc="largest T*Delta^3 for which ||(I+A)^t||, t <= T, of eq. II.81 are computed by "
                                  "dense repeated products; larger cases store NaN ('not evaluated')"),
}


def _lifts(cfg: dict) -> list[str]:
    """The lifts to run, in order (``both``: the paper's first)."""
    return ["paper", "discrete"] if cfg["lift"] == "both" else [cfg["lift"]]


def _order_key(label: str, N: int, lift_kind: str) -> str:
    """Group of one order: ``qcm/LABEL/N_{N}`` (paper lift) or ``qcm/LABEL/discrete_N_{N}``."""
    return f"qcm/{label}/N_{N}" if lift_kind == "paper" else f"qcm/{label}/discrete_N_{N}"


def _generated(ctx: StageContext) -> list[tuple[str, object, dict]]:
    """(label, PolynomialODE, attrs) of the configured generator, before any F0 noise."""
    from hpcqml.carleman import generators as gen
    from hpcqml.carleman.cases import random_instance
    from hpcqml.carleman.instance import load_instance

    cfg = ctx.cfg
    kind, eta = cfg["generator"], cfg["eta"]
    if kind in ("random", "sparse"):
        return [(f"f{f:.3f}_seed{seed}",
                 random_instance(kind, cfg["n"], f, seed, eta=eta, u_scale=cfg["u_scale"],
                                 div_range=cfg["div_range"], f2_per_row=cfg["f2_per_row"], draws=cfg["draws"]),
                 {"f": f, "seed": seed})
                for f in cfg["f"] for seed in cfg["seeds"]]
    if kind == "logistic":
        ode = gen.logistic(cfg["logistic_a"], cfg["logistic_c"], cfg["u_scale"], h=eta)
        return [("logistic", ode, {"a": cfg["logistic_a"], "c": cfg["logistic_c"]})]
    if kind == "file":
        if not cfg["file"]:
            raise UserError("[qcm] generator = 'file' needs [qcm] file")
        return [("file", load_instance(cfg["file"], cfg["file_group"]), {"file": str(cfg["file"])})]
    return [("network", _network_instance(ctx), {"k": cfg["k"], "eta": eta, "batchnorm": cfg["batchnorm"]})]


def _make_instances(ctx: StageContext) -> list[tuple[str, object, dict]]:
    """(label, PolynomialODE, attrs) for every case of the config, with F0 noise when set."""
    from hpcqml.carleman import generators as gen

    cfg = ctx.cfg
    out = _generated(ctx)
    sigma = cfg.get("f0_noise", 0.0)
    if sigma <= 0.0:
        for _, ode, _ in out:
            ode.check_horizon(cfg["T"])  # a file instance with F0_t must cover T steps
        return out
    noisy = []
    for label, ode, attrs in out:   # per-step noise of the map itself, added after the eta scaling
        if ode.F0_t is not None:
            raise UserError("[qcm] the file instance already has F0_t; set f0_noise = 0")
        noisy.append((label, gen.with_f0_noise(ode, sigma, cfg["T"], attrs.get("seed", 0)),
                      {**attrs, "f0_noise": sigma}))
    return noisy


def _network_instance(ctx: StageContext):
    """Reduced instance of the pruned model on a fixed training batch."""
    import torch

    from hpcqml.carleman.cases import network_case, network_checkpoint
    from hpcqml.data.batches import batch_indices, to_tensor
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.stages.data import ensure_data

    cfg = ctx.cfg
    ckpt, _ = network_checkpoint(ctx, "qcm")
    root = ensure_data(ctx)  # [data] root, or the synthetic set under workdir (collective)
    data = load_cifar100(root)
    idx = batch_indices(len(data.train_y), cfg["batch_size"], ctx.run_cfg["seed"], 0)
    x = to_tensor(data.train_x[idx])
    y = torch.as_tensor(data.train_y[idx])
    return network_case(ckpt.model, ckpt.mask, x, y, cfg["k"], cfg["eta"], batchnorm=cfg["batchnorm"])


def _ref_order(cfg: dict, n: int) -> int:
    from hpcqml.carleman.instance import carleman_dim

    N_ref = cfg["N_ref"] or max(cfg["N"]) + 2
    while N_ref > max(cfg["N"]) and carleman_dim(n, N_ref) > cfg["ref_max_dim"]:
        N_ref -= 1
    return N_ref


def _f1_eigenvalues(ode) -> np.ndarray:
    """Eigenvalues a of F1 (a = -η λ for Hessian eigenvalues λ, eq. II.65); NaN beyond n = 2000."""
    if ode.n > 2000:
        return np.full(1, np.nan)
    return np.linalg.eigvals(ode.F[1].toarray()).astype(np.complex128)


class _Case:
    """Serial (every rank alike) reference quantities of one instance: u, the order-N_ref run, splits."""

    def __init__(self, cfg: dict, label: str, ode, attrs: dict):
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


def _rates(case: _Case, orders: list[int], late_fraction: float) -> dict[str, np.ndarray]:
    """Late-time rates per order: fitted slopes of log‖error‖ (truncation and total) and predictions."""
    from hpcqml.carleman import timestepping as ts

    out = {k: [] for k in ("fitted", "fitted_se", "fitted_total", "fitted_total_se", "predicted")}
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


def _write_case(g, case: _Case, cfg: dict, scaling, rates) -> None:
    """The case group: instance, exact trajectory, error split, rates, discreteness scaling."""
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
        gd.attrs["horizon"] = float(cfg["T"])


def _write_rates(gr, case: _Case, rates: dict) -> None:
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


def _case_attrs(case: _Case, cfg: dict) -> dict:
    from hpcqml.carleman.mode_link import hessian_fraction

    return {"generator": cfg["generator"], "n": case.ode.n, "q": case.ode.q, "T": case.T, "eta": cfg["eta"],
            "u_bar": case.u_bar, "coordinate": case.coord, "N_ref": case.N_ref,
            "dissipative_fraction_N1": hessian_fraction(case.a) if np.all(np.isfinite(case.a)) else float("nan"),
            "R_PNAS": case.R[0], "R_PNAS_definition": case.R[1],
            **{k: v for k, v in case.attrs.items() if isinstance(v, (int, float, str))}}


def run(ctx: StageContext) -> None:
    """Every (instance, order) case of the config; finished groups are skipped on resume."""
    from hpcqml.carleman import timestepping as ts

    cfg = ctx.cfg
    instances = _make_instances(ctx)
    tasks = [(i, N, lk) for i in range(len(instances)) for lk in _lifts(cfg) for N in cfg["N"]]
    cases: dict[int, _Case] = {}
    for i, N, lk in ctx.progress(tasks, total=len(tasks), desc="qcm cases"):
        label, ode, attrs = instances[i]
        base, key = f"qcm/{label}", _order_key(label, N, lk)
        if ctx.store.is_complete(key) and ctx.store.is_complete(base):
            continue
        if i not in cases:
            cases = {i: _Case(cfg, label, ode, attrs)}  # one instance's references in memory at a time
        case = cases[i]
        if not ctx.store.is_complete(base):
            scaling = (ts.discreteness_scaling(ode, case.N_ref, float(case.T), cfg["step_sizes"])
                       if cfg["step_sizes"] else None)
            rates = _rates(case, cfg["N"], cfg["late_fraction"])
            ctx.store.commit(base, lambda g, c=case, s=scaling, r=rates: _write_case(g, c, cfg, s, r),
                             attrs=_case_attrs(case, cfg))
        if ctx.store.is_complete(key):
            continue
        res = _one_order(ctx, label, case, N, lk)
        a = res["attrs"]
        ctx.perf.count("carleman_rows", a["Delta"])
        ctx.perf.count("nnz_assembled", a["nnz_A"] + a["nnz_M"])   # global nonzeros of A and M
        ctx.perf.count("ksp_iterations", a["ksp_iterations"])
        ctx.store.commit(key, lambda g, arrays=res["arrays"]: _write_order(g, arrays), attrs=a)
        ctx.log(f"{label} {lk} lift N={N}: Delta={a['Delta']} nnz(A)={a['nnz_A']} KSP its={a['ksp_iterations']} "
                f"max|eta1|={a['max_abs_eta1']:.3e} violated: {a['violated_bounds'] or 'none'}")


#: (units, description) of every dataset of an order group
_ORDER_DATASETS = {
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


def _write_order(g, arrays: dict) -> None:
    from hpcqml.store import write_dataset

    for name, val in arrays.items():
        units, desc = _ORDER_DATASETS[name]
        write_dataset(g, name, val, units, desc)


def _order_II60_check(case: _Case, cfg: dict, N_star: float) -> tuple[float, bool, float]:  # noqa: N802 - eq. II.60
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


def _bounds(case: _Case, cfg: dict, N: int, norms, eta_norm: np.ndarray, bound_discrete: np.ndarray,
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


def _fractions(case: _Case, N: int, dis: int, delta: int, complete: bool, lift_kind: str) -> dict:
    """Dissipative fraction of the assembled A beside the F0 = 0 sum-spectrum value (eq. II.64).

    NaN where the count is not complete or (for the sums) the lift is not the paper's or n^N > 10^6.
    """
    from hpcqml.carleman.mode_link import sum_spectrum_fraction

    nan = float("nan")
    sums_ok = lift_kind == "paper" and np.all(np.isfinite(case.a)) and case.ode.n ** N <= 1_000_000
    return {"dissipative_fraction": dis / delta if complete else nan,
            "dissipative_fraction_F0_zero": sum_spectrum_fraction(case.a, N) if sums_ok else nan}


def _lifted_error(case: _Case, X: np.ndarray, N: int) -> np.ndarray:
    """||lift(u(t)) - y(t)||_2 over all N blocks, t = 0..T (the η of eq. II.8)."""
    from hpcqml.carleman.instance import lift

    return np.array([np.linalg.norm(lift(case.u[t], N) - X[t]) for t in range(case.T + 1)], dtype=np.float64)


def _residual_bound(case: _Case, cfg: dict, N: int, norm_IA: float,
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


def _power_sums(case: _Case, cfg: dict, N: int, norm_IA: float, lift_kind: str) -> dict:
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
            "kappa_bound_II83_applies": cr.II83_applies, "holds_kappa_II83": ts.verdict(cr.kappa, cr.bound_II83),
            "holds_kappa_II81": ts.verdict(cr.kappa, cr.bound_general),
            "holds_kappa_II81_power_norms": ts.verdict(cr.kappa, printed), "kappa_method": cr.method}


def _petsc_part(ctx: StageContext, label: str, case: _Case, N: int,
                lift_kind: str = "paper") -> tuple[dict, object, object]:
    """Assembly, KSP solve, spectra, norms and κ of one order inside one :class:`CarlemanCase`."""
    from hpcqml.carleman.system import CarlemanCase

    cfg = ctx.cfg
    tol, dense = cfg["svd_tol"], cfg["dense_limit"]
    with CarlemanCase(case.ode, N, case.T, ctx.comm, rtol=cfg["ksp_rtol"], lift_kind=lift_kind) as pc:
        big = pc.stats_M.rows >= 50_000
        if big:
            ctx.log(f"{label} N={N}: KSP solve of M ({pc.stats_M.rows:,} rows, {pc.stats_M.nnz:,} nonzeros)")
        facts = pc.solve()
        if big:
            ctx.log(f"{label} N={N}: KSP done, {facts.iterations} its in {facts.seconds:.2f} s")
        eigs, eig_method = pc.eigenvalues(dense_limit=dense, nev=cfg["nev"], tol=tol)
        norms = pc.norms(tol=tol, dense_limit=dense)
        attrs = {"Delta": pc.stats_A.rows, "nnz_A": pc.stats_A.nnz, "rows_M": pc.stats_M.rows,
                 "nnz_M": pc.stats_M.nnz, "assembly_seconds_A": pc.stats_A.seconds,
                 "assembly_seconds_M": pc.stats_M.seconds,
                 "exact_preallocation": bool(pc.stats_A.exact_preallocation and pc.stats_M.exact_preallocation),
                 "ksp_type": facts.ksp_type, "pc_type": facts.pc_type, "ksp_iterations": facts.iterations,
                 "ksp_reason": facts.reason, "ksp_residual_norm": facts.residual_norm,
                 "solve_seconds": facts.seconds, "eigen_method": eig_method,
                 "norm_I_plus_A": norms.norm_IA, "norm_A": norms.norm_A, "sigma_min_A": norms.sigma_min_A,
                 "svd_method": norms.method, "lift": lift_kind}
        if cfg["kappa"]:
            if big:
                ctx.log(f"{label} N={N}: SLEPc SVD for kappa(M)")
            cr = pc.condition(norms.norm_IA, tol=tol, dense_limit=dense)
            sums = _power_sums(case, cfg, N, norms.norm_IA, lift_kind)
            attrs.update(_kappa_attrs(cr, sums))
            attrs["_power_norms"] = sums["power_norms"]   # an array: moved to the datasets by _one_order
        stats = (pc.stats_A, pc.stats_M)
    return attrs, (facts.X, eigs, norms), stats


def _one_order(ctx: StageContext, label: str, case: _Case, N: int, lift_kind: str = "paper") -> dict:
    from hpcqml.carleman import spectra
    from hpcqml.carleman import timestepping as ts

    cfg = ctx.cfg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stable = ts.check_stability(case.ode, N)
    for w in caught:
        ctx.log(f"warning: {w.message}")
    petsc_attrs, (X, eigs, norms), (stA, stM) = _petsc_part(ctx, label, case, N, lift_kind)
    powers = petsc_attrs.pop("_power_norms", None)
    dis, div = spectra.dissipative_counts(eigs)
    complete = eigs.shape[0] == petsc_attrs["Delta"]
    eta1 = case.u - X[:, : case.ode.n]
    eta_norm = _lifted_error(case, X, N)
    residuals, bound_discrete = _residual_bound(case, cfg, N, norms.norm_IA, lift_kind)
    with np.errstate(divide="ignore"):
        rho_A = float(np.max(np.log(np.abs(1.0 + eigs)))) if eigs.size else float("nan")
    attrs = {"N": N, "T": case.T, "ranks": ctx.comm.Get_size(), **petsc_attrs,
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
    arrays = {"y": X if X.size <= 2_000_000 else X[:, : case.ode.n], "eta1": eta1,
              "eta1_norm": np.linalg.norm(eta1, axis=1), "eta_norm": eta_norm, "eigenvalues": eigs,
              **residuals, "mat_bytes_per_rank": np.asarray(stA.mat_bytes_per_rank, dtype=np.int64),
              "mat_bytes_per_rank_M": np.asarray(stM.mat_bytes_per_rank, dtype=np.int64),
              "peak_rss_bytes_per_rank": np.asarray(stM.peak_rss_bytes_per_rank, dtype=np.int64)}
    if bound_discrete.size:
        arrays["bound_discrete"] = bound_discrete
    if powers is not None and powers.size:
        arrays["power_norms"] = powers
    return {"attrs": attrs, "arrays": arrays}


register(Stage(name="qcm", schema=SCHEMA, run=run,
               doc="quantum Carleman matrices: PETSc assembly, KSP time stepping, SLEPc spectra and kappa, "
                   "bounds with holds flags, late-time error rates (eq. II.3-II.6, II.57-II.60, II.78-II.83)"))
