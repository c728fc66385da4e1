"""``hhl`` stage: simulated HHL and truncated HHL on linear systems (paper Sec. II C-D).

A case is a linear system M x = B: the block system (eq. II.79) of the Carleman matrix A
(eq. II.3-II.6) of a random dissipative instance of the Sec. III C family (``random``) or of a
reduced instance of a pruned network (``network``), or any system read from a file
(``file``: HDF5, PETSc binary or MatrixMarket, see ``hpcqml.hhl.systems``). For each case the
stage takes the PETSc KSP solution (options prefix ``hhl_``) as the reference, and then

* simulates HHL for every number of clock qubits (fidelity, success probability, leakage,
  the estimate of ||x|| from the success probability), with the evolution time t0 from the
  config, the default mapping or the exact clock mapping;
* simulates truncated HHL for every (clock qubits, kappa_a) pair and compares the measured
  overlap with eq. II.87 and the Haar estimate eq. II.89-II.91; for Carleman cases eq.
  II.92/II.93 from the dissipative split of the spectrum of A;
* evaluates resource estimates (eq. II.77, II.94, tomography, state preparation; eq. I.1 and
  I.2 for Carleman cases);
* runs the sampling read-out of the final HHL state (eq. II.99).

The sweep points of a case are spread round-robin over the ranks and gathered on rank 0;
the numbers do not depend on the number of ranks. Layout: docs/schema/hhl.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import ConfigError, UserError
from hpcqml.hhl.statevector import CLOCK_MAPPINGS
from hpcqml.hhl.systems import FORMATS
from hpcqml.stages import Stage, StageContext, register

if TYPE_CHECKING:
    import scipy.sparse as sp

SCHEMA = {
    "cases": Field(list, ["random"], min_items=1, item=str, choices=("random", "network", "file"),
                   doc="systems: random quadratic family (Sec. III C), reduced pruned network, system_file"),
    "system_file": Field(str, "", doc="file: the linear system M x = b (HDF5, PETSc binary or MatrixMarket)"),
    "system_format": Field(str, "auto", choices=FORMATS, doc="file: format; auto = from the extension "
                                                             "(.h5/.hdf5, .petsc/.bin/.dat, .mtx)"),
    "system_rhs_file": Field(str, "", doc="file, MatrixMarket only: b as an n x 1 .mtx file"),
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
    "t0": Field(float, 0.0, min=0.0, max=float(np.pi),
                doc="evolution time of exp(i H t0), ||H|| = 1, below pi; 0 = from clock_mapping for each c"),
    "clock_mapping": Field(str, "default", choices=CLOCK_MAPPINGS,
                           doc="default: eigenvalues +-1 on clock values +-(2^c/2 - 1); exact: t0 = 2 pi m / 2^c "
                               "with the least m that puts every eigenvalue on a clock value (default if none)"),
    "max_dim": Field(int, 4096, min=2, doc="refuse embedded (dilated, padded) systems larger than this; "
                                           "also the row limit for system_file"),
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
    from hpcqml.carleman.cases import random_instance

    ode = random_instance("random", cfg["n"], cfg["f"], seed, eta=cfg["eta"], u_scale=cfg["u_scale"])
    return ode, {"generator": "random_quadratic", "f": cfg["f"], "instance_seed": seed}


def _batch(ctx: StageContext, num_classes: int, size: int, seed: int):
    """A fixed batch: CIFAR-100 (or the synthetic set) under [data] root. With
    ``[data] source = "synthetic"`` and no set written yet, an in-memory synthetic batch;
    with ``source = "cifar100"`` a missing or broken data set is an error, never replaced.
    """
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


def _fresh_pruned(cfg: dict, seed: int):
    """(model, mask, num_classes, source) of an untrained model magnitude-pruned to keep_fraction."""
    import torch

    from hpcqml.models import build
    from hpcqml.training.pruning import prune_

    torch.manual_seed(seed)
    model = build(cfg["network_model"], num_classes=100)
    mask = prune_(model, cfg["keep_fraction"])
    return model, mask, 100, f"fresh {cfg['network_model']} (untrained), magnitude-pruned to {cfg['keep_fraction']:g}"


def _network_instance(ctx: StageContext, seed: int, found):
    """Reduced instance (k parameters, Taylor-expanded GD map) of a pruned network: the
    checkpoint ``found`` (``(checkpoint, path)``), else a fresh pruned model.
    """
    from hpcqml.carleman.cases import network_case

    cfg = ctx.cfg
    if found is not None:
        ckpt, path = found
        model, mask, num_classes, source = ckpt.model, ckpt.mask, ckpt.num_classes, f"checkpoint {path}"
    else:
        model, mask, num_classes, source = _fresh_pruned(cfg, seed)
    x, y, data_source = _batch(ctx, num_classes, cfg["batch_size"], seed)
    ode = network_case(model, mask, x, y, cfg["k"], cfg["eta"])
    return ode, {"generator": "network", "network_source": source, "data_source": data_source, "k": cfg["k"]}


def _instance(ctx: StageContext, case: str, seed: int):
    """(ode, attrs), built on rank 0 and broadcast so every rank has the same instance."""
    from hpcqml.carleman.cases import network_checkpoint
    from hpcqml.parallel import bcast

    found = network_checkpoint(ctx, "hhl", required=False) if case == "network" else None  # collective check
    made = None
    if ctx.rank == 0:
        made = _random_instance(ctx.cfg, seed) if case == "random" else _network_instance(ctx, seed, found)
    return bcast(ctx.comm, made, perf=ctx.perf)


@dataclass
class _Problem:
    """One case's linear system M X = B and, for Carleman cases, what it was built from."""

    M: sp.csr_matrix
    B: np.ndarray
    attrs: dict[str, Any]
    ode: Any = None                      # PolynomialODE of a Carleman case, None for a file
    A: sp.csr_matrix | None = None       # its Carleman matrix (eq. II.3-II.6)
    sizes: dict[str, int] = field(default_factory=dict)


