"""``spectrum`` stage: Hessian spectral densities by distributed SLQ and the error proxy.

Measures, for each model state, the Hessian of the mean cross-entropy over a fixed batch
of ``batch_size`` training samples (drawn with the state's step and the run seed, paper
Sec. III B) and stores Ritz nodes/weights/residual bounds per probe, a smoothed density,
extremes, and, each with a proven quadrature bracket, a Student t sampling interval over
probes and their combination (see :mod:`hpcqml.hessian.spectrum`), the Hutchinson trace,
the negative mass, and for
both mode conventions (a = -lambda and a = -eta*lambda, eq. II.65) the error proxy of
eq. III.10-III.13 and the dissipation measures of eq. II.28, II.34 and II.93.
HDF5 layout: docs/schema/spectrum.md.

Model states (``source``):
  ``snapshots``  ``<workdir>/snapshots/step_XXXXXX.pt`` written by the train stage (the
                 paper's Fig. 2 schedule is the train stage's snapshot list); ``steps``
                 restricts them (empty = all found);
  ``pruned``     ``<workdir>/pruned.pt`` (the Fig. 3 configuration);
  ``pretrained`` ``<workdir>/pretrained.pt``;
  ``file``       the checkpoint named by ``model_file``.
Adaptive stopping (:func:`adapt`): the stored probes are evaluated in rounds; while a
requested estimate's proven quadrature bracket dominates its combined interval the Lanczos
steps double (up to ``max_lanczos_steps``; each probe's recurrence is kept in memory within
the run and extended, so m -> 2m costs m products per probe; across runs its Krylov basis is
kept on disk, :mod:`hpcqml.stages._bases`, ``keep_bases``), while its sampling interval
dominates probes are added (up to ``max_probes``), until every estimate in ``resolve`` is
resolved or the budget ends; the result records which (``stop_reason``).  Probes run
``lockstep`` at a time: one block product per Lanczos step for all of them
(:mod:`hpcqml.hessian.lockstep`).  A snapshot that ``/train/snapshot_steps`` lists (or
``steps`` names) but whose file is gone is reported after every present state is measured:
the stage then fails with one line naming it.  The probe count, budgets and tolerances are
*extendable* settings: a rerun with other values keeps every stored probe and runs only
what is missing.  ``top_k`` adds the extreme eigenpairs by restarted Lanczos.
Every probe is committed as soon as it finishes, so an interrupted run resumes at the next
unfinished probe.  SIGTERM/SIGUSR1 stop the stage after the current Lanczos step: the
finished probes stay committed and one line says what was saved.  ``route = "auto"`` is
decided once (at the first product of the run) and the route used is stored with every
probe, so a resumed run keeps it.
"""
from __future__ import annotations

import contextlib
import functools
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.preflight import MEMORY_WARN_FRACTION, krylov_basis_bytes
from hpcqml.stages import Stage, StageContext, register
from hpcqml.stages._estimates import estimate_spectrum, spectrum_reads

if TYPE_CHECKING:
    import torch

SCHEMA = {
    "source": Field(str, "snapshots", choices=("snapshots", "pruned", "pretrained", "file"),
                    doc="model states to measure: train-stage snapshots, pruned.pt, pretrained.pt or model_file"),
    "model_file": Field(str, "", doc="checkpoint to measure when source = 'file'"),
    "steps": Field(list, [], item=int, doc="snapshot steps to measure (empty = every snapshot found)"),
    "data_root": Field(str, "", doc="CIFAR-100 directory; empty = [data] root, else <workdir>/data"),
    "batch_size": Field(int, 2048, min=1, doc="samples in the fixed Hessian batch B"),
    "micro_batch": Field(int, 512, min=1, affects_results=False, doc="samples per chunk of a product on one rank"),
    "wrt": Field(str, "all", choices=("all", "support"),
                 doc="parameters: all trainable, or mask-kept coordinates plus never-pruned parameters"),
    "route": Field(str, "auto", choices=("auto", "double-backward", "func"), affects_results=False,
                   doc="H.v route; auto = time both on the first product and keep the faster"),
    "memory_format": Field(str, "auto", choices=("auto", "contiguous", "channels_last"), affects_results=False,
                           doc="layout of model and batch; auto = channels_last on CUDA, contiguous on CPU"),
    "lanczos_steps": Field(int, 100, min=1, doc="Lanczos steps m per probe (where adaptive stopping starts)"),
    "probes": Field(int, 4, min=1, extendable=True,
                    doc="Rademacher probes n_v (where adaptive stopping starts); raising it adds probes to the "
                        "stored ones, which are kept"),
    "max_probes": Field(int, 0, min=0, extendable=True,
                        doc="probe budget of adaptive stopping: probes are added (stored ones kept) while a "
                            "requested estimate's sampling interval is wider than the tolerance; 0 = probes"),
    "max_lanczos_steps": Field(int, 0, min=0, extendable=True,
                               doc="step budget of adaptive stopping: steps double while a requested estimate's "
                                   "quadrature bracket is wider than the tolerance (each probe's recurrence is "
                                   "kept in memory and extended, so m -> 2m costs m products per probe; a later "
                                   "run with a larger budget extends the stored probes from their Krylov bases "
                                   "on disk when the earlier run wrote them, see keep_bases); 0 = lanczos_steps; "
                                   "at most n are taken"),
    "keep_bases": Field(str, "auto", choices=("auto", "yes", "no"), affects_results=False,
                        doc="Krylov bases of the stored probes kept in <workdir>/spectrum-bases, so a later run "
                            "that needs more Lanczos steps extends the stored probes instead of rerunning them "
                            "(about (m + 2) x n values of the state dtype per probe over all ranks, written "
                            "only while the disk has twice that free): auto = written when the step budget "
                            "can grow (max_lanczos_steps > lanczos_steps), yes = always written (so a later "
                            "run may raise max_lanczos_steps), no = neither written nor read; auto and yes "
                            "read them"),
    "lockstep": Field(int, 0, min=0, affects_results=False,
                      doc="probes advanced together, one block product per Lanczos step for all of them: "
                          "1 = one after another, k = k at a time, 0 = as many as have Krylov bases fitting in "
                          "half the memory (at most 8); results equal one-at-a-time up to the product's rounding"),
    "resolve": Field(list, ["negative_mass", "dissipative_fraction", "error_proxy"], item=str,
                     choices=("trace", "negative_mass", "dissipative_fraction", "overlap_ii93", "error_proxy",
                              "error_proxy_no_cutoff"),
                     extendable=True,
                     doc="estimates adaptive stopping must resolve, in the primary convention: trace, "
                         "negative_mass, dissipative_fraction (Delta+/Delta with the cutoff), overlap_ii93, "
                         "error_proxy (E(t) at every proxy_t), error_proxy_no_cutoff (E(t) of eq. III.11 "
                         "without the cutoff, at every proxy_t)"),
    "groups": Field(int, 1, min=1, affects_results=False,
                    doc="probe groups running different probes at once (<= ranks)"),
    "reorth": Field(str, "full", choices=("full", "none"), doc="reorthogonalisation against the sharded basis"),
    "basis_device": Field(str, "auto", choices=("auto", "cpu"), affects_results=False,
                          doc="where the Krylov basis lives: the model's device, or host memory"),
    "grid_points": Field(int, 256, min=2, doc="points of the smoothed density grid"),
    "width_factor": Field(float, 0.01, min=1e-9, doc="kernel sigma = width_factor * (theta_max - theta_min)"),
    "cutoff": Field(float, 0.4, min=0.0,
                    doc="eigenvalue magnitude |lambda| removed before the error proxy (eq. III.12), both conventions"),
    "convention": Field(str, "eta", choices=("eta", "paper"),
                        doc="convention drawn first in the report and Fig. 2c (both are stored): "
                            "a = -eta*lambda (eq. II.65, as the qcm network instances) or a = -lambda"),
    "eta": Field(float, 0.0, min=0.0, doc="learning rate eta of a = -eta*lambda; 0 = the [train] lr"),
    "t_max": Field(int, 100, min=0, doc="error proxy curves evaluated for t = 0..t_max"),
    "proxy_t": Field(list, [10, 100], item=int, min=0, doc="t at which the error proxy gets error bars"),
    "negative_delta": Field(float, 0.0, min=0.0,
                            doc="negative mass: the mass of the eigenvalues below -negative_delta"),
    "bootstrap": Field(int, 1000, min=10, affects_results=False,
                       doc="read by older versions (bootstrap intervals); the sampling interval over probes is "
                           "now Student t, so this changes nothing"),
    "resolution_mass": Field(float, 0.05, min=0.0, max=1.0, extendable=True,
                             doc="absolute tolerance of the mass fractions (negative mass, Delta+/Delta, eq. II.93): "
                                 "resolved when the combined interval (proven quadrature bracket widened by the "
                                 "sampling interval) has half-width at most max(resolution_mass, "
                                 "resolution_rel * value)"),
    "resolution_abs": Field(float, 0.0, min=0.0, extendable=True,
                            doc="absolute tolerance of the estimates that are not mass fractions (trace, E(t)): "
                                "resolved when the combined interval's half-width is at most "
                                "max(resolution_abs, resolution_rel * |value|)"),
    "resolution_rel": Field(float, 0.1, min=0.0, extendable=True,
                            doc="relative tolerance of every estimate: resolved when the combined interval's "
                                "half-width is at most resolution_rel * |value| (or the absolute tolerance)"),
    "top_k": Field(int, 0, min=0,
                   doc="extreme eigenpairs of each H by restarted Lanczos (0 = none): eigenvalues always stored "
                       "with their explicit residuals"),
    "top_which": Field(str, "both_ends", choices=("largest", "smallest", "both_ends", "largest_magnitude"),
                       doc="which extreme eigenpairs: largest / smallest eigenvalues, both ends (half each) or "
                           "largest |lambda|"),
    "eigenvectors": Field(bool, False, doc="store the top_k eigenvectors too (n values each, chunked by rows)"),
    "curvature": Field(list, ["hessian"], item=str, min_items=1,
                       doc="curvature matrices measured: hessian, ggn, fisher, empirical-fisher, hessian-minus-ggn"),
    "blocks": Field(list, [], item=str,
                    doc="diagonal blocks measured too: ['layer'], ['module'] or parameter-name patterns; [] = none"),
    "batchnorm": Field(str, "eval", choices=("eval", "train"),
                       doc="batch normalisation during products: running statistics (eval) or batch statistics"),
    "fisher_samples": Field(int, 1, min=1, doc="labels drawn per sample for the Monte-Carlo Fisher"),
    "precision": Field(str, "tf32", choices=("tf32", "fp32"),
                       doc="float32 matmul/convolution precision on CUDA (TF32 or strict fp32); CPU is always fp32"),
}

