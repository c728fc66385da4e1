"""A whole run (qcm + hhl stages through the runner and the store) under P ranks gives the
same numbers as the same run on one rank, and the results file is written once."""
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import small_qcm_hhl_config
from hpcqml.config import load_config
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline
from hpcqml.stages import schemas

pytestmark = pytest.mark.timeout(300)


def _run(comm, out: Path) -> None:
    text = small_qcm_hhl_config(out, seed=3, qcm_T=5, readout_trials=10, run_extra="threads = 1\n")
    cfg = load_config("pipeline.toml", schemas(), text=text)
    run_pipeline(cfg, comm, quiet=True)


def _datasets(path: Path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path, "r") as fh:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and (name.startswith("qcm/") or name.startswith("hhl/")) \
                    and not name.endswith(("bytes_per_rank", "bytes_per_rank_M")):
                found[name] = obj[()]
        fh.visititems(visit)
    return found


def test_run_matches_one_rank():
    from mpi4py import MPI

    comm = world()
    tmp = Path(comm.bcast(tempfile.mkdtemp(prefix="hpcqml-mpi-") if comm.Get_rank() == 0 else None))
    _run(comm, tmp / "p.h5")
    if comm.Get_rank() == 0:
        _run(MPI.COMM_SELF, tmp / "one.h5")
        many, one = _datasets(tmp / "p.h5"), _datasets(tmp / "one.h5")
        assert set(many) == set(one) and len(one) > 20
        for name, ref in one.items():
            if ref.dtype.kind in "fc":
                np.testing.assert_allclose(many[name], ref, rtol=1e-9, atol=1e-12, err_msg=name)
            else:
                np.testing.assert_array_equal(many[name], ref, err_msg=name)
        with h5py.File(tmp / "p.h5", "r") as fh:
            assert fh.attrs["prov_mpi_size"] == comm.Get_size()
            assert fh["perf/qcm/wall_seconds"].shape == (comm.Get_size(),)
            assert fh.attrs["prov_status"] == "completed"
            assert not (tmp / "p.h5.lock").exists()            # the writer lock was given back
            with h5py.File(tmp / "one.h5", "r") as ref:    # the rank count is not a setting
                for stage in ("qcm", "hhl"):
                    assert fh[f"fingerprints/{stage}"].attrs["sha256"] == ref[f"fingerprints/{stage}"].attrs["sha256"]
    comm.Barrier()


def test_second_writer_refused_on_every_rank():
    """A lock held by a live run refuses a parallel run on every rank with the same line."""
    from hpcqml.errors import UserError
    from hpcqml.store import ResultsLock

    comm = world()
    tmp = Path(comm.bcast(tempfile.mkdtemp(prefix="hpcqml-mpi-") if comm.Get_rank() == 0 else None))
    lock = ResultsLock(tmp / "p.h5")
    if comm.Get_rank() == 0:
        lock.acquire()
    comm.Barrier()
    with pytest.raises(UserError, match="being written by another run"):
        _run(comm, tmp / "p.h5")
    comm.Barrier()
    if comm.Get_rank() == 0:
        lock.release()
    _run(comm, tmp / "p.h5")
    comm.Barrier()
