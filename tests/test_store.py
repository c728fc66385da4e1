"""Results store: crash safety under SIGKILL, resume, refusal of a changed config."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from hpcqml.config import Field, load_config
from hpcqml.errors import UserError
from hpcqml.parallel import world
from hpcqml.runner import run_pipeline
from hpcqml.stages import REGISTRY, Stage, register
from hpcqml.store import SCHEMA_VERSION, is_complete, open_results

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from mpi4py import MPI
    from hpcqml.store import ResultsStore
    store = ResultsStore(sys.argv[1], MPI.COMM_WORLD)
    store.open_run("x = 1", "sha", {"command_line": "writer"})
    for i in range(100000):
        data = np.full((200, 50), float(i))   # 80 kB per unit: the copy-and-rename is not instant
        store.commit(f"units/u{i:06d}", lambda g, d=data: g.create_dataset("data", data=d), attrs={"i": i})
        print(i, flush=True)
""")


def test_sigkill_mid_write_leaves_readable_file(tmp_path):
    path = tmp_path / "crash.h5"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + 240   # generous: a loaded 2-core machine
    while seen < 15 and time.time() < deadline:
        line = proc.stdout.readline()
        if line:
            seen = int(line) + 1
    time.sleep(0.037)  # land somewhere inside a later commit
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen >= 15, "writer made no progress"
    with open_results(path) as fh:
        assert fh.attrs["schema_version"] == SCHEMA_VERSION
        units = sorted(fh["units"])
        assert len(units) >= seen            # every unit reported done is there
        for name in units:
            assert is_complete(fh, f"units/{name}")
            i = int(fh[f"units/{name}"].attrs["i"])
            np.testing.assert_array_equal(fh[f"units/{name}/data"][()], np.full((200, 50), float(i)))
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(leftovers) <= 1  # at most the interrupted copy, never the results file itself


