"""Stage ``pretrain``: dense pre-training of a CIFAR ResNet (paper Sec. III B: "we first
train a dense ResNet"), classical SGD with momentum, data parallel over the ranks.

Writes ``<workdir>/pretrained.pt`` (model) and the HDF5 group ``pretrain``.  The state is
checkpointed to ``<workdir>/pretrain_state.pt`` every ``checkpoint_every`` steps and on
SIGTERM/SIGUSR1; running the stage again continues from there.  Both files record the
fingerprint of the stage inputs and the results file of their run
(:mod:`hpcqml.training.origin`): another run's state is refused, never resumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.models import count_parameters
from hpcqml.stages import Stage, StageContext, fixed_reads, register
from hpcqml.stages._estimates import check_cifar_root, check_model_name, training_images
from hpcqml.stages.data import check_batch_size, load_dataset
from hpcqml.store import write_dataset
from hpcqml.training.origin import begin, load_resume_state, stamp
from hpcqml.training.progress import StepMeter
from hpcqml.training.signals import StopFlag, interrupted_error

if TYPE_CHECKING:
    import h5py
    import torch

    from hpcqml.config import RunConfig
    from hpcqml.preflight import Preflight
    from hpcqml.training.loop import Dataset
    from hpcqml.training.loop import PretrainSettings

SCHEMA = {
    "model": Field(str, "resnet32-w4", doc="model name, resnet<6n+2>-w<k>"),
    "epochs": Field(int, 1, min=0, doc="training epochs (0 = keep the seeded initialisation)"),
    "batch_size": Field(int, 128, min=1, doc="global batch size B (split over ranks; at most the training set)"),
    "lr": Field(float, 0.1, min=0.0, doc="peak learning rate"),
    "momentum": Field(float, 0.9, min=0.0, max=1.0, doc="SGD momentum"),
    "weight_decay": Field(float, 5e-4, min=0.0, doc="L2 weight decay"),
    "schedule": Field(str, "cosine", choices=("cosine", "step", "constant"),
                      doc="learning-rate schedule (step: /10 at 50% and 75%)"),
    "augment": Field(bool, True, doc="random crop (pad 4) and horizontal flip"),
    "checkpoint_every": Field(int, 200, min=1, affects_results=False, doc="steps between resume checkpoints"),
}

STATE = "pretrain_state.pt"
OUTPUT = "pretrained.pt"
#: a progress line every this many steps (and at least once a minute)
LOG_EVERY = 50


def settings(ctx: StageContext) -> PretrainSettings:
    """The training settings of ``[pretrain]`` (and the run seed)."""
    from hpcqml.training.loop import PretrainSettings

    c = ctx.cfg
    return PretrainSettings(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"],
                            momentum=c["momentum"], weight_decay=c["weight_decay"],
                            schedule=c["schedule"], augment=c["augment"], seed=ctx.run_cfg["seed"])


def check_sizes(cfg: dict[str, Any], n_train: int, ranks: int) -> None:
    """Refuse a batch size the data set or the ranks cannot fill (one-line UserError);
    ``hpcqml validate`` runs the same check.
    """
    check_batch_size("pretrain", cfg["batch_size"], n_train, ranks)


def history_writer(hist: dict) -> Callable[[h5py.Group], None]:
    """A store writer for the per-step pre-training log."""
    def write(g: h5py.Group) -> None:
        write_dataset(g, "step", np.asarray(hist["step"], dtype=np.int64), "count",
                      "update number t (1-based) of each logged step")
        write_dataset(g, "loss", np.asarray(hist["loss"], dtype=np.float64), "nat",
                      "mean cross-entropy over the global batch before update t")
        write_dataset(g, "accuracy", np.asarray(hist["accuracy"], dtype=np.float64), "1",
                      "fraction of the global batch classified correctly before update t")
        write_dataset(g, "lr", np.asarray(hist["lr"], dtype=np.float64), "1",
                      "learning rate of update t (schedule of [pretrain] schedule)")
    return write


@dataclass
class Training:
    """The model being pre-trained, its optimizer and where it stands."""

    model: Any
    optimizer: Any
    classes: int
    start: int = 0
    history: dict | None = None


def start_training(ctx: StageContext, s: PretrainSettings, classes: int, device: torch.device) -> Training:
    """The seeded model and optimizer, resumed from this run's state file when there is one."""
    import torch

    from hpcqml.models import build
    from hpcqml.training.loop import broadcast_model_, make_pretrain_optimizer

    state_path = ctx.workdir / STATE
    torch.manual_seed(ctx.run_cfg["seed"])
    model = build(ctx.cfg["model"], classes).to(device)
    tr = Training(model, make_pretrain_optimizer(model, s), classes)
    ck = load_resume_state(ctx, state_path, device)
    if ck is not None and (ck.model_name, ck.num_classes) != (ctx.cfg["model"], classes):
        ctx.log(f"{state_path} holds {ck.model_name} with {ck.num_classes} classes, not {ctx.cfg['model']} "
                f"with {classes}: not resumed, starting over")
        ck = None
    if ck is not None:
        model.load_state_dict(ck.model.state_dict())
        tr.optimizer.load_state_dict(ck.meta["optimizer"])
        tr.start, tr.history = ck.step, ck.meta["history"]
        ctx.log(f"resuming from {state_path} at step {tr.start}")
    broadcast_model_(model, ctx.comm)
    return tr


