"""What ``hpcqml validate`` checks and estimates for the stages, as they declare it.

Each function here has the signature of :attr:`hpcqml.stages.Stage.estimate`:
``(config, ranks, memory_per_rank, found)``; it appends one-line findings to
``found.errors`` (would stop the run), ``found.warnings`` and ``found.estimates``.
This module registers no stage (its name starts with an underscore); the stage modules
name its functions in their ``register(...)`` calls.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from hpcqml.errors import UserError
from hpcqml.preflight import MEMORY_WARN_FRACTION, STATE_ITEMSIZE, Preflight, basis_plan, gib

if TYPE_CHECKING:
    from hpcqml.config import RunConfig

#: training images of CIFAR-100
CIFAR100_TRAIN = 50_000

Estimate = Callable[["RunConfig", int, float, Preflight], None]


def chain(*estimates: Estimate) -> Estimate:
    """One estimate that runs ``estimates`` in turn (a stage declares a single one)."""
    def run_all(cfg: RunConfig, ranks: int, memory_per_rank: float, found: Preflight) -> None:
        for estimate in estimates:
            estimate(cfg, ranks, memory_per_rank, found)
    return run_all


def training_images(data: dict[str, Any]) -> int:
    """Training images the ``[data]`` section gives: ``synth_train`` or CIFAR-100's 50,000."""
    return int(data["synth_train"]) if data["source"] == "synthetic" else CIFAR100_TRAIN


def check_model_name(key: str, name: str, found: Preflight) -> None:
    """A model name the stage will build (``resnet32-w4``, ...): an error line when unknown."""
    from hpcqml.models import parse_name

    try:
        parse_name(name)
    except UserError as exc:
        found.errors.append(f"{key}: {exc}")


def check_cifar_root(cfg: RunConfig, found: Preflight) -> None:
    """CIFAR-100 files (``[data] source = "cifar100"``): the directory with meta/train/test."""
    data = cfg.sections["data"]
    if data["source"] != "cifar100":
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


def parameters_of(cfg: RunConfig) -> tuple[str, int] | None:
    """``(model name, parameter count)`` of ``[pretrain] model`` (None when the name is unknown)."""
    from hpcqml.models import analytic_parameter_count, parse_name

    name = cfg.sections["pretrain"]["model"]
    try:
        parse_name(name)
    except UserError:
        return None
    classes = cfg.sections["data"]["synth_classes"] if cfg.sections["data"]["source"] == "synthetic" else 100
    return name, analytic_parameter_count(name, classes)


