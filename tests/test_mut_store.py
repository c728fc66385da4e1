"""Small, in-process checks of :mod:`hpcqml.store`, written against its mutants.

``make mutation MUTATION_TARGETS=store`` (docs/testing.md) mutates the results store; the crash
tests (test_store.py, test_store_atomic_commit.py) spawn processes and take tens of seconds, so
these run first and kill most mutants within a second or two. Each test drives a real
:class:`ResultsStore` on a real HDF5 file on one MPI rank (``MPI.COMM_WORLD`` of this process)
and checks what the file holds afterwards with h5py, or the exact message of an error. Lock files
are written by hand in the documented ``key=value`` format, so the stale-lock rules are checked
against the holder's host, pid, batch job and flock as the docstring of ``ResultsLock`` states them.
"""
from __future__ import annotations

import errno
import fcntl
import importlib
import os
import re
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpcqml import __version__
from hpcqml import store as st
from hpcqml.errors import InputFileError, UserError
from hpcqml.parallel import world

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


@pytest.fixture
def no_job(monkeypatch):
    for name in ("SLURM_JOB_ID", "PBS_JOBID"):
        monkeypatch.delenv(name, raising=False)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _open(path, **kw) -> st.ResultsStore:
    store = st.ResultsStore(path, world())
    assert store.open_run("x = 1", "sha-1", {"command_line": "t", "mpi_size": 1}, **kw) in ("created", "resumed")
    return store


# ---- small helpers ------------------------------------------------------------------------------

def test_utc_now_is_iso_8601_to_the_second_in_utc():
    assert ISO.match(st.utc_now())


def test_is_complete_needs_a_group_marked_complete(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_group("done").attrs["complete"] = True
        fh.create_group("open")
        fh.create_group("no").attrs["complete"] = False
        fh["data"] = np.arange(3)
        fh["data"].attrs["complete"] = True
        assert st.is_complete(fh, "done")
        for key in ("open", "no", "data", "missing"):
            assert not st.is_complete(fh, key), key


def test_open_results_names_a_missing_or_unreadable_results_file(tmp_path):
    for path, why in ((tmp_path / "none.h5", "not found"), (tmp_path, "not a regular file")):
        with pytest.raises(InputFileError) as info:
            st.open_results(path)
        assert str(info.value) == f"results file {path}: {why}"
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InputFileError) as info:
        st.open_results(tmp_path / "text.h5")
    assert str(info.value) == f"results file {tmp_path / 'text.h5'}: not a readable HDF5 file (OSError)"


