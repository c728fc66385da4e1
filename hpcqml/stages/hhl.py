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

Two simulation methods (``[hhl] method``): ``statevector`` builds the clock register densely
(``hpcqml.hhl.statevector``; the sweep points of a case are spread round-robin over the
ranks and gathered on rank 0); ``krylov`` evaluates the same circuit as Chebyshev matrix
functions of the distributed operator (``hpcqml.hhl.krylov``; all ranks share each clock
size). ``auto`` picks by the embedded dimension. ``sizes_T`` repeats the Carleman cases at
other T (the system-size sweep). The numbers do not depend on the number of ranks.
Layout: docs/schema/hhl.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import ConfigError, UserError
from hpcqml.hhl.case import HHLCase, Part, TruncatedSweep
from hpcqml.hhl.statevector import CLOCK_MAPPINGS
from hpcqml.hhl.systems import FORMATS
from hpcqml.stages import Stage, StageContext, register
from hpcqml.stages._estimates import chain, check_hhl_network_model, hhl_reads

if TYPE_CHECKING:
    import scipy.sparse as sp

#: Simulation methods of the stage; ``auto`` picks by the embedded dimension.
METHODS = ("auto", "statevector", "krylov")

#: ``auto`` uses the dense state-vector simulation up to this embedded dimension (BENCHMARKS.md crossover).
AUTO_STATEVECTOR_DIM = 256

#: Largest system whose condition number is taken from a dense SVD (beyond: not evaluated).
DENSE_KAPPA_ROWS = 6000

#: Largest system whose final state is sampled by the read-out (eq. II.99) in the krylov method.
READOUT_MAX_ROWS = 1 << 16

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
    "max_dim": Field(int, 4096, min=2, affects_results=False,
                     doc="statevector method: refuse embedded (dilated, padded) systems larger "
                         "than this; also the row limit for system_file"),
    "method": Field(str, "auto", choices=METHODS,
                    doc="statevector: dense clock-register simulation (D <= max_dim); krylov: Chebyshev matrix "
                        "functions of the sparse distributed operator; auto: statevector up to "
                        f"D = {AUTO_STATEVECTOR_DIM}"),
    "sizes_T": Field(list, [], item=int, min=1,
                     doc="random/network: run each case also at these T (groups <case>_T<T>): the system-size sweep"),
    "krylov_tol": Field(float, 1e-13, min=1e-15, max=1e-3,
                        doc="krylov: sup-norm error bound of every Chebyshev series (docs/science.md)"),
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
def _random_instance(cfg: dict, seed: int) -> tuple[Any, dict[str, Any]]:
    from hpcqml.carleman.cases import random_instance

    ode = random_instance("random", cfg["n"], cfg["f"], seed, eta=cfg["eta"], u_scale=cfg["u_scale"])
    return ode, {"generator": "random_quadratic", "f": cfg["f"], "instance_seed": seed}


def _batch(ctx: StageContext, num_classes: int, size: int, seed: int) -> tuple[Any, Any, str]:
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


def _fresh_pruned(cfg: dict, seed: int) -> tuple[Any, Any, int, str]:
    """(model, mask, num_classes, source) of an untrained model magnitude-pruned to keep_fraction."""
    import torch

    from hpcqml.models import build
    from hpcqml.training.pruning import prune_

    torch.manual_seed(seed)
    model = build(cfg["network_model"], num_classes=100)
    mask = prune_(model, cfg["keep_fraction"])
    return model, mask, 100, f"fresh {cfg['network_model']} (untrained), magnitude-pruned to {cfg['keep_fraction']:g}"


def _network_instance(ctx: StageContext, seed: int, found: Any) -> tuple[Any, dict[str, Any]]:
    """Reduced instance (k parameters, Taylor-expanded GD map) of a pruned network: the
    checkpoint ``found`` (``(checkpoint, path)``), else a fresh pruned model.
    """
    from hpcqml.stages._network import network_case

    cfg = ctx.cfg
    if found is not None:
        ckpt, path = found
        model, mask, num_classes, source = ckpt.model, ckpt.mask, ckpt.num_classes, f"checkpoint {path}"
    else:
        model, mask, num_classes, source = _fresh_pruned(cfg, seed)
    x, y, data_source = _batch(ctx, num_classes, cfg["batch_size"], seed)
    ode = network_case(model, mask, x, y, cfg["k"], cfg["eta"])
    return ode, {"generator": "network", "network_source": source, "data_source": data_source, "k": cfg["k"]}


