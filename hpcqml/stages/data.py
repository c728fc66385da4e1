"""Stage ``data``: make sure the training data exist and record what they are.

``source = "synthetic"`` writes a synthetic CIFAR-100-layout set under ``root`` (default
``<workdir>/data``) unless it is already there, with a record of the parameters and the
run it was made for (``hpcqml-data.json``): a set another run made with other parameters
is refused, never used; ``source = "cifar100"`` validates the
local python-pickle files under ``root``.  Other stages load the data through
:func:`load_dataset`, so they also work when this stage is not in the stage list.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hpcqml.config import Field
from hpcqml.data.cifar import SUBDIR, load_cifar100
from hpcqml.errors import InputFileError, UserError
from hpcqml.io import FileTooLargeError, atomic_write_bytes, read_limited
from hpcqml.parallel import decide_on_root
from hpcqml.stages import Stage, StageContext, register
from hpcqml.stages._estimates import check_cifar_root
from hpcqml.store import write_dataset

if TYPE_CHECKING:
    from hpcqml.config import RunConfig
    from hpcqml.preflight import Preflight
    import h5py

    from hpcqml.training.loop import Dataset

SCHEMA = {
    "source": Field(str, "synthetic", choices=("synthetic", "cifar100"),
                    doc="synthetic: generated CIFAR-100-layout set; cifar100: local files under root"),
    "root": Field(str, "", doc="directory holding cifar-100-python/; empty = <workdir>/data (synthetic only)"),
    "synth_train": Field(int, 5000, min=1, doc="synthetic training images"),
    "synth_test": Field(int, 1000, min=1, doc="synthetic test images"),
    "synth_classes": Field(int, 100, min=2, doc="synthetic classes"),
    "synth_noise": Field(float, 1.0, min=0.0, doc="synthetic noise level relative to the class signal"),
}


#: (units, description) of the data stage's datasets
DATASET_DOCS = {
    "train_counts": ("count", "training images per class"),
    "test_counts": ("count", "test images per class"),
    "channel_mean": ("1", "mean of each RGB channel over the training images, pixel value / 255"),
    "channel_std": ("1", "standard deviation of each RGB channel over the training images, pixel value / 255"),
}


def data_root(ctx: StageContext) -> Path:
    """The directory holding (or to hold) cifar-100-python/."""
    cfg = ctx.section("data")
    if cfg["root"]:
        return Path(cfg["root"])
    if cfg["source"] == "cifar100":
        raise UserError("[data] source = 'cifar100' needs [data] root = the directory holding cifar-100-python/")
    return ctx.workdir / "data"


#: next to cifar-100-python/: the parameters and the run a synthetic set was made for
ORIGIN_FILE = "hpcqml-data.json"
#: bytes an origin record may have (hpcqml writes a few hundred)
ORIGIN_LIMIT = 1 << 16
#: bytes per image: 32 x 32 x 3 uint8
IMAGE_BYTES = 3 * 32 * 32


def synthetic_params(ctx: StageContext) -> dict[str, Any]:
    """The inputs that determine a synthetic data set."""
    cfg = ctx.section("data")
    return {"synth_train": cfg["synth_train"], "synth_test": cfg["synth_test"],
            "synth_classes": cfg["synth_classes"], "synth_noise": cfg["synth_noise"],
            "seed": ctx.run_cfg["seed"]}


def check_synthetic_sizes(params: dict[str, Any], memory: int) -> None:
    """Refuse synthetic sizes that cannot make a usable set or do not fit in memory."""
    if params["synth_classes"] > params["synth_train"]:
        raise UserError(f"[data] synth_classes = {params['synth_classes']} is larger than synth_train = "
                        f"{params['synth_train']}: every class needs a training image")
    # float32 noise, image and temporary for the larger split, plus both uint8 splits and their pickles
    need = 12 * IMAGE_BYTES * max(params["synth_train"], params["synth_test"]) \
        + 2 * IMAGE_BYTES * (params["synth_train"] + params["synth_test"])
    if memory and need > memory:
        raise UserError(f"[data] synth_train = {params['synth_train']}, synth_test = {params['synth_test']}: "
                        f"generating needs about {need / 2**30:.1f} GiB, more than this node's "
                        f"{memory / 2**30:.1f} GiB of memory")


def check_batch_size(section: str, batch: int, n_train: int, ranks: int) -> None:
    """Refuse a global batch of ``batch`` distinct training images that the data set
    (``n_train`` images) or the ranks (at least one sample each) cannot fill.

    Raises:
        UserError: one line naming ``[section] batch_size`` and the limit.
    """
    if batch > n_train:
        raise UserError(f"[{section}] batch_size = {batch} is larger than the data set's {n_train} "
                        f"training images (a batch draws distinct images); use at most {n_train}")
    if batch < ranks:
        raise UserError(f"[{section}] batch_size = {batch} is smaller than the {ranks} ranks: "
                        f"every rank needs at least one sample")


def _read_origin(root: Path) -> dict[str, Any] | None:
    """The origin record of the synthetic set under ``root`` (None: none readable).

    Raises:
        InputFileError: the record is larger than :data:`ORIGIN_LIMIT` (not one hpcqml wrote).
    """
    path = root / ORIGIN_FILE
    try:
        origin = json.loads(read_limited(path, ORIGIN_LIMIT))
    except FileTooLargeError as exc:
        raise InputFileError(f"{exc}; not an hpcqml origin record: delete it or use another [data] root") from None
    except (OSError, ValueError):
        return None
    return origin if isinstance(origin, dict) else None


def _synthetic_is_current(ctx: StageContext, root: Path, params: dict[str, Any]) -> bool:
    """Rank 0: whether the synthetic set under ``root`` may be used as it is.

    A set made for other parameters by this run (its settings changed) is regenerated;
    one made by another run is refused.  A set without an origin record (written by hand
    or an older hpcqml) is used as it is.
    """
    from hpcqml.training.origin import this_results

    if not all((root / SUBDIR / f).is_file() for f in ("train", "test", "meta")):
        return False
    origin = _read_origin(root)
    if origin is None or origin.get("params") == params:
        return True
    made_by = str(origin.get("results", ""))
    if made_by == this_results(ctx):
        ctx.log(f"synthetic data at {root} was made with other [data] settings: regenerating")
        return False
    old = origin.get("params") or {}
    diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in params.items() if old.get(k) != v)
    raise UserError(f"{root / ORIGIN_FILE}: synthetic data made by the run writing {made_by or 'unknown'} "
                    f"with other settings ({diff}); give this config its own [run] workdir or [data] root")


def _make_synthetic(ctx: StageContext, root: Path, params: dict[str, Any]) -> str:
    """Rank 0: write the synthetic set and its origin record; return what was made ("" = nothing)."""
    from hpcqml.data.synth import write_synthetic
    from hpcqml.training.origin import this_results

    if _synthetic_is_current(ctx, root, params):
        return ""
    from hpcqml.preflight import machine_memory_bytes

    check_synthetic_sizes(params, machine_memory_bytes())
    write_synthetic(root, params["synth_train"], params["synth_test"], params["synth_classes"],
                    params["seed"], params["synth_noise"])
    record = {"params": params, "results": this_results(ctx)}
    atomic_write_bytes(root / ORIGIN_FILE, json.dumps(record, sort_keys=True).encode())
    return str(root)


def ensure_data(ctx: StageContext) -> Path:
    """Generate the synthetic set on rank 0 if it is missing or stale (collective); return the root."""
    cfg = ctx.section("data")
    root = data_root(ctx)
    if cfg["source"] == "synthetic":
        params = synthetic_params(ctx)
        made = decide_on_root(ctx.comm, lambda: _make_synthetic(ctx, root, params))
        if made:
            ctx.log(f"wrote synthetic data to {made}")
    return root


def load_dataset(ctx: StageContext) -> Dataset:
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
    """Make or check the data set and record its class counts and channel statistics."""
    cfg = ctx.cfg
    if ctx.store.is_complete("data"):
        ctx.log("already complete")
        return
    root = ensure_data(ctx)
    info: dict[str, Any] | None = None
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
    if info is None:  # rank 0 always sets it, and the broadcast hands it to every rank
        raise RuntimeError("data stage: rank 0's description of the data set did not arrive")
    if "error" in info:
        raise UserError(info["error"])

    def write(g: h5py.Group) -> None:
        for key, (units, description) in DATASET_DOCS.items():
            write_dataset(g, key, info[key], units, description)

    ctx.store.commit("data", write, attrs={
        "source": cfg["source"], "root": info["root"], "num_train": info["num_train"],
        "num_test": info["num_test"], "num_classes": info["num_classes"],
        "image_shape": np.array([32, 32, 3], dtype=np.int64)})
    ctx.log(f"{cfg['source']} data at {info['root']}: {info['num_train']} train, {info['num_test']} test, "
            f"{info['num_classes']} classes")


def estimate(cfg: RunConfig, _ranks: int, _memory_per_rank: float, found: Preflight) -> None:
    """``hpcqml validate``: the CIFAR-100 files, or synthetic sizes that fit this node."""
    from hpcqml.preflight import machine_memory_bytes

    check_cifar_root(cfg, found)
    d = cfg.sections["data"]
    if d["source"] == "synthetic":
        try:
            check_synthetic_sizes({**d, "seed": cfg.run["seed"]}, machine_memory_bytes())
        except UserError as exc:
            found.errors.append(str(exc))


register(Stage(name="data", schema=SCHEMA, run=run, order=10, estimate=estimate,
               doc="CIFAR-100 (python-pickle layout) or a synthetic stand-in (Sec. III B)"))
