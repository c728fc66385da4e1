"""Stage ``train``: the paper's sparse-training protocol (Sec. III B, Fig. 2).

Starts from ``<workdir>/pruned.pt``; plain SGD (lr 0.01) on B = 2048 freshly drawn samples
per step; pruned weights may regrow; every ``download_every`` steps a "download" re-prunes
to the top ``keep_fraction``; the first ``classical_steps`` steps after each download are
classical, the rest quantum-eligible (:mod:`hpcqml.training.loop`).

Files: model snapshots ``<workdir>/snapshots/step_XXXXXX.pt`` (for the spectrum stage),
the resume state ``<workdir>/train_state.pt`` (every ``checkpoint_every`` steps and on
SIGTERM/SIGUSR1) and ``<workdir>/trained.pt``, each recording the fingerprint of the
stage inputs and the results file of its run (:mod:`hpcqml.training.origin`).  HDF5:
group ``train`` (per-step log), ``train_log`` (the log so far, at each checkpoint).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.models import count_parameters
from hpcqml.parallel import decide_on_root
from hpcqml.stages import Stage, StageContext, fixed_reads, register
from hpcqml.stages._estimates import check_cifar_root, training_images
from hpcqml.stages.data import check_batch_size, load_dataset
from hpcqml.training.log import TrainingLog
from hpcqml.training.origin import (
    begin,
    check_input,
    clear_stale,
    load_resume_state,
    model_source,
    stamp,
)
from hpcqml.training.progress import StepMeter
from hpcqml.training.pruning import SCOPES
from hpcqml.training.signals import StopFlag, interrupted_error

if TYPE_CHECKING:
    import torch

    from hpcqml.config import RunConfig
    from hpcqml.preflight import Preflight
    from hpcqml.training.loop import Dataset
    import h5py

    from hpcqml.training.loop import SparseSettings

SCHEMA = {
    "steps": Field(int, 200, min=0, doc="SGD steps T"),
    "batch_size": Field(int, 2048, min=1,
                        doc="samples per step B (paper: 2048), split over ranks; at most the training set"),
    "lr": Field(float, 0.01, min=0.0, doc="learning rate (paper: 0.01), plain SGD"),
    "keep_fraction": Field(float, 0.0, min=0.0, max=1.0,
                           doc="fraction kept at each download; 0 = [prune] keep_fraction"),
    "scope": Field(str, "", choices=("",) + SCOPES, doc="prunable set; empty = [prune] scope"),
    "download_every": Field(int, 100, min=1, doc="re-prune ('download') after every this many steps"),
    "classical_steps": Field(int, 10, min=0, doc="steps after each download that are classical"),
    "test_interval": Field(int, 10, min=0, doc="test accuracy every this many steps (0 = never)"),
    "checkpoint_every": Field(int, 50, min=1, affects_results=False, doc="steps between resume checkpoints"),
    "snapshot_every": Field(int, 10, min=0, doc="model snapshot every this many steps (0 = none)"),
    "snapshot_steps": Field(list, [], item=int, min=0, doc="extra steps to snapshot (at most steps)"),
    "model_file": Field(str, "", doc="starting model; empty = <workdir>/pruned.pt"),
}

STATE = "train_state.pt"
OUTPUT = "trained.pt"
#: a progress line every this many steps (and at least once a minute)
LOG_EVERY = 10

def snapshot_path(workdir: Path, step: int) -> Path:
    """Where the model state after step ``step`` is kept."""
    return workdir / "snapshots" / f"step_{step:06d}.pt"


def existing_snapshots(workdir: Path) -> list[Path]:
    """The snapshot files in ``workdir``, by step."""
    return sorted((workdir / "snapshots").glob("step_*.pt"))


def settings(ctx: StageContext) -> SparseSettings:
    """The training settings of ``[train]`` (falling back to ``[prune]``) and the run seed."""
    from hpcqml.training.loop import SparseSettings

    c, prune_cfg = ctx.cfg, ctx.section("prune")
    return SparseSettings(steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"],
                          keep_fraction=c["keep_fraction"] or prune_cfg["keep_fraction"],
                          download_every=c["download_every"], classical_steps=c["classical_steps"],
                          test_interval=c["test_interval"], scope=c["scope"] or prune_cfg["scope"],
                          seed=ctx.run_cfg["seed"])


def check_sizes(cfg: dict[str, Any], n_train: int, ranks: int) -> None:
    """Refuse sizes the data set, the ranks or the step count cannot honour (one-line
    UserError); ``hpcqml validate`` runs the same check.
    """
    check_batch_size("train", cfg["batch_size"], n_train, ranks)
    steps = cfg["steps"]
    beyond = sorted(t for t in cfg["snapshot_steps"] if t > steps)
    if beyond:
        raise UserError(f"[train] snapshot_steps has step {beyond[0]}, beyond steps = {steps}: "
                        f"no such snapshot would be written")


def history_writer(hist: Mapping[str, Sequence[Any]], snap: set[int], done: int) -> Callable[[h5py.Group], None]:
    """A store writer for the per-step training log after ``done`` steps (:meth:`TrainingLog.to_group`)."""
    return TrainingLog.from_history(hist, snap, done).to_group


@dataclass
class Training:
    """The model being trained, its masks, the snapshot steps and where it stands."""

    model: torch.nn.Module
    name: str
    classes: int
    masks: dict[str, torch.Tensor] | None
    source: Path
    snap: set[int] = field(default_factory=set)
    start: int = 0
    history: dict = field(default_factory=dict)


def start_training(ctx: StageContext, src: Path, own: bool, s: SparseSettings, classes: int,
                   device: torch.device) -> Training:
    """The starting model (refused if another run made it), resumed from this run's state."""
    from hpcqml.training.checkpoint import load_checkpoint
    from hpcqml.training.loop import broadcast_model_, empty_history

    ck = load_checkpoint(src, device)
    if own:
        check_input(ctx, src, "prune", ck.fingerprint, ck.results)
    if ck.num_classes != classes:
        raise UserError(f"train: model {src} has {ck.num_classes} classes, the data {classes}")
    tr = Training(ck.model, ck.model_name, ck.num_classes, ck.mask, src, history=empty_history())
    state_path = ctx.workdir / STATE
    st = load_resume_state(ctx, state_path, device)
    if st is not None and (st.model_name != tr.name or st.meta.get("source") != str(src)):
        ctx.log(f"{state_path} continues {st.meta.get('source')} ({st.model_name}), not {src}: "
                f"not resumed, starting over")
        st = None
    if st is not None:
        tr.model.load_state_dict(st.model.state_dict())
        tr.masks, tr.start, tr.history = st.mask, st.step, st.meta["history"]
        ctx.log(f"resuming from {state_path} at step {tr.start}")
    broadcast_model_(tr.model, ctx.comm)
    tr.snap = set(ctx.cfg["snapshot_steps"])
    if ctx.cfg["snapshot_every"]:
        tr.snap |= set(range(0, s.steps + 1, ctx.cfg["snapshot_every"]))
    return tr


