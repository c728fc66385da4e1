"""``hhl`` stage: simulated HHL and truncated HHL on reduced Carleman instances (paper Sec. II C-D).

For every case (a random dissipative instance of the Sec. III C family and/or a reduced
instance of a pruned network) it builds the Carleman matrix A (eq. II.3-II.6) and the block
system M X = B (eq. II.79), takes the PETSc KSP solution as the reference, and then

* simulates HHL for every number of clock qubits (fidelity, success probability, leakage);
* simulates truncated HHL for every (clock qubits, kappa_a) pair and compares the measured
  overlap with eq. II.87 and the Haar estimate eq. II.89-II.91; eq. II.92/II.93 from the
  dissipative split of the spectrum of A;
* evaluates resource estimates (eq. I.1, I.2, II.77, II.94, tomography, state preparation);
* runs the sampling read-out of the final HHL state (eq. II.99).

The sweep points of a case are spread round-robin over the ranks and gathered on rank 0;
the numbers do not depend on the number of ranks. Layout: docs/schema/hhl.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.stages import Stage, StageContext, register

SCHEMA = {
    "cases": Field(list, ["random"], min_items=1, item=str, choices=("random", "network"),
                   doc="instances: random quadratic family (Sec. III C) and/or reduced pruned network"),
    "n": Field(int, 2, min=1, doc="random: state dimension"),
    "f": Field(float, 0.7, min=0.0, max=1.0, doc="random: fraction of dissipative Hessian modes"),
    "instance_seed": Field(int, 0, min=0, doc="random: instance seed (added to [run] seed)"),
    "eta": Field(float, 0.25, min=0.0, doc="step size F_l -> eta F_l (random); learning rate (network)"),
    "u_scale": Field(float, 0.1, min=0.0, doc="random: u_in ~ U(-u_scale, u_scale)"),
    "N": Field(int, 2, min=1, doc="Carleman truncation order"),
    "T": Field(int, 3, min=1, doc="time steps of the block system (eq. II.79)"),
    "clock_qubits": Field(list, [4, 6, 8], min_items=1, item=int, min=2, max=16, doc="clock register sizes c"),
    "kappa_a": Field(list, [0.0], min_items=1, item=float, min=0.0,
                     doc="truncation parameters kappa_a of eq. II.86; 0 = 2(T+1) (eq. II.83)"),
    "C": Field(float, 0.0, min=0.0, max=1.0, doc="rotation constant; 0 = largest safe value for each c"),
    "max_dim": Field(int, 4096, min=2, doc="refuse embedded (dilated, padded) systems larger than this"),
    "readout_delta": Field(float, 0.05, min=0.0, max=1.0, doc="read-out threshold delta on amplitudes"),
    "readout_trials": Field(int, 200, min=2, doc="independent read-out repetitions"),
    "eps": Field(float, 1e-2, min=1e-12, doc="target error in the resource expressions"),
    "network_model": Field(str, "resnet8-w1", doc="network: model built when no checkpoint exists"),
    "model_file": Field(str, "", doc="network: checkpoint; empty = workdir/pruned.pt, else a fresh pruned model"),
    "keep_fraction": Field(float, 0.1, min=0.0, max=1.0, doc="network: density when pruning a fresh model"),
    "k": Field(int, 2, min=1, doc="network: parameters kept in the reduced instance"),
    "batch_size": Field(int, 16, min=1, doc="network: samples in the fixed batch"),
    "table_density": Field(float, 0.1, min=0.0, max=1.0, doc="weight density r/n of the model resource table"),
    "table_N": Field(int, 2, min=1, doc="Carleman order assumed in the model resource table"),
    "table_T": Field(int, 100, min=1, doc="steps assumed in the model resource table"),
}


# ---------------------------------------------------------------------------------------
# instances
def _random_instance(cfg: dict, seed: int):
    from hpcqml.carleman import generators as gen

    ode = gen.random_quadratic(cfg["n"], cfg["f"], seed, u_scale=cfg["u_scale"])
    ode = gen.scale_step(ode, cfg["eta"])
    return ode, {"generator": "random_quadratic", "f": cfg["f"], "instance_seed": seed}


def _batch(ctx: StageContext, num_classes: int, size: int, seed: int):
    """A fixed batch: CIFAR-100 (or the synthetic set) under [data] root. With
    ``[data] source = "synthetic"`` and no set written yet, an in-memory synthetic batch;
    with ``source = "cifar100"`` a missing or broken data set is an error, never replaced."""
    import torch

    from hpcqml.data.batches import batch_indices, to_tensor
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.stages.data import data_root

    root = data_root(ctx)
    try:
        data = load_cifar100(root)
        idx = batch_indices(len(data.train_y), size, seed, 0)
        x, y, source = data.train_x[idx], data.train_y[idx], f"cifar100:{root}"
    except (UserError, OSError):
        if ctx.section("data")["source"] == "cifar100":
            raise
        from hpcqml.data.synth import make_synthetic

        parts = make_synthetic(max(size, num_classes), 1, num_classes, seed)
        raw = np.asarray(parts["train"][b"data"], dtype=np.uint8)[:size]
        x = np.ascontiguousarray(raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        y = np.asarray(parts["train"][b"fine_labels"], dtype=np.int64)[:size]
        source = "synthetic (in memory)"
    return to_tensor(x).double(), torch.as_tensor(y), source


def _network_instance(ctx: StageContext, seed: int):
    """Reduced instance (k parameters, Taylor-expanded GD map) of a pruned network."""
    import torch

    from hpcqml.carleman.generators import network_instance

    cfg = ctx.cfg
    path = Path(cfg["model_file"]) if cfg["model_file"] else ctx.workdir / "pruned.pt"
    if cfg["model_file"] and not path.exists():
        raise UserError(f"[hhl] model_file {path} not found")
    if path.exists():
        from hpcqml.training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        model, mask, num_classes = ckpt.model, ckpt.mask, ckpt.num_classes
        source = f"checkpoint {path}"
    else:
        from hpcqml.models import build
        from hpcqml.training.pruning import prune_

        torch.manual_seed(seed)
        num_classes = 100
        model = build(cfg["network_model"], num_classes=num_classes)
        mask = prune_(model, cfg["keep_fraction"])
        source = f"fresh {cfg['network_model']} (untrained), magnitude-pruned to {cfg['keep_fraction']:g}"
    model = model.double().eval()
    x, y, data_source = _batch(ctx, num_classes, cfg["batch_size"], seed)
    ode = network_instance(model, torch.nn.functional.cross_entropy, x, y, cfg["k"], cfg["eta"], mask=mask)
    return ode, {"generator": "network", "network_source": source, "data_source": data_source, "k": cfg["k"]}


def _instance(ctx: StageContext, case: str, seed: int):
    """(ode, attrs), built on rank 0 and broadcast so every rank has the same instance."""
    from hpcqml.parallel import bcast

    made = None
    if ctx.rank == 0:
        made = _random_instance(ctx.cfg, seed) if case == "random" else _network_instance(ctx, seed)
    return bcast(ctx.comm, made, perf=ctx.perf)


# ---------------------------------------------------------------------------------------
# per-case computation
def _reference(ctx: StageContext, ode, N: int, T: int, M, B):
    """PETSc KSP solution of M X = B (collective); scipy spsolve if PETSc is unavailable."""
    try:
        from hpcqml.carleman.timestepping import solve_block_system
    except ImportError:  # pragma: no cover - PETSc missing
        solve_block_system = None
    if solve_block_system is not None:
        res = solve_block_system(ode, N, T, ctx.comm)
        ctx.perf.count("ksp_iterations", res.iterations)
        x = res.X.reshape(-1)
        method = f"PETSc KSP {res.ksp_type}/{res.pc_type}, {res.iterations} iterations"
    else:  # pragma: no cover
        from scipy.sparse.linalg import spsolve

        x, method = spsolve(M.tocsc(), B), "scipy spsolve"
    resid = float(np.linalg.norm(M @ x - B) / np.linalg.norm(B))
    return np.asarray(x, dtype=np.float64), method, resid


def _units(cfg: dict, T: int) -> list[tuple[int, float | None]]:
    kappas = list(dict.fromkeys(2.0 * (T + 1) if k == 0.0 else k for k in cfg["kappa_a"]))
    clocks = list(dict.fromkeys(cfg["clock_qubits"]))
    units: list[tuple[int, float | None]] = [(c, None) for c in clocks]
    units += [(c, ka) for c in clocks for ka in kappas]
    return units


def _run_unit(system, x_emb, unit, C):
    from hpcqml.hhl.statevector import simulate_hhl
    from hpcqml.hhl.truncated import measured_overlap

    c, ka = unit
    r = simulate_hhl(system, c, C=C or None, kappa_a=ka)
    out = {"c": c, "kappa_a": ka, "fidelity": r.fidelity_with(x_emb),
           "density_fidelity": r.density_fidelity_with(x_emb), "p_success": r.p_success,
           "p_ancilla": r.p_ancilla, "leakage": r.leakage, "C": r.C, "t0": r.t0,
           "total_qubits": r.qubits["total"], "resolution": 2.0 * np.pi / (r.t0 * 2**c)}
    if ka is None:
        out["solution"] = system.solution_part(r.state).astype(np.complex128)
    else:
        out["overlap"] = measured_overlap(r, x_emb)
    return out


def _case(ctx: StageContext, case: str, seed: int) -> None:
    from hpcqml.carleman.instance import carleman_dim
    from hpcqml.carleman.reference import block_system, carleman_matrix, exact_recurrence
    from hpcqml.hhl import resources as res
    from hpcqml.hhl.readout import readout_trials
    from hpcqml.hhl.statevector import embed, memory_estimate_bytes
    from hpcqml.hhl.truncated import (closed_form_fidelity, dissipative_split, eigen_coefficients,
                                      fidelity_ii92, fidelity_ii93, haar_average_fidelity)

    cfg, comm = ctx.cfg, ctx.comm
    N, T = cfg["N"], cfg["T"]
    ode, inst_attrs = _instance(ctx, case, seed)
    delta = carleman_dim(ode.n, N)
    size = (T + 1) * delta
    padded = 1 << (2 * size - 1).bit_length()  # dilated (M is never symmetric for T >= 1)
    if padded > cfg["max_dim"]:
        raise UserError(f"[hhl] case {case}: embedded dimension {padded} (2 x (T+1) x Delta = 2 x {size}, padded) "
                        f"exceeds max_dim = {cfg['max_dim']}; lower n, N or T")
    A = carleman_matrix(ode, N)
    M, B = block_system(A, ode, N, T)
    x_ref, method, resid = _reference(ctx, ode, N, T, M, B)
    system = embed(M, B)
    x_emb = system.embed_solution(x_ref)

    units = _units(cfg, T)
    mine = [_run_unit(system, x_emb, u, cfg["C"]) for u in units[ctx.rank::ctx.size]]
    ctx.perf.count("hhl_simulations", len(mine))
    ctx.perf.count("statevector_amplitudes", sum(2**u["c"] * system.dim for u in mine))
    with ctx.perf.comm_timer():
        gathered = comm.gather(mine, root=0) if ctx.size > 1 else [mine]

    # Quantities every rank can compute identically (cheap next to the simulations).
    A_dense = A.toarray()
    qcm_eigs = np.linalg.eigvals(A_dense)
    d_plus, d_all, a_plus = dissipative_split(qcm_eigs)
    lam, beta = eigen_coefficients(system)
    kappas = sorted({u[1] for u in units if u[1] is not None})
    u_traj = exact_recurrence(ode, T)
    u_bar = float(np.max(np.linalg.norm(u_traj, axis=1)))
    F_norms = ode.norms()
    A_norm = float(np.linalg.norm(A_dense, 2))
    try:
        L = res.log_term(u_bar, list(F_norms), A_norm)
    except UserError:
        L = float("nan")
    s_F = max(res.sparsity(F) for F in ode.F[1:])
    s_M = res.sparsity(M)
    kappa = res.condition_number(M)
    m = max(res.qubits_for(ode.n), 1)
    eps = cfg["eps"]

    if ctx.rank != 0:
        ctx.store.commit(f"hhl/{case}")
        return
    results = sorted([u for part in gathered for u in part], key=lambda u: units.index((u["c"], u["kappa_a"])))
    plain = [u for u in results if u["kappa_a"] is None]
    trunc = [u for u in results if u["kappa_a"] is not None]
    best = max(plain, key=lambda u: u["c"])
    rng = np.random.default_rng([ctx.run_cfg["seed"], seed, 0x4848])
    try:
        ro = readout_trials(best["solution"], cfg["readout_delta"], cfg["readout_trials"], rng)
    except UserError as exc:
        raise UserError(f"[hhl] case {case}: read-out: {exc}") from None
    r_sparse = ro.r
    state_m = res.qubits_for(size)

    def write(g):
        gi = g.create_group("instance")
        gi.create_dataset("x_ref", data=x_ref)
        gi.create_dataset("rhs", data=B)
        gi.create_dataset("spectrum_H", data=system.spectrum)
        gi.create_dataset("qcm_eigenvalues", data=qcm_eigs.astype(np.complex128))
        gi.attrs.update({"n": ode.n, "q": ode.q, "N": N, "T": T, "Delta": delta, "system_size": size,
                         "embedded_dim": system.dim, "dilated": system.dilated, "scale": system.scale,
                         "reference": method, "reference_rel_residual": resid,
                         **{k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in inst_attrs.items()}})
        gh = g.create_group("hhl")
        for key, dt in (("c", np.int64), ("fidelity", np.float64), ("density_fidelity", np.float64),
                        ("p_success", np.float64), ("p_ancilla", np.float64), ("leakage", np.float64),
                        ("C", np.float64), ("t0", np.float64), ("total_qubits", np.int64)):
            gh.create_dataset("clock_qubits" if key == "c" else key, data=np.array([u[key] for u in plain], dtype=dt))
        gh.create_dataset("states", data=np.stack([u["solution"] for u in plain]))
        gt = g.create_group("truncated")
        gt.create_dataset("clock_qubits", data=np.array([u["c"] for u in trunc], dtype=np.int64))
        gt.create_dataset("kappa_a", data=np.array([u["kappa_a"] for u in trunc], dtype=np.float64))
        gt.create_dataset("overlap", data=np.array([u["overlap"] for u in trunc], dtype=np.float64))
        gt.create_dataset("overlap_ii87", data=np.array([closed_form_fidelity(lam, beta, u["kappa_a"])
                                                         for u in trunc], dtype=np.float64))
        gt.create_dataset("overlap_haar", data=np.array([haar_average_fidelity(system.spectrum, u["kappa_a"])
                                                         for u in trunc], dtype=np.float64))
        for key in ("fidelity", "p_success", "leakage", "resolution"):
            gt.create_dataset(key, data=np.array([u[key] for u in trunc], dtype=np.float64))
        occupied = np.abs(lam[np.abs(beta) > 1e-12])
        gt.create_dataset("threshold_margin", data=np.array(
            [float(np.min(np.abs(occupied - 1.0 / u["kappa_a"]))) for u in trunc], dtype=np.float64))
        gt.attrs.update({"Delta_plus": d_plus, "Delta": d_all, "a_plus": a_plus,
                         "fidelity_ii92": fidelity_ii92(d_plus, d_all, a_plus, T) if d_plus else 0.0,
                         "fidelity_ii93": fidelity_ii93(d_plus, d_all)})
        gr = g.create_group("resources")
        i1 = res.gate_complexity("I.1", s_F, max(ode.q, 1), T, m, eps, L)
        i2 = res.gate_complexity("I.2", s_F, max(ode.q, 1), T, m, eps, L)
        q77 = res.qlsa_complexity(s_M, kappa, 2 * size, eps)
        q94 = res.qlsa_complexity(s_M, max(kappas) if kappas else kappa, 2 * size, eps, truncated=True)
        gr.attrs.update({
            "system_qubits": system.system_qubits, "state_qubits": state_m, "model_qubits_m": m,
            "sparsity_M": s_M, "sparsity_F": s_F, "kappa": kappa, "kappa_bound_ii83": res.kappa_bound_dissipative(T),
            "norm_A": A_norm, "u_bar": u_bar, "log_term_L": L, "eps": eps,
            "prefactor_I1": i1["prefactor"], "prefactor_I2": i2["prefactor"],
            "prefactor_II77": q77["prefactor"], "prefactor_II94": q94["prefactor"],
            "log2_Nh_over_eps": q77["log2_Nh_over_eps"],
            "tomography_m2r3_over_eps2": res.tomography_cost(state_m, r_sparse, eps),
            "state_prep_r_log_n": res.sparse_state_prep_cost(max(int(np.count_nonzero(B)), 1), size),
            "constants": res.UNKNOWN,
            "memory_model_bytes": memory_estimate_bytes(system.dim, max(cfg["clock_qubits"]), truncated=True),
        })
        go = g.create_group("readout")
        go.create_dataset("shots", data=ro.shots)
        go.attrs.update({"delta": ro.delta, "r": ro.r, "mean": ro.mean, "std": ro.std, "sem": ro.sem,
                         "expected_ii99": ro.expected, "quadrature_error": ro.expected_err,
                         "r_log_r": ro.r_log_r, "uniform_r_H_r": ro.uniform, "magnitude_error": ro.magnitude_error,
                         "clock_qubits": best["c"], "trials": int(ro.shots.size)})

    ctx.store.commit(f"hhl/{case}", write, attrs={"case": case, "units": "probabilities and fidelities "
                                                  "dimensionless; shots are counts"})
    fid = ", ".join(f"c={u['c']}: {u['fidelity']:.6f}" for u in plain)
    ctx.log(f"{case}: dim {system.dim}, fidelity {fid}; read-out {ro.mean:.1f} shots (eq. II.99 {ro.expected:.1f})")


def _table(ctx: StageContext) -> None:
    from hpcqml.hhl import resources as res

    cfg = ctx.cfg
    rows = res.model_table(density=cfg["table_density"], N=cfg["table_N"], T=cfg["table_T"],
                           eps=cfg["eps"])

    def write(g):
        for key in rows[0]:
            vals = [r[key] for r in rows]
            if isinstance(vals[0], str):
                g.create_dataset(key, data=np.array(vals, dtype=object), dtype=__import__("h5py").string_dtype())
            elif isinstance(vals[0], int) and max(abs(v) for v in vals) < 2**62:
                g.create_dataset(key, data=np.array(vals, dtype=np.int64))
            else:
                g.create_dataset(key, data=np.array(vals, dtype=np.float64))
        g.attrs["note"] = ("gate-complexity constants and polynomial degrees are unknown (not given in the paper); "
                           "prefactors are per unit s (s^2 for I.2) when s is unknown")

    ctx.store.commit("hhl/model_table", write)


def run(ctx: StageContext) -> None:
    seed = ctx.run_cfg["seed"] + ctx.cfg["instance_seed"]
    for case in ctx.progress(list(dict.fromkeys(ctx.cfg["cases"])), desc="hhl"):
        if ctx.store.is_complete(f"hhl/{case}"):
            continue
        _case(ctx, case, seed)
    if not ctx.store.is_complete("hhl/model_table"):
        _table(ctx)
    ctx.log("done")


register(Stage(name="hhl", schema=SCHEMA, run=run,
               doc="simulated HHL / truncated HHL on reduced instances, resources, read-out (eq. II.77-II.99)"))
