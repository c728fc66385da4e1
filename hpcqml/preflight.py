"""Checks ``hpcqml validate`` makes so that a run does not fail after its queue wait.

Problems that would stop the run (an unknown model name, missing CIFAR-100 files, no GPU
for ``device = "cuda"``) are errors; resource estimates are printed, with a warning when
one exceeds :data:`MEMORY_WARN_FRACTION` of the memory a rank gets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from hpcqml.config import RunConfig
from hpcqml.errors import UserError

#: warn when an estimate exceeds this fraction of the memory per rank
MEMORY_WARN_FRACTION = 0.5


@dataclass
class Preflight:
    """What validate found: estimates (info lines), warnings and errors."""

    estimates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def machine_memory_bytes() -> int:
    """Physical memory of this machine in bytes (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def check_models(cfg: RunConfig, stages: list[str], found: Preflight) -> None:
    """Model names the stages will build."""
    names = []
    if "pretrain" in stages:
        names.append(("pretrain.model", cfg.sections["pretrain"]["model"]))
    if "hhl" in stages and "network" in cfg.sections["hhl"]["cases"]:
        names.append(("hhl.network_model", cfg.sections["hhl"]["network_model"]))
    if not names:
        return
    from hpcqml.models import parse_name

    for key, name in names:
        try:
            parse_name(name)
        except UserError as exc:
            found.errors.append(f"{key}: {exc}")


def check_data(cfg: RunConfig, stages: list[str], found: Preflight) -> None:
    """CIFAR-100 files (``source = "cifar100"``): the directory with meta/train/test."""
    data = cfg.sections["data"]
    if data["source"] != "cifar100" or not set(stages) & {"data", "pretrain", "prune", "train", "spectrum"}:
        return
    if not data["root"]:
        found.errors.append("data.root is empty but data.source = 'cifar100' needs the directory holding "
                            "cifar-100-python/")
        return
    from hpcqml.data.cifar import resolve_dir

    try:
        resolve_dir(data["root"])
    except UserError as exc:
        found.errors.append(f"data.root: {exc}")


#: training images of CIFAR-100
CIFAR100_TRAIN = 50_000


def check_sizes(cfg: RunConfig, stages: list[str], ranks: int, found: Preflight) -> None:
    """The stages' own size checks, run now: batch sizes above the training set (synth_train,
    or the 50,000 CIFAR-100 images) or below the ranks, snapshot steps beyond ``[train]
    steps``, more synthetic classes than training images.
    """
    from hpcqml.stages import data, pretrain, train

    d = cfg.sections["data"]
    n_train = d["synth_train"] if d["source"] == "synthetic" else CIFAR100_TRAIN
    checks = []
    if d["source"] == "synthetic" and "data" in stages:
        checks.append(lambda: data.check_synthetic_sizes({**d, "seed": cfg.run["seed"]}, machine_memory_bytes()))
    for name, module in (("pretrain", pretrain), ("train", train)):
        if name in stages:
            checks.append(lambda m=module, n=name: m.check_sizes(cfg.sections[n], n_train, ranks))
    for check in checks:
        try:
            check()
        except UserError as exc:
            found.errors.append(str(exc))


def check_device(cfg: RunConfig, found: Preflight) -> None:
    """``device = "cuda"`` needs a GPU on the machine that runs ``validate``."""
    if cfg.run["device"] != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        found.errors.append("run.device = 'cuda' but torch sees no CUDA device here (validate on a GPU node, "
                            "or use device = 'auto')")


def _parameters_of(cfg: RunConfig) -> tuple[str, int] | None:
    name = cfg.sections["pretrain"]["model"]
    from hpcqml.models import analytic_parameter_count, parse_name

    try:
        parse_name(name)
    except UserError:
        return None
    classes = cfg.sections["data"]["synth_classes"] if cfg.sections["data"]["source"] == "synthetic" else 100
    return name, analytic_parameter_count(name, classes)


def estimate_spectrum(cfg: RunConfig, ranks: int, memory_per_rank: float, found: Preflight) -> None:
    """Lanczos basis bytes per rank: steps x parameters x 8 / ranks (float64, sharded)."""
    model = _parameters_of(cfg)
    if model is None:
        return
    name, n = model
    steps = cfg.sections["spectrum"]["lanczos_steps"]
    per_rank = steps * n * 8 / ranks
    found.estimates.append(f"spectrum: Lanczos basis {steps} x {n:,} parameters ({name}) x 8 bytes / "
                           f"{ranks} rank(s) = {_gib(per_rank)} per rank")
    if memory_per_rank and per_rank > MEMORY_WARN_FRACTION * memory_per_rank:
        found.warnings.append(f"spectrum: the Lanczos basis needs {_gib(per_rank)} per rank, more than "
                              f"{MEMORY_WARN_FRACTION:.0%} of the {_gib(memory_per_rank)} a rank has; lower "
                              "spectrum.lanczos_steps or use more ranks")


def estimate_carleman(cfg: RunConfig, memory_per_rank: float, found: Preflight) -> None:
    """Carleman rows Delta = sum_j n^j (eq. II.13) and the dense storage up to dense_limit."""
    from hpcqml.carleman.instance import carleman_dim

    q = cfg.sections["qcm"]
    n = q["k"] if q["generator"] == "network" else q["n"]
    if q["generator"] in ("logistic", "file"):
        return
    top = max(q["N"])
    delta = carleman_dim(n, top)
    ref = q["N_ref"] or top + 2
    delta_ref = carleman_dim(n, ref)
    found.estimates.append(f"qcm: Carleman rows Delta = {delta:,} at N = {top} (n = {n}); reference N = {ref}: "
                           f"{delta_ref:,} rows; block system (T + 1) x Delta = {(q['T'] + 1) * delta:,} rows")
    if delta_ref > q["ref_max_dim"] and q["step_sizes"]:
        found.warnings.append(f"qcm: the reference order N = {ref} has {delta_ref:,} rows, above "
                              f"qcm.ref_max_dim = {q['ref_max_dim']:,}; the stage will refuse it")
    dense = min(delta, q["dense_limit"]) ** 2 * 8
    if memory_per_rank and dense > MEMORY_WARN_FRACTION * memory_per_rank:
        found.warnings.append(f"qcm: dense eigen/SVD work up to dense_limit needs {_gib(dense)}, more than "
                              f"{MEMORY_WARN_FRACTION:.0%} of the {_gib(memory_per_rank)} a rank has")


def preflight(cfg: RunConfig, ranks: int = 1, memory_per_rank: float = 0.0) -> Preflight:
    """Run every check for the stages ``[run] stages`` names.

    Args:
        cfg: the validated configuration.
        ranks: MPI ranks the run will use.
        memory_per_rank: bytes a rank may use; 0 = this machine's memory / ranks.

    Returns:
        The findings; the caller turns errors into a UserError.
    """
    found = Preflight()
    stages = cfg.stages
    memory_per_rank = memory_per_rank or machine_memory_bytes() / max(ranks, 1)
    check_models(cfg, stages, found)
    check_data(cfg, stages, found)
    check_sizes(cfg, stages, ranks, found)
    check_device(cfg, found)
    if "spectrum" in stages:
        estimate_spectrum(cfg, ranks, memory_per_rank, found)
    if "qcm" in stages:
        estimate_carleman(cfg, memory_per_rank, found)
    return found