class Saver:
    """The train stage's files: resume state (with the log so far) and model snapshots."""

    def __init__(self, ctx: StageContext, tr: Training, s: SparseSettings) -> None:
        self.ctx, self.tr, self.s = ctx, tr, s
        self.state_path = ctx.workdir / STATE

    def state(self, t: int, h: dict) -> None:
        """Checkpoint (collective): the resume state, and the per-step log so far in HDF5."""
        from hpcqml.training.checkpoint import save_checkpoint

        ctx, tr = self.ctx, self.tr
        if ctx.rank == 0:
            save_checkpoint(self.state_path, tr.name, tr.classes, tr.model, mask=tr.masks, step=t,
                            meta={"history": h, "source": str(tr.source)}, **stamp(ctx))
        ctx.store.commit("train_log", history_writer(h, tr.snap, t),
                         attrs={"steps_done": t, "fingerprint": ctx.fingerprint})

    def snapshot(self, t: int) -> None:
        """The model after step ``t`` when ``t`` is a snapshot step (rank 0 writes)."""
        from hpcqml.training.checkpoint import save_checkpoint

        ctx, tr = self.ctx, self.tr
        if t in tr.snap and ctx.rank == 0:
            save_checkpoint(snapshot_path(ctx.workdir, t), tr.name, tr.classes, tr.model, mask=tr.masks,
                            step=t, meta={"stage": "train",
                                          "download": bool(t and t % self.s.download_every == 0)},
                            **stamp(ctx))