def _instance(ctx: StageContext, case: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """(ode, attrs), built on rank 0 and broadcast so every rank has the same instance."""
    from hpcqml.stages._network import network_checkpoint
    from hpcqml.parallel import bcast

    found = network_checkpoint(ctx, "hhl", required=False) if case == "network" else None  # collective check
    made = None
    if ctx.rank == 0:
        made = _random_instance(ctx.cfg, seed) if case == "random" else _network_instance(ctx, seed, found)
    made = bcast(ctx.comm, made, perf=ctx.perf)
    assert made is not None   # rank 0 built it
    return made


@dataclass
class _Problem:
    """One case's linear system M X = B and, for Carleman cases, what it was built from."""

    M: sp.csr_matrix
    B: np.ndarray
    attrs: dict[str, Any]
    ode: Any = None                      # PolynomialODE of a Carleman case, None for a file
    A: sp.csr_matrix | None = None       # its Carleman matrix (eq. II.3-II.6)
    sizes: dict[str, int] = field(default_factory=dict)


def _carleman_problem(ctx: StageContext, case: str, seed: int, T: int) -> _Problem:
    """The block system of eq. II.79 with ``T`` steps of a random or network instance (same on every rank)."""
    from hpcqml.carleman.instance import carleman_dim
    from hpcqml.carleman.reference import block_system, carleman_matrix

    import scipy.sparse as sp

    N = ctx.cfg["N"]
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


def _problem(ctx: StageContext, case: str, seed: int, T: int) -> _Problem:
    return _file_problem(ctx) if case == "file" else _carleman_problem(ctx, case, seed, T)


def _case_list(cfg: dict) -> list[tuple[str, str, int]]:
    """``(group name, case, T)`` of every case: each configured case at ``T``, Carleman cases also at ``sizes_T``."""
    out = [(case, case, cfg["T"]) for case in dict.fromkeys(cfg["cases"])]
    out += [(f"{case}_T{T}", case, T) for case in dict.fromkeys(cfg["cases"]) if case != "file"
            for T in dict.fromkeys(cfg["sizes_T"]) if T != cfg["T"]]
    return out


def _method(cfg: dict, case: str, M: sp.csr_matrix) -> str:
    """The simulation method of a case: the configured one, or by size for ``auto``."""
    from hpcqml.hhl.statevector import embedded_dim

    dim = embedded_dim(M)
    method = cfg["method"]
    if method == "auto":
        method = "statevector" if dim <= min(AUTO_STATEVECTOR_DIM, cfg["max_dim"]) else "krylov"
    if method == "statevector":
        _check_size(cfg, case, M)
    elif cfg["clock_mapping"] == "exact":
        raise ConfigError(f'[hhl] case {case}: clock_mapping = "exact" needs every eigenvalue of H, which the '
                          f'krylov method (embedded D = {dim}) does not compute; use the default mapping or t0')
    return method


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
                        'lower n, N or T, or use method = "krylov"')


def _reference(ctx: StageContext, problem: _Problem) -> Any:
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
    paper = 2.0 * (T + 1) if T is not None else 0.0   # kappa_a = 0 with T None was refused above
    kappas = list(dict.fromkeys(paper if k == 0.0 else k for k in cfg["kappa_a"]))
    clocks = list(dict.fromkeys(cfg["clock_qubits"]))
    units: list[tuple[int, float | None]] = [(c, None) for c in clocks]
    units += [(c, ka) for c in clocks for ka in kappas]
    return units


def _clock_time(cfg: dict, system: Any, c: int) -> tuple[float, bool]:
    """``(t0, exact)`` of clock size ``c``: the configured t0, else the configured mapping."""
    from hpcqml.hhl.statevector import clock_t0, on_clock_grid

    if cfg["t0"] > 0:
        return cfg["t0"], on_clock_grid(system.eigenvalues, c, cfg["t0"])
    return clock_t0(system, c, cfg["clock_mapping"])


def _run_unit(cfg: dict, system: Any, x_emb: np.ndarray, unit: tuple[int, float | None]) -> dict[str, Any]:
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