def test_open_results_refuses_a_file_without_schema_version(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as fh:
        fh["x"] = 1
    with pytest.raises(UserError) as info:
        st.open_results(path)
    assert str(info.value) == f"results file {path}: no schema_version attribute; not an hpcqml results file"
    with h5py.File(path, "a") as fh:
        fh.attrs["schema_version"] = "1.1"
    with st.open_results(path) as fh:
        assert fh.mode == "r"


def test_write_dataset_records_units_description_and_checksums(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        d = st.write_dataset(fh, "x", [1.0, 2.0], "nat", "two numbers")
        assert _text(d.attrs["units"]) == "nat" and _text(d.attrs["description"]) == "two numbers"
        assert d.fletcher32 and d.dtype == np.float64
        for name, data in (("ints", np.arange(4)), ("flags", np.array([True, False])),
                           ("cplx", np.array([1j])), ("u8", np.array([3], dtype=np.uint8))):
            assert st.write_dataset(fh, name, data, "1", name).fletcher32, name
        assert not st.write_dataset(fh, "scalar", 3.5, "s", "a scalar").fletcher32
        assert not st.write_dataset(fh, "empty", np.zeros(0), "1", "nothing").fletcher32
        assert not st.write_dataset(fh, "plain", np.arange(3.0), "1", "no checksum", fletcher32=False).fletcher32
        o = st.write_dataset(fh, "objects", np.array(["x", "yé"], dtype=object), "1", "python strings")
        assert h5py.check_string_dtype(o.dtype).encoding == "utf-8" and st.read_strings(o) == ["x", "yé"]
        mixed = st.write_dataset(fh, "mixed", np.array(["a", 1, 2.5], dtype=object), "1", "any objects as text")
        assert st.read_strings(mixed) == ["a", "1", "2.5"]
        s = st.write_dataset(fh, "names", ["a", "bé"], "1", "strings")
        assert h5py.check_string_dtype(s.dtype).encoding == "utf-8"
        assert st.read_strings(s) == ["a", "bé"]
        grid = st.write_dataset(fh, "grid", np.array([["a", "b"], ["c", "d"]]), "1", "2 x 2 strings")
        assert grid.shape == (2, 2) and st.read_strings(grid) == ["a", "b", "c", "d"]
        fixed = st.write_dataset(fh, "fixed", np.array(["ab", "cd"], dtype="S2"), "1", "bytes as given")
        assert fixed.dtype == np.dtype("S2")
        given = st.write_dataset(fh, "given", np.array([b"x"], dtype=object), "1", "dtype given",
                                 dtype=h5py.string_dtype("ascii"))
        assert h5py.check_string_dtype(given.dtype).encoding == "ascii" and st.read_strings(given) == ["x"]
        f4 = st.write_dataset(fh, "f4", [1.5, 2.5], "1", "float32 asked for", dtype="f4")
        assert f4.dtype == np.float32 and f4.fletcher32
        for units, desc in (("", "d"), ("1", ""), ("1", "two\nlines")):
            with pytest.raises(ValueError) as info:
                st.write_dataset(fh, "bad", [1.0], units, desc)
            assert str(info.value) == "dataset 'bad': units and a one-line description are required"
        assert "bad" not in fh


def test_read_strings_of_fixed_and_variable_strings(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh["b"] = np.array([b"x", b"yz"])
        assert st.read_strings(fh["b"]) == ["x", "yz"]
        fh["n"] = np.array([1, 2])
        assert st.read_strings(fh["n"]) == ["1", "2"]


# ---- the writer lock ------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid       # reaped: no process has it (pids are not reused this quickly)


def _lock_text(**fields) -> str:
    return "".join(f"{k}={v}\n" for k, v in fields.items())


def test_lock_file_names_its_holder_and_a_second_writer_is_refused(tmp_path, no_job):
    results = tmp_path / "sub" / "r.h5"
    lock = st.ResultsLock(results)
    assert lock.path == tmp_path / "sub" / "r.h5.lock" and not lock.held
    lock.acquire()
    assert lock.held
    fields = dict(line.split("=", 1) for line in lock.path.read_text().splitlines())
    assert fields["host"] == socket.gethostname() and fields["pid"] == str(os.getpid())
    assert fields["job"] == "none" and ISO.match(fields["started"])
    other = st.ResultsLock(results)
    with pytest.raises(UserError) as info:
        other.acquire()
    assert str(info.value) == (
        f"results file {results} is being written by another run (host {fields['host']}, pid {os.getpid()}, "
        f"since {fields['started']}); wait for it to finish, or delete {lock.path} if that run is gone")
    assert not other.held
    lock.release()
    assert not lock.path.exists() and not lock.held
    lock.release()                  # idempotent
    other.acquire()
    other.release()


@pytest.mark.parametrize("holder, reason", [
    ("dead", "the process is no longer running"),
    ("self", "its pid now belongs to a process that does not hold the lock"),
])
def test_stale_lock_of_this_host_is_removed_and_logged(tmp_path, no_job, holder, reason):
    results = tmp_path / "r.h5"
    pid = _dead_pid() if holder == "dead" else os.getpid()
    host = socket.gethostname()
    (tmp_path / "r.h5.lock").write_text(_lock_text(host=host, pid=pid, job="none", started="then"))
    lines = []
    lock = st.ResultsLock(results)
    lock.acquire(lines.append)
    assert lines == [f"removed stale lock {lock.path} (host {host}, pid {pid}: {reason})"]
    assert f"pid={os.getpid()}" in lock.path.read_text()
    lock.release()


def test_lock_of_an_earlier_segment_of_this_batch_job_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("PBS_JOBID", raising=False)
    (tmp_path / "r.h5.lock").write_text(_lock_text(host="node-b", pid=os.getpid(), job="4242", started="then"))
    lines = []
    lock = st.ResultsLock(tmp_path / "r.h5")
    lock.acquire(lines.append)
    assert lines == [f"removed stale lock {lock.path} (host node-b, pid {os.getpid()}: left by an earlier segment "
                     "of batch job 4242)"]
    lock.release()


def _padded(size: int) -> str:
    """A lock file of another host's live run, padded with a comment-like line to ``size`` bytes."""
    text = _lock_text(host="node-b", pid=1, started="then")
    return text + "#" * (size - len(text) - 1) + "\n"


@pytest.mark.parametrize("text, who", [
    (_lock_text(host="node-b", pid=1, job="9", started="then"), "host node-b, pid 1, since then"),
    (_lock_text(host="HOST", pid="", job="none"), "host HOST, pid , since ?"),
    (_lock_text(started="then"), "host ?, pid ?, since then"),
    (_lock_text(host="node-b", pid=1, started="a=b"), "host node-b, pid 1, since a=b"),
    (b"host=node-\xff\npid=1\nstarted=then\n", "host node-\ufffd, pid 1, since then"),
    (_padded(4096), "host node-b, pid 1, since then"),
    (_padded(4097), "holder unknown"),
    ("", "holder unknown"),
    ("x" * 5000, "holder unknown"),
])
def test_a_lock_that_may_be_live_is_never_removed(tmp_path, no_job, text, who):
    """Another host's lock (even of another job), a lock still being written (no pid yet), one
    with a start time only, a value holding ``=`` (split at the first one), bytes that are not
    UTF-8 (shown as U+FFFD), a lock of exactly 4096 bytes (read), an empty one and ones of 4097
    bytes or more (not ours): refused, the file left in place."""
    assert len(_padded(4096)) == 4096 and len(_padded(4097)) == 4097
    raw = text if isinstance(text, bytes) else text.replace("HOST", socket.gethostname()).encode()
    who = who.replace("HOST", socket.gethostname())
    path = tmp_path / "r.h5.lock"
    path.write_bytes(raw)
    with pytest.raises(UserError) as info:
        st.ResultsLock(tmp_path / "r.h5").acquire()
    assert f"being written by another run ({who});" in str(info.value)
    assert path.read_bytes() == raw


def test_release_leaves_a_lock_file_that_replaced_ours(tmp_path, no_job):
    lock = st.ResultsLock(tmp_path / "r.h5")
    lock.acquire()
    lock.path.unlink()
    lock.path.write_text("someone else's")
    lock.release()
    assert lock.path.read_text() == "someone else's" and not lock.held


def test_stale_reason_rules(no_job):
    host = socket.gethostname()
    live = {"host": host, "pid": str(os.getpid())}
    assert st._stale_reason(live, "busy") is None
    assert st._stale_reason(live, "unsupported") is None          # no flock, pid alive: assume live
    assert st._stale_reason(live, "taken") == "its pid now belongs to a process that does not hold the lock"
    dead = {"host": host, "pid": str(_dead_pid())}
    assert st._stale_reason(dead, "unsupported") == "the process is no longer running"
    assert st._stale_reason({"host": "node-b", "pid": "1"}, "taken") is None
    assert st._stale_reason({"host": host, "pid": "12a"}, "taken") is None
    assert st._stale_reason({"host": host}, "taken") is None
    assert st._stale_reason(dead, "busy") is None                  # someone holds the flock right now


def test_flock_states_and_same_file(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    a, b = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    try:
        assert st._flock(a) == "taken" and st._flock(b) == "busy"
        assert st._same_file(a, path)
        path.unlink()
        assert not st._same_file(a, path)
        path.write_text("new")
        assert not st._same_file(a, path)
    finally:
        fcntl.flock(a, fcntl.LOCK_UN)
        os.close(a)
        os.close(b)
    assert st._pid_alive(os.getpid()) and not st._pid_alive(_dead_pid())


def test_remove_if_stale_of_a_vanished_lock(tmp_path):
    assert st._remove_if_stale(tmp_path / "gone.lock", {}) == "already gone"


def test_lock_in_a_directory_not_yet_made_is_created_with_mode_644(tmp_path, no_job):
    """Both missing levels of the directory are made, and the lock file gets rw-r--r--
    (umask 0 here, so the mode asked for is the mode the file has)."""
    results = tmp_path / "a" / "b" / "r.h5"
    old = os.umask(0)
    try:
        lock = st.ResultsLock(results)
        lock.acquire()
    finally:
        os.umask(old)
    assert lock.held and (os.stat(lock.path).st_mode & 0o777) == 0o644
    lock.release()


def test_a_lock_path_that_names_nothing_readable_is_given_up_after_three_tries(tmp_path, no_job):
    """A dangling symbolic link at the lock path: the exclusive create finds it, but opening it
    finds nothing (no holder: ``?`` for host and pid), three times; then a one-line refusal."""
    lock = st.ResultsLock(tmp_path / "r.h5")
    os.symlink(tmp_path / "nowhere", lock.path)
    lines = []
    with pytest.raises(UserError) as info:
        lock.acquire(lines.append)
    assert str(info.value) == f"results file {tmp_path / 'r.h5'}: could not take the lock {lock.path}"
    assert lines == [f"lock {lock.path} changed while it was judged (host ?, pid ?: already gone); trying again"] * 3
    assert not lock.held and lock.path.is_symlink()


def test_a_lock_whose_flock_is_held_is_never_removed_whatever_pid_it_names(tmp_path, no_job):
    """The holder's flock is taken (here by a lock of this process), but the file names a pid
    of this host that is gone (e.g. a holder in another pid namespace): refused, not removed."""
    first = st.ResultsLock(tmp_path / "r.h5")
    first.acquire()
    dead = _dead_pid()
    text = _lock_text(host=socket.gethostname(), pid=dead, job="none", started="then")
    with open(first.path, "r+") as fh:          # the same file (same flock), rewritten in place
        fh.truncate()
        fh.write(text)
    second = st.ResultsLock(tmp_path / "r.h5")
    with pytest.raises(UserError) as info:
        second.acquire()
    assert f"(host {socket.gethostname()}, pid {dead}, since then)" in str(info.value)
    assert first.path.read_text() == text and not second.held
    first.release()


def test_a_lock_replaced_while_it_is_judged_stale_is_left_to_its_new_holder(tmp_path, monkeypatch, no_job):
    """Another run replaces the stale lock between this run opening it and removing it (here at
    the moment the rule reads the batch job id): the new file is kept, the attempt is logged as
    ``replaced meanwhile`` and the next try refuses, naming the new holder."""
    path = tmp_path / "r.h5.lock"
    host, dead = socket.gethostname(), _dead_pid()
    path.write_text(_lock_text(host=host, pid=dead, job="none", started="then"))
    new = _lock_text(host="node-b", pid=7, job="none", started="now")
    replaced = []

    def job_id_after_a_replacement() -> str:
        if not replaced:
            (tmp_path / "new").write_text(new)
            os.replace(tmp_path / "new", path)
            replaced.append(True)
        return "none"

    monkeypatch.setattr(st, "scheduler_job_id", job_id_after_a_replacement)
    lines = []
    with pytest.raises(UserError) as info:
        st.ResultsLock(tmp_path / "r.h5").acquire(lines.append)
    assert lines == [f"lock {path} changed while it was judged (host {host}, pid {dead}: replaced meanwhile); "
                     "trying again"]
    assert "(host node-b, pid 7, since now);" in str(info.value)
    assert path.read_text() == new


def test_flock_of_a_descriptor_that_cannot_be_locked_is_unsupported(tmp_path):
    """An O_PATH descriptor cannot be flock-ed (EBADF), as on a file system without flock."""
    path = tmp_path / "f"
    path.write_text("x")
    fd = os.open(path, os.O_PATH)
    try:
        assert st._flock(fd) == "unsupported"
    finally:
        os.close(fd)


def test_pid_alive_only_probes_the_process(tmp_path):
    """The probe sends no signal: a child that dies on SIGHUP (and on any other default-fatal
    signal) answers after the check. Its reply comes after the probe, so a signal sent by the
    probe would have ended it first."""
    code = ("import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); print('ready', flush=True); "
            "sys.stdin.readline(); print('alive', flush=True)")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    assert st._pid_alive(child.pid)
    out, _ = child.communicate("go\n", timeout=60)
    assert (out, child.returncode) == ("alive\n", 0)


def test_pid_alive_of_another_users_process(monkeypatch):
    """A process this user may not signal is alive: ``kill(pid, 0)`` answering EPERM (as it does
    for another user's process) counts as a live holder. The refusal is made here, so the test
    does not depend on who runs it or on changing uid."""
    probed = []

    def refuse(pid: int, sig: int) -> None:
        probed.append((pid, sig))
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    assert st._pid_alive(4242) is True
    assert probed == [(4242, 0)]


# ---- damage -----------------------------------------------------------------------------------

def test_damaged_message_uses_the_first_line_or_the_type(tmp_path):
    p = tmp_path / "r.h5"
    tail = "; restore it or use --overwrite"
    assert str(st.damaged(p, OSError("bad thing\nmore"))) == f"results file {p} is damaged (bad thing){tail}"
    assert str(st.damaged(p, KeyError())) == f"results file {p} is damaged (KeyError){tail}"
    assert str(st.damaged(p, RuntimeError("  \nx"))) == f"results file {p} is damaged (RuntimeError){tail}"
    assert isinstance(st.damaged(p, OSError("x")), InputFileError)


def test_damage_error_tells_damage_from_bugs(tmp_path):
    p = tmp_path / "r.h5"
    assert isinstance(st.damage_error(p, OSError("unable to open")), InputFileError)
    assert st.damage_error(p, OSError(errno.ENOSPC, "No space left on device")) is None
    for word in ("bad signature", "file signature not found", "Corrupt node", "truncated file", "bad symbol table",
                 "checksum failed", "can't decompress"):
        for cls in (KeyError, ValueError, RuntimeError):
            assert isinstance(st.damage_error(p, cls(word)), InputFileError), (cls, word)
    for exc in (KeyError("missing"), ValueError("shape mismatch"), RuntimeError("badly"), TypeError("corrupt")):
        assert st.damage_error(p, exc) is None, exc


def _fresh(tmp_path) -> st.ResultsStore:
    store = _open(tmp_path / "r.h5")
    store.commit("a", lambda g: g.create_dataset("d", data=np.arange(5.0)))
    return store


def test_reading_or_writing_damaged_bytes_names_the_damage(tmp_path, no_job):
    store = _fresh(tmp_path)
    store.close_run("completed")
    raw = bytearray(store.path.read_bytes())
    raw[:512] = b"\0" * 512          # the superblock: HDF5 can no longer open the file
    store.path.write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match=r"^results file .*r\.h5 is damaged \("):
        store.read(lambda fh: fh["a"].attrs["complete"])
    with pytest.raises(InputFileError, match=r"^results file .*r\.h5 is damaged \("):
        store._rewrite(lambda fh: None)


def test_a_readers_error_on_an_intact_file_that_breaks_the_schema_is_not_called_damage(tmp_path):
    """A dataset without units (a file of another tool, or an older version) breaks a schema rule
    but its bytes are sound: a reader failing on it gets its own error back, not "damaged"."""
    path = tmp_path / "r.h5"
    store = _open(path)
    store.commit("a", lambda g: g.create_dataset("bare", data=np.arange(3.0)))
    store.close_run("completed")
    with pytest.raises(KeyError, match="nothing_here"):
        st.ResultsStore(path, world()).read(lambda fh: fh["a"]["nothing_here"])


def test_a_readers_error_at_a_dangling_link_is_named_as_damage(tmp_path):
    """A link to nothing is damage: the reader's KeyError there becomes one line naming it."""
    path = tmp_path / "r.h5"
    store = _open(path)
    store.commit("a", lambda g: st.write_dataset(g, "d", np.arange(3.0), "1", "numbers"))
    store.close_run("completed")
    with h5py.File(path, "r+") as fh:
        fh["gone"] = h5py.SoftLink("/nowhere")
    with pytest.raises(InputFileError) as info:
        st.ResultsStore(path, world()).read(lambda fh: fh["gone"][()])
    assert str(info.value).startswith(f"results file {path} is damaged: group /gone: unreadable (KeyError")


def test_report_refuses_damage_but_not_a_broken_schema_rule(tmp_path):
    """``hpcqml verify`` lists a dataset without units; the check before a report does not call
    that damage, but it does refuse a chunk whose bytes fail their checksum."""
    from hpcqml.verify import damage_of, require_intact, verify_file

    path = tmp_path / "r.h5"
    store = _open(path)
    store.commit("a", lambda g: g.create_dataset("bare", data=np.arange(4096.0), chunks=(4096,), fletcher32=True))
    store.close_run("completed")
    problems, _ = verify_file(path)
    assert problems == ["dataset /a/bare: no units or description attribute"]
    assert damage_of(path) == []
    require_intact(path)
    with h5py.File(path, "r") as fh:
        offset = fh["a/bare"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 100:offset + 108] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match=rf"^results file {re.escape(str(path))} is damaged: dataset /a/bare: "):
        require_intact(path)


def test_read_of_a_missing_file_gives_the_default(tmp_path):
    store = st.ResultsStore(tmp_path / "none.h5", world())
    assert store.read(lambda fh: 1, default="absent") == "absent"
    assert store.read(lambda fh: 1) is None
    assert store.is_complete("a") is False
    store.mark_stale([], "nothing")          # nothing to mark: the missing file is not touched
    assert store.restore_previous("spec", "sha") is False   # nothing set aside: nothing to restore
    assert not store.path.exists()
    store.close_run("completed")             # no invocation: nothing to close
    assert not store.path.exists()


def test_dataset_with_a_damaged_chunk_is_an_error_not_numbers(tmp_path):
    path = tmp_path / "r.h5"
    store = _open(path)
    store.commit("a", lambda g: st.write_dataset(g, "d", np.arange(4096.0), "1", "numbers", chunks=(4096,)))
    store.close_run("completed")
    with h5py.File(path, "r") as fh:
        offset = fh["a/d"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 100:offset + 108] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(InputFileError) as info:
        st.ResultsStore(path, world()).read(lambda fh: fh["a/d"][()])
    # the file's checker names the damaged dataset (not only the error of the failed read)
    message = str(info.value)
    assert message.startswith(f"results file {path} is damaged: dataset /a/d: unreadable (OSError: ")
    assert "Fletcher32" in message and message.endswith("; restore it or use --overwrite")


# ---- runs, invocations and commits -----------------------------------------------------------

def test_open_commit_close_and_resume(tmp_path, no_job):
    path = tmp_path / "r.h5"
    store = st.ResultsStore(path, world())
    assert store.open_run("x = 1", "sha-1", {"command_line": "first", "extra": "e"}) == "created"
    assert store.invocation == "provenance/run_000" and store.lock.held
    with h5py.File(path, "r") as fh:      # while it runs: no end yet
        run = fh["provenance/run_000"].attrs
        assert _text(run["status"]) == "running" and _text(run["end_time"]) == ""
        assert _text(fh.attrs["prov_status"]) == "running" and _text(fh.attrs["prov_end_time"]) == ""
        assert _text(run["description"]) == "one invocation of hpcqml on this file: command, machine, versions, times"
        assert _text(run["config_sha256"]) == "sha-1"
    store.commit("g/a", lambda g: g.create_dataset("d", data=[1.0]), attrs={"n": 3})
    store.commit("g/a", lambda g: g.create_dataset("e", data=[2.0]))     # replaces the group
    assert store.is_complete("g/a") and not store.is_complete("g/b")
    store.close_run("completed")
    assert not store.lock.held and not store.lock.path.exists()
    with h5py.File(path, "r") as fh:
        assert _text(fh.attrs["schema_version"]) == st.SCHEMA_VERSION and ISO.match(_text(fh.attrs["created"]))
        assert sorted(fh["g/a"]) == ["e"] and "n" not in fh["g/a"].attrs
        assert fh["g/a"].attrs["complete"] and ISO.match(_text(fh["g/a"].attrs["completed_at"]))
        run = fh["provenance/run_000"].attrs
        assert _text(run["status"]) == "completed" and _text(run["command_line"]) == "first"
        assert _text(run["error"]) == ""                              # no message given: none recorded
        assert _text(run["last_write"]) == _text(fh["g/a"].attrs["completed_at"])
        assert _text(run["end_time"]) >= _text(run["start_time"]) and _text(run["config_toml"]) == "x = 1"
        assert _text(fh.attrs["config_toml"]) == "x = 1" and _text(fh.attrs["config_sha256"]) == "sha-1"
        assert _text(fh.attrs["hpcqml_version"]) == __version__
        assert _text(fh.attrs["prov_status"]) == "completed" and _text(fh.attrs["prov_extra"]) == "e"
        assert "prov_config_toml" not in fh.attrs and "prov_config_sha256" not in fh.attrs
        assert _text(fh["provenance"].attrs["description"]).startswith("one group per invocation")
    again = st.ResultsStore(path, world())
    assert again.open_run("x = 2", "sha-2", {"command_line": "second"}) == "resumed"
    assert again.invocation == "provenance/run_001"
    again.close_run("failed", "boom")
    with h5py.File(path, "r") as fh:
        assert sorted(fh["provenance"]) == ["run_000", "run_001"]
        assert _text(fh["provenance/run_001"].attrs["error"]) == "boom"
        assert _text(fh.attrs["prov_status"]) == "failed" and _text(fh.attrs["prov_command_line"]) == "second"
        assert "prov_extra" not in fh.attrs                          # left by the earlier invocation
        assert _text(fh["provenance/run_000"].attrs["status"]) == "completed"
        assert _text(fh.attrs["config_toml"]) == "x = 2"


def test_an_invocation_left_running_is_closed_as_killed(tmp_path, no_job):
    """Its end is its last write; one killed before any write ends at its start."""
    path = tmp_path / "r.h5"
    first = _open(path)
    first.set_root_attrs({"start_time": "2000-01-01T00:00:00+00:00"}, group=first.invocation)
    first.commit("u", attrs={"i": 1})
    first.lock.release()                   # the process died without close_run
    with h5py.File(path, "r") as fh:
        start = _text(fh["provenance/run_000"].attrs["start_time"])
        last = _text(fh["provenance/run_000"].attrs["last_write"])
    assert start == "2000-01-01T00:00:00+00:00" and ISO.match(last) and last > start
    lines = []
    second = st.ResultsStore(path, world())
    second.open_run("x = 1", "sha-1", {}, log=lines.append)
    assert f"invocation run_000 (started {start}) was killed; recorded as such" in lines
    with h5py.File(path, "r") as fh:
        a = fh["provenance/run_000"].attrs
        assert _text(a["status"]) == "killed" and _text(a["end_time"]) == last
        assert _text(a["end_time_basis"]) == "last write before the process was killed"
        assert _text(fh["provenance/run_001"].attrs["status"]) == "running"
        assert "last_write" not in fh["provenance/run_001"].attrs
        second_start = _text(fh["provenance/run_001"].attrs["start_time"])
    second.lock.release()                  # killed too, before writing anything
    third = st.ResultsStore(path, world())
    third.open_run("x = 1", "sha-1", {})
    with h5py.File(path, "r") as fh:
        a = fh["provenance/run_001"].attrs
        assert _text(a["status"]) == "killed" and _text(a["end_time"]) == second_start
    third.close_run("completed")


def test_close_run_never_ends_before_the_start(tmp_path, no_job):
    store = _open(tmp_path / "r.h5")
    store.set_root_attrs({"start_time": "9999-01-01T00:00:00+00:00"}, group=store.invocation)
    store.close_run("completed")
    with h5py.File(store.path, "r") as fh:
        assert _text(fh["provenance/run_000"].attrs["end_time"]) == "9999-01-01T00:00:00+00:00"


def test_open_run_refuses_a_foreign_file_and_releases_the_lock(tmp_path, no_job):
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as fh:
        fh["x"] = 1
    store = st.ResultsStore(path, world())
    with pytest.raises(UserError) as info:
        store.open_run("x = 1", "s", {})
    # the whole message: not wrapped in the "damaged" one (UserError is a ValueError, one of the
    # errors read as damage around it)
    assert str(info.value) == f"results file {path}: exists but is not an hpcqml results file; choose another output"
    assert not store.lock.held and not store.lock.path.exists()
    calls = []
    assert store.open_run("x = 1", "s", {}, overwrite=True, prepare=lambda: calls.append(1)) == "created"
    assert calls == [1]
    store.close_run("completed")
    with h5py.File(path, "r") as fh:
        assert "x" not in fh and sorted(fh["provenance"]) == ["run_000"]


def test_open_run_sweeps_temporaries_and_names_them(tmp_path, no_job):
    (tmp_path / ".r.h5.k3j.tmp").write_bytes(b"half")
    lines = []
    store = st.ResultsStore(tmp_path / "r.h5", world())
    store.open_run("x", "s", {}, log=lines.append)
    assert lines == ["removed .r.h5.k3j.tmp, left by an interrupted write"]
    store.close_run("completed")


def test_open_run_of_a_damaged_file_names_the_damage(tmp_path, no_job):
    path = tmp_path / "r.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(InputFileError, match=r"is damaged \("):
        st.ResultsStore(path, world()).open_run("x", "s", {})


def test_results_path_that_is_a_symlink_stays_one(tmp_path, no_job):
    """The rewrite replaces the file the link points to (next to it) and leaves the link."""
    real = tmp_path / "elsewhere" / "r.h5"
    real.parent.mkdir()
    with h5py.File(real, "w") as fh:
        fh.attrs["schema_version"] = st.SCHEMA_VERSION
    link = tmp_path / "r.h5"
    os.symlink(real, link)
    store = st.ResultsStore(link, world())
    assert store.target() == real and st.ResultsStore(real, world()).target() == real
    assert store.open_run("x", "s", {}) == "resumed"
    assert store.invocation == "provenance/run_000"     # the file had no provenance yet: the first run
    store.commit("a")
    store.close_run("completed")
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    with h5py.File(real, "r") as fh:
        assert st.is_complete(fh, "a")


def test_decide_once_decides_once_and_returns_plain_values(tmp_path, no_job):
    store = _open(tmp_path / "r.h5")
    calls = []

    def decide():
        calls.append(1)
        return {"route": "double-backward", "width": 4, "ratio": 0.5, "ok": True}

    first = store.decide_once("spectrum/decisions", decide)
    assert first == {"route": "double-backward", "width": 4, "ratio": 0.5, "ok": True}
    again = store.decide_once("spectrum/decisions", decide)
    assert calls == [1] and again == first
    assert type(again["route"]) is str and type(again["width"]) is int and type(again["ok"]) is bool
    with h5py.File(store.path, "r") as fh:
        assert st.is_complete(fh, "spectrum/decisions")
        assert _text(fh["spectrum/decisions"].attrs["description"]) == \
            "choices made once for this file and reused on every resume (never re-decided)"
    store.close_run("completed")


def test_set_root_attrs_on_the_root_and_on_a_group(tmp_path, no_job):
    store = _open(tmp_path / "r.h5")
    store.set_root_attrs({"a": 1, "b": "two"})
    store.set_root_attrs({"c": 3.0}, group="x/y")
    store.close_run("completed")
    with h5py.File(store.path, "r") as fh:
        assert fh.attrs["a"] == 1 and _text(fh.attrs["b"]) == "two" and fh["x/y"].attrs["c"] == 3.0


# ---- stages: fingerprints, replacement, discarding ---------------------------------------------

def _stage(store, stage="spec", value=1.0, sha="old"):
    store.record_fingerprint(stage, sha, f"v = {value}")
    store.commit(stage, lambda g: g.create_dataset("v", data=value))
    store.commit(f"{stage}_extra", lambda g: g.create_dataset("w", data=value))
    store.commit(f"perf/{stage}", attrs={"wall": value})


def test_fingerprints_and_stage_records(tmp_path, no_job):
    store = _open(tmp_path / "r.h5")
    assert store.stage_records() == {}
    _stage(store)
    store.commit("perf/other")
    rec = store.stage_records()
    assert rec["spec"] == {"sha256": "old", "inputs": "v = 1.0", "stale": False, "stale_because": ""}
    assert rec["other"] == {"sha256": "", "inputs": "", "stale": False, "stale_because": ""}
    store.mark_stale(["spec", "absent"], "inputs changed")
    rec = store.stage_records()
    assert rec["spec"]["stale"] is True and rec["spec"]["stale_because"] == "inputs changed"
    with h5py.File(store.path, "r") as fh:
        assert bool(fh["spec"].attrs["stale"]) and _text(fh["spec"].attrs["stale_because"]) == "inputs changed"
        assert "absent" not in fh and "stale" not in fh["spec_extra"].attrs
        fp = fh["fingerprints/spec"].attrs
        assert _text(fp["invocation"]) == "provenance/run_000"
        assert _text(fp["description"]) == "sha256 of the settings that change the results of stage spec, " \
                                            "and those settings (TOML)"
    store.record_fingerprint("spec", "new", "v = 2")
    assert store.stage_records()["spec"]["stale"] is False
    with h5py.File(store.path, "r") as fh:    # every attribute of the schema is written, the stale mark too
        fp = fh["fingerprints/spec"].attrs
        assert sorted(fp) == ["complete", "completed_at", "description", "inputs", "invocation", "sha256", "stale",
                              "stale_because"]
        assert not fp["stale"] and _text(fp["stale_because"]) == ""
    store.close_run("completed")


def test_a_fingerprint_record_without_attributes_reads_as_empty_and_not_stale(tmp_path, no_job):
    """A ``/fingerprints/<stage>`` group without its attributes (not written by
    :meth:`record_fingerprint`, e.g. by an older version) reads as no settings, not stale."""
    store = _open(tmp_path / "r.h5")
    store.commit("fingerprints/bare")
    assert store.stage_records() == {"bare": {"sha256": "", "inputs": "", "stale": False, "stale_because": ""}}
    store.close_run("completed")


def test_a_store_without_an_invocation_commits_and_records_none(tmp_path, no_job):
    """A store that did not open a run (the runner's rank-0 bookkeeping after a failure) commits,
    records fingerprints and replaces a stage; the records name no invocation (empty string)."""
    path = tmp_path / "r.h5"
    _open(path).close_run("completed")
    store = st.ResultsStore(path, world())
    assert store.invocation is None
    store.commit("a", attrs={"n": 1})
    store.record_fingerprint("spec", "one", "v = 1")
    store.commit("spec")
    store.replace_stage("spec", "two", "v = 2")
    store.commit("spec")
    with h5py.File(path, "r") as fh:
        assert st.is_complete(fh, "a") and "last_write" not in fh["provenance/run_000"].attrs
        assert _text(fh["fingerprints/spec"].attrs["sha256"]) == "two"
        assert _text(fh["fingerprints/spec"].attrs["invocation"]) == ""
        assert _text(fh["previous/spec/fingerprint"].attrs["sha256"]) == "one"
        assert _text(fh["previous/spec/fingerprint"].attrs["invocation"]) == ""


def test_fingerprint_attributes_stored_as_bytes_read_as_text(tmp_path, no_job):
    """Attributes another writer stored as fixed-length byte strings (read back as bytes) read as
    text; bytes that are not UTF-8 become U+FFFD rather than an error."""
    store = _open(tmp_path / "r.h5")
    store.set_root_attrs({"sha256": np.bytes_(b"ab\xff"), "inputs": np.bytes_(b"v = 1")}, group="fingerprints/x")
    assert store.read(lambda fh: isinstance(fh["fingerprints/x"].attrs["inputs"], bytes))
    rec = store.stage_records()["x"]
    assert rec["sha256"] == "ab\ufffd" and rec["inputs"] == "v = 1"
    store.close_run("completed")


def test_restoring_a_stage_without_its_main_group_makes_none(tmp_path, no_job):
    """A stage whose results are only ``<stage>_*`` groups: swapping it back in from /previous
    brings back those groups, its perf record and fingerprint, and no empty ``<stage>`` group."""
    store = _open(tmp_path / "r.h5")
    store.record_fingerprint("spec", "old", "v = 1")
    store.commit("spec_extra", lambda g: g.create_dataset("w", data=1.0))
    store.commit("perf/spec", attrs={"wall": 1.0})
    store.replace_stage("spec", "new", "v = 2")
    store.commit("spec_extra", lambda g: g.create_dataset("w", data=2.0))
    assert store.restore_previous("spec", "old") is True
    store.close_run("completed")
    with h5py.File(store.path, "r") as fh:
        assert "spec" not in fh and float(fh["spec_extra/w"][()]) == 1.0
        assert float(fh["perf/spec"].attrs["wall"]) == 1.0 and _text(fh["fingerprints/spec"].attrs["sha256"]) == "old"
        assert float(fh["previous/spec/groups/spec_extra/w"][()]) == 2.0


def test_stage_names_in_and_stage_groups(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        assert st.stage_names_in(fh) == []
        for name in ("perf/b", "perf/a", "spec", "spec_x", "spectrum", "specx"):
            fh.require_group(name)
        assert st.stage_names_in(fh) == ["a", "b"]
        assert sorted(st.stage_groups(fh, "spec")) == ["spec", "spec_x"]


def test_belongs_to():
    for key in ("spec", "/spec/probe_000", "spec_extra/x", "perf/spec", "/fingerprints/spec/"):
        assert st._belongs_to(key, "spec"), key
    for key in ("spectrum", "specX", "Xspec", "perf/spectrum", "perf/specX", "/fingerprints/specX", "perf",
                "fingerprints/spec/x", "other/spec"):
        assert not st._belongs_to(key, "spec"), key


def test_discard_stage_deletes_its_groups_only(tmp_path, no_job):
    store = _open(tmp_path / "r.h5")
    _stage(store)
    _stage(store, "spectrum")
    store.discard_stage("spec")
    store.close_run("completed")
    with h5py.File(store.path, "r") as fh:
        assert "spec" not in fh and "spec_extra" not in fh
        assert "spec" not in fh["perf"] and "spec" not in fh["fingerprints"]
        assert "spectrum" in fh and "spectrum_extra" in fh and "spectrum" in fh["perf"]


def test_replaced_stage_is_set_aside_at_its_first_commit_and_dropped_when_complete(tmp_path, no_job):
    store = _open(tmp_path / "r.h5")
    _stage(store)
    _stage(store, "after")
    store.replace_stage("spec", "new", "v = 2.0", stale=["after"], because="spec recomputed")
    assert store.is_replacing("spec") and not store.is_replacing("after")
    assert not store.is_complete("spec") and not store.is_complete("perf/spec") and store.is_complete("after")
    with h5py.File(store.path, "r") as fh:          # nothing written yet
        assert "previous" not in fh and float(fh["spec/v"][()]) == 1.0
    store.commit("spec", lambda g: g.create_dataset("v", data=2.0))
    assert not store.is_replacing("spec") and store.is_complete("spec")
    with h5py.File(store.path, "r") as fh:
        prev = fh["previous/spec"]
        assert sorted(prev) == ["fingerprint", "groups", "perf"] and sorted(fh["previous"]) == ["spec"]
        assert sorted(prev["groups"]) == ["spec", "spec_extra"] and float(prev["groups/spec/v"][()]) == 1.0
        assert float(prev["perf"].attrs["wall"]) == 1.0 and _text(prev["fingerprint"].attrs["sha256"]) == "old"
        assert _text(prev.attrs["description"]) == \
            "results of stage spec replaced by a recomputation still in progress"
        assert float(fh["spec/v"][()]) == 2.0 and "spec_extra" not in fh and "spec" not in fh["perf"]
        fp = fh["fingerprints/spec"].attrs
        assert (_text(fp["sha256"]), _text(fp["inputs"]), bool(fp["stale"]), bool(fp["complete"])) == \
            ("new", "v = 2.0", False, True)
        assert _text(fp["description"]) == "sha256 of the settings that change the results of stage spec, " \
                                           "and those settings (TOML)"
        assert _text(fp["invocation"]) == "provenance/run_000" and ISO.match(_text(fp["completed_at"]))
        assert "stale_because" in fp and _text(fp["stale_because"]) == ""
        for key in ("after", "fingerprints/after"):
            assert bool(fh[key].attrs["stale"]) and _text(fh[key].attrs["stale_because"]) == "spec recomputed"
    # the old settings come back before the new run completed: swapped back in
    assert store.restore_previous("spec", "elsewhere") is False
    assert store.restore_previous("spec", "old") is True
    with h5py.File(store.path, "r") as fh:
        assert float(fh["spec/v"][()]) == 1.0 and float(fh["spec_extra/w"][()]) == 1.0
        assert _text(fh["fingerprints/spec"].attrs["sha256"]) == "old" and float(fh["perf/spec"].attrs["wall"]) == 1
        # the swap leaves no group of its own behind
        assert sorted(fh) == ["after", "after_extra", "fingerprints", "perf", "previous", "provenance", "spec",
                              "spec_extra"]
        assert sorted(fh["previous"]) == ["spec"] and sorted(fh["previous/spec"]) == ["fingerprint", "groups"]
        assert float(fh["previous/spec/groups/spec/v"][()]) == 2.0
        assert _text(fh["previous/spec/fingerprint"].attrs["sha256"]) == "new"
        assert "perf" not in fh["previous/spec"] and ".spec.incoming" not in fh["previous"]
    # and the other way again, then the stage's perf commit drops /previous/spec
    assert store.restore_previous("spec", "new") is True
    with h5py.File(store.path, "r") as fh:
        assert float(fh["spec/v"][()]) == 2.0 and float(fh["previous/spec/groups/spec/v"][()]) == 1.0
    store.commit("perf/spec", attrs={"wall": 2.0})
    store.close_run("completed")
    with h5py.File(store.path, "r") as fh:
        assert "spec" not in fh["previous"] and float(fh["perf/spec"].attrs["wall"]) == 2.0


def test_a_second_replacement_drops_the_older_generation(tmp_path, no_job):
    store = _open(tmp_path / "r.h5")
    _stage(store, value=1.0, sha="one")
    _stage(store, "after")
    store.replace_stage("spec", "two", "v = 2", stale=["after"])       # no reason given: an empty one
    store.commit("spec", lambda g: g.create_dataset("v", data=2.0))
    with h5py.File(store.path, "r") as fh:
        for key in ("after", "fingerprints/after"):
            assert bool(fh[key].attrs["stale"]) and _text(fh[key].attrs["stale_because"]) == ""
    store.replace_stage("spec", "three", "v = 3")
    store.commit("spec_extra", lambda g: g.create_dataset("w", data=3.0))   # a stage_* group commits first
    store.close_run("completed")
    with h5py.File(store.path, "r") as fh:
        assert float(fh["previous/spec/groups/spec/v"][()]) == 2.0
        assert _text(fh["previous/spec/fingerprint"].attrs["sha256"]) == "two"
        assert "perf" not in fh["previous/spec"]
        assert "spec" not in fh and float(fh["spec_extra/w"][()]) == 3.0


def test_on_root_raises_a_user_error_on_one_rank(tmp_path):
    store = st.ResultsStore(tmp_path / "r.h5", world())

    def refuse():
        raise UserError("no")

    with pytest.raises(UserError, match="^no$"):
        store._on_root(refuse)
    assert store._on_root(lambda: 5) == 5


def test_on_root_on_a_rank_that_got_no_outcome_says_so(tmp_path):
    """The guard for a rank that is not rank 0 and got nothing broadcast (here: rank 1 of a
    communicator of one process, which has nobody to broadcast from)."""
    store = st.ResultsStore(tmp_path / "r.h5", world())
    store.rank = 1
    with pytest.raises(RuntimeError, match="^results store: no outcome reached this rank$"):
        store._on_root(lambda: 5)


def test_one_rank_needs_no_collective(tmp_path, no_job):
    """The runner's rank-0-only bookkeeping drives the store with a stand-in communicator that has
    only Get_rank and Get_size: on one rank no collective is called, and an answer is the very
    object rank 0 computed (no copy)."""
    from hpcqml.runner import _SelfComm

    store = st.ResultsStore(tmp_path / "r.h5", _SelfComm())
    assert store.open_run("x = 1", "sha-1", {"command_line": "t"}) == "created"
    store.commit("a", attrs={"n": 1})
    assert store.is_complete("a") and store.read(lambda fh: int(fh["a"].attrs["n"])) == 1
    assert store.decide_once("s/decisions", lambda: {"k": 1}) == {"k": 1}
    answer = np.zeros(3)
    assert store._on_root(lambda: answer) is answer
    other = st.ResultsStore(tmp_path / "r.h5", _SelfComm())
    with pytest.raises(UserError, match="is being written by another run"):
        other.open_run("x = 1", "sha-1", {"command_line": "t"})   # a refusal: raised, not broadcast
    store.close_run("completed")
    assert not store.lock.path.exists()


def test_size_of_a_missing_file_is_zero(tmp_path):
    assert st._size(tmp_path / "none") == 0
    (tmp_path / "f").write_bytes(b"12345")
    assert st._size(tmp_path / "f") == 5


# ---- versions and provenance (last: they import torch, PETSc and scipy) -----------------------

def test_module_version_of_loaded_missing_and_versionless_modules(monkeypatch):
    """A loaded module's ``__version__``; a module not yet loaded is imported for it; a missing
    package is "not installed"; a module without ``__version__`` is "unknown"."""
    import json

    assert st._module_version("numpy") == np.__version__
    assert st._module_version("hpcqml_no_such_package_x") == "not installed"
    monkeypatch.delitem(sys.modules, "json")
    assert st._module_version("json") == json.__version__          # imported again for the answer
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    assert st._module_version("colorsys") == "unknown"               # imported, has no __version__
    assert st._module_version("glob") == "unknown"                   # loaded, has no __version__


def test_native_versions_when_nothing_is_loaded(monkeypatch):
    """No MPI loaded, PETSc and SLEPc not importable (a None entry in sys.modules makes the
    import fail), torch not loaded: every entry says so, and there are no others."""
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    monkeypatch.setitem(sys.modules, "petsc4py.PETSc", None)
    monkeypatch.setitem(sys.modules, "slepc4py.SLEPc", None)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert st._native_versions() == {"mpi_library": "unknown", "petsc": "unknown", "slepc": "unknown",
                                     "cuda": "none", "cudnn": "none", "nccl": "none", "gpu": "none"}


def test_slepc_version_is_read_even_when_petsc_cannot_be_imported(monkeypatch):
    """Each library is looked up on its own: PETSc failing to import leaves SLEPc's version
    (already imported here) in place."""
    slepc = pytest.importorskip("slepc4py.SLEPc")
    monkeypatch.setitem(sys.modules, "petsc4py.PETSc", None)
    v = st._native_versions()
    assert v["petsc"] == "unknown" and v["slepc"] == ".".join(str(x) for x in slepc.Sys.getVersion())


def test_versions_name_python_the_libraries_and_the_native_stack():
    import torch
    from mpi4py import MPI

    v = st._versions()
    assert v["python"] == sys.version.split()[0]
    assert v["numpy"] == np.__version__ and v["h5py"] == h5py.__version__
    assert v["hdf5"] == h5py.version.hdf5_version
    assert v["torch"] == torch.__version__ and v["mpi4py"] == __import__("mpi4py").__version__
    assert v["mpi_library"] == MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip()
    assert v["mpi_library"] and "\n" not in v["mpi_library"]
    for key, module in (("petsc", "petsc4py.PETSc"), ("slepc", "slepc4py.SLEPc")):
        try:
            lib = importlib.import_module(module)
            want = ".".join(str(x) for x in lib.Sys.getVersion())
        except ImportError:
            want = "unknown"
        assert v[key] == want, key
    if not torch.cuda.is_available():
        assert (v["cuda"], v["cudnn"], v["nccl"], v["gpu"]) == ("none",) * 4
    else:   # on a GPU machine: the CUDA and cuDNN versions torch was built with, NCCL's, the device name
        assert v["cuda"] == str(torch.version.cuda) and v["cudnn"] == str(torch.backends.cudnn.version())
        assert v["nccl"] == ".".join(str(x) for x in torch.cuda.nccl.version())
        assert v["gpu"] == torch.cuda.get_device_name(0)
    assert set(v) == {"python", "numpy", "h5py", "hdf5", "torch", "mpi4py", "petsc4py", "slepc4py", "scipy",
                      "mpi_library", "petsc", "slepc", "cuda", "cudnn", "nccl", "gpu"}


def test_scheduler_job_id(monkeypatch, no_job):
    assert st.scheduler_job_id() == "none"
    monkeypatch.setenv("PBS_JOBID", "77.pbs")
    assert st.scheduler_job_id() == "77.pbs"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert st.scheduler_job_id() == "123"          # SLURM first
    monkeypatch.setenv("SLURM_JOB_ID", "")
    assert st.scheduler_job_id() == "77.pbs"       # an empty variable does not count


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_commit_names_head_and_marks_a_dirty_tree(tmp_path, monkeypatch):
    """A scratch git repository (GIT_DIR/GIT_WORK_TREE point git there): HEAD's hash, then the
    hash with ``-dirty`` once a tracked file changes; no repository, or no git program, gives ``unknown``."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("1")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(repo))
    (repo / "untracked.txt").write_text("not tracked: not dirty")
    assert st._git_commit() == head
    (repo / "a.txt").write_text("2")
    assert st._git_commit() == head + "-dirty"
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "nothing"))
    assert st._git_commit() == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path))                # no git program to run at all
    assert st._git_commit() == "unknown"


def test_provenance_values(no_job):
    p = st.provenance(world(), ["hpcqml", "run", "a.toml"], {"run.seed": 3, "data": 5},
                      petsc_options=["-ksp_type", "cg"], threads=(2, "[run] threads"))
    assert p["hpcqml_version"] == __version__ and p["command_line"] == "hpcqml run a.toml"
    assert p["petsc_options"] == "-ksp_type cg" and p["mpi_size"] == 1 and p["job_id"] == "none"
    assert [_text(h) for h in p["hosts"]] == [socket.gethostname()]
    assert p["threads"] == 2 and p["threads_source"] == "[run] threads"
    assert p["seed_run_seed"] == 3 and p["seed_data"] == 5
    assert p["version_numpy"] == np.__version__ and ISO.match(p["start_time"])
    d = st.provenance(world(), [], {})
    assert d["petsc_options"] == "" and d["threads"] == 0 and d["threads_source"] == ""
