"""A kill that lands inside a commit's write leaves the results file exactly as it was.

The child process kills itself with SIGKILL from inside the ``write`` callback of
:meth:`hpcqml.store.ResultsStore.commit`, after writing part of the new group: the kill is
provably inside the write, with no timing involved. Copy-and-rename never touches the
original file before the rename, so its bytes must be unchanged; an in-place edit would
have changed them (the group deleted, half a dataset written, the superblock touched).
"""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from conftest import REPO, child_env
from hpcqml.store import SCHEMA_VERSION, is_complete, open_results

CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from mpi4py import MPI
    from hpcqml.store import ResultsStore

    path, phase = sys.argv[1], sys.argv[2]
    store = ResultsStore(path, MPI.COMM_SELF)
    if phase == "setup":
        store.open_run("x = 1", "sha", {"command_line": "setup"})
        store.commit("units/a", lambda g: g.create_dataset("data", data=np.arange(1000.0)), attrs={"i": 1})
        store.close_run("completed")
        sys.exit(0)

    def write(g):
        g.create_dataset("data", data=np.full(200_000, -1.0))   # 1.6 MB of new content first
        g.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)                     # then die inside the write

    store.commit(phase, write, attrs={"i": 2})
    sys.exit(3)   # never reached
""")


def _child(*args: str) -> subprocess.CompletedProcess:
    """Run the child script with this checkout's package first on the path."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env=child_env(PYTHONPATH=str(REPO)))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("key", ["units/a", "units/b"], ids=["replace-existing", "add-new"])
def test_sigkill_inside_the_write_leaves_the_original_bytes(tmp_path, key):
    path = tmp_path / "r.h5"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    setup = _child(str(script), str(path), "setup")
    assert setup.returncode == 0, setup.stderr
    before = _sha256(path)

    killed = _child(str(script), str(path), key)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)  # died inside write()

    assert _sha256(path) == before   # not one byte of the original changed
    with open_results(path) as fh:
        assert fh.attrs["schema_version"] == SCHEMA_VERSION
        assert sorted(fh["units"]) == ["a"]
        assert is_complete(fh, "units/a") and int(fh["units/a"].attrs["i"]) == 1
        np.testing.assert_array_equal(fh["units/a/data"][()], np.arange(1000.0))
    # The interrupted copy is the only trace, under the temporary-name pattern the next run sweeps.
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in {"r.h5", "child.py"})
    assert len(leftovers) == 1 and leftovers[0].startswith(".r.h5.") and leftovers[0].endswith(".tmp")
    with h5py.File(tmp_path / leftovers[0], "r") as tmp:   # it did receive the partial write
        assert tmp[f"{key}/data"].shape == (200_000,)
