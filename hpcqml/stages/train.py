"""Stage ``train``: the paper's sparse-training protocol (Sec. III B, Fig. 2).

Starts from ``<workdir>/pruned.pt``; plain SGD (lr 0.01) on B = 2048 freshly drawn samples
per step; pruned weights may regrow; every ``download_every`` steps a "download" re-prunes
to the top ``keep_fraction``; the first ``classical_steps`` steps after each download are
classical, the rest quantum-eligible (:mod:`hpcqml.training.loop`).

Files: model snapshots ``<workdir>/snapshots/step_XXXXXX.pt`` (for the spectrum stage),
the resume state ``<workdir>/train_state.pt`` (every ``checkpoint_every`` steps and on
SIGTERM/SIGUSR1) and ``<workdir>/trained.pt``.  HDF5: group ``train`` (per-step log).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.models import count_parameters
from hpcqml.parallel import decide_on_root
from hpcqml.stages import Stage, StageContext, register
from hpcqml.stages.data import load_dataset
from hpcqml.training.checkpoint import load_checkpoint, save_checkpoint
from hpcqml.training.loop import HISTORY_KEYS, SparseSettings, broadcast_model_, empty_history, sparse_train
from hpcqml.training.pruning import SCOPES
from hpcqml.training.signals import StopFlag, interrupted_error

SCHEMA = {
    "steps": Field(int, 200, min=0, doc="SGD steps T"),
    "batch_size": Field(int, 2048, min=1, doc="samples per step B (paper: 2048), split over ranks"),
    "lr": Field(float, 0.01, min=0.0, doc="learning rate (paper: 0.01), plain SGD"),
    "keep_fraction": Field(float, 0.0, min=0.0, max=1.0,
                           doc="fraction kept at each download; 0 = [prune] keep_fraction"),
    "scope": Field(str, "", choices=("",) + SCOPES, doc="prunable set; empty = [prune] scope"),
    "download_every": Field(int, 100, min=1, doc="re-prune ('download') after every this many steps"),
    "classical_steps": Field(int, 10, min=0, doc="steps after each download that are classical"),
    "test_interval": Field(int, 10, min=0, doc="test accuracy every this many steps (0 = never)"),
    "checkpoint_every": Field(int, 50, min=1, doc="steps between resume checkpoints"),
    "snapshot_every": Field(int, 10, min=0, doc="model snapshot every this many steps (0 = none)"),
    "snapshot_steps": Field(list, [], item=int, min=0, doc="extra steps to snapshot"),
    "model_file": Field(str, "", doc="starting model; empty = <workdir>/pruned.pt"),
}

STATE = "train_state.pt"
OUTPUT = "trained.pt"


def snapshot_path(workdir: Path, step: int) -> Path:
    return workdir / "snapshots" / f"step_{step:06d}.pt"


def settings(ctx: StageContext) -> SparseSettings:
    c, prune_cfg = ctx.cfg, ctx.section("prune")
    return SparseSettings(steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"],
                          keep_fraction=c["keep_fraction"] or prune_cfg["keep_fraction"],
                          download_every=c["download_every"], classical_steps=c["classical_steps"],
                          test_interval=c["test_interval"], scope=c["scope"] or prune_cfg["scope"],
                          seed=ctx.run_cfg["seed"])


def history_writer(hist: dict, snap: set[int], done: int):
    """A store writer for the per-step training log after ``done`` steps."""
    dtypes = {"step": np.int64, "download": bool, "quantum_eligible": bool}

    def write(g) -> None:
        for k in HISTORY_KEYS:
            g.create_dataset(k, data=np.asarray(hist[k], dtype=dtypes.get(k, np.float64)))
        g["loss"].attrs["units"] = "nats (mean cross-entropy over the batch, before the update)"
        g["batch_accuracy"].attrs["units"] = "fraction of the batch (before the update)"
        g["test_accuracy"].attrs["units"] = "fraction of the test set after the step (NaN = not measured)"
        g["sparsity"].attrs["units"] = "fraction of prunable weights equal to zero after the step"
        g.create_dataset("snapshot_steps", data=np.array(sorted(t for t in snap if t <= done), dtype=np.int64))
    return write


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    # File-system checks are decided on rank 0 so that every rank takes the same branch.
    if ctx.store.is_complete("train") and decide_on_root(ctx.comm, (ctx.workdir / OUTPUT).is_file):
        ctx.log("already complete")
        return
    src = Path(cfg["model_file"]) if cfg["model_file"] else ctx.workdir / "pruned.pt"
    if not decide_on_root(ctx.comm, src.is_file):
        raise UserError(f"train: model file {src} not found (run the prune stage or set [train] model_file)")
    data = load_dataset(ctx)
    device = ctx.device()
    s = settings(ctx)
    ck = load_checkpoint(src, device)
    if ck.num_classes != data.num_classes:
        raise UserError(f"train: model {src} has {ck.num_classes} classes, the data {data.num_classes}")
    model, name, masks = ck.model, ck.model_name, ck.mask
    state_path = ctx.workdir / STATE
    start, hist = 0, empty_history()
    if decide_on_root(ctx.comm, state_path.is_file):
        st = load_checkpoint(state_path, device)
        if st.model_name == name and st.meta.get("source") == str(src):
            model.load_state_dict(st.model.state_dict())
            masks, start, hist = st.mask, st.step, st.meta["history"]
            ctx.log(f"resuming from {state_path} at step {start}")
    broadcast_model_(model, ctx.comm)
    snap = set(cfg["snapshot_steps"])
    if cfg["snapshot_every"]:
        snap |= set(range(0, s.steps + 1, cfg["snapshot_every"]))
    ctx.log(f"{name}: {count_parameters(model):,} parameters, {s.steps} steps of B = {s.batch_size} "
            f"on {ctx.size} rank(s), {device}")

    def save_state(t: int, h: dict) -> None:
        """Checkpoint (collective): the resume state, and the per-step log so far in HDF5."""
        if ctx.rank == 0:
            save_checkpoint(state_path, name, ck.num_classes, model, mask=masks, step=t,
                            meta={"history": h, "source": str(src)})
        ctx.store.commit("train_log", history_writer(h, snap, t), attrs={"steps_done": t})

    def snapshot(t: int) -> None:
        if t in snap and ctx.rank == 0:
            save_checkpoint(snapshot_path(ctx.workdir, t), name, ck.num_classes, model, mask=masks, step=t,
                            meta={"stage": "train", "download": bool(t and t % s.download_every == 0)})

    def after_step(t: int, h: dict, new_masks) -> None:
        nonlocal masks
        if new_masks is not None:
            masks = new_masks
        ctx.perf.count("train_steps", 1)
        ctx.perf.count("samples", s.batch_size)
        snapshot(t)
        if t % cfg["checkpoint_every"] == 0:
            save_state(t, h)
        if t % 10 == 0:
            ctx.log(f"step {t}: loss {h['loss'][-1]:.4f}, batch accuracy {h['batch_accuracy'][-1]:.3f}, "
                    f"sparsity {h['sparsity'][-1]:.3f}")

    if start == 0:
        snapshot(0)
    with StopFlag() as flag:
        done, hist = sparse_train(model, ctx.comm, data, s, device, start, hist, after_step,
                                  lambda: flag.requested(ctx.comm), ctx.perf)
        if done < s.steps:
            save_state(done, hist)
            ctx.comm.Barrier()
            raise interrupted_error(flag.signum, done, state_path)
    if ctx.rank == 0:
        save_checkpoint(ctx.workdir / OUTPUT, name, ck.num_classes, model, mask=masks, step=done,
                        meta={"stage": "train"})
    ctx.comm.Barrier()
    ctx.store.commit("train", history_writer(hist, snap, done), attrs={
        "model": name, "num_parameters": count_parameters(model), "steps": done, "batch_size": s.batch_size,
        "lr": s.lr, "keep_fraction": s.keep_fraction, "scope": s.scope, "download_every": s.download_every,
        "classical_steps": s.classical_steps, "test_interval": s.test_interval, "ranks": ctx.size,
        "snapshot_dir": str(ctx.workdir / "snapshots"), "source": str(src), "device": str(device)})
    ctx.log(f"done: {done} steps, final batch accuracy "
            f"{hist['batch_accuracy'][-1] if hist['batch_accuracy'] else float('nan'):.4f}")


register(Stage(name="train", schema=SCHEMA, run=run,
               doc="sparse training with periodic re-pruning downloads (Sec. III B, Fig. 2)"))
