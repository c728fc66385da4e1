"""The HDF5 results store: the one module that owns the file layout.

Layout (full description in ``docs/results-schema.md``)::

    /                      attrs: schema_version, hpcqml_version, config_toml, config_sha256,
                                  created, and the latest invocation's provenance (prov_*)
    /provenance/run_NNN    attrs: one invocation each (command line, hosts, versions, times)
    /perf/<stage>          per-rank wall/MPI time, peak memory, work counters
    /<stage>/...           each stage's own groups (docs/schema/<stage>.md)

Every group written through :meth:`ResultsStore.commit` carries ``complete = True``.
Crash safety: rank 0 copies the file, writes the unit into the copy, flushes it and
renames it over the original, so a process killed at any moment leaves either the old
or the new file, both readable, and every group marked complete is intact.
Only rank 0 touches the file; the other ranks get answers by broadcast.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import h5py
import numpy as np

from hpcqml import __version__
from hpcqml.errors import UserError
from hpcqml.io import atomic_write, remove_stale_temporaries

SCHEMA_VERSION = "1.0"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def open_results(path: str | os.PathLike) -> h5py.File:
    """Open a results file read-only, with a one-line error for anything unreadable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"results file {path}: not found")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"results file {path}: not a readable HDF5 file ({exc.__class__.__name__})") from None
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
    applies). Strings are stored as UTF-8 variable-length strings, which h5py reads back as
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
    dset = group.create_dataset(name, data=array, **kwargs)
    dset.attrs["units"] = units
    dset.attrs["description"] = description
    return dset


def read_strings(dset: h5py.Dataset) -> list[str]:
    """A string dataset as a list of ``str`` (h5py returns ``bytes`` for variable-length strings)."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.ravel(dset[()])]


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "h5py": h5py.__version__}
    for name in ("torch", "mpi4py", "petsc4py", "slepc4py", "scipy"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except Exception:  # noqa: BLE001 - a missing optional package is recorded as such
                out[name] = "not installed"
                continue
        out[name] = str(getattr(module, "__version__", "unknown"))
    return out


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


def provenance(comm, argv: list[str], seeds: Mapping[str, int]) -> dict[str, Any]:
    """Facts about this invocation (collective: gathers host names)."""
    hosts = comm.allgather(socket.gethostname())
    return {
        "hpcqml_version": __version__,
        "git_commit": _git_commit(),
        "command_line": " ".join(argv),
        "mpi_size": comm.Get_size(),
        "hosts": json.dumps(sorted(set(hosts))),
        "versions": json.dumps(_versions(), sort_keys=True),
        "seeds": json.dumps(dict(seeds), sort_keys=True),
        "start_time": utc_now(),
    }


class ResultsStore:
    """Collective access to one results file; only rank 0 reads or writes it."""

    def __init__(self, path: str | os.PathLike, comm, perf=None):
        self.path = Path(path)
        self.comm = comm
        self.rank = comm.Get_rank()
        self._perf = perf
        self.invocation: str | None = None

    # ---- collective helpers -------------------------------------------------------
    def _on_root(self, fn: Callable[[], Any]) -> Any:
        value = fn() if self.rank == 0 else None
        return self.comm.bcast(value, root=0) if self.comm.Get_size() > 1 else value

    def read(self, fn: Callable[[h5py.File], Any], default: Any = None) -> Any:
        """Run ``fn(file)`` on rank 0 (read-only) and broadcast the result."""
        def body() -> Any:
            if not self.path.exists():
                return default
            with h5py.File(self.path, "r") as fh:
                return fn(fh)
        return self._on_root(body)

    def is_complete(self, key: str) -> bool:
        return bool(self.read(lambda fh: is_complete(fh, key), default=False))

    def _rewrite(self, edit: Callable[[h5py.File], None]) -> None:
        """Rank 0: apply ``edit`` to a copy of the file and rename the copy over it."""
        def update(tmp: str) -> None:
            shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a") as fh:
                edit(fh)
        atomic_write(self.path, update)

    def commit(self, key: str, write: Callable[[h5py.Group], None] | None = None,
               attrs: Mapping[str, Any] | None = None) -> None:
        """Write group ``key`` (replacing any previous one) and mark it complete, durably."""
        def edit(fh: h5py.File) -> None:
            if key in fh:
                del fh[key]
            group = fh.require_group(key)
            if write is not None:
                write(group)
            for name, value in (attrs or {}).items():
                group.attrs[name] = value
            group.attrs["complete"] = True
            group.attrs["completed_at"] = utc_now()
        self._on_root(lambda: self._rewrite(edit))

    def set_root_attrs(self, attrs: Mapping[str, Any], group: str = "/") -> None:
        """Set attributes on a group (durably, like :meth:`commit`)."""
        def edit(fh: h5py.File) -> None:
            target = fh.require_group(group)
            for name, value in attrs.items():
                target.attrs[name] = value
        self._on_root(lambda: self._rewrite(edit))

    # ---- opening a run ----------------------------------------------------------
    def open_run(self, config_toml: str, config_sha256: str, prov: Mapping[str, Any],
                 overwrite: bool = False) -> str:
        """Create the file or check that it belongs to the same config; record provenance.

        Returns ``"created"`` or ``"resumed"``. A file written with another config is
        refused (UserError) unless ``overwrite``.
        """
        def body() -> tuple[str, str]:
            state = "created"
            if self.path.parent.exists():
                remove_stale_temporaries(self.path.parent, self.path.name)  # left by a killed write
            if self.path.exists() and not overwrite:
                try:
                    with h5py.File(self.path, "r") as fh:
                        old_sha = fh.attrs.get("config_sha256")
                        runs = len(fh["provenance"]) if "provenance" in fh else 0
                except OSError:
                    return "error", (f"results file {self.path}: exists but is not a readable HDF5 file; "
                                     "use --overwrite or another output")
                if old_sha is None:
                    return "error", f"results file {self.path}: exists but is not an hpcqml results file"
                if old_sha != config_sha256:
                    return "error", (f"results file {self.path} was written with a different config "
                                     f"(sha256 {str(old_sha)[:12]} vs {config_sha256[:12]}); "
                                     "use --overwrite to start again or choose another output")
                state = "resumed"
            else:
                runs = 0
                self.path.parent.mkdir(parents=True, exist_ok=True)

                def create(tmp: str) -> None:
                    with h5py.File(tmp, "w") as fh:
                        fh.attrs["schema_version"] = SCHEMA_VERSION
                        fh.attrs["created"] = utc_now()
                        fh.attrs["config_toml"] = config_toml
                        fh.attrs["config_sha256"] = config_sha256
                atomic_write(self.path, create)
            invocation = f"provenance/run_{runs:03d}"

            def record(fh: h5py.File) -> None:
                group = fh.require_group(invocation)
                for name, value in prov.items():
                    group.attrs[name] = value
                    fh.attrs[f"prov_{name}"] = value
                group.attrs["status"] = "running"
                fh.attrs["hpcqml_version"] = __version__
            self._rewrite(record)
            return state, invocation

        state, detail = self._on_root(body)
        if state == "error":
            raise UserError(detail)
        self.invocation = detail
        return state

    def close_run(self, status: str) -> None:
        """Record the end time and final status of this invocation."""
        if self.invocation is None:
            return
        end = utc_now()
        self.set_root_attrs({"end_time": end, "status": status}, group=self.invocation)
        self.set_root_attrs({"prov_end_time": end, "prov_status": status})