def _carleman_problem(ctx: StageContext, case: str, seed: int) -> _Problem:
    """The block system of eq. II.79 of a random or network instance (same on every rank)."""
    from hpcqml.carleman.instance import carleman_dim
    from hpcqml.carleman.reference import block_system, carleman_matrix

    import scipy.sparse as sp

    N, T = ctx.cfg["N"], ctx.cfg["T"]
    ode, attrs = _instance(ctx, case, seed)
    A = carleman_matrix(ode, N)
    M, B = block_system(A, ode, N, T)
    sizes = {"n": ode.n, "q": ode.q, "N": N, "T": T, "Delta": carleman_dim(ode.n, N)}
    return _Problem(M=sp.csr_matrix(M), B=np.asarray(B, dtype=np.float64), attrs=attrs, ode=ode, A=A, sizes=sizes)


def _file_problem(ctx: StageContext) -> _Problem:
    """The system in ``system_file``, read on rank 0 (a bad file fails on every rank)."""
    from hpcqml.hhl.systems import load_system
    from hpcqml.parallel import decide_on_root

    cfg = ctx.cfg
    loaded = decide_on_root(ctx.comm, lambda: load_system(cfg["system_file"], cfg["system_format"],
                                                          cfg["system_rhs_file"], max_rows=cfg["max_dim"]))
    attrs = {"generator": "file", "system_file": loaded.path, "system_format": loaded.fmt,
             "system_rhs_file": loaded.rhs_path}
    return _Problem(M=loaded.M, B=loaded.b, attrs=attrs)


def _problem(ctx: StageContext, case: str, seed: int) -> _Problem:
    return _file_problem(ctx) if case == "file" else _carleman_problem(ctx, case, seed)


def _check_config(cfg: dict) -> None:
    """Cross-key checks the schema cannot express."""
    if cfg["t0"] > 0 and cfg["clock_mapping"] == "exact":
        raise ConfigError('[hhl] set either t0 or clock_mapping = "exact", not both')
    if "file" in cfg["cases"] and not cfg["system_file"]:
        raise ConfigError('[hhl] cases has "file" but system_file is empty')
    if cfg["system_file"] and "file" not in cfg["cases"]:
        raise ConfigError('[hhl] system_file is set but cases has no "file"')




