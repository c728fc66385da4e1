"""Shared test helpers: paths, the MPI launcher, and running the CLI as users do."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def mpiexec() -> list[str]:
    """The MPI launcher, as the Makefile spells it (override with $MPIEXEC)."""
    if os.environ.get("MPIEXEC"):
        return shlex.split(os.environ["MPIEXEC"])
    cmd = ["mpirun", "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: Python's copy of it, which lacks the OMPI_*/PMIX_*
    variables an MPI singleton (mpi4py imported in this pytest process) set at C level;
    a child ``mpirun`` that inherits those loses its ranks' output."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_cli(*args: str, ranks: int = 0, timeout: float = 300, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``hpcqml ARGS`` (under mpirun with ``ranks`` > 0) and capture its output."""
    cmd = [PYTHON, "-m", "hpcqml", *args]
    if ranks:
        cmd = [*mpiexec(), "-n", str(ranks), *cmd]
    full_env = child_env(**(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=full_env)


def launched_ranks() -> int:
    """World size this pytest process was started with by an MPI launcher (1 without one).

    Read from the launcher's environment (Open MPI, MPICH/PMI, the tasks of an srun step),
    so that asking does not initialise MPI.
    """
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests/mpi on a single rank: there every "sharded equals serial" comparison holds
    trivially (one shard is the whole). ``make test-mpi`` runs them under 2 and 3 ranks.
    """
    if launched_ranks() > 1:
        return
    mpi_dir = REPO / "tests" / "mpi"
    skip = pytest.mark.skip(reason="MPI test: needs >= 2 ranks (make test-mpi); on one rank it compares a "
                                   "shard with itself")
    for item in items:
        if mpi_dir in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def small_qcm_hhl_config(out: Path, *, stages: tuple[str, ...] = ("qcm", "hhl"), seed: int = 0, qcm_T: int = 6,
                         readout_trials: int = 20, run_extra: str = "", qcm_extra: str = "") -> str:
    """The smallest config that runs the real qcm and hhl stages (n = 2, seconds on one core).

    The report, ``info`` and figure tests build their results files from it, each with its
    own stages, seed and extra keys (``run_extra`` under ``[run]``, ``qcm_extra`` under
    ``[qcm]``).
    """
    names = ", ".join(f'"{s}"' for s in stages)
    return (f'[run]\noutput = "{out}"\nstages = [{names}]\nseed = {seed}\n{run_extra}'
            f"[qcm]\nn = 2\nf = [1.0, 0.5]\nN = [1, 2]\nT = {qcm_T}\nstep_sizes = []\n{qcm_extra}"
            f"[hhl]\nn = 2\nN = 1\nT = 2\nclock_qubits = [3, 5]\nkappa_a = [0.0, 2.0]\n"
            f"readout_trials = {readout_trials}\n")


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The probe numbers of every Lanczos recurrence started from scratch, in order (one
    extended in memory or restored from its Krylov basis on disk is not started again)."""
    from hpcqml.hessian.lockstep import LanczosEngine

    real, calls = LanczosEngine.start, []

    def counting(self: LanczosEngine, number: int, *args: object, **kw: object) -> None:
        calls.append(number)
        return real(self, number, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(LanczosEngine, "start", counting)
    return calls

@pytest.fixture
def repo() -> Path:
    return REPO


def attr_text(value: object) -> str:
    """An HDF5 string attribute as text, whether h5py hands it back as ``str`` or ``bytes``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def truncation_reference(lam: Any, beta: Any, kappa: float) -> dict[str, float]:
    """Truncated HHL from scratch, for a Hermitian system with eigenvalues ``lam`` (scaled to
    ``||H|| = 1``) and the coefficients ``beta`` of the unit vector b on its eigenvectors:
    eq. II.87 (``ii87``), the annealed Haar estimate of eq. II.89-II.91 (``haar``) and the
    weight of b below the threshold 1/kappa_a (``ill``)."""
    import numpy as np

    lam, w2 = np.asarray(lam), np.asarray(beta) ** 2
    well = np.abs(lam) >= 1 / kappa
    s_well = np.sum(w2[well] / lam[well] ** 2)
    ii87 = s_well / np.sqrt(np.sum(w2 / lam**2) * (s_well + np.sum(w2[~well])))
    t_well = np.sum(1 / lam[well] ** 2)
    haar = t_well / np.sqrt(np.sum(1 / lam**2) * (t_well + np.count_nonzero(~well)))
    return {"ii87": float(ii87), "haar": float(haar), "ill": float(np.sum(w2[~well]))}


def schema_table(doc: str, heading: str) -> list[tuple[str, ...]]:
    """The rows of the first markdown table after ``heading`` in ``docs/schema/<doc>``, one
    tuple of cells each (code spans unwrapped, ``\\|`` read as ``|``): the stored units and
    descriptions that the writer tests compare a written group with, word for word."""
    section = (REPO / "docs" / "schema" / doc).read_text().split(heading, 1)[1].split("\n#", 1)[0]
    return [tuple(c.strip().replace("\\|", "|").strip("`") for c in re.split(r"(?<!\\)\|", line)[1:-1])
            for line in section.splitlines() if line.startswith("| `")]


def undocumented_datasets(path: Path) -> list[str]:
    """Datasets of results file ``path`` whose names the schema docs do not mention.

    The docs (``docs/results-schema.md`` and ``docs/schema/*.md``) name datasets literally or
    by pattern: ``NAME_per_probe``/``NAME_resolution`` beside every estimate, ``error_proxy_tT``
    for each t, digits as placeholders (``probe_000``), and the masks by parameter name.
    """
    import h5py

    docs = "\n".join(p.read_text() for p in [REPO / "docs" / "results-schema.md",
                                              *sorted((REPO / "docs" / "schema").glob("*.md"))])

    def norm(text: str) -> str:
        return re.sub(r"\d+", "#", text)

    known = norm(docs)
    missing = []

    def visit(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset) or "/mask/" in f"/{name}":
            return
        leaf = re.sub(r"_(per_probe|resolution)$", "", name.rsplit("/", 1)[-1])
        leaf = re.sub(r"^error_proxy_t\d+$", "error_proxy_tT", leaf)
        if norm(leaf) not in known:
            missing.append(name)
    with h5py.File(path, "r") as fh:
        fh.visititems(visit)
    return missing


#: a training run long enough to be stopped by a signal mid-way (job-script and orderly-stop tests)
TRAINING = """[run]
output = "{out}"
stages = ["data", "pretrain", "prune", "train"]
seed = 2
threads = 1
device = "cpu"
[data]
synth_train = 64
synth_test = 8
synth_classes = 4
[pretrain]
model = "resnet8-w1"
epochs = 1
batch_size = 16
[prune]
keep_fraction = 0.2
evaluate = false
[train]
steps = 5000
batch_size = 8
test_interval = 0
snapshot_every = 3
checkpoint_every = 1000
"""


@pytest.fixture
def drawn(monkeypatch):
    """Figures handed to the report's ``_save`` during a test, by file name (the PNG is still
    written), so that a test can check what each figure draws."""
    from hpcqml.report import figures

    out: dict[str, object] = {}
    original = figures._save

    def keep(fig, where, name):
        out[name] = fig
        return original(fig, where, name)

    monkeypatch.setattr(figures, "_save", keep)
    return out
