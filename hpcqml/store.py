"""The HDF5 results store: the one module that owns the file layout.

Layout (full description in ``docs/results-schema.md``)::

    /                      attrs: schema_version, hpcqml_version, config_toml, config_sha256,
                                  created, and the latest invocation's provenance (prov_*)
    /provenance/run_NNN    attrs: one invocation each (command line, hosts, versions, times,
                                  status running/completed/failed/interrupted/killed)
    /fingerprints/<stage>  attrs: sha256 and TOML of the settings that made the stage's results
    /perf/<stage>          per-rank wall/MPI time, peak memory, work counters
    /<stage>/...           each stage's own groups (docs/schema/<stage>.md)

One writer per file: a run holds ``<results>.lock`` (:class:`ResultsLock`) throughout.

Every group written through :meth:`ResultsStore.commit` carries ``complete = True``.
Crash safety: rank 0 copies the file, writes the unit into the copy, flushes it and
renames it over the original, so a process killed at any moment leaves either the old
or the new file, both readable, and every group marked complete is intact.
Only rank 0 touches the file; the other ranks get answers by broadcast.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import h5py
import numpy as np

from hpcqml import __version__
from hpcqml.errors import InputFileError, UserError
from hpcqml.protocols import Comm
from hpcqml.io import (FileTooLargeError, atomic_write, is_disk_full, open_hdf5_read, read_limited,
                       remove_stale_temporaries)

SCHEMA_VERSION = "1.1"
#: bytes per read when copying a results file into the rewrite's temporary file
COPY_CHUNK = 1 << 22
#: errors h5py raises on a file whose bytes were damaged after it was written
DAMAGE_ERRORS = (OSError, KeyError, RuntimeError, ValueError)


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def open_results(path: str | os.PathLike) -> h5py.File:
    """Open a results file read-only, with a one-line error for anything unreadable."""
    path = Path(path)
    fh = open_hdf5_read(path, "results file")
    if "schema_version" not in fh.attrs:
        fh.close()
        raise UserError(f"results file {path}: no schema_version attribute; not an hpcqml results file")
    return fh


def is_complete(fh: h5py.File, key: str) -> bool:
    """True when group ``key`` exists and was marked complete."""
    obj = fh.get(key)
    return isinstance(obj, h5py.Group) and bool(obj.attrs.get("complete", False))


def write_dataset(group: h5py.Group, name: str, data: Any, units: str, description: str,
                  **kwargs: Any) -> h5py.Dataset:
    """Create dataset ``group[name]`` carrying its ``units`` and a one-line ``description``.

    Every dataset the suite writes goes through here, so a results file describes itself:
    ``units`` is a unit string ("1" for dimensionless numbers, "count", "s", "bytes", ...) and
    ``description`` says in one line what the numbers are (with an equation number where one
    applies). Numeric arrays carry a Fletcher-32 checksum, so bytes damaged after
    writing raise on reading instead of giving wrong numbers. Strings are stored as UTF-8
    variable-length strings, which h5py reads back as
    ``bytes``; use :func:`read_strings` to read them.

    Args:
        group: the HDF5 group (inside a :meth:`ResultsStore.commit` callback).
        name: dataset name.
        data: array-like; a sequence of ``str`` becomes a string dataset.
        units: unit string; must not be empty.
        description: one line; must not be empty.
        **kwargs: passed to ``h5py.Group.create_dataset`` (``dtype``, ``compression``, ...).

    Returns:
        The new dataset.
    """
    if not units or not description or "\n" in description:
        raise ValueError(f"dataset {name!r}: units and a one-line description are required")
    array = np.asarray(data) if not isinstance(data, np.ndarray) else data
    if array.dtype.kind in ("U", "O") and "dtype" not in kwargs:
        array = np.array([str(v) for v in np.ravel(array)], dtype=object).reshape(array.shape)
        kwargs["dtype"] = h5py.string_dtype("utf-8")
    elif array.ndim > 0 and array.size > 0 and array.dtype.kind in "biufc":
        kwargs.setdefault("fletcher32", True)  # damaged bytes are then an error on reading, never numbers
    dset = group.create_dataset(name, data=array, **kwargs)
    dset.attrs["units"] = units
    dset.attrs["description"] = description
    return dset


def read_strings(dset: h5py.Dataset) -> list[str]:
    """A string dataset as a list of ``str`` (h5py returns ``bytes`` for variable-length strings)."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.ravel(dset[()])]


