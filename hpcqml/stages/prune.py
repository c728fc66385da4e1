"""Stage ``prune``: global magnitude pruning of the pre-trained model (paper Sec. III B:
"90% of the parameters are being pruned"; Fig. 3 for the 103M model).

Reads ``model_file`` (default ``<workdir>/pretrained.pt``), keeps the ``keep_fraction``
largest-magnitude prunable weights (:mod:`hpcqml.training.pruning`), writes
``<workdir>/pruned.pt`` (model + mask) and the HDF5 group ``prune`` (mask and per-layer
sparsity).  Every rank computes the same mask; rank 0 writes.  ``pruned.pt`` records the
fingerprint of the stage inputs and the results file of its run, and a ``pretrained.pt``
that this run's pretrain stage did not make is refused (:mod:`hpcqml.training.origin`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from hpcqml.config import Field
from hpcqml.errors import UserError
from hpcqml.stages import Stage, StageContext, fixed_reads, register
from hpcqml.stages._estimates import check_cifar_root
from hpcqml.store import write_dataset
from hpcqml.training.origin import begin, check_input, model_source, stamp
from hpcqml.training.pruning import SCOPES, layer_sparsity, prunable_parameters, prune_

if TYPE_CHECKING:
    import h5py
    import torch

    from hpcqml.config import RunConfig
    from hpcqml.preflight import Preflight

SCHEMA = {
    "keep_fraction": Field(float, 0.1, min=1e-9, max=1.0, doc="fraction of prunable weights kept"),
    "scope": Field(str, SCOPES[0], choices=SCOPES, doc="prunable set (see docs/schema/train.md)"),
    "model_file": Field(str, "", doc="checkpoint to prune; empty = <workdir>/pretrained.pt"),
    "store_mask": Field(bool, True, doc="write the boolean mask of every prunable tensor to HDF5"),
    "evaluate": Field(bool, True, doc="test accuracy before and after pruning"),
}

OUTPUT = "pruned.pt"


def check_keep(keep_fraction: float, prunable: int) -> None:
    """Refuse a keep fraction that keeps no weight at all (one-line UserError)."""
    if round(keep_fraction * prunable) < 1:
        raise UserError(f"[prune] keep_fraction = {keep_fraction:g} keeps none of the {prunable:,} prunable "
                        f"weights; use at least {1.0 / prunable:.3g}")


def mask_writer(rows: list[tuple[str, int, int]], masks: dict, store_mask: bool) -> Callable[[h5py.Group], None]:
    """A store writer for the per-layer pruning record (and the masks)."""
    def write(g: h5py.Group) -> None:
        write_dataset(g, "layer_names", [r[0] for r in rows], "1",
                      "parameter name of each prunable tensor (read with hpcqml.store.read_strings)")
        write_dataset(g, "numel", np.array([r[1] for r in rows], dtype=np.int64), "count",
                      "entries of each prunable tensor")
        write_dataset(g, "kept", np.array([int(masks[r[0]].sum()) for r in rows], dtype=np.int64), "count",
                      "entries of each prunable tensor kept by the global magnitude mask")
        write_dataset(g, "sparsity", np.array([1.0 - r[2] / r[1] for r in rows], dtype=np.float64), "1",
                      "fraction of each prunable tensor's entries that are zero after pruning")
        if store_mask:
            mg = g.create_group("mask")
            for name, m in masks.items():
                write_dataset(mg, name, m.numpy(), "1", f"True where {name} is kept (global magnitude mask)",
                              dtype=bool, compression="gzip", compression_opts=4, chunks=True)
    return write


def _evaluate(ctx: StageContext, model: torch.nn.Module, device: torch.device) -> Callable[[], tuple[float, float]]:
    """Test loss and accuracy of ``model`` as it is when called (NaN when ``evaluate`` is off)."""
    if not ctx.cfg["evaluate"]:
        return lambda: (float("nan"), float("nan"))
    from hpcqml.stages.data import load_dataset
    from hpcqml.training.loop import evaluate

    data = load_dataset(ctx)
    return lambda: evaluate(model, ctx.comm, data.test_x, data.test_y, device, perf=ctx.perf)


def run(ctx: StageContext) -> None:
    """Prune the source model to the top ``keep_fraction``; write the model, mask and group."""
    from hpcqml.training.checkpoint import load_checkpoint, save_checkpoint

    cfg = ctx.cfg
    output = ctx.workdir / OUTPUT
    src, own = model_source(ctx, "pretrained.pt")
    if not begin(ctx, output, source=src, missing="run the pretrain stage or set [prune] model_file"):
        return
    device = ctx.device()
    ck = load_checkpoint(src, device)
    if own:
        check_input(ctx, src, "pretrain", ck.fingerprint, ck.results)
    model = ck.model
    check_keep(cfg["keep_fraction"], sum(p.numel() for _, p in prunable_parameters(model, cfg["scope"])))
    test = _evaluate(ctx, model, device)
    before = test()
    masks = prune_(model, cfg["keep_fraction"], cfg["scope"])
    after = test()
    rows = layer_sparsity(model, cfg["scope"])
    total, nonzero = sum(r[1] for r in rows), sum(r[2] for r in rows)
    kept = sum(int(m.sum()) for m in masks.values())
    if ctx.rank == 0:
        save_checkpoint(output, ck.model_name, ck.num_classes, model, mask=masks, step=0,
                        meta={"stage": "prune", "keep_fraction": cfg["keep_fraction"], "scope": cfg["scope"],
                              "source": str(src)}, **stamp(ctx))
    ctx.comm.Barrier()
    ctx.store.commit("prune", mask_writer(rows, masks, cfg["store_mask"]), attrs={
        "model": ck.model_name, "keep_fraction": cfg["keep_fraction"], "scope": cfg["scope"],
        "prunable_total": total, "kept_total": kept, "nonzero_total": nonzero,
        "sparsity": 1.0 - nonzero / total, "test_loss_before": before[0], "test_accuracy_before": before[1],
        "test_loss_after": after[0], "test_accuracy_after": after[1], "source": str(src),
        "checkpoint": str(output), "fingerprint": ctx.fingerprint})
    ctx.log(f"kept {kept:,} of {total:,} prunable weights ({cfg['scope']}); test accuracy "
            f"{before[1]:.4f} -> {after[1]:.4f}")


def estimate(cfg: RunConfig, _ranks: int, _memory_per_rank: float, found: Preflight) -> None:
    """``hpcqml validate``: the CIFAR-100 files the pre-trained model's data come from."""
    check_cifar_root(cfg, found)


register(Stage(name="prune", schema=SCHEMA, run=run, order=30, reads=fixed_reads("pretrain", "data"),
               estimate=estimate,
               doc="global magnitude pruning to the top keep_fraction (Sec. III B)"))