# ---------------------------------------------------------------------------------------
# per-case computation
def _check_size(cfg: dict, case: str, M: sp.csr_matrix) -> None:
    from hpcqml.hhl.statevector import embedded_dim

    dim = embedded_dim(M)
    if dim > cfg["max_dim"]:
        raise UserError(f"[hhl] case {case}: embedded dimension {dim} (M is {M.shape[0]} x {M.shape[1]}; "
                        f"dilated if not symmetric, padded to a power of two) exceeds max_dim = {cfg['max_dim']}; "
                        "lower n, N or T")


def _reference(ctx: StageContext, problem: _Problem):
    """PETSc KSP solution of M X = B with options prefix ``hhl_`` (collective)."""
    from hpcqml.hhl.reference import reference_solution

    ref = reference_solution(problem.M, problem.B, ctx.comm)
    ctx.perf.count("ksp_iterations", ref.iterations)
    return ref


def _units(cfg: dict, T: int | None) -> list[tuple[int, float | None]]:
    """Sweep points ``(c, None)`` (plain HHL) and ``(c, kappa_a)``; ``kappa_a = 0`` means 2(T+1)."""
    if T is None and 0.0 in cfg["kappa_a"]:
        raise ConfigError("[hhl] kappa_a = 0 stands for 2(T+1), which only Carleman cases define; "
                          "give explicit kappa_a values for a system_file")
    kappas = list(dict.fromkeys(2.0 * (T + 1) if k == 0.0 else k for k in cfg["kappa_a"]))
    clocks = list(dict.fromkeys(cfg["clock_qubits"]))
    units: list[tuple[int, float | None]] = [(c, None) for c in clocks]
    units += [(c, ka) for c in clocks for ka in kappas]
    return units


def _clock_time(cfg: dict, system, c: int) -> tuple[float, bool]:
    """``(t0, exact)`` of clock size ``c``: the configured t0, else the configured mapping."""
    from hpcqml.hhl.statevector import clock_t0, on_clock_grid

    if cfg["t0"] > 0:
        return cfg["t0"], on_clock_grid(system.eigenvalues, c, cfg["t0"])
    return clock_t0(system, c, cfg["clock_mapping"])


def _run_unit(cfg: dict, system, x_emb: np.ndarray, unit: tuple[int, float | None]) -> dict[str, Any]:
    """One simulated HHL (``kappa_a`` None) or truncated HHL run and its figures of merit."""
    from hpcqml.hhl.statevector import estimate_solution_norm, simulate_hhl
    from hpcqml.hhl.truncated import measured_overlap

    c, ka = unit
    t0, exact = _clock_time(cfg, system, c)
    r = simulate_hhl(system, c, C=cfg["C"] or None, t0=t0, kappa_a=ka)
    out = {"c": c, "kappa_a": ka, "fidelity": r.fidelity_with(x_emb), "clock_exact": exact,
           "density_fidelity": r.density_fidelity_with(x_emb), "p_success": r.p_success,
           "p_ancilla": r.p_ancilla, "leakage": r.leakage, "C": r.C, "t0": r.t0,
           "total_qubits": r.qubits["total"], "resolution": 2.0 * np.pi / (r.t0 * 2**c)}
    if ka is None:
        out["solution"] = system.solution_part(r.state).astype(np.complex128)
        out["x_norm_estimate"] = estimate_solution_norm(system, r)
    else:
        out["overlap"] = measured_overlap(r, x_emb)
    return out