def train_steps(ctx: StageContext, tr: Training, data: Dataset, s: SparseSettings,
                device: torch.device) -> tuple[int, dict]:
    """Run the remaining steps with snapshots and checkpoints; a stop signal saves and raises."""
    from hpcqml.training.loop import sparse_train

    save = Saver(ctx, tr, s)
    ctx.log(f"{tr.name}: {count_parameters(tr.model):,} parameters, {s.steps} steps of B = {s.batch_size} "
            f"on {ctx.size} rank(s), {device}")
    meter = StepMeter(s.steps, tr.start, every=LOG_EVERY)

    def after_step(t: int, h: dict, new_masks: dict[str, torch.Tensor] | None) -> None:
        if new_masks is not None:
            tr.masks = new_masks
        ctx.perf.count("train_steps", 1)
        ctx.perf.count("samples", s.batch_size)
        save.snapshot(t)
        if t % ctx.cfg["checkpoint_every"] == 0:
            save.state(t, h)
        if meter.due(t):
            ctx.log(f"{meter.line(t)}: loss {h['loss'][-1]:.4f}, batch accuracy {h['batch_accuracy'][-1]:.3f}, "
                    f"sparsity {h['sparsity'][-1]:.3f}")

    if tr.start == 0:
        stale = decide_on_root(ctx.comm, lambda: clear_stale(ctx, existing_snapshots(ctx.workdir)))
        if stale:
            ctx.log(f"deleted {len(stale)} snapshot(s) this run made with other settings")
        save.snapshot(0)
    with StopFlag() as flag:
        done, hist = sparse_train(tr.model, ctx.comm, data, s, device, tr.start, tr.history, after_step,
                                  lambda: flag.requested(ctx.comm), ctx.perf)
        if done < s.steps:
            save.state(done, hist)
            ctx.comm.Barrier()
            raise interrupted_error(flag.signum, done, save.state_path, total=s.steps, stage="train")
    return done, hist


def finish(ctx: StageContext, tr: Training, s: SparseSettings, device: torch.device, done: int, hist: dict) -> None:
    """Write ``trained.pt`` and commit the ``train`` group."""
    from hpcqml.training.checkpoint import save_checkpoint

    if ctx.rank == 0:
        save_checkpoint(ctx.workdir / OUTPUT, tr.name, tr.classes, tr.model, mask=tr.masks, step=done,
                        meta={"stage": "train"}, **stamp(ctx))
    ctx.comm.Barrier()
    if ctx.store.read(lambda fh: "train_log" in fh, default=False):  # an interrupted run's log: brought up to date
        ctx.store.commit("train_log", history_writer(hist, tr.snap, done),
                         attrs={"steps_done": done, "fingerprint": ctx.fingerprint})
    ctx.store.commit("train", history_writer(hist, tr.snap, done), attrs={
        "model": tr.name, "num_parameters": count_parameters(tr.model), "steps": done,
        "batch_size": s.batch_size, "lr": s.lr, "keep_fraction": s.keep_fraction, "scope": s.scope,
        "download_every": s.download_every, "classical_steps": s.classical_steps,
        "test_interval": s.test_interval, "ranks": ctx.size, "snapshot_dir": str(ctx.workdir / "snapshots"),
        "source": str(tr.source), "device": str(device), "fingerprint": ctx.fingerprint})
    ctx.log(f"done: {done} steps, final batch accuracy "
            f"{hist['batch_accuracy'][-1] if hist['batch_accuracy'] else float('nan'):.4f}")


def run(ctx: StageContext) -> None:
    """Sparse training from the pruned model (or resume), then the model and the HDF5 group."""
    src, own = model_source(ctx, "pruned.pt")
    if not begin(ctx, ctx.workdir / OUTPUT, ctx.workdir / STATE, src,
                 "run the prune stage or set [train] model_file"):
        return
    data = load_dataset(ctx)
    s = settings(ctx)
    check_sizes(ctx.cfg, len(data.train_y), ctx.size)
    device = ctx.device()
    tr = start_training(ctx, src, own, s, data.num_classes, device)
    done, hist = train_steps(ctx, tr, data, s, device)
    finish(ctx, tr, s, device, done, hist)


def estimate(cfg: RunConfig, ranks: int, _memory_per_rank: float, found: Preflight) -> None:
    """``hpcqml validate``: the CIFAR-100 files and a batch size the data and the ranks fill."""
    check_cifar_root(cfg, found)
    try:
        check_sizes(cfg.sections["train"], training_images(cfg.sections["data"]), ranks)
    except UserError as exc:
        found.errors.append(str(exc))


register(Stage(name="train", schema=SCHEMA, run=run, order=40, reads=fixed_reads("prune", "data"),
               estimate=estimate,
               doc="sparse training with periodic re-pruning downloads (Sec. III B, Fig. 2)"))
