"""``spectrum`` stage: Hessian spectral densities by distributed SLQ and the error proxy.

Measures, for each model state, the Hessian of the mean cross-entropy over a fixed batch
of ``batch_size`` training samples (drawn with the state's step and the run seed, paper
Sec. III B) and stores Ritz nodes/weights per probe, a smoothed density, extremes,
the Hutchinson trace, the mass below zero, and the error proxy of eq. III.10-III.13 with
the dissipation measures of eq. II.28, II.34 and II.93.  HDF5 layout: docs/schema/spectrum.md.

Model states (``source``):
  ``snapshots``  ``<workdir>/snapshots/step_XXXXXX.pt`` written by the train stage (the
                 paper's Fig. 2 schedule is the train stage's snapshot list); ``steps``
                 restricts them (empty = all found);
  ``pruned``     ``<workdir>/pruned.pt`` (the Fig. 3 configuration);
  ``pretrained`` ``<workdir>/pretrained.pt``;
  ``file``       the checkpoint named by ``model_file``.
Every probe is committed as soon as it finishes, so an interrupted run resumes at the next
unfinished probe.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.stages import Stage, StageContext, register

SCHEMA = {
    "source": Field(str, "snapshots", choices=("snapshots", "pruned", "pretrained", "file"),
                    doc="model states to measure: train-stage snapshots, pruned.pt, pretrained.pt or model_file"),
    "model_file": Field(str, "", doc="checkpoint to measure when source = 'file'"),
    "steps": Field(list, [], item=int, doc="snapshot steps to measure (empty = every snapshot found)"),
    "data_root": Field(str, "", doc="CIFAR-100 directory; empty = [data] root, else <workdir>/data"),
    "batch_size": Field(int, 2048, min=1, doc="samples in the fixed Hessian batch B"),
    "micro_batch": Field(int, 512, min=1, doc="samples per chunk of a product on one rank"),
    "wrt": Field(str, "all", choices=("all", "support"),
                 doc="parameters: all trainable, or mask-kept coordinates plus never-pruned parameters"),
    "route": Field(str, "auto", choices=("auto", "double-backward", "func"),
                   doc="H.v route; auto = time both on the first product and keep the faster"),
    "memory_format": Field(str, "auto", choices=("auto", "contiguous", "channels_last"),
                           doc="layout of model and batch; auto = channels_last on CUDA, contiguous on CPU"),
    "lanczos_steps": Field(int, 100, min=1, doc="Lanczos steps m per probe"),
    "probes": Field(int, 4, min=1, doc="Rademacher probes n_v"),
    "groups": Field(int, 1, min=1, doc="probe groups running different probes at once (<= ranks)"),
    "reorth": Field(str, "full", choices=("full", "none"), doc="reorthogonalisation against the sharded basis"),
    "basis_device": Field(str, "auto", choices=("auto", "cpu"),
                          doc="where the Krylov basis lives: the model's device, or host memory"),
    "grid_points": Field(int, 256, min=2, doc="points of the smoothed density grid"),
    "width_factor": Field(float, 0.01, min=1e-9, doc="kernel sigma = width_factor * (theta_max - theta_min)"),
    "cutoff": Field(float, 0.4, min=0.0, doc="eigenvalue magnitude removed before the error proxy (eq. III.12)"),
    "convention": Field(str, "paper", choices=("paper", "eta"), doc="modes a = -lambda (paper) or a = -eta*lambda"),
    "eta": Field(float, 0.01, min=0.0, doc="learning rate for convention = 'eta'"),
    "t_max": Field(int, 100, min=0, doc="error proxy evaluated for t = 0..t_max"),
}

_SNAP = re.compile(r"^step_(\d{6,})\.pt$")


def _states(ctx: StageContext) -> list[tuple[str, Path]]:
    """The model states to measure, as rank 0 sees them (see ``decide_on_root``)."""
    from hpcqml.parallel import decide_on_root

    return decide_on_root(ctx.comm, lambda: _find_states(ctx))


def _find_states(ctx: StageContext) -> list[tuple[str, Path]]:
    """(label, checkpoint path) of every model state to measure, in order."""
    cfg = ctx.cfg
    src = cfg["source"]
    if src == "file":
        if not cfg["model_file"]:
            raise UserError("[spectrum] source = 'file' needs model_file")
        path = Path(cfg["model_file"])
        if not path.is_file():
            raise UserError(f"[spectrum] model_file {path}: not found")
        return [(re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem), path)]
    if src in ("pruned", "pretrained"):
        path = ctx.workdir / f"{src}.pt"
        if not path.is_file():
            raise UserError(f"[spectrum] {path}: not found (run the {'prune' if src == 'pruned' else 'pretrain'} stage first)")
        return [(src, path)]
    snapdir = ctx.workdir / "snapshots"
    found = {}
    if snapdir.is_dir():
        for p in snapdir.iterdir():
            m = _SNAP.match(p.name)
            if m:
                found[int(m.group(1))] = p
    wanted = cfg["steps"] or sorted(found)
    missing = [s for s in wanted if s not in found]
    if missing:
        raise UserError(f"[spectrum] no snapshot for step {missing[0]} in {snapdir} (run the train stage first)")
    if not wanted:
        raise UserError(f"[spectrum] no snapshots in {snapdir} (run the train stage first)")
    return [(f"step_{s:06d}", found[s]) for s in wanted]


def _data_root(ctx: StageContext) -> Path:
    """``[spectrum] data_root``, else where the data stage keeps the data set."""
    from hpcqml.stages.data import data_root

    return Path(ctx.cfg["data_root"]) if ctx.cfg["data_root"] else data_root(ctx)


def _probe_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([int(seed), 0x51A7, int(step)]).generate_state(1)[0])


def _write_probe(res: Any):  # noqa: ANN202
    def write(g: Any) -> None:
        for name in ("alpha", "beta", "nodes", "weights", "residuals"):
            g.create_dataset(name, data=np.asarray(getattr(res, name), dtype=np.float64))
    return write


def _read_probe(label: str, probe: int):  # noqa: ANN202
    from hpcqml.hessian.lanczos import LanczosResult

    def read(fh: Any) -> LanczosResult:
        g = fh[f"spectrum/{label}/probe_{probe:03d}"]
        return LanczosResult(probe=probe, alpha=g["alpha"][()], beta=g["beta"][()], nodes=g["nodes"][()],
                             weights=g["weights"][()], residuals=g["residuals"][()],
                             steps=int(g.attrs["steps"]), breakdown=bool(g.attrs["breakdown"]),
                             quad_form=float(g.attrs["quad_form"]), start_norm2=float(g.attrs["start_norm2"]))
    return read


def memory_format(choice: str, device: torch.device) -> torch.memory_format:
    """Tensor layout of the model and batch: channels-last is faster for convolutions on
    GPUs (measured on an H100, BENCHMARKS.md), the default layout on CPUs."""
    if choice == "auto":
        choice = "channels_last" if device.type == "cuda" else "contiguous"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format


def measure_state(ctx: StageContext, label: str, path: Path, layout: Any, data: Any) -> None:
    """Run (or resume) SLQ for one model state and commit its probes and result."""
    from hpcqml.data.batches import batch_indices, shard, to_tensor
    from hpcqml.hessian.density import gaussian_density
    from hpcqml.hessian.hvp import HessianOperator, param_space
    from hpcqml.hessian.proxy import dissipation, fidelity_ii93, grid_masses, log_error_proxy
    from hpcqml.hessian.slq import run_probes, summarize
    from hpcqml.training.checkpoint import load_checkpoint

    cfg = ctx.cfg
    seed = int(ctx.run_cfg["seed"])
    device = ctx.device()
    ck = load_checkpoint(path, device=device)
    fmt = memory_format(cfg["memory_format"], device)
    model = ck.model.to(memory_format=fmt)
    space = param_space(model, cfg["wrt"], ck.mask)
    n = space.n
    if cfg["batch_size"] > len(data.train_y):
        raise UserError(f"[spectrum] batch_size = {cfg['batch_size']}: only {len(data.train_y)} training samples")
    idx = batch_indices(len(data.train_y), cfg["batch_size"], seed, ck.step)
    gcomm = layout.comm
    mine = shard(idx, gcomm.Get_rank(), gcomm.Get_size())
    x = to_tensor(data.train_x[mine]).to(device=device, dtype=space.dtype).contiguous(memory_format=fmt)
    y = torch.from_numpy(data.train_y[mine]).to(device)
    op = HessianOperator(model, x, y, cfg["batch_size"], comm=gcomm, space=space,
                         micro_batch=cfg["micro_batch"], route=cfg["route"], perf=ctx.perf)
    pseed = _probe_seed(seed, ck.step)
    todo = [p for p in range(cfg["probes"]) if not ctx.store.is_complete(f"spectrum/{label}/probe_{p:03d}")]

    def commit(done: list) -> None:
        for res in done:
            ctx.perf.count("lanczos_steps", res.steps)
            ctx.store.commit(f"spectrum/{label}/probe_{res.probe:03d}", _write_probe(res),
                             attrs={"probe": res.probe, "steps": res.steps, "breakdown": res.breakdown,
                                    "quad_form": res.quad_form, "start_norm2": res.start_norm2,
                                    "probe_seed": pseed})
        ctx.log(f"{label}: probes {[r.probe for r in done]} done ({op.products} products on this group)")

    basis_device = "cpu" if cfg["basis_device"] == "cpu" else device
    if todo:
        ctx.log(f"{label}: n = {n}, B = {cfg['batch_size']}, probes to run {todo}")
        run_probes(op.matvec, n, layout, todo, pseed, steps=cfg["lanczos_steps"], reorth=cfg["reorth"],
                   state_dtype=space.dtype, device=device, basis_device=basis_device,
                   label=label, on_round=commit, perf=ctx.perf)
    results = [ctx.store.read(_read_probe(label, p)) for p in range(cfg["probes"])]
    s = summarize(results, n)
    nodes, weights = s.pooled()
    dens = gaussian_density(nodes, weights, cfg["grid_points"], cfg["width_factor"])
    t = np.arange(cfg["t_max"] + 1, dtype=np.float64)
    pk = dict(cutoff=cfg["cutoff"], convention=cfg["convention"], eta=cfg["eta"])
    gmass = grid_masses(dens.grid, dens.rho)
    proxy_grid_log = log_error_proxy(dens.grid, gmass, t, **pk)
    proxy_nodes_log = log_error_proxy(nodes, weights, t, **pk)
    dis_grid = dissipation(dens.grid, gmass, **pk)
    dis_nodes = dissipation(nodes, weights, **pk)
    dis_all = dissipation(nodes, weights, cutoff=0.0, convention=cfg["convention"], eta=cfg["eta"])
    route = op.route if op.products else cfg["route"]

    def write(g: Any) -> None:
        f8 = np.float64
        g.create_dataset("nodes", data=s.nodes.astype(f8))
        g.create_dataset("weights", data=s.weights.astype(f8))
        g.create_dataset("residuals", data=s.residuals.astype(f8))
        g.create_dataset("probe_steps", data=s.steps)
        g.create_dataset("breakdown", data=s.breakdown.astype(np.int8))
        g.create_dataset("quad_forms", data=s.quad_forms)
        d = g.create_group("density")
        d.create_dataset("grid", data=dens.grid)
        d.create_dataset("rho", data=dens.rho)
        d.attrs.update({"sigma": dens.sigma, "width_factor": dens.width_factor, "min_width": dens.min_width,
                        "width_rule": dens.rule, "kernel": "gaussian"})
        p = g.create_group("proxy")
        p.create_dataset("t", data=t)
        with np.errstate(over="ignore"):
            p.create_dataset("grid", data=np.exp(proxy_grid_log))
            p.create_dataset("nodes", data=np.exp(proxy_nodes_log))
        p.create_dataset("log_grid", data=proxy_grid_log)
        p.create_dataset("log_nodes", data=proxy_nodes_log)
        a_def = "a = -lambda" if cfg["convention"] == "paper" else f"a = -eta*lambda, eta = {cfg['eta']}"
        p.attrs.update({"cutoff": cfg["cutoff"], "convention": cfg["convention"], "eta": cfg["eta"],
                        "a_definition": a_def, "cutoff_applies_to": "|lambda|"})
        for tag, dis in (("grid", dis_grid), ("nodes", dis_nodes), ("all_nodes", dis_all)):
            p.attrs.update({f"dissipative_fraction_{tag}": dis.fraction, f"r_plus_{tag}": dis.r_plus,
                            f"r_minus_{tag}": dis.r_minus, f"a_plus_{tag}": dis.a_plus,
                            f"time_limit_{tag}": dis.time_limit})
        p.attrs["fidelity_ii93_grid"] = fidelity_ii93(dis_grid.fraction)
        p.attrs["fidelity_ii93_nodes"] = fidelity_ii93(dis_nodes.fraction)
        p.attrs["fidelity_ii93_all_nodes"] = fidelity_ii93(dis_all.fraction)  # all modes, as eq. II.93 counts

    attrs = {"n": n, "model_name": ck.model_name, "model_step": ck.step, "checkpoint": str(path),
             "wrt": cfg["wrt"], "batch_size": cfg["batch_size"], "micro_batch": cfg["micro_batch"],
             "route": route, "lanczos_steps": cfg["lanczos_steps"], "probes": cfg["probes"],
             "reorth": cfg["reorth"], "state_dtype": str(space.dtype).replace("torch.", ""),
             "memory_format": str(fmt).replace("torch.", ""), "probe_seed": pseed,
             "trace": s.trace, "trace_se": s.trace_se,
             "mass_below_zero": s.mass_below_zero, "lambda_min": s.lambda_min,
             "lambda_min_residual": s.lambda_min_residual, "lambda_max": s.lambda_max,
             "lambda_max_residual": s.lambda_max_residual, "groups": layout.count,
             "ranks": ctx.size}
    ctx.store.commit(f"spectrum/{label}/result", write, attrs=attrs)
    ctx.log(f"{label}: lambda in [{s.lambda_min:.4g}, {s.lambda_max:.4g}], trace {s.trace:.4g} "
            f"+- {s.trace_se:.2g}, dissipative fraction {dis_nodes.fraction:.3f}")


def run(ctx: StageContext) -> None:
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.hessian.slq import probe_groups

    states = _states(ctx)
    layout = probe_groups(ctx.comm, ctx.cfg["groups"])
    data = None
    for label, path in ctx.progress(states, total=len(states), desc="spectrum"):
        if ctx.store.is_complete(f"spectrum/{label}/result"):
            continue
        if data is None:
            data = load_cifar100(_data_root(ctx))
        measure_state(ctx, label, path, layout, data)
    ctx.log(f"{len(states)} model state(s) measured")


register(Stage(name="spectrum", schema=SCHEMA, run=run,
               doc="Hessian spectral densities by distributed SLQ and the error proxy (eq. III.10-III.13)"))
