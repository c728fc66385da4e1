"""After a checkpointing stop the ranks leave in order, so Open MPI's ``mpirun`` has no rank
to kill and returns at once.

Ending a stop with ``MPI_Abort``, or with a non-zero status, starts mpirun's kill sequence
(SIGCONT, wait ``odls_base_sigkill_timeout``, SIGTERM, wait again, SIGKILL), which the job
scripts' 30 s timeout made a minute long.  mpirun logs at ``state_base_verbose`` 5 how each
rank ended ("NORMALLY TERMINATED", or "KILLED BY INTERNAL COMMAND" when its kill sequence
took the rank), so the test checks for that event, not for a time.
The job scripts ask for status 0 from a stop (``HPCQML_STOP_STATUS=0``); run by hand the
stop still exits with status 2.
"""
from __future__ import annotations

import signal
import subprocess
import time

import h5py
import pytest
from conftest import PYTHON, REPO, TRAINING, child_env, mpiexec

from hpcqml.training.checkpoint import load_checkpoint
from hpcqml.training.signals import stop_status



def test_stop_status_reads_only_a_valid_status():
    assert stop_status({}) is None and stop_status({"HPCQML_STOP_STATUS": ""}) is None
    assert stop_status({"HPCQML_STOP_STATUS": "0"}) == 0 and stop_status({"HPCQML_STOP_STATUS": " 3 "}) == 3
    for bad in ("-1", "256", "x", "1.5"):
        assert stop_status({"HPCQML_STOP_STATUS": bad}) is None, bad


@pytest.mark.timeout(300)
def test_a_stopped_run_leaves_mpirun_nothing_to_kill(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(TRAINING.format(out=tmp_path / "t.h5"))
    env = child_env(HPCQML_STOP_STATUS="0", OMPI_MCA_odls_base_sigkill_timeout="1")
    cmd = [*mpiexec(), "--mca", "state_base_verbose", "5", "-n", "2", PYTHON, "-m", "hpcqml", "run", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = tmp_path / "t.work" / "snapshots" / "step_000003.pt"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "training never reached step 3"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)         # what the job script forwards to mpirun
    out, _ = proc.communicate(timeout=200)
    state = load_checkpoint(tmp_path / "t.work" / "train_state.pt")
    assert 3 <= state.step < 5000
    stops = [line for line in out.splitlines() if "stopped by SIGUSR1" in line]
    assert stops == [f"hpcqml: error (rank 0 of 2): stopped by SIGUSR1 (wall-time warning): train after step "
                     f"{state.step} of 5000; saved checkpoint {tmp_path / 't.work' / 'train_state.pt'} "
                     f"(step {state.step}); no requeue; run the same command again to continue"], out[-3000:]
    assert "MPI_ABORT was invoked" not in out, out[-3000:]
    ended = [line.split(" STATE ", 1)[1].split(" AT ")[0] for line in out.splitlines()
             if "ACTIVATE PROC" in line and (" NORMALLY TERMINATED " in line or " KILLED " in line)]
    assert sorted(ended) == ["NORMALLY TERMINATED"] * 2, out[-3000:]   # no kill sequence
    assert proc.returncode == 0, out[-3000:]
    with h5py.File(tmp_path / "t.h5", "r") as fh:   # rank 0 recorded the stop before leaving
        assert fh["train_log"].attrs["steps_done"] == state.step
        latest = fh["provenance"][sorted(fh["provenance"])[-1]]
        assert latest.attrs["status"] == "interrupted" and "stopped by SIGUSR1" in latest.attrs["error"]
