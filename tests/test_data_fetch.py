"""``hpcqml data fetch`` against a loopback HTTP server that serves a synthetic archive.

The server honours HTTP Range requests (as the official server does) and can cut a transfer
short, so resuming, MD5 checking and safe unpacking are exercised end to end without the
network.  Every request goes to 127.0.0.1 and the server stops with the test.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from hpcqml.cli import main
from hpcqml.data.cifar import SUBDIR, load_cifar100
from hpcqml.data.fetch import ARCHIVE, fetch
from hpcqml.data.synth import write_synthetic
from hpcqml.errors import InputFileError, UserError


def _archive(tmp: Path, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A .tar.gz in the official layout holding a tiny synthetic data set (plus ``extra`` members)."""
    d = write_synthetic(tmp / "src", n_train=30, n_test=6, classes=3, seed=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(d, arcname=SUBDIR, recursive=False)
        for name in ("meta", "test", "train"):
            tar.add(d / name, arcname=f"{SUBDIR}/{name}")
        info = tarfile.TarInfo(f"{SUBDIR}/file.txt~")  # the real archive carries this stray file
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        for member in extra or []:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return buf.getvalue()


class _Server:
    """Serves ``payload`` at /cifar.tar.gz; ``cut`` bytes of the first response only, when set."""

    def __init__(self, payload: bytes, cut: int | None = None) -> None:
        self.payload, self.cut, self.ranges = payload, cut, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                start = 0
                header = self.headers.get("Range")
                outer.ranges.append(header)
                if header:
                    start = int(header.split("=")[1].rstrip("-"))
                    if start >= len(outer.payload):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.payload) - 1}/{len(outer.payload)}")
                else:
                    self.send_response(200)
                body = outer.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None:
                    body, outer.cut = body[:outer.cut], None
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cifar.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_fetch_downloads_checks_and_unpacks(tmp_path):
    payload = _archive(tmp_path)
    dest = tmp_path / "data"
    with _Server(payload) as server:
        d = fetch(dest, url=server.url, md5=_md5(payload), progress=None)
    assert d == dest / SUBDIR
    assert sorted(p.name for p in d.iterdir()) == ["meta", "test", "train"]  # file.txt~ is not unpacked
    split = load_cifar100(dest)
    reference = load_cifar100(tmp_path / "src")
    np.testing.assert_array_equal(split.train_x, reference.train_x)
    assert (dest / ARCHIVE).read_bytes() == payload
    assert not (dest / (ARCHIVE + ".part")).exists()


def test_interrupted_download_resumes_with_a_range_request(tmp_path):
    payload = _archive(tmp_path)
    dest = tmp_path / "data"
    half = len(payload) // 2
    with _Server(payload, cut=half) as server:
        with pytest.raises(UserError, match="rerun to continue"):
            fetch(dest, url=server.url, md5=_md5(payload), progress=None)
        assert (dest / (ARCHIVE + ".part")).stat().st_size == half
        assert not (dest / SUBDIR).exists()
        fetch(dest, url=server.url, md5=_md5(payload), progress=None)
    assert server.ranges == [None, f"bytes={half}-"]  # the second request asked for the rest only
    assert (dest / ARCHIVE).read_bytes() == payload
    assert load_cifar100(dest).num_classes == 3


def test_tampered_download_is_deleted_and_nothing_unpacked(tmp_path):
    payload = _archive(tmp_path)
    tampered = bytearray(payload)
    tampered[len(tampered) // 2] ^= 0xFF
    dest = tmp_path / "data"
    with _Server(bytes(tampered)) as server:
        with pytest.raises(UserError, match="does not match the published"):
            fetch(dest, url=server.url, md5=_md5(payload), progress=None)
    assert not (dest / (ARCHIVE + ".part")).exists() and not (dest / ARCHIVE).exists()
    assert not (dest / SUBDIR).exists()


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink"])
def test_hostile_archive_is_refused_whole(tmp_path, kind):
    member = tarfile.TarInfo({"traversal": f"{SUBDIR}/../../evil", "absolute": "/tmp/evil",
                              "symlink": f"{SUBDIR}/link"}[kind])
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        member.size = 4
    payload = _archive(tmp_path, [member])
    source = tmp_path / "copied.tar.gz"
    source.write_bytes(payload)
    dest = tmp_path / "data"
    with pytest.raises(InputFileError, match="refused"):
        fetch(dest, source=source, md5=_md5(payload), progress=None)
    assert not (dest / SUBDIR).exists()
    assert not (tmp_path / "evil").exists()
    assert source.read_bytes() == payload  # the user's own file is left alone


def test_from_file_with_wrong_md5_is_refused_and_kept(tmp_path):
    payload = _archive(tmp_path)
    source = tmp_path / "copied.tar.gz"
    source.write_bytes(payload)
    with pytest.raises(InputFileError, match="does not match"):
        fetch(tmp_path / "data", source=source, md5="0" * 32, progress=None)
    assert source.exists()


def test_cli_fetch_from_file_and_bad_url(tmp_path, capsys):
    payload = _archive(tmp_path)
    source = tmp_path / "copied.tar.gz"
    source.write_bytes(payload)
    assert main(["data", "fetch", "--dest", str(tmp_path / "data"), "--from", str(source), "--md5", _md5(payload)]) == 0
    assert "CIFAR-100 ready" in capsys.readouterr().out
    assert load_cifar100(tmp_path / "data").train_x.shape[0] == 30
    # an error leaves the interpreter (os._exit on one rank), so it runs in a child process
    res = subprocess.run([sys.executable, "-m", "hpcqml", "data", "fetch", "--dest", str(tmp_path / "d2"),
                          "--url", "ftp://example.invalid/x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "must start with http://" in err[0]
