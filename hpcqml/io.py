"""Atomic file writes: a reader never sees a half-written artifact.

Everything is written to a temporary name in the same directory, flushed to disk and
renamed over the target (``os.replace`` is atomic on POSIX file systems).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0666 less the process umask."""
    return 0o666 & ~_umask()


def executable_mode() -> int:
    """The mode of a new script: 0777 less the process umask (executable where readable)."""
    return 0o777 & ~_umask()


def remove_stale_temporaries(directory: str | os.PathLike, name: str) -> list[Path]:
    """Delete ``.NAME.*.tmp`` files an atomic write killed mid-way left in ``directory``."""
    removed = []
    for tmp in Path(directory).glob(f".{glob.escape(name)}.*.tmp"):  # a name with [...] matches only itself
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


class DiskFullError(OSError):
    """No space left on the device of a file the suite writes (exit 1; the message names
    the file, the free space and, when known, the space the write needed).
    """


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, and for the errors torch's writer gives on a full disk."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("No space left" in text or "unexpected pos" in text
                                              or "file write failed" in text)


def disk_full_error(path: str | os.PathLike, needed: int = 0) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    except OSError:
        free = -1
    need = f"; it needs about {_human(needed)}" if needed > 0 else ""
    have = f"{_human(free)} free" if free >= 0 else "free space unknown"
    return DiskFullError(errno.ENOSPC, f"no space left on the device of {path} ({have}{need}); "
                         "free space or move the run's output/workdir, then rerun to resume", str(path))


def _same_file(tmp: str, opened: os.stat_result) -> bool:
    """Whether the name ``tmp`` still points at the regular file we created (not a swapped-in link)."""
    try:
        now = os.lstat(tmp)
    except OSError:
        return False
    return stat.S_ISREG(now.st_mode) and (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], size_hint: int = 0,
                 mode: int | None = None) -> Path:
    """Call ``write(fh)`` on a new temporary file and rename it onto ``path`` once it is durable.

    The temporary file is created with ``O_EXCL | O_NOFOLLOW`` (``tempfile.mkstemp``) and
    written, chmod-ed and synced only through its descriptor, never reopened by name: in a
    directory other users can write, a symlink planted at the temporary name or at ``path``
    cannot redirect the write.  Before the rename the temporary name is checked to still be
    the file written; a symlink at ``path`` is replaced, never followed.

    Args:
        path: the target file.
        write: writes the complete content to the binary file object it is given (opened
            read-write at offset 0; ``torch.save`` and ``h5py.File`` accept it).
        size_hint: the expected size in bytes, named in the error if the disk is full.
        mode: permission bits of the result; default 0666 less the umask, as ``open`` gives.

    Returns:
        ``path``. A full disk raises :class:`DiskFullError` and leaves ``path`` as it was.

    Raises:
        OSError: the temporary file was replaced by someone else before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    written = 0
    try:
        with os.fdopen(fd, "w+b") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), _default_mode() if mode is None else mode)
            os.fsync(fh.fileno())
            opened = os.fstat(fh.fileno())
            written = opened.st_size
            if not _same_file(tmp, opened):
                raise OSError(errno.EEXIST, f"temporary file {tmp} was replaced by another process while "
                              f"writing {path}; not renaming it (is {path.parent} writable by others?)")
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(path, max(size_hint, written)) from exc
        raise
    _fsync_dir(path.parent)
    return path


class FileTooLargeError(ValueError):
    """A small record file (an origin record, a stop note) is larger than its limit."""


def read_limited(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the small regular file ``path``, refusing anything else.

    Opened without blocking (a FIFO planted at ``path`` cannot hang the reader) and checked
    on the open descriptor: a directory, device or FIFO is refused, and so is a file larger
    than ``limit`` bytes (nothing beyond ``limit + 1`` bytes is ever read).

    Raises:
        OSError: ``path`` cannot be opened or is not a regular file.
        FileTooLargeError: ``path`` holds more than ``limit`` bytes.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path}: not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit or info.st_size > limit:
        raise FileTooLargeError(f"{path}: {max(info.st_size, len(data)):,} bytes, more than the {limit:,} "
                                "such a file may have")
    return data


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (``mode``: as :func:`atomic_write`)."""
    def write(fh: BinaryIO) -> None:
        fh.write(data)
    return atomic_write(path, write, mode=mode)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (checkpoints survive a kill mid-write)."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def open_hdf5_read(path: str | os.PathLike, what: str) -> Any:
    """Open an HDF5 file read-only, with one-line errors for a missing or unreadable file.

    Args:
        path: the file.
        what: what the file is, for the message ("results file", "instance file", ...).

    Returns:
        The open ``h5py.File`` (the caller closes it).

    Raises:
        InputFileError: the file does not exist, is not a regular file, or HDF5 cannot open it.
    """
    import h5py

    from hpcqml.errors import InputFileError

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{what} {path}: not found" if not path.exists() else f"{what} {path}: not a regular file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputFileError(f"{what} {path}: not a readable HDF5 file ({type(exc).__name__})") from None