def test_open_results_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_results(tmp_path / "none.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"this is not hdf5")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        open_results(bad)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh["x"] = 1
    with pytest.raises(UserError, match="no schema_version"):
        open_results(foreign)


CALLS: list[int] = []
FAIL_AT = {"unit": -1}   # a crash injected from outside the config, like a node failure


def _counting_stage(ctx):
    for unit in range(ctx.cfg["units"]):
        key = f"counting/unit_{unit:03d}"
        if ctx.store.is_complete(key):
            continue
        if unit == FAIL_AT["unit"]:
            raise RuntimeError(f"deliberate failure at unit {unit}")
        CALLS.append(unit)
        ctx.perf.count("units", 1)
        ctx.store.commit(key, lambda g, u=unit: g.create_dataset("value", data=np.float64(u) ** 2))


@pytest.fixture
def counting_stage():
    stage = register(Stage("counting", {"units": Field(int, 4, min=1)}, _counting_stage, doc="test stage"))
    CALLS.clear()
    yield stage
    FAIL_AT["unit"] = -1
    REGISTRY.pop("counting", None)


def _config(tmp_path, units=4):
    from hpcqml.stages import schemas

    text = f'[run]\noutput = "{tmp_path}/r.h5"\nstages = ["counting"]\n[counting]\nunits = {units}\n'
    return load_config("t.toml", schemas(), text=text)


def test_resume_without_recomputation(tmp_path, counting_stage):
    comm = world()
    FAIL_AT["unit"] = 2
    with pytest.raises(RuntimeError, match="deliberate"):
        run_pipeline(_config(tmp_path), comm, quiet=True)
    assert CALLS == [0, 1]
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        assert fh["provenance/run_000"].attrs["status"] == "failed"
        assert not is_complete(fh, "perf/counting")
    FAIL_AT["unit"] = -1
    # the same config resumes after the last completed unit
    CALLS.clear()
    run_pipeline(_config(tmp_path), comm, quiet=True)
    assert CALLS == [2, 3]
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        assert [float(fh[f"counting/unit_{u:03d}/value"][()]) for u in range(4)] == [0.0, 1.0, 4.0, 9.0]
        assert is_complete(fh, "perf/counting")
        assert fh["perf/counting/counters/units"][()].sum() == 2
        assert bool(fh["perf/counting"].attrs["resumed"])      # timings of a part of the work
        assert fh["provenance/run_001"].attrs["status"] == "completed"
        assert fh.attrs["prov_status"] == "completed"
    # a completed stage is skipped entirely on the next run
    CALLS.clear()
    run_pipeline(_config(tmp_path), comm, quiet=True)
    assert CALLS == []
    # a changed setting of the stage recomputes it from scratch
    CALLS.clear()
    run_pipeline(_config(tmp_path, units=5), comm, quiet=True)
    assert CALLS == [0, 1, 2, 3, 4]
    # --overwrite starts again
    CALLS.clear()
    run_pipeline(_config(tmp_path, units=3), comm, quiet=True, overwrite=True)
    assert CALLS == [0, 1, 2]


def test_provenance_recorded(tmp_path, counting_stage):
    run_pipeline(_config(tmp_path), world(), quiet=True, argv=["hpcqml", "run", "t.toml"])
    with open_results(tmp_path / "r.h5") as fh:
        a = fh.attrs
        for key in ("config_toml", "config_sha256", "hpcqml_version", "prov_git_commit", "prov_command_line",
                    "prov_mpi_size", "prov_hosts", "prov_version_torch", "prov_version_petsc4py",
                    "prov_version_mpi_library", "prov_version_gpu", "prov_version_cuda", "prov_job_id",
                    "prov_threads", "prov_threads_source", "prov_seed_run_seed", "prov_start_time",
                    "prov_end_time"):
            assert key in a, key
        assert a["prov_command_line"] == "hpcqml run t.toml"
        assert a["prov_version_mpi_library"].startswith("Open MPI")   # the MPI library, first line
        perf = fh["perf/counting"]
        assert perf["wall_seconds"].shape == (1,) and perf["peak_host_bytes"][0] > 0


def test_results_follow_the_umask_and_stale_temporaries_are_swept(tmp_path, counting_stage):
    stale = tmp_path / ".r.h5.abcd1234.tmp"
    stale.write_bytes(b"left by a killed commit")
    old = os.umask(0o022)
    try:
        run_pipeline(_config(tmp_path), world(), quiet=True)
    finally:
        os.umask(old)
    assert (tmp_path / "r.h5").stat().st_mode & 0o777 == 0o644
    assert not stale.exists()


def test_overwrite_never_deletes_a_folder_hpcqml_did_not_make(tmp_path, counting_stage):
    from hpcqml.stages import schemas

    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "data.bin").write_bytes(b"x")
    text = (f'[run]\noutput = "{tmp_path}/r.h5"\nworkdir = "{mine}"\nstages = ["counting"]\n')
    cfg = load_config("t.toml", schemas(), text=text)
    run_pipeline(cfg, world(), quiet=True)
    with pytest.raises(UserError, match="not created by hpcqml"):
        run_pipeline(cfg, world(), quiet=True, overwrite=True)
    assert (mine / "data.bin").exists()
    # a work directory hpcqml made itself is removed and made again
    run_pipeline(_config(tmp_path), world(), quiet=True)
    work = tmp_path / "r.work"
    (work / "old.pt").write_bytes(b"old")
    run_pipeline(_config(tmp_path), world(), quiet=True, overwrite=True)
    assert work.exists() and not (work / "old.pt").exists()


def test_read_errors_that_are_not_damage_are_not_reported_as_damage(tmp_path):
    """Only unreadable bytes are 'damaged'; a reader's own error or a bug keeps its message."""
    from hpcqml.parallel import world
    from hpcqml.store import ResultsStore

    store = ResultsStore(tmp_path / "r.h5", world())
    store.open_run("x = 1", "sha", {"command_line": "t"})
    store.commit("a")

    def user_error(fh):
        raise UserError("[spectrum] no snapshot for step 7")

    with pytest.raises(UserError, match=r"^\[spectrum\] no snapshot for step 7$"):
        store.read(user_error)
    with pytest.raises(KeyError, match="missing"):
        store.read(lambda fh: {}["missing"])
    store.close_run("completed")


def test_sweep_of_temporaries_treats_the_name_literally(tmp_path):
    """A results name with glob characters sweeps only its own temporaries."""
    from hpcqml.io import remove_stale_temporaries

    own, other = tmp_path / ".run[1].h5.abc.tmp", tmp_path / ".run1.h5.abc.tmp"
    own.write_bytes(b"")
    other.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path, "run[1].h5") == [own]
    assert other.exists()
