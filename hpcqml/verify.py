"""``hpcqml verify FILE``: read every dataset of a results file through its checksum and
check the file's structure against the results schema (``docs/results-schema.md``).

Numeric datasets carry a Fletcher-32 checksum (``hpcqml.store.write_dataset``): reading
one whose bytes changed after writing raises instead of returning numbers, so reading
every dataset in full finds every damaged one. The structural rules are those every
hpcqml results file satisfies:

* the root carries ``schema_version`` and ``created``;
* each ``/provenance/run_NNN`` carries a ``status``;
* each stage with a complete ``/perf/<stage>`` record has its ``/fingerprints/<stage>``
  record and its own group ``/<stage>`` (or ``/<stage>_*``);
* every dataset outside the bookkeeping groups carries ``units`` and ``description``.

Each problem is one line naming the group (or dataset) concerned. The runner calls
:func:`verify_groups` on the groups a resumed stage depends on before it skips or
resumes, and the CLI runs :func:`verify_file` before ``report`` reads a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import h5py

from hpcqml.errors import InputFileError
from hpcqml.io import open_hdf5_read

T = TypeVar("T")

#: groups whose datasets and attributes are bookkeeping, not self-describing results
BOOKKEEPING = ("provenance", "fingerprints")


def _detail(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0].strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_dataset(name: str, dset: h5py.Dataset, describe: bool = True) -> list[str]:
    """Read ``dset`` in full (through its checksum) and, with ``describe``, check its
    describing attributes.
    """
    problems = []
    try:
        dset[()]
    except Exception as exc:  # noqa: BLE001 - any failure to read the bytes is damage
        return [f"dataset /{name}: unreadable ({_detail(exc)})"]
    top = name.split("/", 1)[0]
    if describe and top not in BOOKKEEPING:
        try:
            missing = [a for a in ("units", "description") if a not in dset.attrs]
        except Exception as exc:  # noqa: BLE001
            return [f"dataset /{name}: attributes unreadable ({_detail(exc)})"]
        if missing:
            problems.append(f"dataset /{name}: no {' or '.join(missing)} attribute")
    return problems


def _walk(group: h5py.Group, prefix: str, describe: bool = True) -> tuple[list[str], int]:
    """Every problem under ``group`` and the number of datasets read."""
    problems: list[str] = []
    count = 0
    try:
        names = list(group.keys())
    except Exception as exc:  # noqa: BLE001
        return [f"group /{prefix}: member list unreadable ({_detail(exc)})"], 0
    for key in names:
        name = f"{prefix}/{key}" if prefix else key
        try:
            obj = group[key]
            dict(obj.attrs)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"group /{name}: unreadable ({_detail(exc)})")
            continue
        if isinstance(obj, h5py.Dataset):
            problems += _read_dataset(name, obj, describe)
            count += 1
        elif isinstance(obj, h5py.Group):
            sub, n = _walk(obj, name, describe)
            problems += sub
            count += n
    return problems, count


def verify_groups(fh: h5py.File, names: Iterable[str]) -> tuple[list[str], int]:
    """Read every dataset under the groups ``names`` (absent ones are skipped) through its
    checksum: damage only, the describing attributes are not checked (a resume's check).

    Returns:
        ``(problems, datasets read)``; each problem is one line naming the group or dataset.
    """
    problems: list[str] = []
    count = 0
    for name in names:
        try:
            obj = fh.get(name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"group /{name}: unreadable ({_detail(exc)})")
            continue
        if isinstance(obj, h5py.Group):
            sub, n = _walk(obj, name, describe=False)
            problems += sub
            count += n
        elif isinstance(obj, h5py.Dataset):
            problems += _read_dataset(name, obj, describe=False)
            count += 1
    return problems, count


def _structure(fh: h5py.File) -> list[str]:
    """The schema rules of the module docstring."""
    problems = []
    for attr in ("schema_version", "created"):
        if attr not in fh.attrs:
            problems.append(f"group /: no {attr} attribute")
    for name, run in fh.get("provenance", {}).items():
        if "status" not in run.attrs:
            problems.append(f"group /provenance/{name}: no status attribute")
    prints = fh.get("fingerprints", {})
    for stage, perf in fh.get("perf", {}).items():
        if not bool(perf.attrs.get("complete", False)):
            continue
        if stage not in prints:
            problems.append(f"group /perf/{stage}: stage complete but /fingerprints/{stage} is missing")
        if not any(k == stage or k.startswith(stage + "_") for k in fh):
            problems.append(f"group /perf/{stage}: stage complete but its group /{stage} is missing")
    return problems


def check_file(fh: h5py.File) -> tuple[list[str], int]:
    """Every problem of an open results file and the number of datasets read."""
    try:
        problems = _structure(fh)
    except Exception as exc:  # noqa: BLE001
        problems = [f"group /: structure unreadable ({_detail(exc)})"]
    found, count = _walk(fh, "")
    return problems + found, count


def damage_in(fh: h5py.File) -> list[str]:
    """The problems of an open results file that are damage (root attributes or a member that
    cannot be read, a dataset whose bytes fail to read or to match their checksum), without the
    schema rules and describing attributes that :func:`check_file` also reports.
    """
    try:
        dict(fh.attrs)
    except Exception as exc:  # noqa: BLE001
        return [f"group /: attributes unreadable ({_detail(exc)})"]
    return _walk(fh, "", describe=False)[0]


def verify_file(path: str | Path) -> tuple[list[str], int]:
    """Open ``path`` read-only and check it (see the module docstring).

    Returns:
        ``(problems, datasets read)``.

    Raises:
        InputFileError: the file is missing or HDF5 cannot open it at all.
    """
    with _open_results(path) as fh:
        return check_file(fh)


def damage_of(path: str | Path) -> list[str]:
    """Open ``path`` read-only and name its damage only (:func:`damage_in`): what a reader's
    failure is blamed on, while a file that merely breaks a schema rule is still read.

    Raises:
        InputFileError: as :func:`verify_file`.
    """
    with _open_results(path) as fh:
        return damage_in(fh)


def _open_results(path: str | Path) -> h5py.File:
    """``path`` opened read-only, refused with one line when it is not an hpcqml results file."""
    fh = open_hdf5_read(path, "results file")
    try:
        if "schema_version" not in fh.attrs:
            raise InputFileError(f"results file {path}: no schema_version attribute; not an hpcqml results file")
    except BaseException:
        fh.close()
        raise
    return fh


def in_child(path: str | Path, fn: Callable[[], T]) -> T:
    """``fn()`` run in a forked child process, its value (or its exception) passed back.

    The HDF5 library can crash outright (a segmentation fault) on metadata scrambled in
    certain ways; in a child that crash becomes one error line naming the file. For
    serial reader commands only (``info``, ``verify``, ``report``): never under MPI.

    Raises:
        InputFileError: the child died by a signal.
    """
    import os
    import pickle
    import signal

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        outcome: tuple[bool, Any]
        try:
            outcome = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the parent as it is
            outcome = (False, exc)
        try:
            payload = pickle.dumps(outcome)
        except Exception as exc:  # noqa: BLE001 - an unpicklable value or exception
            payload = pickle.dumps((False, RuntimeError(_detail(exc))))
        with os.fdopen(write_end, "wb") as out:
            out.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as src:
        payload = src.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or not payload:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        name = signal.Signals(sig).name if sig else f"exit status {os.WEXITSTATUS(status)}"
        raise InputFileError(f"results file {path} is damaged: the HDF5 library crashed reading it ({name}); "
                             "restore it or use --overwrite")
    ok, value = pickle.loads(payload)
    if not ok:
        raise value
    return value


def damage_summary(path: str | Path, problems: list[str]) -> str:
    """The one-line error for a file with ``problems``."""
    more = f" (and {len(problems) - 1} more problem(s); hpcqml verify {path} lists them)" if len(problems) > 1 else ""
    return f"results file {path} is damaged: {problems[0]}{more}; restore it or use --overwrite"


def require_intact(path: str | Path) -> None:
    """Raise one InputFileError line when ``path`` is damaged (:func:`damage_of`)."""
    problems = in_child(path, lambda: damage_of(path))
    if problems:
        raise InputFileError(damage_summary(path, problems))


def add_arguments(parser: Any) -> None:
    """Options of ``hpcqml verify``."""
    parser.add_argument("results", help="results file (HDF5) to check")


def cli_main(args: Any) -> int:
    """``hpcqml verify FILE``: one line per problem on stdout; exit 2 when any was found."""
    problems, count = in_child(args.results, lambda: verify_file(args.results))
    for line in problems:
        print(line)
    if problems:
        raise InputFileError(damage_summary(args.results, problems))
    print(f"{args.results}: {count} dataset(s) read through their checksums; structure as the schema says")
    return 0
