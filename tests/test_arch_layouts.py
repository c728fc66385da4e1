"""Typed seams and layouts owned by their types: the communicator and store protocols, the
performance records and the training log (``to_group``/``from_group``), and the clearer
names of the error-proxy datasets.

Files are written through the real store (``ResultsStore`` on ``MPI.COMM_WORLD``, one rank)
and read back through ``hpcqml.results``; every expected value is known exactly here.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpcqml import results
from hpcqml.perf import PerfRecord, StagePerf, gather_records, write_records
from hpcqml.protocols import Comm
from hpcqml.store import ResultsStore, write_dataset
from hpcqml.training.log import HISTORY_DOCS, HISTORY_KEYS, TrainingLog

REPO = Path(__file__).resolve().parents[1]


def _store(path: Path) -> ResultsStore:
    store = ResultsStore(path, MPI.COMM_WORLD)
    store.open_run("x = 1", "sha", {"command_line": "test"})
    return store


def _history(steps: int) -> dict[str, list]:
    """A per-step log of ``steps`` updates with known values (the loop's history lists)."""
    t = list(range(1, steps + 1))
    return {"step": t, "loss": [2.0 / k for k in t], "batch_accuracy": [0.1 * k for k in t],
            "test_loss": [float("nan") if k % 2 else 1.0 / k for k in t],
            "test_accuracy": [float("nan") if k % 2 else 0.5 for k in t], "sparsity": [0.9] * steps,
            "sparsity_before_download": [0.8] * steps, "download": [k % 3 == 0 for k in t],
            "quantum_eligible": [k > 1 for k in t]}


def test_mpi4py_communicator_is_a_comm():
    """The world communicator and its splits have every method the protocol names."""
    assert isinstance(MPI.COMM_WORLD, Comm)
    sub = MPI.COMM_WORLD.Split(0, 0)
    try:
        assert isinstance(sub, Comm)
    finally:
        sub.Free()
    assert not isinstance(object(), Comm)


def test_protocols_match_the_real_classes_under_mypy(tmp_path):
    """mypy accepts mpi4py's communicator as ``Comm`` and ``ResultsStore``/``StagePerf`` as
    ``Store``/``PerfTimer``, and refuses a class that lacks a method (so the check has teeth).
    """
    pytest.importorskip("mypy")
    good = tmp_path / "good.py"
    good.write_text(textwrap.dedent("""
        from mpi4py import MPI
        from hpcqml.perf import StagePerf
        from hpcqml.protocols import Comm, PerfTimer, Store
        from hpcqml.store import ResultsStore

        comm: Comm = MPI.COMM_WORLD
        store: Store = ResultsStore("r.h5", comm)
        perf: PerfTimer = StagePerf("x")
    """))
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        from hpcqml.protocols import Comm

        class OnlyRank:
            def Get_rank(self) -> int:
                return 0

        comm: Comm = OnlyRank()
    """))
    args = [sys.executable, "-m", "mypy", "--no-incremental", "--ignore-missing-imports", "--follow-imports=silent",
            "--cache-dir", str(tmp_path / "cache")]
    ok = subprocess.run([*args, str(good)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = subprocess.run([*args, str(bad)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "Comm" in refused.stdout, refused.stdout + refused.stderr


def test_perf_record_round_trip_through_the_store(tmp_path):
    perf = StagePerf("counting")
    perf.count("hvp_products", 12)
    perf.count("samples", 2.5)
    perf.wall_seconds, perf.comm_seconds, perf.peak_host_bytes, perf.peak_gpu_bytes = 3.25, 0.5, 1 << 20, 0
    records = gather_records(MPI.COMM_WORLD, perf)
    store = _store(tmp_path / "r.h5")
    store.commit("perf/counting", lambda g: write_records(g, records, True),
                 attrs={"invocation": store.invocation or "", "resumed": True})
    with results.open(tmp_path / "r.h5") as res:
        rec = res.perf["counting"]
    assert isinstance(rec, PerfRecord) and rec.stage == "counting" and rec.ranks == 1
    assert rec.wall_seconds.tolist() == [3.25] and rec.comm_seconds.tolist() == [0.5]
    assert rec.peak_host_bytes.tolist() == [1 << 20] and rec.peak_gpu_bytes.tolist() == [0]
    assert {k: v.tolist() for k, v in rec.counters.items()} == {"hvp_products": [12.0], "samples": [2.5]}
    assert rec.resumed and rec.invocation == store.invocation and rec.peak_host_scope == "stage"
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        g = fh["perf/counting"]
        assert g["wall_seconds"].attrs["units"] == "s" and g["peak_host_bytes"].dtype == np.int64
        assert g.attrs["ranks"] == 1 and g.attrs["peak_host_scope"] == "stage"


def test_perf_record_of_an_older_file_reads(tmp_path):
    """A record written before ``counters`` and ``peak_host_scope`` existed reads with defaults."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as fh:
        g = fh.create_group("perf/data")
        for name, value in (("wall_seconds", [1.0, 2.0]), ("comm_seconds", [0.0, 0.1]),
                            ("peak_host_bytes", [10, 20]), ("peak_gpu_bytes", [0, 0])):
            g[name] = np.array(value)
        rec = PerfRecord.from_group("data", g)
    assert rec.ranks == 2 and rec.counters == {} and not rec.resumed
    assert rec.invocation == "" and rec.peak_host_scope == "process"
    assert rec.wall_seconds.tolist() == [1.0, 2.0]


def test_training_log_round_trip_through_the_store(tmp_path):
    hist = _history(5)
    store = _store(tmp_path / "r.h5")
    log = TrainingLog.from_history(hist, {0, 2, 4, 10}, done=5)   # step 10 planned, not reached
    store.commit("train", log.to_group, attrs={"model": "resnet8-w1", "steps": 5})
    with results.open(tmp_path / "r.h5") as res:
        back = res.training_log
        section = res.training
    assert back is not None and section is not None and back.steps == 5
    assert back.snapshot_steps.tolist() == [0, 2, 4]
    for key in HISTORY_KEYS:
        np.testing.assert_array_equal(back.columns[key], np.asarray(hist[key]), err_msg=key)
        assert (back.units[key], back.descriptions[key]) == HISTORY_DOCS[key]
        np.testing.assert_array_equal(section.arrays[key], back.columns[key])
    assert back.columns["step"].dtype == np.int64 and back.columns["download"].dtype == np.bool_
    assert back.attrs["model"] == "resnet8-w1" and section.attrs["steps"] == 5
    assert section.quantity("loss").units == "nat"


def test_train_stage_writer_is_the_log_type(tmp_path):
    """The train stage commits through ``TrainingLog.to_group`` (same datasets, same values)."""
    from hpcqml.stages.train import history_writer

    hist = _history(3)
    with h5py.File(tmp_path / "a.h5", "w") as fh:
        history_writer(hist, {1, 3}, 3)(fh.create_group("train"))
        via_stage = TrainingLog.from_group(fh["train"])
    assert sorted(via_stage.columns) == sorted(HISTORY_KEYS)
    assert via_stage.snapshot_steps.tolist() == [1, 3]
    np.testing.assert_array_equal(via_stage.columns["loss"], [2.0, 1.0, 2.0 / 3.0])


def test_training_log_of_an_older_file_reads(tmp_path):
    """A log without the later ``sparsity_before_download`` column, and no snapshots, reads."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as fh:
        g = fh.create_group("train")
        write_dataset(g, "step", np.arange(1, 4, dtype=np.int64), "count", "update number")
        write_dataset(g, "loss", np.array([3.0, 2.0, 1.0]), "nat", "batch loss")
        log = TrainingLog.from_group(g)
    assert log.steps == 3 and sorted(log.columns) == ["loss", "step"]
    assert log.snapshot_steps.size == 0 and log.units["loss"] == "nat"


@pytest.fixture()
def spectrum_file(tmp_path):
    """A results file with one state's density and error-proxy groups, as the stage lays them out."""
    path = tmp_path / "s.h5"
    store = _store(path)

    def write(g: h5py.Group) -> None:
        d = g.create_group("density")
        write_dataset(d, "grid", np.linspace(-1.0, 3.0, 5), "nat", "eigenvalue grid of the smoothed density")
        write_dataset(d, "rho", np.full(5, 0.25), "1/nat", "smoothed density")
        p = g.create_group("proxy")
        write_dataset(p, "t", np.arange(4, dtype=np.float64), "count", "t")
        for conv, scale in (("eta", 1.0), ("paper", 2.0)):
            c = p.create_group(conv)
            write_dataset(c, "nodes", scale * np.array([1.0, 0.5, 0.25, 0.125]), "1", "E(t) from the nodes")
            write_dataset(c, "grid", scale * np.array([1.0, 0.6, 0.3, 0.2]), "1", "E(t) from the density")
            write_dataset(c, "log_nodes", np.log(scale * np.array([1.0, 0.5, 0.25, 0.125])), "1", "log")
            c.attrs["convention"] = conv

    store.commit("spectrum/step_000010/result", write)
    return path


def test_clear_names_of_the_proxy_and_density_datasets(spectrum_file):
    with results.open(spectrum_file) as res:
        proxy = res.section("spectrum/step_000010/result/proxy/eta")
        density = res.section("spectrum/step_000010/result/density")
    assert proxy is not None and density is not None
    # E(t) from the density, by its clear name and by the stored one
    np.testing.assert_array_equal(proxy.array("error_proxy_density"), [1.0, 0.6, 0.3, 0.2])
    np.testing.assert_array_equal(proxy.array("grid"), proxy.array("error_proxy_density"))
    assert proxy.quantity("error_proxy_nodes").description == "E(t) from the nodes"
    # the density's grid is a grid of eigenvalues
    np.testing.assert_array_equal(density.array("eigenvalue_grid"), np.linspace(-1.0, 3.0, 5))
    assert density.quantity("eigenvalue_grid").units == "nat"
    assert density.quantity("density").units == "1/nat"
    with pytest.raises(KeyError, match="no dataset 'eigenvalue_grid'"):
        proxy.quantity("eigenvalue_grid")   # an alias of another group does not leak


def test_proxy_curves_read_by_convention(spectrum_file):
    with h5py.File(spectrum_file, "r") as fh:
        curves = results.proxy_curves(fh["spectrum/step_000010/result"])
    assert sorted(curves) == ["eta", "paper"]
    paper = curves["paper"]
    np.testing.assert_array_equal(paper.t, [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(paper.error_proxy_nodes, [2.0, 1.0, 0.5, 0.25])
    np.testing.assert_array_equal(paper.error_proxy_density, [2.0, 1.2, 0.6, 0.4])
    np.testing.assert_allclose(np.exp(paper.log_error_proxy_nodes), paper.error_proxy_nodes, rtol=1e-15)
    assert paper.log_error_proxy_density is None and paper.attrs["convention"] == "paper"