def _module_version(name: str) -> str:
    module = sys.modules.get(name)
    if module is None:
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as such
            return "not installed"
    return str(getattr(module, "__version__", "unknown"))


def _versions() -> dict[str, str]:
    """Versions of Python and every library a result depends on, plus the native stack
    under them: MPI library, PETSc/SLEPc, CUDA/cuDNN/NCCL and the GPU model ("none" when
    no GPU is used).
    """
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "h5py": h5py.__version__,
           "hdf5": h5py.version.hdf5_version}
    for name in ("torch", "mpi4py", "petsc4py", "slepc4py", "scipy"):
        out[name] = _module_version(name)
    out.update(_native_versions())
    return out


def _native_versions() -> dict[str, str]:
    out = {"mpi_library": "unknown", "petsc": "unknown", "slepc": "unknown",
           "cuda": "none", "cudnn": "none", "nccl": "none", "gpu": "none"}
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        out["mpi_library"] = mpi.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip()
    for name, module in (("petsc", "petsc4py.PETSc"), ("slepc", "slepc4py.SLEPc")):
        try:  # a run initialised PETSc already; elsewhere importing it costs a fraction of a second
            lib = importlib.import_module(module)
        except ImportError:
            continue
        out[name] = ".".join(str(v) for v in lib.Sys.getVersion())
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
        try:
            out["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError):
            out["nccl"] = "unknown"
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def scheduler_job_id() -> str:
    """The batch job id (SLURM_JOB_ID, PBS_JOBID) or "none" outside a batch job."""
    for name in ("SLURM_JOB_ID", "PBS_JOBID"):
        if os.environ.get(name):
            return os.environ[name]
    return "none"


def _git_commit() -> str:
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if res.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return res.stdout.strip() + ("-dirty" if dirty else "")


def provenance(comm: Comm, argv: list[str], seeds: Mapping[str, int], *, petsc_options: Sequence[str] = (),
               threads: tuple[int, str] = (0, "")) -> dict[str, Any]:
    """Facts about this invocation (collective: gathers host names).

    Values are plain attribute types: strings, integers and arrays of strings;
    ``version_<package>`` and ``seed_<name>`` hold one version or seed each.
    """
    hosts = comm.allgather(socket.gethostname())
    out: dict[str, Any] = {
        "hpcqml_version": __version__,
        "git_commit": _git_commit(),
        "command_line": " ".join(argv),
        "petsc_options": " ".join(petsc_options),
        "mpi_size": comm.Get_size(),
        "hosts": np.array(sorted(set(hosts)), dtype=h5py.string_dtype("utf-8")),
        "job_id": scheduler_job_id(),
        "threads": int(threads[0]),
        "threads_source": threads[1],
        "start_time": utc_now(),
    }
    out.update({f"version_{k}": v for k, v in sorted(_versions().items())})
    out.update({f"seed_{k.replace('.', '_')}": int(v) for k, v in sorted(seeds.items())})
    return out


class ResultsLock:
    """One writer per results file: ``<results>.lock``, created exclusively by rank 0.

    The file holds the holder's host, pid, batch job id and start time and is also
    ``flock``-ed while held. A lock is stale, and is removed, when

    * the flock is free and the holder ran on this host (its pid is gone or was reused), or
    * the file system has no flock, the holder ran on this host and its pid is gone, or
    * it was left by an earlier segment of this same batch job (a requeued job restarts on
      any node).

    A lock from another host is never guessed about otherwise: the refusal names the holder
    and the file to delete if no run is using it. A stale lock is removed only while its
    flock is held and the path still names the same file, so two runs that both found it
    stale cannot both take the lock.
    """

    def __init__(self, results: str | os.PathLike):
        self.results = Path(results)
        self.path = self.results.with_name(self.results.name + ".lock")
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], None] = lambda _line: None) -> None:
        """Take the lock or raise UserError naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                reason = _remove_if_stale(self.path, holder)
                if reason is None:
                    raise UserError(self._refusal(holder)) from None
                who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
                if reason in LOCK_CHANGED:   # another run got there first: this run removed nothing
                    log(f"lock {self.path} changed while it was judged ({who}: {reason}); trying again")
                else:
                    log(f"removed stale lock {self.path} ({who}: {reason})")
                continue
            _flock(fd)
            os.write(fd, (f"host={socket.gethostname()}\npid={os.getpid()}\njob={scheduler_job_id()}\n"
                          f"started={utc_now()}\n").encode())
            os.fsync(fd)
            self._fd = fd
            return
        raise UserError(f"results file {self.results}: could not take the lock {self.path}")

    def _refusal(self, holder: Mapping[str, str]) -> str:
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"
               if holder else "holder unknown")
        return (f"results file {self.results} is being written by another run ({who}); wait for it to "
                f"finish, or delete {self.path} if that run is gone")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent); never deletes a lock file that is not this one."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


#: a lock file holds four short lines; anything larger is not one of ours
LOCK_FILE_LIMIT = 4096


def _read_holder(path: Path) -> dict[str, str]:
    """The ``key=value`` lines of a lock file ({} when unreadable, not a small regular file)."""
    try:
        text = read_limited(path, LOCK_FILE_LIMIT).decode("utf-8", errors="replace")
    except (OSError, FileTooLargeError):
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _flock(fd: int) -> str:
    """Exclusive non-blocking flock on ``fd``: ``"taken"``, ``"busy"`` (another holder has it)
    or ``"unsupported"`` (a file system without flock, e.g. Lustre without ``-o flock``).
    """
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "busy"
    except OSError:
        return "unsupported"
    return "taken"


def _same_file(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(holder: Mapping[str, str], flock: str) -> str | None:
    """Why a lock whose flock state is ``flock`` is stale, or None when it may be live."""
    if flock == "busy" or not holder.get("pid", "").isdigit():
        return None  # held right now, or being written right now
    job = scheduler_job_id()
    if job != "none" and holder.get("job") == job:
        return f"left by an earlier segment of batch job {job}"
    if holder.get("host") != socket.gethostname():
        return None
    if not _pid_alive(int(holder["pid"])):
        return "the process is no longer running"
    if flock == "taken":
        return "its pid now belongs to a process that does not hold the lock"
    return None  # no flock here and the pid is alive: assume the holder is live


#: the reasons :func:`_remove_if_stale` gives when the lock changed under it (nothing removed)
LOCK_CHANGED = ("already gone", "replaced meanwhile")


def _remove_if_stale(path: Path, holder: Mapping[str, str]) -> str | None:
    """Remove the lock at ``path`` if it is stale (see :class:`ResultsLock`); return why, or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "already gone"
    except OSError:
        return None
    try:
        reason = _stale_reason(holder, _flock(fd))
        if reason is not None and _same_file(fd, path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        elif reason is not None:
            reason = "replaced meanwhile"  # another run removed it first; try the exclusive create again
        return reason
    finally:
        os.close(fd)


def damage_error(path: Path, exc: BaseException) -> InputFileError | None:
    """The damaged-file error when ``exc`` came from unreadable HDF5 bytes, else None
    (a KeyError or ValueError without HDF5's wording is a plain bug, not damage).
    """
    if isinstance(exc, OSError) and not is_disk_full(exc):
        return damaged(path, exc)
    if isinstance(exc, (KeyError, ValueError, RuntimeError)) and _damage_message(exc):
        return damaged(path, exc)
    return None


def _read_or_name_damage(path: Path, fh: h5py.File, fn: Callable[[h5py.File], Any]) -> Any:
    """``fn(fh)``; when it fails other than with a UserError and the file turns out damaged
    (a link to nothing reads as None, a member list as garbage), the damage is named instead.
    A file that only breaks the schema rules (a dataset without units, say) is not damaged:
    the reader's own error stands.
    """
    try:
        return fn(fh)
    except UserError:
        raise
    except Exception:
        from hpcqml.verify import damage_in, damage_summary

        try:
            problems = damage_in(fh)
        except Exception:  # noqa: BLE001 - the checker failing too: the first error stands
            problems = []
        if problems:
            raise InputFileError(damage_summary(path, problems)) from None
        raise


def damaged(path: Path, exc: BaseException) -> InputFileError:
    """The one-line error for a results file HDF5 cannot read."""
    detail = (str(exc).splitlines() or [type(exc).__name__])[0].strip() or type(exc).__name__
    return InputFileError(f"results file {path} is damaged ({detail}); restore it or use --overwrite")


class ResultsStore:
    """Collective access to one results file; only rank 0 reads or writes it.

    A writing run holds :class:`ResultsLock` from :meth:`open_run` to :meth:`close_run`;
    readers (``info``, ``report``) never take it.
    """

    def __init__(self, path: str | os.PathLike[str], comm: Comm) -> None:
        self.path = Path(path)
        self.comm = comm
        self.rank = comm.Get_rank()
        self.invocation: str | None = None
        self.lock = ResultsLock(self.path)
        #: stages recomputed whose old groups are set aside by their first new commit
        self._replacing: dict[str, _Swap] = {}

    def target(self) -> Path:
        """The file rewrites replace: the results path, or the file it links to. A results
        path that is a symbolic link stays one (the user's layout: results kept on another
        file system); the rename happens next to the target, atomic there.
        """
        if self.path.is_symlink():
            return Path(os.path.realpath(self.path))
        return self.path

    # ---- collective helpers -------------------------------------------------------
    def _on_root(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and broadcast its value; a UserError there is raised on every rank."""
        outcome: tuple[bool, Any] | None = None
        if self.rank == 0:
            try:
                outcome = (True, fn())
            except UserError as exc:
                if self.comm.Get_size() == 1:
                    raise
                outcome = (False, exc)
        if self.comm.Get_size() > 1:
            outcome = self.comm.bcast(outcome, root=0)
        if outcome is None:  # rank 0 always sets it, and the broadcast hands it to every rank
            raise RuntimeError("results store: no outcome reached this rank")
        ok, value = outcome
        if not ok:
            raise value
        return value

    def read(self, fn: Callable[[h5py.File], Any], default: Any = None) -> Any:
        """Run ``fn(file)`` on rank 0 (read-only) and broadcast the result."""
        def body() -> Any:
            if not self.path.exists():
                return default
            try:
                with h5py.File(self.path, "r") as fh:
                    return _read_or_name_damage(self.path, fh, fn)
            except DAMAGE_ERRORS as exc:
                error = None if isinstance(exc, UserError) else damage_error(self.path, exc)
                if error is None:
                    raise  # a reader's own error or a bug, not damaged bytes
                raise error from None
        return self._on_root(body)

    def is_complete(self, key: str) -> bool:
        """Collective: group ``key`` exists and is complete. The groups of a stage being
        replaced (:meth:`replace_stage`) count as absent until its first new commit.
        """
        if self._replacing_stage(key) is not None:
            return False
        return bool(self.read(lambda fh: is_complete(fh, key), default=False))

    def _rewrite(self, edit: Callable[[h5py.File], None]) -> None:
        """Rank 0: apply ``edit`` to a copy of the file and rename the copy over it."""
        def update(out: BinaryIO) -> None:
            with open(self.path, "rb") as src:
                shutil.copyfileobj(src, out, COPY_CHUNK)
            out.seek(0)
            try:
                fh = h5py.File(out, "a")
            except OSError as exc:
                if is_disk_full(exc):
                    raise
                raise damaged(self.path, exc) from None
            with fh:
                try:
                    edit(fh)
                except DAMAGE_ERRORS as exc:
                    if _damage_message(exc):
                        raise damaged(self.path, exc) from None
                    raise
        atomic_write(self.target(), update, size_hint=_size(self.path))

    def commit(self, key: str, write: Callable[[h5py.Group], None] | None = None,
               attrs: Mapping[str, Any] | None = None) -> None:
        """Write group ``key`` (replacing any previous one) and mark it complete, durably."""
        invocation = self.invocation
        replacing = self._replacing_stage(key)
        swap = self._replacing.get(replacing) if replacing is not None else None

        def edit(fh: h5py.File) -> None:
            if swap is not None:  # the first new unit of a recomputed stage: old groups set aside
                _set_aside(fh, swap)
            if key in fh:
                del fh[key]
            group = fh.require_group(key)
            if write is not None:
                write(group)
            for name, value in (attrs or {}).items():
                group.attrs[name] = value
            group.attrs["complete"] = True
            group.attrs["completed_at"] = utc_now()
            if invocation is not None and invocation in fh:
                fh[invocation].attrs["last_write"] = group.attrs["completed_at"]
            if key.startswith("perf/") and f"{PREVIOUS}/{key[5:]}" in fh:
                del fh[f"{PREVIOUS}/{key[5:]}"]  # the stage is complete: its replaced results go
        self._on_root(lambda: self._rewrite(edit))
        if replacing is not None:
            del self._replacing[replacing]

    def _replacing_stage(self, key: str) -> str | None:
        """The stage being replaced that group ``key`` belongs to, if any."""
        return next((name for name in self._replacing if _belongs_to(key, name)), None)

    def replace_stage(self, stage: str, sha256: str, inputs_toml: str, stale: Sequence[str] = (),
                      because: str = "") -> None:
        """Recompute ``stage`` without deleting its results first.

        Nothing is written now. The stage's old groups stay as they are, hidden from
        :meth:`is_complete`, until its first new commit; that commit, in the same atomic
        rewrite, moves them (with their performance record and fingerprint) to
        ``/previous/<stage>``, records the new fingerprint and marks the ``stale`` stages.
        A stage that is refused or fails before that commit leaves the file untouched;
        one that fails after it keeps the old results under ``/previous`` (restored by
        :meth:`restore_previous` when the old settings come back); the stage's own
        ``/perf`` commit, which marks it complete, deletes them.
        """
        self._replacing[stage] = _Swap(stage, sha256, inputs_toml, tuple(stale), because, self.invocation or "")

    def is_replacing(self, stage: str) -> bool:
        """Whether ``stage`` is recomputed and its first new commit has not happened yet."""
        return stage in self._replacing

    def restore_previous(self, stage: str, sha256: str) -> bool:
        """Swap ``/previous/<stage>`` back in when it was made with settings ``sha256``
        (the current groups of the stage take its place). Returns whether it did.
        """
        def found(fh: h5py.File) -> bool:
            rec = fh.get(f"{PREVIOUS}/{stage}/fingerprint")
            return rec is not None and _text(rec.attrs.get("sha256", "")) == sha256
        if not self.read(found, default=False):
            return False
        self._on_root(lambda: self._rewrite(lambda fh: _exchange(fh, stage)))
        return True

    def decide_once(self, key: str, decide: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
        """A choice made once per results file and reused ever after (collective).

        When group ``key`` is complete its attributes are the choice made earlier (a resume
        never re-decides, so a timing-based choice cannot flip between invocations);
        otherwise ``decide()`` runs on every rank, rank 0's answer is committed as the
        attributes of ``key`` before any result that depends on it, and returned.

        Args:
            key: the group recording the choice, inside the stage's groups
                (e.g. ``spectrum/decisions``), so it is replaced with them on a recomputation.
            decide: returns plain attribute values (str, int, float, bool).

        Returns:
            The choice, as stored.
        """
        def stored(fh: h5py.File) -> dict[str, Any] | None:
            if not is_complete(fh, key):
                return None
            return {k: _text(v) if isinstance(v, bytes) else (v.item() if hasattr(v, "item") else v)
                    for k, v in fh[key].attrs.items() if k not in ("complete", "completed_at", "description")}
        earlier = None if self._replacing_stage(key) is not None else self.read(stored)
        if earlier is not None:
            return earlier
        choice = dict(decide())
        if self.comm.Get_size() > 1:
            choice = self.comm.bcast(choice, root=0)
        self.commit(key, attrs={**choice, "description": "choices made once for this file and reused on "
                                                           "every resume (never re-decided)"})
        return choice

    def set_root_attrs(self, attrs: Mapping[str, Any], group: str = "/") -> None:
        """Set attributes on a group (durably, like :meth:`commit`)."""
        def edit(fh: h5py.File) -> None:
            target = fh.require_group(group)
            for name, value in attrs.items():
                target.attrs[name] = value
        self._on_root(lambda: self._rewrite(edit))

    # ---- per-stage fingerprints -------------------------------------------------
    def stage_records(self) -> dict[str, dict[str, Any]]:
        """``/fingerprints/<stage>`` of every stage the file has results of (see docs)."""
        def body(fh: h5py.File) -> dict[str, dict[str, Any]]:
            out = {}
            for name, group in fh.get("fingerprints", {}).items():
                a = group.attrs
                out[name] = {"sha256": _text(a.get("sha256", "")), "inputs": _text(a.get("inputs", "")),
                             "stale": bool(a.get("stale", False)), "stale_because": _text(a.get("stale_because", ""))}
            for name in stage_names_in(fh):
                out.setdefault(name, {"sha256": "", "inputs": "", "stale": False, "stale_because": ""})
            return out
        return self.read(body, default={})

    def record_fingerprint(self, stage: str, sha256: str, inputs_toml: str) -> None:
        """Stamp the inputs that made ``stage``'s groups (cleared of any stale mark)."""
        self.commit(f"fingerprints/{stage}", attrs={
            "sha256": sha256, "inputs": inputs_toml, "stale": False, "stale_because": "",
            "invocation": self.invocation or "",
            "description": f"sha256 of the settings that change the results of stage {stage}, "
                           "and those settings (TOML)"})

    def discard_stage(self, stage: str) -> None:
        """Delete a stage's groups and its performance record (its settings changed)."""
        def edit(fh: h5py.File) -> None:
            for name in [k for k in fh if k == stage or k.startswith(stage + "_")]:
                del fh[name]
            for key in (f"perf/{stage}", f"fingerprints/{stage}"):
                if key in fh:
                    del fh[key]
        self._on_root(lambda: self._rewrite(edit))

    def mark_stale(self, stages: Sequence[str], because: str) -> None:
        """Flag results computed from inputs that were recomputed since (kept, not deleted)."""
        if not stages:
            return

        def edit(fh: h5py.File) -> None:
            for stage in stages:
                for key in (f"fingerprints/{stage}", stage):
                    if key in fh:
                        fh[key].attrs["stale"] = True
                        fh[key].attrs["stale_because"] = because
        self._on_root(lambda: self._rewrite(edit))

    # ---- opening a run ----------------------------------------------------------
    def open_run(self, config_toml: str, config_sha256: str, prov: Mapping[str, Any],
                 overwrite: bool = False, log: Callable[[str], None] = lambda _line: None,
                 prepare: Callable[[], None] | None = None) -> str:
        """Take the writer lock, create or reopen the file, and record this invocation.

        Returns ``"created"`` or ``"resumed"``. Invocations an earlier run left
        ``running`` (it was killed) are closed as ``killed``. Whether the stages already
        in the file fit the config is the runner's decision (per-stage fingerprints).
        ``overwrite`` starts a new file even if one exists; ``prepare`` runs on rank 0
        once the lock is held (e.g. deleting the previous run for ``--overwrite``).
        """
        def body() -> tuple[str, str]:
            self.lock.acquire(log)
            try:
                if prepare is not None:
                    prepare()
                return self._open_locked(config_toml, config_sha256, prov, overwrite, log)
            except BaseException:
                self.lock.release()
                raise

        state, invocation = self._on_root(body)
        self.invocation = invocation
        return state

    def _open_locked(self, config_toml: str, config_sha256: str, prov: Mapping[str, Any],
                     overwrite: bool, log: Callable[[str], None]) -> tuple[str, str]:
        """Rank 0, lock held: the body of :meth:`open_run`."""
        # only now is it certain that no live run owns the temporaries
        target = self.target()
        for tmp in remove_stale_temporaries(target.parent, target.name):
            log(f"removed {tmp.name}, left by an interrupted write")
        state = "created"
        if self.path.exists() and not overwrite:
            try:
                with h5py.File(self.path, "r") as fh:
                    if "schema_version" not in fh.attrs:
                        raise UserError(f"results file {self.path}: exists but is not an hpcqml results file; "
                                        "choose another output")
                    runs = len(fh["provenance"]) if "provenance" in fh else 0
            except UserError:
                raise  # a readable file that is not ours: said as it is, not as damage
            except DAMAGE_ERRORS as exc:
                raise damaged(self.path, exc) from None
            state = "resumed"
        else:
            runs = 0
            self.path.parent.mkdir(parents=True, exist_ok=True)

            def create(out: BinaryIO) -> None:
                with h5py.File(out, "w") as fh:
                    fh.attrs["schema_version"] = SCHEMA_VERSION
                    fh.attrs["created"] = utc_now()
            atomic_write(target, create)
        invocation = f"provenance/run_{runs:03d}"

        def record(fh: h5py.File) -> None:
            for line in close_dead_invocations(fh):
                log(line)
            group = fh.require_group(invocation)
            group.attrs["description"] = "one invocation of hpcqml on this file: command, machine, versions, times"
            fh["provenance"].attrs["description"] = "one group per invocation (run_NNN), oldest first"
            values = {"start_time": utc_now(), **prov, "config_sha256": config_sha256, "config_toml": config_toml,
                      "status": "running", "end_time": ""}
            _set_invocation(fh, group, values)
            fh.attrs["config_toml"] = config_toml
            fh.attrs["config_sha256"] = config_sha256
            fh.attrs["hpcqml_version"] = __version__
        self._rewrite(record)
        return state, invocation

    def close_run(self, status: str, message: str = "") -> None:
        """Record the end time, final status (``completed``, ``failed``, ``interrupted``)
        and the error ``message`` of this invocation, and release the lock.
        """
        if self.invocation is None:
            return
        invocation = self.invocation

        def edit(fh: h5py.File) -> None:
            group = fh.require_group(invocation)
            start = _text(group.attrs.get("start_time", ""))
            _set_invocation(fh, group, {"end_time": max(utc_now(), start), "status": status, "error": message})
        try:
            self._on_root(lambda: self._rewrite(edit))
        finally:
            if self.rank == 0:
                self.lock.release()


#: top-level group holding the results a recomputed stage replaced, until it completes
PREVIOUS = "previous"


@dataclass(frozen=True)
class _Swap:
    """A recomputed stage's pending swap (see :meth:`ResultsStore.replace_stage`)."""

    stage: str
    sha256: str
    inputs: str
    stale: tuple[str, ...]
    because: str
    invocation: str


def _belongs_to(key: str, stage: str) -> bool:
    """Whether group ``key`` is one of ``stage``'s groups or its perf/fingerprint record."""
    top = key.strip("/").split("/", 1)[0]
    return top == stage or top.startswith(stage + "_") or key.strip("/") in (f"perf/{stage}",
                                                                               f"fingerprints/{stage}")


def stage_groups(fh: h5py.File, stage: str) -> list[str]:
    """The top-level groups holding ``stage``'s results (``stage`` and ``stage_*``)."""
    return [k for k in fh if k == stage or k.startswith(stage + "_")]


def _exchange(fh: h5py.File, stage: str) -> None:
    """Swap ``stage``'s groups, perf record and fingerprint with ``/previous/<stage>``."""
    prev = f"{PREVIOUS}/{stage}"
    incoming = f"{PREVIOUS}/.{stage}.incoming"
    if prev in fh:
        fh.move(prev, incoming)
    out = fh.require_group(prev)
    out.attrs["description"] = f"results of stage {stage} replaced by a recomputation still in progress"
    for name in stage_groups(fh, stage):
        out.require_group("groups")
        fh.move(name, f"{prev}/groups/{name}")
    for key, to in ((f"perf/{stage}", "perf"), (f"fingerprints/{stage}", "fingerprint")):
        if key in fh:
            fh.move(key, f"{prev}/{to}")
    if incoming not in fh:
        return
    for name in list(fh[f"{incoming}/groups"]) if f"{incoming}/groups" in fh else []:
        fh.move(f"{incoming}/groups/{name}", name)
    for key, src in ((f"perf/{stage}", "perf"), (f"fingerprints/{stage}", "fingerprint")):
        if f"{incoming}/{src}" in fh:
            fh.require_group(key.split("/")[0])
            fh.move(f"{incoming}/{src}", key)
    del fh[incoming]


def _set_aside(fh: h5py.File, swap: _Swap) -> None:
    """The first commit of a recomputed stage: old results to ``/previous``, new fingerprint,
    dependants marked stale (all inside the commit's atomic rewrite).
    """
    if f"{PREVIOUS}/{swap.stage}" in fh:
        del fh[f"{PREVIOUS}/{swap.stage}"]  # an older generation: neither the old nor the new settings
    _exchange(fh, swap.stage)
    fp = fh.require_group(f"fingerprints/{swap.stage}")
    for name, value in {"sha256": swap.sha256, "inputs": swap.inputs, "stale": False, "stale_because": "",
                        "invocation": swap.invocation,
                        "description": f"sha256 of the settings that change the results of stage {swap.stage}, "
                                       "and those settings (TOML)", "complete": True,
                        "completed_at": utc_now()}.items():
        fp.attrs[name] = value
    for other in swap.stale:
        for key in (f"fingerprints/{other}", other):
            if key in fh:
                fh[key].attrs["stale"] = True
                fh[key].attrs["stale_because"] = swap.because


def _set_invocation(fh: h5py.File, group: h5py.Group, values: Mapping[str, Any]) -> None:
    """Write invocation attributes, mirrored on the root as ``prov_<name>`` when the
    invocation is the latest one (the root always describes the latest invocation).
    """
    latest = group.name == f"/provenance/{sorted(fh['provenance'])[-1]}"
    for name, value in values.items():
        group.attrs[name] = value
        if latest and name not in ("config_toml", "config_sha256"):
            fh.attrs[f"prov_{name}"] = value
    if latest:
        for name in [k for k in fh.attrs if k.startswith("prov_") and k[5:] not in group.attrs]:
            del fh.attrs[name]  # left by an earlier invocation that recorded more


def close_dead_invocations(fh: h5py.File) -> list[str]:
    """Mark invocations still ``running`` as ``killed`` (the caller holds the lock, so
    no live run can own them); their end is the last write they made, never before
    their start. Returns one log line per invocation closed.
    """
    lines = []
    for name, group in fh.get("provenance", {}).items():
        if _text(group.attrs.get("status", "")) != "running":
            continue
        start = _text(group.attrs.get("start_time", ""))
        end = max(_text(group.attrs.get("last_write", "")), start)
        _set_invocation(fh, group, {"status": "killed", "end_time": end})
        group.attrs["end_time_basis"] = "last write before the process was killed"
        lines.append(f"invocation {name} (started {start}) was killed; recorded as such")
    return lines


def stage_names_in(fh: h5py.File) -> list[str]:
    """Stages with a performance record in the file."""
    return sorted(fh["perf"]) if "perf" in fh else []


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _damage_message(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("signature", "corrupt", "truncated", "bad ", "checksum", "decompress"))