def _sweep(ctx: StageContext, case: str, system: Any, x_emb: np.ndarray,
           units: list[tuple[int, float | None]]) -> list[dict[str, Any]] | None:
    """Every sweep point, round-robin over the ranks; the sorted results on rank 0, None elsewhere."""
    mine = units[ctx.rank::ctx.size]
    done = [_run_unit(ctx.cfg, system, x_emb, u)
            for u in ctx.progress(mine, total=len(mine), desc=f"hhl {case} sweep")]
    ctx.perf.count("hhl_simulations", len(done))
    ctx.perf.count("statevector_amplitudes", sum(2**u["c"] * system.dim for u in done))
    with ctx.perf.comm_timer():
        gathered = ctx.comm.gather(done, root=0) if ctx.size > 1 else [done]
    if ctx.rank != 0 or gathered is None:
        return None
    return sorted([u for part in gathered for u in part], key=lambda u: units.index((u["c"], u["kappa_a"])))


def _carleman_facts(problem: _Problem, eps: float) -> dict[str, Any]:
    """Quantities only a Carleman case has: spectrum of A, its dissipative split, eq. I.1/I.2 inputs."""
    from hpcqml.carleman.reference import exact_recurrence
    from hpcqml.hhl import resources as res
    from hpcqml.hhl.truncated import dissipative_split
    from hpcqml.modes import overlap_ii92, overlap_ii93

    ode, T = problem.ode, problem.sizes["T"]
    assert problem.A is not None   # a Carleman case
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
        "split": _split_attrs(d_plus, d_all, a_plus, overlap_ii92(d_plus, d_all, a_plus, T) if d_plus else 0.0,
                              float(overlap_ii93(d_plus, d_all))),
        "resources": {"model_qubits_m": m, "sparsity_F": s_F, "kappa_bound_ii83": res.kappa_bound_dissipative(T),
                      "norm_A": A_norm, "u_bar": u_bar, "log_term_L": L,
                      "prefactor_I1": res.gate_complexity("I.1", s_F, max(ode.q, 1), T, m, eps, L)["prefactor"],
                      "prefactor_I2": res.gate_complexity("I.2", s_F, max(ode.q, 1), T, m, eps, L)["prefactor"]},
    }


def _split_attrs(d_plus: int, d_all: int, a_plus: float, overlap_ii92: float, overlap_ii93: float) -> dict[str, Any]:
    """Eq. II.92/II.93 as stored: the unsquared overlaps <x|x~> and the fidelities (their squares)."""
    return {"Delta_plus": d_plus, "Delta": d_all, "a_plus": a_plus,
            "overlap_ii92": overlap_ii92, "overlap_ii93": overlap_ii93,
            "fidelity_ii92": overlap_ii92**2, "fidelity_ii93": overlap_ii93**2}


def _readout(ctx: StageContext, case: str, best: dict[str, Any], seed: int) -> Any:
    from hpcqml.hhl.readout import readout_trials

    rng = np.random.default_rng([ctx.run_cfg["seed"], seed, 0x4848])
    try:
        return readout_trials(best["solution"], ctx.cfg["readout_delta"], ctx.cfg["readout_trials"], rng)
    except UserError as exc:
        raise UserError(f"[hhl] case {case}: read-out: {exc}") from None


