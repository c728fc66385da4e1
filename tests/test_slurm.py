"""A real one-node SLURM (env/slurm-local.sh): a rendered sbatch script runs a tiny config
under MPI, its results file passes ``hpcqml info``, resubmitting resumes, and the
batch-shell warning signal checkpoints-and-requeues while SIGTERM (a cancel) checkpoints
and stops without requeue.  The daemons the test started are
stopped by their pids at the end.  Skipped, with the reason, where SLURM cannot be run."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from hpcqml.jobs.render import JobSpec, render

SCRIPT = REPO / "env" / "slurm-local.sh"
VENV = REPO / ".venv"

TINY = """[run]
name = "slurm-tiny"
output = "results/tiny.h5"
stages = ["data"]
threads = 1
[data]
synth_train = 64
synth_test = 16
synth_classes = 4
"""

FAKE_LAUNCH = """#!/bin/bash
# stand-in launcher: the first run waits for SIGUSR1 (checkpoint and stop; the job script
# notes whether it stands for the warning or a cancel), the requeued run finds the marker
# and finishes at once
echo "args: $*" >> fake.log
if [ -f fake.marker ]; then echo "resumed" >> fake.log; exit 0; fi
trap 'echo "got USR1 (note $(cat "$HPCQML_STOP_NOTE"))" >> fake.log; touch fake.marker; exit 0' USR1
trap 'echo "got TERM" >> fake.log; touch fake.marker; exit 0' TERM
for i in $(seq 1 600); do sleep 0.1; done
exit 3
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids(state: Path) -> dict[str, int]:
    out = {}
    for name in ("munged", "slurmctld", "slurmd"):
        f = state / f"{name}.pid"
        if f.is_file() and f.read_text().strip():
            out[name] = int(f.read_text().strip())
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def slurm():
    """Start a private SLURM (own state dir and ports); yield the client environment."""
    if os.geteuid() != 0:
        pytest.skip("env/slurm-local.sh runs slurmctld/slurmd as root; tests are not running as root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and there is no apt-get to install it")
    # short path: the munge socket path must stay below the UNIX socket limit (108 bytes)
    state = Path(tempfile.mkdtemp(prefix="hq-slurm-", dir="/tmp"))
    ctld_port = _free_port()
    slurmd_port = _free_port()
    while slurmd_port == ctld_port:
        slurmd_port = _free_port()
    env = dict(os.environ, HPCQML_SLURM_DIR=str(state), HPCQML_SLURMCTLD_PORT=str(ctld_port),
               HPCQML_SLURMD_PORT=str(slurmd_port))
    res = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=300)
    started = _pids(state)
    try:
        if res.returncode != 0:
            if "apt-get install slurm-wlm munge failed" in res.stderr or "no apt-get" in res.stderr:
                pytest.skip(f"SLURM cannot be installed here: {res.stderr.strip().splitlines()[-1]}")
            pytest.fail(f"env/slurm-local.sh start failed:\n{res.stdout}\n{res.stderr}")
        assert set(started) == {"munged", "slurmctld", "slurmd"}, res.stdout
        for name, pid in started.items():   # the script prints the pids it started
            assert f"{name} {pid}" in res.stdout
        yield dict(env, SLURM_CONF=str(state / "slurm.conf"))
    finally:
        stop = subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, env=env,
                              timeout=120)
        leftover = {n: p for n, p in started.items() if _alive(p)}
        for pid in leftover.values():          # only ours, by pid
            os.kill(pid, 9)
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr
        assert not leftover, f"daemons still running after 'stop': {leftover}"


def _job_state(env: dict, job: str) -> dict[str, str]:
    res = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env)
    fields = {}
    for item in res.stdout.split():
        if "=" in item:
            k, v = item.split("=", 1)
            fields[k] = v
    return fields