def _sweep(ctx: StageContext, case: str, system, x_emb: np.ndarray,
           units: list[tuple[int, float | None]]) -> list[dict[str, Any]] | None:
    """Every sweep point, round-robin over the ranks; the sorted results on rank 0, None elsewhere."""
    mine = units[ctx.rank::ctx.size]
    done = [_run_unit(ctx.cfg, system, x_emb, u)
            for u in ctx.progress(mine, total=len(mine), desc=f"hhl {case} sweep")]
    ctx.perf.count("hhl_simulations", len(done))
    ctx.perf.count("statevector_amplitudes", sum(2**u["c"] * system.dim for u in done))
    with ctx.perf.comm_timer():
        gathered = ctx.comm.gather(done, root=0) if ctx.size > 1 else [done]
    if ctx.rank != 0:
        return None
    return sorted([u for part in gathered for u in part], key=lambda u: units.index((u["c"], u["kappa_a"])))


def _carleman_facts(problem: _Problem, eps: float) -> dict[str, Any]:
    """Quantities only a Carleman case has: spectrum of A, its dissipative split, eq. I.1/I.2 inputs."""
    from hpcqml.carleman.reference import exact_recurrence
    from hpcqml.hhl import resources as res
    from hpcqml.hhl.truncated import dissipative_split
    from hpcqml.modes import fidelity_ii92, fidelity_ii93

    ode, T = problem.ode, problem.sizes["T"]
    A_dense = problem.A.toarray()
    qcm_eigs = np.linalg.eigvals(A_dense).astype(np.complex128)
    d_plus, d_all, a_plus = dissipative_split(qcm_eigs)
    u_bar = float(np.max(np.linalg.norm(exact_recurrence(ode, T), axis=1)))
    A_norm = float(np.linalg.norm(A_dense, 2))
    try:
        L = res.log_term(u_bar, list(ode.norms()), A_norm)
    except UserError:
        L = float("nan")
    s_F = max(res.sparsity(F) for F in ode.F[1:])
    m = max(res.qubits_for(ode.n), 1)
    return {
        "qcm_eigenvalues": qcm_eigs,
        "split": {"Delta_plus": d_plus, "Delta": d_all, "a_plus": a_plus,
                  "fidelity_ii92": fidelity_ii92(d_plus, d_all, a_plus, T) if d_plus else 0.0,
                  "fidelity_ii93": fidelity_ii93(d_plus, d_all)},
        "resources": {"model_qubits_m": m, "sparsity_F": s_F, "kappa_bound_ii83": res.kappa_bound_dissipative(T),
                      "norm_A": A_norm, "u_bar": u_bar, "log_term_L": L,
                      "prefactor_I1": res.gate_complexity("I.1", s_F, max(ode.q, 1), T, m, eps, L)["prefactor"],
                      "prefactor_I2": res.gate_complexity("I.2", s_F, max(ode.q, 1), T, m, eps, L)["prefactor"]},
    }


def _readout(ctx: StageContext, case: str, best: dict[str, Any], seed: int):
    from hpcqml.hhl.readout import readout_trials

    rng = np.random.default_rng([ctx.run_cfg["seed"], seed, 0x4848])
    try:
        return readout_trials(best["solution"], ctx.cfg["readout_delta"], ctx.cfg["readout_trials"], rng)
    except UserError as exc:
        raise UserError(f"[hhl] case {case}: read-out: {exc}") from None


