"""Stage ``prune``: global magnitude pruning of the pre-trained model (paper Sec. III B:
"90% of the parameters are being pruned"; Fig. 3 for the 103M model).

Reads ``model_file`` (default ``<workdir>/pretrained.pt``), keeps the ``keep_fraction``
largest-magnitude prunable weights (:mod:`hpcqml.training.pruning`), writes
``<workdir>/pruned.pt`` (model + mask) and the HDF5 group ``prune`` (mask and per-layer
sparsity).  Every rank computes the same mask; rank 0 writes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.stages import Stage, StageContext, register
from hpcqml.training.checkpoint import load_checkpoint, save_checkpoint
from hpcqml.training.pruning import SCOPES, layer_sparsity, prune_

SCHEMA = {
    "keep_fraction": Field(float, 0.1, min=1e-9, max=1.0, doc="fraction of prunable weights kept"),
    "scope": Field(str, SCOPES[0], choices=SCOPES, doc="prunable set (see docs/schema/train.md)"),
    "model_file": Field(str, "", doc="checkpoint to prune; empty = <workdir>/pretrained.pt"),
    "store_mask": Field(bool, True, doc="write the boolean mask of every prunable tensor to HDF5"),
    "evaluate": Field(bool, True, doc="test accuracy before and after pruning"),
}

OUTPUT = "pruned.pt"


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if ctx.store.is_complete("prune") and (ctx.workdir / OUTPUT).is_file():
        ctx.log("already complete")
        return
    src = Path(cfg["model_file"]) if cfg["model_file"] else ctx.workdir / "pretrained.pt"
    if not src.is_file():
        raise UserError(f"prune: model file {src} not found (run the pretrain stage or set [prune] model_file)")
    device = ctx.device()
    ck = load_checkpoint(src, device)
    model = ck.model
    before = after = (float("nan"), float("nan"))
    data = None
    if cfg["evaluate"]:
        from hpcqml.stages.data import load_dataset
        from hpcqml.training.loop import evaluate

        data = load_dataset(ctx)
        before = evaluate(model, ctx.comm, data.test_x, data.test_y, device, perf=ctx.perf)
    masks = prune_(model, cfg["keep_fraction"], cfg["scope"])
    if data is not None:
        from hpcqml.training.loop import evaluate

        after = evaluate(model, ctx.comm, data.test_x, data.test_y, device, perf=ctx.perf)
    rows = layer_sparsity(model, cfg["scope"])
    total = sum(r[1] for r in rows)
    kept = sum(int(m.sum()) for m in masks.values())
    nonzero = sum(r[2] for r in rows)
    if ctx.rank == 0:
        save_checkpoint(ctx.workdir / OUTPUT, ck.model_name, ck.num_classes, model, mask=masks, step=0,
                        meta={"stage": "prune", "keep_fraction": cfg["keep_fraction"], "scope": cfg["scope"],
                              "source": str(src)})
    ctx.comm.Barrier()

    def write(g) -> None:
        g.create_dataset("layer_names", data=np.array([r[0] for r in rows], dtype=object),
                         dtype=__import__("h5py").string_dtype())
        g.create_dataset("numel", data=np.array([r[1] for r in rows], dtype=np.int64))
        g.create_dataset("kept", data=np.array([int(masks[r[0]].sum()) for r in rows], dtype=np.int64))
        g.create_dataset("sparsity", data=np.array([1.0 - r[2] / r[1] for r in rows], dtype=np.float64))
        g["sparsity"].attrs["units"] = "fraction of the layer's weights that are zero"
        if cfg["store_mask"]:
            mg = g.create_group("mask")
            for name, m in masks.items():
                mg.create_dataset(name, data=m.numpy(), dtype=bool, compression="gzip",
                                  compression_opts=4, chunks=True)

    ctx.store.commit("prune", write, attrs={
        "model": ck.model_name, "keep_fraction": cfg["keep_fraction"], "scope": cfg["scope"],
        "prunable_total": total, "kept_total": kept, "nonzero_total": nonzero,
        "sparsity": 1.0 - nonzero / total, "test_loss_before": before[0], "test_accuracy_before": before[1],
        "test_loss_after": after[0], "test_accuracy_after": after[1], "source": str(src),
        "checkpoint": str(ctx.workdir / OUTPUT)})
    ctx.log(f"kept {kept:,} of {total:,} prunable weights ({cfg['scope']}); test accuracy "
            f"{before[1]:.4f} -> {after[1]:.4f}")


register(Stage(name="prune", schema=SCHEMA, run=run,
               doc="global magnitude pruning to the top keep_fraction (Sec. III B)"))