#: a warning is logged when one rank's Krylov basis needs more than this fraction of the
#: memory available to that rank (device memory, or host memory divided by the node's ranks);
#: the same fraction ``hpcqml validate`` warns at
BASIS_MEMORY_FRACTION = MEMORY_WARN_FRACTION

_SNAP = re.compile(r"^step_(\d{6,})\.pt$")


def _states(ctx: StageContext) -> tuple[list[tuple[str, Path]], list[Path]]:
    """The model states to measure, as rank 0 sees them, and the snapshot files that are
    missing (collective).

    With ``source = "snapshots"`` the steps are ``[spectrum] steps``, else every step that
    ``/train/snapshot_steps`` lists or that has a snapshot file.  A step whose file is gone
    but whose result is stored is kept (it needs no file); one with neither is missing.
    """
    from hpcqml.parallel import decide_on_root
    from hpcqml.stages.train import snapshot_path

    if ctx.cfg["source"] != "snapshots":
        return decide_on_root(ctx.comm, lambda: _find_states(ctx)), []
    listed = ctx.store.read(lambda fh: [int(t) for t in fh["train/snapshot_steps"][()]]
                            if "train/snapshot_steps" in fh else [], default=[])
    found: dict[int, Path] = decide_on_root(ctx.comm, lambda: _snapshot_files(ctx.workdir / "snapshots"))
    wanted = list(ctx.cfg["steps"]) or sorted(set(listed) | set(found))
    states, missing = [], []
    for step in wanted:
        label = f"step_{step:06d}"
        if step in found:
            states.append((label, found[step]))
        elif _state_done(ctx, label):
            states.append((label, snapshot_path(ctx.workdir, step)))
        else:
            missing.append(snapshot_path(ctx.workdir, step))
    if not wanted:
        raise UserError(f"[spectrum] no snapshots in {ctx.workdir / 'snapshots'} (run the train stage first)")
    if not states:
        raise UserError(_missing_message(missing, 0))
    return states, missing


def _missing_message(missing: list[Path], measured: int) -> str:
    """One line naming the missing snapshot files (and how many states were measured)."""
    done = f"; the {measured} present model state(s) were measured and committed" if measured else ""
    return (f"[spectrum] snapshot {missing[0]} is missing ({len(missing)} missing: "
            f"{', '.join(p.name for p in missing)}){done}; restore it, or name the steps present in "
            "[spectrum] steps")


def _snapshot_files(snapdir: Path) -> dict[int, Path]:
    """Step -> snapshot file of every ``step_XXXXXX.pt`` in ``snapdir``."""
    found = {}
    if snapdir.is_dir():
        for p in snapdir.iterdir():
            m = _SNAP.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return found


def _find_states(ctx: StageContext) -> list[tuple[str, Path]]:
    """(label, checkpoint path) of the model state of a ``file``, ``pruned`` or ``pretrained`` source."""
    cfg = ctx.cfg
    src = cfg["source"]
    if src == "file":
        if not cfg["model_file"]:
            raise UserError("[spectrum] source = 'file' needs model_file")
        path = Path(cfg["model_file"])
        if not path.is_file():
            raise UserError(f"[spectrum] model_file {path}: not found")
        return [(re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem), path)]
    path = ctx.workdir / f"{src}.pt"
    if not path.is_file():
        before = "prune" if src == "pruned" else "pretrain"
        raise UserError(f"[spectrum] {path}: not found (run the {before} stage first)")
    return [(src, path)]


def _data_root(ctx: StageContext) -> Path:
    """``[spectrum] data_root``, else where the data stage keeps the data set."""
    from hpcqml.stages.data import data_root

    return Path(ctx.cfg["data_root"]) if ctx.cfg["data_root"] else data_root(ctx)


def _probe_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([int(seed), 0x51A7, int(step)]).generate_state(1)[0])


def _write_probe(res: Any) -> Callable[[Any], None]:
    from hpcqml.store import write_dataset

    def write(g: Any) -> None:
        f8 = np.float64
        write_dataset(g, "alpha", np.asarray(res.alpha, dtype=f8), "nat", "Lanczos diagonal alpha_j = v_j^T H v_j")
        write_dataset(g, "beta", np.asarray(res.beta, dtype=f8), "nat",
                      "Lanczos off-diagonal beta_j of T_k; the last entry is the final residual norm")
        write_dataset(g, "nodes", np.asarray(res.nodes, dtype=f8), "nat", "Ritz values theta_i of T_k, ascending")
        write_dataset(g, "weights", np.asarray(res.weights, dtype=f8), "1", "Gauss weights S_1i^2, sum to 1")
        write_dataset(g, "residuals", np.asarray(res.residuals, dtype=f8), "nat",
                      "Ritz residual bounds |beta_k S_ki|: an eigenvalue lies in theta +- residual")
    return write