def _case(ctx: StageContext, case: str, seed: int) -> None:
    """Build, solve, simulate and store one case (``hhl/<case>``, one commit)."""
    from hpcqml.hhl.statevector import embed

    problem = _problem(ctx, case, seed)
    _check_size(ctx.cfg, case, problem.M)
    ref = _reference(ctx, problem)
    system = embed(problem.M, problem.B)
    x_emb = system.embed_solution(ref.x)
    units = _units(ctx.cfg, problem.sizes.get("T"))
    results = _sweep(ctx, case, system, x_emb, units)
    if results is None:
        ctx.store.commit(f"hhl/{case}")
        return
    plain = [u for u in results if u["kappa_a"] is None]
    trunc = [u for u in results if u["kappa_a"] is not None]
    best = max(plain, key=lambda u: u["c"])
    ro = _readout(ctx, case, best, seed)
    facts = _carleman_facts(problem, ctx.cfg["eps"]) if problem.ode is not None else None

    def write(g) -> None:
        _write_instance(g.create_group("instance"), problem, ref, system, facts)
        _write_hhl(g.create_group("hhl"), plain)
        _write_truncated(g.create_group("truncated"), trunc, system, facts)
        _write_resources(g.create_group("resources"), ctx.cfg, problem, system, trunc, ro, facts)
        _write_readout(g.create_group("readout"), ro, best["c"])

    ctx.store.commit(f"hhl/{case}", write, attrs={"case": case, "units": "probabilities and fidelities "
                                                  "dimensionless; shots are counts"})
    fid = ", ".join(f"c={u['c']}: {u['fidelity']:.6f}" for u in plain)
    ctx.log(f"{case}: dim {system.dim}, fidelity {fid}; read-out {ro.mean:.1f} shots (eq. II.99 {ro.expected:.1f})")


# ---------------------------------------------------------------------------------------
# writers (rank 0, inside the commit)
def _write_instance(g, problem: _Problem, ref, system, facts: dict[str, Any] | None) -> None:
    from hpcqml.store import write_dataset

    x_norm = float(np.linalg.norm(ref.x))
    write_dataset(g, "x_ref", ref.x, "1", "reference solution x of M x = B (PETSc KSP, prefix hhl_; "
                  "Carleman cases ordered t-major, eq. II.79)")
    write_dataset(g, "rhs", problem.B, "1", "right-hand side B (Carleman cases: (y_in, b, ..., b), eq. II.79)")
    write_dataset(g, "spectrum_H", system.spectrum, "1",
                  "eigenvalues of the Hermitian embedding of M (dilation if M is not symmetric) over ||M||_2, unpadded")
    if facts is not None:
        write_dataset(g, "qcm_eigenvalues", facts["qcm_eigenvalues"], "1",
                      "eigenvalues a_mu of the Carleman matrix A (eq. II.3-II.6)")
    size = problem.M.shape[0]
    g.attrs.update({**problem.sizes, "system_size": size, "embedded_dim": system.dim, "dilated": system.dilated,
                    "scale": system.scale, "reference": ref.method, "reference_rel_residual": ref.rel_residual,
                    "x_norm": x_norm,
                    **{k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in problem.attrs.items()}})


def _column(units: list[dict[str, Any]], key: str, dtype) -> np.ndarray:
    return np.array([u[key] for u in units], dtype=dtype)


#: plain-HHL columns: key -> (dataset name, dtype, units, description)
_HHL_COLUMNS = {
    "c": ("clock_qubits", np.int64, "count", "clock register size c"),
    "fidelity": ("fidelity", np.float64, "1", "|<x_ref|x>|^2 of the state post-selected on ancilla 1 and clock 0"),
    "density_fidelity": ("density_fidelity", np.float64, "1",
                         "<x_ref|rho|x_ref>, state post-selected on ancilla 1 only (clock traced out)"),
    "p_success": ("p_success", np.float64, "1", "probability of ancilla 1 and clock 0"),
    "p_ancilla": ("p_ancilla", np.float64, "1", "probability of ancilla 1"),
    "leakage": ("leakage", np.float64, "1", "1 - p_success/p_ancilla: ancilla-1 weight not uncomputed to clock 0"),
    "C": ("C", np.float64, "1", "rotation constant C of a_y = C/lambda~_y"),
    "t0": ("t0", np.float64, "1", "evolution time of exp(i H t0) with ||H|| = 1"),
    "resolution": ("resolution", np.float64, "1", "one clock bin 2 pi/(t0 2^c) in units of ||M||_2"),
    "clock_exact": ("clock_exact", np.bool_, "1", "every eigenvalue of H sits exactly on a clock value"),
    "total_qubits": ("total_qubits", np.int64, "count", "log2 D + c + 1"),
    "x_norm_estimate": ("x_norm_estimate", np.float64, "1",
                        "||x|| from the success probability, sqrt(p_success) ||B|| / (C ||M||_2) (eq. II.85)"),
}