def _case(ctx: StageContext, name: str, case: str, seed: int, T: int) -> None:
    """Build, solve, simulate and store one case (``hhl/<name>``, one commit)."""
    problem = _problem(ctx, case, seed, T)
    method = _method(ctx.cfg, name, problem.M)
    ref = _reference(ctx, problem)
    if method == "krylov":
        _case_krylov(ctx, name, problem, ref, seed)
        return
    from hpcqml.hhl.statevector import embed, memory_estimate_bytes

    system = embed(problem.M, problem.B)
    x_emb = system.embed_solution(ref.x)
    units = _units(ctx.cfg, problem.sizes.get("T"))
    results = _sweep(ctx, name, system, x_emb, units)
    if results is None:
        ctx.store.commit(f"hhl/{name}")
        return
    plain = [u for u in results if u["kappa_a"] is None]
    trunc = [u for u in results if u["kappa_a"] is not None]
    best = max(plain, key=lambda u: u["c"])
    ro = _readout(ctx, name, best, seed)
    facts = _carleman_facts(problem, ctx.cfg["eps"]) if problem.ode is not None else None
    embedding = {"embedded_dim": system.dim, "dilated": system.dilated, "scale": system.scale,
                 "scale_method": "numpy eigvalsh (dense, exact)", "method": "statevector"}

    case_result = HHLCase(
        attrs={"case": name, "method": "statevector",
               "units": "probabilities and fidelities dimensionless; shots are counts"},
        instance=_instance_part(problem, ref, embedding, system.spectrum, facts),
        hhl=_hhl_part(plain),
        truncated=_truncated_part(trunc, system, facts, problem.sizes.get("T")),
        resources=_resources_part(ctx.cfg, problem, system.system_qubits, trunc, ro, facts,
                                  memory_estimate_bytes(system.dim, max(ctx.cfg["clock_qubits"]), truncated=True)),
        readout=_readout_part(ro, best["c"]))
    ctx.store.commit(f"hhl/{name}", case_result.to_group)
    fid = ", ".join(f"c={u['c']}: {u['fidelity']:.6f}" for u in plain)
    ctx.log(f"{name}: dim {system.dim}, fidelity {fid}; read-out {ro.mean:.1f} shots (eq. II.99 {ro.expected:.1f})")


def _krylov_sweep(ctx: StageContext, name: str, op: Any, x: np.ndarray, units: list[tuple[int, float | None]]
                  ) -> list[dict[str, Any]]:
    """Every sweep point by Chebyshev matrix functions: one collective recurrence per clock size."""
    from hpcqml.hhl.krylov import simulate_hhl_krylov

    cfg = ctx.cfg
    clocks = list(dict.fromkeys(c for c, _ in units))
    done: list[dict[str, Any]] = []
    for c in ctx.progress(clocks, total=len(clocks), desc=f"hhl {name} krylov"):
        kappas = [ka for cc, ka in units if cc == c]
        t0 = cfg["t0"] if cfg["t0"] > 0 else None
        runs = simulate_hhl_krylov(op, c, kappas, x_ref=x, C=cfg["C"] or None, t0=t0, tol=cfg["krylov_tol"])
        ctx.perf.count("krylov_matvecs", runs[0].matvecs)
        for r in runs:
            out = {"c": c, "kappa_a": r.kappa_a, "fidelity": r.fidelity, "density_fidelity": r.density_fidelity,
                   "p_success": r.p_success, "p_ancilla": r.p_ancilla, "leakage": r.leakage, "C": r.C,
                   "t0": r.t0, "total_qubits": r.qubits["total"], "resolution": 2.0 * np.pi / (r.t0 * 2**c),
                   "overlap": r.overlap, "chebyshev_degree": r.degree, "chebyshev_error_bound": r.error_bound}
            if r.kappa_a is None:
                out["solution"] = op.solution_part(op.gather(r.state_local[0]))
                out["x_norm_estimate"] = r.x_norm_estimate
            done.append(out)
    return done


def _case_krylov(ctx: StageContext, name: str, problem: _Problem, ref: Any, seed: int) -> None:
    """One case by the matrix-function method (collective); rank 0 writes ``hhl/<name>``."""
    from hpcqml.hhl.krylov import EmbeddedOperator, memory_estimate_bytes

    units = _units(ctx.cfg, problem.sizes.get("T"))
    with EmbeddedOperator(problem.M, problem.B, ctx.comm) as op:
        results = _krylov_sweep(ctx, name, op, ref.x, units)
        embedding = {"embedded_dim": op.dim, "dilated": op.dilated, "scale": op.scale,
                     "scale_method": op.norm_method, "method": "krylov"}
        system_qubits = int(op.dim).bit_length() - 1
        nbytes = memory_estimate_bytes(op.size, 2 * problem.M.nnz if op.dilated else problem.M.nnz,
                                       max(ctx.cfg["clock_qubits"]), variants=len(ctx.cfg["kappa_a"]) + 1,
                                       ranks=ctx.size)
    if ctx.rank != 0:
        ctx.store.commit(f"hhl/{name}")
        return
    plain = [u for u in results if u["kappa_a"] is None]
    trunc = [u for u in results if u["kappa_a"] is not None]
    best = max(plain, key=lambda u: u["c"])
    ro = _readout(ctx, name, best, seed) if problem.M.shape[0] <= READOUT_MAX_ROWS else None
    facts = _carleman_facts(problem, ctx.cfg["eps"]) if problem.ode is not None else None

    attrs = {"case": name, "method": "krylov", "units": "probabilities and fidelities dimensionless; shots are counts"}
    if ro is None:
        attrs["readout"] = f"not evaluated: {problem.M.shape[0]} unknowns, above {READOUT_MAX_ROWS}"
    case_result = HHLCase(
        attrs=attrs, instance=_instance_part(problem, ref, embedding, None, facts), hhl=_hhl_part(plain),
        truncated=_truncated_part(trunc, None, facts, problem.sizes.get("T")),
        resources=_resources_part(ctx.cfg, problem, system_qubits, trunc, ro, facts, nbytes),
        readout=_readout_part(ro, best["c"]) if ro is not None else None)
    ctx.store.commit(f"hhl/{name}", case_result.to_group)
    fid = ", ".join(f"c={u['c']}: {u['fidelity']:.6f}" for u in plain)
    ctx.log(f"{name}: {problem.M.shape[0]} unknowns, dim {embedding['embedded_dim']} (krylov), fidelity {fid}")