def _read_probe(label: str, probe: int) -> Callable[[Any], Any]:
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
    GPUs (measured on an H100, BENCHMARKS.md), the default layout on CPUs.
    """
    import torch

    if choice == "auto":
        choice = "channels_last" if device.type == "cuda" else "contiguous"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format


@contextlib.contextmanager
def matmul_precision(setting: str, device: torch.device, dtype: torch.dtype) -> Iterator[str]:
    """Set TF32 (``tf32``) or strict float32 (``fp32``) for CUDA matmuls and convolutions.

    Yields the effective precision of the products: ``tf32`` only for float32 on CUDA;
    otherwise the dtype's own (``fp32`` on CPU whatever the setting, ``fp64`` for float64).
    The previous torch flags are restored on exit.
    """
    import torch

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    allow = setting == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    native = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
    tf32 = allow and device.type == "cuda" and dtype == torch.float32
    effective = "tf32" if tf32 else native.get(dtype, str(dtype))
    try:
        yield effective
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class StepProgress:
    """A progress bar per probe on world rank 0, advanced after every Lanczos step (rate, ETA)."""

    def __init__(self, ctx: StageContext, label: str) -> None:
        self.show = ctx.rank == 0 and not ctx.quiet
        self.label = label
        self.bar: Any = None
        self.probe: int | str | None = None

    def __call__(self, probe: int | str, done: int, total: int) -> None:
        """Advance the bar of ``probe`` to ``done`` of ``total`` steps (a new bar per probe, or
        per block of probes in lockstep, ``probe`` then naming them as text such as ``0-3``).
        """
        if not self.show:
            return
        from tqdm import tqdm

        if probe != self.probe:
            self.close()
            interactive = sys.stderr.isatty()
            what = f"probes {probe}" if isinstance(probe, str) else f"probe {probe}"
            self.bar = tqdm(total=total, desc=f"{self.label} {what}", unit="step", file=sys.stderr,
                            mininterval=0.5 if interactive else 10.0, dynamic_ncols=interactive, leave=True)
            self.probe = probe
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        """Close the current bar, if any."""
        if self.bar is not None:
            self.bar.close()
        self.bar, self.probe = None, None


def decide_route(ctx: StageContext, st: "Prepared") -> str:
    """The route of the operator, deciding ``auto`` once: both routes are timed on one
    product and world rank 0's choice is used by every group.
    """
    import torch

    op = st.hessian
    if op.route != "auto":
        return op.route
    op.matvec(torch.ones(op.n, dtype=st.dtype, device=ctx.device()))
    route = ctx.comm.bcast(op.route, root=0) if ctx.size > 1 else op.route
    timings = ", ".join(f"{k} {v:.3g} s" for k, v in getattr(op, "route_timings", {}).items())
    ctx.log(f"product route: {route} (decided once, timed on one product: {timings})")
    return route


def run_decisions(ctx: StageContext, ops: dict[str, "Prepared"], precision: str,
                  expected_products: int | None = None) -> str:
    """The Hessian product route of this run, fixed once per results file before its first probe.

    The route (``auto`` timed once on the first Hessian operator, :func:`decide_route`; the
    device type's fixed route when no Hessian is measured), the matrix-multiply precision and
    the device type are committed to ``spectrum/decisions`` the first time and read back on
    every resume, so a timing-based choice never flips between invocations (collective).

    ``expected_products`` (the products this run will ask for at least) is handed to the
    Hessian operators, so ``auto`` times a route with a compile cost only when it pays back.

    Returns:
        The stored route when ``route = "auto"``, else the configured route.
    """
    from hpcqml.hessian.hvp import default_route

    hessians = [st for st in ops.values() if st.hessian is not None]
    if expected_products is not None:
        for st in hessians:
            if hasattr(st.hessian, "expected_products"):
                st.hessian.expected_products = int(expected_products)

    def choose() -> dict[str, Any]:
        route = decide_route(ctx, hessians[0]) if hessians else default_route(ctx.device())
        return {"route": route, "precision": precision, "device": ctx.device().type}
    choice = ctx.store.decide_once("spectrum/decisions", choose)
    route = str(choice["route"]) if ctx.cfg["route"] == "auto" else ctx.cfg["route"]
    for st in hessians:
        st.hessian.route = route
    return route


def check_sizes(ctx: StageContext, label: str, n: int, layout: Any, dtype: torch.dtype, basis_device: Any,
                steps: int, block: bool = False, bases: int = 1) -> None:
    """Refuse more Lanczos steps than dimensions (a diagonal block, ``block``, smaller than
    ``lanczos_steps`` is measured with ``n`` steps instead); warn when ``bases`` Krylov
    bases of ``steps`` vectors (the probes held at once) may not fit in memory.
    """
    import torch

    from hpcqml.parallel import memory_per_rank

    if ctx.cfg["lanczos_steps"] > n and not block:
        steps = ctx.cfg["lanczos_steps"]
        raise UserError(f"[spectrum] lanczos_steps = {steps} exceeds the dimension n = {n} of {label}'s "
                        f"parameter space; use at most {n}")
    if ctx.cfg["reorth"] != "full":
        return
    gsize = 1 if layout.comm is None else layout.comm.Get_size()
    per_rank = bases * krylov_basis_bytes(steps, n, gsize, torch.empty((), dtype=dtype).element_size())
    available, where = memory_per_rank(ctx.comm, basis_device)
    if available > 0 and per_rank > BASIS_MEMORY_FRACTION * available:
        what = "the Krylov basis needs" if bases == 1 else f"the Krylov bases of {bases} probes held at once need"
        ctx.log(f"warning: {label}: {what} {per_rank / 2**30:.2f} GiB per rank "
                f"({steps} steps x {-(-n // gsize):,} values each), more than {BASIS_MEMORY_FRACTION:.0%} of the "
                f"{available / 2**30:.1f} GiB of {where}; use more ranks, basis_device = 'cpu', fewer steps "
                "or a smaller [spectrum] lockstep")


#: the stage that writes each work-directory source of model states
_PRODUCERS = {"snapshots": "train", "pruned": "prune", "pretrained": "pretrain"}


def _check_origins(ctx: StageContext, states: list[tuple[str, Path]]) -> None:
    """Refuse a work-directory checkpoint that this run's producing stage did not make,
    before any data is loaded (collective; a file named by ``model_file`` is measured as
    it is, an unreadable one is reported when it is loaded).
    """
    from hpcqml.parallel import decide_on_root
    from hpcqml.training.checkpoint import read_origin
    from hpcqml.training.origin import check_input

    producer = _PRODUCERS.get(ctx.cfg["source"])
    if producer is None:
        return
    for label, path in states:
        if _state_done(ctx, label):
            continue
        origin = decide_on_root(ctx.comm, functools.partial(read_origin, path))
        if origin is not None:
            check_input(ctx, path, producer, *origin)


@dataclass
class Prepared:
    """One curvature operator of a model state ready for products: its checkpoint, operator
    and batch description.
    """

    ck: Any
    op: Any
    n: int
    fmt: torch.memory_format
    dtype: torch.dtype
    kind: str = "hessian"
    block: str = ""
    #: the Hessian the operator products go through (owner of the product route), or None
    hessian: Any = None


def _hessian_part(kind: str, op: Any) -> Any:
    """The Hessian operator inside a curvature operator of ``kind`` (None: it has none)."""
    if kind == "hessian":
        return op
    if kind == "hessian-minus-ggn":
        return op.terms[0][1]
    return None


def operator_label(label: str, name: str) -> str:
    """The results group of operator ``name`` (``kind`` or ``kind/block``) of model state
    ``label``: the plain Hessian keeps the state's own group.
    """
    return label if name == "hessian" else f"{label}/{name}"


def block_rule(blocks: list[str]) -> str | list[str]:
    """``[spectrum] blocks`` as :func:`hpcqml.hessian.blocks.partition` takes it."""
    return blocks[0] if blocks in (["layer"], ["module"]) else list(blocks)


def check_curvature(ctx: StageContext) -> None:
    """Pre-run check: every ``curvature`` entry names a known operator, once, and no block
    pattern would split a results group name.
    """
    from hpcqml.hessian.curvature import KINDS

    kinds = ctx.cfg["curvature"]
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"[spectrum] curvature = {kind!r}: not one of {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise UserError(f"[spectrum] curvature = {kinds}: a kind is named twice")
    bad = [b for b in ctx.cfg["blocks"] if "/" in b or not b.strip()]
    if bad:
        raise UserError(f"[spectrum] blocks: {bad[0]!r} is empty or holds '/'; name parameter patterns without '/'")


def _state_done(ctx: StageContext, label: str) -> bool:
    """True when every operator of ``label`` has an up-to-date result (unknown with blocks,
    whose names need the model: False, and each block is checked when the state is loaded).
    """
    if ctx.cfg["blocks"]:
        return False
    return all(_up_to_date(ctx, operator_label(label, k)) for k in ctx.cfg["curvature"])


def prepare_state(ctx: StageContext, path: Path, layout: Any, data: Any, route: str) -> dict[str, Prepared]:
    """Load a checkpoint and build the curvature operators of its fixed batch on this group.

    Returns:
        ``{name: prepared operator}``, names as :func:`hpcqml.hessian.curvature.build_curvature`
        gives them (``kind``, and ``kind/block`` for each diagonal block).
    """
    import torch

    from hpcqml.data.batches import batch_indices, shard, to_tensor
    from hpcqml.hessian.curvature import build_curvature
    from hpcqml.hessian.hvp import param_space, resolve_route
    from hpcqml.training.checkpoint import load_checkpoint

    cfg = ctx.cfg
    device = ctx.device()
    ck = load_checkpoint(path, device=device)
    fmt = memory_format(cfg["memory_format"], device)
    model = ck.model.to(memory_format=fmt)  # type: ignore[call-overload]  # Module.to takes memory_format
    space = param_space(model, cfg["wrt"], ck.mask)
    if cfg["batch_size"] > len(data.train_y):
        raise UserError(f"[spectrum] batch_size = {cfg['batch_size']}: only {len(data.train_y)} training samples")
    idx = batch_indices(len(data.train_y), cfg["batch_size"], int(ctx.run_cfg["seed"]), ck.step)
    gcomm = layout.comm
    mine = shard(idx, gcomm.Get_rank(), gcomm.Get_size())
    x = to_tensor(data.train_x[mine]).to(device=device, dtype=space.dtype).contiguous(memory_format=fmt)
    y = torch.from_numpy(data.train_y[mine]).to(device)
    kw: dict[str, Any] = dict(
        wrt=cfg["wrt"], mask=ck.mask, route=resolve_route(route, device), batchnorm=cfg["batchnorm"],
        micro_batch=cfg["micro_batch"], num_data=cfg["batch_size"], comm=gcomm,
        seed=_probe_seed(int(ctx.run_cfg["seed"]), ck.step), mc_samples=cfg["fisher_samples"],
        check_finite=False, perf=ctx.perf)
    ops = build_curvature(cfg["curvature"], model, (x, y), None, **kw)
    if cfg["blocks"]:
        ops.update(build_curvature(cfg["curvature"], model, (x, y), None, blocks=block_rule(cfg["blocks"]), **kw))
    out = {}
    for name, op in ops.items():
        kind, _, block = name.partition("/")
        out[name] = Prepared(ck=ck, op=op, n=op.n, fmt=fmt, dtype=space.dtype, kind=kind, block=block,
                             hessian=_hessian_part(kind, op))
    return out


def run_probe_list(ctx: StageContext, label: str, st: Prepared, layout: Any, stop: Any, pseed: int,
                   route: str, todo: list[int], steps: int, engine: Any = None, width: int = 1,
                   bases: Any = None) -> None:
    """Run the probes ``todo`` of ``label`` with ``steps`` Lanczos steps, ``width`` at a time in
    lockstep, committing each round as it finishes (a stored probe of the same number is
    replaced).  A probe ``engine`` holds from an earlier round (or from disk) is extended, not
    rerun.  With ``bases`` (:class:`hpcqml.stages._bases.Bases`) every rank writes its part of
    each committed probe's running state to disk, after the commit; an engine that keeps no
    probe for extension then holds each one only until that is written.
    """
    from hpcqml.hessian.lockstep import block_product
    from hpcqml.hessian.slq import ProbesInterrupted, run_probes
    from hpcqml.training.signals import StoppedBySignal, stop_message

    cfg = ctx.cfg
    if not todo:
        return

    def commit(done: list) -> None:
        t0 = time.perf_counter()
        for res in done:
            ctx.perf.count("lanczos_steps", res.steps)
            ctx.store.commit(f"spectrum/{label}/probe_{res.probe:03d}", _write_probe(res),
                             attrs={"probe": res.probe, "steps": res.steps, "steps_requested": steps,
                                    "breakdown": res.breakdown, "quad_form": res.quad_form,
                                    "start_norm2": res.start_norm2, "probe_seed": pseed, "route": route})
        ctx.perf.count("commit_seconds", time.perf_counter() - t0)  # results-file I/O of the probes
        ctx.log(f"{label}: probes {[r.probe for r in done]} done ({st.op.products} products on this group)")
        if bases is not None and engine is not None:
            for res in done:
                if engine.holds(res.probe):
                    bases.save(res.probe, engine.export(res.probe))
                    if not keep:
                        engine.release(res.probe)

    device = ctx.device()
    basis_device = "cpu" if cfg["basis_device"] == "cpu" else device
    held = [p for p in todo if engine is not None and engine.holds(p)]
    ctx.log(f"{label}: n = {st.n:,}, B = {cfg['batch_size']}, route {route}, {steps} steps, probes to run {todo}"
            + (f" ({width} in lockstep)" if width > 1 else "")
            + (f"; probes {held} extended from {min(engine.steps(p) for p in held)} steps" if held else ""))
    bar = StepProgress(ctx, label)
    keep = engine is None or engine.keep
    if bases is not None and engine is not None:
        engine.keep = True  # held until its state is written (commit), then released unless kept
    try:
        run_probes(st.op.matvec, st.n, layout, todo, pseed, steps=steps, reorth=cfg["reorth"],
                   state_dtype=st.dtype, device=device, basis_device=basis_device, label=label,
                   on_round=commit, perf=ctx.perf, on_step=bar, should_stop=stop.requested,
                   width=width, matmat=block_product(st.op), engine=engine)
    except ProbesInterrupted as why:
        bar.close()
        kept = sorted(set(_stored_probes(ctx, label)) - set(why.remaining))
        raise StoppedBySignal(stop_message(
            stop.signum, f"spectrum {label} with probes {why.remaining} not finished",
            f"probes {kept} of {label} in {ctx.store.path}", None)) from None
    finally:
        if engine is not None:
            engine.keep = keep
    bar.close()


def _stored_probes(ctx: StageContext, label: str) -> dict[int, int]:
    """Probe number -> Lanczos steps requested, of every complete probe group of ``label``.

    Probes written before the step count was recorded give the steps they took.  None while
    the stage is recomputed and its old groups are not yet set aside.
    """
    if ctx.store.is_replacing("spectrum"):
        return {}

    def body(fh: Any) -> dict[int, int]:
        out = {}
        for key, g in fh.get(f"spectrum/{label}", {}).items():
            if key.startswith("probe_") and g.attrs.get("complete", False):
                out[int(g.attrs["probe"])] = int(g.attrs.get("steps_requested", g.attrs["steps"]))
        return out
    return ctx.store.read(body, default={})


@dataclass(frozen=True)
class Budget:
    """Where adaptive stopping starts (``probes`` x ``steps``) and how far it may grow."""

    probes: int
    max_probes: int
    steps: int
    max_steps: int
    groups: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any], n: int, groups: int) -> "Budget":
        """The budget of the ``[spectrum]`` settings for an operator of size ``n``."""
        steps = min(cfg["lanczos_steps"], n)
        return cls(probes=cfg["probes"], max_probes=max(cfg["probes"], cfg["max_probes"]), steps=steps,
                   max_steps=min(max(steps, cfg["max_lanczos_steps"]), n), groups=groups)

    @property
    def adaptive(self) -> bool:
        """True when probes or steps may grow."""
        return self.max_probes > self.probes or self.max_steps > self.steps

    def start(self, stored: dict[int, int]) -> tuple[int, int]:
        """``(n_v, m)`` to evaluate first, reusing stored work: the largest step count stored
        within the budget, and every leading stored probe of that count within the probe budget.
        """
        steps = max([self.steps] + [m for m in stored.values() if self.steps <= m <= self.max_steps])
        lead = 0
        while stored.get(lead) == steps:
            lead += 1
        return min(self.max_probes, max(self.probes, lead)), steps

    def more_steps(self, steps: int) -> int:
        """The next step count: doubled, within the budget."""
        return min(2 * steps, self.max_steps)

    def more_probes(self, probes: int, factor: float) -> int:
        """The next probe count: ``probes * factor`` (the growth a 1/sqrt(n_v) interval needs),
        at least one more and at most twice as many, rounded up to whole rounds of the groups.
        """
        want = probes * factor if np.isfinite(factor) else 2.0 * probes
        grown = max(probes + 1, min(2 * probes, int(np.ceil(want))))
        grown = -(-grown // self.groups) * self.groups
        return min(grown, self.max_probes)


def requested_estimates(spec: Any, cfg: dict[str, Any], eta: float) -> dict[str, Any]:
    """The estimates ``[spectrum] resolve`` names, in the primary convention, by label.

    Each carries its tolerance (``resolution_mass`` for the mass fractions, else
    ``resolution_abs``, and ``resolution_rel``; set on the :class:`Spectrum`).
    """
    conv, cutoff = cfg["convention"], cfg["cutoff"]
    out: dict[str, Any] = {}
    for name in cfg["resolve"]:
        if name == "trace":
            out["trace"] = spec.trace()
        elif name == "negative_mass":
            out[f"negative mass (delta {cfg['negative_delta']:g})"] = spec.negative_mass(cfg["negative_delta"])
        elif name == "dissipative_fraction":
            out[f"Delta+/Delta ({conv})"] = spec.dissipative_fraction(conv, eta, cutoff)
        elif name == "overlap_ii93":
            out[f"eq. II.93 ({conv})"] = spec.overlap_ii93(conv, eta)
        elif name == "error_proxy":
            for t in cfg["proxy_t"]:
                out[f"E({t}) ({conv})"] = spec.error_proxy(t, conv, eta, cutoff)
        elif name == "error_proxy_no_cutoff":
            for t in cfg["proxy_t"]:
                out[f"E({t}) no cutoff ({conv})"] = spec.error_proxy(t, conv, eta, 0.0)
    return out


@dataclass(frozen=True)
class Decision:
    """What adaptive stopping needs next, and why.

    ``grow``: ``steps`` or ``probes`` (what the estimate furthest from its tolerance asks
    for, :func:`hpcqml.hessian.spectrum.next_growth`), None when nothing can help;
    ``unresolved``: label -> reason of every estimate not resolved; ``steps``/``probes``:
    the labels that ask for that growth; ``factor``: the growth in probes the sampling-
    dominated ones ask for (their half-width over tolerance, squared).
    """

    grow: str | None
    unresolved: dict[str, str]
    steps: tuple[str, ...]
    probes: tuple[str, ...]
    factor: float

    @property
    def resolved(self) -> bool:
        """True when every requested estimate meets its tolerance."""
        return not self.unresolved


def decide(estimates: dict[str, Any]) -> Decision:
    """Read the estimates' resolution (combined interval against tolerance, and the reason
    when not resolved) into the next step of adaptive stopping.
    """
    from hpcqml.hessian.spectrum import GROW_PROBES, next_growth

    unresolved = {label: est.note or "unresolved" for label, est in estimates.items() if not est.resolved}
    probes = tuple(label for label in unresolved if unresolved[label].startswith("sampling"))
    steps = tuple(label for label in unresolved
                  if label not in probes and not unresolved[label].startswith("quadrature: not evaluated"))
    factor = 1.0
    for label in probes:
        est = estimates[label]
        ratio = est.half_width / est.tolerance if est.tolerance > 0 else float("inf")
        factor = max(factor, ratio ** 2 if np.isfinite(ratio) else float("inf"))
    grow = next_growth(list(estimates.values()))
    if grow is None and probes:
        grow = GROW_PROBES
    return Decision(grow=grow, unresolved=unresolved, steps=steps, probes=probes, factor=factor)


#: unit roundoff of the products at each effective precision: the rounding margin of the
#: quadrature brackets is scaled by it (TF32 keeps 10 mantissa bits, bfloat16 7)
UNIT_ROUNDOFF = {"fp64": 2.0 ** -53, "fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


def _read_spectrum(ctx: StageContext, label: str, nv: int, n: int, pseed: int, precision: str) -> Any:
    """The :class:`Spectrum` of the stored probes ``0..nv-1`` of ``label``, its rounding
    margin set by the effective ``precision`` of the products (:data:`UNIT_ROUNDOFF`).
    """
    from hpcqml.hessian.spectrum import Spectrum

    cfg = ctx.cfg
    results = [ctx.store.read(_read_probe(label, p)) for p in range(nv)]
    return Spectrum.from_results(results, n, bootstrap=cfg["bootstrap"], bootstrap_seed=pseed,
                                 resolution_mass=cfg["resolution_mass"], resolution_rel=cfg["resolution_rel"],
                                 resolution_abs=cfg["resolution_abs"],
                                 unit_roundoff=UNIT_ROUNDOFF.get(precision, UNIT_ROUNDOFF["fp32"]))


@dataclass
class Outcome:
    """How adaptive stopping ended for one model state."""

    spec: Any
    probes: int
    steps: int
    reason: str
    unresolved: dict[str, str]
    rounds: list[tuple[int, int, int]]


def stop_reason(decision: Decision, steps_left: bool, probes_left: bool) -> str:
    """Why adaptive stopping ended: ``resolved``, the budget that ran out, or ``no growth
    helps`` (only estimates without a proven bound are left).
    """
    if decision.resolved:
        return "resolved"
    if not decision.steps and not decision.probes:
        return "no growth helps"
    if decision.steps and not steps_left:
        return "step and probe budgets" if decision.probes and not probes_left else "step budget"
    return "probe budget"


def adapt(ctx: StageContext, label: str, st: Prepared, layout: Any, stop: Any, pseed: int,
          route: str, eta: float, precision: str = "fp32") -> tuple[Outcome, str]:
    """Grow Lanczos steps and probes until every requested estimate is resolved or the budget ends.

    Each round evaluates the stored probes ``0..n_v-1`` (all with ``m`` steps): while a
    quadrature bracket is too wide and the step budget allows, ``m`` doubles and every probe
    is extended to it (its recurrence is held in memory, :func:`plan_engine`; a probe not
    held, e.g. one stored by an earlier run, is restored from its Krylov basis on disk,
    :class:`hpcqml.stages._bases.Bases`, when every rank of its group has a file that
    matches the stored probe exactly, else rerun); else while a sampling interval is
    too wide and the probe budget allows, probes are added.  Finished probes are committed
    as they end (and their bases written to ``<workdir>/spectrum-bases`` when the step budget
    can grow, or always with ``keep_bases = "yes"``), so a killed run resumes where it stopped and a rerun
    with a larger budget starts from what is stored, extending the stored probes.
    The bases of a stage recomputed from scratch are deleted first.

    Returns:
        The outcome and the product route used.
    """
    from hpcqml.stages import _bases

    cfg = ctx.cfg
    budget = Budget.from_config(cfg, st.n, layout.count)
    if ctx.fresh or ctx.store.is_replacing("spectrum"):
        _bases.discard(ctx, label)
    bases = _bases.Bases(ctx, label, layout, pseed) if cfg["keep_bases"] != "no" else None
    # written where they can serve: a step budget that can grow, or asked for outright
    writer = bases if cfg["keep_bases"] == "yes" or budget.max_steps > budget.steps else None
    stored = _stored_probes(ctx, label)
    nv, m = budget.start(stored)
    rounds: list[tuple[int, int, int]] = []
    engine: Any = None
    width = 1
    while True:
        todo = [p for p in range(nv) if stored.get(p) != m]
        if todo:
            if engine is None:
                engine, width = plan_engine(ctx, label, st, layout, budget)
            # stored probes with fewer steps that the group owning them does not hold (the same
            # list on every rank: each group sees only its own probes' recurrences)
            rerun = [p for p in layout.owned(todo) if p in stored and stored[p] < m and not engine.holds(p)]
            if layout.count > 1:
                rerun = sorted({p for part in layout.world.allgather(rerun) for p in part})
            if rerun and bases is not None:
                found = {p: ctx.store.read(_read_probe(label, p)) for p in rerun}
                extended, refused = bases.offer(engine, found)
                if extended:
                    had = "/".join(str(k) for k in sorted({len(found[p].alpha) for p in extended}))
                    ctx.log(f"{label}: probes {extended} extended from {had} steps (Krylov bases read from "
                            f"{bases.dir})")
                rerun = [p for p in rerun if p not in extended]
                if rerun:
                    ctx.log(f"{label}: probes {rerun} stored with fewer steps are rerun with {m}: "
                            + "; ".join(f"probe {p}: {refused.get(p, 'not checked')}" for p in rerun))
            elif rerun:
                ctx.log(f"{label}: probes {rerun} stored with fewer steps are rerun with {m} (keep_bases = 'no': a "
                        "recurrence is kept in memory only within one run)")
            run_probe_list(ctx, label, st, layout, stop, pseed, route, todo, m, engine=engine, width=width,
                           bases=writer)
            stored.update({p: m for p in todo})
        spec = _read_spectrum(ctx, label, nv, st.n, pseed, precision)
        decision = decide(requested_estimates(spec, cfg, eta))
        if ctx.size > 1:
            decision = ctx.comm.bcast(decision, root=0)
        rounds.append((nv, m, len(decision.unresolved)))
        steps_left, probes_left = m < budget.max_steps, nv < budget.max_probes
        why = "; ".join(f"{k}: {v}" for k, v in decision.unresolved.items())
        # the growth the worst estimate asks for first; the other kind when its budget is spent
        if decision.steps and steps_left and (decision.grow == "steps" or not (decision.probes and probes_left)):
            m = budget.more_steps(m)
            ctx.log(f"{label}: {nv} probes x {rounds[-1][1]} steps: {why} -> {m} steps")
        elif decision.probes and probes_left:
            nv = budget.more_probes(nv, decision.factor)
            ctx.log(f"{label}: {rounds[-1][0]} probes x {m} steps: {why} -> {nv} probes")
        else:
            spec.stop_reason = stop_reason(decision, steps_left, probes_left)
            return Outcome(spec, nv, m, spec.stop_reason, decision.unresolved, rounds), route


def plan_engine(ctx: StageContext, label: str, st: Prepared, layout: Any, budget: Budget) -> tuple[Any, int]:
    """The Lanczos engine of one operator and its lockstep width, from the settings and memory.

    The bases held follow :func:`hpcqml.preflight.basis_plan`, the rule ``hpcqml validate``
    estimates with: the width is ``[spectrum] lockstep``, or with 0 as many probes as have
    Krylov bases of ``max_lanczos_steps`` vectors fitting in half the memory per rank
    (:func:`hpcqml.parallel.memory_per_rank`; at most
    :data:`hpcqml.parallel.MAX_AUTO_WIDTH`, and at most the probes of one group).
    A width chosen from memory is decided once per operator and results file
    (``spectrum/decisions/lockstep/LABEL``, ``/`` in the label written ``:``) and reused
    on every resume, so job segments on nodes with different memory advance the same
    blocks.  When the steps may grow, the engine keeps every probe's recurrence for
    extension if the bases of all ``max_probes`` probes of a group fit in that memory;
    otherwise a step growth reads each probe's basis back from disk (``keep_bases``; reruns
    the probes without it), and one line says so.  The
    reorthogonalisation's chunk width follows ``max_lanczos_steps``, so within a run an
    extended probe and a rerun one give the same numbers (a basis read from disk after
    ``max_lanczos_steps`` changed agrees to the rounding of the float64 sums once a rank's
    slice is wider than one chunk).  The basis-memory warning
    (:func:`check_sizes`) counts the bases held at once.
    """
    import torch

    from hpcqml.hessian.lockstep import LanczosEngine
    from hpcqml.parallel import MAX_AUTO_WIDTH
    from hpcqml.parallel import memory_per_rank
    from hpcqml.preflight import basis_plan

    cfg = ctx.cfg
    basis_device = "cpu" if cfg["basis_device"] == "cpu" else ctx.device()
    gsize = 1 if layout.comm is None else layout.comm.Get_size()
    itemsize = torch.empty((), dtype=st.dtype).element_size()
    available = memory_per_rank(ctx.comm, basis_device)[0]
    per_group = -(-budget.max_probes // layout.count)

    def plan(lockstep: int, probes: int) -> Any:
        return basis_plan(probes, budget.steps, budget.max_steps, st.n, gsize, itemsize, available,
                          lockstep=lockstep, reorth=cfg["reorth"], fraction=BASIS_MEMORY_FRACTION)

    lockstep = int(cfg["lockstep"])
    if lockstep == 0:
        # the memory's width for the largest block, whatever the probe count: capped by the
        # probes of a group below, so an extension with more probes sees the same choice;
        # one flat group per operator (a nested one would be deleted with its parent's commit)
        chosen = ctx.store.decide_once(f"spectrum/decisions/lockstep/{label.replace('/', ':')}",
                                       lambda: {"lockstep": plan(0, MAX_AUTO_WIDTH).width})
        lockstep = int(chosen["lockstep"])
    chosen_plan = plan(lockstep, per_group)
    if chosen_plan.keep_bytes and not chosen_plan.keep:
        how = ("reads each probe's Krylov basis back from disk (keep_bases)" if cfg["keep_bases"] != "no"
               else "reruns the probes")
        ctx.log(f"{label}: a step growth {how}: keeping the Krylov bases of {per_group} probes "
                f"in memory for extension would need {chosen_plan.keep_bytes / 2**30:.2f} GiB per rank")
    check_sizes(ctx, label, st.n, layout, st.dtype, basis_device, budget.max_steps, bool(st.block),
                bases=chosen_plan.bases)
    engine = LanczosEngine(st.n, layout.comm, reorth=cfg["reorth"], state_dtype=st.dtype, device=ctx.device(),
                           basis_device=basis_device, label=label, perf=ctx.perf, keep=chosen_plan.keep,
                           chunk_steps=budget.max_steps)
    return engine, chosen_plan.width


def train_eta(ctx: StageContext) -> tuple[float, str]:
    """The eta of a = -eta*lambda and where it came from: ``[spectrum] eta`` if set, else ``[train] lr``."""
    if ctx.cfg["eta"] > 0:
        return float(ctx.cfg["eta"]), "[spectrum] eta"
    return float(ctx.section("train")["lr"]), "[train] lr"


def _write_estimate(group: Any, name: str, est: Any, units: str, description: str,
                    attrs: dict[str, Any] | None = None) -> None:
    """One estimate: ``[value, stderr, ci_low, ci_high]`` with its resolution and reason,
    the per-probe values, the proven quadrature bracket (pooled and per probe) and the
    combined interval (docs/schema/spectrum.md); ``attrs``: more attributes of the main
    dataset (e.g. the threshold ``delta`` the estimate is defined with).
    """
    from hpcqml.store import write_dataset

    f8 = np.float64
    d = write_dataset(group, name, np.array([est.value, est.stderr, est.ci_low, est.ci_high], dtype=f8),
                      units, description)
    d.attrs.update({"columns": "value, stderr, ci_low, ci_high", "resolved": bool(est.resolved),
                    "note": est.note, "tolerance": float(est.tolerance), "ambiguous_mass": float(est.ambiguous_mass),
                    "threshold": float("nan") if est.threshold is None else float(est.threshold),
                    "threshold_mass": float(est.threshold_mass), "threshold_share": float(est.threshold_share),
                    "uncertainty": "standard error over probes (jackknife for ratios); ci: Student t sampling "
                                   "interval over probes (NaN below 2 probes)", **(attrs or {})})
    write_dataset(group, f"{name}_per_probe", np.asarray(est.per_probe, dtype=f8), units,
                  f"{description}: the Gauss value from each probe alone")
    write_dataset(group, f"{name}_resolution", np.array([est.res_low, est.res_high], dtype=f8), units,
                  f"{description}: [low, high], proven quadrature bracket of the probe-exact pooled value "
                  "(NaN: not evaluated)")
    write_dataset(group, f"{name}_combined", np.array([est.low, est.high], dtype=f8), units,
                  f"{description}: [low, high], the quadrature bracket widened by the sampling half-width; "
                  "resolved when its half-width is at most the tolerance")
    if est.per_probe_low:
        write_dataset(group, f"{name}_per_probe_bounds",
                      np.stack([np.asarray(est.per_probe_low, dtype=f8), np.asarray(est.per_probe_high, dtype=f8)],
                               axis=1), units,
                      f"{description}: per probe [low, high], proven bracket of the probe's exact value")


def write_convention(g: Any, spec: Any, convention: str, eta: float, cfg: dict[str, Any]) -> None:
    """Proxy curves (grid and nodes) and the dissipation estimates of one mode convention."""
    from hpcqml.hessian.proxy import dissipation
    from hpcqml.store import write_dataset

    k = dict(convention=convention, eta=eta, cutoff=cfg["cutoff"])
    wf, pts = cfg["width_factor"], cfg["grid_points"]
    t = np.arange(cfg["t_max"] + 1, dtype=np.float64)
    log_nodes, log_se = spec.log_error_proxy(t, **k)
    log_grid = spec.log_error_proxy_grid(t, width_factor=wf, points=pts, **k)
    eq = "eq. III.12/III.13"
    with np.errstate(over="ignore"):
        write_dataset(g, "nodes", np.exp(log_nodes), "1", f"error proxy E(t) from the Ritz nodes and weights ({eq})")
        write_dataset(g, "grid", np.exp(log_grid), "1", f"error proxy E(t) from the smoothed density grid ({eq})")
    write_dataset(g, "log_nodes", log_nodes, "1", f"natural log of E(t) from the nodes ({eq})")
    write_dataset(g, "log_grid", log_grid, "1", f"natural log of E(t) from the density grid ({eq})")
    write_dataset(g, "log_nodes_stderr", log_se, "1",
                  "jackknife standard error over probes of log E(t) from the nodes (NaN below 3 probes)")
    est = g.create_group("estimates")
    for tt in cfg["proxy_t"]:
        _write_estimate(est, f"error_proxy_t{tt}", spec.error_proxy(tt, **k), "1", f"error proxy E({tt}) ({eq})")
        _write_estimate(est, f"error_proxy_no_cutoff_t{tt}", spec.error_proxy(tt, convention, eta, 0.0), "1",
                        f"error proxy E({tt}) without the cutoff (eq. III.11, not renormalised)")
    frac = "Delta_+/Delta among modes with |lambda| >= cutoff (eq. II.28)"
    _write_estimate(est, "dissipative_fraction_nodes", spec.dissipative_fraction(**k), "1", f"{frac}, Ritz nodes")
    for tag, f in (("grid", 1.0), ("grid_half_width", 0.5), ("grid_double_width", 2.0)):
        _write_estimate(est, f"dissipative_fraction_{tag}",
                        spec.dissipative_fraction(source="grid", width_factor=f * wf, points=pts, **k), "1",
                        f"{frac}, density grid with {f:g} x the kernel width")
    _write_estimate(est, "overlap_ii93", spec.overlap_ii93(convention, eta), "1",
                    "eq. II.93 fidelity estimate Delta_+/Delta over all modes (no cutoff), Ritz nodes")
    x, w = spec.pooled()
    dis = dissipation(x, w, cutoff=cfg["cutoff"], convention=convention, eta=eta)
    g.attrs.update({"convention": convention, "eta": eta, "cutoff": cfg["cutoff"], "cutoff_applies_to": "|lambda|",
                    "a_definition": "a = -lambda" if convention == "paper" else f"a = -eta*lambda, eta = {eta:g}",
                    "r_plus": dis.r_plus, "r_minus": dis.r_minus, "a_plus": dis.a_plus,
                    "time_limit": dis.time_limit})


def result_writer(spec: Any, cfg: dict[str, Any], eta: float,
                  rounds: list[tuple[int, int, int]] | None = None) -> Callable[[Any], None]:
    """The writer of ``spectrum/LABEL/result`` (layout in docs/schema/spectrum.md); ``rounds``:
    ``(probes, steps, unresolved estimates)`` of each round of adaptive stopping.
    """
    from hpcqml.store import write_dataset

    def write(g: Any) -> None:
        spec.to_hdf5(g, units="nat")
        if rounds:
            write_dataset(g, "adaptive_rounds", np.asarray(rounds, dtype=np.int64).reshape(-1, 3), "count",
                          "rounds of adaptive stopping: probes n_v, Lanczos steps m, requested estimates "
                          "not yet resolved (the last row is the stored result)")
        dens = spec.density(cfg["grid_points"], cfg["width_factor"])
        d = g.create_group("density")
        write_dataset(d, "grid", dens.grid, "nat", "eigenvalue grid of the smoothed density")
        write_dataset(d, "rho", dens.rho, "1/nat", "Gaussian-kernel spectral density, integrates to 1")
        d.attrs.update({"sigma": dens.sigma, "width_factor": dens.width_factor, "min_width": dens.min_width,
                        "width_rule": dens.rule, "kernel": "gaussian"})
        est = g.create_group("estimates")
        _write_estimate(est, "trace", spec.trace(), "nat", "Hutchinson trace of H (mean of z^T H z)")
        delta = float(cfg["negative_delta"])
        _write_estimate(est, "negative_mass", spec.negative_mass(delta), "1",
                        f"mass of eigenvalues below -delta (delta = {delta:g}); SLQ value, proven bracket in "
                        "_resolution", attrs={"delta": delta})
        p = g.create_group("proxy")
        write_dataset(p, "t", np.arange(cfg["t_max"] + 1, dtype=np.float64), "count", "iteration t")
        p.attrs["primary"] = cfg["convention"]
        for convention in ("eta", "paper"):
            write_convention(p.create_group(convention), spec, convention, eta, cfg)
    return write


def measure_state(ctx: StageContext, label: str, path: Path, layout: Any, data: Any, route: str,
                  stop: Any, expected_products: int | None = None) -> str:
    """Run (or resume, or extend) SLQ for every curvature operator of one model state and
    commit their probes and results (each under :func:`operator_label`).  ``expected_products``:
    the products the run will take at least (for the ``auto`` route decision).

    Returns:
        The Hessian product route (decided here once per results file when ``route`` is ``auto``).
    """
    cfg = ctx.cfg
    ops = prepare_state(ctx, path, layout, data, route)
    eta, eta_source = train_eta(ctx)
    with matmul_precision(cfg["precision"], ctx.device(), next(iter(ops.values())).dtype) as precision:
        route = run_decisions(ctx, ops, precision, expected_products)
        for name, st in ops.items():
            sub = operator_label(label, name)
            if not _up_to_date(ctx, sub):
                measure_operator(ctx, sub, path, st, layout, stop, route, (eta, eta_source), precision)
    return route


def measure_operator(ctx: StageContext, label: str, path: Path, st: Prepared, layout: Any, stop: Any,
                     route: str, eta_and_source: tuple[float, str], precision: str) -> None:
    """Run (or resume, or extend) SLQ for one operator and commit its probes, eigenpairs and result."""
    cfg = ctx.cfg
    pseed = _probe_seed(int(ctx.run_cfg["seed"]), st.ck.step)
    eta, eta_source = eta_and_source
    route = route if st.hessian is not None else "none"
    out, route = adapt(ctx, label, st, layout, stop, pseed, route, eta, precision)
    if cfg["top_k"] and not ctx.store.is_complete(f"spectrum/{label}/eigenpairs"):
        measure_eigenpairs(ctx, label, st, layout, pseed)
    spec = out.spec
    used = ctx.store.read(lambda fh: [str(fh[f"spectrum/{label}/probe_{p:03d}"].attrs.get("route", route))
                                      for p in range(out.probes)])
    (lmin, rmin), (lmax, rmax) = spec.extremes()
    trace = spec.trace()
    budget = Budget.from_config(cfg, st.n, layout.count)
    attrs = {"n": st.n, "model_name": st.ck.model_name, "model_step": st.ck.step, "checkpoint": str(path),
             "curvature": st.kind, "block": st.block, "batchnorm": cfg["batchnorm"],
             "wrt": cfg["wrt"], "batch_size": cfg["batch_size"], "micro_batch": cfg["micro_batch"],
             "route": ",".join(sorted(set(used))), "route_setting": cfg["route"],
             "precision": precision, "precision_setting": cfg["precision"],
             "lanczos_steps": out.steps, "probes": out.probes, "reorth": cfg["reorth"],
             "lanczos_steps_setting": cfg["lanczos_steps"], "probes_setting": cfg["probes"],
             "max_lanczos_steps": budget.max_steps, "max_probes": budget.max_probes,
             "adaptive": budget.adaptive, "stop_reason": out.reason, "resolve": ",".join(cfg["resolve"]),
             "unresolved": "; ".join(f"{k}: {v}" for k, v in out.unresolved.items()),
             "extendable": _extendable_record(ctx),
             "state_dtype": str(st.dtype).replace("torch.", ""), "memory_format": str(st.fmt).replace("torch.", ""),
             "probe_seed": pseed, "eta": eta, "eta_source": eta_source, "primary_convention": cfg["convention"],
             "trace": trace.value, "trace_se": trace.stderr, "lambda_min": lmin, "lambda_min_residual": rmin,
             "lambda_max": lmax, "lambda_max_residual": rmax, "groups": layout.count, "ranks": ctx.size}
    ctx.store.commit(f"spectrum/{label}/result", result_writer(spec, cfg, eta, out.rounds), attrs=attrs)
    frac = spec.dissipative_fraction(cfg["convention"], eta, cfg["cutoff"])
    ctx.log(f"{label}: {out.probes} probes x {out.steps} steps, stopped: {out.reason}; lambda in "
            f"[{lmin:.4g}, {lmax:.4g}], trace {trace.text()}, Delta+/Delta ({cfg['convention']}) "
            f"{frac.text('{:.3f}')}" + (f"; unresolved: {attrs['unresolved']}" if out.unresolved else ""))


#: values per HDF5 chunk of a stored eigenvector row
VECTOR_CHUNK = 1 << 20


def measure_eigenpairs(ctx: StageContext, label: str, st: Prepared, layout: Any, seed: int) -> None:
    """The ``top_k`` extreme eigenpairs of ``label``'s Hessian, committed to ``spectrum/LABEL/eigenpairs``.

    Every probe group computes them on its own ranks (the same start vector, so the same
    pairs); group 0's slices are gathered on world rank 0, which writes them.
    """
    import torch

    from hpcqml.hessian.eigenpairs import top_eigenpairs

    cfg = ctx.cfg
    k = min(cfg["top_k"], st.n)
    bar = _CountProgress(ctx, f"{label} top {k} eigenpairs ({cfg['top_which']})", "product")
    try:
        pairs = top_eigenpairs(st.op, k, cfg["top_which"], comm=layout.comm, seed=seed, on_progress=bar)
    finally:
        bar.close()
    slices = [(pairs.lo, pairs.hi)]
    vectors = None
    if cfg["eigenvectors"]:
        local = pairs.vectors.detach().cpu().to(torch.float64).numpy()
        gcomm = layout.comm
        parts = [(pairs.lo, local)] if gcomm is None or gcomm.Get_size() == 1 else gcomm.gather((pairs.lo, local))
        if parts is not None and layout.index == 0:
            slices = [(lo, lo + part.shape[1]) for lo, part in parts]
            vectors = parts
    ctx.store.commit(f"spectrum/{label}/eigenpairs", _eigenpairs_writer(pairs, vectors),
                     attrs={"which": pairs.which, "k": pairs.k, "tol": pairs.tol, "norm_estimate": pairs.scale,
                            "restarts": pairs.restarts, "products": pairs.products,
                            "vector_slices": np.asarray(slices, dtype=np.int64).reshape(-1, 2)})
    ctx.log(f"{label}: top {pairs.k} eigenvalues ({pairs.which}) "
            + ", ".join(f"{v:.4g} ± {r:.1g}" for v, r in zip(pairs.values, pairs.residuals, strict=True))
            + f" ({pairs.products} products)")


def _eigenpairs_writer(pairs: Any, vectors: list[tuple[int, np.ndarray]] | None) -> Callable[[Any], None]:
    """Writer of ``spectrum/LABEL/eigenpairs``: values, residuals and (optionally) the
    vectors, written slice by slice into a row-chunked dataset.
    """
    from hpcqml.store import write_dataset

    def write(g: Any) -> None:
        write_dataset(g, "values", np.asarray(pairs.values, dtype=np.float64), "nat",
                      "eigenvalues (Rayleigh quotients u^T H u from a fresh product), ascending")
        write_dataset(g, "residuals", np.asarray(pairs.residuals, dtype=np.float64), "nat",
                      "explicit residuals ||H u - value u||: an eigenvalue of H lies within value +- residual")
        if vectors is None:
            return
        chunk = (1, int(min(pairs.n, VECTOR_CHUNK)))
        d = g.create_dataset("vectors", shape=(pairs.k, pairs.n), dtype=np.float64, chunks=chunk)
        for lo, part in vectors:
            d[:, lo:lo + part.shape[1]] = part
        d.attrs.update({"units": "1", "description": "unit eigenvectors (rows, in the order of values) over the "
                                                     "measured parameters, written by rank slices"})
    return write


class _CountProgress:
    """A progress bar on world rank 0 for ``(done, total)`` callbacks (rate and ETA)."""

    def __init__(self, ctx: StageContext, desc: str, unit: str) -> None:
        self.show = ctx.rank == 0 and not ctx.quiet
        self.desc, self.unit = desc, unit
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        """Advance the bar to ``done`` of ``total``."""
        if not self.show:
            return
        if self.bar is None:
            from tqdm import tqdm

            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr,
                            mininterval=0.5 if interactive else 10.0, dynamic_ncols=interactive, leave=True)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Close the bar, if any."""
        if self.bar is not None:
            self.bar.close()
        self.bar = None