def _write_hhl(g, plain: list[dict[str, Any]]) -> None:
    from hpcqml.store import write_dataset

    for key, (name, dtype, units, description) in _HHL_COLUMNS.items():
        write_dataset(g, name, _column(plain, key, dtype), units, description)
    write_dataset(g, "states", np.stack([u["solution"] for u in plain]), "1",
                  "x block of the post-selected state (normalised in the full embedded space), one row per c")


def _write_truncated(g, trunc: list[dict[str, Any]], system, facts: dict[str, Any] | None) -> None:
    from hpcqml.hhl.truncated import (
        closed_form_fidelity,
        eigen_coefficients,
        haar_average_fidelity,
    )
    from hpcqml.store import write_dataset

    lam, beta = eigen_coefficients(system)
    kappas = [u["kappa_a"] for u in trunc]
    write_dataset(g, "clock_qubits", _column(trunc, "c", np.int64), "count", "clock register size c")
    write_dataset(g, "kappa_a", np.array(kappas, dtype=np.float64), "1", "truncation parameter kappa_a (eq. II.86)")
    write_dataset(g, "overlap", _column(trunc, "overlap", np.float64), "1",
                  "measured |<x|<well|x~>| of the simulated state with the full solution")
    write_dataset(g, "overlap_ii87", np.array([closed_form_fidelity(lam, beta, k) for k in kappas], dtype=np.float64),
                  "1", "eq. II.87 from the exact eigen-decomposition")
    write_dataset(g, "overlap_haar", np.array([haar_average_fidelity(system.spectrum, k) for k in kappas],
                                              dtype=np.float64), "1", "annealed Haar estimate eq. II.89-II.91")
    write_dataset(g, "fidelity", _column(trunc, "fidelity", np.float64), "1", "overlap squared")
    write_dataset(g, "p_success", _column(trunc, "p_success", np.float64), "1",
                  "probability of ancilla 1 and clock 0, both flag branches")
    write_dataset(g, "leakage", _column(trunc, "leakage", np.float64), "1", "1 - p_success/p_ancilla")
    write_dataset(g, "resolution", _column(trunc, "resolution", np.float64), "1",
                  "one clock bin 2 pi/(t0 2^c) in units of ||M||_2")
    occupied = np.abs(lam[np.abs(beta) > 1e-12])
    write_dataset(g, "threshold_margin", np.array([float(np.min(np.abs(occupied - 1.0 / k))) for k in kappas],
                                                  dtype=np.float64), "1",
                  "min over occupied eigenvalues of | |lambda| - 1/kappa_a |")
    if facts is not None:
        g.attrs.update(facts["split"])


def _write_resources(g, cfg: dict, problem: _Problem, system, trunc: list[dict[str, Any]], ro,
                     facts: dict[str, Any] | None) -> None:
    from hpcqml.hhl import resources as res
    from hpcqml.hhl.statevector import memory_estimate_bytes

    size, eps = problem.M.shape[0], cfg["eps"]
    s_M, kappa = res.sparsity(problem.M), res.condition_number(problem.M)
    kappa_a = max((u["kappa_a"] for u in trunc), default=kappa)
    q77 = res.qlsa_complexity(s_M, kappa, 2 * size, eps)
    q94 = res.qlsa_complexity(s_M, kappa_a, 2 * size, eps, truncated=True)
    state_m = res.qubits_for(size)
    g.attrs.update({
        "system_qubits": system.system_qubits, "state_qubits": state_m, "sparsity_M": s_M, "kappa": kappa,
        "eps": eps, "prefactor_II77": q77["prefactor"], "prefactor_II94": q94["prefactor"],
        "log2_Nh_over_eps": q77["log2_Nh_over_eps"],
        "tomography_m2r3_over_eps2": res.tomography_cost(max(state_m, 1), ro.r, eps),
        "state_prep_r_log_n": res.sparse_state_prep_cost(max(int(np.count_nonzero(problem.B)), 1), size),
        "constants": res.UNKNOWN,
        "memory_model_bytes": memory_estimate_bytes(system.dim, max(cfg["clock_qubits"]), truncated=True),
        **(facts["resources"] if facts is not None else {}),
    })


