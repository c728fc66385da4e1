"""A run a cluster user can trust: one writer per results file, honest status after a kill,
per-stage fingerprints (rerun one stage with a changed setting, stale dependents, a refusal
that names the differing keys), thread choice, and clear messages for full disks and
damaged files."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from conftest import child_env, run_cli
from hpcqml import config as config_module
from hpcqml.config import Field, load_config
from hpcqml.errors import UserError
from hpcqml.parallel import world
from hpcqml.runner import choose_threads, run_pipeline
from hpcqml.stages import REGISTRY, Stage, register, schemas
from hpcqml.store import ResultsStore, is_complete, write_dataset

CALLS: list[tuple[str, int]] = []


def _unit_stage(ctx) -> None:
    """Writes ``units`` groups of value ``scale * unit``, resuming through completed ones."""
    for unit in range(ctx.cfg["units"]):
        key = f"{ctx.name}/unit_{unit:03d}"
        if ctx.store.is_complete(key):
            continue
        CALLS.append((ctx.name, unit))
        value = np.full(3, ctx.cfg["scale"] * unit, dtype=np.float64)
        ctx.store.commit(key, lambda g, v=value: write_dataset(g, "value", v, "1", "scale times unit"))


def _schema() -> dict[str, Field]:
    return {"units": Field(int, 2, min=1, doc="units of work"),
            "scale": Field(float, 1.0, doc="multiplies every value"),
            "chunk": Field(int, 1, min=1, affects_results=False, doc="performance only")}


@pytest.fixture
def two_stages(monkeypatch):
    """Stages ``up`` and ``down``; ``down`` reads ``up``."""
    for name in ("up", "down"):
        register(Stage(name, _schema(), _unit_stage, doc=f"test stage {name}"))
    monkeypatch.setitem(config_module.UPSTREAM, "down", ("up",))
    CALLS.clear()
    yield
    for name in ("up", "down"):
        REGISTRY.pop(name, None)


def _cfg(tmp_path, run: str = "", **sections: str):
    text = f'[run]\noutput = "{tmp_path}/r.h5"\nstages = ["up", "down"]\n{run}\n'
    for name, body in sections.items():
        text += f"[{name}]\n{body}\n"
    return load_config("t.toml", schemas(), text=text)


def _value(path, key: str) -> np.ndarray:
    with h5py.File(path, "r") as fh:
        return fh[key][()]


# ---- one writer per results file ---------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from mpi4py import MPI
    from hpcqml.store import ResultsStore, write_dataset
    store = ResultsStore(sys.argv[1], MPI.COMM_WORLD)
    store.open_run("x = 1", "sha", {"command_line": "writer", "start_time": "2000-01-01T00:00:00+00:00"})
    for i in range(100000):
        store.commit(f"units/u{i:06d}", lambda g, i=i: write_dataset(g, "v", np.full(4, float(i)), "1", "unit"))
        print(i, flush=True)
""")


def test_second_writer_is_refused_and_a_killed_writer_is_recorded(tmp_path):
    path = tmp_path / "shared.h5"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        seen = -1
        while seen < 5:
            seen = int(proc.stdout.readline())
        other = ResultsStore(path, world())
        with pytest.raises(UserError) as info:
            other.open_run("x = 2", "sha2", {"command_line": "second"})
        message = str(info.value)
        assert "\n" not in message and f"pid {proc.pid}" in message and socket.gethostname() in message
        assert f"delete {path}.lock" in message
        # the first writer goes on undisturbed while refused
        target = seen + 5
        while seen < target:
            seen = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # its lock is stale now (same host, pid gone): the next writer removes it and says so
    lines: list[str] = []
    store = ResultsStore(path, world())
    assert store.open_run("x = 2", "sha2", {"command_line": "second"}, log=lines.append) == "resumed"
    assert any("stale lock" in line for line in lines), lines
    store.close_run("completed")
    with h5py.File(path, "r") as fh:
        done = sorted(fh["units"])
        assert len(done) >= seen + 1                            # nothing the writer reported is lost
        for name in done:
            assert is_complete(fh, f"units/{name}")
        first, second = fh["provenance/run_000"].attrs, fh["provenance/run_001"].attrs
        assert first["status"] == "killed" and first["end_time"] >= first["start_time"]
        assert second["status"] == "completed" and second["end_time"] >= second["start_time"]
        assert fh.attrs["prov_status"] == "completed" and fh.attrs["prov_command_line"] == "second"
    assert not (tmp_path / "shared.h5.lock").exists()