# ---------------------------------------------------------------------------------------
# the parts of a case (rank 0; written by HHLCase.to_group inside the commit)
def _instance_part(problem: _Problem, ref: Any, embedding: dict[str, Any], spectrum: np.ndarray | None,
                   facts: dict[str, Any] | None) -> Part:
    """``instance/``: the reference solution, B, the spectra and the sizes and provenance of the system."""
    g = Part()
    x_norm = float(np.linalg.norm(ref.x))
    g.add("x_ref", ref.x, "1", "reference solution x of M x = B (PETSc KSP, prefix hhl_; "
          "Carleman cases ordered t-major, eq. II.79)")
    g.add("rhs", problem.B, "1", "right-hand side B (Carleman cases: (y_in, b, ..., b), eq. II.79)")
    if spectrum is not None:  # the krylov method never computes it
        g.add("spectrum_H", spectrum, "1", "eigenvalues of the Hermitian embedding of M (dilation if "
              "M is not symmetric) over ||M||_2, unpadded")
    if facts is not None:
        g.add("qcm_eigenvalues", facts["qcm_eigenvalues"], "1",
              "eigenvalues a_mu of the Carleman matrix A (eq. II.3-II.6)")
    size = problem.M.shape[0]
    g.attrs.update({**problem.sizes, "system_size": size, **embedding, "reference": ref.method,
                    "reference_rel_residual": ref.rel_residual,
                    "x_norm": x_norm,
                    **{k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in problem.attrs.items()}})
    return g


def _column(units: list[dict[str, Any]], key: str, dtype: Any) -> np.ndarray:
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
    "chebyshev_degree": ("chebyshev_degree", np.int64, "count",
                         "krylov method: degree K of the Chebyshev series (products with H per clock size)"),
    "chebyshev_error_bound": ("chebyshev_error_bound", np.float64, "1",
                              "krylov method: sup-norm bound on the error of every Chebyshev series on [-1, 1]"),
}


def _hhl_part(plain: list[dict[str, Any]]) -> Part:
    """``hhl/``: plain HHL, one entry per clock size."""
    g = Part()
    for key, (name, dtype, units, description) in _HHL_COLUMNS.items():
        if key in plain[0]:  # clock_exact: statevector only; chebyshev_*: krylov only
            g.add(name, _column(plain, key, dtype), units, description)
    g.add("states", np.stack([u["solution"] for u in plain]), "1",
          "x block of the post-selected state (normalised in the full embedded space), one row per c; "
          "complex128 (statevector) or float64 (krylov: the output g(H) b is real)")
    return g


def _truncated_part(trunc: list[dict[str, Any]], system: Any, facts: dict[str, Any] | None,
                    T: int | None) -> TruncatedSweep:
    """Truncated-HHL columns (:class:`hpcqml.hhl.case.TruncatedSweep`); eq. II.87, the Haar estimate and
    the threshold margin need the eigen-decomposition, so they are there only when ``system`` (the dense
    embedding) is given; eq. II.92 only for Carleman cases (``facts``).
    """
    return TruncatedSweep.build(trunc, system, facts["split"] if facts is not None else None,
                                T if facts is not None else None)


