"""Stage ``pretrain``: dense pre-training of a CIFAR ResNet (paper Sec. III B: "we first
train a dense ResNet"), classical SGD with momentum, data parallel over the ranks.

Writes ``<workdir>/pretrained.pt`` (model) and the HDF5 group ``pretrain``.  The state is
checkpointed to ``<workdir>/pretrain_state.pt`` every ``checkpoint_every`` steps and on
SIGTERM/SIGUSR1; running the stage again continues from there.
"""
from __future__ import annotations

import numpy as np
import torch

from hpcqml.config import Field
from hpcqml.models import build, count_parameters
from hpcqml.stages import Stage, StageContext, register
from hpcqml.stages.data import load_dataset
from hpcqml.training.checkpoint import load_checkpoint, save_checkpoint
from hpcqml.training.loop import (PretrainSettings, broadcast_model_, evaluate, make_pretrain_optimizer,
                                  pretrain)
from hpcqml.training.signals import StopFlag, interrupted_error

SCHEMA = {
    "model": Field(str, "resnet32-w4", doc="model name, resnet<6n+2>-w<k>"),
    "epochs": Field(int, 1, min=0, doc="training epochs (0 = keep the seeded initialisation)"),
    "batch_size": Field(int, 128, min=1, doc="global batch size B (split over ranks)"),
    "lr": Field(float, 0.1, min=0.0, doc="peak learning rate"),
    "momentum": Field(float, 0.9, min=0.0, max=1.0, doc="SGD momentum"),
    "weight_decay": Field(float, 5e-4, min=0.0, doc="L2 weight decay"),
    "schedule": Field(str, "cosine", choices=("cosine", "step", "constant"),
                      doc="learning-rate schedule (step: /10 at 50% and 75%)"),
    "augment": Field(bool, True, doc="random crop (pad 4) and horizontal flip"),
    "checkpoint_every": Field(int, 200, min=1, doc="steps between resume checkpoints"),
}

STATE = "pretrain_state.pt"
OUTPUT = "pretrained.pt"


def settings(ctx: StageContext) -> PretrainSettings:
    c = ctx.cfg
    return PretrainSettings(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"],
                            momentum=c["momentum"], weight_decay=c["weight_decay"],
                            schedule=c["schedule"], augment=c["augment"], seed=ctx.run_cfg["seed"])


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if ctx.store.is_complete("pretrain") and (ctx.workdir / OUTPUT).is_file():
        ctx.log("already complete")
        return
    data = load_dataset(ctx)
    device = ctx.device()
    s = settings(ctx)
    state_path = ctx.workdir / STATE
    torch.manual_seed(ctx.run_cfg["seed"])
    model = build(cfg["model"], data.num_classes).to(device)
    opt = make_pretrain_optimizer(model, s)
    start, hist = 0, None
    if state_path.is_file():
        ck = load_checkpoint(state_path, device)
        if ck.model_name == cfg["model"] and ck.num_classes == data.num_classes:
            model.load_state_dict(ck.model.state_dict())
            opt.load_state_dict(ck.meta["optimizer"])
            start, hist = ck.step, ck.meta["history"]
            ctx.log(f"resuming from {state_path} at step {start}")
    broadcast_model_(model, ctx.comm)
    ctx.log(f"{cfg['model']}: {count_parameters(model):,} trainable parameters, {ctx.size} rank(s) on {device}")

    def save_state(t: int, h: dict) -> None:
        if ctx.rank == 0:
            save_checkpoint(state_path, cfg["model"], data.num_classes, model, step=t,
                            meta={"optimizer": opt.state_dict(), "history": h})

    def after_step(t: int, h: dict) -> None:
        ctx.perf.count("train_steps", 1)
        ctx.perf.count("samples", s.batch_size)
        if t % cfg["checkpoint_every"] == 0:
            save_state(t, h)
        if t % 50 == 0:
            ctx.log(f"step {t}: loss {h['loss'][-1]:.4f}, batch accuracy {h['accuracy'][-1]:.3f}")

    spe = len(data.train_y) // s.batch_size
    total = spe * s.epochs
    with StopFlag() as flag:
        done, hist = pretrain(model, ctx.comm, data, s, device, opt, start, hist, after_step,
                              lambda: flag.requested(ctx.comm), ctx.perf)
        if done < total:
            save_state(done, hist)
            ctx.comm.Barrier()
            raise interrupted_error(flag.signum, done, state_path)
    test_loss, test_acc = evaluate(model, ctx.comm, data.test_x, data.test_y, device, perf=ctx.perf)
    if ctx.rank == 0:
        save_checkpoint(ctx.workdir / OUTPUT, cfg["model"], data.num_classes, model, step=done,
                        meta={"stage": "pretrain", "test_accuracy": test_acc})
    ctx.comm.Barrier()

    def write(g) -> None:
        g.create_dataset("step", data=np.asarray(hist["step"], dtype=np.int64))
        g.create_dataset("loss", data=np.asarray(hist["loss"], dtype=np.float64))
        g.create_dataset("accuracy", data=np.asarray(hist["accuracy"], dtype=np.float64))
        g.create_dataset("lr", data=np.asarray(hist["lr"], dtype=np.float64))
        g["loss"].attrs["units"] = "nats (mean cross-entropy over the batch)"
        g["accuracy"].attrs["units"] = "fraction of the batch"

    ctx.store.commit("pretrain", write, attrs={
        "model": cfg["model"], "num_parameters": count_parameters(model), "steps": done,
        "epochs": s.epochs, "batch_size": s.batch_size, "test_loss": test_loss,
        "test_accuracy": test_acc, "checkpoint": str(ctx.workdir / OUTPUT), "ranks": ctx.size,
        "device": str(device)})
    ctx.log(f"done: {done} steps, test accuracy {test_acc:.4f}")


register(Stage(name="pretrain", schema=SCHEMA, run=run,
               doc="dense pre-training, SGD with momentum, data parallel (Sec. III B)"))