def _wait(env: dict, job: str, until, timeout: float = 120.0) -> dict[str, str]:
    """Poll the job every 0.5 s until ``until(fields)`` or the timeout (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        fields = _job_state(env, job)
        if until(fields):
            return fields
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} stuck in {fields.get('JobState')} after {timeout} s: {fields}")
        time.sleep(0.5)


def _done(fields: dict[str, str]) -> bool:
    return fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _sbatch(env: dict, cwd: Path, script: Path, **extra: str) -> str:
    res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         env=dict(env, **extra), cwd=cwd, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


@pytest.fixture
def submit_dir(tmp_path: Path) -> Path:
    (tmp_path / "results").mkdir()           # the job's --output log file goes there
    (tmp_path / "tiny.toml").write_text(TINY)
    spec = JobSpec(config="tiny.toml", scheduler="slurm", nodes=1, ranks_per_node=2, time="00:10:00",
                   output="results/tiny.h5", name="tiny", mem="1G", signal_lead=60)
    (tmp_path / "tiny.sbatch").write_text(render(spec))   # 'hpcqml jobs render' itself: test_jobs.py
    return tmp_path


@pytest.mark.timeout(240)
def test_sbatch_run_completes_and_resubmission_resumes(slurm, submit_dir):
    job = _sbatch(slurm, submit_dir, submit_dir / "tiny.sbatch", HPCQML_VENV=str(VENV))
    fields = _wait(slurm, job, _done)
    log = (submit_dir / "results" / f"tiny-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED", log
    assert fields["NumTasks"] == "2" and fields["NumNodes"] == "1"
    # the default launcher: srun when this SLURM has PMIx (Debian 12's does), else mpirun
    plugins = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, env=slurm)
    default = "srun --mpi=pmix" if "pmix" in plugins.stdout + plugins.stderr else "mpirun"
    assert f"{default} -n 2 hpcqml run tiny.toml" in log
    assert "launcher exited with status 0" in log
    info = run_cli("info", "--all", str(submit_dir / "results" / "tiny.h5"))
    assert info.returncode == 0, info.stderr
    assert re.search(r"latest invocation run_\d+: completed", info.stdout), info.stdout
    assert "mpi_size: 2" in info.stdout and f"job id {job};" in info.stdout
    assert "data/" in info.stdout and "num_train=64" in info.stdout

    # same script again, launched by mpirun inside the allocation: resumes, nothing redone
    job2 = _sbatch(slurm, submit_dir, submit_dir / "tiny.sbatch", HPCQML_VENV=str(VENV),
                   LAUNCH="mpirun --allow-run-as-root")
    fields = _wait(slurm, job2, _done)
    log2 = (submit_dir / "results" / f"tiny-{job2}.out").read_text()
    assert fields["JobState"] == "COMPLETED", log2
    assert "mpirun --allow-run-as-root -n 2 hpcqml run" in log2
    assert "resumed" in log2 and "already complete" in log2
    info = run_cli("info", "--all", str(submit_dir / "results" / "tiny.h5"))
    assert info.returncode == 0 and "invocations: 2" in info.stdout and f"job id {job2};" in info.stdout, \
        info.stdout


@pytest.mark.timeout(240)
def test_warning_signal_reaches_ranks_and_requeues(slurm, submit_dir):
    """What --signal=B:USR1@LEAD does at the wall time, sent now: the batch shell forwards
    it to the launcher, then 'scontrol requeue' runs the same script again."""
    fake = submit_dir / "fake-launch"
    fake.write_text(FAKE_LAUNCH)
    fake.chmod(0o755)
    job = _sbatch(slurm, submit_dir, submit_dir / "tiny.sbatch", HPCQML_VENV=str(VENV), LAUNCH=str(fake))
    _wait(slurm, job, lambda f: f.get("JobState") == "RUNNING" or _done(f))
    deadline = time.monotonic() + 180
    while not ((submit_dir / "fake.log").exists() and "args:" in (submit_dir / "fake.log").read_text()):
        assert time.monotonic() < deadline, "fake launcher never started"
        time.sleep(0.2)
    res = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, env=slurm)
    assert res.returncode == 0, res.stderr
    fields = _wait(slurm, job, lambda f: f.get("Restarts") == "1" or _done(f))
    assert fields.get("Restarts") == "1", fields
    # SLURM holds a requeued job ~2 min (BeginTime); release it now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    fields = _wait(slurm, job, lambda f: _done(f) and f.get("Restarts") == "1")
    assert fields["JobState"] == "COMPLETED"
    assert (submit_dir / "fake.log").read_text().splitlines() == [
        "args: -n 2 hpcqml run tiny.toml --output results/tiny.h5", "got USR1 (note USR1)",
        "args: -n 2 hpcqml run tiny.toml --output results/tiny.h5", "resumed"]
    log = (submit_dir / "results" / f"tiny-{job}.out").read_text()
    assert "got SIGUSR1" in log and "requeueing" in log


@pytest.mark.timeout(240)
def test_sigterm_to_the_batch_shell_stops_without_requeue(slurm, submit_dir):
    """What scancel sends, SIGTERM, delivered to the batch shell alone: the ranks are told
    to checkpoint and stop and the job ends without being requeued."""
    fake = submit_dir / "fake-launch"
    fake.write_text(FAKE_LAUNCH)
    fake.chmod(0o755)
    job = _sbatch(slurm, submit_dir, submit_dir / "tiny.sbatch", HPCQML_VENV=str(VENV), LAUNCH=str(fake))
    _wait(slurm, job, lambda f: f.get("JobState") == "RUNNING" or _done(f))
    deadline = time.monotonic() + 180
    while not ((submit_dir / "fake.log").exists() and "args:" in (submit_dir / "fake.log").read_text()):
        assert time.monotonic() < deadline, "fake launcher never started"
        time.sleep(0.2)
    res = subprocess.run(["scancel", "--batch", "--signal=TERM", job], capture_output=True, text=True, env=slurm)
    assert res.returncode == 0, res.stderr
    fields = _wait(slurm, job, _done)
    assert fields["JobState"] == "COMPLETED" and fields.get("Restarts") == "0", fields
    assert (submit_dir / "fake.log").read_text().splitlines()[1:] == ["got USR1 (note TERM)"]
    log = (submit_dir / "results" / f"tiny-{job}.out").read_text()
    assert "got SIGTERM (cancel)" in log and "requeueing" not in log
    assert "cancelled (SIGTERM); saved the checkpoints in results/tiny.h5" in log