def estimate_spectrum(cfg: RunConfig, ranks: int, memory_per_rank: float, found: Preflight) -> None:
    """Lanczos basis bytes per rank, counted as the stage holds them
    (:func:`hpcqml.preflight.basis_plan`, the rule of
    :func:`hpcqml.stages.spectrum.plan_engine`): float32 bases of ``max_lanczos_steps``
    vectors sharded over one probe group of ``ranks / groups`` ranks, ``lockstep`` of them at
    once, or all of a group's ``max_probes`` when the steps may grow and they fit; the bytes
    of the Krylov bases kept on disk (``keep_bases``: about ``(m + 2) n`` values per probe
    when written); and the CIFAR-100 files.
    """
    check_cifar_root(cfg, found)
    model = parameters_of(cfg)
    if model is None:
        return
    name, n = model
    sp = cfg.sections["spectrum"]
    groups = max(int(sp["groups"]), 1)
    shards = max(ranks // groups, 1)
    # not capped at n: a step count above n is refused when the stage runs
    steps = int(sp["lanczos_steps"])
    max_steps = max(steps, int(sp["max_lanczos_steps"]))
    per_group = -(-max(int(sp["probes"]), int(sp["max_probes"])) // groups)
    plan = basis_plan(per_group, steps, max_steps, n, shards, STATE_ITEMSIZE, memory_per_rank,
                      lockstep=int(sp["lockstep"]), reorth=sp["reorth"])
    held = f"{plan.bases} basis(es) held at once ({plan.width} in lockstep" + \
        (f", {per_group} kept for step growth)" if plan.keep else ")")
    vectors = max_steps if sp["reorth"] == "full" else 2
    found.estimates.append(f"spectrum: Lanczos basis {vectors} x {n:,} parameters ({name}) x {STATE_ITEMSIZE} bytes / "
                           f"{shards} rank(s) = {gib(plan.per_basis)} per rank; {held} = {gib(plan.total)} per rank")
    if sp["keep_bases"] == "yes" or (sp["keep_bases"] == "auto" and max_steps > steps):
        probes = max(int(sp["probes"]), int(sp["max_probes"]))
        full = sp["reorth"] == "full"
        rows = f"{max_steps} steps + 2 vectors" if full else "2 vectors"
        disk = probes * (max_steps + 2 if full else 2) * n * STATE_ITEMSIZE
        found.estimates.append(f"spectrum: Krylov bases on disk (keep_bases = {sp['keep_bases']!r}): up to "
                               f"{gib(disk)} per model state and operator in <workdir>/spectrum-bases ({probes} "
                               f"probe(s) x {rows} x {n:,} x {STATE_ITEMSIZE} bytes; a file being rewritten "
                               "needs its size again)")
    if memory_per_rank and plan.total > MEMORY_WARN_FRACTION * memory_per_rank:
        what = "basis needs" if plan.bases == 1 else f"bases of {plan.bases} probes held at once need"
        found.warnings.append(f"spectrum: the Lanczos {what} {gib(plan.total)} per rank, more than "
                              f"{MEMORY_WARN_FRACTION:.0%} of the {gib(memory_per_rank)} a rank has; lower "
                              "spectrum.max_lanczos_steps or spectrum.lockstep, or use more ranks")


def estimate_carleman(cfg: RunConfig, _ranks: int, memory_per_rank: float, found: Preflight) -> None:
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
        found.warnings.append(f"qcm: dense eigen/SVD work up to dense_limit needs {gib(dense)}, more than "
                              f"{MEMORY_WARN_FRACTION:.0%} of the {gib(memory_per_rank)} a rank has")


def check_hhl_network_model(cfg: RunConfig, _ranks: int, _memory_per_rank: float, found: Preflight) -> None:
    """``[hhl] network_model`` when the cases include ``network``."""
    hhl = cfg.sections["hhl"]
    if "network" in hhl["cases"]:
        check_model_name("hhl.network_model", hhl["network_model"], found)


# ---- what the spectrum, qcm and hhl stages read (their Stage.reads) ---------------------

#: the stages a spectrum of each ``[spectrum] source`` reads
SPECTRUM_SOURCE: dict[str, tuple[str, ...]] = {
    "snapshots": ("train", "data"), "pruned": ("prune", "data"),
    "pretrained": ("pretrain", "data"), "file": ("data",)}


def spectrum_reads(sections: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """The model's stage for ``[spectrum] source`` and ``data``; also ``train`` when
    ``eta = 0`` (the error proxy's eta, eq. III.13, is then ``[train] lr``).
    """
    spectrum = sections.get("spectrum", {})
    reads = SPECTRUM_SOURCE.get(spectrum.get("source", "snapshots"), ("data",))
    if not spectrum.get("eta") and "train" in sections and "train" not in reads:
        reads += ("train",)
    return reads


def qcm_reads(sections: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """``prune`` and ``data`` for the network generator (a pruned model's Hessian block), else none."""
    return ("prune", "data") if sections.get("qcm", {}).get("generator") == "network" else ()


def hhl_reads(sections: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """``prune`` and ``data`` when the cases include ``network``, else none."""
    return ("prune", "data") if "network" in sections.get("hhl", {}).get("cases", ()) else ()