def _resources_part(cfg: dict, problem: _Problem, system_qubits: int, trunc: list[dict[str, Any]], ro: Any,
                    facts: dict[str, Any] | None, memory_bytes: int) -> Part:
    """``resources/``: resource estimates (eq. II.77, II.94, tomography, state preparation, eq. I.1/I.2)."""
    from hpcqml.hhl import resources as res

    g = Part()
    size, eps = problem.M.shape[0], cfg["eps"]
    s_M = res.sparsity(problem.M)
    dense_ok = size <= DENSE_KAPPA_ROWS
    kappa = res.condition_number(problem.M) if dense_ok else float("nan")
    kappa_a = max((u["kappa_a"] for u in trunc), default=kappa)
    q94 = res.qlsa_complexity(s_M, kappa_a, 2 * size, eps, truncated=True)
    q77 = res.qlsa_complexity(s_M, kappa, 2 * size, eps) if dense_ok else {
        "prefactor": float("nan"), "log2_Nh_over_eps": q94["log2_Nh_over_eps"]}
    state_m = res.qubits_for(size)
    g.attrs.update({
        "system_qubits": system_qubits, "state_qubits": state_m, "sparsity_M": s_M, "kappa": kappa,
        "kappa_method": "dense SVD" if dense_ok else f"not evaluated: {size} rows, above the dense SVD limit",
        "eps": eps, "prefactor_II77": q77["prefactor"], "prefactor_II94": q94["prefactor"],
        "log2_Nh_over_eps": q77["log2_Nh_over_eps"],
        "tomography_m2r3_over_eps2": res.tomography_cost(max(state_m, 1), ro.r, eps) if ro is not None else np.nan,
        "state_prep_r_log_n": res.sparse_state_prep_cost(max(int(np.count_nonzero(problem.B)), 1), size),
        "constants": res.UNKNOWN,
        "memory_model_bytes": memory_bytes,
        **(facts["resources"] if facts is not None else {}),
    })
    return g


def _readout_part(ro: Any, clock_qubits: int) -> Part:
    """``readout/``: the sampling read-out of the final HHL state (eq. II.99)."""
    g = Part()
    g.add("shots", ro.shots, "count", "shots until every amplitude above delta was seen, per trial "
          "(eq. II.99)")
    g.attrs.update({"delta": ro.delta, "r": ro.r, "mean": ro.mean, "std": ro.std, "sem": ro.sem,
                    "expected_ii99": ro.expected, "quadrature_error": ro.expected_err,
                    "r_log_r": ro.r_log_r, "uniform_r_H_r": ro.uniform, "magnitude_error": ro.magnitude_error,
                    "clock_qubits": clock_qubits, "trials": int(ro.shots.size)})
    return g


def _table(ctx: StageContext) -> None:
    from hpcqml.hhl import resources as res
    from hpcqml.store import write_dataset

    cfg = ctx.cfg
    rows = res.model_table(density=cfg["table_density"], N=cfg["table_N"], T=cfg["table_T"],
                           eps=cfg["eps"])

    def write(g: Any) -> None:
        for key in rows[0]:
            vals = [r[key] for r in rows]
            data: Any
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
    cases = _case_list(ctx.cfg)
    for name, case, T in ctx.progress(cases, total=len(cases), desc="hhl cases"):
        if ctx.store.is_complete(f"hhl/{name}"):
            continue
        _case(ctx, name, case, seed, T)
    if not ctx.store.is_complete("hhl/model_table"):
        _table(ctx)
    ctx.log("done")


def check_before_run(ctx: StageContext) -> None:
    """Pre-run check: the cross-key rules, and the system file read and size-checked, so
    that a hostile or oversized file is refused before the results file is touched.
    """
    _check_config(ctx.cfg)
    if "file" in ctx.cfg["cases"] and not ctx.store.is_complete("hhl/file"):
        _check_size(ctx.cfg, "file", _file_problem(ctx).M)


#: Time model of the state-vector method: dense eigen-decomposition seconds per D^3 and
#: clock-register seconds per amplitude and variant (2-core VM, BENCHMARKS.md "HHL at scale").
SV_SECONDS_PER_D3 = 1.5e-8
SV_SECONDS_PER_AMPLITUDE = 1.0e-7

#: Time model of the krylov method: seconds per stored non-zero of H and product with H
#: (Chebyshev and Lanczos steps, accumulators included), per rank.
KR_SECONDS_PER_NNZ_STEP = 3.0e-8


