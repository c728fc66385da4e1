"""``qcm`` stage: quantum Carleman matrices of polynomial ODE instances (paper Sec. II A-C, III C, V B).

For every instance (one per fraction f and seed, or one from a file / a network) and every
truncation order N it assembles A (eq. II.3-II.6) and M (eq. II.79) with PETSc, solves M X = B
with KSP, compares with the exact nonlinear recurrence (eq. II.1), computes SLEPc spectra,
||I+A||_2, kappa(M) and the bounds of eq. II.57, II.60, II.83, and writes one HDF5 group per
case (layout: docs/schema/qcm.md).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.stages import Stage, StageContext, register

SCHEMA = {
    "generator": Field(str, "random", choices=("random", "sparse", "logistic", "network", "file"),
                       doc="instance source: random quadratic family (Sec. III C), its sparse variant, "
                           "scalar logistic map, reduced network instance, or an HDF5 file"),
    "n": Field(int, 3, min=1, doc="state dimension (random/sparse)"),
    "f": Field(list, [1.0], min_items=1, item=float, min=0.0, max=1.0, doc="fractions of dissipative Hessian modes, one case each"),
    "seeds": Field(list, [0], min_items=1, item=int, min=0, doc="instance seeds, one case each"),
    "N": Field(list, [1, 2, 3], min_items=1, item=int, min=1, doc="Carleman truncation orders"),
    "T": Field(int, 20, min=1, doc="number of time steps"),
    "eta": Field(float, 0.25, min=0.0, doc="step size: F_l -> eta F_l (random/sparse/logistic); learning rate (network)"),
    "u_scale": Field(float, 0.1, min=0.0, doc="u_in ~ U(-u_scale, u_scale) (random/sparse); u_in (logistic)"),
    "f2_per_row": Field(int, 4, min=0, doc="nonzeros per row of F2 (sparse)"),
    "logistic_a": Field(float, 1.0, doc="logistic: linear rate a in u' = -a u - c u^2"),
    "logistic_c": Field(float, 1.0, doc="logistic: quadratic rate c"),
    "file": Field(str, "", doc="HDF5 file holding an instance (generator = file)"),
    "file_group": Field(str, "/", doc="group inside that file"),
    "model_file": Field(str, "", doc="network: checkpoint; empty = workdir/pruned.pt"),
    "k": Field(int, 6, min=1, doc="network: number of parameters kept"),
    "batch_size": Field(int, 32, min=1, doc="network: samples in the fixed batch"),
    "N_ref": Field(int, 0, min=0, doc="order of the reference run for the truncation/discreteness split; 0 = max(N)+2 "
                                      "capped by ref_max_dim"),
    "ref_max_dim": Field(int, 20000, min=1, doc="largest Delta allowed for the reference run"),
    "step_sizes": Field(list, [1.0, 0.5, 0.25], item=float, min=0.0, doc="relative step sizes for the discreteness scaling"),
    "eps": Field(float, 1e-3, min=0.0, doc="target linearisation error for the order of eq. II.60"),
    "dense_limit": Field(int, 3000, min=1, doc="all eigenvalues / dense SVD up to this size"),
    "nev": Field(int, 20, min=1, doc="extremal eigenvalues computed beyond dense_limit"),
    "svd_tol": Field(float, 1e-10, min=0.0, doc="SLEPc SVD relative tolerance"),
    "ksp_rtol": Field(float, 1e-12, min=0.0, doc="KSP relative residual tolerance"),
    "kappa": Field(bool, True, doc="compute kappa(M) by SLEPc SVD (skip for huge systems)"),
    "f0_noise": Field(float, 0.0, min=0.0, doc="SGD noise of the constant term: F0(t) = F0 + f0_noise * xi_t, "
                                                "xi_t ~ N(0, I) per step t < T from the case seed (issue 5); 0 = off"),
}


def _make_instances(ctx: StageContext) -> list[tuple[str, object, dict]]:
    """(label, PolynomialODE, attrs) for every case of the config."""
    from hpcqml.carleman import generators as gen
    from hpcqml.carleman.instance import from_dict

    cfg = ctx.cfg
    kind, eta = cfg["generator"], cfg["eta"]
    out = []
    if kind in ("random", "sparse"):
        for f in cfg["f"]:
            for seed in cfg["seeds"]:
                if kind == "random":
                    ode = gen.random_quadratic(cfg["n"], f, seed, u_scale=cfg["u_scale"])
                else:
                    ode = gen.sparse_quadratic(cfg["n"], f, seed, f2_per_row=cfg["f2_per_row"], u_scale=cfg["u_scale"])
                out.append((f"f{f:.3f}_seed{seed}", gen.scale_step(ode, eta), {"f": f, "seed": seed}))
    elif kind == "logistic":
        ode = gen.logistic(cfg["logistic_a"], cfg["logistic_c"], cfg["u_scale"], h=eta)
        out.append(("logistic", ode, {"a": cfg["logistic_a"], "c": cfg["logistic_c"]}))
    elif kind == "file":
        if not cfg["file"]:
            raise UserError("[qcm] generator = 'file' needs [qcm] file")
        path = Path(cfg["file"])
        if not path.exists():
            raise UserError(f"[qcm] file {path} does not exist")
        import h5py

        def load():
            with h5py.File(path, "r") as fh:
                if cfg["file_group"] not in fh:
                    raise UserError(f"[qcm] file {path} has no group {cfg['file_group']!r}")
                return from_dict(fh[cfg["file_group"]])

        ode = load()
        out.append(("file", ode, {"file": str(path)}))
    else:
        ode = _network_instance(ctx)
        import json

        out.append(("network", ode, {"k": cfg["k"], "eta": eta, "params": json.dumps(ode.meta["params"])}))
    sigma = cfg.get("f0_noise", 0.0)
    if sigma > 0.0:  # per-step noise of the map itself, added after the eta scaling
        noisy = []
        for label, ode, attrs in out:
            if ode.F0_t is not None:
                raise UserError("[qcm] the file instance already has F0_t; set f0_noise = 0")
            noisy.append((label, gen.with_f0_noise(ode, sigma, cfg["T"], attrs.get("seed", 0)),
                          {**attrs, "f0_noise": sigma}))
        out = noisy
    else:
        for label, ode, _ in out:
            ode.check_horizon(cfg["T"])  # a file instance with F0_t must cover T steps
    return out


def _network_instance(ctx: StageContext):
    """Reduced instance of the pruned model of the train stage on a fixed training batch."""
    import torch

    from hpcqml.carleman.generators import network_instance
    from hpcqml.data.batches import batch_indices, to_tensor
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.training.checkpoint import load_checkpoint

    cfg = ctx.cfg
    path = Path(cfg["model_file"]) if cfg["model_file"] else ctx.workdir / "pruned.pt"
    if not path.exists():
        raise UserError(f"[qcm] network instance: checkpoint {path} not found (run the train stage or set model_file)")
    ckpt = load_checkpoint(path)
    try:
        from hpcqml.stages.data import ensure_data

        root = ensure_data(ctx)  # [data] root, or the synthetic set under workdir (collective)
    except ImportError:
        root = ctx.workdir / "data"
    data = load_cifar100(root)
    idx = batch_indices(len(data.train_y), cfg["batch_size"], ctx.run_cfg["seed"], 0)
    x = to_tensor(data.train_x[idx]).double()
    y = torch.as_tensor(data.train_y[idx])
    model = ckpt.model.double().eval()
    return network_instance(model, torch.nn.functional.cross_entropy, x, y, cfg["k"], cfg["eta"], mask=ckpt.mask)


def _ref_order(cfg: dict, n: int) -> int:
    from hpcqml.carleman.instance import carleman_dim

    N_ref = cfg["N_ref"] or max(cfg["N"]) + 2
    while N_ref > max(cfg["N"]) and carleman_dim(n, N_ref) > cfg["ref_max_dim"]:
        N_ref -= 1
    return N_ref


def run(ctx: StageContext) -> None:
    from hpcqml.carleman import reference as ref
    from hpcqml.carleman import timestepping as ts
    from hpcqml.carleman.instance import to_dict

    cfg = ctx.cfg
    T = cfg["T"]
    for label, ode, attrs in _make_instances(ctx):
        base = f"qcm/{label}"
        u = ref.exact_recurrence(ode, T)
        F_norms = ode.norms()
        u_bar = float(np.max(np.linalg.norm(u, axis=1)))
        coord = int(np.random.default_rng(attrs.get("seed", 0)).integers(ode.n))
        if not ctx.store.is_complete(base):
            N_ref = _ref_order(cfg, ode.n)
            split = {N: ts.error_split(ode, N, N_ref, T) for N in cfg["N"]}
            scaling = ts.discreteness_scaling(ode, N_ref, float(T), cfg["step_sizes"]) if cfg["step_sizes"] else None
            inst = to_dict(ode)

            def write_case(g, inst=inst, u=u, split=split, scaling=scaling, F_norms=F_norms):
                gi = g.create_group("instance")
                for key, val in inst.items():
                    gi.create_dataset(key, data=val)
                g.create_dataset("u_exact", data=u)
                g.create_dataset("F_norms", data=F_norms)
                for N, parts in split.items():
                    gs = g.create_group(f"split/N_{N}")
                    for key, val in parts.items():
                        gs.create_dataset(key, data=val)
                if scaling is not None:
                    gd = g.create_group("discreteness_scaling")
                    gd.create_dataset("h", data=scaling["h"])
                    gd.create_dataset("error", data=scaling["error"])
                    gd.attrs["slope"] = float(scaling["slope"])
                    gd.attrs["horizon"] = float(T)

            ctx.store.commit(base, write_case, attrs={
                "generator": cfg["generator"], "n": ode.n, "q": ode.q, "T": T, "eta": cfg["eta"],
                "u_bar": u_bar, "coordinate": coord, "N_ref": N_ref,
                **{k: v for k, v in attrs.items() if isinstance(v, (int, float, str))}})
        for N in ctx.progress(cfg["N"], desc=f"qcm {label}"):
            key = f"{base}/N_{N}"
            if ctx.store.is_complete(key):
                continue
            res = _one_order(ctx, ode, N, T, u, F_norms, u_bar)
            a = res["attrs"]
            ctx.perf.count("carleman_rows", a["Delta"])
            ctx.perf.count("nnz_assembled", a["nnz_A"] + a["nnz_M"])   # global nonzeros of A and M
            ctx.perf.count("ksp_iterations", a["ksp_iterations"])
            arrays = res["arrays"]
            ctx.store.commit(key, lambda g, arrays=arrays: [g.create_dataset(k, data=v) for k, v in arrays.items()],
                             attrs=res["attrs"])
            ctx.log(f"{label} N={N}: Delta={res['attrs']['Delta']} nnz(A)={res['attrs']['nnz_A']} "
                    f"KSP its={res['attrs']['ksp_iterations']} max|eta1|={np.max(np.abs(arrays['eta1'])):.3e}")


def _one_order(ctx: StageContext, ode, N: int, T: int, u: np.ndarray, F_norms: np.ndarray, u_bar: float) -> dict:
    from hpcqml.carleman import spectra, timestepping as ts
    from hpcqml.carleman.instance import carleman_dim
    from hpcqml.carleman.petsc_assembly import assemble_block_system, assemble_carleman, to_numpy_all

    cfg, comm = ctx.cfg, ctx.comm
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stable = ts.check_stability(ode, N)
    for w in caught:
        ctx.log(f"warning: {w.message}")
    A, stA = assemble_carleman(ode, N, comm)
    M, B, stM = assemble_block_system(ode, N, T, comm)
    x, its, reason, kt, pt, resid, sec = ts.solve_ksp(M, B, rtol=cfg["ksp_rtol"])
    X = to_numpy_all(x).reshape(T + 1, carleman_dim(ode.n, N))
    eigs, eig_method = spectra.eigenvalues(A, dense_limit=cfg["dense_limit"], nev=cfg["nev"], tol=cfg["svd_tol"])
    dis, div = spectra.dissipative_counts(eigs)
    IA = spectra.shifted_identity(A)
    norm_IA, svd_method = spectra.singular_value(IA, "largest", tol=cfg["svd_tol"], dense_limit=cfg["dense_limit"])
    norm_A, _ = spectra.singular_value(A, "largest", tol=cfg["svd_tol"], dense_limit=cfg["dense_limit"])
    smin_A = float("nan")  # ||A^{-1}||^{-1}: dense SVD only (Lanczos stalls on clustered small values)
    if stA.rows <= cfg["dense_limit"]:
        smin_A, _ = spectra.singular_value(A, "smallest", tol=cfg["svd_tol"], dense_limit=cfg["dense_limit"])
    attrs = {
        "N": N, "T": T, "Delta": stA.rows, "nnz_A": stA.nnz, "rows_M": stM.rows, "nnz_M": stM.nnz,
        "assembly_seconds_A": stA.seconds, "assembly_seconds_M": stM.seconds,
        "exact_preallocation": bool(stA.exact_preallocation and stM.exact_preallocation),
        "ksp_type": kt, "pc_type": pt, "ksp_iterations": its, "ksp_reason": reason,
        "ksp_residual_norm": resid, "solve_seconds": sec, "ranks": comm.Get_size(),
        "stability_number": ts.stability_number(ode, N), "stable": bool(stable),
        "eigen_method": eig_method, "dissipative_modes": dis, "divergent_modes": div,
        "norm_I_plus_A": norm_IA, "norm_A": norm_A, "sigma_min_A": smin_A, "svd_method": svd_method,
        "svd_tol": cfg["svd_tol"], "u_bar": u_bar, "eps": cfg["eps"],
        "bound_II57": ts.bound_II57(N, 1.0 / norm_A if norm_A > 0 else float("inf"), u_bar, F_norms),
        "bound_II57_inverse_norm": ts.bound_II57(N, 1.0 / smin_A if smin_A > 0 else float("inf"), u_bar, F_norms),
        "order_II60": ts.order_II60(cfg["eps"], norm_A, u_bar, F_norms) if norm_A > 0 else float("nan"),
    }
    if cfg["kappa"]:
        cr = spectra.condition_report(M, norm_IA, T, tol=cfg["svd_tol"], dense_limit=cfg["dense_limit"])
        attrs.update({"sigma_max_M": cr.sigma_max, "sigma_min_M": cr.sigma_min, "kappa_M": cr.kappa,
                      "kappa_bound_II83": cr.bound_II83, "kappa_bound_general": cr.bound_general,
                      "kappa_bound_II83_applies": bool(norm_IA < 1.0), "kappa_method": cr.method})
    eta1 = u - X[:, : ode.n]
    arrays = {
        "y": X if X.size <= 2_000_000 else X[:, : ode.n],
        "eta1": eta1, "eta1_norm": np.linalg.norm(eta1, axis=1),
        "eigenvalues": eigs, "mat_bytes_per_rank": np.asarray(stA.mat_bytes_per_rank, dtype=np.int64),
        "mat_bytes_per_rank_M": np.asarray(stM.mat_bytes_per_rank, dtype=np.int64),
        "peak_rss_bytes_per_rank": np.asarray(stM.peak_rss_bytes_per_rank, dtype=np.int64),
    }
    for obj in (A, M, B, x, IA):
        obj.destroy()
    return {"attrs": attrs, "arrays": arrays}


register(Stage(name="qcm", schema=SCHEMA, run=run,
               doc="quantum Carleman matrices: PETSc assembly, KSP time stepping, SLEPc spectra and kappa "
                   "(eq. II.3-II.6, II.57-II.60, II.78-II.83)"))