def train_steps(ctx: StageContext, tr: Training, data: Dataset, s: PretrainSettings,
                device: torch.device) -> tuple[int, dict]:
    """Run the remaining steps, checkpointing on schedule; a stop signal saves and raises."""
    from hpcqml.training.checkpoint import save_checkpoint
    from hpcqml.training.loop import pretrain

    state_path = ctx.workdir / STATE
    total = len(data.train_y) // s.batch_size * s.epochs
    ctx.log(f"{ctx.cfg['model']}: {count_parameters(tr.model):,} trainable parameters, {total} steps of "
            f"B = {s.batch_size} ({s.epochs} epoch(s)) on {ctx.size} rank(s), {device}")
    meter = StepMeter(total, tr.start, every=LOG_EVERY)

    def save_state(t: int, h: dict) -> None:
        if ctx.rank == 0:
            save_checkpoint(state_path, ctx.cfg["model"], tr.classes, tr.model, step=t,
                            meta={"optimizer": tr.optimizer.state_dict(), "history": h}, **stamp(ctx))

    def after_step(t: int, h: dict) -> None:
        ctx.perf.count("train_steps", 1)
        ctx.perf.count("samples", s.batch_size)
        if t % ctx.cfg["checkpoint_every"] == 0:
            save_state(t, h)
        if meter.due(t):
            ctx.log(f"{meter.line(t)}: loss {h['loss'][-1]:.4f}, batch accuracy {h['accuracy'][-1]:.3f}")

    with StopFlag() as flag:
        done, hist = pretrain(tr.model, ctx.comm, data, s, device, tr.optimizer, tr.start, tr.history,
                              after_step, lambda: flag.requested(ctx.comm), ctx.perf)
        if done < total:
            save_state(done, hist)
            ctx.comm.Barrier()
            raise interrupted_error(flag.signum, done, state_path, total=total, stage="pretrain")
    return done, hist


def finish(ctx: StageContext, tr: Training, data: Dataset, s: PretrainSettings, device: torch.device,
           done: int, hist: dict) -> None:
    """Evaluate, write ``pretrained.pt`` and commit the ``pretrain`` group."""
    from hpcqml.training.checkpoint import save_checkpoint
    from hpcqml.training.loop import evaluate

    output = ctx.workdir / OUTPUT
    test_loss, test_acc = evaluate(tr.model, ctx.comm, data.test_x, data.test_y, device, perf=ctx.perf)
    if ctx.rank == 0:
        save_checkpoint(output, ctx.cfg["model"], tr.classes, tr.model, step=done,
                        meta={"stage": "pretrain", "test_accuracy": test_acc}, **stamp(ctx))
    ctx.comm.Barrier()
    ctx.store.commit("pretrain", history_writer(hist), attrs={
        "model": ctx.cfg["model"], "num_parameters": count_parameters(tr.model), "steps": done,
        "epochs": s.epochs, "batch_size": s.batch_size, "test_loss": test_loss,
        "test_accuracy": test_acc, "checkpoint": str(output), "ranks": ctx.size,
        "device": str(device), "fingerprint": ctx.fingerprint})
    ctx.log(f"done: {done} steps, test accuracy {test_acc:.4f}")


def run(ctx: StageContext) -> None:
    """Pre-train (or resume), then evaluate and write the model and the HDF5 group."""
    if not begin(ctx, ctx.workdir / OUTPUT, ctx.workdir / STATE):
        return
    data = load_dataset(ctx)
    s = settings(ctx)
    check_sizes(ctx.cfg, len(data.train_y), ctx.size)
    device = ctx.device()
    tr = start_training(ctx, s, data.num_classes, device)
    done, hist = train_steps(ctx, tr, data, s, device)
    finish(ctx, tr, data, s, device, done, hist)


def estimate(cfg: RunConfig, ranks: int, _memory_per_rank: float, found: Preflight) -> None:
    """``hpcqml validate``: the CIFAR-100 files, the model name and a batch size the data and the ranks fill."""
    check_cifar_root(cfg, found)
    check_model_name("pretrain.model", cfg.sections["pretrain"]["model"], found)
    try:
        check_sizes(cfg.sections["pretrain"], training_images(cfg.sections["data"]), ranks)
    except UserError as exc:
        found.errors.append(str(exc))


register(Stage(name="pretrain", schema=SCHEMA, run=run, order=20, reads=fixed_reads("data"),
               estimate=estimate,
               doc="dense pre-training, SGD with momentum, data parallel (Sec. III B)"))
