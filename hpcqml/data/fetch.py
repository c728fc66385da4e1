"""``hpcqml data fetch``: CIFAR-100 from its official address, resumable, checked, unpacked safely.

The archive is the authors' ``cifar-100-python.tar.gz`` (about 169 MB) with the published MD5
below.  The download goes to ``DEST/cifar-100-python.tar.gz.part``; a rerun after an
interruption asks the server for the missing bytes only (an HTTP ``Range`` request) and starts
over when the server does not honour it.  Only a complete file whose MD5 matches is renamed
to ``cifar-100-python.tar.gz`` and unpacked.

Unpacking trusts nothing in the archive: of its members only ``cifar-100-python/{train,test,
meta}`` are written, each a regular file within the size limit of the loader; an absolute
path, a ``..`` component, a link or a device anywhere in the archive refuses the whole archive.
The files are unpacked into a temporary folder beside the destination, loaded once through the
restricted reader of :mod:`hpcqml.data.cifar`, and only then renamed into place, so a
half-unpacked or hostile data set is never left where a run would find it.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable

from hpcqml.data.cifar import FILES, MAX_FILE_BYTES, SUBDIR, load_cifar100
from hpcqml.errors import InputFileError, UserError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
OFFICIAL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
#: Largest archive accepted (bytes): the real one is 169,001,437.
MAX_ARCHIVE_BYTES = 1024 * 2**20
CHUNK = 1 << 20

Progress = Callable[[int, int | None, float], None]


def md5_of(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _print_progress(done: int, total: int | None, rate: float) -> None:
    """One progress line on stderr: bytes, rate and the time left."""
    mib = done / 2**20
    if total:
        left = (total - done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f} s left" if left != float("inf") else "time left unknown"
        text = f"{mib:.1f} of {total / 2**20:.1f} MiB ({100 * done / total:.0f} %), {rate / 2**20:.2f} MiB/s, {eta}"
    else:
        text = f"{mib:.1f} MiB, {rate / 2**20:.2f} MiB/s"
    print(f"hpcqml: fetch: {text}", file=sys.stderr, flush=True)


def download(url: str, part: Path, *, timeout: float = 60.0, progress: Progress | None = _print_progress,
             every: float = 2.0) -> int:
    """Download ``url`` into ``part``, continuing a partial file with an HTTP Range request.

    Args:
        url: the archive's address (http or https).
        part: the partial file; its present size is where the download continues.
        timeout: seconds a silent connection may stall before it is given up.
        progress: ``progress(bytes_done, bytes_total_or_None, bytes_per_second)``, called at most
            every ``every`` seconds and at the end.
        every: seconds between progress calls.

    Returns:
        The size of the complete file in bytes.

    Raises:
        UserError: a refused or broken connection, an HTTP error, an archive larger than
            MAX_ARCHIVE_BYTES, or a transfer that ended before the announced length (rerun to
            continue it).
    """
    if not url.startswith(("http://", "https://")):
        raise UserError(f"fetch: URL {url!r} must start with http:// or https://")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # http(s) only: checked above
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range starts at the end: the file is complete
            return have
        raise UserError(f"fetch: {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"fetch: {url}: cannot connect ({reason})") from None
    with response:
        resumed = have > 0 and response.status == 206
        if not resumed:
            have = 0  # the server sent the whole file: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        if total is not None and total > MAX_ARCHIVE_BYTES:
            raise UserError(f"fetch: {url}: {total} bytes announced, more than the {MAX_ARCHIVE_BYTES} accepted")
        done, start, last = have, time.monotonic(), 0.0
        with open(part, "ab" if resumed else "wb") as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, ValueError) as exc:  # includes http.client.IncompleteRead
                    raise UserError(f"fetch: {url}: transfer broke off at {out.tell()} bytes ({type(exc).__name__}); "
                                    f"rerun to continue from there") from None
                if not block:
                    break
                out.write(block)
                done += len(block)
                if done > MAX_ARCHIVE_BYTES:
                    raise UserError(f"fetch: {url}: more than the {MAX_ARCHIVE_BYTES} bytes accepted")
                now = time.monotonic()
                if progress is not None and now - last >= every:
                    progress(done, total, (done - have) / max(now - start, 1e-9))
                    last = now
        if progress is not None:
            progress(done, total, (done - have) / max(time.monotonic() - start, 1e-9))
    if total is not None and done < total:
        raise UserError(f"fetch: {url}: transfer ended at {done} of {total} bytes; rerun to continue from there")
    return done


def _member_name(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The file name a member may be unpacked as (one of FILES), None to skip it.

    Raises:
        InputFileError: an absolute path, a ``..`` component, a link, a device or a FIFO, or a
            member file over the size limit.
    """
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise InputFileError(f"archive {archive}: member {member.name!r} points outside the archive; refused")
    if not (member.isfile() or member.isdir()):
        raise InputFileError(f"archive {archive}: member {member.name!r} is a link or special file; refused")
    if member.isdir():
        return None
    if member.size > MAX_FILE_BYTES:
        raise InputFileError(f"archive {archive}: member {member.name!r} has {member.size} bytes, "
                             f"more than the {MAX_FILE_BYTES} accepted")
    parts = [p for p in path.parts if p != "."]
    if len(parts) == 2 and parts[0] == SUBDIR and parts[1] in FILES:
        return parts[1]
    return None


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack the three data files of ``archive`` into ``dest/cifar-100-python`` (module docstring).

    Returns:
        The ``cifar-100-python`` directory.

    Raises:
        InputFileError: a damaged or hostile archive, a missing data file, or data files that
            the restricted loader refuses.
    """
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / SUBDIR
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as scratch:
        target = Path(scratch) / SUBDIR
        target.mkdir()
        found: set[str] = set()
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    name = _member_name(member, archive)
                    if name is None:
                        continue
                    source = tar.extractfile(member)
                    if source is None:
                        raise InputFileError(f"archive {archive}: member {member.name!r} has no data")
                    with source, open(target / name, "wb") as out:
                        shutil.copyfileobj(source, out, CHUNK)
                    found.add(name)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InputFileError(f"archive {archive}: not a readable .tar.gz ({type(exc).__name__}: {exc})") from None
        missing = sorted(set(FILES) - found)
        if missing:
            raise InputFileError(f"archive {archive}: no {SUBDIR}/{', '.join(missing)} inside")
        load_cifar100(target)  # the restricted reader refuses anything but the documented layout
        if final.exists():
            shutil.rmtree(final)
        target.rename(final)
    return final


def fetch(dest: str | Path, *, url: str = OFFICIAL_URL, md5: str = OFFICIAL_MD5, source: str | Path | None = None,
          progress: Progress | None = _print_progress) -> Path:
    """Put CIFAR-100 into ``dest/cifar-100-python``: download (or take ``source``), check, unpack.

    Args:
        dest: the folder for the data set (the ``[data] dir`` of a run config).
        url: where to download from (the official address by default).
        md5: the archive's expected hex MD5 (the published one by default).
        source: an archive copied by hand; then nothing is downloaded.
        progress: download progress callback (:func:`download`), None for silence.

    Returns:
        The ``cifar-100-python`` directory.

    Raises:
        UserError: download errors (:func:`download`) or an MD5 mismatch; a downloaded file that
            does not match is deleted so a rerun starts clean, a ``source`` file is left alone.
        InputFileError: the archive's content (:func:`unpack`).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if source is not None:
        archive = Path(source)
        if not archive.is_file():
            raise InputFileError(f"fetch --from {archive}: not a regular file")
    else:
        archive = dest / ARCHIVE
        if not (archive.is_file() and md5_of(archive) == md5.lower()):
            part = dest / (ARCHIVE + ".part")
            download(url, part, progress=progress)
            got = md5_of(part)
            if got != md5.lower():
                part.unlink()
                raise UserError(f"fetch: {url}: MD5 {got} does not match the published {md5.lower()}; "
                                f"the download was deleted, rerun to fetch it again")
            part.replace(archive)
            return unpack(archive, dest)  # checked as the .part it was
    got = md5_of(archive)
    if got != md5.lower():
        raise InputFileError(f"archive {archive}: MD5 {got} does not match the published {md5.lower()}")
    return unpack(archive, dest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hpcqml data fetch``."""
    parser.add_argument("--dest", required=True, help="folder to create cifar-100-python/ in ([data] dir)")
    parser.add_argument("--from", dest="source", metavar="FILE", help="use an archive copied by hand")
    parser.add_argument("--url", default=OFFICIAL_URL, help=f"download address (default {OFFICIAL_URL})")
    parser.add_argument("--md5", default=OFFICIAL_MD5, help=f"expected MD5 of the archive (default {OFFICIAL_MD5})")


def cli_fetch(args: argparse.Namespace) -> int:
    """``hpcqml data fetch``: download or take the archive, check it, unpack it safely."""
    d = fetch(args.dest, url=args.url, md5=args.md5, source=args.source)
    print(f"CIFAR-100 ready in {d}")
    return 0