def _extendable_record(ctx: StageContext) -> str:
    """The extendable ``[spectrum]`` settings a result was made with (canonical JSON)."""
    import json

    return json.dumps(ctx.config.extendable_keys("spectrum", SCHEMA), sort_keys=True)


def _up_to_date(ctx: StageContext, label: str) -> bool:
    """True when ``label``'s result is complete and was made with the current extendable settings."""
    if ctx.store.is_replacing("spectrum"):
        return False

    def body(fh: Any) -> bool:
        key = f"spectrum/{label}/result"
        if key not in fh or not fh[key].attrs.get("complete", False):
            return False
        made = fh[key].attrs.get("extendable")
        made = made.decode() if isinstance(made, bytes) else made
        return made == _extendable_record(ctx)
    return bool(ctx.store.read(body, default=False))


def run(ctx: StageContext) -> None:
    """Measure every model state not yet complete (collective over ``ctx.comm``)."""
    from hpcqml.data.cifar import load_cifar100
    from hpcqml.hessian.slq import probe_groups
    from hpcqml.training.signals import StopFlag, StoppedBySignal, stop_message

    states, missing = _states(ctx)
    _check_origins(ctx, states)
    layout = probe_groups(ctx.comm, ctx.cfg["groups"])
    route = ctx.cfg["route"]
    data = None
    todo = [label for label, _ in states if not _state_done(ctx, label)]
    expected = len(todo) * len(ctx.cfg["curvature"]) * ctx.cfg["probes"] * ctx.cfg["lanczos_steps"]
    with StopFlag() as stop:
        for i, (label, path) in enumerate(states):
            if label in todo:
                if data is None:
                    data = load_cifar100(_data_root(ctx))
                route = measure_state(ctx, label, path, layout, data, route, stop, expected)
            if i + 1 < len(states) and stop.requested(ctx.comm):
                raise StoppedBySignal(stop_message(
                    stop.signum, f"spectrum after {i + 1} of {len(states)} model states",
                    f"results of {[lab for lab, _ in states[:i + 1]]} in {ctx.store.path}", None))
    if missing:
        # every present state is committed; the stage fails instead of reporting a hole as complete
        raise UserError(_missing_message(missing, len(states)))
    ctx.log(f"{len(states)} model state(s) measured")


def check_data_present(ctx: StageContext) -> None:
    """Pre-run check: the data set the Hessian batch is drawn from is where the stage will
    read it (a purged work-directory data set is named, not found half-way).
    """
    from hpcqml.data.cifar import resolve_dir

    if not ctx.cfg["data_root"] and "data" in ctx.pending:
        return  # the data stage runs first in this invocation: checked again after it
    try:
        resolve_dir(_data_root(ctx))
    except UserError as exc:
        raise UserError(f"[spectrum] data set missing: {exc}") from None


register(Stage(name="spectrum", schema=SCHEMA, run=run, order=50, reads=spectrum_reads, estimate=estimate_spectrum,
               doc="Hessian spectral densities by distributed SLQ and the error proxy (eq. III.10-III.13)",
               checks=(check_curvature, check_data_present)))