def _method_estimates(h: dict, rows: int, nnz: int, ranks: int) -> dict[str, tuple[int, float]]:
    """``{method: (peak bytes per rank, seconds)}`` of both simulators for one case (models)."""
    from hpcqml.hhl import krylov
    from hpcqml.hhl.statevector import memory_estimate_bytes, padded_dim

    clocks = list(dict.fromkeys(h["clock_qubits"]))
    variants = 1 + len(h["kappa_a"])
    dim = padded_dim(2 * rows)
    sv_bytes = memory_estimate_bytes(dim, max(clocks), truncated=True)
    sv_time = SV_SECONDS_PER_D3 * dim**3 + SV_SECONDS_PER_AMPLITUDE * variants * sum(2**c * dim for c in clocks)
    steps = sum(krylov.matvec_count(c) for c in clocks) + 300  # Chebyshev per clock size + Lanczos norm
    kr_bytes = krylov.memory_estimate_bytes(2 * rows, 2 * nnz, max(clocks), variants=variants, ranks=ranks)
    kr_time = KR_SECONDS_PER_NNZ_STEP * steps * (2 * nnz + 2 * rows * variants) / max(ranks, 1)
    return {"statevector": (sv_bytes, sv_time), "krylov": (kr_bytes, kr_time)}


def estimate_memory(cfg: Any, ranks: int, memory_per_rank: float, found: Any) -> None:
    """``validate``/``run`` estimate of both simulation methods for each Carleman case.

    The block system of eq. II.79 has S = (T + 1) Delta rows (Delta of eq. II.13) and at most
    Delta + 1 non-zeros per row; it is dilated and padded to a power of two D. The state-vector
    method (``hpcqml.hhl.statevector.memory_estimate_bytes``, one rank per sweep point) and the
    krylov method (``hpcqml.hhl.krylov.memory_estimate_bytes``, per rank) are both estimated,
    memory and time (models calibrated in BENCHMARKS.md), and the one the stage will use is named.
    """
    from hpcqml.carleman.instance import carleman_dim
    from hpcqml.hhl.statevector import padded_dim
    from hpcqml.preflight import MEMORY_WARN_FRACTION

    h = cfg.sections["hhl"]
    for name, case, T in _case_list(h):
        if case == "file":
            found.estimates.append("hhl: case file: size known once system_file is read (at most max_dim rows)")
            continue
        delta = carleman_dim(h["n"] if case == "random" else h["k"], h["N"])
        rows = (T + 1) * delta
        dim = padded_dim(2 * rows)  # dilated: M is not symmetric in general
        est = _method_estimates(h, rows, rows * (delta + 1), ranks)
        method = h["method"]
        if method == "auto":
            method = "statevector" if dim <= min(AUTO_STATEVECTOR_DIM, h["max_dim"]) else "krylov"
        parts = [f"{m} {b / 2**30:.3g} GiB, ~{t:.3g} s" for m, (b, t) in est.items()]
        found.estimates.append(f"hhl: case {name}: {rows:,} rows, embedded D = {dim:,}; {'; '.join(parts)} "
                               f"(c up to {max(h['clock_qubits'])}); method used: {method}")
        if method == "statevector" and dim > h["max_dim"]:  # the stage refuses exactly this
            where = found.errors if case == "random" else found.warnings
            where.append(f"[hhl] case {name}: embedded dimension {dim} ({rows} rows, dilated, padded to a "
                         f"power of two) exceeds max_dim = {h['max_dim']}; lower n, N or T, or use method = \"krylov\"")
        elif memory_per_rank and est[method][0] > MEMORY_WARN_FRACTION * memory_per_rank:
            found.warnings.append(f"hhl: case {name} needs {est[method][0] / 2**30:.2f} GiB, more than "
                                  f"{MEMORY_WARN_FRACTION:.0%} of the {memory_per_rank / 2**30:.2f} GiB a rank has; "
                                  "lower n, N, T or the clock qubits")


register(Stage(name="hhl", schema=SCHEMA, run=run,
               doc="simulated HHL / truncated HHL on Carleman or file systems, resources, read-out (eq. II.77-II.99)",
               checks=(check_before_run,), order=70, reads=hhl_reads,
               estimate=chain(check_hhl_network_model, estimate_memory)))