def _lock_of_live_process(tmp_path, job: str = "none"):
    """A lock file naming a live process of this host (a sleeping child) that holds no flock."""
    from hpcqml.store import ResultsLock

    child = subprocess.Popen(["sleep", "60"])
    lock = ResultsLock(tmp_path / "r.h5")
    lock.path.write_text(f"host={socket.gethostname()}\npid={child.pid}\njob={job}\nstarted=x\n")
    return lock, child


def test_without_flock_a_live_holder_is_never_taken_over(tmp_path, monkeypatch):
    """On a file system without flock (Lustre without -o flock) a lock whose pid is alive on this
    host is live: it is refused, never removed as stale."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "flock not supported")
    lock, child = _lock_of_live_process(tmp_path)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    try:
        with pytest.raises(UserError, match=f"pid {child.pid}"):
            lock.acquire()
        assert lock.path.exists()
    finally:
        child.kill()
        child.wait()
    lock.acquire()  # pid gone: stale even without flock
    assert lock.held
    lock.release()


def test_lock_of_an_earlier_segment_of_the_same_job_is_stale(tmp_path, monkeypatch):
    """A requeued batch job may restart on another node: its own old lock does not block it."""
    lock, child = _lock_of_live_process(tmp_path, job="4242")
    text = lock.path.read_text().replace(socket.gethostname(), "another-node")
    lock.path.write_text(text)
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4241")
        with pytest.raises(UserError):
            lock.acquire()                       # another job's lock on another host: refused
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        lines: list[str] = []
        lock.acquire(log=lines.append)
        assert lock.held and "earlier segment of batch job 4242" in lines[0]
        assert "job=4242" in lock.path.read_text()
    finally:
        child.kill()
        child.wait()
        lock.release()


def test_release_never_deletes_another_runs_lock(tmp_path):
    from hpcqml.store import ResultsLock

    mine = ResultsLock(tmp_path / "r.h5")
    mine.acquire()
    mine.path.unlink()                           # e.g. a user deleted it, and another run took it
    theirs = ResultsLock(tmp_path / "r.h5")
    theirs.acquire()
    mine.release()
    assert theirs.path.exists() and theirs.held
    theirs.release()
    assert not theirs.path.exists()


def test_two_cli_runs_at_once_one_is_refused(tmp_path, repo):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path}/c.h5"\nstages = ["data"]\n'
                   '[data]\nsynth_train = 200\nsynth_test = 50\nsynth_classes = 4\n')
    lock = tmp_path / "c.h5.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hpcqml.store import ResultsLock; "
                               "ResultsLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "c.h5")], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run_cli("run", str(cfg))
        assert res.returncode == 2
        assert res.stderr.count("\n") == 1 and f"pid {holder.pid}" in res.stderr, res.stderr
        assert not (tmp_path / "c.h5").exists()
    finally:
        holder.kill()
        holder.wait()
    res = run_cli("run", str(cfg))   # the holder is gone: its lock is stale
    assert res.returncode == 0, res.stderr
    assert "stale lock" in res.stderr and not lock.exists()


def test_sweep_never_touches_a_live_runs_temporaries(tmp_path):
    first = ResultsStore(tmp_path / "r.h5", world())
    first.open_run("x = 1", "sha", {"command_line": "first"})
    live = tmp_path / ".r.h5.live1234.tmp"
    live.write_bytes(b"a commit in progress")
    with pytest.raises(UserError, match="being written by another run"):
        ResultsStore(tmp_path / "r.h5", world()).open_run("x = 1", "sha", {"command_line": "second"})
    assert live.exists()
    first.close_run("completed")


def test_status_of_a_killed_resumed_invocation(tmp_path, two_stages):
    run_pipeline(_cfg(tmp_path), world(), quiet=True)
    # an invocation killed mid-run: status running, a lock from a dead process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = ResultsStore(tmp_path / "r.h5", world())
    store.open_run("x", "sha", {"command_line": "killed one", "start_time": "2100-01-01T00:00:00+00:00"})
    os.close(store.lock._fd)
    (tmp_path / "r.h5.lock").write_text(f"host={socket.gethostname()}\npid={dead.stdout.strip()}\nstarted=x\n")
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        assert fh.attrs["prov_status"] == "running" and "prov_end_time" in fh.attrs
        assert fh.attrs["prov_end_time"] == ""                   # never an older invocation's end
    run_pipeline(_cfg(tmp_path), world(), quiet=True)
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        runs = [fh[f"provenance/{k}"].attrs for k in sorted(fh["provenance"])]
        assert [str(r["status"]) for r in runs] == ["completed", "killed", "completed"]
        for r in runs:
            assert r["end_time"] >= r["start_time"]
        assert fh.attrs["prov_status"] == "completed"
        assert fh.attrs["prov_start_time"] == runs[-1]["start_time"]


# ---- per-stage fingerprints ------------------------------------------------------------------

def test_rerun_one_stage_with_a_changed_setting(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(tmp_path), world(), quiet=True)
    assert CALLS == [("up", 0), ("up", 1), ("down", 0), ("down", 1)]
    # unchanged config, or only a performance key changed: everything is skipped
    CALLS.clear()
    run_pipeline(_cfg(tmp_path, up="chunk = 7", run="threads = 1"), world(), quiet=True)
    assert CALLS == []
    # a default written out is the same as a default left unset
    run_pipeline(_cfg(tmp_path, up="scale = 1.0"), world(), quiet=True)
    assert CALLS == []
    # one stage rerun with a changed setting: recomputed, its reader marked stale, kept
    run_pipeline(_cfg(tmp_path, up="scale = 3.0"), world(), ["up"], quiet=True)
    assert CALLS == [("up", 0), ("up", 1)]
    np.testing.assert_array_equal(_value(out, "up/unit_001/value"), [3.0, 3.0, 3.0])
    with h5py.File(out, "r") as fh:
        down = fh["fingerprints/down"].attrs
        assert bool(down["stale"]) and "up.scale" in down["stale_because"]
        assert "down/unit_001" in fh and not bool(fh["fingerprints/up"].attrs["stale"])
    info = run_cli("info", str(out))
    assert info.returncode == 0
    down_line = next(line for line in info.stdout.splitlines() if line.strip().startswith("down "))
    assert "complete" in down_line and "[stale: up recomputed (up.scale (default) -> 3.0)]" in down_line
    # the stale stage is recomputed when asked for
    CALLS.clear()
    run_pipeline(_cfg(tmp_path, up="scale = 3.0"), world(), ["down"], quiet=True)
    assert CALLS == [("down", 0), ("down", 1)]
    with h5py.File(out, "r") as fh:
        assert not bool(fh["fingerprints/down"].attrs["stale"])


def test_changed_upstream_not_asked_for_is_refused_naming_keys(tmp_path, two_stages):
    run_pipeline(_cfg(tmp_path), world(), quiet=True)
    CALLS.clear()
    with pytest.raises(UserError) as info:
        run_pipeline(_cfg(tmp_path, up="scale = 2.5\nunits = 3"), world(), ["down"], quiet=True)
    message = str(info.value)
    assert "\n" not in message and CALLS == []
    assert "up.scale (default) -> 2.5; up.units (default) -> 3" in message and "add up to --stages" in message
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        assert fh["provenance/run_001"].attrs["status"] == "failed"
        assert "up.scale" in fh["provenance/run_001"].attrs["error"]


def test_fingerprints_ignore_performance_keys_and_unset_defaults():
    from hpcqml.stages._estimates import spectrum_reads

    sch = {"spectrum": {"probes": Field(int, 4), "micro_batch": Field(int, 512, affects_results=False),
                        "lanczos_steps": Field(int, 100), "source": Field(str, "snapshots"), "eta": Field(float, 0.0)},
           "train": {"lr": Field(float, 0.01)}}

    def fp(text: str, stage: str = "spectrum") -> str:
        return load_config("t.toml", sch, text=text, reads={"spectrum": spectrum_reads}).stage_fingerprint(stage, sch)

    base = fp("")
    assert fp("[spectrum]\nmicro_batch = 64\n") == base
    assert fp("[run]\nthreads = 3\ndevice = 'cpu'\nname = 'x'\n") == base
    assert fp("[spectrum]\nprobes = 4\n") == base
    assert fp("[spectrum]\nprobes = 8\n") != base
    assert fp("[train]\nlr = 0.5\n") != base                 # spectrum reads the trained snapshots
    # the pruned model does not depend on [train]; the proxy's eta does unless [spectrum] eta is set
    pruned = "[spectrum]\nsource = 'pruned'\n"
    assert fp("[train]\nlr = 0.5\n" + pruned + "eta = 0.01\n") == fp(pruned + "eta = 0.01\n")
    assert fp("[train]\nlr = 0.5\n" + pruned) != fp("[train]\nlr = 0.01\n" + pruned)
    assert fp("[spectrum]\nprobes = 8\n", "train") == fp("", "train")
    assert fp("[run]\nseed = 5\n") != base


# ---- threads -------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"OMP_NUM_THREADS": "2", "SLURM_CPUS_PER_TASK": "8"}, (2, "OMP_NUM_THREADS")),
    ({"SLURM_CPUS_PER_TASK": "8"}, (8, "SLURM_CPUS_PER_TASK")),
    ({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "6"}, (6, "SLURM_CPUS_PER_TASK")),
    ({"PBS_JOBID": "12.pbs", "NCPUS": "4"}, (4, "PBS NCPUS / ranks on the node")),
])
def test_thread_choice_follows_the_environment(env, expected):
    assert choose_threads(world(), 0, env) == expected
    assert choose_threads(world(), 3, env) == (3, "[run] threads")


def test_thread_choice_is_recorded(tmp_path, repo):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\noutput = "{tmp_path}/c.h5"\nstages = ["data"]\n'
                   '[data]\nsynth_train = 200\nsynth_test = 50\nsynth_classes = 4\n')
    env = child_env(SLURM_CPUS_PER_TASK="5")
    env["OMP_NUM_THREADS"] = "2"
    res = subprocess.run([sys.executable, "-m", "hpcqml", "run", str(cfg), "--quiet"],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "c.h5", "r") as fh:
        assert fh.attrs["prov_threads"] == 2 and fh.attrs["prov_threads_source"] == "OMP_NUM_THREADS"
    env = child_env(SLURM_CPUS_PER_TASK="5", SLURM_JOB_ID="4242")
    env.pop("OMP_NUM_THREADS")
    res = subprocess.run([sys.executable, "-m", "hpcqml", "run", str(cfg), "--overwrite", "--quiet"],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert res.returncode == 0, res.stderr
    with h5py.File(tmp_path / "c.h5", "r") as fh:
        assert fh.attrs["prov_threads"] == 5 and fh.attrs["prov_job_id"] == "4242"


# ---- full disk, damaged file ------------------------------------------------------------

def test_full_disk_errors_are_recognised_and_named(tmp_path):
    import torch

    from hpcqml.io import DiskFullError, disk_full_error, is_disk_full

    with pytest.raises(OSError) as info:
        with open("/dev/full", "wb") as fh:
            fh.write(b"x" * 10)
    assert is_disk_full(info.value)
    with pytest.raises(RuntimeError) as info:
        torch.save(torch.zeros(1000), open("/dev/full", "wb"))
    assert is_disk_full(info.value)                           # torch's "unexpected pos ..." wording
    error = disk_full_error(tmp_path / "work" / "state.pt", needed=3 * 2**20)
    assert isinstance(error, DiskFullError)
    assert "no space left" in error.strerror and "state.pt" in error.strerror and "3.0 MiB" in error.strerror
    assert "free" in error.strerror and "\n" not in error.strerror


def _scribble(path, offset: int, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def test_damaged_results_file_gives_one_line(tmp_path, two_stages):
    out = tmp_path / "r.h5"
    run_pipeline(_cfg(tmp_path), world(), quiet=True)
    with h5py.File(out, "r") as fh:
        offset = fh["perf/up/wall_seconds"].id.get_chunk_info(0).byte_offset   # checksummed chunk
    _scribble(out, offset, 8)                                  # the numbers of one dataset
    for args in (("info", str(out)), ("report", str(out), "--out", str(tmp_path / "rep"))):
        res = run_cli(*args)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1
        assert f"results file {out} is damaged" in res.stderr and "restore it or use --overwrite" in res.stderr
    size = out.stat().st_size
    _scribble(out, size // 3, size // 3)                      # metadata and data alike
    res = run_cli("info", str(out))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "damaged" in res.stderr or "not a readable HDF5 file" in res.stderr


# ---- the README's rerun example, on a tiny pipeline -------------------------------------------

TINY = """
[run]
output = "{out}"
stages = ["data", "pretrain", "prune", "spectrum"]
[data]
synth_train = 64
synth_test = 16
synth_classes = 3
[pretrain]
model = "resnet8-w1"
epochs = 0
batch_size = 32
[prune]
keep_fraction = 0.2
evaluate = false
[spectrum]
source = "pruned"
batch_size = 16
micro_batch = 16
lanczos_steps = 3
probes = 1
grid_points = 16
t_max = 3
"""


def test_readme_rerun_example_extends_the_stored_probes(tmp_path):
    """``hpcqml run CONFIG --stages spectrum --set spectrum.probes=8`` after a full run adds
    probes to the stored ones (the first probe's arrays are kept, not recomputed)."""
    import hpcqml.results

    cfg = tmp_path / "tiny.toml"
    out = tmp_path / "tiny.h5"
    cfg.write_text(TINY.format(out=out))
    res = run_cli("--quiet", "run", str(cfg), timeout=600)
    assert res.returncode == 0, res.stderr
    with hpcqml.results.open(out) as results:
        (first,) = results.spectra.values()
        first_nodes = first.nodes.copy()
    res = run_cli("run", str(cfg), "--stages", "spectrum", "--set", "spectrum.probes=2", timeout=600)
    assert res.returncode == 0, res.stderr
    assert "[spectrum] spectrum.probes 1 -> 2: extending its stored results" in res.stderr
    with hpcqml.results.open(out) as results:
        (spectrum,) = results.spectra.values()
        assert spectrum.nodes.shape[0] == 2                       # two probes now
        np.testing.assert_array_equal(spectrum.nodes[0], first_nodes[0])  # the stored probe was kept
        assert results.perf["prune"].invocation == "provenance/run_000"   # upstream kept, not rerun
        assert results.perf["spectrum"].invocation == "provenance/run_001"
        assert [inv.status for inv in results.provenance] == ["completed", "completed"]
    # a performance-only change resumes (nothing to do) instead of refusing
    res = run_cli("run", str(cfg), "--stages", "spectrum", "--set", "spectrum.probes=2",
                  "--set", "spectrum.micro_batch=8", timeout=600)
    assert res.returncode == 0, res.stderr
    assert "[spectrum] already complete" in res.stderr


def test_overwrite_never_deletes_a_file_another_run_writes(tmp_path, two_stages):
    run_pipeline(_cfg(tmp_path), world(), quiet=True)
    live = ResultsStore(tmp_path / "r.h5", world())
    live.open_run("x", "sha", {"command_line": "live"})
    with pytest.raises(UserError, match="being written by another run"):
        run_pipeline(_cfg(tmp_path), world(), quiet=True, overwrite=True)
    assert (tmp_path / "r.h5").exists() and (tmp_path / "r.work").exists()
    live.close_run("completed")
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        assert "up/unit_001" in fh
