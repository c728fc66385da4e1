"""Stage ``data``: make sure the training data exist and record what they are.

``source = "synthetic"`` writes a synthetic CIFAR-100-layout set under ``root`` (default
``<workdir>/data``) unless it is already there; ``source = "cifar100"`` validates the
local python-pickle files under ``root``.  Other stages load the data through
:func:`load_dataset`, so they also work when this stage is not in the stage list.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcqml.config import Field
from hpcqml.data.cifar import SUBDIR, load_cifar100
from hpcqml.errors import UserError
from hpcqml.stages import Stage, StageContext, register

SCHEMA = {
    "source": Field(str, "synthetic", choices=("synthetic", "cifar100"),
                    doc="synthetic: generated CIFAR-100-layout set; cifar100: local files under root"),
    "root": Field(str, "", doc="directory holding cifar-100-python/; empty = <workdir>/data (synthetic only)"),
    "synth_train": Field(int, 5000, min=1, doc="synthetic training images"),
    "synth_test": Field(int, 1000, min=1, doc="synthetic test images"),
    "synth_classes": Field(int, 100, min=2, doc="synthetic classes"),
    "synth_noise": Field(float, 1.0, min=0.0, doc="synthetic noise level relative to the class signal"),
}


def data_root(ctx: StageContext) -> Path:
    """The directory holding (or to hold) cifar-100-python/."""
    cfg = ctx.section("data")
    if cfg["root"]:
        return Path(cfg["root"])
    if cfg["source"] == "cifar100":
        raise UserError("[data] source = 'cifar100' needs [data] root = the directory holding cifar-100-python/")
    return ctx.workdir / "data"


def ensure_data(ctx: StageContext) -> Path:
    """Generate the synthetic set on rank 0 if it is missing (collective); return the root."""
    cfg = ctx.section("data")
    root = data_root(ctx)
    if cfg["source"] == "synthetic":
        made = None
        if ctx.rank == 0 and not all((root / SUBDIR / f).is_file() for f in ("train", "test", "meta")):
            from hpcqml.data.synth import write_synthetic

            write_synthetic(root, cfg["synth_train"], cfg["synth_test"], cfg["synth_classes"],
                            ctx.run_cfg["seed"], cfg["synth_noise"])
            made = str(root)
        if ctx.size > 1:
            made = ctx.comm.bcast(made, root=0)
        if made:
            ctx.log(f"wrote synthetic data to {made}")
    return root


def load_dataset(ctx: StageContext):
    """Load the data set on every rank as a :class:`hpcqml.training.loop.Dataset`."""
    from hpcqml.training.loop import Dataset

    root = ensure_data(ctx)
    # rank 0 checks first so a defect is reported once, as one line
    ok = None
    if ctx.rank == 0:
        try:
            split = load_cifar100(root)
            ok = ""
        except UserError as exc:
            ok = str(exc)
    if ctx.size > 1:
        ok = ctx.comm.bcast(ok, root=0)
    if ok:
        raise UserError(ok)
    if ctx.rank != 0:
        split = load_cifar100(root)
    return Dataset(split.train_x, split.train_y, split.test_x, split.test_y, split.num_classes)


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if ctx.store.is_complete("data"):
        ctx.log("already complete")
        return
    root = ensure_data(ctx)
    info = None
    if ctx.rank == 0:
        try:
            split = load_cifar100(root)
        except UserError as exc:
            info = {"error": str(exc)}
    if ctx.rank == 0 and info is None:
        x = split.train_x.reshape(-1, 3).astype(np.float64) / 255.0
        info = {
            "root": str(split.root),
            "num_train": int(len(split.train_y)),
            "num_test": int(len(split.test_y)),
            "num_classes": int(split.num_classes),
            "train_counts": np.bincount(split.train_y, minlength=split.num_classes).astype(np.int64),
            "test_counts": np.bincount(split.test_y, minlength=split.num_classes).astype(np.int64),
            "channel_mean": x.mean(axis=0),
            "channel_std": x.std(axis=0),
        }
    if ctx.size > 1:
        info = ctx.comm.bcast(info, root=0)
    if "error" in info:
        raise UserError(info["error"])

    def write(g) -> None:
        for k in ("train_counts", "test_counts", "channel_mean", "channel_std"):
            g.create_dataset(k, data=info[k])
        g["channel_mean"].attrs["units"] = "pixel value / 255"
        g["channel_std"].attrs["units"] = "pixel value / 255"

    ctx.store.commit("data", write, attrs={
        "source": cfg["source"], "root": info["root"], "num_train": info["num_train"],
        "num_test": info["num_test"], "num_classes": info["num_classes"],
        "image_shape": np.array([32, 32, 3], dtype=np.int64)})
    ctx.log(f"{cfg['source']} data at {info['root']}: {info['num_train']} train, {info['num_test']} test, "
            f"{info['num_classes']} classes")


register(Stage(name="data", schema=SCHEMA, run=run,
               doc="CIFAR-100 (python-pickle layout) or a synthetic stand-in (Sec. III B)"))