def _write_readout(g, ro, clock_qubits: int) -> None:
    from hpcqml.store import write_dataset

    write_dataset(g, "shots", ro.shots, "count", "shots until every amplitude above delta was seen, per trial "
                  "(eq. II.99)")
    g.attrs.update({"delta": ro.delta, "r": ro.r, "mean": ro.mean, "std": ro.std, "sem": ro.sem,
                    "expected_ii99": ro.expected, "quadrature_error": ro.expected_err,
                    "r_log_r": ro.r_log_r, "uniform_r_H_r": ro.uniform, "magnitude_error": ro.magnitude_error,
                    "clock_qubits": clock_qubits, "trials": int(ro.shots.size)})


def _table(ctx: StageContext) -> None:
    from hpcqml.hhl import resources as res
    from hpcqml.store import write_dataset

    cfg = ctx.cfg
    rows = res.model_table(density=cfg["table_density"], N=cfg["table_N"], T=cfg["table_T"],
                           eps=cfg["eps"])

    def write(g) -> None:
        for key in rows[0]:
            vals = [r[key] for r in rows]
            if isinstance(vals[0], str):
                data, units = vals, "1"
            elif isinstance(vals[0], int) and max(abs(v) for v in vals) < 2**62:
                data, units = np.array(vals, dtype=np.int64), "count"
            else:
                data, units = np.array(vals, dtype=np.float64), "1"
            write_dataset(g, key, data, units, _TABLE_DESCRIPTIONS.get(key, key))
        g.attrs["note"] = ("gate-complexity constants and polynomial degrees are unknown (not given in the paper); "
                           "prefactors are per unit s (s^2 for I.2) when s is unknown")

    ctx.store.commit("hhl/model_table", write)


#: one-line descriptions of the model resource table columns (hpcqml.hhl.resources.model_table)
_TABLE_DESCRIPTIONS = {
    "model": "model name", "n": "trainable parameters", "density": "weight density r/n",
    "r": "non-zero weights r = density n", "m": "model qubits ceil(log2 n)", "N": "Carleman order (assumed)",
    "q": "polynomial degree (assumed)", "T": "steps (assumed)", "eps": "target error (assumed)",
    "Delta": "Carleman dimension n + ... + n^N (eq. II.13)", "system_size": "(T+1) Delta unknowns (eq. II.79)",
    "system_qubits": "qubits of the dilated block system", "kappa_a": "2(T+1) (eq. II.83)",
    "s": "sparsity of the F_l", "prefactor_I1": "q T (times s): prefactor of eq. I.1",
    "prefactor_I2": "q^2 T^2 (times s^2): prefactor of eq. I.2", "prefactor_times": "factor the prefactors omit",
    "tomography": "m^2 r^3 / eps^2 (Theorem I.1)", "state_prep": "r ceil(log2 n) (sparse state preparation)",
    "coupon_r_log_r": "r ln r read-out shots (Sec. II D)",
}


def run(ctx: StageContext) -> None:
    """Run the hhl stage for every configured case the store does not yet hold complete.

    Args:
        ctx: the stage context (config, communicator, store, progress).
    """
    _check_config(ctx.cfg)
    seed = ctx.run_cfg["seed"] + ctx.cfg["instance_seed"]
    cases = list(dict.fromkeys(ctx.cfg["cases"]))
    for case in ctx.progress(cases, total=len(cases), desc="hhl cases"):
        if ctx.store.is_complete(f"hhl/{case}"):
            continue
        _case(ctx, case, seed)
    if not ctx.store.is_complete("hhl/model_table"):
        _table(ctx)
    ctx.log("done")


register(Stage(name="hhl", schema=SCHEMA, run=run,
               doc="simulated HHL / truncated HHL on Carleman or file systems, resources, read-out (eq. II.77-II.99)"))
